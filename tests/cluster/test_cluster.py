"""imgserve on a real multi-node Ray cluster (head + 2 workers on this machine, fake GPUs).

The cluster config deploys; GPU replicas (the diffusion models and the TextEncoder stage, on a card
of its own, encoding for both) land on worker nodes with the GPUs their plan asks for and never on
the head; the real model scales out under a burst and back in when idle; the LoRA versions, in a
directory only the workers know of, are listed and served; Ray's control plane (dashboard, job API,
GCS) refuses callers without the cluster's token while the service answers; losing a worker node
mid-traffic fails only what it held, with a clear error, while the service keeps answering and the
replicas come back on the remaining node.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import ray
from PIL import Image
from ray import serve
from ray.util.state import list_actors

from tests.cluster.conftest import ADDRESS, DASHBOARD, ENV, LORA_DIR_VARIABLE, PORT, WORKER_GPUS, local_sh
from tests.cluster.local import AUTH_VARIABLES
from tests.conftest import Service, wait_until
from tests.serve.conftest import small_png, submit, wait_state

pytestmark = pytest.mark.cluster


def post_real(service: Service, seed: int = 0) -> httpx.Response:
    """A 2-step `real` request for a small 96×64 PNG."""
    return service.post_image(small_png(), {"steps": 2, "seed": seed}, content_type="image/png")


def nodes() -> dict[str, dict[str, Any]]:
    return {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}


def head_id() -> str:
    return next(node_id for node_id, node in nodes().items() if "imgserve_head" in node["Resources"])


def running(deployment: str) -> int:
    status = serve.status().applications["imgserve"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def alive_actors(class_part: str) -> list[Any]:
    """Alive actors whose class name contains `class_part` (Ray's state API, through the dashboard)."""
    return [actor for actor in list_actors(address=ADDRESS, filters=[("state", "=", "ALIVE")])
            if class_part in actor.class_name]


def replica_stats(deployment: str) -> dict[str, Any]:
    return serve.get_deployment_handle(deployment, "imgserve").stats.remote().result(timeout_s=60)


def test_cluster_config_deploys_with_gpu_replicas_on_workers_only(cluster) -> None:
    response = post_real(cluster["service"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (96, 64)
    # a `layers` request without a prompt: the stage captions the image, then encodes the caption
    layers = cluster["service"].post_image(small_png(), {"steps": 2, "seed": 1, "layers": 2, "format": "zip"},
                                           task="layers", content_type="image/png")
    assert layers.status_code == 200, layers.text
    assert layers.headers["content-type"] == "application/zip"

    head = head_id()
    for deployment in ("RealModel", "LayersModel"):
        stats = replica_stats(deployment)
        node = nodes()[stats["node_id"]]
        assert stats["node_id"] != head, f"{deployment} landed on the head node"
        assert node["Resources"].get("rtx4090") == WORKER_GPUS
        # the 2x24 plan without the encoder: two cards per replica, both visible to the one process
        assert stats["plan"]["gpus_used"] == 2 and stats["plan"]["text_encoder_mode"] == "stage"
        assert stats["text_encoder"] == "stage"  # the replica loaded no text encoder
        assert len(stats["gpu_ids"]) == 2
        assert sorted(stats["cuda_visible_devices"].split(",")) == sorted(stats["gpu_ids"])
    # one TextEncoder for both tasks (the tiny encoders are the same bytes), on a worker's card
    deployments = serve.status().applications["imgserve"].deployments
    assert "TextEncoder" in deployments and not [name for name in deployments if name.startswith("TextEncoder_")]
    encoder = replica_stats("TextEncoder")
    assert encoder["node_id"] != head, "TextEncoder landed on the head node"
    assert nodes()[encoder["node_id"]]["Resources"].get("rtx4090") == WORKER_GPUS
    assert encoder["plan"]["device"] == "cuda" and encoder["plan"]["gpus"] == 1
    assert len(encoder["gpu_ids"]) == 1 and encoder["cuda_visible_devices"] == encoder["gpu_ids"][0]
    assert encoder["encoders"] == 1 and set(encoder["tasks"]) == {"real", "layers"}
    assert response.headers["x-imgserve-encoder"] == encoder["replica"] == layers.headers["x-imgserve-encoder"]
    # the ingress and the job runner asked for the head's marker resource: they outlive a worker
    for deployment in ("Ingress", "JobRunner"):
        actors = alive_actors(deployment)
        assert actors and all(actor.node_id == head for actor in actors), deployment


def test_real_scales_out_under_a_burst_and_back_in_when_idle(cluster) -> None:
    service, gate = cluster["service"], cluster["gate"]
    assert running("RealModel") == 1
    ray.get(gate.close.remote())
    with ThreadPoolExecutor(4) as pool:
        try:
            futures = [pool.submit(post_real, service, seed) for seed in range(4)]
            # held requests count as ongoing: 4 against target_ongoing_requests 1, max_replicas 2
            wait_until(lambda: running("RealModel") == 2, "a second RealModel replica")
        finally:
            ray.get(gate.open.remote())
        statuses = [future.result().status_code for future in futures]
    assert statuses == [200] * 4
    # the new replica sits on a worker too, with its own two cards
    placements = {actor.node_id for actor in alive_actors("RealModel")}
    assert head_id() not in placements
    wait_until(lambda: running("RealModel") == 1, "RealModel to scale back to 1 replica when idle")


def test_the_worker_environment_reaches_the_workers_only(cluster) -> None:
    @ray.remote(num_cpus=0)
    def lora_dir() -> str | None:
        return os.environ.get(LORA_DIR_VARIABLE)

    on_head = lora_dir.options(resources={"imgserve_head": 0.001}).remote()
    on_worker = lora_dir.options(resources={"rtx4090": 0.001}).remote()
    assert ray.get(on_head, timeout=60) is None
    assert ray.get(on_worker, timeout=60) == str(cluster["loras"])


def test_versions_only_the_workers_hold_are_listed_and_served(cluster) -> None:
    service = cluster["service"]
    models = service.http.get("/v1/models")
    assert models.status_code == 200, models.text
    lora = models.json()["tasks"]["real"]["lora"]
    assert lora["versions"] == ["none", "v2511-0715", "v2511-0801", "v2511-0823"]
    response = service.post_image(small_png(), {"steps": 2, "seed": 3, "lora": "v2511-0801"}, content_type="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["x-imgserve-lora"] == "v2511-0801"


def ray_cli(*args: str, token: str | None) -> subprocess.CompletedProcess:
    """`ray ARGS` in a process of its own, with `token` (None: token authentication off on its side)."""
    env = {name: value for name, value in os.environ.items() if name not in AUTH_VARIABLES}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {"RAY_AUTH_MODE": "disabled"})
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_control_plane_refuses_callers_without_the_token(cluster) -> None:
    token = ENV["RAY_AUTH_TOKEN"]
    wrong = "0" * len(token)
    with httpx.Client(base_url=DASHBOARD, timeout=30) as dashboard:
        for path in ("/api/version", "/api/jobs/", "/api/serve/applications/"):
            assert dashboard.get(path).status_code == 401, path
            assert dashboard.get(path, headers={"Authorization": f"Bearer {wrong}"}).status_code == 403, path
            assert dashboard.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200, path
        # submitting code (a job) without the token: refused, and no job was made (the one job
        # listed is this test process, a driver)
        submitted = dashboard.post("/api/jobs/", json={"entrypoint": "python -c 'print(1)'"})
        assert submitted.status_code == 401
        jobs = dashboard.get("/api/jobs/", headers={"Authorization": f"Bearer {token}"}).json()
        assert [job["type"] for job in jobs] == ["DRIVER"]
    # the GCS (what ray.init and the CLI talk to) refuses a client without the token or with another
    for refused in (ray_cli("status", f"--address={ADDRESS}", token=None),
                    ray_cli("status", f"--address={ADDRESS}", token=wrong)):
        assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-500:]
    assert ray_cli("status", f"--address={ADDRESS}", token=token).returncode == 0
    # meanwhile the service answers, and its deployments are healthy
    assert post_real(cluster["service"], seed=9).status_code == 200
    assert serve.status().applications["imgserve"].status == "RUNNING"


def test_losing_a_worker_mid_traffic(cluster) -> None:
    service, gate = cluster["service"], cluster["gate"]
    real_node = replica_stats("RealModel")["node_id"]
    encoder_node = replica_stats("TextEncoder")["node_id"]
    worker = nodes()[real_node]["NodeManagerPort"] - PORT - 10  # local.sh numbers node ports this way
    results: list[httpx.Response | Exception] = []
    stop = threading.Event()

    def traffic() -> None:
        seed = 100
        while not stop.is_set():
            try:
                results.append(post_real(service, seed))
            except httpx.HTTPError as error:  # a hang or a dropped connection would land here
                results.append(error)
            seed += 1

    # a job is held inside the model on the doomed node when the node goes, with traffic around it
    ray.get(gate.close.remote())
    job = submit(service, {"steps": 2, "seed": 5})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    threads = [threading.Thread(target=traffic) for _ in range(2)]
    try:
        wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the job inside the model")
        for thread in threads:
            thread.start()
        local_sh("stop-worker", str(worker))
    finally:
        ray.get(gate.open.remote())
    # the service keeps answering, and a replica comes back on the remaining capacity
    wait_until(lambda: real_node not in nodes(), "the cluster to notice the lost node", timeout=120)
    wait_until(lambda: post_real(service, 7).status_code == 200, "a request to succeed after the loss", timeout=180)
    stop.set()
    for thread in threads:
        thread.join(timeout=180)
    stats = replica_stats("RealModel")
    assert stats["node_id"] != real_node and stats["node_id"] in nodes() and stats["node_id"] != head_id()
    # the encoder stage too (whether or not it was on the lost node), on the remaining worker's cards
    encoder = replica_stats("TextEncoder")
    assert encoder["node_id"] in nodes() and encoder["node_id"] != head_id()
    # every request answered: a result, or a clear JSON error (no hang, no dropped connection)
    print("statuses during the loss:", Counter(getattr(r, "status_code", type(r).__name__) for r in results),
          "(the TextEncoder was", "on" if encoder_node == real_node else "not on", "the lost node)")
    assert results and not [r for r in results if isinstance(r, Exception)]
    for response in results:
        assert response.status_code == 200 or (
            response.status_code == 503 and response.json()["error"]["code"] in ("unavailable", "queue_full")
            and "Retry-After" in response.headers
        ), (response.status_code, response.text[:300])
    assert any(response.status_code == 200 for response in results)
    # the job lost its replica with the node, was retried on the new one, and succeeded
    final = wait_state(service, job_id, "succeeded", "failed")
    assert final["state"] == "succeeded", final
    result = service.http.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200 and Image.open(io.BytesIO(result.content)).size == (96, 64)
