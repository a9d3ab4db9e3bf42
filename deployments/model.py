"""The serving scaffold every model deployment shares: `Model`, and `ModelSettings` for its config.

Construction only stores the config; `load()` reads the weights, as a separate step a test or a GPU
benchmark can call without Ray. All torch work of a model runs on one long-lived thread, the model
thread (torch's intra-op thread pool is per thread, and a fresh thread per request costs tens of
milliseconds): `load()` runs there too, after the device, the dtype and the thread count are
decided, once, for every model alike (`ModelSettings.device/dtype/num_threads`). `stats()` has
one shape for every model (replica, device, dtype, plan, loads, stops; plus what a model adds in
`extra_stats`), and `check_health` raises while nothing is loaded, so Ray Serve replaces the
replica. `catalog()` is what the replica can serve by name (LoRA versions, styles), for the ingress. Subclasses implement `load_model`, `loaded` and the request entry `__call__`.

Abandoned work stops (`on_request`): a request's work runs on the model thread with a stop signal
of its own, seen by the model through its progress (`Stoppable`, checked at every stage and
denoising step). When the caller goes away (Serve cancels the request: the HTTP client
disconnected, a handle caller cancelled, the ingress's time limit), the entry point sets the
signal, waits (shielded) until the thread has stopped at its next boundary, counts the stop in
`stats()["stops"]` (`abandoned`, or `timeout` when the request's `Deadline` had passed) and passes
the cancellation on; a request cancelled while still waiting for the model thread never starts.
The seconds the thread worked on a request are its model time (`Generated.served["model_seconds"]`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from deployments.errors import Cancelled, TimedOut
from deployments.records import Deadline, Generated, ImageSpec, Progress
from deployments.task import Catalog, TaskSection
from deployments.validation import at_least

T = TypeVar("T")


class ModelSettings(TaskSection):
    """Where and how a model runs: the settings every model section has."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when this replica sees a GPU, else CPU (fake GPU resources on a CPU machine)."""
    num_threads: int | None = None
    """torch intra-op threads on CPU, set on the model thread; None keeps torch's default."""

    _threads = at_least(1, "num_threads")


