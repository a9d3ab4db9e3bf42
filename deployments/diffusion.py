"""What the two Qwen-Image diffusion models share: request fields, limits, and pipeline loading.

`DiffusionParams` holds the per-request fields both `real` and `layers` take (prompt, negative
prompt, steps, cfg, seed); `DiffusionConfig` the settings both deployments have (source, device,
dtype, defaults and limits) with `resolve_common` checking the shared fields and `open_pipeline`
reading a local (or tiny) diffusers directory onto the right device; `step_callback` reports a
request's denoising steps and stops it when asked. Knows nothing about HTTP.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from deployments.errors import Cancelled, InvalidParameter
from deployments import placement
from deployments.placement import PlacementConfig, Plan
from deployments.records import Progress
from deployments.validation import at_least

MIN_STEPS = 2
"""Fewest denoising steps: with the Qwen-Image scheduler config (shift_terminal) one step divides
0 by 0 in the sigma stretch and returns NaN pixels, for the real models as for the tiny ones."""
MAX_SEED = 2**32 - 1


class DiffusionParams(BaseModel):
    """Per-request choices shared by the diffusion tasks; None means "use the configured default"."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    """What the result should show."""
    negative_prompt: str | None = None
    """What it should not show; CFG needs one, so a blank one is used when absent."""
    steps: int | None = None
    """Denoising steps."""
    cfg: float | None = None
    """true_cfg_scale: > 1 enables classifier-free guidance (two transformer passes per step)."""
    seed: int | None = None
    """Random seed; the same seed and input give the same bytes. None → a fresh random seed."""


class DiffusionConfig(BaseModel):
    """Settings shared by the diffusion model deployments."""

    model_config = ConfigDict(extra="forbid")

    source: str = "tiny"
    """`tiny`: a tiny random-weight pipeline of the same classes generated into the cache directory
    (demo, tests); otherwise a local directory in diffusers layout, prepared ahead. Never
    downloaded at run time."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when this replica sees a GPU, else CPU (fake GPU resources on a CPU machine)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; `auto`: bfloat16 on CUDA, float32 on CPU. With `placement` on CUDA the plan
    casts every component to bfloat16 (fp8 storage where it says so), whatever this says."""
    default_negative_prompt: str = " "
    """Negative prompt used when the request gives none (blank: CFG on, no particular avoidance)."""
    default_steps: int = 30
    """Denoising steps when the request gives none."""
    max_steps: int = 100
    """Largest `steps` a request may ask for."""
    default_cfg: float = 4.0
    """true_cfg_scale when the request gives none."""
    max_cfg: float = 20.0
    """Largest `cfg` a request may ask for."""
    max_prompt_chars: int = 2000
    """Longest prompt or negative prompt accepted, in characters."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None keeps torch's default."""
    placement: PlacementConfig | None = None
    """How a replica spreads the pipeline over the GPUs it owns (`deployments.placement`): the
    builder asks Ray for the GPUs the plan needs, and `open_pipeline` applies the plan when CUDA is
    present. None: the whole pipeline on one device (CUDA when visible, else CPU), as in the demo."""

    _steps = at_least(MIN_STEPS, "default_steps", "max_steps")
    _diffusion_positive = at_least(1, "max_prompt_chars", "num_threads")

    @field_validator("default_cfg", "max_cfg")
    @classmethod
    def _cfg(cls, value: float, info: ValidationInfo) -> float:
        if not (value >= 1.0 and value < float("inf")):
            raise ValueError(f"{info.field_name} must be a finite number >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> DiffusionConfig:
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps must be <= max_steps ({self.max_steps}), got {self.default_steps}")
        if self.default_cfg > self.max_cfg:
            raise ValueError(f"default_cfg must be <= max_cfg ({self.max_cfg}), got {self.default_cfg}")
        return self

    def resolve_common(self, params: DiffusionParams, prompt: str) -> dict[str, Any]:
        """Defaults and range checks of the shared fields (`prompt` is the task's resolved prompt);
        raises InvalidParameter naming the field. Returns the resolved shared fields."""
        steps = self.default_steps if params.steps is None else params.steps
        cfg = self.default_cfg if params.cfg is None else params.cfg
        seed = secrets.randbelow(MAX_SEED + 1) if params.seed is None else params.seed
        negative = self.default_negative_prompt if params.negative_prompt is None else params.negative_prompt
        if not MIN_STEPS <= steps <= self.max_steps:
            raise InvalidParameter(f"must be between {MIN_STEPS} and {self.max_steps}, got {steps}", "steps")
        if not 1.0 <= cfg <= self.max_cfg:  # also false for NaN
            raise InvalidParameter(f"must be between 1.0 and {self.max_cfg}, got {cfg}", "cfg")
        if not 0 <= seed <= MAX_SEED:
            raise InvalidParameter(f"must be between 0 and {MAX_SEED}, got {seed}", "seed")
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if len(text) > self.max_prompt_chars:
                raise InvalidParameter(f"longer than {self.max_prompt_chars} characters ({len(text)})", name)
        return {"prompt": prompt, "negative_prompt": negative or " ", "steps": steps, "cfg": cfg, "seed": seed}

    def plan(self, task: Literal["real", "layers"]) -> Plan | None:
        """The placement plan for this model, from the configs of `source` when that directory is
        here, else from the published configs stored in the package (what `tiny` stands in for)."""
        if self.placement is None:
            return None
        directory = None if self.source == "tiny" else Path(self.source).expanduser()
        sizes = placement.component_sizes(directory) if directory and (directory / "model_index.json").is_file() else None
        return placement.plan(task, self.placement, sizes)

    def open_pipeline(
        self, kind: Literal["edit", "layered"], cache_dir: Path, section: str, plan: Plan | None
    ) -> tuple[Any, str]:
        """(pipeline on its device, device name) from `source`; applies `num_threads`, and `plan`
        (the caller's `self.plan(task)`) when CUDA is present (on fake GPUs it is not applied)."""
        import torch

        from deployments import tiny

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        device = "cuda" if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()) else "cpu"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.dtype, torch.bfloat16 if device == "cuda" else torch.float32
        )
        if self.source == "tiny":
            directory = tiny.ensure_tiny(kind, cache_dir)
        else:
            directory = Path(self.source).expanduser()
            if not (directory / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"{section}.source {str(directory)!r} is not a local diffusers directory (no model_index.json); "
                    "prepare it ahead"
                )
        pipe = tiny.load_pipeline(kind, directory, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        if device == "cuda" and plan is not None:
            # loaded on CPU first: the plan may cast to fp8 or offload before anything reaches a GPU
            placement.place_pipeline(pipe, plan)
            return pipe, device
        return pipe.to(device), device


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


def release_gpu_memory() -> None:
    """After a failed request (out of memory): its tensors are garbage now; collect them and give
    their cached blocks back to the card, so the next request starts from the same free memory as
    the one before. A no-op for the cache where CUDA was never initialised."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def replica_location() -> dict[str, Any]:
    """Where this process runs: pid, and under Ray the node id and the GPU ids Ray assigned (fake
    GPUs included). Lets operators and tests see which node and cards a replica landed on."""
    import os

    location: dict[str, Any] = {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import ray

        if ray.is_initialized():
            location["node_id"] = ray.get_runtime_context().get_node_id()
            location["gpu_ids"] = [str(gpu) for gpu in ray.get_gpu_ids()]
    except ImportError:  # plain use without Ray (tests, GPU benchmarks)
        pass
    return location
