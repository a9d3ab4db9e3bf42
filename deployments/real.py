"""RealModel deployment: 2.5D / anime / cartoon art → photoreal person with Qwen-Image-Edit-2511.

Receives a `Prepared` array and resolved `RealParams`, runs diffusers' `QwenImageEditPlusPipeline`
and returns a `Generated` array at the model size. Knows nothing about HTTP, jobs or encoding.
Construction only stores the config; `load()` builds or reads the pipeline (a separate step, so a
test or a GPU benchmark can construct the class directly, without Ray). Torch work runs on one
long-lived thread, because torch's intra-op thread pool is per thread and a fresh thread per
request costs tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import warnings
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import field_validator

from deployments import metrics
from deployments.diffusion import DiffusionConfig, DiffusionParams, release_gpu_memory, replica_location, step_callback
from deployments.errors import Cancelled, InvalidParameter, ModelFailure, OutOfMemory, TimedOut
from deployments.placement import Plan
from deployments.lora import NONE, LoraStore, check_name, diffusers_state_dict, ensure_tiny_loras, inspect_lora, linear_shapes
from deployments.records import Generated, ImageSpec, Prepared, Progress
from deployments.validation import at_least

DEFAULT_PROMPT = "transform the image to realistic photograph, high quality, 4k, natural skin texture"


class RealParams(DiffusionParams):
    """Per-request choices for `real`; None means "use the configured default"."""

    lora: str | None = None
    """LoRA version (a file stem in the LoRA directory) or `none` for the base alone;
    None → the configured default (the newest version unless `default_lora` says otherwise)."""


class RealModelConfig(DiffusionConfig):
    """Settings of the RealModel deployment (the shared ones are documented on DiffusionConfig)."""

    default_prompt: str = DEFAULT_PROMPT
    """Prompt used when the request gives none."""
    default_steps: int = 30
    """Denoising steps when the request gives none."""
    default_cfg: float = 7.0
    """true_cfg_scale when the request gives none."""
    condition_area: int | None = None
    """Tiny models only: the pixel area diffusers resizes the condition image to (module constants
    VAE_IMAGE_SIZE and CONDITION_IMAGE_SIZE, process-wide). None keeps diffusers' real-model values."""
    lora_dir: str | None = None
    """Directory of LoRA versions (`*.safetensors`, named by their stems); `tiny`: three tiny
    random adapters generated into the cache directory (demo, tests); None: the base model only."""
    default_lora: str | None = None
    """Version used when a request names none; None → the newest; `none` → the base alone."""
    max_adapters_per_replica: int = 2
    """LoRA versions a replica keeps loaded (LRU beyond this); also Serve's multiplexing limit."""
    lora_rescan_s: float = 10.0
    """Seconds a directory listing is trusted; unknown names always trigger a rescan."""

    _real_positive = at_least(1, "max_adapters_per_replica", "condition_area")

    @field_validator("default_lora")
    @classmethod
    def _default_lora(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_name(value, "default_lora")
            except InvalidParameter as exc:
                raise ValueError(f"default_lora: {exc.message}") from None
        return value

    def lora_store(self, cache_dir: Path | str) -> LoraStore | None:
        """The store of LoRA versions this config names (generating the tiny ones if asked)."""
        if self.lora_dir is None:
            return None
        directory = ensure_tiny_loras(cache_dir) if self.lora_dir == "tiny" else Path(self.lora_dir)
        return LoraStore(directory, rescan_s=self.lora_rescan_s)

    def resolve(self, params: RealParams, store: LoraStore | None = None) -> RealParams:
        """Fill defaults and check ranges; raises InvalidParameter naming the field."""
        prompt = self.default_prompt if params.prompt is None or not params.prompt.strip() else params.prompt
        common = self.resolve_common(params, prompt)
        lora = params.lora or self.default_lora or (store.newest() if store else None) or NONE
        if lora != NONE:
            if store is None:
                raise InvalidParameter(f"no LoRA directory is configured; only {NONE!r} is available", "lora")
            store.path(lora)  # refuses paths and unknown versions, listing the valid ones
        return RealParams(**common, lora=lora)


class RealModel:
    """Qwen-Image-Edit-2511 (`QwenImageEditPlusPipeline`): Prepared → Generated."""

    input_spec = ImageSpec(multiple=16, alpha=False)
    task = "real"

    def __init__(self, config: RealModelConfig | None = None, cache_dir: Path | str = "~/.cache/imgserve") -> None:
        self.config = config or RealModelConfig()
        self.cache_dir = Path(cache_dir).expanduser()
        self.pipe: Any = None
        self.device = "cpu"
        self.plan: Plan | None = None
        """The placement plan this replica was loaded with (None: one device, no planning)."""
        self.loads = 0
        """How many times the base pipeline was loaded by this instance (a user-visible cost)."""
        self.store: LoraStore | None = None
        self.adapter_loads: Counter[str] = Counter()
        """LoRA version → how many times it was read from disk into this replica."""
        self._resident: OrderedDict[str, None] = OrderedDict()  # LRU of loaded versions
        self._linear_shapes: dict[str, tuple[int, int]] = {}
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        """Names the process serving a request (reported to clients, never embedded)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="real-model")
        self.stops: Counter[str] = Counter()
        """Requests the pipeline call stopped or failed, by reason (cancelled, timeout,
        out_of_memory); a time limit already past before the call is not counted."""
        self.last_stop: dict[str, Any] | None = None

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Build or read the pipeline and move it to the device; a separate step from construction."""
        from deployments import tiny

        # Several named adapters on one transformer is exactly what hot swapping means here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        self.store = self.config.lora_store(self.cache_dir)
        if self.config.condition_area:
            tiny.set_condition_areas(self.config.condition_area, self.config.condition_area)
        self.plan = self.config.plan("real")
        self.pipe, self.device = self.config.open_pipeline("edit", self.cache_dir, "real", self.plan)
        self._linear_shapes = linear_shapes(self.pipe.transformer)
        self.loads += 1

    def stats(self) -> dict[str, Any]:
        """Which process serves, on which device, and how often the base pipeline was loaded."""
        return {
            **replica_location(),
            "device": self.device,
            "plan": self.plan.to_dict() if self.plan else None,
            "loads": self.loads,
            "adapters": list(self._resident),
            "adapter_loads": dict(self.adapter_loads),
            "stops": dict(self.stops),
            "last_stop": self.last_stop,
        }

    # -- LoRA ------------------------------------------------------------------------------------
    def ensure_adapter(self, version: str) -> str:
        """Make `version` resident (LRU beyond `max_adapters_per_replica`); the base is never reloaded.

        The file is checked against the transformer before anything is touched: on any failure
        the model is exactly as before and the request gets InvalidParameter naming the problem.
        """
        if version in self._resident:
            self._resident.move_to_end(version)
            return version
        self.check_health()
        if self.store is None:
            raise InvalidParameter(f"no LoRA directory is configured; only {NONE!r} is available", "lora")
        path = self.store.path(version)
        report = inspect_lora(path, self._linear_shapes)
        if not report.ok:
            raise InvalidParameter(f"LoRA {version!r} does not fit the base model: {'; '.join(report.problems)}", "lora")
        while len(self._resident) >= self.config.max_adapters_per_replica:
            evicted, _ = self._resident.popitem(last=False)
            self.pipe.delete_adapters([evicted])
            metrics.lora_events.inc(tags={"event": "evict", "version": evicted})
        try:
            self.pipe.load_lora_weights(diffusers_state_dict(path, report), adapter_name=version)
            loaded = self.pipe.get_list_adapters().get("transformer", [])
            if version not in loaded:
                raise ValueError("no weights matched the transformer")
        except Exception as exc:
            if version in self.pipe.get_list_adapters().get("transformer", []):
                self.pipe.delete_adapters([version])
            raise InvalidParameter(f"LoRA {version!r} could not be loaded: {exc}"[:500], "lora") from None
        self._resident[version] = None
        self.adapter_loads[version] += 1
        metrics.lora_events.inc(tags={"event": "load", "version": version})
        return version

    async def adapter(self, version: str) -> str:
        """Serve path: make `version` resident on the model thread. The app builder wraps this with
        `serve.multiplexed`, which tells the router which replica holds which version."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.ensure_adapter, version)

    def _activate(self, version: str) -> None:
        if version == NONE:
            if self._resident:
                self.pipe.disable_lora()
            return
        self.ensure_adapter(version)
        self.pipe.enable_lora()
        self.pipe.set_adapters([version])

    def check_health(self) -> None:
        """Raises when the pipeline is not usable, so Ray Serve replaces the replica."""
        if self.pipe is None:
            raise RuntimeError("RealModel pipeline is not loaded")

    # -- serving ---------------------------------------------------------------------------------
    async def __call__(self, prepared: Prepared, params: RealParams, progress: Progress | None = None) -> Generated:
        """Serve entry point: runs `generate` on the model's own thread."""
        loads_before = self.adapter_loads.total()
        if params.lora and params.lora != NONE:
            await self.adapter(params.lora)
        loop = asyncio.get_running_loop()
        generated = await loop.run_in_executor(self._executor, self.generate, prepared, params, progress)
        if params.lora != NONE:
            generated.served["lora_load"] = "cold" if self.adapter_loads.total() > loads_before else "warm"
            if generated.served["lora_load"] == "warm":  # loads are counted where they happen
                metrics.lora_events.inc(tags={"event": "hit", "version": params.lora})
        return generated

    def _stopped(self, reason: str, message: str) -> None:
        self.stops[reason] += 1
        self.last_stop = {"reason": reason, "message": message}

    def generate(self, prepared: Prepared, params: RealParams, progress: Progress | None = None) -> Generated:
        import torch

        # 1. validate
        params = self.config.resolve(params, self.store)
        array = prepared.array
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise InvalidParameter(f"expected an RGB uint8 array, got {array.dtype} {array.shape}", "image")
        height, width = array.shape[:2]
        multiple = self.input_spec.multiple
        if height % multiple or width % multiple:
            raise InvalidParameter(f"sides must be multiples of {multiple}, got {width}x{height}", "image")
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

        # diffusers resizes the input to about CONDITION_IMAGE_SIZE and VAE_IMAGE_SIZE pixels at its
        # aspect, each side rounded to 32: a side rounded to 0 fails inside the pipeline (a 500), so
        # an aspect that extreme (e.g. 1x10000 with the demo's small condition areas) is refused here
        conditions = [edit_plus.calculate_dimensions(area, width / height)
                      for area in (edit_plus.CONDITION_IMAGE_SIZE, edit_plus.VAE_IMAGE_SIZE)]
        if min(min(sides) for sides in conditions) < 32:
            raise InvalidParameter(f"aspect ratio {width}x{height} is too extreme for this model (its condition "
                                   f"images would be {' and '.join(f'{w}x{h}' for w, h in conditions)})", "image")
        self.check_health()
        # 2. resolve adapter
        loads_before = self.adapter_loads.total()
        self._activate(params.lora)
        # 3. run
        from PIL import Image

        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        if progress is not None:
            progress.stage("encode_prompt")
        try:
            with metrics.diffusion_request(self.pipe, self.task), torch.inference_mode():
                output = self.pipe(
                    image=[Image.fromarray(array)],
                    prompt=params.prompt,
                    negative_prompt=params.negative_prompt,
                    true_cfg_scale=params.cfg,
                    num_inference_steps=params.steps,
                    height=height,
                    width=width,
                    generator=generator,
                    output_type="np",
                    callback_on_step_end=step_callback(progress, params.steps),
                )
        except (Cancelled, TimedOut) as exc:
            self._stopped(exc.code, str(exc))
            raise
        except torch.cuda.OutOfMemoryError as exc:
            release_gpu_memory()
            self._stopped(OutOfMemory.code, str(exc))
            raise OutOfMemory(f"GPU out of memory at {width}x{height}, {params.steps} steps: {exc}") from None
        except (RuntimeError, ValueError) as exc:
            raise ModelFailure(f"the model failed on this request: {exc}") from None
        # 4. package
        image = np.asarray(output.images[0])
        result = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        served: dict[str, Any] = {"replica": self.replica}
        if params.lora != NONE:
            served["lora_load"] = "cold" if self.adapter_loads.total() > loads_before else "warm"
        return Generated(array=result, info=prepared.info, params={"task": self.task, **params.model_dump()},
                         served=served)
