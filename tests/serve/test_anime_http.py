"""The `anime` task through real Ray Serve on a CPU replica: styles, sizes, metadata, bad input."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.conftest import Service, sample_path
from tests.serve.conftest import assert_error, small_png

MAX_LONG_EDGE = 384


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    yield from demo_service({"preprocess": {"max_long_edge": MAX_LONG_EDGE}, "anime": {"max_long_edge": MAX_LONG_EDGE}})


@pytest.mark.parametrize("name", ["photo_1.jpg", "photo_2.jpg", "photo_3.jpg"])
def test_sample_photos_come_back_stylised_at_their_size(service: Service, name: str) -> None:
    data = sample_path(name).read_bytes()
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    scale = MAX_LONG_EDGE / max(upright.size)
    expected = (round(upright.width * scale), round(upright.height * scale))
    response = service.post_image(data, {"style": "paprika"}, task="anime")
    assert response.status_code == 200, response.text
    result = Image.open(io.BytesIO(response.content))
    assert result.size == expected and result.mode == "RGB"
    assert response.headers["x-imgserve-style"] == "paprika"
    assert json.loads(result.info["imgserve"])["style"] == "paprika"
    # stylised: not the resized input
    reference = np.asarray(upright.convert("RGB").resize(expected, Image.Resampling.LANCZOS), dtype=int)
    assert np.abs(np.asarray(result, dtype=int) - reference).mean() > 5


def test_styles_differ_and_default_is_listed(service: Service) -> None:
    models = service.http.get("/v1/models").json()["tasks"]["anime"]
    assert set(models["styles"]) >= {"face_paint_512_v2", "face_paint_512_v1", "celeba_distill", "paprika"}
    assert models["default_style"] == "face_paint_512_v2"
    image = small_png((100, 70), (200, 120, 60))
    default = service.post_image(image, {}, task="anime", content_type="image/png")
    assert default.headers["x-imgserve-style"] == "face_paint_512_v2"
    other = service.post_image(image, {"style": "celeba_distill"}, task="anime", content_type="image/png")
    assert Image.open(io.BytesIO(other.content)).size == (100, 70)
    assert default.content != other.content
    again = service.post_image(image, {}, task="anime", content_type="image/png")
    assert again.content == default.content


def test_bad_requests_are_4xx(service: Service) -> None:
    error = assert_error(service.post_image(small_png(), {"style": "ghibli"}, task="anime",
                                            content_type="image/png"), 422, "invalid_parameter", "style")
    assert "paprika" in error["message"]
    assert_error(service.post_image(small_png(), {"style": "../paprika"}, task="anime", content_type="image/png"),
                 422, "invalid_parameter", "style")
    assert_error(service.post_image(small_png(), {"steps": 3}, task="anime", content_type="image/png"), 422,
                 "invalid_parameter", "steps")
    assert_error(service.post_image(b"\xff\xd8\xff\xe0garbage", task="anime"), 400, "bad_image", "image")
    assert service.post_image(small_png(), task="anime", content_type="image/png").status_code == 200
