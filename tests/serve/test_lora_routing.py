"""LoRA versions through Serve: the right adapter is active, routing prefers warm replicas, a hot
version spreads over replicas, and alternating versions does not reload adapters per request."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from deployments.lora import TINY_VERSIONS
from deployments.preprocess import Preprocess
from deployments.real import RealModel
from deployments.real_config import RealModelConfig, RealParams
from tests.conftest import Service, wait_until
from tests.serve.conftest import small_png
from tests.serve.gate import GatedRealModel

A, B, C = TINY_VERSIONS
DEADLINE_S = 120


@pytest.fixture(scope="module")
def routed(demo_service, gate):
    gate.open.remote()
    real = {"max_adapters_per_replica": 1,
            "serve": {"num_replicas": 2, "max_queued_requests": 32, "ray_actor_options": {"num_cpus": 0.3, "num_gpus": 1}}}
    for service in demo_service({"real": real}, models={"real": GatedRealModel}):
        yield service, gate


def post(service: Service, image: bytes, lora: str, seed: int = 1):
    response = service.post_image(image, {"steps": 2, "seed": seed, "lora": lora}, content_type="image/png")
    assert response.status_code == 200, response.text
    return response


def replica_stats() -> dict[str, dict]:
    """stats() of every RealModel replica (calls land on random replicas: ask until both answered)."""
    handle = serve.get_deployment_handle("RealModel", "imgserve")
    seen: dict[str, dict] = {}
    for _ in range(60):
        stats = handle.stats.remote().result()
        seen[stats["pid"]] = stats
        if len(seen) == 2:
            break
    return seen


def test_models_lists_versions_in_numeric_order_with_default(routed) -> None:
    service, _ = routed
    lora = service.http.get("/v1/models").json()["tasks"]["real"]["lora"]
    assert lora["versions"] == ["none", A, B, C]
    assert lora["default"] == C


def test_versions_match_a_directly_called_pipeline(routed, model_cache) -> None:
    service, _ = routed
    image = small_png((96, 64), (180, 90, 40))
    direct = RealModel(RealModelConfig(source="tiny", condition_area=4096, num_threads=1, lora_dir="tiny"), model_cache)
    direct.load()
    prepared = Preprocess().prepare(image, RealModel.input_spec)
    outputs = {}
    for version in (A, B, A, "none"):
        response = post(service, image, version)
        assert response.headers["x-imgserve-lora"] == version
        served = np.asarray(Image.open(io.BytesIO(response.content)))
        expected = direct.generate(prepared, RealParams(steps=2, seed=1, lora=version)).array
        assert np.abs(served.astype(int) - expected).max() <= 1
        outputs.setdefault(version, served)
    assert not np.array_equal(outputs[A], outputs[B])
    # no version named: the default (newest) is used and named
    response = service.post_image(image, {"steps": 2, "seed": 1}, content_type="image/png")
    assert response.headers["x-imgserve-lora"] == C
    metadata = json.loads(Image.open(io.BytesIO(response.content)).info["imgserve"])
    assert metadata["lora"] == C and metadata["adapters"] == f"{C}:1"


def test_unknown_and_path_like_versions_are_refused(routed) -> None:
    service, _ = routed
    response = service.post_image(small_png(), {"lora": "v2511-9999"}, content_type="image/png")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "lora" and f"none, {A}, {B}, {C}" in error["message"]
    for hostile in ("../v2511-0715", "/etc/passwd", "..%2F..%2Fx", ""):
        response = service.post_image(small_png(), {"lora": hostile}, content_type="image/png")
        # a blank one too: it is not a listed version (leave the field out for the default)
        assert response.status_code == 422 and response.json()["error"]["field"] == "lora"


def test_alternating_two_versions_over_two_replicas_does_not_reload(routed) -> None:
    service, _ = routed
    image = small_png((64, 64))

    def alternate(count: int, start: int) -> list[tuple[str, str, str]]:
        responses = [post(service, image, version, seed=start + i) for i, version in enumerate([A, B] * (count // 2))]
        return [(r.headers["x-imgserve-lora"], r.headers["x-imgserve-replica"], r.headers["x-imgserve-lora-load"])
                for r in responses]

    # Routing learns which replica holds which version through the controller, a moment after a
    # load (longer on a busy machine); while it settles a few loads happen. Settled = 4 warm in a row.
    trace: list[tuple[str, str, str]] = []
    while len(trace) < 60 and not (len(trace) >= 4 and all(load == "warm" for _, _, load in trace[-4:])):
        trace += alternate(2, len(trace))
        if trace[-1][2] == "cold":
            time.sleep(0.2)  # let the replicas' new adapter lists reach the routers
    assert all(load == "warm" for _, _, load in trace[-4:]), trace
    # then every request finds its version warm, each version on one replica
    steady = alternate(10, 100)
    assert all(load == "warm" for _, _, load in steady), (trace, steady)
    replicas_for = {v: {replica for version, replica, _ in steady if version == v} for v in (A, B)}
    assert all(len(replicas) == 1 for replicas in replicas_for.values()), trace
    assert replicas_for[A] != replicas_for[B], trace
    stats = replica_stats()
    assert len(stats) == 2 and all(s["loads"] == 1 for s in stats.values())  # the base was loaded once each


def test_a_burst_for_one_version_is_served_by_both_replicas(routed) -> None:
    service, gate = routed
    ray.get(gate.close.remote())
    image = small_png((64, 64))
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, service, image, C, i) for i in range(6)]
        try:
            # both replicas hold a request of the burst at the gate: the hot version was not pinned
            wait_until(lambda: ray.get(gate.count.remote()) >= 2, "the burst to reach the second replica",
                       timeout=DEADLINE_S)
        finally:
            gate.open.remote()
        responses = [f.result(timeout=DEADLINE_S) for f in futures]
    assert {r.headers["x-imgserve-lora"] for r in responses} == {C}
    assert len({r.headers["x-imgserve-replica"] for r in responses}) == 2
