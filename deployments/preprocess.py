"""Preprocess deployment: decodes, validates and resizes uploads on CPU; knows nothing about diffusion or HTTP.

`Preprocess.prepare` turns the raw bytes of one upload into a `Prepared` record: a C-contiguous
uint8 RGB (or RGBA) array whose sides are multiples of the model's `ImageSpec.multiple` (the image
inside the long-edge limit and, where the request gave a `size`, inside `ImageSpec.fit`), plus a
`PreparedImage` describing what was done (original size, returned size, scale, source format and
mode, warnings about lossy conversions). Every problem with the upload is raised as `BadImage`,
`UnsupportedFormat` or `TooLarge` with ``field="image"``; no Pillow exception escapes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from deployments import depth, imagememory, metrics
from deployments.errors import BadImage, ImgserveError, TooLarge, UnsupportedFormat
from deployments.records import ImageSpec, Prepared, PreparedImage

_ORIENTATION_TAG = 0x0112
# ImageOps.exif_transpose's table. Applied after the resize, so only the small image is transposed.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
# Pillow's own thumbnail default: a box reduce first, then LANCZOS over at least 2x the target,
# which Pillow documents as indistinguishable from a full LANCZOS in most cases.
_REDUCING_GAP = 2.0
_HIGH_BIT_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _tiff_orients_itself() -> bool:
    """Whether this Pillow's TIFF plugin applies the EXIF orientation itself (Pillow 13 does: it
    reports the oriented size at open and transposes while loading), so it must not be applied twice."""
    exif = Image.Exif()
    exif[_ORIENTATION_TAG] = 6
    buffer = BytesIO()
    Image.new("L", (2, 1)).save(buffer, "TIFF", exif=exif.tobytes())
    return Image.open(buffer).size == (1, 2)


# Formats whose Pillow plugin orients the image itself: their orientation tag is left to Pillow.
_SELF_ORIENTING = {"TIFF"} if _tiff_orients_itself() else set()


class PreprocessConfig(BaseModel):
    """Limits and accepted formats of the Preprocess deployment."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = 20 * 1024 * 1024
    """Uploads larger than this many bytes are refused (TooLarge)."""
    max_pixels: int = 40_000_000
    """Width * height read from the header, before any pixel is decoded; above → TooLarge.
    Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) still applies on top."""
    max_long_edge: int = 1024
    """Images whose long edge exceeds this are downscaled to it, aspect kept; never upscaled."""
    formats: list[str] = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
    """Accepted container formats, as Pillow names them; others → UnsupportedFormat.
    Multi-picture JPEGs (Pillow's "MPO", as written by many cameras) count as JPEG."""

    @field_validator("max_bytes", "max_pixels", "max_long_edge")
    @classmethod
    def _positive(cls, value: int, info: ValidationInfo) -> int:
        if value <= 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value}")
        return value

    @field_validator("max_long_edge")
    @classmethod
    def _long_edge_floor(cls, value: int) -> int:
        if value < 16:
            raise ValueError(f"max_long_edge must be >= 16, got {value}")
        return value

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"formats must not be empty, got {value}")
        Image.init()
        unknown = [name for name in value if name not in Image.OPEN]
        if unknown:
            raise ValueError(f"formats {unknown} are unknown to Pillow; known: {sorted(Image.OPEN)}")
        return value


@contextmanager
def _pil_errors() -> Iterator[None]:
    """Turn anything Pillow raises into the request's error, so a bad upload never kills a replica."""
    # catch_warnings is process-global: a concurrent thread may briefly see the "error" filter,
    # which only turns its own bomb warnings into errors too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except ImgserveError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise TooLarge(f"image exceeds Pillow's pixel limit: {exc}", field="image") from exc
        except UnidentifiedImageError as exc:
            raise BadImage("not a recognised image", field="image") from exc
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
            raise BadImage(f"corrupt or truncated image: {exc}", field="image") from exc


def _fit(size: tuple[int, int], long_edge: int) -> tuple[int, int]:
    w, h = size
    if max(w, h) <= long_edge:
        return size
    scale = long_edge / max(w, h)
    # The long side is set exactly: round(w * scale) could land one pixel off the limit.
    if w >= h:
        return long_edge, max(1, round(h * scale))
    return max(1, round(w * scale)), long_edge


