"""The job runner's CPU with 50 open event streams: one shared follower per ingress replica against
the per-stream 100 ms polling it replaced.

1. Start local Ray (2 CPUs, 4 fake GPUs) and the demo config (configs/demo.yaml) with the test
   gate's `real` model (tests/serve/gate.py: a request waits in the model until the gate opens,
   without using CPU), `jobs.concurrency: 1`, and room for `--streams` streams from one address.
2. Submit `--streams` `real` jobs: the first runs and is held at the gate, the others are queued.
3. Three windows of `--window` s each, measuring the CPU seconds (user + system, from /proc via
   psutil) of the JobRunner replica's process, and of the Ingress replica's:
   - `idle`: no stream open;
   - `before_polling_100ms`: the OLD behaviour, replayed from this driver (git history is not
     touched): one loop per job calling the runner's `events(job_id, seen)` through its deployment
     handle every 100 ms, exactly what each HTTP stream's generator did before (not through HTTP:
     the runner's side of it is the same calls);
   - `after_shared_follower`: `--streams` real HTTP event streams (`GET /v1/jobs/{id}/events`)
     open at once against the ingress, which follows them all with one `wait_events` long poll.
4. Open the gate, check every job ends, write bench/results/streams.json.

Run: .venv/bin/python bench/streams.py   (about 2 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from bench.common import report_header, serve_role  # noqa: E402
from serve_app.app import build_graph  # noqa: E402
from tests.serve.gate import GATE_NAME, Gate, GatedRealModel  # noqa: E402

OLD_POLL_S = 0.1


def process_of(role: str) -> psutil.Process:
    for proc in psutil.Process().children(recursive=True):
        try:
            if serve_role(proc) == role:
                return proc
        except psutil.Error:
            continue
    raise RuntimeError(f"no {role} replica process under this driver")


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def measure(procs: dict[str, psutil.Process], window_s: float) -> dict[str, float]:
    before = {role: cpu_s(proc) for role, proc in procs.items()}
    time.sleep(window_s)
    return {f"{role}_cpu_s": round(cpu_s(proc) - before[role], 3) for role, proc in procs.items()}


def old_polling(job_ids: list[str], stop: threading.Event) -> int:
    """The pre-change event stream, one loop per job: `events(job_id, seen)` every 100 ms."""
    runner = serve.get_deployment_handle("JobRunner", "imgserve")
    calls = 0

    async def follow(job_id: str) -> None:
        nonlocal calls
        seen = 0
        while not stop.is_set():
            new, _ = await runner.events.remote(job_id, seen)
            calls += 1
            seen += len(new)
            await asyncio.sleep(OLD_POLL_S)

    async def all_of_them() -> None:
        await asyncio.gather(*(follow(job_id) for job_id in job_ids))

    asyncio.run(all_of_them())
    return calls


def http_streams(url: str, job_ids: list[str], stop: threading.Event, opened: list[int], frames: list[int]) -> None:
    """One thread per stream: read its SSE lines until `stop`."""
    def read(job_id: str) -> None:
        with httpx.Client(base_url=url, timeout=None) as http:
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                opened.append(response.status_code)
                for line in response.iter_lines():
                    if line:
                        frames.append(1)
                    if stop.is_set():
                        return

    threads = [threading.Thread(target=read, args=(job_id,), daemon=True) for job_id in job_ids]
    for thread in threads:
        thread.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--window", type=float, default=20.0, help="seconds each measurement lasts")
    parser.add_argument("--port", type=int, default=8127)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "streams.json"))
    options = parser.parse_args()
    args = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["applications"][0]["args"]
    args["jobs"] = {**args.get("jobs", {}), "concurrency": 1, "max_queued": max(100, options.streams + 10),
                    "directory": str(Path("/tmp") / f"imgserve-bench-streams-{int(time.time())}")}
    args["ingress"]["max_event_streams_per_key"] = options.streams + 10  # all from one address here
    args["ingress"]["event_heartbeat_s"] = 15.0
    args["real"]["serve"]["ray_actor_options"] = {"num_cpus": 0.4, "num_gpus": 1}
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    gate = Gate.options(name=GATE_NAME).remote()
    ray.get(gate.close.remote())
    results: dict[str, Any] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": options.port})
        serve.run(build_graph(args, models={"real": GatedRealModel}), name="imgserve", route_prefix="/")
        url = f"http://127.0.0.1:{options.port}"
        png = (REPO / "tests" / "data" / "samples" / "photo_1.jpg").read_bytes()
        job_ids = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for index in range(options.streams):
                response = http.post("/v1/jobs", files={"image": ("a.jpg", png, "image/jpeg")},
                                     data={"task": "real", "steps": "2", "seed": str(index)})
                assert response.status_code == 202, response.text
                job_ids.append(response.json()["id"])
            while ray.get(gate.count.remote()) < 1:
                time.sleep(0.1)
            states = [http.get(f"/v1/jobs/{j}").json()["state"] for j in job_ids]
        procs = {"runner": process_of("JobRunner"), "ingress": process_of("Ingress")}
        time.sleep(2.0)  # let the submissions' work settle before the first window
        results["idle"] = measure(procs, options.window)

        stop = threading.Event()
        calls: list[int] = []
        poller = threading.Thread(target=lambda: calls.append(old_polling(job_ids, stop)), daemon=True)
        poller.start()
        time.sleep(2.0)
        results["before_polling_100ms"] = measure(procs, options.window)
        stop.set()
        poller.join(30)
        results["before_polling_100ms"]["runner_calls_total"] = calls[0] if calls else None

        stop = threading.Event()
        opened: list[int] = []
        frames: list[int] = []
        http_streams(url, job_ids, stop, opened, frames)
        deadline = time.monotonic() + 60
        while len(opened) < len(job_ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        results["after_shared_follower"] = {**measure(procs, options.window), "streams_open": opened.count(200),
                                            "frames_received": len(frames)}
        stop.set()

        gate.open.remote()
        with httpx.Client(base_url=url, timeout=120) as http:
            deadline = time.monotonic() + 600
            finals = {}
            while time.monotonic() < deadline and len(finals) < len(job_ids):
                for job_id in job_ids:
                    if job_id not in finals:
                        state = http.get(f"/v1/jobs/{job_id}").json()["state"]
                        if state in ("succeeded", "failed", "cancelled"):
                            finals[job_id] = state
                time.sleep(0.5)
        results["jobs"] = {"submitted": len(job_ids), "states_during": {s: states.count(s) for s in set(states)},
                           "ended": {s: list(finals.values()).count(s) for s in set(finals.values())}}
    finally:
        serve.shutdown()
        ray.shutdown()
    before = results["before_polling_100ms"]["runner_cpu_s"]
    after = results["after_shared_follower"]["runner_cpu_s"]
    report = {
        **report_header("streams", ray=ray.__version__, httpx=httpx.__version__, psutil=psutil.__version__),
        "streams": options.streams,
        "window_s": options.window,
        "note": "before = the old per-stream 100 ms polling, replayed from the benchmark's driver through the "
                "runner's deployment handle (one loop per job, events(job_id, seen) every 100 ms); after = real "
                "HTTP event streams followed by the ingress's one shared follower (wait_events long poll). "
                "CPU seconds of each replica's process over the window (user + system).",
        "results": results,
        "runner_cpu_percent": {phase: round(100 * results[phase]["runner_cpu_s"] / options.window, 1)
                               for phase in ("idle", "before_polling_100ms", "after_shared_follower")},
        "runner_cpu_ratio_before_over_after": round(before / after, 1) if after > 0 else None,
    }
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("runner_cpu_percent", "runner_cpu_ratio_before_over_after")}, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
