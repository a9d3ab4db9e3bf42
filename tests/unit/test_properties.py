"""Property-based tests (hypothesis): preprocess and request validation, for any input.

- Preprocess: any size, mode, EXIF orientation and container format → an array aligned to the
  spec's multiple, the long edge within the limit, the aspect kept within rounding; random or
  mangled bytes → only `BadImage`, `UnsupportedFormat` or `TooLarge`, never another exception.
- Validation: any dict of fields for any task → a resolved request within the documented limits
  (and stable when resolved again, as a job's retry does), or `InvalidParameter` naming one of the
  given fields; never another exception. The query-string parser: any bytes → pairs or 422.

Examples are derandomized (the same ones on every run, so CI cannot flake) and few enough that
the file runs in well under a minute.
"""

from __future__ import annotations

import math
from io import BytesIO
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from deployments.diffusion_config import MAX_SEED, MIN_STEPS
from deployments.errors import BadImage, ImgserveError, InvalidParameter, TooLarge, UnsupportedFormat
from deployments.lora import NONE
from deployments.preprocess import Preprocess, PreprocessConfig
from deployments.records import ImageSpec
from deployments.tasks import TASKS
from serve_app.forms import parse_query
from serve_app.orchestrator import Orchestrator
from tests.conftest import LORA_VERSIONS, resolving_orchestrator
from tests.hostile import png_from_rows


def examples(count: int) -> settings:
    return settings(max_examples=count, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])

IMAGE_ERRORS = (BadImage, UnsupportedFormat, TooLarge)

# -- preprocess ---------------------------------------------------------------------------------------
MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "CMYK", "I;16", "I", "F"]
FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]
EXIF_FORMATS = {"PNG", "JPEG", "WEBP", "TIFF"}


def make_image(width: int, height: int, mode: str, seed: int) -> tuple[Image.Image, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    extra: dict[str, Any] = {}
    if mode == "P+transparency":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), {"transparency": 0}
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        im = rgb.copy()
        im.putalpha(alpha)
        return im, extra
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)), extra
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32)), extra
    return rgb.convert(mode), extra


@st.composite
def uploads(draw: st.DrawFn) -> tuple[bytes, tuple[int, int], int]:
    """(encoded bytes, stored size, EXIF orientation or 0) of an image Pillow could write."""
    width = draw(st.integers(1, 300))
    height = draw(st.integers(1, 300))
    mode = draw(st.sampled_from(MODES))
    fmt = draw(st.sampled_from(FORMATS))
    orientation = draw(st.sampled_from([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])) if fmt in EXIF_FORMATS else 0
    im, extra = make_image(width, height, mode, draw(st.integers(0, 2**16)))
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    buffer = BytesIO()
    try:
        im.save(buffer, fmt, **extra)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # Pillow cannot write this mode in this format: not an input anyone can send
    return buffer.getvalue(), (width, height), orientation


specs = st.builds(ImageSpec, multiple=st.sampled_from([1, 2, 8, 16, 32]), alpha=st.booleans())


@examples(120)
@given(upload=uploads(), spec=specs, long_edge=st.integers(16, 256))
def test_any_valid_image_comes_out_aligned_within_the_limit_with_its_aspect(upload, spec, long_edge) -> None:
    data, (raw_w, raw_h), orientation = upload
    prepared = Preprocess(PreprocessConfig(max_long_edge=long_edge)).prepare(data, spec)
    info = prepared.info
    expected_original = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
    assert info.original_size == expected_original
    (ow, oh), (w, h), (mw, mh) = info.original_size, info.size, info.model_size
    # the long edge is within the limit, never upscaled; the long side is set exactly
    assert max(w, h) == min(max(ow, oh), long_edge)
    assert w <= ow and h <= oh
    # the aspect is kept within rounding of the short side (at least one pixel)
    scale = max(w, h) / max(ow, oh)
    assert abs(w - ow * scale) <= 0.5 + 1e-9 or w == 1
    assert abs(h - oh * scale) <= 0.5 + 1e-9 or h == 1
    assert info.scale == pytest.approx(w / ow)
    # aligned: each side the nearest multiple (half up), at least one multiple
    for side, aligned in ((w, mw), (h, mh)):
        assert aligned % spec.multiple == 0 and aligned >= spec.multiple
        assert abs(aligned - side) <= spec.multiple / 2 or aligned == spec.multiple
    channels = 4 if spec.alpha else 3
    assert prepared.array.shape == (mh, mw, channels)
    assert prepared.array.dtype == np.uint8 and prepared.array.flags["C_CONTIGUOUS"]


