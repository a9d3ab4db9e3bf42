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
import secrets
import socket
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from deployments.errors import Cancelled, InvalidParameter, ModelFailure, OutOfMemory
from deployments.lora import NONE, LoraStore, check_name, diffusers_state_dict, ensure_tiny_loras, inspect_lora, linear_shapes
from deployments.records import Generated, ImageSpec, Prepared, Progress

MIN_STEPS = 2
"""Fewest denoising steps: with the Qwen-Image scheduler config (shift_terminal) one step divides
0 by 0 in the sigma stretch and returns NaN pixels, for the real models as for the tiny ones."""
DEFAULT_PROMPT = "transform the image to realistic photograph, high quality, 4k, natural skin texture"
_MAX_SEED = 2**32 - 1


def step_callback(progress: Progress | None, total: int) -> Callable | None:
    """A diffusers `callback_on_step_end` that reports each step and stops a cancelled request.

    diffusers calls it after each step (a step is the `denoise` stage); the last one announces
    `decode`.
    """
    if progress is None:
        return None

    def callback(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
        if progress.step(index + 1, total):
            raise Cancelled(f"cancelled after step {index + 1} of {total}")
        if index + 1 == total:
            progress.stage("decode")
        return tensors

    return callback


class RealParams(BaseModel):
    """Per-request choices for `real`; None means "use the configured default"."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    """What the result should look like."""
    negative_prompt: str | None = None
    """What it should not look like; CFG needs one, so a blank one is used when absent."""
    steps: int | None = None
    """Denoising steps."""
    cfg: float | None = None
    """true_cfg_scale: > 1 enables classifier-free guidance (two transformer passes per step)."""
    seed: int | None = None
    """Random seed; the same seed and input give the same bytes. None → a fresh random seed."""
    lora: str | None = None
    """LoRA version (a file stem in the LoRA directory) or `none` for the base alone;
    None → the configured default (the newest version unless `default_lora` says otherwise)."""


class RealModelConfig(BaseModel):
    """Settings of the RealModel deployment."""

    model_config = ConfigDict(extra="forbid")

    source: str = "tiny"
    """`tiny`: a tiny random-weight pipeline generated into the cache directory (demo, tests);
    otherwise a local directory in diffusers layout, prepared ahead. Never downloaded at run time."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when this replica sees a GPU, else CPU (fake GPU resources on a CPU machine)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; `auto`: bfloat16 on CUDA, float32 on CPU."""
    default_prompt: str = DEFAULT_PROMPT
    """Prompt used when the request gives none."""
    default_negative_prompt: str = " "
    """Negative prompt used when the request gives none (blank: CFG on, no particular avoidance)."""
    default_steps: int = 30
    """Denoising steps when the request gives none."""
    max_steps: int = 100
    """Largest `steps` a request may ask for."""
    default_cfg: float = 7.0
    """true_cfg_scale when the request gives none."""
    max_cfg: float = 20.0
    """Largest `cfg` a request may ask for."""
    max_prompt_chars: int = 2000
    """Longest prompt or negative prompt accepted, in characters."""
    condition_area: int | None = None
    """Tiny models only: the pixel area diffusers resizes the condition image to (module constants
    VAE_IMAGE_SIZE and CONDITION_IMAGE_SIZE, process-wide). None keeps diffusers' real-model values."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None keeps torch's default."""
    lora_dir: str | None = None
    """Directory of LoRA versions (`*.safetensors`, named by their stems); `tiny`: three tiny
    random adapters generated into the cache directory (demo, tests); None: the base model only."""
    default_lora: str | None = None
    """Version used when a request names none; None → the newest; `none` → the base alone."""
    max_adapters_per_replica: int = 2
    """LoRA versions a replica keeps loaded (LRU beyond this); also Serve's multiplexing limit."""
    lora_rescan_s: float = 10.0
    """Seconds a directory listing is trusted; unknown names always trigger a rescan."""

    @field_validator("default_steps", "max_steps", "max_prompt_chars")
    @classmethod
    def _positive_int(cls, value: int, info: ValidationInfo) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("default_cfg", "max_cfg")
    @classmethod
    def _cfg(cls, value: float, info: ValidationInfo) -> float:
        if not (value >= 1.0 and value < float("inf")):
            raise ValueError(f"{info.field_name} must be a finite number >= 1, got {value}")
        return value

    @field_validator("max_adapters_per_replica")
    @classmethod
    def _adapters(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"max_adapters_per_replica must be >= 1, got {value}")
        return value

    @field_validator("default_lora")
    @classmethod
    def _default_lora(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_name(value, "default_lora")
            except InvalidParameter as exc:
                raise ValueError(f"default_lora: {exc.message}") from None
        return value

    @field_validator("condition_area", "num_threads")
    @classmethod
    def _optional_positive(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    def lora_store(self, cache_dir: Path | str) -> LoraStore | None:
        """The store of LoRA versions this config names (generating the tiny ones if asked)."""
        if self.lora_dir is None:
            return None
        directory = ensure_tiny_loras(cache_dir) if self.lora_dir == "tiny" else Path(self.lora_dir)
        return LoraStore(directory, rescan_s=self.lora_rescan_s)

    def resolve(self, params: RealParams, store: LoraStore | None = None) -> RealParams:
        """Fill defaults and check ranges; raises InvalidParameter naming the field."""
        steps = self.default_steps if params.steps is None else params.steps
        cfg = self.default_cfg if params.cfg is None else params.cfg
        seed = secrets.randbelow(_MAX_SEED + 1) if params.seed is None else params.seed
        prompt = self.default_prompt if params.prompt is None or not params.prompt.strip() else params.prompt
        negative = self.default_negative_prompt if params.negative_prompt is None else params.negative_prompt
        if not MIN_STEPS <= steps <= self.max_steps:
            raise InvalidParameter(f"must be between {MIN_STEPS} and {self.max_steps}, got {steps}", "steps")
        if not 1.0 <= cfg <= self.max_cfg:  # also false for NaN
            raise InvalidParameter(f"must be between 1.0 and {self.max_cfg}, got {cfg}", "cfg")
        if not 0 <= seed <= _MAX_SEED:
            raise InvalidParameter(f"must be between 0 and {_MAX_SEED}, got {seed}", "seed")
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if len(text) > self.max_prompt_chars:
                raise InvalidParameter(f"longer than {self.max_prompt_chars} characters ({len(text)})", name)
        lora = params.lora or self.default_lora or (store.newest() if store else None) or NONE
        if lora != NONE:
            if store is None:
                raise InvalidParameter(f"no LoRA directory is configured; only {NONE!r} is available", "lora")
            store.path(lora)  # refuses paths and unknown versions, listing the valid ones
        return RealParams(prompt=prompt, negative_prompt=negative or " ", steps=steps, cfg=cfg, seed=seed, lora=lora)


class RealModel:
    """Qwen-Image-Edit-2511 (`QwenImageEditPlusPipeline`): Prepared → Generated."""

    input_spec = ImageSpec(multiple=16, alpha=False)
    task = "real"

    def __init__(self, config: RealModelConfig | None = None, cache_dir: Path | str = "~/.cache/imgserve") -> None:
        self.config = config or RealModelConfig()
        self.cache_dir = Path(cache_dir).expanduser()
        self.pipe: Any = None
        self.device = "cpu"
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

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Build or read the pipeline and move it to the device; a separate step from construction."""
        import torch

        from deployments import tiny

        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        # Several named adapters on one transformer is exactly what hot swapping means here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        self.device = "cuda" if self.config.device == "cuda" or (
            self.config.device == "auto" and torch.cuda.is_available()
        ) else "cpu"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.config.dtype, torch.bfloat16 if self.device == "cuda" else torch.float32
        )
        self.store = self.config.lora_store(self.cache_dir)
        if self.config.source == "tiny":
            directory = tiny.ensure_tiny("edit", self.cache_dir)
        else:
            directory = Path(self.config.source).expanduser()
            if not (directory / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"real.source {str(directory)!r} is not a local diffusers directory (no model_index.json); "
                    "prepare it ahead with `imgserve fetch`"
                )
        if self.config.condition_area:
            tiny.set_condition_areas(self.config.condition_area, self.config.condition_area)
        pipe = tiny.load_pipeline("edit", directory, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self._linear_shapes = linear_shapes(self.pipe.transformer)
        self.loads += 1

    def stats(self) -> dict[str, Any]:
        """Which process serves, on which device, and how often the base pipeline was loaded."""
        return {
            "pid": os.getpid(),
            "device": self.device,
            "loads": self.loads,
            "adapters": list(self._resident),
            "adapter_loads": dict(self.adapter_loads),
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
        return generated

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
            with torch.inference_mode():
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
        except Cancelled:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
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
