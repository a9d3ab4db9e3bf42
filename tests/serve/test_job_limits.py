"""Jobs always end, through real Ray Serve: a job waiting for a model deployment without a running
replica fails `run_timeout` naming it; a cancel that meets the end of the run wins; a redeploy of
the runner hands its running job to the new runner, which finishes it. Signals (a gate), not sleeps."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray import serve

from deployments.layers import LayersModel
from deployments.real import RealModel
from serve_app.app import build_graph
from tests.conftest import Service, demo_args, merged, wait_until
from tests.serve.conftest import job_status, submit, wait_state
from tests.serve.gate import GATE_NAME

MAX_RUN_S = 20.0


class GatedStartLayersModel(LayersModel):
    """LayersModel whose replica finishes starting only once the test's gate is open: with
    `min_replicas: 0`, a job for it waits for a replica as for one that cannot be placed (a replica
    that Serve can never schedule is never stopped by it, which would outlive the module)."""

    def load(self) -> None:
        ray.get(ray.get_actor(GATE_NAME).wait.remote())
        super().load()


class LateGatedRealModel(RealModel):
    """RealModel that waits for the test's gate after its last step, just before it returns: a
    cancel sent then meets the run's completion."""

    def generate(self, prepared, params, progress=None, conditioning=None):
        generated = super().generate(prepared, params, progress, conditioning)
        ray.get(ray.get_actor(GATE_NAME).wait.remote())
        return generated


MODELS = {"real": LateGatedRealModel, "layers": GatedStartLayersModel}


def overrides(jobs_dir: Path, max_queued: int) -> dict:
    return {
        "jobs": {"directory": str(jobs_dir), "max_queued": max_queued, "concurrency": 2,
                 "max_run_s": MAX_RUN_S, "housekeeping_s": 0.5, "lease_s": 10},
        "layers": {"serve": {"num_replicas": None,
                             "autoscaling_config": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0}}},
    }


@pytest.fixture(scope="module")
def limited(demo_service, gate, tmp_path_factory) -> Iterator[tuple[Service, object, Path]]:
    gate.open.remote()
    jobs_dir = tmp_path_factory.mktemp("limited-jobs")
    for service in demo_service(overrides(jobs_dir, 10), models=MODELS):
        yield service, gate, jobs_dir


def test_a_redeployed_runner_hands_its_running_job_to_the_next(limited, model_cache) -> None:
    service, gate, jobs_dir = limited
    ray.get(gate.close.remote())
    job_id = submit(service, {"steps": 2, "seed": 4}).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the job to be running in the model")
    # first in the module: a redeploy waits for every deployment to reach its target, and once a layers
    # job has asked for a LayersModel replica that target cannot be placed until it scales back down
    # a changed runner option: Serve replaces the JobRunner replica (the old one's __del__ runs)
    args = merged(demo_args(), {"cache_dir": str(model_cache), **overrides(jobs_dir, 11)})
    # serve.run returns once the old replicas are gone, and the old RealModel replica drains only when
    # its held request ends: redeploy on a thread, open the gate once the new runner's run is held too
    redeploy = threading.Thread(target=serve.run, args=(build_graph(args, models=MODELS),),
                                kwargs={"name": "imgserve", "route_prefix": "/"})
    redeploy.start()
    wait_until(lambda: ray.get(gate.count.remote()) >= 2, "the next runner to run the handed-back job")
    gate.open.remote()
    redeploy.join()
    final = wait_state(service, job_id, "succeeded", "failed", "cancelled")
    assert final["state"] == "succeeded", final
    result = service.http.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200 and result.content


def test_a_job_waiting_for_a_deployment_without_a_running_replica_fails_run_timeout(limited) -> None:
    service, gate, _ = limited
    ray.get(gate.close.remote())
    response = submit(service, {"layers": 2, "steps": 2, "seed": 1, "prompt": "x"}, task="layers")
    assert response.status_code == 202, response.text
    final = wait_state(service, response.json()["id"], "succeeded", "failed", "cancelled")
    gate.open.remote()
    assert final["state"] == "failed", final
    error = final["error"]
    assert error["code"] == "run_timeout" and f"{MAX_RUN_S:g} s" in error["message"]
    assert "'LayersModel'" in error["message"] and "no replica placed and running" in error["message"], error


def test_a_cancel_meeting_the_end_of_the_run_wins(limited) -> None:
    service, gate, _ = limited
    ray.get(gate.close.remote())
    job_id = submit(service, {"steps": 2, "seed": 3}).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the run to finish its steps")
    assert job_status(service, job_id)["step"] == 2
    assert service.http.delete(f"/v1/jobs/{job_id}").status_code == 200
    gate.open.remote()
    final = wait_state(service, job_id, "succeeded", "failed", "cancelled")
    assert final["state"] == "cancelled", final
    assert service.http.get(f"/v1/jobs/{job_id}/result").status_code == 409