@examples(60)
@given(width=st.integers(1, 64), height=st.integers(1, 64), orientation=st.integers(1, 8),
       fmt=st.sampled_from(["PNG", "TIFF", "WEBP", "JPEG"]), seed=st.integers(0, 2**16))
def test_orientation_is_applied_exactly_once_in_every_format(width, height, orientation, fmt, seed) -> None:
    """The pixels equal those of the same upload transposed beforehand and sent without EXIF."""
    im, _ = make_image(width, height, "RGB", seed)
    exif = Image.Exif()
    exif[0x0112] = orientation
    lossless = {"lossless": True} if fmt == "WEBP" else {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    tagged, plain = BytesIO(), BytesIO()
    im.save(tagged, fmt, exif=exif.tobytes(), **lossless)
    reference = Image.open(BytesIO(tagged.getvalue()))
    reference.load()  # decoded exactly as the tagged upload, then transposed by Pillow's own table
    from PIL import ImageOps

    ImageOps.exif_transpose(reference).save(plain, "PNG")
    spec = ImageSpec(multiple=1)
    out = Preprocess().prepare(tagged.getvalue(), spec)
    expected = Preprocess().prepare(plain.getvalue(), spec)
    assert out.info.original_size == expected.info.original_size
    np.testing.assert_array_equal(out.array, expected.array)


@examples(150)
@given(data=st.binary(max_size=3000))
def test_random_bytes_raise_only_the_documented_image_errors(data: bytes) -> None:
    try:
        Preprocess(PreprocessConfig(max_pixels=1_000_000)).prepare(data)
    except IMAGE_ERRORS as error:
        assert error.field == "image" and error.message
    # a random blob that decodes is fine too: the property is "no other exception"


@examples(150)
@given(upload=uploads(), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)), insert=st.binary(max_size=64))
def test_mangled_images_raise_only_the_documented_image_errors(upload, edits, cut, insert) -> None:
    data = bytearray(upload[0])
    for where, value in edits:  # overwrite bytes anywhere, headers included
        data[min(int(where * len(data)), len(data) - 1)] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    data[len(data) // 3:len(data) // 3] = insert
    try:
        prepared = Preprocess(PreprocessConfig(max_pixels=4_000_000, max_long_edge=128)).prepare(bytes(data))
    except IMAGE_ERRORS as error:
        assert error.field == "image"
    else:
        assert prepared.array.dtype == np.uint8 and max(prepared.info.size) <= 128


@examples(40)
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_any_header_size_over_the_pixel_limit_is_too_large_before_decoding(width: int, height: int) -> None:
    assume(width * height > 1_000_000)
    data = png_from_rows(width, height, 8, 2, b"\0" * 64)  # 8-bit RGB header over a tiny body
    with pytest.raises(TooLarge):
        Preprocess(PreprocessConfig(max_pixels=1_000_000)).prepare(data)


# -- request validation -------------------------------------------------------------------------------
VERSIONS = LORA_VERSIONS


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Orchestrator:
    return resolving_orchestrator(tmp_path_factory.mktemp("properties"))


KNOWN_FIELDS = ["prompt", "negative_prompt", "steps", "cfg", "seed", "lora", "style", "layers", "resolution",
                "cfg_normalize", "format"]
numbers_as_text = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e309", "", " ", "2.0", "0x10", "1_000", "２", "true", "off",
                     "640", "1024", "4", "2", "30", "7.5"]),
)
names = st.one_of(st.sampled_from([*VERSIONS, NONE, "paprika", "face_paint_512_v2", "../x", "/etc/passwd",
                                   "v1/../../y", "a\x00", "v2511-0715\n", "..", "png", "zip", "psd", "jpeg", "webp"]),
                  st.text(max_size=40))
values = st.one_of(
    numbers_as_text, names,
    st.text(max_size=300), st.text(min_size=1990, max_size=2010, alphabet="ab"),
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=2),
)
field_dicts = st.dictionaries(st.one_of(st.sampled_from(KNOWN_FIELDS), st.text(max_size=12)), values, max_size=6)


