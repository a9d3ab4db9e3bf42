"""The seam, shown: a task declared outside serve_app/ (tests/extra_task.py, `gray`) and registered
next to the built-in ones is served end to end through real Ray Serve: HTTP, the Python handle,
jobs, /v1/models and /openapi.json, with its own config section, validation, headers and metrics
label, and nothing in serve_app/ naming it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from ray import serve

from deployments.tasks import TASKS
from serve_app.client import embedded_metadata
from tests.conftest import REPO, Service
from tests.extra_task import GRAY
from tests.serve.conftest import assert_error, small_png, submit, wait_state

AMOUNT = 0.75


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    yield from demo_service({"gray": {"default_amount": AMOUNT}}, tasks=TASKS.plus(GRAY))


def expected_pixels(png: bytes, amount: float) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(rgb * (1 - amount) + luma[..., None] * amount, 0, 255).round().astype(np.uint8)


def test_serve_app_does_not_name_the_extra_task() -> None:
    sources = [path.read_text() for path in (REPO / "serve_app").rglob("*") if path.suffix in (".py", ".js", ".html")]
    assert sources and not any("gray" in text.lower() for text in sources)


def test_the_extra_task_answers_over_http_with_its_own_parameter_and_header(service: Service) -> None:
    upload = small_png((40, 24), (200, 30, 30))
    response = service.post_image(upload, {"amount": 1, "format": "png"}, task="gray", content_type="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["x-imgserve-task"] == "gray" and response.headers["x-imgserve-amount"] == "1.0"
    result = np.asarray(Image.open(io.BytesIO(response.content)))
    assert result.shape == (24, 40, 3) and np.array_equal(result, expected_pixels(upload, 1.0))
    assert embedded_metadata(response.content)["amount"] == 1.0
    default = service.post_image(upload, {}, task="gray", content_type="image/png")  # the section's default
    assert default.headers["x-imgserve-amount"] == str(AMOUNT)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(default.content))), expected_pixels(upload, AMOUNT))
    assert_error(service.post_image(upload, {"amount": 2}, task="gray"), 422, "invalid_parameter", "amount")
    assert_error(service.post_image(upload, {"steps": 2}, task="gray"), 422, "invalid_parameter", "steps")


def test_the_extra_task_through_the_python_handle_and_as_a_job(service: Service) -> None:
    upload = small_png((32, 32), (10, 200, 90))
    encoded = serve.get_app_handle("imgserve").run.remote("gray", upload, {"amount": 0.5, "format": "webp"}).result()
    assert encoded.media_type == "image/webp" and encoded.metadata["amount"] == 0.5
    job = submit(service, {"amount": 0.5}, task="gray", image=upload)
    assert job.status_code == 202, job.text
    status = wait_state(service, job.json()["id"], "succeeded", "failed")
    assert status["state"] == "succeeded" and status["task"] == "gray", status
    result = service.http.get(f"/v1/jobs/{status['id']}/result")
    assert result.headers["x-imgserve-amount"] == "0.5"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.content))), expected_pixels(upload, 0.5))
    assert_error(submit(service, {"amount": -1}, task="gray"), 422, "invalid_parameter", "amount")


def test_the_extra_task_is_listed_and_documented(service: Service) -> None:
    models = service.http.get("/v1/models").json()
    assert list(models["tasks"]) == ["real", "anime", "layers", "gray"]
    assert models["tasks"]["gray"] == {"default_amount": AMOUNT, "formats": ["png", "webp", "jpeg"]}
    doc = service.http.get("/openapi.json").json()
    operation = doc["paths"]["/v1/gray"]["post"]
    fields = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert fields["amount"] == {"type": "number", "description": "How far towards gray: 0 keeps the colours, 1 is "
                                "fully gray.", "minimum": 0.0, "maximum": 1.0, "default": AMOUNT}
    assert operation["x-imgserve-task"] == {"name": "gray", "summary": "colour → grayscale"}
    jobs = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "gray" in jobs["properties"]["task"]["enum"] and "amount" in jobs["properties"]
    assert json.loads(json.dumps(doc))  # one serialisable document
