"""The budget of one replica, and the units and names the rest of the package shares.

Contract: `PlacementConfig` is the GPUs one replica owns (count × memory, margin) and the
trade-offs it may make to fit them (fp8, offload); `parse_gpus` reads `"2x24"` as (2, 24.0);
`DoesNotFit` is what the planner raises when nothing fits. Also `GB` (decimal) and the type names
`Task`, `Dtype`, `Offload`, `TextEncoderMode` with `BF16`/`FP8`. Validation only: it never sizes a
model, never plans, never imports torch.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from deployments.validation import between

GB = 1e9
"""Sizes are decimal GB as model cards state them (40.9 GB bf16
transformer). An RTX 4090's 24 GiB is 25.8 GB, so planning for 24 GB leaves ~1.8 GB for the CUDA
context and the driver."""

Task = Literal["real", "layers"]
Dtype = Literal["bfloat16", "float8_e4m3fn", "float32"]
Offload = Literal["none", "group", "cpu", "stage"]
TextEncoderMode = Literal["inline", "stage"]
"""Where a diffusion replica's prompts are encoded: `inline`, by its own text encoder (on its cards,
streamed to them, or on its CPU); `stage`, by the separate TextEncoder deployment (the replica
loads no text encoder)."""

BF16: Dtype = "bfloat16"
FP8: Dtype = "float8_e4m3fn"
FP32: Dtype = "float32"


class PlacementConfig(BaseModel):
    """The GPUs one replica owns and the trade-offs it may make to fit them."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = 1
    """GPUs one replica owns (all on one node); the plan may use fewer."""
    gpu_memory_gb: float = 24.0
    """Memory of each GPU in decimal GB (an RTX 4090: 24; its 24 GiB are 25.8 GB, the rest is left
    to the CUDA context)."""
    gpu_resource: str | None = None
    """Custom Ray resource the replica asks for once per GPU it uses (e.g. `rtx4090`), so replicas
    land on nodes started with that resource; None asks for plain GPUs only."""
    resolution: int = 1024
    """Longest pixel edge the plan must hold (square images are the worst case)."""
    layers: int = 8
    """`layers` task only: the layer count the plan must hold (each layer is a frame of tokens)."""
    allow_fp8: bool = True
    """Allow fp8 weight storage (float8_e4m3fn, computed in bf16 by layerwise casting)."""
    compute: Literal["bf16", "fp8"] = "bf16"
    """How the transformer's Linear layers compute. `bf16`: in bfloat16 (fp8-stored weights are
    upcast layer by layer). `fp8`: in float8 with torchao's dynamic activation + weight scheme,
    per-row scales (cards of compute capability ≥ 8.9: RTX 4090, H100/H200; LoRA layers stay bf16,
    so versions still hot-swap); the transformer is then stored in fp8 too. Needs `allow_fp8`."""
    allow_offload: bool = True
    """Allow streaming weights from CPU memory (group offload) or running the text encoder on CPU."""
    margin_gb: float | None = None
    """GB kept free on every GPU below its memory; None → max(1.5, 6.25 % of the memory)
    (24 GB → peaks up to 22.5 GB)."""

    _count = between(1, 64, "gpus", "layers")
    _resolution = between(256, 4096, "resolution")

    @field_validator("gpu_memory_gb")
    @classmethod
    def _memory(cls, value: float, info: ValidationInfo) -> float:
        if not (0 < value < float("inf")):  # also rejects NaN
            raise ValueError(f"{info.field_name} must be a finite number > 0, got {value}")
        return value

    @field_validator("gpu_resource")
    @classmethod
    def _resource(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (not value.strip() or value in ("CPU", "GPU", "memory")):
            raise ValueError(f"{info.field_name} must be a custom resource name, got {value!r}")
        return value

    @field_validator("margin_gb")
    @classmethod
    def _margin(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not (0 <= value < float("inf")):
            raise ValueError(f"{info.field_name} must be a finite number >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _fp8_compute_needs_fp8(self) -> PlacementConfig:
        if self.compute == "fp8" and not self.allow_fp8:
            raise ValueError("compute: fp8 stores the transformer in fp8: it needs allow_fp8: true")
        return self

    @model_validator(mode="after")
    def _margin_below_memory(self) -> PlacementConfig:
        if self.margin_gb is not None and self.margin_gb >= self.gpu_memory_gb:
            raise ValueError(f"margin_gb must be below gpu_memory_gb ({self.gpu_memory_gb}), got {self.margin_gb}")
        return self

    @property
    def margin(self) -> float:
        """The margin in GB actually kept (the default resolved)."""
        return self.margin_gb if self.margin_gb is not None else max(1.5, 0.0625 * self.gpu_memory_gb)

    @property
    def shape(self) -> str:
        """`2x24` style text of the budget."""
        return f"{self.gpus}x{self.gpu_memory_gb:g}"


def parse_gpus(text: str) -> tuple[int, float]:
    """`"2x24"` → (2, 24.0): GPU count × memory per GPU in GB. Raises ValueError naming the text."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+(?:\.\d+)?)\s*(?:GB|gb)?\s*", text or "")
    if not match or int(match.group(1)) < 1 or float(match.group(2)) <= 0:
        raise ValueError(f"GPUs must look like COUNTxGB (e.g. 2x24), got {text!r}")
    return int(match.group(1)), float(match.group(2))


class DoesNotFit(ValueError):
    """No placement fits the budget; `smallest` is the smallest configuration that would (the same
    options on more or larger cards, else with fp8/offload allowed), None when none does."""

    def __init__(self, reason: str, smallest: PlacementConfig | None):
        super().__init__(reason)
        self.reason = reason
        self.smallest = smallest
