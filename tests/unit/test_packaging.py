"""ZIP and PSD packaging of RGBA layers: entries, pixels, order, composite, names, determinism."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage

from deployments.packaging import composite, layer_names, psd_layers, zip_layers


def make_layers(count=3, size=(40, 24), seed=0) -> np.ndarray:
    """Random RGBA layers covering the cases that break writers: an opaque bottom layer, a fully
    transparent layer (with colour under the zero alpha), a layer transparent only in a band (so a
    writer that crops to the non-transparent box would shift it) and random alpha elsewhere."""
    rng = np.random.default_rng(seed)
    width, height = size
    layers = rng.integers(0, 256, (count, height, width, 4), dtype=np.uint8)
    layers[0, ..., 3] = 255
    if count > 1:
        layers[1, ..., 3] = 0
    if count > 2:
        layers[2, :, : width // 2, 3] = 0
    return layers


def read_zip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def png_array(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGBA"
    return np.asarray(image)


def psd_layer_arrays(data: bytes) -> tuple[list[str], list[np.ndarray], tuple[int, int]]:
    """Names and pixels of every layer as psd-tools reads them, placed on the canvas (psd-tools
    reports a layer at its own bounding box, which a writer may crop to the visible pixels)."""
    document = PSDImage.open(io.BytesIO(data))
    width, height = document.size
    names, arrays = [], []
    for layer in document:  # bottom first
        assert layer.kind == "pixel" and layer.visible and layer.opacity == 255
        assert not layer.has_mask()  # transparency is the layer's own alpha, not a mask
        canvas = np.zeros((height, width, 4), np.uint8)
        left, top, right, bottom = layer.bbox
        if right > left and bottom > top:
            pixels = layer.topil()
            assert pixels.mode == "RGBA"
            canvas[top:bottom, left:right] = np.asarray(pixels)
        names.append(layer.name)
        arrays.append(canvas)
    return names, arrays, (width, height)


def test_zip_has_exactly_the_entries_and_the_layer_pixels() -> None:
    layers = make_layers(3)
    entries = read_zip(zip_layers(layers, {"seed": 7, "steps": 2}))
    assert sorted(entries) == ["composite.png", "layer_00.png", "layer_01.png", "layer_02.png", "manifest.json"]
    for index in range(3):
        pixels = png_array(entries[f"layer_{index:02d}.png"])
        assert pixels.shape == (24, 40, 4)
        assert np.array_equal(pixels, layers[index])  # colour under zero alpha included


def test_zip_composite_is_the_layers_stacked_bottom_first() -> None:
    layers = np.zeros((3, 2, 2, 4), np.uint8)
    layers[0] = (200, 0, 0, 255)  # opaque red background
    layers[1, 0, 0] = (0, 0, 255, 128)  # half-transparent blue over one pixel
    layers[2, 1, 1] = (0, 255, 0, 255)  # opaque green on top of another
    stacked = png_array(read_zip(zip_layers(layers, {}))["composite.png"])
    assert np.array_equal(stacked, composite(layers))
    assert tuple(stacked[0, 1]) == (200, 0, 0, 255)  # only the background there
    assert tuple(stacked[1, 1]) == (0, 255, 0, 255)  # the top layer wins where it is opaque
    red, green, blue, alpha = (int(v) for v in stacked[0, 0])
    assert alpha == 255 and green == 0 and abs(red - 100) <= 1 and abs(blue - 128) <= 1  # ~50 % blend

    random_layers = make_layers(4, seed=3)
    expected = Image.new("RGBA", (40, 24), (0, 0, 0, 0))
    for layer in random_layers:
        expected = Image.alpha_composite(expected, Image.fromarray(layer, "RGBA"))
    got = png_array(read_zip(zip_layers(random_layers, {}))["composite.png"])
    assert np.array_equal(got, np.asarray(expected))


def test_zip_manifest_keeps_the_callers_fields_and_lists_the_layers() -> None:
    layers = make_layers(2, size=(32, 16))
    given = {"seed": 5, "prompt": "ein Bild – 画像", "timings_s": {"denoise": 1.5}, "size": "90x60"}
    manifest = json.loads(read_zip(zip_layers(layers, given))["manifest.json"])
    for key, value in given.items():
        assert manifest[key] == value
    assert manifest["order"] == "bottom_to_top"
    assert manifest["layer_size"] == [32, 16]
    assert manifest["composite"] == "composite.png"
    assert manifest["layers"] == [
        {"index": 0, "name": "layer_00", "file": "layer_00.png"},
        {"index": 1, "name": "layer_01", "file": "layer_01.png"},
    ]


def test_zip_bytes_are_deterministic_and_follow_the_input() -> None:
    layers = make_layers(3)
    first = zip_layers(layers, {"seed": 1, "b": 2, "a": 1})
    assert zip_layers(layers.copy(), {"a": 1, "seed": 1, "b": 2}) == first  # dict order does not matter
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    changed = layers.copy()
    changed[1, 0, 0, 3] = 1
    assert zip_layers(changed, {"seed": 1, "b": 2, "a": 1}) != first


def test_psd_opens_with_named_layers_equal_to_the_zip_layers() -> None:
    layers = make_layers(3)
    names = ["background", "Ebene ü", "前景"]
    read_names, arrays, size = psd_layer_arrays(psd_layers(layers, names))
    assert size == (40, 24)
    assert read_names == names  # bottom first, Unicode kept
    zipped = read_zip(zip_layers(layers, {}))
    for index, array in enumerate(arrays):
        assert np.array_equal(array, png_array(zipped[f"layer_{index:02d}.png"])), index


@pytest.mark.parametrize("alpha", [0, 255])
def test_psd_and_zip_round_trip_fully_transparent_and_fully_opaque_layers(alpha: int) -> None:
    layers = make_layers(2, seed=11)
    layers[..., 3] = alpha
    _, arrays, _ = psd_layer_arrays(psd_layers(layers, layer_names(2)))
    entries = read_zip(zip_layers(layers, {}))
    for index in range(2):
        assert np.array_equal(png_array(entries[f"layer_{index:02d}.png"]), layers[index])
        if alpha == 255:
            assert np.array_equal(arrays[index], layers[index])
        else:  # nothing visible: alpha must stay zero everywhere (colour there is not shown)
            assert not arrays[index][..., 3].any()


def test_psd_bytes_are_deterministic() -> None:
    layers = make_layers(3, seed=4)
    assert psd_layers(layers, layer_names(3)) == psd_layers(layers.copy(), layer_names(3))


def test_psd_merged_image_is_the_composite_with_its_transparency() -> None:
    layers = make_layers(3, seed=2)
    layers[0, ..., 3] = 0  # nothing opaque at the bottom: the composite has transparent pixels
    layers[1:, :4, :4, 3] = 0
    document = PSDImage.open(io.BytesIO(psd_layers(layers, layer_names(3))))
    merged = document.topil()  # the stored merged image, what previews and layer-less readers show
    assert merged.mode == "RGBA"
    merged_pixels = np.asarray(merged).astype(int)
    expected = composite(layers).astype(int)
    assert np.abs(merged_pixels[..., 3] - expected[..., 3]).max() <= 1
    assert not merged_pixels[:4, :4, 3].any()
    visible = expected[..., 3] >= 64  # colour is stored matted with white: exact only up to rounding
    assert np.abs(merged_pixels[visible][:, :3] - expected[visible][:, :3]).max() <= 4


def test_layer_names_sort_in_stack_order() -> None:
    assert layer_names(3) == ["layer_00", "layer_01", "layer_02"]
    names = layer_names(120)
    assert names[0] == "layer_000" and names == sorted(names)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((2, 4, 4, 4), np.float32),
     np.zeros((0, 4, 4, 4), np.uint8)],
)
def test_bad_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="layers"):
        zip_layers(bad, {})
    with pytest.raises(ValueError, match="layers"):
        psd_layers(bad, layer_names(max(1, len(bad))))


def test_psd_needs_one_usable_name_per_layer() -> None:
    layers = make_layers(2)
    with pytest.raises(ValueError, match="one name per layer"):
        psd_layers(layers, ["only one"])
    with pytest.raises(ValueError, match="non-blank"):
        psd_layers(layers, ["a", " "])
    with pytest.raises(ValueError, match="255"):
        psd_layers(layers, ["a", "x" * 256])
