"""The anime task's settings and request fields: `AnimeParams` (what a request may choose) and
`AnimeModelConfig` (the config section: styles, batching, limits, Serve options). A config module:
pydantic only, no torch or Ray, so `imgserve plan` and config validation never import the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from deployments.errors import InvalidParameter
from deployments.model import ModelSettings
from deployments.options import DeploymentOptions, model_defaults
from deployments.styles import STYLE_NAME, TINY_STYLES, style_files
from deployments.task import Catalog, choice_schema
from deployments.validation import at_least

DEFAULT_STYLE = "face_paint_512_v2"


class AnimeParams(BaseModel):
    """Per-request choices for `anime`; None means "use the configured default"."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    style: str | None = None
    """Style name: a file stem in the styles directory (e.g. `face_paint_512_v2`, `paprika`;
    GET /v1/models lists them)."""


class AnimeModelConfig(ModelSettings):
    """The `anime` section: the AnimeModel deployment's settings and Serve options."""

    choice_field: ClassVar[str | None] = "style"
    serve: DeploymentOptions = Field(default_factory=lambda: model_defaults(num_cpus=1))
    """Ray Serve options of the AnimeModel deployment (a CPU replica by default; the model is
    small enough for CPUs, or a GPU fraction such as num_gpus: 0.25)."""
    styles_dir: str = "tiny"
    """`tiny`: the four published style names with seeded random weights, generated into
    `cache_dir/anime-styles-v1` (demo, tests; outputs look like noise). Otherwise a local directory
    of `<style>.safetensors` files; every one is a style, and one added later is served without a
    restart. The published `.pt` styles are pickles: convert them ahead of time (`imgserve
    convert-styles`, or `imgserve fetch` with `convert: animegan`); a `.pt`/`.pth` without its
    `.safetensors` stops the replica at start-up, naming the file. Use an absolute
    path: it is read only by the model replicas (they report their styles to the ingress), and
    `$VARS` in it are expanded there, so each node may keep its models elsewhere. Never downloaded
    at run time."""
    default_style: str = DEFAULT_STYLE
    """Style used when the request names none; must exist in the styles directory."""
    dtype: Literal["auto", "float32", "float16"] = "auto"
    """Compute dtype; `auto`: float16 on CUDA, float32 on CPU (float16 on CPU is slow)."""
    align_corners: bool = True
    """Upsampling mode of the generator: True is the published module's default (and its
    torch.hub `face2paint`); False doubles with half-pixel centres (its `test.py` default)."""
    max_long_edge: int = 1024
    """Largest side accepted from preprocess; larger arrays are refused (field `image`). Keep it
    equal to the long-edge limit preprocess applies for this task."""
    max_batch_size: int = 1
    """Requests gathered into one call by `serve.batch` inside a replica; 1 = no batching and no
    wait. CPU batching measured no throughput gain, so CPU profiles keep 1; GPU profiles use 4–8
    (then `max_ongoing_requests` must be at least this, or batches never fill)."""
    batch_wait_timeout_s: float = 0.01
    """How long a batch waits for more requests before running (only when max_batch_size > 1)."""
    max_batch_pixels: int = 1024 * 1024
    """Most padded pixels run as one tensor batch; a larger group of same-size requests runs in
    chunks. Bounds peak memory: about 1 GB per 1024² image on CPU in float32. Raise it on GPUs."""
    workspace_mb: int = 1024
    """CPU only: activation memory kept between calls (MiB), so a call does not page-fault its
    activations in afresh (the largest single saving on CPU). One 1024² image needs ~960 MiB; the
    kept memory stays resident. 0 turns it off (plain allocations)."""

    _positive = at_least(1, "max_long_edge", "max_batch_size", "max_batch_pixels")
    _non_negative = at_least(0, "workspace_mb")

    @field_validator("batch_wait_timeout_s")
    @classmethod
    def _timeout(cls, value: float, info: ValidationInfo) -> float:
        if not 0.0 <= value <= 10.0:  # also false for NaN
            raise ValueError(f"{info.field_name} must be between 0 and 10 seconds, got {value}")
        return value

    @field_validator("styles_dir")
    @classmethod
    def _styles_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"styles_dir must be `tiny` or a directory, got {value!r}")
        return value

    @field_validator("default_style")
    @classmethod
    def _style_name(cls, value: str) -> str:
        if not STYLE_NAME.fullmatch(value) or ".." in value:
            raise ValueError(f"default_style must be a plain style name (no path), got {value!r}")
        return value

    @model_validator(mode="after")
    def _tiny_default(self) -> AnimeModelConfig:
        if self.styles_dir == "tiny" and self.default_style not in TINY_STYLES:
            raise ValueError(f"default_style {self.default_style!r} is not a tiny style; tiny styles: {list(TINY_STYLES)}")
        return self

    # -- styles, without loading weights ---------------------------------------------------------
    def style_files(self) -> dict[str, Path]:
        """{style name: weights file} of a local styles directory (one cheap directory listing).

        Raises FileNotFoundError for a missing directory; `tiny` has no files before `load()`.
        """
        if self.styles_dir == "tiny":
            return {}
        return style_files(self.styles_path())

    def styles_path(self) -> Path:
        """The styles directory in this process (`$VARS` expanded: a node's own model root)."""
        return Path(os.path.expandvars(self.styles_dir)).expanduser()

    def styles(self) -> list[str]:
        """The style names a request may ask for, sorted; lists the directory, loads nothing."""
        if self.styles_dir == "tiny":
            return list(TINY_STYLES)
        return sorted(self.style_files())

    def choices(self, catalog: Catalog | None = None) -> list[str]:
        """The styles the replicas reported (model ids `anime:<style>`)."""
        return list(catalog.names) if catalog is not None else []

    def describe(self, catalog: Catalog | None = None) -> dict[str, Any]:
        return {"styles": self.choices(catalog), "default_style": self.default_style, "reported": catalog is not None}

    def limits(self, catalog: Catalog | None = None) -> dict[str, dict[str, Any]]:
        return {"style": {**choice_schema(self.choices(catalog)), "default": self.default_style}}

    def resolve(self, params: AnimeParams, catalog: Catalog | None = None) -> AnimeParams:
        """Fill the default style and check it against `catalog` (None: nothing reported here, the
        name's form only; the replica checks again); raises InvalidParameter naming `style`."""
        # a blank name is refused (422), not read as "the default": the documented choices hold; leave
        # the field out for the default. Surrounding whitespace is still forgiven.
        if params.style is not None and not params.style.strip():
            raise InvalidParameter("blank; leave the field out for the default style", "style")
        style = self.default_style if params.style is None else params.style.strip()
        if not STYLE_NAME.fullmatch(style) or ".." in style:
            raise InvalidParameter(f"not a style name: {style!r} (plain names only, no paths)", "style")
        if catalog is not None and style not in catalog.names:
            raise catalog.unknown(style, "style", "style", label="available")
        return AnimeParams(style=style)
