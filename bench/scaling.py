"""Throughput of the `real` graph with 1, 2 and 4 GPU replicas on the local multi-node cluster.

The model is a stand-in whose service time is fixed (`FixedTimeRealModel`: it sleeps, then returns
its input), so only the serving system is measured: HTTP proxy, ingress, preprocess, routing to
replicas on other nodes, postprocess. Everything else is the real graph from
configs/rtx4090-cluster.yaml (placement 1x24 per replica, rtx4090 resources, queue limits), on
`cluster/local.sh` (head + 2 workers × 2 fake GPUs, loopback).

Measured in one run:
- saturation throughput for n = 1, 2, 4 replicas (closed loop, 2n clients), and the scaling
  efficiency X(n) / (n · X(1)); goal >= 90 % at n = 4;
- latency under a steady load at 80 % of the 4-replica capacity (evenly spaced arrivals, open
  loop); goal p99 <= 2 x the service time. Poisson arrivals at the same rate are recorded too: their
  p99 includes queueing that no serving system avoids (an M/D/4 queue at 80 % load).

Run: .venv/bin/python bench/scaling.py   (about 6 minutes; writes bench/results/scaling.json + .png)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from bench.common import Caller, closed_loop, open_loop, report_header, upload  # noqa: E402
from deployments.real import RealModel  # noqa: E402
from deployments.records import Generated  # noqa: E402
from serve_app.app import build_graph  # noqa: E402
from tests.cluster.local import cluster_env, cluster_ip, local_cluster  # noqa: E402

ENV = cluster_env(6392, dashboard_port=8267, worker_gpus=2)
SERVICE_TIME_S = 1.0


class FixedTimeRealModel(RealModel):
    """The `real` model with a fixed service time and no diffusion: measures the serving system only.

    Validation, parameter resolution and the result's shape are the real model's; the pipeline is
    replaced by a sleep of `SERVICE_TIME_S` that returns the input array.
    """

    def load_model(self) -> None:
        self.store = self.config.lora_store(self.cache_dir)
        self.plan = self.config.plan()
        self.fix_default()

    def loaded(self) -> bool:
        return True

    def generate(self, prepared: Any, params: Any, progress: Any = None, conditioning: Any = None) -> Generated:
        params = self.config.resolve(params, self.catalog())
        time.sleep(SERVICE_TIME_S)
        return Generated(array=prepared.array, info=prepared.info,
                         params={"task": self.task, **params.model_dump()}, served={"replica": self.replica})


def bench_args(replicas: int, cache_dir: Path) -> dict[str, Any]:
    args = yaml.safe_load((REPO / "configs" / "rtx4090-cluster.yaml").read_text())["applications"][0]["args"]
    args["cache_dir"] = str(cache_dir)
    args["jobs"]["directory"] = str(cache_dir / "jobs")
    args["jobs"]["serve"]["ray_actor_options"]["num_cpus"] = 0.05
    for name in ("ingress", "preprocess", "postprocess", "anime"):
        options = args[name]["serve"]
        options["ray_actor_options"]["num_cpus"] = 0.1
        # enough CPU replicas that they never limit a 4-replica GPU tier on this machine
        count = 1 if name in ("ingress", "anime") else 2
        options["autoscaling_config"].update(min_replicas=count, max_replicas=count)
    args["anime"]["styles_dir"] = "tiny"  # the config's /models/anime-styles is not on this machine
    real = args["real"]
    real.update(source="tiny", lora_dir=None)
    for adapter in real["speed_adapters"].values():
        adapter["file"] = "tiny"
    real["placement"]["gpus"] = 1
    real["serve"].update(num_replicas=replicas, autoscaling_config=None, max_queued_requests=64)
    real["serve"]["ray_actor_options"]["num_cpus"] = 0.1
    layers = args["layers"]
    layers.update(source="tiny", placement=None, max_layers=4)
    layers["serve"].update(num_replicas=1, autoscaling_config=None)
    layers["serve"]["ray_actor_options"] = {"num_cpus": 0.05}
    # the stand-in encodes no prompt, and the runs recorded were inline: no TextEncoder stage (its card
    # would not fit beside 4 replicas on 2 workers × 2 fake GPUs)
    args["text_encoder"] = {"mode": "inline"}
    return args


class Load(Caller):
    """Sends requests to the service (`Caller`, 300 s client timeout) and measures a closed and an
    open loop from their outcomes."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(url, body, timeout_s=300)

    def closed_loop(self, clients: int, duration_s: float) -> dict[str, Any]:
        """`clients` callers each sending back to back; completions per second over the window."""
        self.outcomes = []
        elapsed = closed_loop(self.one, clients, duration_s)
        ok = [o for o in self.outcomes if o["status"] == 200]
        return {"clients": clients, "window_s": round(elapsed, 2), "completed": len(ok),
                "errors": len(self.outcomes) - len(ok), "throughput_rps": len(ok) / elapsed,
                "latency_ms": summary([o["latency_s"] for o in ok])}

    def open_loop(self, rate: float, duration_s: float, poisson: bool) -> dict[str, Any]:
        """Arrivals at `rate` per second (evenly spaced, or Poisson with seed 0), sent from a pool of
        64 threads."""
        self.outcomes = []
        rng = random.Random(0)
        arrivals, t = [], 0.0
        while t < duration_s:
            arrivals.append(t)
            t += rng.expovariate(rate) if poisson else 1.0 / rate
        open_loop(self.one, arrivals, max_workers=64)
        ok = [o for o in self.outcomes if o["status"] == 200]
        statuses = {o["status"] for o in self.outcomes}  # None: no response (timeout, dropped connection)
        return {"rate_rps": rate, "arrivals": "poisson" if poisson else "evenly spaced", "sent": len(arrivals),
                "completed": len(ok), "statuses": sorted(statuses, key=lambda s: (s is None, s or 0)),
                "latency_ms": summary([o["latency_s"] for o in ok])}


