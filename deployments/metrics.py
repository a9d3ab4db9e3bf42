"""Prometheus metrics of imgserve, through Ray Serve's metrics API (`ray.serve.metrics`).

One place for every metric the service records. Each is a module-level object whose Ray metric is
created lazily, on its first use in a process, so a Serve replica gets Serve's own tags
(`deployment`, `replica`, `application`) added to it. Outside Ray (tests and GPU benchmarks that
construct the deployment classes directly) or when `ray` was never imported, recording does
nothing and costs a dictionary lookup; recording never raises into a request. `capture()` lets a
test see what would have been recorded, with or without Ray.

Ray exports custom metrics on each node's metrics agent (`ray.init(_metrics_export_port=...)`, `ray
start --metrics-export-port`, on KubeRay port 8080 of every pod) with the prefix `ray_`; counters
get the suffix `_total`, histograms `_bucket`/`_sum`/`_count`. Every series also carries Ray's
labels (`SessionName`, `NodeAddress`, `WorkerId`, ...) and, inside a replica, Serve's.

| exported name | type | tags | recorded in |
|---|---|---|---|
| `ray_imgserve_requests_total` | counter | task, status, api | Ingress (`serve_app.observability.Observability`, the outermost middleware): every `POST /v1/{task}` (`api=sync`), `POST /v1/jobs` (`api=jobs`) and `POST /v1/images/edits` (`api=openai`) once it ends; status is the HTTP status it was answered with (499 where the client hung up before the answer began); task is the name of a task the ingress serves (`real`, `anime`, `layers`) or `unknown` |
| `ray_imgserve_request_seconds` | histogram | task, status, api | Ingress: the same requests, from arrival at the ingress to the last byte handed to Serve's proxy (end to end for `api=sync`; admission only for `api=jobs`) |
| `ray_imgserve_rejections_total` | counter | task, reason | Ingress: requests answered 429, 503 or 504; reason is the JSON error code (`queue_full`, `unavailable`, `rate_limited`, `timeout`, ...) |
| `ray_imgserve_stage_seconds` | histogram | task, stage | Preprocess (`preprocess`), the models (`encode_prompt`, `encode_image`, `denoise`, `decode`; layers also `caption` when it captions; anime `stylize`), Postprocess (`postprocess`); successful stages only. With the text encoder stage, `encode_prompt` and `caption` are recorded by the TextEncoder deployment (its `deployment` tag), not by the model |
| `ray_imgserve_lora_events_total` | counter | event, version | RealModel: `load` (read from disk into the replica), `evict` (dropped by its LRU), `hit` (a request whose version was already resident) |
| `ray_imgserve_lora_default_usable` | gauge | version | RealModel: 1 while the replica's default LoRA version (fixed when it started, or `real.default_lora`) can be loaded from disk, 0 once its file is gone or no longer fits (the replica keeps serving a resident copy; `GET /v1/status` says why) |
| `ray_imgserve_gpu_peak_bytes` | histogram | task, gpu | RealModel, LayersModel: `torch.cuda.max_memory_allocated(gpu)` over one successful request (peak statistics reset at its start), one observation per CUDA device the replica sees that allocated anything. Without CUDA nothing is recorded: the series is absent, never 0 |
| `ray_imgserve_jobs_queued` | gauge | | JobRunner: jobs waiting to start (refreshed every second by the dispatcher) |
| `ray_imgserve_jobs_running` | gauge | | JobRunner: jobs running now |
| `ray_imgserve_jobs_finished_total` | counter | task, state | JobRunner: jobs reaching `succeeded`, `failed` or `cancelled` |
| `ray_imgserve_job_seconds` | histogram | task, state | JobRunner: submission to final state (queue wait included) |
| `ray_imgserve_abandoned_total` | counter | task, reason | Ingress (`Orchestrator.run`): synchronous requests whose caller went away, stopped at the model's next step; reason `client_disconnected` (HTTP client hung up), `caller_cancelled` (a handle caller cancelled its response), `timeout` (`ingress.request_timeout_s`) |
| `ray_imgserve_model_seconds_total` | counter | task, key_id | Ingress and JobRunner (`Orchestrator.run`): seconds the model deployments' threads and the text encoder stage worked on a key's requests and jobs; key_id is the API key's id, `-` with keys off |
| `ray_imgserve_job_limits_total` | counter | task, reason | JobRunner: jobs ended or re-queued by a limit, not by their own work: `lease_expired`, `queue_timeout`, `run_timeout`, `result_lost` |
| `ray_imgserve_job_store_bytes` | gauge | | JobRunner: bytes of job inputs and results on the store's disk (refreshed every second) |
| `ray_imgserve_event_streams` | gauge | | Ingress: job event streams open on this replica (refreshed every second while the replica follows any) |

Ray Serve exports its own next to these (names as scraped from Ray 2.60): queue depth
`ray_serve_deployment_queued_queries` (requests a caller's router holds for a deployment; a gauge
per calling handle, sum it by `deployment`), `ray_serve_num_ongoing_requests_at_replicas` (the
routers' view) and `ray_serve_replica_processing_queries` (the replicas' view), replicas
`ray_serve_deployment_replica_healthy`, HTTP `ray_serve_num_http_requests_total{route,status_code}`
and `ray_serve_http_request_latency_ms_bucket`, per-deployment
`ray_serve_deployment_processing_latency_ms_bucket`, and multiplexing
`ray_serve_multiplexed_models_load_counter_total`. `cluster/grafana-dashboard.json` uses both.

Stage times are measured around the pipeline's own methods (`DiffusionStages`, for real and
layers alike; layers adds its `caption` time): `encode_prompt`
(the text encoder, positive and negative prompt), `encode_image` (`prepare_latents`: VAE encode of
the condition image plus the initial noise), `denoise` (from the latents being ready to the start
of the VAE decode: every step, the scheduler and the step callbacks) and `decode` (`vae.decode`).
On CUDA each boundary synchronises the replica's devices, so kernels are counted in the stage that
queued them (a few synchronisations per request).

Histogram buckets span the tiny CPU demo (milliseconds) and real GPUs (seconds to minutes); Ray
computes a histogram's `_sum` from bucket midpoints, so use `histogram_quantile` over `_bucket`,
not `_sum / _count`, for latencies.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("imgserve.metrics")

#: Seconds: 5 ms … 30 min (the tiny demo's stages are milliseconds, a 4090's denoise is minutes).
SECONDS_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0,
)
#: Bytes (GB = 1e9, as the placement planner counts): 0.25 GB … 141 GB, dense around a 24 GB card.
GPU_BYTES_BUCKETS: tuple[float, ...] = tuple(
    gb * 1e9 for gb in (0.25, 0.5, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 21, 22, 22.5, 23, 24, 25.8, 32, 40,
                        48, 64, 80, 96, 141)
)

_captures: list[list[tuple[str, float, dict[str, str]]]] = []


class _Metric:
    """One metric: the Ray object is made on first use in each process (see the module docstring)."""

    def __init__(self, kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (),
                 boundaries: tuple[float, ...] | None = None) -> None:
        self.kind = kind
        """`counter`, `histogram` or `gauge`."""
        self.name = name
        """The name given to Ray (exported with the prefix `ray_`, counters also with `_total`)."""
        self.description = description
        self.tag_keys = tag_keys
        self.boundaries = boundaries
        self._ray: Any = None
        self._failed = False
        self._lock = threading.Lock()

    @property
    def exported(self) -> str:
        """The family name a Prometheus scrape shows."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"

    def _backend(self) -> Any:
        if self._ray is not None or self._failed:
            return self._ray
        ray = sys.modules.get("ray")  # never import Ray just to record a metric
        try:
            if ray is None or not ray.is_initialized():
                return None
            with self._lock:
                if self._ray is None:
                    from ray.serve import metrics as serve_metrics

                    cls = {"counter": serve_metrics.Counter, "gauge": serve_metrics.Gauge,
                           "histogram": serve_metrics.Histogram}[self.kind]
                    kwargs: dict[str, Any] = {"description": self.description, "tag_keys": self.tag_keys}
                    if self.boundaries is not None:
                        kwargs["boundaries"] = list(self.boundaries)
                    self._ray = cls(self.name, **kwargs)
        except Exception:  # a metric must never break a request
            self._failed = True
            log.warning("metric %s is disabled: could not be created", self.name, exc_info=True)
        return self._ray

    def _record(self, method: str, value: float, tags: Mapping[str, Any] | None) -> None:
        given = {key: str(value) for key, value in (tags or {}).items()}
        for captured in _captures:
            captured.append((self.name, float(value), given))
        metric = self._backend()
        if metric is None:
            return
        try:
            getattr(metric, method)(value, tags=given)
        except Exception:
            log.warning("could not record metric %s %s", self.name, given, exc_info=True)


