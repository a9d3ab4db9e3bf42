"""Prometheus metrics through real Ray Serve: what an operator scraping the node's metrics port sees
after known traffic (requests by task and status, refusals, stage latencies, LoRA loads/hits/
evictions, jobs), and that every metric the Grafana dashboard queries is really exported."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from deployments import metrics
from deployments.lora import TINY_VERSIONS
from tests import conftest as root
from tests.conftest import REPO, Service, wait_until
from tests.serve.conftest import small_png, submit, wait_state
from tests.serve.gate import GatedRealModel
from tests.unit.test_dashboard import dashboard_metric_names

A, B, C = TINY_VERSIONS
BURST = 5
DEADLINE_S = 180  # Ray's agent receives each process's metrics every few seconds: a bound, not a timing
REAL = {"steps": 2, "seed": 3}
REAL_STAGES = ("preprocess", "encode_prompt", "encode_image", "denoise", "decode", "postprocess")
LAYERS_STAGES = ("preprocess", "encode_prompt", "encode_image", "denoise", "decode", "postprocess")
# Dashboard series that this traffic on this machine cannot produce: peak GPU memory needs CUDA.
NEEDS_CUDA = {"ray_imgserve_gpu_peak_bytes_bucket"}


def scrape() -> str:
    url = f"http://127.0.0.1:{root.METRICS_PORT}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def app_replicas() -> set[str]:
    """Replica ids of the live imgserve app (earlier modules' replicas left series behind)."""
    return {actor["name"].rsplit("#", 1)[1] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::imgserve#")}


class Scrape:
    """One scrape, kept to this module's replicas: sample name → [(labels, value)]."""

    def __init__(self, text: str, replicas: set[str]) -> None:
        self.text = text
        self.families: set[str] = set()
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.families.add(sample.name)
                if "replica" in sample.labels and sample.labels["replica"] not in replicas:
                    continue
                self.samples[sample.name].append((sample.labels, sample.value))

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of `name` whose labels include `labels`."""
        return sum(value for have, value in self.samples.get(name, [])
                   if all(have.get(key) == want for key, want in labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {have[label] for have, _ in self.samples.get(name, []) if label in have}


@pytest.fixture(scope="module")
def traffic(demo_service, gate, tmp_path_factory):
    """Deploys imgserve (a gated `real` with a one-deep queue) and sends known traffic; yields
    the service and what a scrape must then show."""
    real_serve = {"max_ongoing_requests": 1, "max_queued_requests": 1, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}}
    jobs = tmp_path_factory.mktemp("metrics-jobs")
    for service in demo_service({"real": {"serve": real_serve}, "jobs": {"directory": str(jobs)}},
                                models={"real": GatedRealModel}):
        expected = send_traffic(service, gate, jobs)
        yield service, expected



def send_traffic(service: Service, gate, jobs: Path) -> dict[str, float]:
    image = small_png()
    post = lambda fields, task="real": service.post_image(image, fields, task=task, content_type="image/png")  # noqa: E731
    # 1. a burst against the closed gate: one request in the model, one queued, the rest refused
    with ThreadPoolExecutor(BURST) as pool:
        futures = [pool.submit(post, {**REAL, "lora": "none", "seed": i}) for i in range(BURST)]
        wait_until(lambda: ray.get(gate.count.remote()) >= 1, "a request to enter the model")
        wait_until(lambda: sum(f.done() for f in futures) >= BURST - 2, "the burst's refusals")
        refused = [f.result() for f in futures if f.done()]
        assert refused and all(r.status_code == 503 for r in refused), [r.status_code for r in refused]
        gate.open.remote()
        done, pending = wait(futures, timeout=DEADLINE_S)
        assert not pending
    accepted = sum(f.result().status_code == 200 for f in futures)
    assert accepted + len(refused) == BURST
    abandon(service, gate, image)
    # 2. LoRA: A from disk, A resident, B from disk, C from disk evicting A (two resident per replica)
    for version, load in ((A, "cold"), (A, "warm"), (B, "cold"), (C, "cold")):
        response = post({**REAL, "lora": version})
        assert response.status_code == 200, response.text
        assert response.headers["x-imgserve-lora-load"] == load
    # 3. the other tasks, a bad request, an unknown task, a job
    assert post({}, task="anime").status_code == 200
    layers = post({"layers": 2, "steps": 2, "seed": 1, "prompt": "a poster"}, task="layers")
    assert layers.status_code == 200, layers.text
    assert post({"steps": 0}).status_code == 422
    assert post({}, task="sketch").status_code == 404
    job = submit(service, {}, task="anime", image=image)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    wait_state(service, job_id, "succeeded")
    # 4. a result lost on disk (the test deletes it): never served, the job runs again
    (jobs / "files" / f"{job_id}.result").unlink()
    assert service.http.get(f"/v1/jobs/{job_id}/result").status_code == 409
    wait_state(service, job_id, "succeeded")
    assert service.http.get(f"/v1/jobs/{job_id}/result").content
    return {"refused": len(refused), "real_ok": accepted + 4, "abandoned": 1}


def abandon(service: Service, gate, image: bytes) -> None:
    """A client that hangs up while its request is in the model (held at the closed gate)."""
    request_id = f"abandoned-{os.getpid()}"
    ray.get(gate.close.remote())
    port = int(service.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall((f"POST /v1/real?steps={REAL['steps']}&seed=99&lora=none HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Content-Type: image/png\r\nX-Request-Id: {request_id}\r\n"
                      f"Content-Length: {len(image)}\r\n\r\n").encode() + image)
        wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the request to enter the model")
    # Serve cancels the ingress's task; the ingress logs the request (and counts it) as 499
    logs = root.RAY_LOGS / "serve"
    wait_until(lambda: any(request_id in line and " /v1/real 499 " in line
                           for path in logs.glob("replica_imgserve_Ingress_*.log")
                           for line in path.read_text(errors="replace").splitlines()),
               "the ingress to log the abandoned request as 499", interval=0.5)
    gate.open.remote()  # the model stops the abandoned request at its first stage (nobody waits for it)


def shows_all_traffic(result: Scrape) -> bool:
    """Each process's last record of the module's traffic is in `result` (a process reports all its
    metrics at once)."""
    return (result.total("ray_imgserve_requests_total", api="jobs", status="202") >= 1  # Ingress
            and result.total("ray_imgserve_stage_seconds_count", task="anime", stage="preprocess") >= 3
            and result.total("ray_imgserve_stage_seconds_count", task="anime", stage="postprocess") >= 3
            and result.total("ray_imgserve_stage_seconds_count", task="anime", stage="stylize") >= 3
            and result.total("ray_imgserve_stage_seconds_count", task="layers", stage="decode") >= 1
            and result.total("ray_imgserve_stage_seconds_count", task="layers", stage="encode_prompt") >= 1  # TextEncoder
            and result.total("ray_imgserve_lora_events_total", event="evict") >= 1  # RealModel
            and result.total("ray_imgserve_jobs_finished_total") >= 2  # JobRunner
            and result.total("ray_imgserve_job_limits_total") >= 1
            and result.total("ray_imgserve_model_seconds_total", task="anime") > 0
            # the queue gauges, present and back to empty (the dispatcher refreshes them every second)
            and "ray_imgserve_jobs_queued" in result.samples and "ray_imgserve_jobs_running" in result.samples
            and result.total("ray_imgserve_jobs_queued") == result.total("ray_imgserve_jobs_running") == 0
            and "ray_serve_num_http_requests_total" in result.samples)


@pytest.fixture(scope="module")
def scraped(traffic) -> Scrape:
    """The first scrape that shows all of the module's traffic (Ray flushes every few seconds)."""
    replicas = app_replicas()
    last: list[Scrape] = []

    def complete() -> Scrape | None:
        last[:] = [Scrape(scrape(), replicas)]
        return last[0] if shows_all_traffic(last[0]) else None

    try:
        result = wait_until(complete, "the metrics of the module's traffic", timeout=DEADLINE_S, interval=1.0)
    except AssertionError as error:  # with what the last scrape did show
        raise AssertionError(f"{error}; the imgserve lines of the last scrape:\n" + "\n".join(
            line for shown in last for line in shown.text.splitlines() if "imgserve" in line)) from None
    dump = os.environ.get("IMGSERVE_METRICS_DUMP")
    if dump:
        Path(dump).write_text(result.text)
    return result


def test_requests_are_counted_by_task_status_and_api(traffic, scraped: Scrape) -> None:
    _, expected = traffic
    count = scraped.total
    assert count("ray_imgserve_requests_total", task="real", status="200", api="sync") == expected["real_ok"]
    assert count("ray_imgserve_requests_total", task="real", status="503", api="sync") == expected["refused"]
    assert count("ray_imgserve_requests_total", task="real", status="422", api="sync") == 1
    # a client that hung up is not a server error
    assert count("ray_imgserve_requests_total", task="real", status="499", api="sync") == expected["abandoned"]
    assert count("ray_imgserve_requests_total", task="real", status="500", api="sync") == 0
    assert count("ray_imgserve_requests_total", task="unknown", status="404", api="sync") == 1
    assert count("ray_imgserve_requests_total", task="anime", status="200", api="sync") == 1
    assert count("ray_imgserve_requests_total", task="layers", status="200", api="sync") == 1
    assert count("ray_imgserve_requests_total", task="anime", status="202", api="jobs") == 1
    # every request is also one latency observation, under the same labels
    assert count("ray_imgserve_request_seconds_count", task="real", status="200") == expected["real_ok"]
    assert count("ray_imgserve_request_seconds_bucket", task="real", status="200", le="+Inf") == expected["real_ok"]
    # the label values a client can influence stay the known ones
    assert scraped.label_values("ray_imgserve_requests_total", "task") <= {"real", "anime", "layers", "unknown"}


def test_refusals_are_counted_by_reason(traffic, scraped: Scrape) -> None:
    _, expected = traffic
    assert scraped.total("ray_imgserve_rejections_total", task="real", reason="queue_full") == expected["refused"]
    assert scraped.label_values("ray_imgserve_rejections_total", "reason") == {"queue_full"}


def test_every_stage_has_a_latency_histogram(traffic, scraped: Scrape) -> None:
    _, expected = traffic
    count = scraped.total
    for stage in REAL_STAGES:
        observed = count("ray_imgserve_stage_seconds_count", task="real", stage=stage)
        # refused requests were preprocessed, and their prompts encoded by the text encoder stage,
        # before the model's queue refused them; so was the abandoned one, which the model then
        # stopped before its first stage (its client had gone while it waited at the gate)
        before_model = stage in ("preprocess", "encode_prompt")
        refused = expected["refused"] if before_model else 0
        abandoned = expected["abandoned"] if before_model else 0
        assert observed == expected["real_ok"] + refused + abandoned, stage
    for stage in LAYERS_STAGES:
        assert count("ray_imgserve_stage_seconds_count", task="layers", stage=stage) == 1, stage
    for stage in ("preprocess", "stylize", "postprocess"):  # the synchronous request, the job and its re-run
        assert count("ray_imgserve_stage_seconds_count", task="anime", stage=stage) == 3, stage
    # a histogram with the documented buckets, from milliseconds to half an hour
    buckets = {labels["le"] for labels, _ in scraped.samples["ray_imgserve_stage_seconds_bucket"]}
    assert {"0.005", "1.0", "60.0", "1800.0", "+Inf"} <= buckets
    denoise = count("ray_imgserve_stage_seconds_bucket", task="real", stage="denoise", le="1800.0")
    assert denoise == expected["real_ok"]


def test_lora_loads_hits_and_evictions(scraped: Scrape) -> None:
    events = {(labels["event"], labels["version"]): value
              for labels, value in scraped.samples["ray_imgserve_lora_events_total"]}
    assert events == {("load", A): 1, ("hit", A): 1, ("load", B): 1, ("load", C): 1, ("evict", A): 1}


def test_jobs_are_counted_and_the_queue_depth_is_a_gauge(scraped: Scrape) -> None:
    # the job ran twice: its first result was lost on disk
    assert scraped.total("ray_imgserve_jobs_finished_total", task="anime", state="succeeded") == 2
    assert scraped.total("ray_imgserve_job_seconds_count", task="anime", state="succeeded") == 2
    assert scraped.total("ray_imgserve_job_limits_total", task="anime", reason="result_lost") == 1
    assert scraped.label_values("ray_imgserve_model_seconds_total", "key_id") == {"-"}
    assert scraped.total("ray_imgserve_abandoned_total", task="real", reason="client_disconnected") == 1
    assert "ray_imgserve_job_store_bytes" in scraped.samples and "ray_imgserve_event_streams" in scraped.samples
    # one series per JobRunner replica, from that replica (Serve's labels)
    queued = scraped.samples["ray_imgserve_jobs_queued"]
    assert [labels["deployment"] for labels, _ in queued] == ["JobRunner"]


def test_peak_gpu_memory_is_absent_without_cuda(scraped: Scrape) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the replicas may have recorded GPU peaks")
    assert "ray_imgserve_gpu_peak_bytes_bucket" not in scraped.families


def test_the_dashboard_queries_only_exported_metrics(scraped: Scrape) -> None:
    used = dashboard_metric_names(json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text()))
    missing = used - scraped.families - NEEDS_CUDA
    assert not missing, f"the dashboard queries series that Ray does not export: {sorted(missing)}"
    assert used & NEEDS_CUDA == NEEDS_CUDA  # peak GPU memory has its panel
    assert metrics.exported_names() - scraped.families <= {
        "ray_imgserve_gpu_peak_bytes_bucket", "ray_imgserve_gpu_peak_bytes_sum", "ray_imgserve_gpu_peak_bytes_count"}
