"""Settings and request fields the Qwen-Image diffusion tasks share (`real`, `layers`).

`DiffusionParams` holds the per-request fields both take (prompt, negative prompt, steps, cfg,
seed); `DiffusionConfig` the settings both sections have (source, dtype, defaults, limits,
placement) with `resolve_common` checking the shared fields, and the plan of the section's cards
(with or without the text encoder, as the app's `text_encoder.mode` says). A config module: it
imports no torch, diffusers or Ray.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from deployments import placement
from deployments.errors import InvalidParameter
from deployments.model import ModelSettings
from deployments.options import DeploymentOptions, model_defaults, with_planned
from deployments.placement import DoesNotFit, PlacementConfig, Plan
from deployments.validation import at_least

MIN_STEPS = 2
"""Fewest denoising steps: with the Qwen-Image scheduler config (shift_terminal) one step divides
0 by 0 in the sigma stretch and returns NaN pixels, for the real models as for the tiny ones."""
MAX_SEED = 2**32 - 1


class DiffusionParams(BaseModel):
    """Per-request choices shared by the diffusion tasks; None means "use the configured default"."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    prompt: str | None = None
    """What the result should show."""
    negative_prompt: str | None = None
    """What it should not show; CFG needs one, so a blank one is used when absent."""
    steps: int | None = None
    """Denoising steps."""
    cfg: float | None = None
    """true_cfg_scale: > 1 enables classifier-free guidance (two transformer passes per step)."""
    seed: int | None = None
    """Random seed; the same seed and input give the same bytes. None → a fresh random seed, echoed."""


