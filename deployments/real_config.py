"""The `real` task's settings and request fields: `RealParams`, `SpeedAdapter`, `RealModelConfig`.

Presets (`full` and the speed adapters), LoRA versions (the store in `lora_dir`, the default
version) and the compile settings; `resolve` fills a request's defaults and checks its ranges and
choices. A config module: it imports no torch, diffusers or Ray (the model is `deployments.real`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from deployments.diffusion_config import MIN_STEPS, DiffusionConfig, DiffusionParams
from deployments.errors import InvalidParameter
from deployments.lora import NONE, LoraStore, check_name, ensure_tiny_loras, ensure_tiny_speed_adapter
from deployments.task import Catalog, choice_schema
from deployments.validation import at_least, between

DEFAULT_PROMPT = "transform the image to realistic photograph, high quality, 4k, natural skin texture"
FULL = "full"
"""The preset without a speed adapter: the base's own step count, with CFG."""
MAX_LORA_SCALE = 2.0


class RealParams(DiffusionParams):
    """Per-request choices for `real`; None means "use the configured default"."""

    prompt: str | None = None
    """What the result should show; blank → the default prompt."""
    lora: str | None = None
    """LoRA version (a file stem in the LoRA directory; GET /v1/models lists them) or `none` for the
    base alone; None → the configured default (the newest version unless `default_lora` says otherwise)."""
    preset: str | None = None
    """Speed preset: `full` (the base's own step count, with CFG) or a configured speed adapter (a
    step-distilled LoRA run stacked under the version: a few steps, CFG off), which sets the
    defaults of `steps` and `cfg`; None → the configured default. GET /v1/models lists them."""
    lora_scale: float | None = None
    """Weight of the LoRA version (0 … 2); None → 1."""
    depth_compensation: bool | None = None
    """Restore local detail in defocused (depth-of-field blurred) regions before the model sees the
    image, as 2.5D game screenshots have; sharp regions are left untouched. None → off."""


class SpeedAdapter(BaseModel):
    """A step-distilled LoRA for the base (one preset), run stacked under the request's version."""

    model_config = ConfigDict(extra="forbid")

    file: str
    """Its `.safetensors` file, a local path prepared ahead (`imgserve fetch`); `tiny`: a tiny random
    stand-in generated into the cache directory (demo, tests). Checked against the base when a
    replica starts: a file that does not fit stops the replica, naming it."""
    steps: int = 8
    """The steps it was distilled for: the preset's default `steps`."""
    cfg: float = 1.0
    """The preset's default `cfg` (1: no classifier-free guidance, one transformer pass per step)."""
    weight: float = 1.0
    """Its adapter weight (0 … 2)."""

    _speed_steps = at_least(MIN_STEPS, "steps")
    _speed_weight = between(0.0, MAX_LORA_SCALE, "weight")

    @field_validator("cfg")
    @classmethod
    def _finite_cfg(cls, value: float, info: ValidationInfo) -> float:
        if not 1.0 <= value < float("inf"):
            raise ValueError(f"{info.field_name} must be a finite number >= 1, got {value}")
        return value


