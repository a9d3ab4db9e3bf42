"""Real Ray Serve on this machine: the session's local Ray with fake GPUs (`ray_cluster`, in
tests/conftest.py) and one app per module (`demo_service`, same place); here the test gate and the
HTTP helpers the modules share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from PIL import Image

from tests.conftest import Service, wait_until
from tests.hostile import encode
from tests.serve.gate import GATE_NAME, Gate

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/serve `serve` (a conftest's own `pytestmark` marks nothing)."""
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.serve)


@pytest.fixture(scope="module")
def gate(ray_cluster: int) -> Iterator[Any]:
    """The test gate of this module's gated model (tests/serve/gate.py), closed; killed after the module."""
    actor = Gate.options(name=GATE_NAME).remote()
    yield actor
    ray.kill(actor)


def small_png(size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small one-colour PNG: the upload of every test that needs just some image."""
    return encode(Image.new("RGB", size, color), "PNG")


def submit(service: Service, fields: dict[str, Any], task: str = "real", image: bytes | None = None,
           headers: dict[str, str] | None = None) -> httpx.Response:
    """Submit a `task` job for `image` (a small PNG by default) with `fields`."""
    return service.post_image(image or small_png(), {"task": task, **fields}, task="jobs", filename="a.png",
                              content_type="image/png", headers=headers)


def job_status(service: Service, job_id: str) -> dict[str, Any]:
    response = service.http.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_state(service: Service, job_id: str, *states: str) -> dict[str, Any]:
    """Poll the job until its state is one of `states`; its status then."""
    return wait_until(lambda: (s := job_status(service, job_id))["state"] in states and s, f"{job_id} to be {states}")


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    """`response` is the one JSON error shape with this status and code (and field, when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if field is not None:
        assert body["error"]["field"] == field
    return body["error"]
