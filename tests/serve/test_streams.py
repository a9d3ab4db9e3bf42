"""Job event streams through real Ray Serve: caps per key and per ingress replica (429
`too_many_streams`), heartbeats on a quiet stream, the end of a stream's lifetime, and resuming
after it with Last-Event-ID without a repeated or a lost event. Jobs are held by the test gate. (The
client's reconnecting is tests/unit/test_ingress_client.py.)"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
import ray

from serve_app.keys import hash_key
from tests.conftest import Service, wait_until
from tests.serve.conftest import assert_error, submit
from tests.serve.gate import GatedRealModel

KEYS = [f"isk_streams{i}_{secrets.token_urlsafe(24)}" for i in range(2)]
PER_KEY = 2
PER_REPLICA = 3
LIFETIME_S = 3.0
HEARTBEAT_S = 0.5


@pytest.fixture(scope="module")
def streams(demo_service, gate) -> Iterator[tuple[Service, object]]:
    gate.open.remote()
    overrides = {
        "ingress": {"api_keys_sha256": [hash_key(key) for key in KEYS], "max_event_streams": PER_REPLICA,
                    "max_event_streams_per_key": PER_KEY, "event_stream_max_s": LIFETIME_S,
                    "event_heartbeat_s": HEARTBEAT_S},
        "jobs": {"concurrency": 1},
        "real": {"serve": {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}},
    }
    for service in demo_service(overrides, models={"real": GatedRealModel}):
        yield service, gate


def key(index: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[index]}"}


def held_job(service: Service, gate, index: int = 0) -> str:
    """A `real` job of key `index` held at the gate, running."""
    ray.get(gate.close.remote())
    response = submit(service, {"steps": 2, "seed": 3}, headers=key(index))
    assert response.status_code == 202, response.text
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the job to reach the model")
    return response.json()["id"]


def release(service: Service, gate, job_id: str, index: int = 0) -> None:
    gate.open.remote()
    wait_until(lambda: service.http.get(f"/v1/jobs/{job_id}", headers=key(index)).json()["state"] == "succeeded",
               f"{job_id} to succeed")


def open_stream(stack: ExitStack, service: Service, job_id: str, index: int) -> httpx.Response:
    return stack.enter_context(service.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=key(index)))


def test_streams_are_capped_per_key_and_per_replica(streams) -> None:
    service, gate = streams
    job_id = held_job(service, gate)
    with ExitStack() as stack:
        first = [open_stream(stack, service, job_id, 0) for _ in range(PER_KEY)]
        assert [r.status_code for r in first] == [200] * PER_KEY
        over_key = service.http.get(f"/v1/jobs/{job_id}/events", headers=key(0))
        assert_error(over_key, 429, "too_many_streams")
        assert int(over_key.headers["retry-after"]) >= 1
        # the status can still be polled
        assert service.http.get(f"/v1/jobs/{job_id}", headers=key(0)).status_code == 200
        # the other key has its own allowance, up to the replica's total
        other_job = submit(service, {"steps": 2}, headers=key(1)).json()["id"]
        assert open_stream(stack, service, other_job, 1).status_code == 200
        assert_error(service.http.get(f"/v1/jobs/{other_job}/events", headers=key(1)), 429, "too_many_streams")
        # a closed stream gives its place back
        first[0].close()
        wait_until(lambda: (r := service.http.get(f"/v1/jobs/{job_id}/events", headers=key(0))).status_code != 429
                   and r, "the closed stream's place to come back").close()
    release(service, gate, job_id)
    wait_until(lambda: service.http.get(f"/v1/jobs/{other_job}", headers=key(1)).json()["state"] == "succeeded",
               "the other key's job to succeed")


def read_stream(service: Service, job_id: str, headers: dict[str, str]) -> list[str]:
    """Every line of one event stream, until the service ends it."""
    with service.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return list(response.iter_lines())


def events_of(lines: list[str]) -> list[tuple[int, dict]]:
    ids = [int(line[4:]) for line in lines if line.startswith("id: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert len(ids) == len(data)
    return list(zip(ids, data))


def test_a_quiet_stream_has_heartbeats_ends_at_its_lifetime_and_resumes_after_its_last_event(streams) -> None:
    service, gate = streams
    job_id = held_job(service, gate)
    first = read_stream(service, job_id, key(0))  # the job is held: the stream ends at its lifetime
    assert ": keep-alive" in first
    assert first[-2].startswith(": stream lifetime reached")  # a comment, then the blank line ending it
    before = events_of(first)
    assert before and before[-1][1]["state"] == "running"
    last_id = before[-1][0]
    # resume after the last event; the job finishes meanwhile
    gate.open.remote()
    after = events_of(read_stream(service, job_id, {**key(0), "Last-Event-ID": str(last_id)}))
    assert after[0][0] == last_id + 1 and after[-1][1]["state"] == "succeeded"
    stages = [(e["state"], e["stage"], e["step"]) for _, e in before + after]
    assert len(set(stages)) == len(stages)  # nothing repeated
    assert [step for state, stage, step in stages if stage == "denoise"] == [1, 2]  # nothing lost
    bad = service.http.get(f"/v1/jobs/{job_id}/events", headers={**key(0), "Last-Event-ID": "nope"})
    assert_error(bad, 422, "invalid_parameter", "Last-Event-ID")