class Model:
    """Base of every model deployment class: config, model thread, load, stats, health."""

    input_spec: ClassVar[ImageSpec] = ImageSpec()
    """What the model needs from preprocess."""
    task: ClassVar[str] = "model"
    """The task name: labels metrics and results."""
    cuda_dtype: ClassVar[str] = "bfloat16"
    """The dtype `auto` means on CUDA (CPU: float32)."""
    config_class: ClassVar[type[ModelSettings]] = ModelSettings
    """The config section this model takes (its default when none is given)."""

    def __init__(self, config: ModelSettings | None = None, cache_dir: Path | str = "~/.cache/imgserve") -> None:
        self.config = config if config is not None else self.config_class()
        self.cache_dir = Path(cache_dir).expanduser()
        self.device = "cpu"
        self.dtype: Any = None
        """The torch dtype the weights are loaded in, decided by `load`."""
        self.plan: Any = None
        """The placement plan this replica was loaded with (None: one device, no planning)."""
        self.loads = 0
        """How many times this instance loaded its weights (a user-visible cost)."""
        self.stops: Counter[str] = Counter()
        """Requests stopped or failed inside the model, by reason (cancelled, timeout, out_of_memory)."""
        self.last_stop: dict[str, Any] | None = None
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        """Names the process serving a request (reported to clients, never embedded)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.task}-model")

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Decide device, dtype and threads, then read the weights: all on the model thread."""
        self._executor.submit(self._load).result()

    def _load(self) -> None:
        import torch

        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = "cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) \
            else "cpu"
        name = getattr(config, "dtype", "auto")
        if name == "auto":
            name = self.cuda_dtype if self.device == "cuda" else "float32"
        self.dtype = getattr(torch, name)
        self.load_model()
        self.loads += 1

    def load_model(self) -> None:
        """Read the weights onto `self.device` in `self.dtype` (on the model thread)."""
        raise NotImplementedError

    def loaded(self) -> bool:
        raise NotImplementedError

    def check_health(self) -> None:
        """Raises when the model is not usable, so Ray Serve replaces the replica."""
        if not self.loaded():
            raise RuntimeError(f"{type(self).__name__} is not loaded")

    # -- serving ---------------------------------------------------------------------------------
    async def on_model_thread(self, function: Callable[..., T], *args: Any, stop: threading.Event | None = None) -> T:
        """Run `function(*args)` on the model thread; the replica's event loop stays free. Cancelled
        before the thread took it, it never runs; once running, `stop` is set and the caller waits
        for the thread's end (its slot stays taken: the thread is this replica's one worker)."""
        future = self._executor.submit(function, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if stop is not None:
                stop.set()
            await finished(future)
            raise

    async def on_request(self, work: Callable[[Progress], T], progress: Progress | None = None) -> tuple[T, float]:
        """One request's work, `work(stoppable progress)`, on the model thread, stopped at its next
        stage or step when the caller goes away (module docstring); returns its result and the
        seconds the thread worked on it."""
        request = Stoppable(progress)
        timed = Timed(work, request)
        try:
            return await self.on_model_thread(timed, stop=request.signal), timed.seconds
        except asyncio.CancelledError:
            self.abandoned(request, timed)
            raise

    def abandoned(self, request: Stoppable, timed: Timed) -> None:
        """Count a request whose caller went away: `timeout` past its deadline, else `abandoned`;
        the message says where the thread stopped."""
        if isinstance(timed.error, (Cancelled, TimedOut)) and not isinstance(timed.error, Abandoned):
            return  # stopped on its own (a job's cancel, its deadline): counted where it stopped
        if timed.error is not None:
            where = str(timed.error)
        elif timed.started:
            where = "its work was done; the result was dropped"
        else:
            where = "stopped before it started"
        self.stopped("timeout" if request.past_deadline() else "abandoned", where)

    def stopped(self, reason: str, message: str) -> None:
        """Count a request the model stopped or failed (`stats()["stops"]`)."""
        self.stops[reason] += 1
        self.last_stop = {"reason": reason, "message": message}

    def stats(self) -> dict[str, Any]:
        """Where this replica runs, on which device, its plan, how often it loaded and stopped."""
        return {
            **replica_location(),
            "replica": self.replica,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "loads": self.loads,
            "stops": dict(self.stops),
            "last_stop": self.last_stop,
            **self.extra_stats(),
        }

    def extra_stats(self) -> dict[str, Any]:
        """What a model adds to `stats()` (resident adapters, batches, ...)."""
        return {}

    def catalog(self) -> Catalog | None:
        """The names this replica can serve for its task's `choice_field` (LoRA versions, styles),
        read where the model files are; the app reports it to the ingress (`serve_app.catalogs`).
        None: the task has no catalog. Called off the model thread: cheap, and safe beside a request."""
        return None


class Abandoned(Cancelled):
    """Raised on the model thread at the first boundary after the request's caller went away;
    nobody receives it (the caller is gone), the entry point counts it."""

    code = "abandoned"


class Stoppable:
    """The request's `Progress` with a stop signal of its own: at every stage and step boundary it
    raises `Abandoned` once `signal` is set, and forwards everything to `inner` (the caller's
    progress: a job's, a `Deadline`) when there is one. Lives in the replica, never pickled."""

    def __init__(self, inner: Progress | None = None) -> None:
        self.inner = inner
        self.signal = threading.Event()

    def check(self, where: str) -> None:
        if self.signal.is_set():
            raise Abandoned(f"nobody waits for the result any more; stopped {where}")

    def stage(self, name: str) -> None:
        self.check(f"before {name}")
        if self.inner is not None:
            self.inner.stage(name)

    def step(self, step: int, total: int) -> bool:
        if self.inner is not None and self.inner.step(step, total):
            return True
        self.check(f"after step {step} of {total}")
        return False

    def past_deadline(self) -> bool:
        """Whether the request's time limit had passed (its progress is a `Deadline`)."""
        return isinstance(self.inner, Deadline) and time.time() > self.inner.until


class Timed:
    """`work(progress)` as the model thread runs it: never started once the stop signal is set,
    and the seconds it took and the error it raised kept for the entry point."""

    def __init__(self, work: Callable[[Progress], Any], progress: Stoppable) -> None:
        self.work, self.progress = work, progress
        self.started = False
        self.seconds = 0.0
        self.error: BaseException | None = None

    def __call__(self) -> Any:
        self.progress.check("before it started")
        self.started = True
        start = time.perf_counter()
        try:
            return self.work(self.progress)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.seconds = time.perf_counter() - start


async def finished(future: concurrent.futures.Future) -> None:
    """Wait until `future` (the model thread's work) has ended, whatever it raised and however
    often the waiting task is cancelled meanwhile: a cancelled request holds its replica's slot
    until the thread has stopped, so Serve never counts a busy replica free."""
    if future.done():
        return
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None)))
    while not ended.done():
        try:
            await asyncio.shield(ended)
        except asyncio.CancelledError:
            continue  # cancelled again: still wait; the caller re-raises its cancellation


def model_seconds(generated: Generated, seconds: float) -> Generated:
    """`generated` with the seconds the model thread worked on it (`served["model_seconds"]`)."""
    generated.served["model_seconds"] = round(seconds, 3)
    return generated


def replica_location() -> dict[str, Any]:
    """Where this process runs: pid, and under Ray the node id and the GPU ids Ray assigned (fake
    GPUs included). Lets operators and tests see which node and cards a replica landed on."""
    location: dict[str, Any] = {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import ray

        if ray.is_initialized():
            location["node_id"] = ray.get_runtime_context().get_node_id()
            location["gpu_ids"] = [str(gpu) for gpu in ray.get_gpu_ids()]
    except ImportError:  # plain use without Ray (tests, GPU benchmarks)
        pass
    return location