class Counter(_Metric):
    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...] = ()) -> None:
        super().__init__("counter", name, description, tag_keys)

    def inc(self, value: float = 1.0, tags: Mapping[str, Any] | None = None) -> None:
        self._record("inc", value, tags)


class Histogram(_Metric):
    def __init__(self, name: str, description: str, boundaries: tuple[float, ...],
                 tag_keys: tuple[str, ...] = ()) -> None:
        super().__init__("histogram", name, description, tag_keys, boundaries)

    def observe(self, value: float, tags: Mapping[str, Any] | None = None) -> None:
        self._record("observe", value, tags)


class Gauge(_Metric):
    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...] = ()) -> None:
        super().__init__("gauge", name, description, tag_keys)

    def set(self, value: float, tags: Mapping[str, Any] | None = None) -> None:
        self._record("set", value, tags)


requests = Counter(
    "imgserve_requests", "Task requests (POST /v1/{task}, POST /v1/jobs) by task, HTTP status and API.",
    ("task", "status", "api"))
request_seconds = Histogram(
    "imgserve_request_seconds", "Seconds from a task request's arrival at the ingress to its response.",
    SECONDS_BUCKETS, ("task", "status", "api"))
rejections = Counter(
    "imgserve_rejections", "Requests refused for capacity or time (429/503/504) by task and error code.",
    ("task", "reason"))
