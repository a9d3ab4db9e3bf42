"""Abandoned work stops: what a request right after an abandoned one waits, on the demo service.

The issue's measurement (issue 18), repeated `--repetitions` times on local Ray (2 CPUs, 4 fake
GPUs) with configs/demo.yaml:

1. idle: a synchronous `POST /v1/real` with `steps=2` on an idle service → its latency;
2. abandoned: a `steps=100` request whose client hangs up after `--hang-up` s (its HTTP client's
   read timeout closes the connection), followed at once by a `steps=2` request → that one's latency.

Reports the medians and their ratio (goal: ≤ 1.2× idle; before this change 15.3 s vs 4.3 s idle,
3.5×, the figure in the issue, which stands as the baseline: the service has no switch to turn
the stopping off), the RealModel replica's `stops` and last stop (where the abandoned requests
stopped), machine, versions and the exact command. Writes bench/results/abandoned.json.
Run: .venv/bin/python bench/abandoned.py   (about 3 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from bench.common import report_header, upload  # noqa: E402
from serve_app.app import build_app  # noqa: E402

BASELINE = {"idle_s": 4.3, "after_abandoned_s": 15.3, "ratio": 3.5,
            "source": "issue 18 (before this change, same demo profile; not re-measured: the service has "
                      "no switch to turn stopping abandoned work off)"}


def post(url: str, body: bytes, steps: int, seed: int, timeout_s: float) -> tuple[float, int | None]:
    """One `POST /v1/real`: (seconds, status), status None when the client gave up (hung up)."""
    start = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            response = client.post("/v1/real", files={"image": ("in.jpg", body, "image/jpeg")},
                                   data={"steps": str(steps), "seed": str(seed)})
        return time.monotonic() - start, response.status_code
    except httpx.TimeoutException:
        return time.monotonic() - start, None


def model_stats() -> dict[str, Any]:
    return serve.get_deployment_handle("RealModel", "imgserve").stats.remote().result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--hang-up", type=float, default=2.0, help="seconds before the long request's client hangs up")
    parser.add_argument("--long-steps", type=int, default=100)
    parser.add_argument("--edge", type=int, default=1024,
                        help="long edge of the uploaded sample photo (px; 1024: the demo preprocess limit)")
    parser.add_argument("--port", type=int, default=8126)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "abandoned.json"))
    options = parser.parse_args()
    started = time.monotonic()
    args = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["applications"][0]["args"]
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    url = f"http://127.0.0.1:{options.port}"
    body = upload(options.edge)
    idle: list[float] = []
    after: list[float] = []
    hung_up: list[float] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": options.port})
        serve.run(build_app(args), name="imgserve", route_prefix="/")
        for seed in range(2):  # warm-up: first-call costs
            post(url, body, 2, seed, 300)
        stops_before = model_stats()["stops"].get("abandoned", 0)
        for rep in range(options.repetitions):
            seconds, status = post(url, body, 2, 100 + rep, 300)
            assert status == 200, status
            idle.append(seconds)
            seconds, status = post(url, body, options.long_steps, 200 + rep, options.hang_up)
            assert status is None, f"the {options.long_steps}-step request finished within {options.hang_up} s"
            hung_up.append(seconds)
            seconds, status = post(url, body, 2, 300 + rep, 300)  # at once
            assert status == 200, status
            after.append(seconds)
            print(f"rep {rep}: idle {idle[-1]:.2f} s, after abandoned {after[-1]:.2f} s", flush=True)
        stats = model_stats()
    finally:
        serve.shutdown()
        ray.shutdown()
    idle_s, after_s = statistics.median(idle), statistics.median(after)
    ratio = after_s / idle_s
    header = report_header("abandoned", ray=ray.__version__, httpx=httpx.__version__)
    header["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        **header,
        "settings": {
            "config": "configs/demo.yaml (local Ray: 2 CPUs, 4 fake GPUs; tiny models on CPU)",
            "request": f"POST /v1/real, sample photo at {options.edge} px long edge",
            "idle": "steps=2 on an idle service",
            "abandoned": f"steps={options.long_steps}, client hangs up after {options.hang_up} s; then at once steps=2",
            "repetitions": options.repetitions,
        },
        "idle_s": [round(v, 3) for v in idle],
        "after_abandoned_s": [round(v, 3) for v in after],
        "hung_up_after_s": [round(v, 3) for v in hung_up],
        "median_idle_s": round(idle_s, 3),
        "median_after_abandoned_s": round(after_s, 3),
        "ratio": round(ratio, 3),
        "model_stops_abandoned": stats["stops"].get("abandoned", 0) - stops_before,
        "model_last_stop": stats["last_stop"],
        "baseline_before": BASELINE,
        "goal": {"ratio_at_most_1_2": ratio <= 1.2},
        "wall_s": round(time.monotonic() - started, 1),
    }
    Path(options.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_idle_s", "median_after_abandoned_s", "ratio",
                                             "model_stops_abandoned", "goal")}))


if __name__ == "__main__":
    main()
