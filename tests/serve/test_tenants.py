"""Jobs belong to their API key, through real Ray Serve: another key gets 404 on a job's status,
events, result and cancel; GET /v1/jobs lists the caller's jobs, newest first, a page at a time,
by state and task; `jobs.max_queued_per_key` refuses the key over it (429 `quota_exceeded`) while
another key still submits. Jobs are held by the test gate, not by sleeps."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import ray

from serve_app.client import Client
from serve_app.keys import hash_key
from tests.conftest import Service, wait_until
from tests.serve.conftest import assert_error, submit
from tests.serve.gate import GatedRealModel

KEYS = [f"isk_tenant{i}_{secrets.token_urlsafe(24)}" for i in range(3)]
PER_KEY = 2


@pytest.fixture(scope="module")
def tenants(demo_service, gate) -> Iterator[tuple[Service, object]]:
    gate.open.remote()
    overrides = {
        "ingress": {"api_keys_sha256": [hash_key(key) for key in KEYS]},
        "jobs": {"concurrency": 1, "max_queued": 20, "max_queued_per_key": PER_KEY},
        "real": {"serve": {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}},
    }
    for service in demo_service(overrides, models={"real": GatedRealModel}):
        yield service, gate


def key(index: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[index]}"}


def state(service: Service, job_id: str, index: int) -> str:
    response = service.http.get(f"/v1/jobs/{job_id}", headers=key(index))
    assert response.status_code == 200, response.text
    return response.json()["state"]


def finished(service: Service, job_id: str, index: int) -> None:
    wait_until(lambda: state(service, job_id, index) in ("succeeded", "failed", "cancelled"), f"{job_id} to end")


def test_another_keys_job_is_not_found_on_every_route(tenants) -> None:
    service, _ = tenants
    job_id = submit(service, {}, task="anime", headers=key(0)).json()["id"]
    finished(service, job_id, 0)
    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/result"), ("DELETE", "")):
        theirs = service.http.request(method, f"/v1/jobs/{job_id}{path}", headers=key(1))
        assert_error(theirs, 404, "not_found")
        unknown = service.http.request(method, f"/v1/jobs/{secrets.token_hex(16)}{path}", headers=key(1))
        assert unknown.status_code == 404  # the same answer as for a job that does not exist
    assert service.http.get(f"/v1/jobs/{job_id}/result", headers=key(0)).status_code == 200
    assert "owner" not in service.http.get(f"/v1/jobs/{job_id}", headers=key(0)).json()


def listing(service: Service, index: int, **params) -> dict:
    response = service.http.get("/v1/jobs", params=params, headers=key(index))
    assert response.status_code == 200, response.text
    return response.json()


def test_the_listing_shows_the_callers_jobs_newest_first_by_page_state_and_task(tenants) -> None:
    service, gate = tenants
    mine = []
    for task, fields in (("anime", {}), ("anime", {}), ("layers", {"layers": 2, "steps": 2, "prompt": "x"})):
        mine.append(submit(service, fields, task=task, headers=key(2)).json()["id"])
        finished(service, mine[-1], 2)
    theirs = submit(service, {}, task="anime", headers=key(1)).json()["id"]
    finished(service, theirs, 1)
    everything = listing(service, 2)
    assert everything["object"] == "list" and everything["next_cursor"] is None
    assert [job["id"] for job in everything["data"]] == mine[::-1]
    # a page at a time
    first = listing(service, 2, limit=2)
    assert [job["id"] for job in first["data"]] == mine[:0:-1] and first["next_cursor"]
    second = listing(service, 2, limit=2, cursor=first["next_cursor"])
    assert [job["id"] for job in second["data"]] == mine[:1] and second["next_cursor"] is None
    # by task and by state
    assert [job["id"] for job in listing(service, 2, task="layers")["data"]] == [mine[2]]
    assert [job["id"] for job in listing(service, 2, task="anime")["data"]] == [mine[1], mine[0]]
    ray.get(gate.close.remote())
    held = submit(service, {"steps": 2}, headers=key(2)).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the job to reach the model")
    waiting = submit(service, {"steps": 2}, headers=key(2)).json()["id"]
    assert [job["id"] for job in listing(service, 2, state="running")["data"]] == [held]
    assert [job["id"] for job in listing(service, 2, state="queued")["data"]] == [waiting]
    assert len(listing(service, 2, state="succeeded")["data"]) == 3
    # the typed client lists the same
    with Client(service.url, api_key=KEYS[2]) as client:
        assert [job["id"] for job in client.all_jobs()] == [waiting, held, *mine[::-1]]
    # bad queries, in the one error shape
    assert_error(service.http.get("/v1/jobs", params={"limit": 0}, headers=key(2)), 422, "invalid_parameter", "limit")
    assert_error(service.http.get("/v1/jobs", params={"state": "done"}, headers=key(2)), 422, "invalid_parameter",
                 "state")
    assert_error(service.http.get("/v1/jobs", params={"cursor": "not-a-cursor"}, headers=key(2)), 422,
                 "invalid_parameter", "cursor")
    assert_error(service.http.get("/v1/jobs"), 401, "unauthorized")
    gate.open.remote()
    for job_id in (held, waiting):
        finished(service, job_id, 2)


def test_a_key_over_its_queued_quota_is_refused_while_another_key_submits(tenants) -> None:
    service, gate = tenants
    ray.get(gate.close.remote())
    running = submit(service, {"steps": 2}, headers=key(0)).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the job to reach the model")
    queued = [submit(service, {"steps": 2}, headers=key(0)) for _ in range(PER_KEY)]
    assert [r.status_code for r in queued] == [202] * PER_KEY
    over = submit(service, {"steps": 2}, headers=key(0))
    assert_error(over, 429, "quota_exceeded")
    assert int(over.headers["retry-after"]) >= 1
    other = submit(service, {"steps": 2}, headers=key(1))
    assert other.status_code == 202, other.text
    # a queued job cancelled: the key may submit again
    assert service.http.delete(f"/v1/jobs/{queued[0].json()['id']}", headers=key(0)).json()["state"] == "cancelled"
    again = submit(service, {"steps": 2}, headers=key(0))
    assert again.status_code == 202, again.text
    gate.open.remote()
    for job_id, index in ((running, 0), (queued[1].json()["id"], 0), (again.json()["id"], 0),
                          (other.json()["id"], 1)):
        finished(service, job_id, index)
