"""AnimeModel deployment: photo → anime with the AnimeGANv2 generator (`deployments.animegan`).

Receives a `Prepared` array and resolved `AnimeParams` (the style; settings and request fields in
`deployments.anime_config`), returns a `Generated` array of
exactly the input's size. Knows nothing about HTTP, jobs or encoding. Construction only stores the
config; `load()` reads (or, for `styles_dir: tiny`, generates) every style of the styles directory
and keeps them all resident (8.6 MB each in float32). A style file dropped into the directory later
is listed at once and loaded on its first request.

Sizes: pad and crop, not resize. The generator is fully convolutional and its checkpoints were
trained and released for sides that are multiples of 32, so each image is reflect-padded (split
between both sides) to the next multiple of 32 inside the model and the output is cropped back.
The original area then gets exact network pixels at the original geometry; resizing to a multiple
of 32 instead would distort the aspect (up to 3 % at 1024 px) and add a second lossy resample.
Preprocess therefore only applies the long-edge limit (`input_spec.multiple == 1`), and the
returned array has the input's size, so postprocess resizes nothing. Images with a side of 16 px
or less, where a reflection cannot reach that far, are padded by edge replication instead.

CPU path (`deployments.stylize`, which pads, batches and crops): channels-last float32 under
`inference_mode` through `Generator.forward_lean` (images under ~160² use the plain forward), which
never materialises a reflect-padded copy of an activation, normalises in place and writes
activations into a `Workspace` kept between calls
(`workspace_mb`), because faulting in fresh activation memory on every call was the largest cost on
CPU. Outputs equal the plain forward's to within 1/255. The service stays on PyTorch alone (compile,
TorchScript, bfloat16 and ONNX Runtime were measured and not taken), and CPU profiles keep
`max_batch_size: 1` (batching did not raise CPU throughput); GPU replicas (float16, standard
forward) batch same-size requests. Measurements: bench/results/README.md (`bench/anime.py`).

Batching: inside a Serve replica with `max_batch_size > 1`, `__call__` goes through `serve.batch`
(the decorator is applied per instance at construction, so its limits come from the config). The
batch handler `handle_batch` groups requests by (padded height, padded width, style), runs each
group as one tensor batch (split by `max_batch_pixels`), and returns each caller its own result or
its own error. `serve.batch` cannot run outside a replica in Ray 2.60 (its queue asks for the
replica context), so there `__call__` calls `handle_batch` with one request; tests call
`handle_batch` directly with mixed batches. A request whose caller goes away before its batch
runs is dropped by `serve.batch`; one that leaves a running batch only loses its result, the others
get theirs. Without batching, a cancelled request that has not reached the model thread never runs.
Each result's `served["model_seconds"]` is the run time of the tensor batch it was part of.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from deployments import metrics
from deployments.anime_config import AnimeModelConfig, AnimeParams
from deployments.errors import InvalidParameter, ModelFailure, OutOfMemory
from deployments.model import Model
from deployments.records import Generated, ImageSpec, Prepared, Progress
from deployments.styles import ensure_tiny_styles, refuse_pickled_styles, style_files
from deployments.task import Catalog, Task

class AnimeModel(Model):
    """AnimeGANv2 generator, all styles resident: Prepared → Generated of the same size."""

    input_spec = ImageSpec(multiple=1, alpha=False)
    task = "anime"
    cuda_dtype = "float16"
    config_class = AnimeModelConfig

    def __init__(self, config: AnimeModelConfig | None = None, cache_dir: Path | str = "~/.cache/imgserve") -> None:
        super().__init__(config, cache_dir)
        self.nets: dict[str, Any] = {}
        """Resident generators by style name (torch modules on `device`, in `dtype`)."""
        self.styles_path: Path | None = None
        self.batches = 0
        self.items = 0
        self.largest_batch = 0
        self._lock = threading.Lock()
        self._workspace: Any = None
        self._forward_lock = threading.Lock()  # one forward at a time owns the workspace
        self._batched = None
        if self.config.max_batch_size > 1 and _in_serve_replica():
            from ray import serve

            # Applied per instance so the limits come from the config (a class-level decorator
            # would share one queue between all instances).
            self._batched = serve.batch(
                max_batch_size=self.config.max_batch_size,
                batch_wait_timeout_s=self.config.batch_wait_timeout_s,
            )(self.handle_batch)

    # -- loading ---------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Read every style of the styles directory onto the device."""
        cfg = self.config
        if cfg.styles_dir == "tiny":
            self.styles_path = ensure_tiny_styles(self.cache_dir)
        else:
            self.styles_path = cfg.styles_path()
        refuse_pickled_styles(self.styles_path)  # a .pt without its .safetensors: convert it first
        files = style_files(self.styles_path)
        if cfg.default_style not in files:
            raise FileNotFoundError(
                f"default_style {cfg.default_style!r} has no file in {str(self.styles_path)!r}; "
                f"styles there: {sorted(files) or 'none'}"
            )
        if self.device == "cpu" and cfg.workspace_mb > 0:
            from deployments.stylize import Workspace

            self._workspace = Workspace(cfg.workspace_mb << 20) if Workspace.supported() else None
        nets = {name: self._read(path) for name, path in sorted(files.items())}
        with self._lock:
            self.nets = nets

    def loaded(self) -> bool:
        return bool(self.nets)

    def _read(self, path: Path) -> Any:
        import torch

        from deployments.animegan import load_generator

        net = load_generator(path)  # safetensors only; strict key and shape check
        return net.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)

    def _net(self, style: str) -> Any:
        """The resident generator of ``style``; a file added to the directory since load() is read now."""
        net = self.nets.get(style)
        if net is not None:
            return net
        with self._lock:
            if style not in self.nets:
                path = style_files(self.styles_path).get(style) if self.styles_path else None
                if path is None:
                    raise InvalidParameter(f"unknown style {style!r}; available: {', '.join(self.styles())}", "style")
                self.nets = {**self.nets, style: self._read(path)}
            return self.nets[style]

    def styles(self) -> list[str]:
        """Style names a request may ask for (the styles directory's listing; loads nothing)."""
        if self.styles_path is not None:
            return sorted(style_files(self.styles_path))
        return self.config.styles()

    def catalog(self) -> Catalog:
        """What this replica serves (`Model.catalog`): the styles of its directory, the default."""
        return Catalog(tuple(self.styles()), self.config.default_style)

    def extra_stats(self) -> dict[str, Any]:
        """The resident styles, the batches run, the kept workspace."""
        return {
            "styles": sorted(self.nets),
            "batches": self.batches,
            "items": self.items,
            "largest_batch": self.largest_batch,
            "workspace_mb": round(self._workspace.kept_bytes / 2**20, 1) if self._workspace is not None else 0,
        }

    # -- serving ---------------------------------------------------------------------------------
    async def __call__(self, prepared: Prepared, params: AnimeParams, progress: Progress | None = None) -> Generated:
        """Serve entry point: batched by `serve.batch` in a replica when configured, else alone.
        One forward pass, no steps: `progress` only hears the `stylize` stage."""
        if progress is not None:
            # a job's progress waits for the runner's answer: never block this replica's event loop
            await asyncio.to_thread(progress.stage, "stylize")
        if self._batched is not None:
            try:
                result = await self._batched(prepared, params)
            except asyncio.CancelledError:
                # serve.batch drops a request that left before its batch ran, and gives the others
                # of a running batch their results: nothing of this one delays them
                self.stopped("abandoned", "its caller went away; it left its batch")
                raise
        else:
            # a request whose caller went away before the model thread took it never runs
            results, _ = await self.on_request(lambda stoppable: self.generate_batch([prepared], [params]))
            result = results[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def handle_batch(
        self, prepared: list[Prepared], params: list[AnimeParams]
    ) -> list[Generated | BaseException]:
        """The batch handler: one result or one error per request, in order, on the model's thread."""
        return await self.on_model_thread(self.generate_batch, prepared, params)

    def generate(self, prepared: Prepared, params: AnimeParams) -> Generated:
        """One request, synchronously (tests, benchmarks): the batch path with a batch of one."""
        result = self.generate_batch([prepared], [params])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def generate_batch(
        self, prepared: list[Prepared], params: list[AnimeParams]
    ) -> list[Generated | BaseException]:
        """Requests of any sizes and styles → each its own result or error (never another's)."""
        from deployments.stylize import padding_for

        if len(prepared) != len(params):
            raise ValueError(f"{len(prepared)} images but {len(params)} parameter sets")
        results: list[Generated | BaseException | None] = [None] * len(prepared)
        groups: dict[tuple[int, int, str], list[int]] = {}
        resolved: list[AnimeParams | None] = [None] * len(prepared)
        worked = [0.0] * len(prepared)  # model seconds: the tensor batch each request was part of
        # 1. validate each request on its own: one bad request fails alone
        catalog = self.catalog()
        for i, (item, param) in enumerate(zip(prepared, params)):
            try:
                resolved[i] = self.config.resolve(param, catalog)
                height, width = self._check_array(item.array)
                self.check_health()
                left, right, top, bottom = padding_for(height, width)
                groups.setdefault((height + top + bottom, width + left + right, resolved[i].style), []).append(i)
            except Exception as exc:  # InvalidParameter, ModelFailure, ...
                results[i] = exc
        # 2. run: one tensor batch per (padded size, style), chunked to bound memory
        for (height, width, style), members in groups.items():
            chunk = max(1, self.config.max_batch_pixels // (height * width))
            for start in range(0, len(members), chunk):
                indices = members[start : start + chunk]
                arrays = [prepared[i].array for i in indices]
                started = time.perf_counter()
                outputs = self._run_safely(style, arrays, (height, width))
                seconds = time.perf_counter() - started  # every member of the batch waited for all of it
                for i, output in zip(indices, outputs):
                    results[i] = output
                    worked[i] = seconds
                    if isinstance(output, np.ndarray):
                        metrics.stage_seconds.observe(seconds, tags={"task": self.task, "stage": "stylize"})
        self.batches += 1
        self.items += len(prepared)
        self.largest_batch = max(self.largest_batch, len(prepared))
        # 3. package
        out: list[Generated | BaseException] = []
        for i, result in enumerate(results):
            if isinstance(result, np.ndarray):
                result = Generated(
                    array=result,
                    info=prepared[i].info,
                    params={"task": self.task, "style": resolved[i].style},
                    served={"model_seconds": round(worked[i], 3)},
                )
            out.append(result)
        return out

    def _check_array(self, array: Any) -> tuple[int, int]:
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
            raise InvalidParameter(f"expected an RGB uint8 array, got {got}", "image")
        height, width = array.shape[:2]
        if min(height, width) < 1 or max(height, width) > self.config.max_long_edge:
            raise InvalidParameter(
                f"sides must be 1..{self.config.max_long_edge} pixels, got {width}x{height}", "image"
            )
        return height, width

    def _run_safely(self, style: str, arrays: list[np.ndarray], size: tuple[int, int]) -> list[Any]:
        """`run_batch` on the style's generator, errors as per-request results; after an OOM, one by one."""
        import torch

        from deployments.stylize import run_batch

        try:
            return run_batch(self._net(style), arrays, size, device=self.device, dtype=self.dtype,
                             align_corners=self.config.align_corners, workspace=self._workspace,
                             lock=self._forward_lock)
        except InvalidParameter as exc:
            return [exc] * len(arrays)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            if len(arrays) > 1:
                return [out for array in arrays for out in self._run_safely(style, [array], size)]
            height, width = arrays[0].shape[:2]
            return [OutOfMemory(f"GPU out of memory at {width}x{height} ({style}): {exc}")]
        except (RuntimeError, ValueError) as exc:
            return [ModelFailure(f"the model failed on this request: {exc}")] * len(arrays)


def _in_serve_replica() -> bool:
    """True inside a Ray Serve replica, where `serve.batch` can build its queue."""
    try:
        from ray import serve

        serve.get_replica_context()
        return True
    except Exception:  # RayServeException outside a replica; ImportError without Ray
        return False


TASK = Task(name="anime", summary="photo → anime", model=AnimeModel, params=AnimeParams,
            section=AnimeModelConfig, headers=("style",))
