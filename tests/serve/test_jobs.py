"""Jobs through real Ray Serve: events, queue positions, cancellation, admission, and nothing lost
when a model replica, the ingress or the job runner dies. Signals (a gate), not sleeps."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import ray

from tests.conftest import Service, wait_until
from tests.serve.conftest import job_status, small_png, submit, wait_state
from tests.serve.gate import GatedRealModel

STEPS = 3


@pytest.fixture(scope="module")
def jobs(demo_service, gate) -> Iterator[tuple[Service, object]]:
    gate.open.remote()
    overrides = {"jobs": {"max_queued": 2, "concurrency": 1},
                 "real": {"serve": {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}}}
    for service in demo_service(overrides, models={"real": GatedRealModel}):
        yield service, gate


def events(service: Service, job_id: str) -> list[dict]:
    with service.http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


def replica_actor(deployment: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::imgserve#{deployment}#")]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def test_real_job_events_result_and_sync_equality(jobs) -> None:
    service, _ = jobs
    fields = {"steps": STEPS, "seed": 21, "lora": "v2511-0801"}
    response = submit(service, fields)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    stream = events(service, job_id)
    stages = [(e["state"], e["stage"], e["step"]) for e in stream]
    assert stages[0][0] == "queued" and stages[-1] == ("succeeded", "done", None)
    running = [(stage, step) for state, stage, step in stages if state == "running"]
    assert [s for s, _ in running if s != "denoise"] == ["queued", "preprocess", "encode_prompt", "decode", "postprocess"]
    assert [step for s, step in running if s == "denoise"] == list(range(1, STEPS + 1))
    final = job_status(service, job_id)
    assert final["state"] == "succeeded" and final["finished_at"] >= final["created_at"]
    result = service.http.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200 and result.headers["x-imgserve-lora"] == "v2511-0801"
    sync = service.post_image(small_png(), fields, content_type="image/png")
    assert result.content == sync.content


def test_layers_job_events(jobs) -> None:
    service, _ = jobs
    response = submit(service, {"layers": 2, "steps": 2, "seed": 1, "prompt": "x", "format": "psd"}, task="layers")
    assert response.status_code == 202, response.text
    stream = events(service, response.json()["id"])
    running = [(e["stage"], e["step"]) for e in stream if e["state"] == "running"]
    assert ("denoise", 2) in running and running[-1] == ("postprocess", None)
    assert stream[-1]["state"] == "succeeded"
    result = service.http.get(f"/v1/jobs/{response.json()['id']}/result")
    assert result.headers["content-type"] == "image/vnd.adobe.photoshop"


def test_bad_submissions_are_refused_before_queueing(jobs) -> None:
    service, _ = jobs
    assert submit(service, {"steps": 0}).json()["error"]["field"] == "steps"
    assert service.http.post("/v1/jobs", files={"image": ("a.png", small_png(), "image/png")}).status_code == 422
    assert submit(service, {}, task="sketch").status_code == 404
    assert service.http.get("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    assert service.http.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_queue_positions_admission_and_cancel_while_queued_and_running(jobs) -> None:
    service, gate = jobs
    ray.get(gate.close.remote())
    first = submit(service, {"steps": STEPS, "seed": 1}).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the first job to reach the model")
    second = submit(service, {"steps": STEPS, "seed": 2}).json()["id"]
    third = submit(service, {"steps": STEPS, "seed": 3}).json()["id"]
    assert job_status(service, first)["state"] == "running" and job_status(service, first)["queue_position"] is None
    assert job_status(service, second)["queue_position"] == 0
    assert job_status(service, third)["queue_position"] == 1
    # admission: the queue holds 2; the next submission is refused, nothing accepted is dropped
    refused = submit(service, {"steps": STEPS, "seed": 4})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "queue_full"
    # cancel while queued: immediately
    assert service.http.delete(f"/v1/jobs/{second}").json()["state"] == "cancelled"
    assert job_status(service, third)["queue_position"] == 0
    # cancel while running: stops at the next denoising step, and the next job starts
    service.http.delete(f"/v1/jobs/{first}")
    gate.open.remote()
    cancelled = wait_state(service, first, "cancelled", "succeeded", "failed")
    assert cancelled["state"] == "cancelled" and cancelled["step"] == 1
    assert wait_state(service, third, "succeeded", "failed")["state"] == "succeeded"
    not_ready = service.http.get(f"/v1/jobs/{first}/result")
    assert not_ready.status_code == 409 and not_ready.json()["error"]["code"] == "not_ready"


def test_a_killed_model_replica_is_retried_and_gives_the_same_bytes(jobs) -> None:
    service, gate = jobs
    ray.get(gate.close.remote())
    fields = {"steps": STEPS, "seed": 77, "lora": "none"}
    job_id = submit(service, fields).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the job to reach the model")
    ray.kill(replica_actor("RealModel"), no_restart=False)
    gate.open.remote()
    final = wait_state(service, job_id, "succeeded", "failed")
    assert final["state"] == "succeeded", final
    again = service.post_image(small_png(), fields, content_type="image/png")
    assert again.status_code == 200
    assert service.http.get(f"/v1/jobs/{job_id}/result").content == again.content


def test_jobs_survive_restarts_of_the_ingress_and_the_runner(jobs) -> None:
    service, gate = jobs
    done = submit(service, {"steps": 2, "seed": 5}).json()["id"]
    wait_state(service, done, "succeeded")
    ray.get(gate.close.remote())
    running = submit(service, {"steps": 2, "seed": 6}).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the job to reach the model")
    ray.kill(replica_actor("Ingress"), no_restart=False)
    ray.kill(replica_actor("JobRunner"), no_restart=False)
    gate.open.remote()
    # after the restarts (the proxy answers 503/404 until the new replicas are up)
    wait_until(lambda: service.http.get(f"/v1/jobs/{done}").status_code == 200, "the ingress and runner to return")
    assert service.http.get(f"/v1/jobs/{done}/result").status_code == 200
    final = wait_state(service, running, "succeeded", "failed")
    assert final["state"] == "succeeded", final  # re-queued by the new runner and run again


def test_client_and_cli_submit_follow_progress_and_save(jobs, tmp_path, capsys) -> None:
    from serve_app import cli
    from serve_app.client import Client

    service, _ = jobs
    with Client(service.url) as client:
        job = client.submit("real", small_png(), steps=STEPS, seed=9)
        seen = []
        result = job.wait(seen.append)
        assert seen[-1]["state"] == "succeeded" and any(e["stage"] == "denoise" for e in seen)
        assert result.data == service.post_image(small_png(), {"steps": STEPS, "seed": 9},
                                                 content_type="image/png").content
    source, output = tmp_path / "in.png", tmp_path / "out.zip"
    source.write_bytes(small_png())
    code = cli.main(["--url", service.url, "submit", str(source), "--task", "layers", "-o", str(output),
                     "--set", "layers=2", "--set", "steps=2", "--set", "prompt=x"])
    assert code == 0 and output.read_bytes()[:2] == b"PK"
    err = capsys.readouterr().err
    assert "step 2/2" in err and "succeeded" in err
