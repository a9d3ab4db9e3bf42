"""Job submission options through real Ray Serve and HTTP: `Idempotency-Key` (the same request again
is the same job, 200 instead of 202; another request under the key is 422 `idempotency_conflict`
in both error vocabularies; keys are scoped per API key) and `priority` (one key's queue runs high,
normal, low). Jobs are held by the test gate, not by sleeps."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import ray

from serve_app.keys import hash_key
from tests.conftest import Service, wait_until
from tests.serve.conftest import assert_error, small_png, submit
from tests.serve.gate import GatedRealModel

KEYS = [f"isk_idem{i}_{secrets.token_urlsafe(24)}" for i in range(5)]
"""One key per test below, so each sees only its own jobs."""


@pytest.fixture(scope="module")
def keyed(demo_service, gate) -> Iterator[tuple[Service, object]]:
    gate.open.remote()
    overrides = {
        "ingress": {"api_keys_sha256": [hash_key(key) for key in KEYS]},
        "jobs": {"concurrency": 1, "max_queued": 20},
        "real": {"serve": {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}},
    }
    for service in demo_service(overrides, models={"real": GatedRealModel}):
        yield service, gate


def key(index: int, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {KEYS[index]}"}
    return {**headers, "Idempotency-Key": idempotency_key} if idempotency_key else headers


def status(service: Service, job_id: str, index: int) -> dict:
    response = service.http.get(f"/v1/jobs/{job_id}", headers=key(index))
    assert response.status_code == 200, response.text
    return response.json()


def finished(service: Service, job_id: str, index: int) -> dict:
    return wait_until(lambda: (s := status(service, job_id, index))["state"] in ("succeeded", "failed", "cancelled")
                      and s, f"{job_id} to end")


def listed(service: Service, index: int) -> list[str]:
    response = service.http.get("/v1/jobs", params={"limit": 100}, headers=key(index))
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["data"]]


def test_the_same_key_and_request_is_the_same_job_with_200(keyed) -> None:
    service, _ = keyed
    image = small_png(color=(10, 120, 200))
    first = submit(service, {"format": "png"}, task="anime", image=image, headers=key(0, "order-1"))
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    job_id = first.json()["id"]
    done = finished(service, job_id, 0)
    again = submit(service, {"format": "png"}, task="anime", image=image, headers=key(0, "order-1"))
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true" and again.headers["location"] == f"/v1/jobs/{job_id}"
    assert again.json() == done and "replayed" not in again.json()  # the job as it is now: finished
    assert listed(service, 0).count(job_id) == 1 and len(listed(service, 0)) == 1  # nothing new was created
    assert service.http.get(f"/v1/jobs/{job_id}/result", headers=key(0)).status_code == 200


def test_the_same_key_with_another_request_is_a_422_conflict(keyed) -> None:
    service, _ = keyed
    first = submit(service, {"format": "png"}, task="anime", headers=key(1, "conflict-1"))
    assert first.status_code == 202, first.text
    for changed in ({"format": "webp"}, {"format": "png", "priority": "high"}):
        refused = submit(service, changed, task="anime", headers=key(1, "conflict-1"))
        error = assert_error(refused, 422, "idempotency_conflict", "Idempotency-Key")
        assert error["type"] == "invalid_request_error" and error["param"] == "Idempotency-Key"
        assert "different request" in error["message"]
    other_image = submit(service, {"format": "png"}, task="anime", image=small_png(color=(1, 2, 3)),
                         headers=key(1, "conflict-1"))
    assert_error(other_image, 422, "idempotency_conflict", "Idempotency-Key")
    assert listed(service, 1) == [first.json()["id"]]
    assert_error(submit(service, {}, task="anime", headers=key(1, "has space")), 422, "invalid_parameter",
                 "Idempotency-Key")
    finished(service, first.json()["id"], 1)


def test_keys_are_scoped_per_api_key(keyed) -> None:
    service, _ = keyed
    image = small_png(color=(90, 90, 30))
    mine = submit(service, {"format": "png"}, task="anime", image=image, headers=key(2, "shared-key"))
    theirs = submit(service, {"format": "png"}, task="anime", image=image, headers=key(3, "shared-key"))
    assert (mine.status_code, theirs.status_code) == (202, 202), (mine.text, theirs.text)
    assert mine.json()["id"] != theirs.json()["id"]
    # each key's replay finds its own job
    for index, response in ((2, mine), (3, theirs)):
        again = submit(service, {"format": "png"}, task="anime", image=image, headers=key(index, "shared-key"))
        assert again.status_code == 200 and again.json()["id"] == response.json()["id"]
        finished(service, response.json()["id"], index)


def test_one_keys_queue_runs_high_then_normal_then_low(keyed) -> None:
    service, gate = keyed
    assert_error(submit(service, {"priority": "urgent"}, task="anime", headers=key(4)), 422, "invalid_parameter",
                 "priority")
    ray.get(gate.close.remote())
    held = submit(service, {"steps": 2}, headers=key(4)).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the held job to reach the model")
    ids = {}
    for priority in ("low", "normal", "high"):
        response = submit(service, {"priority": priority}, task="anime", headers=key(4))
        assert response.status_code == 202 and response.json()["priority"] == priority, response.text
        ids[priority] = response.json()["id"]
    positions = {p: status(service, job_id, 4)["queue_position"] for p, job_id in ids.items()}
    assert positions == {"high": 0, "normal": 1, "low": 2}
    gate.open.remote()
    finished(service, held, 4)
    started = {p: finished(service, job_id, 4) for p, job_id in ids.items()}
    assert all(s["state"] == "succeeded" for s in started.values()), started
    # one job at a time (concurrency 1): the order they ended in is the order they started in
    order = sorted(started, key=lambda p: started[p]["finished_at"])
    assert order == ["high", "normal", "low"]