stage_seconds = Histogram(
    "imgserve_stage_seconds", "Seconds spent in one stage of one successful request.",
    SECONDS_BUCKETS, ("task", "stage"))
lora_events = Counter(
    "imgserve_lora_events", "LoRA adapter loads from disk, LRU evictions and resident hits, by version.",
    ("event", "version"))
gpu_peak_bytes = Histogram(
    "imgserve_gpu_peak_bytes", "Peak GPU memory allocated by torch during one request, per device.",
    GPU_BYTES_BUCKETS, ("task", "gpu"))
lora_default_usable = Gauge(
    "imgserve_lora_default_usable", "1 while the default LoRA version's file can be loaded on this replica, 0 when it "
    "went bad (the replica still serves a resident copy).", ("version",))
jobs_queued = Gauge("imgserve_jobs_queued", "Jobs waiting to start.")
jobs_running = Gauge("imgserve_jobs_running", "Jobs running now.")
jobs_finished = Counter(
    "imgserve_jobs_finished", "Jobs that reached a final state, by task and state.", ("task", "state"))
job_seconds = Histogram(
    "imgserve_job_seconds", "Seconds from a job's submission to its final state.",
    SECONDS_BUCKETS, ("task", "state"))
abandoned = Counter(
    "imgserve_abandoned", "Synchronous requests nobody waits for any more, stopped at the model's next step, by task "
    "and reason (client_disconnected, caller_cancelled, timeout).", ("task", "reason"))
model_seconds = Counter(
    "imgserve_model_seconds", "Seconds model deployments (and the text encoder stage) worked for a key's requests and "
    "jobs, by task and API key id (`-` with keys off).", ("task", "key_id"))
job_limits = Counter(
    "imgserve_job_limits", "Jobs ended or re-queued by a limit rather than by their own work, by task and reason "
    "(lease_expired, queue_timeout, run_timeout, result_lost).", ("task", "reason"))
job_store_bytes = Gauge("imgserve_job_store_bytes", "Bytes of job inputs and results on the store's disk.")
event_streams = Gauge("imgserve_event_streams", "Job event streams open on this ingress replica.")

ALL: tuple[_Metric, ...] = (requests, request_seconds, rejections, stage_seconds, lora_events, lora_default_usable,
                            gpu_peak_bytes,
                            jobs_queued, jobs_running, jobs_finished, job_seconds, abandoned, model_seconds,
                            job_limits, job_store_bytes, event_streams)


