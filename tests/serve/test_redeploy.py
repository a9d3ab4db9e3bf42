"""Redeploys do not kill work: a request held in a model replica when the app is redeployed with an
option that replaces that replica completes (200, the right image), because the old replica drains
for as long as a request may run (the graceful shutdown the builder derives), not Serve's 20 s."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from PIL import Image

from tests.conftest import demo_args, merged, run_service, wait_until
from tests.serve.conftest import small_png
from tests.serve.gate import SteppedRealModel

HELD_AT = 1


@pytest.fixture(scope="module")
def deployed(ray_cluster, model_cache, tmp_path_factory, gate):
    args = merged(demo_args(), {"cache_dir": str(model_cache),
                                "jobs": {"directory": str(tmp_path_factory.mktemp("jobs"))}})
    for service in run_service(ray_cluster, args, models={"real": SteppedRealModel}):
        yield service, args
        ray.get(gate.open.remote())  # a held request would hold the app's deletion for its whole drain


def real_replicas() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications["imgserve"].deployments["RealModel"].replica_states)


def test_a_request_held_in_a_replaced_model_replica_completes(deployed, gate) -> None:
    from ray.serve.api import _run as serve_run

    from serve_app.app import build_graph

    service, args = deployed
    ray.get(gate.close.remote(HELD_AT))
    with ThreadPoolExecutor(1) as pool:
        request = pool.submit(service.post_image, small_png((80, 48)), {"steps": 3, "seed": 7},
                              content_type="image/png", filename="a.png")
        wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the request to be held in the model")
        # a changed actor option replaces the model's replicas (0.1 CPU: the old one, draining, and
        # the new one fit the test Ray's 2 CPUs together)
        changed = merged(args, {"real": {"serve": {"ray_actor_options": {"num_cpus": 0.1}}}})
        # not waiting for the app to be RUNNING: it is not until the old replica has drained
        serve_run(build_graph(changed, models={"real": SteppedRealModel}), name="imgserve", route_prefix="/",
                  _blocking=False)
        wait_until(lambda: (states := real_replicas()).get("RUNNING", 0) >= 1 and states.get("STOPPING", 0) >= 1,
                   "a new RealModel replica running while the old one drains")
        assert not request.done()
        ray.get(gate.open.remote())
        response = request.result(timeout=180)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (80, 48)
    assert response.headers["x-imgserve-steps"] == "3" and response.headers["x-imgserve-seed"] == "7"
    wait_until(lambda: set(real_replicas()) == {"RUNNING"}, "the old replica to stop once drained")