class RealModelConfig(DiffusionConfig):
    """The `real` section: the RealModel deployment's settings (the shared ones are documented on
    DiffusionConfig) and Serve options."""

    task: ClassVar[Literal["real"]] = "real"
    tiny_only: ClassVar[tuple[str, ...]] = ("condition_area",)
    choice_field: ClassVar[str | None] = "lora"

    vae_dtype: Literal["float32"] = "float32"
    """Locked: the VAE encodes and decodes in float32 whatever the transformer computes in (float16
    was measured losing hair detail at 1024²). The scheduler is the model's own flow-matching one
    and not a request field, and a request makes one image: `stats()["locked"]` shows all three."""
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
    """Directory of LoRA versions (`*.safetensors`, named by their stems), read only by the model
    replicas (they report what they find to the ingress); `$VARS` in it are expanded there, so each
    node may keep its models elsewhere. `tiny`: three tiny random adapters generated into the cache
    directory (demo, tests); None: the base model only. A file is a version once it is complete:
    its size unchanged across two scans and its header checked against the base."""
    default_lora: str | None = None
    """Version used when a request names none; None → the newest complete version when the replica
    started (logged; a file added later is not the default until a restart); `none` → the base alone."""
    max_adapters_per_replica: int = 2
    """LoRA versions a replica keeps loaded (LRU beyond this); also Serve's multiplexing limit."""
    lora_rescan_s: float = 10.0
    """Seconds a directory listing is trusted: a replica rescans this often (a file dropped in is
    listed within about twice this), and when asked for a name it does not list."""
    lora_settle_s: float = 1.0
    """Seconds between the two scans that must find a file's size and time unchanged before it is
    listed (at a replica's start; later scans are `lora_rescan_s` apart)."""
    speed_adapters: dict[str, SpeedAdapter] = {}
    """Presets beyond `full`: name → its speed adapter. Each is loaded once per replica and never
    evicted; a request with that preset runs it stacked under its version."""
    default_preset: str = FULL
    """The preset of a request that names none: `full` or a name of `speed_adapters`."""
    compile: bool = False
    """Compile the transformer (`torch.compile`). Versions are then swapped into one adapter whose
    rank is padded to `compile_max_rank`, so switching versions does not recompile; each image size
    and each combination of a speed preset and a LoRA weight compiles once, on its first request
    (seconds on the tiny model, minutes on a card). Needs `max_adapters_per_replica: 1`."""
    compile_max_rank: int = 64
    """With `compile`: the largest LoRA rank a version may have (the swapped adapter is that large)."""

    _real_positive = at_least(1, "max_adapters_per_replica", "condition_area", "compile_max_rank")
    _real_seconds = at_least(0, "lora_rescan_s", "lora_settle_s")

    @model_validator(mode="after")
    def _presets_within_limits(self) -> RealModelConfig:
        for name, adapter in self.speed_adapters.items():
            try:
                check_name(name, "speed_adapters")
            except InvalidParameter as exc:
                raise ValueError(f"speed_adapters: {exc.message}") from None
            if name in (FULL, NONE):
                raise ValueError(f"speed_adapters: {name!r} is reserved (presets are `full` and the adapters' names)")
            if adapter.steps > self.max_steps or adapter.cfg > self.max_cfg:
                raise ValueError(f"speed_adapters.{name}: steps ({adapter.steps}) and cfg ({adapter.cfg}) must be "
                                 f"within max_steps ({self.max_steps}) and max_cfg ({self.max_cfg})")
        if self.default_preset not in self.presets():
            raise ValueError(f"default_preset must be one of {list(self.presets())}, got {self.default_preset!r}")
        if self.compile and self.max_adapters_per_replica != 1:
            raise ValueError(f"compile swaps every version into one adapter: max_adapters_per_replica must be 1, "
                             f"got {self.max_adapters_per_replica}")
        return self

    def presets(self) -> dict[str, tuple[int, float]]:
        """Preset name → the (steps, cfg) it defaults to, `full` first."""
        return {FULL: (self.default_steps, self.default_cfg),
                **{name: (adapter.steps, adapter.cfg) for name, adapter in self.speed_adapters.items()}}

    def speed_adapter_file(self, name: str, cache_dir: Path | str) -> Path:
        """The file of the speed adapter `name` (generating the tiny one if asked)."""
        file = self.speed_adapters[name].file
        return ensure_tiny_speed_adapter(cache_dir) if file == "tiny" else Path(file).expanduser()

    @field_validator("default_lora")
    @classmethod
    def _default_lora(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_name(value, "default_lora")
            except InvalidParameter as exc:
                raise ValueError(f"default_lora: {exc.message}") from None
        return value

    def check_input_edge(self, max_long_edge: int) -> None:
        if self.placement is not None and self.placement.resolution < max_long_edge:
            raise ValueError(f"real.placement.resolution ({self.placement.resolution}) must be >= "
                             f"preprocess.max_long_edge ({max_long_edge}): inputs reach the model that large")

    def resident_limit(self) -> int:
        return self.max_adapters_per_replica

    def lora_store(self, cache_dir: Path | str, check: Callable[[Path], list[str]] | None = None) -> LoraStore | None:
        """The store of LoRA versions this config names (generating the tiny ones if asked), in the
        process that holds the model; `check`: a file's problems against the base."""
        if self.lora_dir is None:
            return None
        directory = ensure_tiny_loras(cache_dir) if self.lora_dir == "tiny" else Path(os.path.expandvars(self.lora_dir))
        return LoraStore(directory, rescan_s=self.lora_rescan_s, settle_s=self.lora_settle_s, check=check)

    def transformer_dir(self, cache_dir: Path | str) -> Path:
        """The base transformer's directory (what LoRA files are checked against)."""
        if self.source == "tiny":
            from deployments.tiny import ensure_tiny

            return ensure_tiny("edit", Path(cache_dir).expanduser()) / "transformer"
        return Path(self.source).expanduser() / "transformer"

    def resolve(self, params: RealParams, catalog: Catalog | None = None) -> RealParams:
        """Fill defaults (the preset's steps and cfg, the default version) and check ranges and the
        version against `catalog` (None: nothing reported here; the form of the name only, and the
        default left to the replica); raises InvalidParameter naming the field."""
        presets = self.presets()
        preset = params.preset or self.default_preset
        if preset not in presets:
            raise InvalidParameter(f"unknown preset {preset!r}; available: {', '.join(presets)}", "preset")
        prompt = self.default_prompt if params.prompt is None or not params.prompt.strip() else params.prompt
        common = self.resolve_common(params, prompt, presets[preset])
        if params.lora is not None and not params.lora.strip():
            raise InvalidParameter("blank; leave the field out for the default version", "lora")
        lora = params.lora or self.default_lora or (catalog.default if catalog is not None else None)
        if lora is not None and lora != NONE:
            if self.lora_dir is None:
                raise InvalidParameter(f"no LoRA directory is configured; only {NONE!r} is available", "lora")
            check_name(lora)
            if catalog is not None and lora not in catalog.names and lora != catalog.default:
                raise catalog.unknown(lora, "lora", "LoRA version", also=(NONE,))
        scale = 1.0 if params.lora_scale is None else params.lora_scale
        if not 0.0 <= scale <= MAX_LORA_SCALE:  # also false for NaN
            raise InvalidParameter(f"must be between 0 and {MAX_LORA_SCALE:g}, got {scale}", "lora_scale")
        return RealParams(**common, lora=lora, preset=preset, lora_scale=scale,
                          depth_compensation=bool(params.depth_compensation))

    def choices(self, catalog: Catalog | None = None) -> list[str]:
        """The LoRA versions (model ids `real:<version>`); the base alone is asked for with the field
        `lora=none`, not by an id of its own."""
        return list(catalog.names) if catalog is not None else []

    def default_version(self, catalog: Catalog | None = None) -> str | None:
        """The version of a request that names none: configured, else the replicas' (None: unknown here)."""
        if self.lora_dir is None:
            return NONE
        return self.default_lora or (catalog.default if catalog is not None else None)

    def describe(self, catalog: Catalog | None = None) -> dict[str, Any]:
        steps, cfg = self.presets()[self.default_preset]
        return {
            "defaults": {"prompt": self.default_prompt, "negative_prompt": self.default_negative_prompt,
                         "steps": steps, "cfg": cfg},
            "limits": {"steps": [MIN_STEPS, self.max_steps], "cfg": [1.0, self.max_cfg],
                       "lora_scale": [0.0, MAX_LORA_SCALE]},
            "lora": {"versions": [NONE, *self.choices(catalog)], "default": self.default_version(catalog),
                     "reported": catalog is not None},
            "presets": {"default": self.default_preset,
                        "choices": {name: {"steps": steps, "cfg": cfg, "adapter": name != FULL}
                                    for name, (steps, cfg) in self.presets().items()}},
        }

    def limits(self, catalog: Catalog | None = None) -> dict[str, dict[str, Any]]:
        limits = super().limits()
        described = self.describe(catalog)
        limits["prompt"]["default"] = self.default_prompt
        limits["steps"]["default"], limits["cfg"]["default"] = described["defaults"]["steps"], described["defaults"]["cfg"]
        lora = described["lora"]
        versions = lora["versions"] if catalog is not None or self.lora_dir is None else []
        default = {"default": lora["default"]} if lora["default"] is not None else {}
        return {**limits, "lora": {**choice_schema(versions), **default},
                "preset": {"enum": list(self.presets()), "default": self.default_preset},
                "lora_scale": {"minimum": 0.0, "maximum": MAX_LORA_SCALE, "default": 1.0},
                "depth_compensation": {"default": False}}