def summary(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ordered = sorted(seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"n": len(ordered), "p50": round(pick(0.5) * 1000, 1), "p99": round(pick(0.99) * 1000, 1),
            "mean": round(statistics.fmean(ordered) * 1000, 1), "max": round(ordered[-1] * 1000, 1)}


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["saturation"]
    n = [row["replicas"] for row in rows]
    x = [row["throughput_rps"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, x, "o-", label="measured")
    left.plot(n, [x[0] * k for k in n], "--", label="linear from 1 replica")
    left.plot(n, [k / SERVICE_TIME_S for k in n], ":", label="ideal (n / service time)")
    left.set_xlabel("GPU replicas")
    left.set_ylabel("requests / s")
    left.set_title("saturation throughput")
    left.legend()
    for name, run in result["steady_80pct"].items():
        latencies = sorted(run["samples_ms"])
        right.plot(latencies, np.linspace(0, 1, len(latencies)), label=run["arrivals"])
    right.axvline(2000 * SERVICE_TIME_S, color="red", linestyle=":", label="goal: p99 <= 2 x service")
    right.set_xlabel("latency (ms)")
    right.set_ylabel("fraction of requests")
    right.set_title("4 replicas at 80 % of capacity")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=25.0, help="seconds per saturation measurement")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of steady load at 80 %%")
    parser.add_argument("--edge", type=int, default=512, help="long edge of the uploaded photo")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling.json"))
    options = parser.parse_args()
    started = time.monotonic()
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "imgserve-bench-scaling"
    cache.mkdir(parents=True, exist_ok=True)
    http_port = 8124
    with local_cluster(ENV, http_port) as address:
        load = Load(f"http://127.0.0.1:{http_port}", upload(options.edge))
        rows = []
        for replicas in (1, 2, 4):
            serve.run(build_graph(bench_args(replicas, cache), models={"real": FixedTimeRealModel}),
                      name="imgserve", route_prefix="/")
            load.closed_loop(replicas, 4.0)  # warm-up: connections, first-call costs
            row = {"replicas": replicas, **load.closed_loop(2 * replicas, options.window)}
            nodes = {actor.node_id for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")])
                     if "RealModel" in actor.class_name}
            row["real_replica_nodes"] = len(nodes)
            rows.append(row)
            print(f"{replicas} replica(s): {row['throughput_rps']:.2f} req/s, p50 {row['latency_ms']['p50']} ms",
                  flush=True)
            if replicas == 4:
                capacity = row["throughput_rps"]
                steady = {}
                for poisson in (False, True):
                    run = load.open_loop(0.8 * capacity, options.steady, poisson)
                    run["samples_ms"] = [round(o["latency_s"] * 1000, 1) for o in load.outcomes if o["status"] == 200]
                    steady["poisson" if poisson else "even"] = run
                    print(f"80 % load ({run['arrivals']}): p99 {run['latency_ms'].get('p99')} ms", flush=True)
            serve.delete("imgserve")
        x1 = rows[0]["throughput_rps"]
        for row in rows:
            row["efficiency"] = round(row["throughput_rps"] / (row["replicas"] * x1), 3)
            row["throughput_rps"] = round(row["throughput_rps"], 3)
        p99 = steady["even"]["latency_ms"]["p99"]
        header = report_header("scaling", ray=ray.__version__, httpx=httpx.__version__)
        header["machine"]["loadavg_after"] = list(os.getloadavg())
        result = {
            **header,
            "settings": {
                "cluster": "cluster/local.sh: head (1 CPU, no GPU) + 2 workers (1 CPU, 2 fake GPUs, rtx4090: 2 each), "
                           f"loopback {cluster_ip(ENV)}; Serve proxy HeadOnly on 127.0.0.1",
                "config": "configs/rtx4090-cluster.yaml args; real.placement.gpus=1 (1x24 plan, 1 GPU per replica), "
                          "num_replicas fixed per step, tiny stand-ins elsewhere, CPU shares scaled to 2 cores",
                "model": f"FixedTimeRealModel: sleeps {SERVICE_TIME_S} s, returns its input",
                "upload": f"sample photo scaled to {options.edge} px long edge, JPEG; steps=2, output PNG",
                "saturation": f"closed loop, 2n clients, {options.window} s window after a 4 s warm-up",
                "steady": f"{options.steady} s at 80 % of the measured 4-replica throughput",
            },
            "goal": {
                "efficiency_at_4": rows[-1]["efficiency"], "efficiency_pass": rows[-1]["efficiency"] >= 0.9,
                "steady_p99_ms": p99, "limit_ms": 2000 * SERVICE_TIME_S, "p99_pass": p99 <= 2000 * SERVICE_TIME_S,
            },
            "saturation": rows,
            "steady_80pct": steady,
            "wall_s": round(time.monotonic() - started, 1),
        }
    out = Path(options.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plotted = plot(result, out.with_suffix(".png"))
    print(json.dumps(result["goal"]), "plot:" if plotted else "", out.with_suffix(".png") if plotted else "")


if __name__ == "__main__":
    main()
