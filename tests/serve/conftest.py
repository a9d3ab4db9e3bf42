"""Real Ray Serve on this machine: one local Ray per session with fake GPUs, one app per module."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from PIL import Image
from ray import serve

from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from serve_app.app import build_app, build_graph
from tests.conftest import wait_until
from tests.hostile import encode

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/serve `serve` (a conftest's own `pytestmark` marks nothing)."""
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.serve)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


METRICS_PORT: int | None = None
"""Where this session's Ray node exports Prometheus metrics (`http://127.0.0.1:PORT/metrics`)."""


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """Local Ray (2 CPUs, 4 fake GPUs) and Serve's HTTP proxy on a free loopback port."""
    global METRICS_PORT
    METRICS_PORT = free_port()
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


class Service:
    """A running imgserve app: its base URL and an HTTP client."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def post_image(self, data: bytes, fields: dict[str, Any] | None = None, task: str = "real",
                   filename: str = "input.jpg", content_type: str = "image/jpeg",
                   headers: dict[str, str] | None = None) -> httpx.Response:
        """A multipart upload of `data` as `image` with `fields` to `/v1/{task}` (`task` "jobs":
        a job submission; then `fields` names the task)."""
        return self.http.post(
            f"/v1/{task}", files={"image": (filename, data, content_type)},
            data={k: str(v) for k, v in (fields or {}).items()}, headers=headers,
        )

    def model_stats(self) -> dict[str, Any]:
        return serve.get_deployment_handle("RealModel", "imgserve").stats.remote().result()


def run_service(port: int, args: dict[str, Any], logging_config: dict[str, Any] | None = None,
                **build_kwargs: Any) -> Iterator[Service]:
    """Deploy imgserve for one test module and delete it afterwards (modules differ in config).

    Without substitutions the app is built the way `serve run CONFIG.yaml` builds it (Serve's own
    builder call, which checks the builder's signature); with them, through `build_graph`.
    `logging_config`: Serve's, for every deployment of the app (as in configs/*.yaml).
    """
    if build_kwargs:
        app = build_graph(args, **build_kwargs)
    else:
        app = call_user_app_builder_with_args_if_necessary(build_app, args)
    serve.run(app, name="imgserve", route_prefix="/", logging_config=logging_config)
    service = Service(port)
    yield service
    service.http.close()
    serve.delete("imgserve")


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
