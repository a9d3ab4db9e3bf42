"""The `layers` task through real Ray Serve: ZIP and PSD of N RGBA layers, alpha kept, bad input."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage

from tests.conftest import Service
from tests.hostile import encode
from tests.serve.conftest import assert_error, small_png


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    yield from demo_service({"preprocess": {"max_long_edge": 512},
                             "layers": {"serve": {"ray_actor_options": {"num_cpus": 0.25, "num_gpus": 1}}}})


def rgba_with_hole() -> bytes:
    image = Image.new("RGBA", (120, 80), (30, 160, 90, 255))
    image.paste((0, 0, 0, 0), (40, 20, 80, 60))  # a transparent window
    return encode(image, "PNG")


def layers_of(zip_bytes: bytes) -> tuple[list[np.ndarray], np.ndarray, dict]:
    archive = zipfile.ZipFile(io.BytesIO(zip_bytes))
    names = sorted(n for n in archive.namelist() if n.startswith("layer_"))
    layers = [np.asarray(Image.open(archive.open(n))) for n in names]
    for name in names:
        assert Image.open(archive.open(name)).mode == "RGBA"
    composite = np.asarray(Image.open(archive.open("composite.png")))
    return layers, composite, json.loads(archive.read("manifest.json"))


@pytest.mark.parametrize("source", ["photo", "rgba"])
def test_zip_and_psd_hold_the_same_n_rgba_layers(service: Service, sample_photo: bytes, source: str) -> None:
    data = sample_photo if source == "photo" else rgba_with_hole()
    fields = {"layers": 3, "steps": 2, "seed": 5, "prompt": "a poster"}
    response = service.post_image(data, fields, task="layers", content_type="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    layers, composite, manifest = layers_of(response.content)
    assert len(layers) == 3
    width, height = map(int, response.headers["x-imgserve-layer-size"].split("x"))
    assert all(layer.shape == (height, width, 4) for layer in layers)
    assert composite.shape == (height, width, 4)
    assert len(manifest["layers"]) == 3 and manifest["seed"] == 5 and manifest["resolution"] == 640
    assert manifest["layer_size"] == [width, height] and "denoise" in manifest["timings_s"]
    assert width % 16 == 0 and height % 16 == 0  # the pipeline's bucket, not the upload's size

    psd = service.post_image(data, {**fields, "format": "psd"}, task="layers", content_type="image/png")
    assert psd.status_code == 200 and psd.headers["content-type"] == "image/vnd.adobe.photoshop"
    document = PSDImage.open(io.BytesIO(psd.content))
    assert document.size == (width, height) and len(document) == 3
    for zipped, layer in zip(layers, document):
        canvas = np.zeros((height, width, 4), np.uint8)
        canvas[layer.top:layer.bottom, layer.left:layer.right] = np.asarray(layer.topil().convert("RGBA"))
        assert np.array_equal(canvas[..., 3], zipped[..., 3])
        visible = zipped[..., 3] > 0
        assert np.array_equal(canvas[visible], zipped[visible])


def test_layers_resolution_1024_is_a_larger_bucket(service: Service) -> None:
    sizes = {}
    for resolution in (640, 1024):
        response = service.post_image(small_png((96, 64)), {"layers": 1, "steps": 2, "seed": 1, "prompt": "x",
                                                            "resolution": resolution}, task="layers",
                                      content_type="image/png")
        assert response.status_code == 200, response.text
        sizes[resolution] = tuple(map(int, response.headers["x-imgserve-layer-size"].split("x")))
    assert sizes[1024][0] > sizes[640][0] and sizes[1024][1] > sizes[640][1]


@pytest.mark.parametrize(
    "fields,field,text",
    [
        ({"resolution": 800}, "resolution", "640 or 1024"),
        ({"layers": 0}, "layers", "between 1 and"),
        ({"layers": 99}, "layers", "between 1 and"),
        ({"steps": 1}, "steps", "between 2 and"),
        ({"format": "png"}, "format", "zip, psd"),
        ({"cfg_normalize": "maybe"}, "cfg_normalize", ""),
    ],
)
def test_out_of_range_fields_are_422(service: Service, fields, field, text) -> None:
    error = assert_error(service.post_image(small_png(), fields, task="layers", content_type="image/png"), 422,
                         "invalid_parameter", field)
    assert text in error["message"]


def test_bad_images_are_4xx_and_the_service_answers_afterwards(service: Service) -> None:
    assert_error(service.post_image(b"", task="layers"), 400, "bad_image", "image")
    assert_error(service.post_image(b"GIF89a-broken", task="layers", content_type="image/gif"), 400, "bad_image")
    models = service.http.get("/v1/models").json()["tasks"]["layers"]
    assert models["resolutions"] == [640, 1024] and models["max_layers"] >= 4
    ok = service.post_image(small_png(), {"layers": 2, "steps": 2, "prompt": "x"}, task="layers",
                            content_type="image/png")
    assert ok.status_code == 200