def _fit_inside(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled down to fit inside `box` (width, height), aspect kept, never enlarged; the
    side that limits is set exactly. For a square box this is `_fit`."""
    w, h = size
    bw, bh = box
    if w <= bw and h <= bh:
        return size
    if bw * h <= bh * w:  # the width limits (bw / w <= bh / h, in integers)
        return bw, min(bh, max(1, round(h * bw / w)))
    return min(bw, max(1, round(w * bh / h))), bh


def _align(side: int, multiple: int) -> int:
    # Half up, integer-only (Python's round() goes to even on .5).
    return max(multiple, (side + multiple // 2) // multiple * multiple)


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale a 16-bit or 32-bit single-channel image to L, keeping its full range (not clipping)."""
    a = np.asarray(im, dtype=np.float32)  # "I;16B" arrives as big-endian uint16; numpy swaps it
    if im.mode.startswith("I;16"):
        lo, peak = 0.0, 65535.0
    else:
        # "I" and "F" carry no declared range: guess the usual ones, stretch anything else.
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 65535:
            peak = max(hi - lo, 1.0)
        else:
            lo = 0.0
            peak = 1.0 if im.mode == "F" and hi <= 1 else 255.0 if hi <= 255 else 65535.0
    return Image.fromarray(np.rint((a - lo) * (255 / peak)).clip(0, 255).astype(np.uint8))


class Preprocess:
    """Decode, validate, orient, convert, resize and align one upload for a model."""

    def __init__(self, config: PreprocessConfig | None = None) -> None:
        self.config = config or PreprocessConfig()
        imagememory.keep_freed_blocks()

    def prepare(self, data: bytes, spec: ImageSpec = ImageSpec(), task: str = "any") -> Prepared:
        """One upload → a `Prepared` for a model described by `spec`. `task` only labels the
        `preprocess` stage time in the metrics (successful calls only)."""
        started = time.perf_counter()
        prepared = self._prepare(data, spec)
        metrics.stage_seconds.observe(time.perf_counter() - started, tags={"task": task, "stage": "preprocess"})
        return prepared

    def _prepare(self, data: bytes, spec: ImageSpec) -> Prepared:
        cfg = self.config
        notes: list[str] = []

        # 1. Byte limit: the only check that costs nothing, so it comes first.
        if not data:
            raise BadImage("empty upload", field="image")
        if len(data) > cfg.max_bytes:
            raise TooLarge(f"upload is {len(data)} bytes; the limit is {cfg.max_bytes}", field="image")

        with _pil_errors():
            # 2. Header only: Image.open reads no pixels, so format and size are checked for free.
            im = Image.open(BytesIO(data))
            fmt = im.format or "unknown"
            if fmt not in cfg.formats and not (fmt == "MPO" and "JPEG" in cfg.formats):
                raise UnsupportedFormat(f"format {fmt} is not accepted; accepted: {cfg.formats}", field="image")
            raw_w, raw_h = im.size
            if raw_w * raw_h > cfg.max_pixels:
                raise TooLarge(
                    f"image is {raw_w}x{raw_h} = {raw_w * raw_h} pixels; the limit is {cfg.max_pixels}",
                    field="image",
                )

            # 3. Animations and multi-page files: the model takes one picture, the first.
            if getattr(im, "is_animated", False):
                im.seek(0)
                notes.append(f"{fmt} has {getattr(im, 'n_frames', 'several')} frames; used the first")

            # 4. Plan the sizes before decoding, on the oriented image: the long-edge limit gives `size`,
            # alignment gives `model_size`, and JPEG DCT scaling can then skip the pixels not needed.
            orientation = im.getexif().get(_ORIENTATION_TAG, 1)  # PNG/TIFF may decode here; JPEG does not
            orientation = orientation if isinstance(orientation, int) and fmt not in _SELF_ORIENTING else 1
            swap = orientation in _SWAPS_AXES
            original = (raw_h, raw_w) if swap else (raw_w, raw_h)
            if spec.fit is None:
                size = _fit(original, cfg.max_long_edge)
            else:  # a requested size: one more bound, applied in the same single resize
                size = _fit_inside(original, (min(spec.fit[0], cfg.max_long_edge), min(spec.fit[1], cfg.max_long_edge)))
            model_size = (_align(size[0], spec.multiple), _align(size[1], spec.multiple))
            # Resize in stored orientation, transpose the small result: model_size on stored axes.
            target = model_size[::-1] if swap else model_size

            # 5. Decode. For JPEG the decoder downsamples by 1/2, 1/4 or 1/8 but never below target.
            box = None
            if fmt in ("JPEG", "MPO"):
                drafted = im.draft("RGB", target)
                if drafted is not None:
                    box = drafted[1]  # the decoded area in decoded pixels: keeps the geometry exact
            im.load()

            # 6. Mode. Alpha is kept through the resize (Pillow premultiplies) and flattened after,
            # on fewer pixels; P and 1 must become RGB first, Pillow resizes them NEAREST only.
            source_mode = im.mode
            if source_mode in _HIGH_BIT_DEPTH:
                im = _to_8bit(im)
                notes.append(f"{source_mode} image reduced to 8 bits per channel")
            has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
            mode = "RGBA" if has_alpha or spec.alpha else "RGB"
            if im.mode != mode:  # convert() to the same mode would still copy every pixel
                im = im.convert(mode)

            # 7. One LANCZOS resize straight to the aligned model size: `size` is only recorded,
            # postprocess brings the result back to it, so no second lossy resize happens here.
            # Orientation and the white matte come after, on the small image.
            if im.size != target:
                im = im.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)
            if orientation in _TRANSPOSE:
                im = im.transpose(_TRANSPOSE[orientation])
            if im.mode == "RGBA" and not spec.alpha:
                if im.getchannel("A").getextrema()[0] < 255:
                    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(white, im)
                    notes.append(f"{source_mode} transparency flattened over white")
                im = im.convert("RGB")

            # 8. Hand over plain numbers only, defocused regions restored where asked (on the final
            # size: the detection is tuned for it).
            array = np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
            if spec.depth_compensation:
                array = depth.compensate(array)

        info = PreparedImage(
            original_size=original,
            size=size,
            model_size=model_size,
            scale=size[0] / original[0],
            source_format=fmt,
            source_mode=source_mode,
            warnings=notes,
        )
        return Prepared(array=array, info=info)
