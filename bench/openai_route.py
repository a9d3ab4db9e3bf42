"""The OpenAI-compatible route's overhead: `POST /v1/images/edits` (b64_json) against `POST /v1/real`
for the same work, on the demo service, in one run.

Both requests carry the same upload (the sample photo at `--edge` px long edge), the same prompt,
`steps` and `seed`, so the model does the same work and the result is the same PNG (checked: the
edit's base64 decodes to the bytes `/v1/real` answers). They are sent by one httpx client,
alternating which goes first in each pair, `--repetitions` pairs after a warm-up; the latency is
until the whole body has arrived (no JSON parsing or base64 decoding on the client). Reports the
p50 of each route, the overhead (p50 edits - p50 real; goal: within 5 ms) and the median of the
paired differences. The base64 encoding and JSON rendering of the same result are timed
separately, in this process (what the route adds on the ingress), as is the larger body (4/3).
`--anime-repetitions` pairs of `anime` (a much cheaper model: less noise around the same
overhead) are reported next to it. Writes bench/results/openai_route.json with machine, versions
and the exact command.
Run: .venv/bin/python bench/openai_route.py   (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from ray import serve  # noqa: E402

from bench.common import report_header, upload  # noqa: E402
from serve_app.app import build_app  # noqa: E402

GOAL_MS = 5.0
PROMPT = "transform the image to realistic photograph"


def timed(client: httpx.Client, path: str, body: bytes, fields: dict[str, str]) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = client.post(path, files={"image": ("in.jpg", body, "image/jpeg")}, data=fields)
    seconds = time.perf_counter() - start
    assert response.status_code == 200, (path, response.status_code, response.text[:300])
    return seconds, response


def pairs(client: httpx.Client, body: bytes, task: str, fields: dict[str, str], repetitions: int,
          warmup: int) -> dict[str, Any]:
    """`repetitions` pairs (edits, /v1/<task>) of the same request, alternating the order."""
    edits_fields = {**fields, "model": task, "response_format": "b64_json"}
    own: list[float] = []
    edits: list[float] = []
    same = True
    for rep in range(warmup + repetitions):
        order = [("own", f"/v1/{task}", fields), ("edits", "/v1/images/edits", edits_fields)]
        if rep % 2:
            order.reverse()
        answers = {name: timed(client, path, body, data) for name, path, data in order}
        if rep < warmup:
            continue
        own.append(answers["own"][0])
        edits.append(answers["edits"][0])
        decoded = base64.b64decode(answers["edits"][1].json()["data"][0]["b64_json"])
        same = same and decoded == answers["own"][1].content
    result_bytes = answers["own"][1].content
    differences = [e - o for e, o in zip(edits, own)]
    return {
        "fields": fields,
        "pairs": repetitions,
        "own_route": f"POST /v1/{task}",
        "p50_own_ms": round(statistics.median(own) * 1000, 2),
        "p50_edits_ms": round(statistics.median(edits) * 1000, 2),
        "overhead_p50_ms": round((statistics.median(edits) - statistics.median(own)) * 1000, 2),
        "median_paired_difference_ms": round(statistics.median(differences) * 1000, 2),
        "p90_own_ms": round(statistics.quantiles(own, n=10)[-1] * 1000, 2),
        "p90_edits_ms": round(statistics.quantiles(edits, n=10)[-1] * 1000, 2),
        "same_result_bytes": same,
        "result_bytes": len(result_bytes),
        "edits_body_bytes": len(answers["edits"][1].content),
        "own_ms": [round(v * 1000, 1) for v in own],
        "edits_ms": [round(v * 1000, 1) for v in edits],
        "encoding": encoding_cost(result_bytes),
    }


def encoding_cost(data: bytes, number: int = 200) -> dict[str, Any]:
    """What the edits route does to a result that /v1/<task> does not: base64 and the JSON body."""
    b64 = timeit.timeit(lambda: base64.b64encode(data).decode("ascii"), number=number) / number
    text = base64.b64encode(data).decode("ascii")
    body = {"created": 0, "data": [{"b64_json": text}], "output_format": "png"}
    render = timeit.timeit(lambda: JSONResponse(body), number=number) / number
    return {"result_bytes": len(data), "base64_ms": round(b64 * 1000, 3), "json_render_ms": round(render * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repetitions", type=int, default=40, help="pairs of real requests")
    parser.add_argument("--anime-repetitions", type=int, default=60, help="pairs of anime requests (0: none)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--edge", type=int, default=256, help="long edge of the uploaded sample photo (px)")
    parser.add_argument("--port", type=int, default=8127)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "openai_route.json"))
    options = parser.parse_args()
    started = time.monotonic()
    args = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["applications"][0]["args"]
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    url = f"http://127.0.0.1:{options.port}"
    body = upload(options.edge)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": options.port})
        serve.run(build_app(args), name="imgserve", route_prefix="/")
        with httpx.Client(base_url=url, timeout=300) as client:
            real = pairs(client, body, "real", {"prompt": PROMPT, "steps": str(options.steps), "seed": "1"},
                         options.repetitions, options.warmup)
            print(f"real: p50 {real['p50_own_ms']} ms vs edits {real['p50_edits_ms']} ms "
                  f"(overhead {real['overhead_p50_ms']} ms)", flush=True)
            anime = pairs(client, body, "anime", {"style": "paprika"}, options.anime_repetitions,
                          options.warmup) if options.anime_repetitions else None
            if anime:
                print(f"anime: p50 {anime['p50_own_ms']} ms vs edits {anime['p50_edits_ms']} ms "
                      f"(overhead {anime['overhead_p50_ms']} ms)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    import fastapi
    import pydantic

    header = report_header("openai_route", ray=ray.__version__, httpx=httpx.__version__, fastapi=fastapi.__version__,
                           pydantic=pydantic.__version__)
    header["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        **header,
        "settings": {
            "config": "configs/demo.yaml (local Ray: 2 CPUs, 4 fake GPUs; tiny models on CPU)",
            "upload": f"sample photo at {options.edge} px long edge, JPEG, multipart",
            "edits": "POST /v1/images/edits with model=<task>, response_format=b64_json and the same fields",
            "client": "one httpx client, keep-alive, pairs in alternating order; latency until the body is read",
            "warmup_pairs": options.warmup,
        },
        "real": real,
        "anime": anime,
        "goal": {"overhead_p50_within_5_ms": abs(real["overhead_p50_ms"]) <= GOAL_MS},
        "wall_s": round(time.monotonic() - started, 1),
    }
    Path(options.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"real": {k: real[k] for k in ("p50_own_ms", "p50_edits_ms", "overhead_p50_ms",
                                                    "median_paired_difference_ms", "encoding")},
                      "goal": result["goal"]}))


if __name__ == "__main__":
    main()
