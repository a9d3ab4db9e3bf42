"""The `real` task end to end through real Ray Serve: HTTP, handle, metadata, errors, survival."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from ray import serve

from deployments.errors import BadImage, InvalidParameter
from deployments.lora import TINY_VERSIONS, ensure_tiny_loras, ensure_tiny_speed_adapter
from tests.conftest import Service
from tests.hostile import bomb_png, encode
from tests.serve.conftest import assert_error, small_png
from tests.stacking import merged_output

MAX_LONG_EDGE = 512
MAX_BYTES = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    preprocess = {"max_long_edge": MAX_LONG_EDGE, "max_bytes": MAX_BYTES, "max_pixels": 20_000_000}
    # A GPU replica on fake GPU resources: Ray reserves a GPU, torch sees no CUDA, the model runs on CPU.
    real = {"serve": {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}}
    yield from demo_service({"preprocess": preprocess, "real": real})


def test_sample_photo_comes_back_as_png_with_size_and_metadata(service: Service, sample_photo: bytes) -> None:
    original = Image.open(io.BytesIO(sample_photo))
    scale = MAX_LONG_EDGE / max(original.size)
    expected = (round(original.width * scale), round(original.height * scale))

    response = service.post_image(sample_photo, {"steps": 2, "seed": 7, "cfg": 4.5})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    result = Image.open(io.BytesIO(response.content))
    assert result.format == "PNG" and result.mode == "RGB"
    assert result.size == expected
    assert response.headers["x-imgserve-size"] == f"{expected[0]}x{expected[1]}"
    assert response.headers["x-imgserve-steps"] == "2"
    assert response.headers["x-imgserve-cfg"] == "4.5"
    assert response.headers["x-imgserve-seed"] == "7"
    assert float(response.headers["x-imgserve-scale"]) == pytest.approx(scale, rel=1e-3)
    embedded = json.loads(result.info["imgserve"])
    assert embedded["steps"] == 2 and embedded["seed"] == 7 and embedded["cfg"] == 4.5
    assert embedded["size"] == f"{expected[0]}x{expected[1]}"
    assert embedded["prompt"].startswith("transform the image to realistic photograph")


def test_defaults_are_applied_and_echoed(service: Service) -> None:
    response = service.post_image(small_png(), filename="a.png", content_type="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["x-imgserve-steps"] == "30"
    assert response.headers["x-imgserve-cfg"] == "7.0"
    assert int(response.headers["x-imgserve-seed"]) >= 0


def test_same_seed_same_bytes_other_seed_other_bytes(service: Service) -> None:
    image = small_png((128, 80), (20, 120, 220))
    first = service.post_image(image, {"steps": 2, "seed": 3})
    second = service.post_image(image, {"steps": 2, "seed": 3})
    other = service.post_image(image, {"steps": 2, "seed": 4})
    assert first.status_code == second.status_code == other.status_code == 200
    assert first.content == second.content
    assert first.content != other.content


def test_raw_body_with_query_fields_and_other_formats(service: Service) -> None:
    image = small_png()
    response = service.http.post(
        "/v1/real", content=image, params={"steps": 2, "seed": 1, "format": "webp"},
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).size == (96, 64)

    jpeg = service.post_image(image, {"steps": 2, "seed": 1, "format": "jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    decoded = Image.open(io.BytesIO(jpeg.content))
    assert decoded.format == "JPEG"
    assert json.loads(decoded.getexif()[0x010E])["seed"] == 1


def test_handle_call_returns_encoded_result(service: Service, sample_photo: bytes) -> None:
    handle = serve.get_app_handle("imgserve")
    encoded = handle.run.remote("real", sample_photo, {"steps": 2, "seed": 7, "cfg": 4.5}).result()
    http = service.post_image(sample_photo, {"steps": 2, "seed": 7, "cfg": 4.5})
    assert encoded.media_type == "image/png"
    assert encoded.data == http.content
    assert encoded.metadata["seed"] == 7

    with pytest.raises(BadImage) as error:
        handle.run.remote("real", b"not an image", {}).result()
    assert error.value.field == "image"
    with pytest.raises(InvalidParameter) as error:
        handle.run.remote("real", sample_photo, {"steps": 0}).result()
    assert error.value.field == "steps"


def test_models_and_health(service: Service) -> None:
    health = service.http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = service.http.get("/v1/models").json()
    real = models["tasks"]["real"]
    assert real["defaults"]["steps"] == 30 and real["defaults"]["cfg"] == 7.0
    assert real["limits"]["steps"] == [2, 100]
    assert real["presets"] == {"default": "full", "choices": {"full": {"steps": 30, "cfg": 7.0, "adapter": False},
                                                              "fast": {"steps": 4, "cfg": 1.0, "adapter": True}}}
    assert real["formats"] == ["png", "webp", "jpeg"]
    assert models["max_long_edge"] == MAX_LONG_EDGE
    # the OpenAPI document the README points to lists every route
    paths = service.http.get("/openapi.json").json()["paths"]
    assert {"/v1/real", "/v1/anime", "/v1/layers", "/v1/models", "/v1/jobs", "/v1/jobs/{job_id}/events",
            "/healthz"} <= set(paths)
    assert service.http.get("/docs").status_code == 200


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_UPLOADS = [
    # (id, bytes, filename, content type, status, code)
    ("empty", b"", "a.png", "image/png", 400, "bad_image"),
    ("not-an-image", b"hello, this is text" * 10, "a.png", "image/png", 400, "bad_image"),
    ("corrupt-png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "a.png", "image/png", 400, "bad_image"),
    ("random-bytes", np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "a.jpg",
     "image/jpeg", 400, "bad_image"),
    ("unsupported-format", b"P6\n4 4\n255\n" + bytes(48), "a.ppm", "image/x-portable-pixmap", 415,
     "unsupported_format"),
    ("bomb", bomb_png(30_000, 30_000), "bomb.png", "image/png", 413, "too_large"),
    ("oversized", np.random.default_rng(1).integers(0, 256, MAX_BYTES + 10, dtype=np.uint8).tobytes(), "big.jpg",
     "image/jpeg", 413, "too_large"),
]


@pytest.mark.parametrize("name,data,filename,content_type,status,code", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_get_4xx_json(service: Service, name, data, filename, content_type, status, code) -> None:
    response = service.post_image(data, {"steps": 2}, filename=filename, content_type=content_type)
    assert_error(response, status, code, "image")


def test_truncated_photo_and_png(service: Service, sample_photo: bytes) -> None:
    for data in (truncated(sample_photo), truncated(encode(Image.new("RGB", (300, 200), (9, 9, 9)), "PNG"))):
        assert_error(service.post_image(data, {"steps": 2}), 400, "bad_image", "image")


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1}, "steps"),
        ({"steps": 101}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"cfg": "nan"}, "cfg"),
        ({"cfg": 0.5}, "cfg"),
        ({"seed": -1}, "seed"),
        ({"format": "gif"}, "format"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_parameters_get_422_naming_the_field(service: Service, fields, field) -> None:
    assert_error(service.post_image(small_png(), fields, content_type="image/png"), 422, "invalid_parameter", field)


def test_malformed_requests(service: Service) -> None:
    # a field given twice
    response = service.http.post("/v1/real", files={"image": ("a.png", small_png(), "image/png")},
                                 data={"steps": ["2", "3"]})
    assert_error(response, 422, "invalid_parameter", "steps")
    # multipart without a file
    assert_error(service.http.post("/v1/real", data={"steps": "2"}, files={"other": ("x", b"1")}), 422,
                 "invalid_parameter", "other")
    assert_error(service.http.post("/v1/real", files={"steps": (None, "2")}), 400, "bad_image", "image")
    # a body that is not an image type at all
    assert_error(service.http.post("/v1/real", content=b"{}", headers={"content-type": "application/json"}), 415,
                 "unsupported_format", "image")
    # an unknown task and an unknown route
    assert_error(service.post_image(small_png(), task="sketch"), 404, "not_found", "task")
    assert_error(service.http.get("/v2/nothing"), 404, "not_found")


def test_service_survives_bad_requests_with_the_same_replica(service: Service, sample_photo: bytes) -> None:
    before = service.model_stats()
    for _, data, filename, content_type, status, _ in BAD_UPLOADS:
        assert service.post_image(data, {"steps": 2}, filename=filename, content_type=content_type).status_code == status
    response = service.post_image(sample_photo, {"steps": 2, "seed": 11})
    assert response.status_code == 200
    after = service.model_stats()
    assert after["pid"] == before["pid"]
    assert after["loads"] == 1
    assert after["device"] == "cpu"  # fake GPU resource, no CUDA: the replica fell back to CPU


def test_python_client_and_cli(service: Service, sample_photo: bytes, tmp_path) -> None:
    from serve_app import cli
    from serve_app.client import Client, ServiceError, embedded_metadata

    with Client(service.url) as client:
        result = client.real(sample_photo, steps=2, seed=7, cfg=4.5)
        assert result.data == service.post_image(sample_photo, {"steps": 2, "seed": 7, "cfg": 4.5}).content
        assert result.params["seed"] == "7" and embedded_metadata(result.data)["steps"] == 2
        assert "real" in client.models()["tasks"]
        with pytest.raises(ServiceError) as error:
            client.real(sample_photo, steps=500)
        assert (error.value.status, error.value.code, error.value.field) == (422, "invalid_parameter", "steps")

    source = tmp_path / "in.png"
    source.write_bytes(small_png())
    output = tmp_path / "out.png"
    assert cli.main(["--url", service.url, "real", str(source), "-o", str(output), "--steps", "2", "--seed", "5"]) == 0
    assert Image.open(output).size == (96, 64)
    assert cli.main(["--url", service.url, "real", str(source), "-o", str(output), "--steps", "0"]) == 1


def test_a_speed_preset_stacked_with_a_version_is_served_as_the_adapters_merged_by_hand(
        service: Service, model_cache, tmp_path) -> None:
    from serve_app import cli
    from serve_app.client import Client, embedded_metadata

    array = np.random.default_rng(5).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # sides of 16: no resizing
    upload = encode(Image.fromarray(array), "PNG")
    version = TINY_VERSIONS[0]
    with Client(service.url) as client:
        result = client.real(upload, preset="fast", lora=version, lora_scale=0.5, seed=3)
    assert result.params["preset"] == "fast" and result.params["adapters"] == f"fast:1,{version}:0.5"
    assert (result.params["steps"], result.params["cfg"]) == ("4", "1.0")  # the preset's defaults
    assert embedded_metadata(result.data)["adapters"] == f"fast:1,{version}:0.5"
    speed, file = ensure_tiny_speed_adapter(model_cache), ensure_tiny_loras(model_cache) / f"{version}.safetensors"
    expected = merged_output(model_cache, [(speed, 1.0), (file, 0.5)], array, steps=4, cfg=1.0, seed=3)
    served = np.asarray(Image.open(io.BytesIO(result.data)))
    assert np.abs(served.astype(int) - expected).max() <= 1
    source, output = tmp_path / "in.png", tmp_path / "out.png"
    source.write_bytes(upload)
    assert cli.main(["--url", service.url, "real", str(source), "-o", str(output), "--preset", "fast", "--lora",
                     version, "--lora-scale", "0.5", "--seed", "3"]) == 0
    assert output.read_bytes() == result.data
    stats = service.model_stats()
    assert stats["loads"] == 1 and stats["speed_adapters"] == {"fast": 1}


def test_depth_compensation_is_a_request_field_that_reaches_the_model(service: Service, sample_photo: bytes) -> None:
    from PIL import ImageFilter

    photo = Image.open(io.BytesIO(sample_photo)).convert("RGB")
    photo.thumbnail((MAX_LONG_EDGE, MAX_LONG_EDGE))
    blurred = np.array(photo)
    blurred[: blurred.shape[0] // 2] = np.asarray(photo.filter(ImageFilter.GaussianBlur(3)))[: blurred.shape[0] // 2]
    upload = encode(Image.fromarray(blurred), "PNG")
    plain = service.post_image(upload, {"steps": 2, "seed": 1}, content_type="image/png")
    restored = service.post_image(upload, {"steps": 2, "seed": 1, "depth_compensation": "true"}, content_type="image/png")
    assert plain.status_code == restored.status_code == 200, restored.text
    assert json.loads(Image.open(io.BytesIO(restored.content)).info["imgserve"])["depth_compensation"] is True
    assert json.loads(Image.open(io.BytesIO(plain.content)).info["imgserve"])["depth_compensation"] is False
    # the same seed on a different input: the tiny model sees the condition image at 64² area, so the
    # outputs differ only a little, but they differ
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(restored.content))),
                              np.asarray(Image.open(io.BytesIO(plain.content))))
