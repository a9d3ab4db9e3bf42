"""Preprocess without Ray: every input is built in memory with Pillow, plus the sample photos (tests/data/samples)."""

from __future__ import annotations

import random
import struct
import zlib
from io import BytesIO

import numpy as np
import pytest
from PIL import Image, ImageOps
from pydantic import ValidationError

from deployments.errors import BadImage, ImgserveError, TooLarge, UnsupportedFormat
from deployments.preprocess import Preprocess, PreprocessConfig
from deployments.records import ImageSpec
from tests.conftest import sample_path

RGB = ImageSpec(multiple=1)
RGBA = ImageSpec(multiple=1, alpha=True)


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth, asymmetric content (so flips and rotations show) with a little noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin((x + 2 * y) / 40)], axis=-1)
    rgb += 4 * np.random.default_rng(seed).standard_normal(rgb.shape, dtype=np.float32)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG signature and IHDR claiming w x h (8-bit gray), then an IDAT of garbage, not zlib data."""
    return png(w, h, b"garbage, not zlib data")


def png(w: int, h: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def pre() -> Preprocess:
    return Preprocess()


# --- sizes -----------------------------------------------------------------------------------


def test_small_rgb_jpeg_passes_through_at_its_own_size(pre):
    im = picture(320, 240)
    out = pre.prepare(encode(im, "JPEG", quality=95), RGB)
    assert out.info.original_size == out.info.size == out.info.model_size == (320, 240)
    assert out.info.scale == 1.0
    assert (out.info.source_format, out.info.source_mode, out.info.warnings) == ("JPEG", "RGB", [])
    assert out.array.shape == (240, 320, 3) and out.array.dtype == np.uint8
    assert out.array.flags["C_CONTIGUOUS"]
    assert psnr(out.array, np.asarray(im)) > 35


@pytest.mark.parametrize(("w", "h", "expected"), [(4000, 3000, (1024, 768)), (1279, 867, (1024, 694)), (900, 2000, (461, 1024))])
def test_long_edge_is_downscaled_keeping_aspect(pre, w, h, expected):
    im = picture(w, h)
    out = pre.prepare(encode(im, "JPEG", quality=90), RGB)
    assert out.info.original_size == (w, h)
    assert out.info.size == out.info.model_size == expected
    assert out.array.shape == (expected[1], expected[0], 3)
    assert out.info.scale == pytest.approx(expected[0] / w)
    # Content is the picture, shrunk: compare with a plain full decode + LANCZOS.
    plain = Image.open(BytesIO(encode(im, "JPEG", quality=90))).resize(expected, Image.Resampling.LANCZOS)
    assert psnr(out.array, np.asarray(plain)) > 35


def test_small_image_is_not_upscaled(pre):
    out = pre.prepare(encode(picture(300, 200), "PNG"), RGB)
    assert out.info.size == out.info.model_size == (300, 200)
    assert out.array.shape == (200, 300, 3)


@pytest.mark.parametrize(("multiple", "model_size"), [(16, (304, 208)), (32, (288, 192)), (64, (320, 192))])
def test_model_size_is_aligned_to_the_spec_multiple(pre, multiple, model_size):
    out = pre.prepare(encode(picture(300, 200), "PNG"), ImageSpec(multiple=multiple))
    assert out.info.size == (300, 200)  # what the result is returned at
    assert out.info.model_size == model_size
    assert all(side % multiple == 0 for side in out.info.model_size)
    assert out.array.shape == (model_size[1], model_size[0], 3)


@pytest.mark.parametrize(("w", "h", "fit", "expected"), [
    (1279, 867, (512, 512), (512, 347)),    # the width limits
    (900, 2000, (512, 512), (230, 512)),    # the height limits
    (1000, 500, (300, 400), (300, 150)),    # a box of another aspect: the tighter side limits, aspect kept
    (1000, 500, (900, 100), (200, 100)),
    (4000, 3000, (2048, 2048), (1024, 768)),  # the long-edge limit still applies (a box beyond it changes nothing)
    (300, 200, (512, 512), (300, 200)),     # never enlarged
    (300, 200, (300, 200), (300, 200)),     # exactly the box: unchanged
])
def test_a_requested_size_fits_the_result_inside_it_keeping_aspect(pre, w, h, fit, expected):
    im = picture(w, h)
    out = pre.prepare(encode(im, "PNG"), ImageSpec(multiple=1, fit=fit))
    assert out.info.original_size == (w, h) and out.info.size == expected
    assert out.info.size[0] <= fit[0] and out.info.size[1] <= fit[1]
    assert abs(out.info.size[0] / out.info.size[1] - w / h) < 2 / min(expected)  # aspect kept to the pixel
    assert out.info.scale == pytest.approx(expected[0] / w)
    plain = im.resize(expected, Image.Resampling.LANCZOS)  # one resize, straight to the size
    assert psnr(out.array, np.asarray(plain)) > 35


def test_a_requested_size_is_aligned_like_any_other(pre):
    out = pre.prepare(encode(picture(1279, 867), "JPEG", quality=90), ImageSpec(multiple=16, fit=(400, 400)))
    assert out.info.size == (400, 271) and out.info.model_size == (400, 272)
    # without a size, the same upload and spec come out as before (the long-edge limit only)
    assert pre.prepare(encode(picture(1279, 867), "JPEG", quality=90), ImageSpec(multiple=16)).info.size == (1024, 694)


def test_a_requested_size_applies_to_the_oriented_image(pre):
    im = picture(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (200 x 400)
    out = pre.prepare(encode(im, "JPEG", quality=95, exif=exif.tobytes()), ImageSpec(multiple=1, fit=(100, 100)))
    assert out.info.original_size == (200, 400) and out.info.size == (50, 100)
    assert out.array.shape == (100, 50, 3)


def test_tiny_image_is_aligned_up_to_one_multiple(pre):
    out = pre.prepare(encode(picture(5, 3), "PNG"), ImageSpec(multiple=16))
    assert out.info.size == (5, 3) and out.info.model_size == (16, 16)
    assert out.array.shape == (16, 16, 3)


# --- EXIF orientation ------------------------------------------------------------------------


def with_orientation(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", [6, 8])
def test_rotating_orientations_swap_width_and_height(pre, orientation):
    data = with_orientation(picture(2048, 1024), "JPEG", orientation)
    out = pre.prepare(data, ImageSpec(multiple=16))
    assert out.info.original_size == (1024, 2048)
    assert out.info.size == out.info.model_size == (512, 1024)
    assert out.array.shape == (1024, 512, 3)
    reference = ImageOps.exif_transpose(Image.open(BytesIO(data))).resize((512, 1024), Image.Resampling.LANCZOS)
    assert psnr(out.array, np.asarray(reference)) > 35


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])  # Pillow orients TIFF itself: never twice
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_exif_transpose(pre, fmt, orientation):
    data = with_orientation(picture(64, 48), fmt, orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(BytesIO(data))).convert("RGB"))
    out = pre.prepare(data, ImageSpec(multiple=16))  # 64x48 is aligned either way: no resize
    np.testing.assert_array_equal(out.array, expected)


# --- modes -----------------------------------------------------------------------------------


def half_transparent_rgba() -> Image.Image:
    a = np.zeros((32, 64, 4), np.uint8)  # left half transparent black, right half opaque red
    a[:, 32:] = (200, 0, 0, 255)
    return Image.fromarray(a)


def test_transparent_region_becomes_white_in_rgb(pre):
    out = pre.prepare(encode(half_transparent_rgba(), "PNG"), RGB)
    assert out.array.shape == (32, 64, 3)
    assert (out.array[:, :32] == 255).all()
    assert (out.array[:, 32:] == (200, 0, 0)).all()
    assert out.info.source_mode == "RGBA"
    assert any("white" in w for w in out.info.warnings)


def test_transparency_is_kept_when_the_spec_wants_alpha(pre):
    out = pre.prepare(encode(half_transparent_rgba(), "PNG"), RGBA)
    assert out.array.shape == (32, 64, 4)
    assert (out.array[:, :32, 3] == 0).all()
    assert (out.array[:, 32:] == (200, 0, 0, 255)).all()
    assert out.info.warnings == []


def test_transparent_edge_does_not_bleed_dark_when_downscaled(pre):
    # Transparent pixels are black (0,0,0,0); a resize without premultiplied alpha would put a
    # dark seam along the edge of the opaque half after flattening.
    big = half_transparent_rgba().resize((2048, 1024), Image.Resampling.NEAREST)
    out = pre.prepare(encode(big, "PNG"), RGB)
    assert out.info.size == (1024, 512)
    # Over white, every pixel of the edge mixes red (200, 0, 0) with white: red never drops below 200.
    assert out.array[:, 500:524, 0].min() >= 198


def test_opaque_rgba_gives_no_warning(pre):
    a = np.full((16, 16, 4), 255, np.uint8)
    out = pre.prepare(encode(Image.fromarray(a), "PNG"), RGB)
    assert out.info.warnings == [] and (out.array == 255).all()


def test_rgb_upload_gets_an_opaque_alpha_when_the_spec_wants_alpha(pre):
    out = pre.prepare(encode(picture(32, 32), "PNG"), RGBA)
    assert out.array.shape == (32, 32, 4) and (out.array[..., 3] == 255).all()


def test_la_transparency_becomes_white(pre):
    a = np.zeros((16, 32, 2), np.uint8)
    a[..., 0] = 100
    a[:, 16:, 1] = 255
    out = pre.prepare(encode(Image.fromarray(a, "LA"), "PNG"), RGB)
    assert out.info.source_mode == "LA"
    assert (out.array[:, :16] == 255).all() and (out.array[:, 16:] == 100).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(pre, fmt):
    im = Image.new("P", (32, 16), 1)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(0, (0, 0, 16, 16))  # index 0 is the transparent one
    out = pre.prepare(encode(im, fmt, transparency=0), RGB)
    assert out.info.source_mode == "P"
    assert (out.array[:, :16] == 255).all() and (out.array[:, 16:] == (0, 0, 255)).all()
    assert any("white" in w for w in out.info.warnings)


def test_palette_without_transparency_is_plain_rgb(pre):
    im = Image.new("P", (16, 16), 0)
    im.putpalette([10, 200, 30] + [0] * 765)
    out = pre.prepare(encode(im, "PNG"), RGB)
    assert (out.array == (10, 200, 30)).all() and out.info.warnings == []


def test_cmyk_jpeg_becomes_rgb(pre):
    im = Image.new("CMYK", (32, 16), (0, 0, 0, 0))  # white
    im.paste((0, 255, 255, 0), (16, 0, 32, 16))  # red
    out = pre.prepare(encode(im, "JPEG", quality=95), RGB)
    assert out.info.source_mode == "CMYK" and out.array.shape == (16, 32, 3)
    assert np.abs(out.array[4:12, 2:12].astype(int) - 255).max() <= 8
    assert np.abs(out.array[4:12, 20:30].astype(int) - (255, 0, 0)).max() <= 8


def test_16_bit_png_spreads_over_the_8_bit_range(pre):
    a = np.repeat(np.array([[0, 257 * 10, 32768, 65535]], np.uint16), 4, axis=0)
    data = encode(Image.fromarray(a), "PNG")
    assert Image.open(BytesIO(data)).mode == "I;16"
    out = pre.prepare(data, RGB)
    assert out.info.source_mode == "I;16"
    assert out.array[0, :, 0].tolist() == [0, 10, 128, 255]
    assert (out.array[..., 0] == out.array[..., 2]).all()
    assert any("8 bits" in w for w in out.info.warnings)


def test_16_bit_gradient_is_not_clipped(pre):
    a = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    out = pre.prepare(encode(Image.fromarray(a), "PNG"), RGB)
    row = out.array[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert len(np.unique(row)) > 250  # a clip at 255 would leave most of the row saturated
    assert (np.diff(row) >= 0).all()


def test_grayscale_becomes_three_equal_channels(pre):
    im = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1)), "L")
    out = pre.prepare(encode(im, "PNG"), RGB)
    assert out.info.source_mode == "L" and out.array.shape == (4, 256, 3)
    assert (out.array == np.asarray(im)[..., None]).all()


def test_one_bit_image_is_black_and_white(pre):
    im = Image.new("1", (16, 8), 0)
    im.paste(1, (8, 0, 16, 8))
    out = pre.prepare(encode(im, "PNG"), RGB)
    assert out.info.source_mode == "1"
    assert (out.array[:, :8] == 0).all() and (out.array[:, 8:] == 255).all()


def test_animated_gif_uses_the_first_frame_and_says_so(pre):
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    out = pre.prepare(data, RGB)
    assert (out.array == (255, 0, 0)).all()
    assert any("frames" in w and "first" in w for w in out.info.warnings)


def test_multi_picture_jpeg_from_a_camera_counts_as_jpeg(pre):
    data = encode(picture(64, 48), "MPO", save_all=True, append_images=[picture(32, 24, seed=1)])
    assert Image.open(BytesIO(data)).format == "MPO"
    out = pre.prepare(data, ImageSpec(multiple=16))
    assert out.info.source_format == "MPO" and out.array.shape == (48, 64, 3)


# --- refusals --------------------------------------------------------------------------------


def assert_refused(pre: Preprocess, data: bytes, error: type[ImgserveError], *words: str) -> None:
    with pytest.raises(error) as info:
        pre.prepare(data, RGB)
    assert info.value.field == "image"
    for word in words:
        assert word in info.value.message


def test_empty_upload_is_a_bad_image(pre):
    assert_refused(pre, b"", BadImage, "empty")


def test_random_bytes_are_a_bad_image(pre):
    assert_refused(pre, random.Random(0).randbytes(5000), BadImage)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_upload_is_a_bad_image(pre, fmt):
    data = encode(picture(256, 256), fmt)
    assert_refused(pre, data[: len(data) // 2], BadImage)


def test_over_the_byte_limit_is_too_large():
    data = encode(picture(64, 64), "PNG")
    assert_refused(Preprocess(PreprocessConfig(max_bytes=len(data) - 1)), data, TooLarge, str(len(data)))
    assert Preprocess(PreprocessConfig(max_bytes=len(data))).prepare(data, RGB).array.shape == (64, 64, 3)


def test_decompression_bomb_is_too_large(pre):
    # A real bomb: 8000 x 6000 black pixels (48 MB decoded) in a ~50 kB PNG, under Pillow's limit.
    data = png(8000, 6000, zlib.compress((b"\x00" + bytes(8000)) * 6000, 9))
    assert Image.open(BytesIO(data)).size == (8000, 6000)
    assert len(data) < 100_000
    assert_refused(pre, data, TooLarge, "8000x6000")


def test_pixel_limit_is_checked_before_any_pixel_is_decoded(pre):
    # The pixel data is garbage: decoding it would give BadImage, the header check gives TooLarge.
    assert_refused(pre, png_header_only(8000, 6000), TooLarge, "8000x6000")
    assert_refused(Preprocess(PreprocessConfig(max_pixels=99)), png_header_only(10, 10), TooLarge, "10x10")


@pytest.mark.parametrize("side", [10_000, 50_000])  # Pillow warns above 89 Mpx, raises above 179 Mpx
def test_pillows_own_bomb_guard_is_too_large_too(side):
    roomy = Preprocess(PreprocessConfig(max_pixels=10**10))
    assert_refused(roomy, png_header_only(side, side), TooLarge)


@pytest.mark.parametrize("fmt", ["PPM", "ICO"])
def test_format_outside_the_accepted_list_is_unsupported(pre, fmt):
    assert_refused(pre, encode(picture(32, 32), fmt), UnsupportedFormat, fmt)


def test_accepted_formats_come_from_the_config():
    only_png = Preprocess(PreprocessConfig(formats=["PNG"]))
    assert_refused(only_png, encode(picture(32, 32), "JPEG"), UnsupportedFormat, "JPEG")
    assert only_png.prepare(encode(picture(32, 32), "PNG"), RGB).info.source_format == "PNG"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_corrupted_bytes_never_raise_anything_but_an_imgserve_error(pre, fmt):
    data = bytearray(encode(picture(96, 64), fmt))
    rng = random.Random(fmt)
    for _ in range(25):
        broken = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            broken[rng.randrange(len(broken))] = rng.randrange(256)
        try:
            out = pre.prepare(bytes(broken), RGB)
        except ImgserveError as exc:
            assert exc.field == "image"
        else:
            assert out.array.dtype == np.uint8 and out.array.ndim == 3


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_bytes", 0),
        ("max_pixels", -5),
        ("max_long_edge", 0),
        ("max_long_edge", 8),
        ("formats", []),
        ("formats", ["JPG"]),
    ],
)
def test_bad_config_values_are_rejected_naming_field_and_value(field, value):
    with pytest.raises(ValidationError) as info:
        PreprocessConfig(**{field: value})
    message = str(info.value)
    assert field in message
    assert str(value) in message


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ValidationError, match="max_edge"):
        PreprocessConfig(max_edge=512)


# --- real photos -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["photo_1.jpg", "photo_2.jpg", "photo_3.jpg"])
def test_sample_photo_comes_out_at_1024_correctly_oriented(pre, name):
    data = sample_path(name).read_bytes()
    raw = Image.open(BytesIO(data))
    rotated = raw.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    out = pre.prepare(data, ImageSpec(multiple=16))
    w, h = out.info.size
    assert max(w, h) == 1024
    assert (w > h) == ((raw.height > raw.width) if rotated else (raw.width > raw.height))
    reference = ImageOps.exif_transpose(raw).convert("RGB").resize(out.info.model_size, Image.Resampling.LANCZOS)
    assert psnr(out.array, np.asarray(reference)) > 35
