"""A request time limit and a GPU out-of-memory error: the client gets a clear JSON error, the model
stops its work (at the next denoising step), and the same replica serves the next request."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from tests.conftest import wait_until
from tests.serve.conftest import assert_error, small_png
from tests.serve.gate import SlowRealModel

TIMEOUT_S = 3


@pytest.fixture(scope="module")
def service(demo_service):
    yield from demo_service({"ingress": {"request_timeout_s": TIMEOUT_S}}, models={"real": SlowRealModel})


def test_a_request_over_the_time_limit_gets_504_and_the_model_stops_at_the_next_step(service) -> None:
    before = service.model_stats()
    # 40 steps of two slow transformer passes each take far longer than the 3 s limit
    response = service.post_image(small_png(), {"steps": 40, "seed": 1}, content_type="image/png",
                                  filename="in.png")
    error = assert_error(response, 504, "timeout")
    assert f"{TIMEOUT_S} s" in error["message"]
    # the model was told the same deadline: it stops at its next step instead of finishing all 40
    stats = wait_until(lambda: (s := service.model_stats())["stops"].get("timeout") and s, "the model to stop")
    stopped = re.search(r"after step (\d+) of ", stats["last_stop"]["message"])
    assert stopped, stats["last_stop"]  # at a denoising step's boundary
    assert stats["last_stop"]["reason"] == "timeout" and int(stopped[1]) < 40
    # and the same replica serves the next request
    again = service.post_image(small_png(color=(30, 200, 30)), {"steps": 2, "seed": 1}, content_type="image/png", filename="in.png")
    assert again.status_code == 200, again.text
    assert Image.open(io.BytesIO(again.content)).size == (96, 64)
    assert service.model_stats()["pid"] == before["pid"]


def test_a_gpu_out_of_memory_fails_that_request_only(service) -> None:
    from ray import serve

    before = service.model_stats()
    serve.get_deployment_handle("RealModel", "imgserve").inject_oom.remote().result()
    response = service.post_image(small_png(color=(30, 30, 200)), {"steps": 2, "seed": 2}, content_type="image/png", filename="in.png")
    error = assert_error(response, 507, "out_of_memory")
    assert "out of memory" in error["message"]
    after = service.model_stats()
    assert after["stops"].get("out_of_memory") == before["stops"].get("out_of_memory", 0) + 1
    again = service.post_image(small_png(color=(30, 30, 200)), {"steps": 2, "seed": 2}, content_type="image/png", filename="in.png")
    assert again.status_code == 200, again.text
    assert service.model_stats()["pid"] == before["pid"]
