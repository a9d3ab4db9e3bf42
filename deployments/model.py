"""The serving scaffold every model deployment shares: `Model`, and `ModelSettings` for its config.

Construction only stores the config; `load()` reads the weights, as a separate step a test or a GPU
benchmark can call without Ray. All torch work of a model runs on one long-lived thread, the model
thread (torch's intra-op thread pool is per thread, and a fresh thread per request costs tens of
milliseconds): `load()` runs there too, after the device, the dtype and the thread count are
decided, once, for every model alike (`ModelSettings.device/dtype/num_threads`). `stats()` has
one shape for every model (replica, device, dtype, plan, loads, stops; plus what a model adds in
`extra_stats`), and `check_health` raises while nothing is loaded, so Ray Serve replaces the
replica. Subclasses implement `load_model`, `loaded` and the request entry `__call__`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from deployments.records import ImageSpec
from deployments.task import TaskSection
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
    async def on_model_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function(*args)` on the model thread; the replica's event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

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