class DiffusionConfig(ModelSettings):
    """Settings shared by the diffusion model sections."""

    task: ClassVar[Literal["real", "layers"]]
    """The section's name in the config, and what the placement planner plans for."""
    tiny_only: ClassVar[tuple[str, ...]] = ()
    """Settings that exist for the tiny demo models only: refused with any other `source`."""

    serve: DeploymentOptions = Field(default_factory=lambda: model_defaults(num_cpus=1, num_gpus=1))
    """Ray Serve options of the model deployment (a GPU replica by default). With `placement`,
    leave out `num_gpus`: the builder asks for the GPUs (and `placement_group_bundles`) the plan needs."""
    source: str = "tiny"
    """`tiny`: a tiny random-weight pipeline of the same classes generated into the cache directory
    (demo, tests); otherwise a local directory in diffusers layout, prepared ahead. Never
    downloaded at run time."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; `auto`: bfloat16 on CUDA, float32 on CPU. With `placement` on CUDA the plan
    casts every component to bfloat16 (fp8 storage where it says so), whatever this says."""
    attention_backend: Literal["auto", "native", "flash", "sage", "xformers"] = "auto"
    """The transformer's attention kernels, through diffusers' attention dispatcher: `native`
    (PyTorch's scaled dot-product attention), `flash` (flash-attn 2), `sage` (SageAttention),
    `xformers`. `auto`: on a CUDA replica the fastest installed (sage, then flash, then xformers),
    else native. A named one that is not installed, or anything but native without CUDA, stops the
    replica with an error naming it."""
    vae_dtype: Literal["model", "float32"] = "model"
    """The VAE's dtype: `model` (the same as the rest), or `float32` whatever the rest computes in
    (the pipeline's images and latents are cast at the VAE's edges; the planner plans its memory)."""
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
    placement: PlacementConfig | None = None
    """How a replica spreads the pipeline over the GPUs it owns (`deployments.placement`): the
    builder asks Ray for the GPUs the plan needs, and the model applies the plan when CUDA is
    present. None: the whole pipeline on one device (CUDA when visible, else CPU), as in the demo."""

    _steps = at_least(MIN_STEPS, "default_steps", "max_steps")
    _diffusion_positive = at_least(1, "max_prompt_chars")
    _text_encoder: Literal["inline", "stage"] = PrivateAttr("inline")

    @property
    def text_encoder(self) -> Literal["inline", "stage"]:
        """Where this model's prompts are encoded: `inline` (its own text encoder) or `stage` (the
        TextEncoder deployment; the replica loads none). The app config's `text_encoder.mode`,
        given to the section at validation (the context's `text_encoder`)."""
        return self._text_encoder

    @field_validator("default_cfg", "max_cfg")
    @classmethod
    def _cfg(cls, value: float, info: ValidationInfo) -> float:
        if not (value >= 1.0 and value < float("inf")):
            raise ValueError(f"{info.field_name} must be a finite number >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self, info: ValidationInfo) -> DiffusionConfig:
        if info.context and info.context.get("text_encoder") in ("inline", "stage"):
            self._text_encoder = info.context["text_encoder"]
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps must be <= max_steps ({self.max_steps}), got {self.default_steps}")
        if self.default_cfg > self.max_cfg:
            raise ValueError(f"default_cfg must be <= max_cfg ({self.max_cfg}), got {self.default_cfg}")
        if self.source != "tiny":
            for name in self.tiny_only:
                if getattr(self, name) is not None:
                    raise ValueError(f"{self.task}.{name} ({getattr(self, name)}) is for the tiny demo models only "
                                     f"(source: tiny), not for source {self.source!r}: remove it")
        if self.placement is not None:
            self.check_placement_request()
            options = self.serve.ray_actor_options
            if "num_gpus" in options:
                raise ValueError(
                    f"{self.task}.serve.ray_actor_options.num_gpus ({options['num_gpus']}) conflicts with "
                    f"{self.task}.placement: the plan decides how many GPUs a replica asks for; remove num_gpus")
            try:
                self.plan()
            except DoesNotFit as error:
                raise ValueError(f"{self.task}.placement does not fit: {error}") from None
        return self

    def check_placement_request(self) -> None:
        """Raise ValueError when the placement cannot hold the largest request this section admits."""

    def resolve_common(self, params: DiffusionParams, prompt: str, defaults: tuple[int, float] | None = None
                       ) -> dict[str, Any]:
        """Defaults and range checks of the shared fields (`prompt` is the task's resolved prompt;
        `defaults`, the (steps, cfg) to use where the request gives none, else the configured ones);
        raises InvalidParameter naming the field. Returns the resolved shared fields."""
        default_steps, default_cfg = defaults or (self.default_steps, self.default_cfg)
        steps = default_steps if params.steps is None else params.steps
        cfg = default_cfg if params.cfg is None else params.cfg
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

    def limits(self, catalog: Any = None) -> dict[str, dict[str, Any]]:
        return {
            "prompt": {"maxLength": self.max_prompt_chars},
            "negative_prompt": {"maxLength": self.max_prompt_chars, "default": self.default_negative_prompt},
            "steps": {"minimum": MIN_STEPS, "maximum": self.max_steps, "default": self.default_steps},
            "cfg": {"minimum": 1.0, "maximum": self.max_cfg, "default": self.default_cfg},
            "seed": {"minimum": 0, "maximum": MAX_SEED},
        }

    def plan(self) -> Plan | None:
        """The placement plan for this model on its `placement` (None without one)."""
        return self.plan_on(self.placement) if self.placement is not None else None

    def plan_on(self, budget: PlacementConfig, sizes: dict[str, Any] | None = None,
                text_encoder: Literal["inline", "stage"] | None = None) -> Plan:
        """This model's plan on `budget` (with its VAE dtype and, unless `text_encoder` says
        otherwise, where its prompts are encoded), sized from `sizes`, else from the configs of
        `source` when that directory is here, else from the published configs stored in the
        package (what `tiny` stands in for). Raises DoesNotFit."""
        if sizes is None and self.source != "tiny":
            directory = Path(self.source).expanduser()
            sizes = placement.component_sizes(directory) if (directory / "model_index.json").is_file() else None
        vae = placement.FP32 if self.vae_dtype == "float32" else "bfloat16"
        return placement.plan(self.task, budget, sizes, vae_dtype=vae, text_encoder=text_encoder or self.text_encoder)

    def serve_options(self) -> dict[str, Any]:
        """From config, and with `placement` the GPUs, custom resources and placement-group bundle
        its plan needs (exactly those, no more)."""
        options, plan = self.serve.serve_options(), self.plan()
        if plan is None:
            return options
        return with_planned(options, lambda cpus: placement.ray_options(plan, self.placement, num_cpus=cpus))
