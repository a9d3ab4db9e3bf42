"""Records that travel between deployments: plain dataclasses of numpy arrays and numbers.

Preprocess produces a `Prepared`, a model turns it into a `Generated`, postprocess encodes that.
No PIL objects, tensors or files cross a deployment boundary; everything here pickles cheaply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from deployments.errors import TimedOut


@dataclass(frozen=True)
class ImageSpec:
    """What a model needs from preprocess; each model class publishes one as `input_spec`."""

    multiple: int = 16
    """Both sides of the array handed to the model are multiples of this."""
    alpha: bool = False
    """Keep an alpha channel (RGBA array) instead of compositing over white (RGB array)."""
    depth_compensation: bool = False
    """Restore detail in defocused regions of the prepared array (`deployments.depth`)."""
    fit: tuple[int, int] | None = None
    """(width, height) the returned size must fit inside, aspect kept, never enlarged: a request's
    `size`, one more bound next to the long-edge limit; None: that limit alone."""


@dataclass
class PreparedImage:
    """What preprocess did to the upload; echoed to the client and used to undo the alignment."""

    original_size: tuple[int, int]
    """(width, height) of the upload after EXIF orientation was applied."""
    size: tuple[int, int]
    """(width, height) the result is returned at: the long-edge limit applied, aspect kept."""
    model_size: tuple[int, int]
    """(width, height) of the array given to the model: `size` with each side aligned."""
    scale: float
    """size / original_size (1.0 when nothing was downscaled)."""
    source_format: str
    """Container format as detected from the bytes (JPEG, PNG, WEBP, ...)."""
    source_mode: str
    """PIL mode of the decoded upload before conversion (RGB, RGBA, P, CMYK, I;16, ...)."""
    warnings: list[str] = field(default_factory=list)
    """Human-readable notes about lossy conversions (alpha flattened, 16-bit reduced, ...)."""


@dataclass
class Prepared:
    """A decoded, converted, resized and aligned image, ready for a model."""

    array: np.ndarray
    """uint8, shape (model_size[1], model_size[0], 3 or 4)."""
    info: PreparedImage


@dataclass
class Generated:
    """A model's output for one request, before encoding."""

    array: np.ndarray
    """uint8, shape (H, W, C); usually model_size, postprocess brings it to `info.size`."""
    info: PreparedImage
    params: dict[str, Any]
    """The parameters that were actually used (task, prompt, steps, cfg, seed, ...); embedded in
    the result, so they must not vary between replicas for the same request."""
    served: dict[str, Any] = field(default_factory=dict)
    """Facts about how this request was served (which replica, whether an adapter was read from
    disk); reported to the client but never embedded, so results stay byte-identical."""


@dataclass
class Conditioning:
    """What a text encoder made of one request, for a diffusion model to denoise with: the
    pipeline's own `encode_prompt` outputs as arrays (float32, exact for bfloat16 and float32
    encoders; cast back to `dtype` on arrival), and the prompt actually used."""

    embeds: np.ndarray
    """(1, tokens, hidden) prompt embeddings."""
    mask: np.ndarray
    """(1, tokens) attention mask (all ones where the pipeline passes none)."""
    negative_embeds: np.ndarray | None
    """The negative prompt's embeddings; None without classifier-free guidance."""
    negative_mask: np.ndarray | None
    dtype: str
    """The torch dtype the encoder computed in (`bfloat16`, `float32`)."""
    prompt: str
    """The prompt the embeddings are of (a caption when the model wrote one)."""
    prompt_source: str = "request"
    """`request`, or `caption` when the encoder captioned the image."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Stage times of the encoder's work (`encode_prompt`, `caption`)."""
    served: dict[str, Any] = field(default_factory=dict)
    """Where it was encoded (the encoder's replica), for the result's `served`."""

    @property
    def nbytes(self) -> int:
        """Bytes of arrays that cross the hop."""
        arrays = (self.embeds, self.mask, self.negative_embeds, self.negative_mask)
        return sum(array.nbytes for array in arrays if array is not None)


class Progress(Protocol):
    """Where a model reports how far one request is; passed in by the caller, may be None.

    Implementations must be picklable (they travel to the model replica) and cheap to call.
    """

    def stage(self, name: str) -> None:
        """The request entered a stage: preprocess, encode_prompt, denoise, decode, postprocess."""

    def step(self, step: int, total: int) -> bool:
        """Denoising step `step` of `total` finished (this is the `denoise` stage); returns True when
        the request must stop."""


@dataclass(frozen=True)
class Deadline:
    """A `Progress` for a request with a time limit: at the first stage or step boundary past
    `until` (wall clock, `time.time()`, shared by the nodes) it raises `TimedOut`, so a model stops
    at its next denoising step instead of running on for a client that was already answered.
    Forwards everything to `inner` (a job's progress) when there is one."""

    until: float
    limit_s: float
    inner: Progress | None = None

    def _check(self, where: str) -> None:
        if time.time() > self.until:
            raise TimedOut(f"took longer than the limit of {self.limit_s:g} s; stopped {where}")

    def stage(self, name: str) -> None:
        self._check(f"before {name}")
        if self.inner is not None:
            self.inner.stage(name)

    def step(self, step: int, total: int) -> bool:
        if self.inner is not None and self.inner.step(step, total):
            return True
        self._check(f"after step {step} of {total}")
        return False
