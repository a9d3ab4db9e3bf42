"""Postprocess deployment: encodes a model's array into the bytes a client downloads, on CPU.

Brings the array back to the size preprocess promised (undoing the alignment to the model's
multiple), encodes PNG / WebP / JPEG and embeds the parameters that were used (PNG text chunk
`imgserve`, JSON; EXIF ImageDescription for WebP/JPEG). A stack of RGBA layers (N, H, W, 4) is
packaged instead, as ZIP or PSD (`deployments.packaging`), at the size the model made it. Knows
nothing about HTTP or diffusion: it returns bytes, a media type and a metadata dict; the ingress
turns those into a response.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Literal

import numpy as np
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict

from deployments import imagememory, metrics, packaging
from deployments.errors import InvalidParameter
from deployments.records import Generated
from deployments.validation import between

ImageFormat = Literal["png", "webp", "jpeg"]
IMAGE_FORMATS: tuple[str, ...] = ("png", "webp", "jpeg")
LAYER_FORMATS: tuple[str, ...] = ("zip", "psd")
_IMAGE_MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
MEDIA_TYPES: dict[str, str] = {**_IMAGE_MEDIA_TYPES, **packaging.MEDIA_TYPES}
"""Every output format (IMAGE_FORMATS, LAYER_FORMATS) → the media type of its bytes."""
_EXIF_IMAGE_DESCRIPTION = 0x010E
METADATA_KEY = "imgserve"


class PostprocessConfig(BaseModel):
    """Encoding settings of the Postprocess deployment."""

    model_config = ConfigDict(extra="forbid")

    png_compress_level: int = 6
    """zlib level for PNG (0 fastest/largest … 9 slowest/smallest)."""
    jpeg_quality: int = 92
    """Quality for JPEG output (1–100)."""
    webp_quality: int = 90
    """Quality for lossy WebP output (1–100)."""

    _level = between(0, 9, "png_compress_level")
    _quality = between(1, 100, "jpeg_quality", "webp_quality")


@dataclass
class Encoded:
    """One encoded result: the body, its media type and the metadata that was embedded."""

    data: bytes
    media_type: str
    metadata: dict[str, Any]
    """The parameters embedded in the result."""
    served: dict[str, Any] = field(default_factory=dict)
    """`Generated.served`, passed through (not embedded)."""


def result_metadata(generated: Generated) -> dict[str, Any]:
    """The parameters echoed to the client: what the model used plus what preprocess did."""
    info = generated.info
    return {
        **generated.params,
        "size": f"{info.size[0]}x{info.size[1]}",
        "original_size": f"{info.original_size[0]}x{info.original_size[1]}",
        "scale": round(info.scale, 6),
    }


class Postprocess:
    """Plain class: `encode(generated, fmt)` → `Encoded`. Stateless apart from its config."""

    def __init__(self, config: PostprocessConfig | None = None) -> None:
        self.config = config or PostprocessConfig()
        imagememory.keep_freed_blocks()

    def encode(self, generated: Generated, fmt: str = "png") -> Encoded:
        """Encode (or package layers); the time is the `postprocess` stage in the metrics."""
        started = time.perf_counter()
        encoded = self._encode(generated, fmt)
        metrics.stage_seconds.observe(time.perf_counter() - started,
                                      tags={"task": generated.params.get("task", "unknown"), "stage": "postprocess"})
        return encoded

    def _encode(self, generated: Generated, fmt: str) -> Encoded:
        if generated.array.ndim == 4:
            return self.package_layers(generated, fmt)
        # 1. validate
        if fmt not in IMAGE_FORMATS:
            raise InvalidParameter(f"unknown format {fmt!r}; allowed: {', '.join(IMAGE_FORMATS)}", "format")
        # 2. undo the alignment: the client gets the size preprocess promised
        image = Image.fromarray(np.ascontiguousarray(generated.array))
        if image.size != tuple(generated.info.size):
            image = image.resize(tuple(generated.info.size), Image.Resampling.LANCZOS)
        if fmt == "jpeg" and image.mode != "RGB":
            image = image.convert("RGB")
        # 3. encode with the parameters embedded
        metadata = result_metadata(generated)
        text = json.dumps(metadata, sort_keys=True, ensure_ascii=False)
        buffer = BytesIO()
        if fmt == "png":
            chunks = PngImagePlugin.PngInfo()
            chunks.add_itxt(METADATA_KEY, text)
            image.save(buffer, "PNG", pnginfo=chunks, compress_level=self.config.png_compress_level)
        else:
            exif = Image.Exif()
            exif[_EXIF_IMAGE_DESCRIPTION] = text
            quality = self.config.jpeg_quality if fmt == "jpeg" else self.config.webp_quality
            image.save(buffer, fmt.upper(), quality=quality, exif=exif)
        # 4. package
        return Encoded(data=buffer.getvalue(), media_type=MEDIA_TYPES[fmt], metadata=metadata, served=generated.served)

    def package_layers(self, generated: Generated, fmt: str = "zip") -> Encoded:
        """RGBA layers (N, H, W, 4) → a ZIP (layer PNGs, composite, manifest) or a layered PSD."""
        # 1. validate
        if fmt not in LAYER_FORMATS:
            raise InvalidParameter(f"unknown format {fmt!r}; allowed: {', '.join(LAYER_FORMATS)}", "format")
        # 2. package (layers stay at the model's bucket size: they are new pictures, not the upload)
        metadata = result_metadata(generated)
        if fmt == "zip":
            manifest = {**metadata, "timings_s": generated.served.get("timings_s", {})}
            data = packaging.zip_layers(generated.array, manifest, png_compress_level=self.config.png_compress_level)
        else:
            data = packaging.psd_layers(generated.array, packaging.layer_names(len(generated.array)))
        return Encoded(data=data, media_type=MEDIA_TYPES[fmt], metadata=metadata, served=generated.served)
