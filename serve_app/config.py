"""The application's configuration: one pydantic model (`AppConfig`) validating a Serve YAML's `args`.

Each deployment owns its own small config model (in `deployments/`); a section here is that model
plus a `serve:` block of Ray Serve options (`DeploymentOptions`). Every field is documented where it
is declared; bad values are refused with a message naming the field and the value, never repaired.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.anime import AnimeModelConfig
from deployments.placement import DoesNotFit
from deployments.validation import at_least
from deployments.layers import LayersModelConfig
from deployments.postprocess import PostprocessConfig
from deployments.preprocess import PreprocessConfig
from deployments.real import RealModelConfig
from serve_app.access import check_digest
from serve_app.jobs import JobsConfig

_ACTOR_OPTION_KEYS = {"num_cpus", "num_gpus", "memory", "resources", "runtime_env", "accelerator_type"}


class DeploymentOptions(BaseModel):
    """Ray Serve options of one deployment, applied by the builder with `.options(...)`."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = 1
    """Fixed replica count; must be None (null) when `autoscaling_config` is given."""
    autoscaling_config: dict[str, Any] | None = None
    """Ray Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests, delays)."""
    max_ongoing_requests: int = 4
    """Requests a replica works on at once; model replicas use 1: never batch diffusion prompts."""
    max_queued_requests: int = -1
    """Requests waiting per caller for this deployment beyond which callers get backpressure
    (HTTP 503 with Retry-After); -1 means unbounded."""
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.25})
    """Ray resources per replica: num_cpus, num_gpus, memory, resources (e.g. {"rtx4090": 1}),
    runtime_env. Fractional values are allowed, so the demo fits a 2-core machine."""
    health_check_period_s: float = 10.0
    """Seconds between `check_health` calls on each replica."""
    graceful_shutdown_timeout_s: float = 20.0
    """Seconds a stopping replica gets to finish the requests it holds."""

    _counts = at_least(1, "num_replicas", "max_ongoing_requests")

    @field_validator("max_queued_requests")
    @classmethod
    def _queued(cls, value: int) -> int:
        if value < -1 or value == 0:
            raise ValueError(f"max_queued_requests must be -1 (unbounded) or >= 1, got {value}")
        return value

    @field_validator("ray_actor_options")
    @classmethod
    def _actor_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - _ACTOR_OPTION_KEYS)
        if unknown:
            raise ValueError(f"ray_actor_options has unknown keys {unknown}; allowed: {sorted(_ACTOR_OPTION_KEYS)}")
        for key in ("num_cpus", "num_gpus"):
            if key in value and not (isinstance(value[key], (int, float)) and value[key] >= 0):
                raise ValueError(f"ray_actor_options.{key} must be a number >= 0, got {value[key]!r}")
        return value

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentOptions:
        if self.autoscaling_config is not None and self.num_replicas is not None:
            raise ValueError(
                f"num_replicas ({self.num_replicas}) and autoscaling_config are exclusive: set num_replicas: null"
            )
        if self.autoscaling_config is None and self.num_replicas is None:
            raise ValueError("num_replicas is null but no autoscaling_config is given")
        return self

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for `serve.deployment(...).options(...)`."""
        return self.model_dump(exclude_none=True)


def _model_defaults(**ray_actor_options: Any) -> DeploymentOptions:
    return DeploymentOptions(max_ongoing_requests=1, max_queued_requests=8, ray_actor_options=ray_actor_options)


class IngressSection(BaseModel):
    """The HTTP ingress: routes, validation, error mapping. Never touches pixels."""

    model_config = ConfigDict(extra="forbid")

    serve: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=64))
    """Ray Serve options of the ingress deployment."""
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
    cors_origins: list[str] = Field(default_factory=list)
    """Origins (`https://app.example.com`, scheme://host[:port], no path) whose browser pages may call
    the API: they get CORS headers and answered preflights. `*` allows any origin. Empty: no CORS
    headers at all (the service's own web page needs none)."""

    _at_least_one = at_least(1, "retry_after_s", "rate_limit_per_minute", "rate_limit_burst")

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


def _check_placement(section: RealSection | LayersSection, task: Literal["real", "layers"]) -> None:
    """A placement plan owns the GPU request, and must fit the cards it is given. `task` is also the
    section's name in the config."""
    if section.placement is None:
        return
    options = section.serve.ray_actor_options
    if "num_gpus" in options:
        raise ValueError(
            f"{task}.serve.ray_actor_options.num_gpus ({options['num_gpus']}) conflicts with "
            f"{task}.placement: the plan decides how many GPUs a replica asks for; remove num_gpus"
        )
    try:
        section.plan(task)
    except DoesNotFit as error:
        raise ValueError(f"{task}.placement does not fit: {error}") from None


class RealSection(RealModelConfig):
    """The `real` task's model deployment: its own settings plus Serve options."""

    serve: DeploymentOptions = Field(default_factory=lambda: _model_defaults(num_cpus=1, num_gpus=1))
    """Ray Serve options of the RealModel deployment (a GPU replica by default). With `placement`,
    leave out `num_gpus`: the builder asks for the GPUs (and `placement_group_bundles`) the plan needs."""

    @model_validator(mode="after")
    def _placement(self) -> RealSection:
        _check_placement(self, "real")
        return self


class AnimeSection(AnimeModelConfig):
    """The `anime` task's model deployment: its own settings plus Serve options."""

    serve: DeploymentOptions = Field(default_factory=lambda: _model_defaults(num_cpus=1))
    """Ray Serve options of the AnimeModel deployment (a CPU replica by default; the model is
    small enough for CPUs, or a GPU fraction such as num_gpus: 0.25)."""


class LayersSection(LayersModelConfig):
    """The `layers` task's model deployment: its own settings plus Serve options."""

    serve: DeploymentOptions = Field(default_factory=lambda: _model_defaults(num_cpus=1, num_gpus=1))
    """Ray Serve options of the LayersModel deployment (a GPU replica by default); with
    `placement`, leave out `num_gpus` as for `real`."""

    @model_validator(mode="after")
    def _placement(self) -> LayersSection:
        if self.placement is not None:
            # the plan must hold the largest request this section admits
            if self.placement.layers < self.max_layers:
                raise ValueError(f"layers.placement.layers ({self.placement.layers}) must be >= layers.max_layers "
                                 f"({self.max_layers}): a request may ask for that many")
            if self.placement.resolution < max(self.resolutions):
                raise ValueError(f"layers.placement.resolution ({self.placement.resolution}) must be >= the largest "
                                 f"of layers.resolutions ({max(self.resolutions)})")
        _check_placement(self, "layers")
        return self


class JobsSection(JobsConfig):
    """The job runner: its own settings plus Serve options (exactly one replica: it owns the store)."""

    serve: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
    )
    """Ray Serve options of the JobRunner deployment; `num_replicas` must stay 1."""

    @model_validator(mode="after")
    def _single_owner(self) -> JobsSection:
        if self.serve.num_replicas != 1:
            raise ValueError(f"jobs.serve.num_replicas must be 1 (one runner owns the store), got {self.serve.num_replicas}")
        return self


class AppConfig(BaseModel):
    """Everything `serve_app.app:build_app` needs; the `args:` of a Serve config YAML."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["imgserve"] = "imgserve"
    """Application name used with `serve.get_app_handle`; fixed so clients can rely on it."""
    cache_dir: Path = Path("~/.cache/imgserve")
    """Where generated tiny models and other derived files live; `~` is expanded."""
    ingress: IngressSection = Field(default_factory=IngressSection)
    """HTTP ingress settings."""
    preprocess: PreprocessSection = Field(default_factory=PreprocessSection)
    """Decode/validate/resize settings and Serve options."""
    real: RealSection = Field(default_factory=RealSection)
    """The `real` task (Qwen-Image-Edit-2511 + LoRA)."""
    anime: AnimeSection = Field(default_factory=AnimeSection)
    """The `anime` task (AnimeGANv2 styles)."""
    layers: LayersSection = Field(default_factory=LayersSection)
    """The `layers` task (Qwen-Image-Layered → RGBA layers as ZIP/PSD)."""
    postprocess: PostprocessSection = Field(default_factory=PostprocessSection)
    """Encoding settings and Serve options."""
    jobs: JobsSection = Field(default_factory=JobsSection)
    """Asynchronous jobs: queue depth, retries, retention, where the store lives."""

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _plan_holds_largest_input(self) -> AppConfig:
        placement = self.real.placement
        if placement is not None and placement.resolution < self.preprocess.max_long_edge:
            raise ValueError(f"real.placement.resolution ({placement.resolution}) must be >= "
                             f"preprocess.max_long_edge ({self.preprocess.max_long_edge}): inputs reach the model that large")
        return self


def load_config(args: dict[str, Any] | AppConfig | None) -> AppConfig:
    """Validate Serve `args` (a dict from YAML) into an `AppConfig`."""
    if isinstance(args, AppConfig):
        return args
    return AppConfig.model_validate(args or {})