def exported_names() -> set[str]:
    """Every series name the metrics above produce in a Prometheus scrape (with Ray's suffixes)."""
    names: set[str] = set()
    for metric in ALL:
        if metric.kind == "histogram":
            names.update(f"{metric.exported}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(metric.exported)
    return names


@contextlib.contextmanager
def capture() -> Iterator[list[tuple[str, float, dict[str, str]]]]:
    """Collects (name, value, tags) of everything recorded in this process while open (tests)."""
    records: list[tuple[str, float, dict[str, str]]] = []
    _captures.append(records)
    try:
        yield records
    finally:
        _captures.remove(records)


# -- helpers the deployments call ---------------------------------------------------------------

def record_stages(task: str, seconds: Mapping[str, float]) -> None:
    """One observation per stage that took time (a stage that did not happen is 0 and skipped;
    `total` is not a stage)."""
    for stage, value in seconds.items():
        if stage != "total" and value > 0:
            stage_seconds.observe(value, tags={"task": task, "stage": stage})


def _cuda() -> Any:
    """torch.cuda when torch is imported and CUDA is usable in this process, else None."""
    torch = sys.modules.get("torch")
    try:
        return torch.cuda if torch is not None and torch.cuda.is_available() else None
    except Exception:
        return None


def sync_cuda() -> None:
    """Wait for every visible CUDA device's queued kernels (no-op without CUDA)."""
    cuda = _cuda()
    if cuda is not None:
        for device in range(cuda.device_count()):
            cuda.synchronize(device)


def reset_gpu_peak() -> None:
    """Start a request's peak-memory window on every visible CUDA device (no-op without CUDA)."""
    cuda = _cuda()
    if cuda is not None:
        for device in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(device)


def record_gpu_peak(task: str) -> None:
    """Observe each visible CUDA device's peak allocation since `reset_gpu_peak` (nothing without CUDA)."""
    cuda = _cuda()
    if cuda is None:
        return
    for device in range(cuda.device_count()):
        peak = cuda.max_memory_allocated(device)
        if peak > 0:
            gpu_peak_bytes.observe(peak, tags={"task": task, "gpu": str(device)})


class DiffusionStages:
    """Times one diffusers Qwen pipeline call by its stages, by wrapping the pipeline's own methods
    (`encode_prompt`, `prepare_latents`, `vae.decode`) on the instance for the call's duration.

    `seconds` holds encode_prompt, encode_image, denoise and decode (see the module docstring).
    The model thread must be the pipeline's only user while it is open.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(("encode_prompt", "encode_image", "denoise", "decode"), 0.0)
        self._latents_ready: float | None = None
        self._decode_started: float | None = None

    @contextlib.contextmanager
    def around(self, pipe: Any, encode_prompt: bool = True) -> Iterator[DiffusionStages]:
        patched: list[tuple[Any, str, Any]] = []
        missing = object()

        def timed(owner: Any, method: str, stage: str) -> None:
            original = getattr(owner, method, None)
            if original is None:
                return
            patched.append((owner, method, vars(owner).get(method, missing)))
            depth = [0]

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                depth[0] += 1
                if depth[0] == 1:
                    sync_cuda()
                    start = time.perf_counter()
                    if stage == "decode" and self._decode_started is None:
                        self._decode_started = start
                try:
                    return original(*args, **kwargs)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        sync_cuda()
                        end = time.perf_counter()
                        self.seconds[stage] += end - start
                        if stage == "encode_image":
                            self._latents_ready = end

            setattr(owner, method, wrapper)

        if encode_prompt:
            timed(pipe, "encode_prompt", "encode_prompt")
        timed(pipe, "prepare_latents", "encode_image")
        timed(getattr(pipe, "vae", None), "decode", "decode")
        try:
            yield self
        finally:
            for owner, method, before in reversed(patched):
                if before is missing:
                    vars(owner).pop(method, None)  # back to the class's method
                else:
                    setattr(owner, method, before)  # someone's own instance attribute (a test's patch)
            if self._latents_ready is not None and self._decode_started is not None:
                self.seconds["denoise"] = max(0.0, self._decode_started - self._latents_ready)


@contextlib.contextmanager
def diffusion_request(pipe: Any, task: str, encode_prompt: bool = True) -> Iterator[DiffusionStages]:
    """Around one pipeline call: its stage times and the GPU memory peak, recorded if it succeeds
    (`encode_prompt` False: the prompt was encoded elsewhere, which records that stage)."""
    stages = DiffusionStages()
    reset_gpu_peak()
    with stages.around(pipe, encode_prompt):
        yield stages
    record_stages(task, stages.seconds)
    record_gpu_peak(task)
