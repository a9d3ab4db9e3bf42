"""The application's configuration: one pydantic model validating a Serve YAML's `args`.

`AppConfig` has the fixed sections (ingress, preprocess, postprocess, jobs) and one section per
task of the registry (`deployments.tasks.TASKS`: `real`, `anime`, `layers`), each the task's own
section model (`Task.section`: its model's settings plus a `serve:` block of Ray Serve options).
`config_model(tasks)` builds the model for another registry (a test's extra task). Every field is
documented where it is declared; bad values are refused with a message naming the field and the
value, never repaired. A leaf: imports pydantic and the section models, never Ray, FastAPI or
Starlette, so `imgserve plan`, `imgserve kuberay` and `imgserve lora inspect` run without them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from deployments.options import DeploymentOptions
from deployments.postprocess import PostprocessConfig
from deployments.preprocess import PreprocessConfig
from deployments.task import Tasks, TaskSection
from deployments.tasks import TASKS
from deployments.text_encoder import TextEncoderConfig
from deployments.validation import at_least, expanded_paths
from serve_app.keys import check_digest
from serve_app.webhook_rules import parse_allow, parse_secret


class IngressSection(BaseModel):
    """The HTTP ingress: routes, validation, error mapping. Never touches pixels."""

    model_config = ConfigDict(extra="forbid")

    serve: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, max_queued_requests=256))
    """Ray Serve options of the ingress deployment. Its queue is finite, so a flood is refused (503)
    instead of held; its slots (`max_ongoing_requests`) must exceed `max_event_streams`, since an
    open event stream holds one."""
    retry_after_s: int = 2
    """Value of the Retry-After header sent with 503 when a queue is full."""
    request_timeout_s: float | None = 600.0
    """Longest a synchronous request (HTTP or handle) may take: past it the client gets 504
    `timeout` and the model stops at its next denoising step. None: no limit. Jobs have none (they
    report progress and can be cancelled)."""
    api_keys_sha256: list[str] = Field(default_factory=list)
    """SHA-256 hex digests of the accepted API keys (`imgserve key new` / `imgserve key hash`), never
    the keys. With any key configured here or in `api_keys_env`, every /v1/* route needs
    `Authorization: Bearer <key>` or `X-API-Key: <key>` (else 401); /healthz and the web page stay open."""
    api_keys_env: str | None = "IMGSERVE_API_KEYS_SHA256"
    """Name of an environment variable that the ingress replica reads when it starts: more accepted
    digests, comma-separated (e.g. from a Kubernetes Secret). null: none read."""
    rate_limit_per_minute: int | None = None
    """Requests per minute to /v1/* per API key (per client address when no keys are configured), per
    ingress replica: with N replicas a client gets up to N times this. Past it: 429 with Retry-After.
    null: no limit."""
    rate_limit_burst: int | None = None
    """Requests a key may make at once before the per-minute rate applies (the token bucket's size);
    null: the same as `rate_limit_per_minute`."""
    read_timeout_s: float = 30.0
    """Longest a client may pause while sending its request body (between two pieces of it, raw or
    multipart): past it the request gets 408 `read_timeout` and its ingress slot back (a client sending
    one byte now and then, or none, holds a slot this long at most). A slow but steady upload is fine."""
    min_body_bytes_per_s: int = 1024
    """Slowest average rate a request body may arrive at once `read_timeout_s` has passed since it
    began; slower: 408 `read_timeout`. A client trickling one byte a second is cut off after about
    `read_timeout_s`; a 20 MB upload may take 5 hours at this rate. 0: only pauses count."""
    max_event_streams: int = 128
    """Event streams (`GET /v1/jobs/{id}/events`) open at once per ingress replica; past it 429
    `too_many_streams` with Retry-After (the job's status can still be polled). An open stream holds
    one of the replica's `serve.max_ongoing_requests` slots, so when either is set this must be below
    it: streams alone never take every slot."""
    max_event_streams_per_key: int = 20
    """Event streams open at once per API key (per client address when keys are off), per replica;
    past it 429 `too_many_streams`."""
    event_stream_max_s: float = 3600.0
    """Longest one event stream stays open: it then ends with the SSE comment `: stream lifetime
    reached ...`; the client reconnects (a browser's EventSource does by itself, sending
    `Last-Event-ID`, and the stream resumes after the last event it had)."""
    event_heartbeat_s: float = 15.0
    """An SSE comment line (`: keep-alive`) is sent on a quiet stream this often, so proxies and
    clients can tell a live stream from a dead one."""
    expose_replica: bool = False
    """Send `X-Imgserve-Replica` and `X-Imgserve-Encoder` (the host name and process id of the model
    and text encoder replicas that served a result) to clients. Off: they tell any client the
    cluster's host names; turn on for debugging or tests."""
    max_images: int = 4
    """Most results one `POST /v1/images/edits` may ask for (`n`); each is one run of the task."""
    catalog_ttl_s: float = 5.0
    """Seconds the ingress (and the job runner) trust the LoRA versions and styles the model replicas
    last reported (`serve_app.catalogs`); a request naming one they do not list reads the reports
    again at once. The ingress never reads model directories itself."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins (`https://app.example.com`, scheme://host[:port], no path) whose browser pages may call
    the API: they get CORS headers and answered preflights. `*` allows any origin. Empty: no CORS
    headers at all (the service's own web page needs none)."""

    _not_negative_rate = at_least(0, "min_body_bytes_per_s")
    _at_least_one = at_least(1, "retry_after_s", "max_images", "rate_limit_per_minute", "rate_limit_burst", "max_event_streams",
                             "max_event_streams_per_key")

    @field_validator("read_timeout_s", "event_stream_max_s", "event_heartbeat_s", "catalog_ttl_s")
    @classmethod
    def _positive_seconds(cls, value: float, info: Any) -> float:
        if not 0 < value < float("inf"):
            raise ValueError(f"{info.field_name} must be a positive number of seconds, got {value}")
        return value

    @field_validator("request_timeout_s")
    @classmethod
    def _timeout(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"request_timeout_s must be a positive number of seconds or null, got {value}")
        return value

    @field_validator("api_keys_sha256")
    @classmethod
    def _digests(cls, value: list[str]) -> list[str]:
        return [check_digest(digest, f"api_keys_sha256[{index}]") for index, digest in enumerate(value)]

    @field_validator("api_keys_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"api_keys_env must be an environment variable name or null, got {value!r}")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for index, origin in enumerate(value):
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+", origin):
                raise ValueError(f"cors_origins[{index}] must be an origin like https://app.example.com "
                                 f"(scheme://host[:port], no path or trailing slash) or *, got {origin!r}")
        return value

    @model_validator(mode="after")
    def _streams_leave_slots(self) -> IngressSection:
        ongoing = self.serve.max_ongoing_requests
        if self.max_event_streams >= ongoing:
            raise ValueError(f"max_event_streams ({self.max_event_streams}) must be below ingress "
                             f"serve.max_ongoing_requests ({ongoing}): an open event stream holds an ingress "
                             "slot, and streams alone must not take every slot")
        return self

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> IngressSection:
        if self.rate_limit_burst is not None and self.rate_limit_per_minute is None:
            raise ValueError(f"rate_limit_burst ({self.rate_limit_burst}) needs rate_limit_per_minute")
        return self


class PreprocessSection(PreprocessConfig):
    """Preprocess deployment: its own settings plus Serve options."""

    serve: DeploymentOptions = Field(default_factory=DeploymentOptions)
    """Ray Serve options of the preprocess deployment (CPU replicas)."""


class PostprocessSection(PostprocessConfig):
    """Postprocess deployment: its own settings plus Serve options."""

    serve: DeploymentOptions = Field(default_factory=DeploymentOptions)
    """Ray Serve options of the postprocess deployment (CPU replicas)."""


class JobsSection(BaseModel):
    """The job runner and its store: settings plus Serve options (exactly one replica: it owns the store)."""

    model_config = ConfigDict(extra="forbid")

    serve: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
    )
    """Ray Serve options of the JobRunner deployment; `num_replicas` must stay 1."""
    directory: Path = Path("~/.cache/imgserve/jobs")
    """Where the SQLite database and the job inputs/results live (on the head node)."""
    max_queued: int = 100
    """Jobs waiting to start beyond which new submissions get 503 + Retry-After."""
    concurrency: int = 2
    """Jobs running at once; the model deployments' own queues still bound the GPU work."""
    max_attempts: int = 2
    """Runs of one job before it fails (2: one retry when a replica dies)."""
    retention_s: float = 7 * 24 * 3600.0
    """Finished jobs (rows and files) are forgotten this long after they end."""
    backpressure_retry_s: float = 0.5
    """Pause before a job refused by a full model queue is tried again (it keeps its place)."""
    max_queued_per_key: int | None = None
    """Jobs one API key (one client address when keys are off) may have waiting; past it 429
    `quota_exceeded` with Retry-After. null: only `max_queued` applies."""
    max_wait_s: float | None = 24 * 3600.0
    """Longest a job may wait queued; past it the job fails with `queue_timeout`. null: no limit."""
    max_run_s: float | None = 3600.0
    """Longest a job may run (from its claim to its result, retries each counted afresh); past it
    the job stops at its next step and fails with `run_timeout`, naming the deployment it waited
    for when that deployment has no running replica. null: no limit."""
    lease_s: float = 60.0
    """A running job's lease, renewed by its progress and by the runner while it waits; a job whose
    lease expired (its runner died or hung) is queued again within `max_attempts`, else failed."""
    housekeeping_s: float = 60.0
    """How often the runner reaps expired leases and applies the limits, retention and
    `max_store_bytes` while it is up."""
    max_store_bytes: int | None = None
    """Most bytes of inputs and results kept; past it the oldest finished jobs are forgotten first,
    and a submission that still does not fit is refused with 507 `insufficient_storage`. null: no bound."""
    min_free_bytes: int = 256 * 1024 * 1024
    """Free bytes the store's disk must keep: a submission that would leave less is refused with 507
    `insufficient_storage`."""

    priority_ageing_s: float = 300.0
    """How much a job's `priority` is worth in seconds of waiting, within its key's queue: `high`
    goes as if submitted this much earlier, `low` this much later, so a `low` job waits at most
    2 × this behind `high` jobs submitted after it, never forever."""
    idempotency_ttl_s: float = 24 * 3600.0
    """How long an `Idempotency-Key` is remembered (per API key): the same key with the same request
    returns the original job; with another request 422 `idempotency_conflict`."""
    webhook_allow: list[str] = Field(default_factory=list)
    """Hosts (`hooks.example.com`, `hooks.example.com:8443`, an IP address or a CIDR block) that
    `webhook_url` may name. Empty: webhooks are refused. Private, loopback and link-local addresses
    are refused unless listed here by address or block, whatever name resolves to them."""
    webhook_secret_env: str | None = "IMGSERVE_WEBHOOK_SECRET"
    """Environment variable (read by the runner when it starts) holding the signing secret,
    `whsec_` + base64 (Standard Webhooks); it wins over `webhook_secret`. null: none read."""
    webhook_secret: str | None = None
    """The signing secret in the config itself (`whsec_` + base64); prefer the environment. Without
    a secret, a submission with `webhook_url` is refused (422)."""
    webhook_retry_s: float = 3600.0
    """How long a delivery is retried (exponential backoff from 1 s, at most 5 min apart) before it
    is given up; every attempt and the last status are in the job's `webhook`."""
    webhook_timeout_s: float = 10.0
    """Longest one delivery attempt may take (connect + answer)."""

    _positive = at_least(1, "max_queued", "concurrency", "max_attempts", "max_queued_per_key", "max_store_bytes")

    @field_validator("max_wait_s", "max_run_s")
    @classmethod
    def _optional_limit(cls, value: float | None, info: Any) -> float | None:
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"{info.field_name} must be a positive number of seconds or null, got {value}")
        return value

    _not_negative = at_least(0, "min_free_bytes")

    @field_validator("retention_s", "backpressure_retry_s", "lease_s", "housekeeping_s", "priority_ageing_s",
                     "idempotency_ttl_s", "webhook_retry_s", "webhook_timeout_s")
    @classmethod
    def _positive_float(cls, value: float, info: Any) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value}")
        return value

    @field_validator("webhook_allow")
    @classmethod
    def _webhook_allow(cls, value: list[str]) -> list[str]:
        try:
            parse_allow(value)  # host, host:port, IP address or CIDR block
        except ValueError as exc:
            raise ValueError(f"webhook_allow: {exc}") from None
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_secret(value)  # its message never repeats the secret
            except ValueError as exc:
                raise ValueError(f"webhook_secret: {exc}") from None
        return value

    _paths = expanded_paths("directory")

    @model_validator(mode="after")
    def _single_owner(self) -> JobsSection:
        if self.serve.num_replicas != 1:
            raise ValueError(f"jobs.serve.num_replicas must be 1 (one runner owns the store), got {self.serve.num_replicas}")
        return self


class BaseAppConfig(BaseModel):
    """The sections every imgserve application has; `config_model` adds one per task."""

    model_config = ConfigDict(extra="forbid")

    tasks: ClassVar[Tasks] = Tasks()
    """The registry whose tasks this model has sections for."""

    name: Literal["imgserve"] = "imgserve"
    """Application name used with `serve.get_app_handle`; fixed so clients can rely on it."""
    cache_dir: Path = Path("~/.cache/imgserve")
    """Where generated tiny models and other derived files live; `~` is expanded."""
    ingress: IngressSection = Field(default_factory=IngressSection)
    """HTTP ingress settings."""
    preprocess: PreprocessSection = Field(default_factory=PreprocessSection)
    """Decode/validate/resize settings and Serve options."""
    postprocess: PostprocessSection = Field(default_factory=PostprocessSection)
    """Encoding settings and Serve options."""
    jobs: JobsSection = Field(default_factory=JobsSection)
    """Asynchronous jobs: queue depth, retries, retention, where the store lives."""
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    """Where the diffusion tasks' prompts are encoded: in each replica, or the TextEncoder stage."""

    _paths = expanded_paths("cache_dir")

    @model_validator(mode="after")
    def _inputs_reach_every_model(self) -> BaseAppConfig:
        for section in self.sections().values():
            section.check_input_edge(self.preprocess.max_long_edge)
        return self

    @model_validator(mode="after")
    def _text_encoder_fits(self) -> BaseAppConfig:
        if self.text_encoder.mode == "stage":
            self.text_encoder.check(self.staged())
        return self

    def staged(self) -> tuple[str, ...]:
        """The tasks whose prompts the TextEncoder stage encodes (none with `mode: inline`)."""
        if self.text_encoder.mode != "stage":
            return ()
        return tuple(task.name for task in self.tasks if task.encodes_text)

    def section(self, task: str) -> TaskSection:
        """The config section of `task`."""
        return getattr(self, task)

    def sections(self) -> dict[str, TaskSection]:
        """{task: its section}, in the registry's order."""
        return {task.name: getattr(self, task.name) for task in self.tasks}


@functools.cache
def config_model(tasks: Tasks) -> type[BaseAppConfig]:
    """The config model with one section per task of `tasks` (the section's key is the task's name)."""
    fields: dict[str, Any] = {task.name: (task.section, Field(default_factory=task.section, description=task.summary))
                              for task in tasks}
    model = create_model("AppConfig", __base__=BaseAppConfig, __module__=__name__, **fields)
    model.__doc__ = "Everything `serve_app.app:build_app` needs; the `args:` of a Serve config YAML."
    model.tasks = tasks
    return model


AppConfig = config_model(TASKS)
"""The config of the built-in tasks."""


def load_config(args: dict[str, Any] | BaseAppConfig | None, tasks: Tasks = TASKS) -> BaseAppConfig:
    """Validate Serve `args` (a dict from YAML) into the config of `tasks`."""
    if isinstance(args, BaseAppConfig):
        if args.tasks != tasks:
            raise ValueError(f"a config of {args.tasks} given where one of {tasks} is needed")
        return args
    mode = (args or {}).get("text_encoder", {}) or {}
    mode = mode.get("mode") if isinstance(mode, dict) else None
    # the diffusion sections plan their cards with or without the encoder: they learn the mode first
    return config_model(tasks).model_validate(args or {}, context={"text_encoder": mode})
