"""Abandoned work stops: a synchronous request whose caller goes away (the HTTP client hangs up, a
handle caller cancels its response, the request's time limit passes) stops at the model's next
denoising step, keeps the replica's slot until it has stopped, is counted in the replica's
`stats()` and in `imgserve_abandoned` by reason, and the next request runs right after it.

A step-aware gated model (tests/serve/gate.py `SteppedRealModel`) holds each request after step 2
while the gate is closed, tells the test when the request's stop signal arrives, and logs what the
replica did in order; no sleeps."""

from __future__ import annotations

import re
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from tests import conftest as root
from tests.conftest import wait_until
from tests.serve.conftest import assert_error, small_png
from tests.serve.gate import ANIME_HOLD, GatedAnimeModel, SteppedRealModel

HELD_AT = 2
LONG = 100
TIMEOUT_S = 15


@pytest.fixture(scope="module")
def service(demo_service, gate):
    overrides = {"ingress": {"request_timeout_s": TIMEOUT_S},
                 "real": {"serve": {"max_ongoing_requests": 1, "max_queued_requests": 1}},
                 "anime": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05, "serve": {"max_ongoing_requests": 4}}}
    for running in demo_service(overrides, models={"real": SteppedRealModel, "anime": GatedAnimeModel}):
        yield running
        ray.get(gate.open.remote())  # a held request would hold the app's deletion for its whole drain


def model(method: str, deployment: str = "RealModel"):
    from ray import serve

    return getattr(serve.get_deployment_handle(deployment, "imgserve"), method).remote().result()


def hold(gate) -> None:
    ray.get(gate.close.remote(HELD_AT))


def held(gate) -> None:
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, f"the request to be held after step {HELD_AT}")


def stopping(gate, seed: int) -> None:
    wait_until(lambda: f"stopping {seed}" in ray.get(gate.marks.remote()), f"request {seed}'s stop signal")


def send_and_keep_open(url: str, fields: dict) -> socket.socket:
    """POST /v1/real over a raw socket and return it unread: closing it is the client hanging up."""
    request = httpx.Request("POST", f"{url}/v1/real", files={"image": ("a.png", small_png(), "image/png")},
                            data={key: str(value) for key, value in fields.items()})
    body = request.read()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /v1/real HTTP/1.1\r\nHost: {host}\r\nContent-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def steps_run(history: list[tuple], seed: int) -> list[int]:
    return [entry[2] for entry in history if entry[0] == "step" and entry[1] == seed]


def position(history: list[tuple], entry: tuple) -> int:
    return next(i for i, seen in enumerate(history) if seen[:len(entry)] == entry)


def abandoned(reason: str) -> float:
    """`imgserve_abandoned` for task real and `reason`, summed over this session's replicas."""
    with urllib.request.urlopen(f"http://127.0.0.1:{root.METRICS_PORT}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "ray_imgserve_abandoned_total" and sample.labels.get("task") == "real"
               and sample.labels.get("reason") == reason)


def test_a_client_that_hangs_up_stops_the_model_at_its_next_step_and_frees_the_replica(service, gate) -> None:
    before = model("stats")["stops"].get("abandoned", 0)
    counted = abandoned("client_disconnected")
    hold(gate)
    client = send_and_keep_open(service.url, {"steps": LONG, "seed": 101})
    held(gate)
    client.close()  # the client hangs up while the model is on step 2 of 100
    stopping(gate, 101)
    # Until the model has stopped, the abandoned request keeps its slot, and Serve sees it: of two
    # new requests one waits in the model's queue (max_queued_requests 1) and one is refused.
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(service.post_image, small_png(), {"steps": 2, "seed": seed}, content_type="image/png",
                               filename="a.png") for seed in (102, 103)]
        wait_until(lambda: any(f.done() for f in futures), "one of the two to be refused")
        refused = next(f for f in futures if f.done())
        assert_error(refused.result(), 503, "queue_full")
        ray.get(gate.open.remote())  # the held model thread reaches its next step boundary and stops
        accepted = next(f for f in futures if f is not refused)
        answer = accepted.result(timeout=180)
    assert answer.status_code == 200, answer.text
    seed = 102 if futures[0] is accepted else 103
    history = model("history")
    # the abandoned request ran 2 of its 100 steps; the next one entered the model after it ended
    assert steps_run(history, 101) == [1, 2]
    assert position(history, ("end", 101)) < position(history, ("enter", seed))
    assert steps_run(history, seed) == [1, 2]
    stats = model("stats")
    assert stats["stops"]["abandoned"] == before + 1
    assert stats["last_stop"]["reason"] == "abandoned"
    assert f"after step {HELD_AT} of {LONG}" in stats["last_stop"]["message"]
    wait_until(lambda: abandoned("client_disconnected") >= counted + 1, "imgserve_abandoned{client_disconnected}")


