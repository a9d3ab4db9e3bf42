"""Postprocess: the returned image has the promised size and carries the parameters that were used."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from deployments.errors import InvalidParameter
from deployments.postprocess import Postprocess
from deployments.records import Generated, PreparedImage


def generated(model_size=(1024, 688), size=(1024, 683), seed=5) -> Generated:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (model_size[1], model_size[0], 3), dtype=np.uint8)
    info = PreparedImage(original_size=(1280, 854), size=size, model_size=model_size, scale=0.8,
                         source_format="JPEG", source_mode="RGB")
    return Generated(array=array, info=info, params={"task": "real", "steps": 4, "cfg": 7.0, "seed": seed,
                                                    "prompt": "photo, ünïcode"})


def test_png_is_resized_back_to_the_promised_size_with_metadata_chunk() -> None:
    encoded = Postprocess().encode(generated(), "png")
    image = Image.open(io.BytesIO(encoded.data))
    assert encoded.media_type == "image/png"
    assert image.size == (1024, 683)
    embedded = json.loads(image.info["imgserve"])
    assert embedded == encoded.metadata
    assert embedded["seed"] == 5 and embedded["size"] == "1024x683" and embedded["prompt"] == "photo, ünïcode"
    assert embedded["original_size"] == "1280x854" and embedded["scale"] == 0.8


def test_unaligned_size_untouched_when_equal() -> None:
    result = generated(model_size=(64, 48), size=(64, 48))
    image = Image.open(io.BytesIO(Postprocess().encode(result, "png").data))
    assert np.array_equal(np.asarray(image), result.array)  # PNG is lossless: exact pixels


def test_encoding_is_deterministic() -> None:
    assert Postprocess().encode(generated(), "png").data == Postprocess().encode(generated(), "png").data


@pytest.mark.parametrize("fmt,pil_format", [("webp", "WEBP"), ("jpeg", "JPEG")])
def test_lossy_formats_carry_metadata_in_exif(fmt, pil_format) -> None:
    encoded = Postprocess().encode(generated(), fmt)
    image = Image.open(io.BytesIO(encoded.data))
    assert image.format == pil_format and image.size == (1024, 683)
    assert json.loads(image.getexif()[0x010E])["seed"] == 5


def test_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidParameter) as error:
        Postprocess().encode(generated(), "gif")
    assert error.value.field == "format"
