"""Depth-of-field compensation without Ray: the sample photos (tests/data/samples) with a synthetic
depth-of-field blur on their top half, plus small synthetic images built in memory."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from deployments.depth import compensate, defocus_mask, region_sharpness, sharpness
from tests.conftest import sample_path
from tests.defocus import at_1024, with_background_blur

PHOTOS = ["photo_1.jpg", "photo_2.jpg", "photo_3.jpg"]


def photo(name: str) -> Image.Image:
    """A sample photo as Preprocess hands it over: oriented, RGB, 1024 px long edge."""
    return at_1024(sample_path(name))


def background(array: np.ndarray) -> tuple[int, int, int, int]:
    """The top 40 %: blurred, away from the transition at the middle."""
    return 0, 0, array.shape[1], int(array.shape[0] * 0.4)


def foreground_rows(array: np.ndarray) -> slice:
    """The bottom 40 %: sharp, away from the transition at the middle."""
    return slice(int(array.shape[0] * 0.6), None)


@pytest.fixture(scope="module")
def blurred() -> np.ndarray:
    return with_background_blur(photo("photo_1.jpg"), 3)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize(("sigma", "gain"), [(3, 1.8), (5, 1.4)])
def test_defocused_background_gets_sharper(name: str, sigma: float, gain: float) -> None:
    # Measured ratios: 2.26-2.34 at sigma 3 and 1.78-1.83 at sigma 5 on the three photos. 1.8 at
    # sigma 3 is about the difference between a sigma-3 and a sigma-2.5 blur of the same photo (the
    # Laplacian RMS grows 1.3-1.4x from 3 to 2.5 and 2x from 3 to 2): clearly crisper edges, far
    # from the original (whose RMS is 15-50x the blurred one: what is lost is not invented back).
    array = with_background_blur(photo(name), sigma)
    box = background(array)
    before, after = region_sharpness(array, box), region_sharpness(compensate(array), box)
    assert after >= gain * before, f"{name}: background sharpness {before:.2f} -> {after:.2f}, wanted x{gain}"


def test_sharp_foreground_is_left_alone(blurred: np.ndarray) -> None:
    rows = foreground_rows(blurred)
    diff = np.abs(compensate(blurred)[rows].astype(int) - blurred[rows])
    assert diff.mean() <= 0.25 and diff.max() <= 4, (diff.mean(), diff.max())


@pytest.mark.parametrize("name", PHOTOS)
def test_sharp_photo_barely_changes(name: str) -> None:
    # photo_3 is a soft video still: a little of it reads as defocused, which is allowed here.
    array = np.asarray(photo(name))
    diff = np.abs(compensate(array).astype(int) - array)
    assert diff.mean() <= 0.25, diff.mean()
    assert (diff.max(axis=-1) > 2).mean() <= 0.005, "more than 0.5 % of pixels moved by over 2 gray levels"


def test_sharp_flat_shaded_art_unchanged() -> None:
    # Anime-style art: flat fills and crisp outlines. Its flat areas have no detail to restore and
    # its edges are sharp, so nothing may move, or every piece of clean line art would be altered.
    art = Image.new("RGB", (800, 600), (240, 230, 220))
    draw = ImageDraw.Draw(art)
    rng = np.random.default_rng(1)
    for _ in range(40):
        x, y, size = (int(v) for v in rng.integers(0, [700, 500, 200], 3))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x, y, x + size + 20, y + size + 20], fill=fill, outline=(20, 20, 20), width=3)
    array = np.asarray(art)
    assert np.array_equal(compensate(array), array)
    soft = np.asarray(art.filter(ImageFilter.GaussianBlur(3)))  # the same art out of focus: restored
    assert region_sharpness(compensate(soft), (0, 0, 800, 600)) >= 1.8 * region_sharpness(soft, (0, 0, 800, 600))


def test_mask_marks_the_blurred_half_only(blurred: np.ndarray) -> None:
    mask = defocus_mask(blurred)
    assert mask.shape == blurred.shape[:2] and mask.dtype == np.float32
    assert mask.min() >= 0 and mask.max() <= 1
    assert mask[: int(blurred.shape[0] * 0.4)].mean() >= 0.5  # the rest of the top is flat sky
    assert mask[foreground_rows(blurred)].mean() <= 0.01


def test_sharpness_map_tells_blurred_from_sharp(blurred: np.ndarray) -> None:
    measure = sharpness(blurred)
    assert measure.shape == blurred.shape[:2] and measure.dtype == np.float32
    top = int(blurred.shape[0] * 0.4)
    assert np.median(measure[foreground_rows(blurred)]) >= 10 * np.median(measure[:top])


def test_blurred_edge_gets_steeper_without_halo() -> None:
    step = np.zeros((200, 200, 3), np.uint8)
    step[:, :100], step[:, 100:] = 40, 200
    soft = np.asarray(Image.fromarray(step).filter(ImageFilter.GaussianBlur(3)))
    out = compensate(soft)
    slope = lambda a: np.abs(np.diff(a[..., 0].astype(int), axis=1)).max()  # noqa: E731
    assert slope(out) >= 1.2 * slope(soft), (slope(soft), slope(out))
    # No ring: nothing darker than the dark side or brighter than the bright side, beyond 1 level.
    assert out.min() >= 39 and out.max() <= 201, (out.min(), out.max())


def test_colour_is_kept(blurred: np.ndarray) -> None:
    out = compensate(blurred).astype(int)
    assert np.abs(out - blurred).max() > 10  # it did change things
    unclipped = ((out > 0) & (out < 255)).all(axis=-1)
    source = blurred.astype(int)
    for a, b in ((0, 1), (1, 2)):
        assert np.array_equal((out[..., a] - out[..., b])[unclipped], (source[..., a] - source[..., b])[unclipped])


def test_alpha_passes_through(blurred: np.ndarray) -> None:
    alpha = np.random.default_rng(0).integers(0, 256, blurred.shape[:2], dtype=np.uint8)
    rgba = np.ascontiguousarray(np.dstack([blurred, alpha]))
    out = compensate(rgba)
    assert out.shape == rgba.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 3], alpha)
    assert np.array_equal(out[..., :3], compensate(blurred))  # alpha does not steer the colour


@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (1, 500, 3), (500, 1, 4), (3, 3, 3), (15, 40, 4), (16, 16, 3), (17, 33, 4), (31, 700, 3)]
)
def test_any_size(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    array[..., :3] = np.asarray(Image.fromarray(array[..., :3]).filter(ImageFilter.GaussianBlur(2)))
    before = array.copy()
    out = compensate(array)
    assert out.shape == shape and out.dtype == np.uint8 and out.flags.c_contiguous
    assert not np.shares_memory(out, array) and np.array_equal(array, before)  # a new array; input kept
    assert sharpness(array).shape == shape[:2]
    if min(shape[:2]) < 16:
        assert np.array_equal(out, array)  # too small to tell blur from detail: unchanged


@pytest.mark.parametrize("value", [0, 128, 255])
def test_flat_image_unchanged(value: int) -> None:
    flat = np.full((300, 400, 3), value, np.uint8)
    assert np.array_equal(compensate(flat), flat)


def test_smooth_gradient_unchanged() -> None:
    ramp = np.linspace(0, 255, 1024).round().astype(np.uint8)
    sky = np.ascontiguousarray(np.broadcast_to(ramp[:, None, None], (1024, 600, 3)))
    assert np.array_equal(compensate(sky), sky)


def test_deterministic(blurred: np.ndarray) -> None:
    first = compensate(blurred)
    assert compensate(blurred.copy()).tobytes() == first.tobytes()


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 2), np.uint8), np.zeros((8, 8, 3), np.float32)]
)
def test_refuses_what_is_not_an_image_array(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        compensate(bad)


def test_preprocess_compensates_only_when_the_request_asks(blurred: np.ndarray) -> None:
    from io import BytesIO

    from deployments.preprocess import Preprocess, PreprocessConfig
    from deployments.records import ImageSpec

    buffer = BytesIO()
    Image.fromarray(blurred).save(buffer, "PNG")
    prepare = Preprocess(PreprocessConfig(max_long_edge=max(blurred.shape))).prepare
    plain = prepare(buffer.getvalue(), ImageSpec(multiple=1)).array
    restored = prepare(buffer.getvalue(), ImageSpec(multiple=1, depth_compensation=True)).array
    assert np.array_equal(plain, blurred)  # off by default: the upload's pixels
    assert np.array_equal(restored, compensate(blurred))  # on: exactly the compensation, on the final size
    box = background(blurred)
    assert region_sharpness(restored, box) > 1.8 * region_sharpness(plain, box)
