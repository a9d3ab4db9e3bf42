"""Packaging of RGBA layers into files designers open directly: a ZIP of PNGs and a layered PSD.

Pure functions on numpy arrays, no Ray and no model: the `layers` task's postprocess calls them.
Input everywhere is one uint8 array of shape (N, H, W, 4): straight (not premultiplied) RGBA
layers, **index 0 at the bottom**, each later layer stacked over the ones before. That is the order
Qwen-Image-Layered returns them in (the reference app stacks them into a slide in list order, first
picture first, i.e. at the back), and the order both packages keep:

- ZIP (`zip_layers`): `layer_00.png … layer_NN.png` (RGBA PNG, bottom first), `composite.png`
  (the layers alpha-composited in order over a transparent canvas, as a viewer shows them) and
  `manifest.json` (the caller's manifest plus the file list, order and size written here);
  `zip_layer_pngs` reads the layer PNGs back, bottom first (the OpenAI-style route's data items).
  The bytes depend only on the input: entries are written in sorted name order with a fixed date
  (1980-01-01, the earliest a ZIP can hold), fixed permissions and a fixed compression per entry
  (PNGs are stored, as they are already deflated; the manifest is deflated), PNGs carry no time
  chunk, and the manifest is JSON with sorted keys.
- PSD (`psd_layers`): one RGB document with transparency, 8 bits per channel, with one named pixel layer per
  input layer (first layer at the bottom of the layer stack, as in the ZIP), each covering the
  whole canvas and carrying its alpha as the layer's transparency channel (not as a mask), RLE
  compressed (the compression every PSD reader supports). The merged image stored for previews
  and readers that ignore layers is the composite with its transparency, in Photoshop's own
  convention (negative layer count, colour matted with white). Written with psd-tools (no hand-written bytes);
  deterministic for the same input.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
from PIL import Image

#: The packages `layers` results come in, and their media types.
LAYER_FORMATS: tuple[str, ...] = ("zip", "psd")
MEDIA_TYPES = {"zip": "application/zip", "psd": "image/vnd.adobe.photoshop"}
#: Fixed timestamp of every ZIP entry, so the same layers give the same bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
COMPOSITE_NAME = "composite.png"
MANIFEST_NAME = "manifest.json"
#: Written into the manifest: how to read the layer order.
ORDER = "bottom_to_top"
#: Keys of the manifest that `zip_layers` writes itself (from the layers), overriding the caller's.
MANIFEST_KEYS = ("order", "layer_size", "layers", "composite")
_MAX_PSD_NAME = 255  # psd-tools' limit (a layer name's Pascal string holds at most 255 bytes)


def check_layers(layers: np.ndarray) -> np.ndarray:
    """Return `layers` if it is a non-empty uint8 (N, H, W, 4) array; raise ValueError otherwise."""
    if not isinstance(layers, np.ndarray) or layers.dtype != np.uint8 or layers.ndim != 4 or layers.shape[3] != 4:
        got = f"{getattr(layers, 'dtype', type(layers))} {getattr(layers, 'shape', '')}"
        raise ValueError(f"layers must be a uint8 array of shape (N, H, W, 4), got {got}")
    if 0 in layers.shape:
        raise ValueError(f"layers must not be empty, got shape {layers.shape}")
    return layers


def layer_names(count: int) -> list[str]:
    """`layer_00`, `layer_01`, …: zero-padded to at least two digits, so names sort in stack order."""
    width = max(2, len(str(count - 1)))
    return [f"layer_{i:0{width}d}" for i in range(count)]


def composite(layers: np.ndarray) -> np.ndarray:
    """The layers alpha-composited in order (index 0 at the bottom) over a transparent canvas:
    uint8 (H, W, 4), what an editor shows with every layer visible at full opacity."""
    layers = check_layers(layers)
    height, width = layers.shape[1:3]
    result = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    for layer in layers:
        result = Image.alpha_composite(result, Image.fromarray(np.ascontiguousarray(layer), "RGBA"))
    return np.asarray(result)


def _png(array: np.ndarray, compress_level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), "RGBA").save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


def zip_layers(layers: np.ndarray, manifest: dict[str, Any], png_compress_level: int = 6) -> bytes:
    """ZIP of `layer_00.png … layer_NN.png`, `composite.png` and `manifest.json`.

    `manifest` holds what the caller knows (parameters, seed, input size, timings); JSON-able.
    The keys in `MANIFEST_KEYS` are written here from the layers: `order` (`bottom_to_top`),
    `layer_size` ([width, height] of every layer), `layers` (one `{"index", "name", "file"}` per
    layer, bottom first) and `composite` (its file name). Same input → same bytes.
    """
    layers = check_layers(layers)
    if not 0 <= png_compress_level <= 9:
        raise ValueError(f"png_compress_level must be in 0..9, got {png_compress_level}")
    count, height, width = layers.shape[:3]
    names = layer_names(count)
    entries: dict[str, tuple[bytes, int]] = {}
    for index, name in enumerate(names):
        entries[f"{name}.png"] = (_png(layers[index], png_compress_level), zipfile.ZIP_STORED)
    entries[COMPOSITE_NAME] = (_png(composite(layers), png_compress_level), zipfile.ZIP_STORED)
    full_manifest = {
        **manifest,
        "order": ORDER,
        "layer_size": [width, height],
        "layers": [{"index": i, "name": name, "file": f"{name}.png"} for i, name in enumerate(names)],
        "composite": COMPOSITE_NAME,
    }
    text = json.dumps(full_manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    entries[MANIFEST_NAME] = (text.encode("utf-8"), zipfile.ZIP_DEFLATED)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(entries):
            data, compression = entries[name]
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.compress_type = compression
            info.external_attr = 0o644 << 16  # regular file, rw-r--r--
            info.create_system = 3  # Unix, whatever machine writes it
            archive.writestr(info, data, compress_type=compression, compresslevel=6 if compression else None)
    return buffer.getvalue()


def zip_layer_pngs(data: bytes) -> list[bytes]:
    """The layer PNGs of a ZIP written by `zip_layers`, bottom first (the manifest's order), as
    stored (no re-encoding); ValueError for bytes that are not such a ZIP."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            manifest = json.loads(archive.read(MANIFEST_NAME))
            return [archive.read(entry["file"]) for entry in manifest["layers"]]
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a ZIP of layers: {exc}") from None


def psd_layers(layers: np.ndarray, names: list[str]) -> bytes:
    """A layered Photoshop document: one pixel layer per input layer, named by `names`.

    RGB with transparency, 8 bits, canvas = the layers' size; `names[0]` names the bottom layer. Each layer covers
    the whole canvas with its alpha as transparency; colour under fully transparent pixels is kept
    as given. Opens in psd-tools, Photoshop, GIMP and Krita. Same input → same bytes.
    """
    from psd_tools import PSDImage
    from psd_tools.constants import Compression

    layers = check_layers(layers)
    count, height, width = layers.shape[:3]
    if len(names) != count:
        raise ValueError(f"need one name per layer: {count} layers, {len(names)} names")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"layer names must be non-blank strings, got {name!r}")
        if len(name) > _MAX_PSD_NAME:
            raise ValueError(f"layer names must be at most {_MAX_PSD_NAME} characters, got {len(name)}: {name[:40]!r}")
    # An RGBA document whose merged image carries the composite's transparency, as Photoshop writes
    # documents with transparent pixels: the layer count is stored negative ("the first alpha
    # channel of the merged image is its transparency") and the merged colour is matted with white.
    # psd-tools implements that convention (it keeps the flag for files it reads and mattes on
    # save) but has no public switch for a new document in 1.26, hence the attribute. Without it
    # the merged alpha channel is written as zeros (an invisible preview, and an extra "Alpha 1"
    # channel in Photoshop); an RGB document instead gets a preview without the layers' alpha.
    # Editors build the picture from the layers; the merged image is for previews and for readers
    # that ignore layers. tests/unit/test_packaging.py checks it reads back as the composite.
    document = PSDImage.new("RGBA", (width, height), color=(0, 0, 0, 0))
    document._merged_alpha = True
    for index, (layer, name) in enumerate(zip(layers, names)):
        created = document.create_pixel_layer_from_array(
            np.ascontiguousarray(layer), name=f"Layer {index}", compression=Compression.RLE
        )
        # The public setter writes the Unicode name block ('luni', what Photoshop reads) as well as
        # the legacy MacRoman Pascal name ('?' when the name has no MacRoman spelling); the name
        # given at creation is written only as the Pascal string, which cannot hold e.g. CJK.
        created.name = name
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


__all__ = [
    "COMPOSITE_NAME",
    "LAYER_FORMATS",
    "MEDIA_TYPES",
    "MANIFEST_KEYS",
    "MANIFEST_NAME",
    "ORDER",
    "ZIP_DATE_TIME",
    "check_layers",
    "composite",
    "layer_names",
    "psd_layers",
    "zip_layer_pngs",
    "zip_layers",
]