@examples(300)
@given(task=st.sampled_from(sorted(TASKS.names)), fields=field_dicts)
def test_any_fields_resolve_within_limits_or_name_the_bad_field(orchestrator: Orchestrator, task: str, fields) -> None:
    sections = orchestrator.sections
    try:
        resolved = orchestrator.resolve(task, fields)
    except InvalidParameter as error:
        assert error.field in fields, (error.field, fields)
        assert error.message
        return
    assert resolved.format in TASKS[task].formats
    params = resolved.params
    if task in ("real", "layers"):
        section = sections[task]
        assert MIN_STEPS <= params.steps <= section.max_steps
        assert isinstance(params.cfg, float) and math.isfinite(params.cfg) and 1.0 <= params.cfg <= section.max_cfg
        assert 0 <= params.seed <= MAX_SEED
        assert len(params.prompt) <= section.max_prompt_chars
        assert len(params.negative_prompt) <= section.max_prompt_chars
    if task == "real":
        assert params.lora in [NONE, *VERSIONS]
    if task == "anime":
        assert params.style in sections["anime"].styles()
    if task == "layers":
        assert 1 <= params.layers <= sections["layers"].max_layers
        assert params.resolution in sections["layers"].resolutions
        assert isinstance(params.cfg_normalize, bool)
    # what a job stores resolves to the same request again (its retry runs the same thing)
    again = orchestrator.resolve(task, resolved.fields())
    assert again.params == params and again.format == resolved.format


def as_text_or_value(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """A value as an HTTP form sends it (text) or as a Python handle caller passes it."""
    return strategy.flatmap(lambda value: st.sampled_from([value, str(value)]))


@st.composite
def valid_fields(draw: st.DrawFn, task: str) -> dict[str, Any]:
    spec: dict[str, st.SearchStrategy] = {"format": st.sampled_from(TASKS[task].formats)}
    if task in ("real", "layers"):
        spec.update(steps=as_text_or_value(st.integers(MIN_STEPS, 100)),
                    cfg=as_text_or_value(st.floats(1.0, 20.0)),
                    seed=as_text_or_value(st.integers(0, MAX_SEED)),
                    prompt=st.text(max_size=100), negative_prompt=st.text(max_size=100))
    if task == "real":
        spec["lora"] = st.sampled_from([NONE, *VERSIONS])
    if task == "anime":
        spec["style"] = st.sampled_from(["face_paint_512_v2", "face_paint_512_v1", "celeba_distill", "paprika"])
    if task == "layers":
        spec.update(layers=as_text_or_value(st.integers(1, 10)), resolution=as_text_or_value(st.sampled_from([640, 1024])),
                    cfg_normalize=st.sampled_from([True, False, "true", "false", "1", "0"]))
    keys = draw(st.lists(st.sampled_from(sorted(spec)), unique=True))
    return {key: draw(spec[key]) for key in keys}


@examples(150)
@given(data=st.data(), task=st.sampled_from(sorted(TASKS.names)))
def test_fields_within_the_documented_limits_always_resolve_to_themselves(orchestrator: Orchestrator, data, task) -> None:
    fields = data.draw(valid_fields(task))
    resolved = orchestrator.resolve(task, fields)
    params = resolved.params
    for key in ("steps", "seed", "layers", "resolution"):
        if key in fields:
            assert getattr(params, key) == int(fields[key])
    if "cfg" in fields:
        assert params.cfg == float(fields["cfg"])
    for key in ("lora", "style"):
        if key in fields:
            assert getattr(params, key) == fields[key]
    if "prompt" in fields and fields["prompt"].strip():
        assert params.prompt == fields["prompt"]
    assert resolved.format == fields.get("format", TASKS[task].formats[0])


@examples(60)
@given(task=st.text(max_size=20))
def test_unknown_tasks_are_not_found_naming_the_task(orchestrator: Orchestrator, task: str) -> None:
    assume(task not in TASKS)
    with pytest.raises(ImgserveError) as error:
        orchestrator.resolve(task, {})
    assert error.value.code == "not_found" and error.value.field == "task"


@examples(200)
@given(query=st.binary(max_size=200))
def test_any_query_string_parses_or_names_the_field_that_is_not_utf8(query: bytes) -> None:
    try:
        pairs = parse_query(query)
    except InvalidParameter as error:
        assert error.message.startswith("not valid")
    else:
        assert all(isinstance(name, str) and isinstance(value, str) for name, value in pairs)


@examples(100)
@given(pairs=st.lists(st.tuples(st.text(min_size=1, max_size=10), st.text(max_size=30)), max_size=6))
def test_utf8_query_strings_round_trip(pairs) -> None:
    assert parse_query(urlencode(pairs).encode()) == pairs


def test_the_property_strategies_cover_every_mode_and_format() -> None:
    """The generator can write every listed mode in at least one listed format (else it only skips)."""
    for mode in MODES:
        written = []
        for fmt in FORMATS:
            im, extra = make_image(5, 4, mode, 0)
            try:
                im.save(BytesIO(), fmt, **extra)
                written.append(fmt)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        assert written, mode
