"""A bounded overload test on loopback: the demo service at 3× its capacity for 60 s.

1. Start local Ray (2 CPUs, 4 fake GPUs) and the demo config (configs/demo.yaml).
2. Capacity: closed loop, `--clients` callers back to back for `--capacity-window` s → X req/s.
3. Warm-up done: read the RSS of every replica (and the proxy).
4. Overload: open loop, evenly spaced arrivals at `--factor`·X req/s (3) for `--duration` s, sent
   from a pool of up to 256 threads, each request with a client timeout.
5. Check what a user and an operator would: every request answered 2xx, or 503/429 with
   Retry-After, within the timeout; none lost (every sent request has an outcome), none hung, no
   other 5xx; afterwards every replica is the same process and its RSS within 10 % of step 3.

The request is `POST /v1/real` (the GPU task; tiny model on CPU here) with a sample photo scaled to
`--edge` px and `steps=2`. Writes bench/results/load.json (+ .png with a timeline).
Run: .venv/bin/python bench/load.py   (about 2.5 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from bench.common import Caller, closed_loop, open_loop, report_header, serve_role, upload  # noqa: E402
from serve_app.app import build_app  # noqa: E402

ROLES = ("Ingress", "Preprocess", "RealModel", "Postprocess", "AnimeModel", "LayersModel", "JobRunner", "proxy")


def replicas() -> dict[str, psutil.Process]:
    """Serve replica processes (and the proxy) of this driver's local Ray, by role."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            role = serve_role(proc)
        except psutil.Error:
            continue
        if role in ROLES:
            found[role] = proc
    return found


def rss_mb(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {role: round(proc.memory_info().rss / 2**20, 1) for role, proc in procs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of capacity")
    parser.add_argument("--capacity-window", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--edge", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "load.json"))
    options = parser.parse_args()
    started = time.monotonic()
    args = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["applications"][0]["args"]
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": options.port})
        serve.run(build_app(args), name="imgserve", route_prefix="/")
        caller = Caller(f"http://127.0.0.1:{options.port}", upload(options.edge), options.timeout)
        # capacity (and warm-up: first-call costs, tiny models, LoRA)
        elapsed = closed_loop(caller.one, options.clients, options.capacity_window)
        ok = [o for o in caller.outcomes if o.get("status") == 200]
        capacity = len(ok) / elapsed
        procs = replicas()
        pids_before = {role: proc.pid for role, proc in procs.items()}
        rss_before = rss_mb(procs)
        print(f"capacity {capacity:.2f} req/s; replicas {sorted(procs)}; RSS {rss_before}", flush=True)
        # overload
        rate = options.factor * capacity
        caller.outcomes = []
        arrivals = [i / rate for i in range(int(options.duration * rate))]
        overload_s = open_loop(caller.one, arrivals, max_workers=256)
        procs_after = replicas()
        rss_after = rss_mb(procs_after)
        outcomes = caller.outcomes
    finally:
        serve.shutdown()
        ray.shutdown()
    statuses = Counter(str(o.get("status")) for o in outcomes)
    codes = Counter(o.get("code") for o in outcomes if o.get("code"))
    bad = [o for o in outcomes if not (o.get("status") == 200 or (o.get("status") in (429, 503) and o.get("retry_after")))]
    rss_ratio = {role: round(rss_after[role] / rss_before[role], 3) for role in rss_before if role in rss_after}
    same_processes = {role: pids_before.get(role) == proc.pid for role, proc in procs_after.items()}
    latencies = sorted(o["latency_s"] for o in outcomes if o.get("status") == 200)
    refused = sorted(o["latency_s"] for o in outcomes if o.get("status") in (429, 503))
    header = report_header("load", ray=ray.__version__, httpx=httpx.__version__)
    header["machine"]["loadavg_after"] = list(os.getloadavg())
    result = {
        **header,
        "settings": {
            "config": "configs/demo.yaml (local Ray: 2 CPUs, 4 fake GPUs)",
            "request": f"POST /v1/real, sample photo at {options.edge} px long edge, steps=2",
            "capacity": f"closed loop, {options.clients} clients, {options.capacity_window} s (also the warm-up)",
            "overload": f"evenly spaced arrivals at {options.factor} x capacity for {options.duration} s, "
                        f"client timeout {options.timeout} s",
        },
        "capacity_rps": round(capacity, 3),
        "offered_rps": round(rate, 3),
        "sent": len(arrivals),
        "answered": len(outcomes),
        "overload_wall_s": round(overload_s, 1),
        "statuses": dict(statuses),
        "error_codes": dict(codes),
        "latency_200_s": {"n": len(latencies), "p50": round(statistics.median(latencies), 2) if latencies else None,
                          "max": round(latencies[-1], 2) if latencies else None},
        "latency_refused_s": {"n": len(refused), "p50": round(statistics.median(refused), 3) if refused else None,
                              "max": round(refused[-1], 3) if refused else None},
        "rss_mb_after_warmup": rss_before,
        "rss_mb_after_overload": rss_after,
        "rss_ratio": rss_ratio,
        "same_processes": same_processes,
        "goal": {
            "every_request_answered": len(outcomes) == len(arrivals),
            "only_2xx_or_503_429_with_retry_after": not bad,
            "violations": bad[:20],
            "no_hang_within_timeout": all(o.get("status") is not None for o in outcomes),
            "rss_within_10pct": all(0.9 <= r <= 1.1 for r in rss_ratio.values()),
            "no_replica_restarted": all(same_processes.values()),
        },
        "wall_s": round(time.monotonic() - started, 1),
    }
    result["goal"]["pass"] = all(v for k, v in result["goal"].items() if k != "violations")
    Path(options.out).write_text(json.dumps(result, indent=1) + "\n")
    plotted = plot(outcomes, Path(options.out).with_suffix(".png"), rate, options.factor)
    print(json.dumps({k: result[k] for k in ("capacity_rps", "offered_rps", "statuses", "rss_ratio")}))
    print(json.dumps(result["goal"]), "plot" if plotted else "")


def plot(outcomes: list[dict[str, Any]], path: Path, rate: float, factor: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4))
    for status, color in (("200", "tab:green"), ("503", "tab:orange"), ("429", "tab:purple")):
        points = [(o["sent"], o["latency_s"]) for o in outcomes if str(o.get("status")) == status]
        if points:
            ax.scatter(*zip(*points), s=6, color=color, label=f"{status} ({len(points)})")
    other = [(o["sent"], o["latency_s"]) for o in outcomes if str(o.get("status")) not in ("200", "503", "429")]
    if other:
        ax.scatter(*zip(*other), s=14, color="red", marker="x", label=f"other ({len(other)})")
    ax.set_xlabel("request sent at (s)")
    ax.set_ylabel("answered after (s)")
    ax.set_title(f"demo service at {rate:.2f} req/s offered ({factor:g} x capacity)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    main()