def test_a_handle_caller_that_cancels_stops_the_model_and_the_next_call_runs(service, gate) -> None:
    from ray import serve

    before = model("stats")["stops"].get("abandoned", 0)
    counted = abandoned("caller_cancelled")
    app = serve.get_app_handle("imgserve")
    hold(gate)
    response = app.run.remote("real", small_png(), {"steps": LONG, "seed": 201})
    held(gate)
    response.cancel()
    stopping(gate, 201)
    ray.get(gate.open.remote())
    encoded = app.run.remote("real", small_png(), {"steps": 2, "seed": 202}).result(timeout_s=180)
    assert encoded.metadata["steps"] == 2
    assert isinstance(encoded.served["model_seconds"], float) and encoded.served["model_seconds"] > 0
    history = model("history")
    assert steps_run(history, 201) == [1, 2]
    assert position(history, ("end", 201)) < position(history, ("enter", 202))
    stats = model("stats")
    assert stats["stops"]["abandoned"] == before + 1
    assert f"after step {HELD_AT} of {LONG}" in stats["last_stop"]["message"]
    wait_until(lambda: abandoned("caller_cancelled") >= counted + 1, "imgserve_abandoned{caller_cancelled}")


def test_a_request_past_its_time_limit_gets_504_and_the_model_stops(service, gate) -> None:
    before = model("stats")["stops"].get("timeout", 0)
    counted = abandoned("timeout")
    hold(gate)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(service.post_image, small_png(), {"steps": LONG, "seed": 301}, content_type="image/png",
                             filename="a.png")
        held(gate)
        assert_error(future.result(timeout=180), 504, "timeout")  # the gate outlasts the limit
    stopping(gate, 301)
    ray.get(gate.open.remote())
    stats = wait_until(lambda: (s := model("stats"))["stops"].get("timeout", 0) > before and s, "the model to stop")
    assert stats["stops"]["timeout"] == before + 1
    assert stats["last_stop"]["reason"] == "timeout"
    stopped = re.search(r"after step (\d+) of 100", stats["last_stop"]["message"])
    assert stopped and int(stopped[1]) == HELD_AT, stats["last_stop"]
    assert steps_run(model("history"), 301) == [1, 2]
    wait_until(lambda: abandoned("timeout") >= counted + 1, "imgserve_abandoned{timeout}")
    answer = service.post_image(small_png(), {"steps": 2, "seed": 302}, content_type="image/png", filename="a.png")
    assert answer.status_code == 200, answer.text
    assert float(answer.headers["x-imgserve-model-seconds"]) > 0


def test_an_anime_request_that_leaves_its_batch_does_not_hold_up_the_others(service, gate) -> None:
    from ray import serve

    app = serve.get_app_handle("imgserve")
    ray.get(gate.close.remote(ANIME_HOLD))
    first = app.run.remote("anime", small_png((40, 32)), {})
    held(gate)  # its batch waits on the gate; the next requests gather behind it
    others = {width: app.run.remote("anime", small_png((width, 32)), {}) for width in (48, 56, 64)}
    others[56].cancel()
    ray.get(gate.open.remote())
    for width, response in [(40, first), (48, others[48]), (64, others[64])]:
        encoded = response.result(timeout_s=180)
        assert encoded.metadata["size"] == f"{width}x32"
        assert isinstance(encoded.served["model_seconds"], float)
    with pytest.raises(Exception):  # noqa: B017 - cancelled: RequestCancelledError or TaskCancelledError
        others[56].result(timeout_s=180)
    ran = [size for batch in model("batches_run", "AnimeModel") for size in batch]
    assert (32, 48) in ran and (32, 64) in ran and (32, 56) not in ran  # the one that left never ran
