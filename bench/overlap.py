"""The LoRA load overlapping the text encoder stage: a version switch costs max(encode, load).

The demo graph in stage mode on local Ray (tiny models, CPU, fake GPUs), with a TextEncoder whose
every encoding takes ENCODE_S longer and a RealModel whose every version read from disk takes
LOAD_S longer (known times, in the proportions that matter, not this machine's speed). Each replica
keeps one version (`max_adapters_per_replica: 1`), so alternating two versions makes every request
cold. Measured in one run, three ways:

- `warm`: the same version every time (no load): the baseline, encode + the rest;
- `overlapped`: alternating versions, with the orchestrator's prefetch (what the service does);
- `sequential`: alternating versions, with a model whose `prefetch` does nothing, so the version
  is read only once the request arrives, after its encoding (what it would do without overlap).

Expected: sequential − warm ≈ the load L (LOAD_S plus reading the tiny adapter), overlapped − warm
≈ max(ENCODE_S, L) − ENCODE_S: a switch saves min(ENCODE_S, L).

  .venv/bin/python bench/overlap.py            # writes bench/results/overlap.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, report_header  # noqa: E402
from deployments.real import RealModel  # noqa: E402
from deployments.text_encoder import TextEncoder  # noqa: E402

ENCODE_S = 0.5
LOAD_S = 1.0
VERSIONS = ("v2511-0715", "v2511-0801")


class SlowEncoder(TextEncoder):
    def encode_now(self, task: str, prepared: Any, params: Any) -> Any:
        time.sleep(ENCODE_S)
        return super().encode_now(task, prepared, params)


class SlowLoadModel(RealModel):
    def ensure_adapter(self, version: str) -> str:
        if version not in self.adapters.versions:
            time.sleep(LOAD_S)
        return super().ensure_adapter(version)


class NoPrefetchModel(SlowLoadModel):
    async def prefetch(self, version: str) -> str:
        return version


def run(cache: Path, requests: int) -> dict[str, Any]:
    import httpx
    import ray
    import yaml
    from ray import serve

    from bench.common import upload
    from serve_app.app import build_graph
    from tests.conftest import free_port, merged

    args = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["applications"][0]["args"]
    args = merged(args, {"cache_dir": str(cache), "jobs": {"directory": str(cache / "jobs")},
                         "real": {"max_adapters_per_replica": 1}})
    port = free_port()
    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    image = upload(256)
    results: dict[str, Any] = {}
    try:
        for label, model, alternate in (("warm", SlowLoadModel, False), ("overlapped", SlowLoadModel, True),
                                        ("sequential", NoPrefetchModel, True)):
            serve.run(build_graph(args, models={"real": model}, encoder=SlowEncoder), name="imgserve",
                      route_prefix="/")
            seconds, loads = [], []
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
                for index in range(requests + 1):  # the first request only warms the graph up
                    version = VERSIONS[index % 2] if alternate else VERSIONS[0]
                    start = time.perf_counter()
                    response = http.post("/v1/real", files={"image": ("a.jpg", image, "image/jpeg")},
                                         data={"steps": "2", "seed": str(index), "lora": version})
                    elapsed = time.perf_counter() - start
                    assert response.status_code == 200, response.text
                    if index:
                        seconds.append(elapsed)
                        loads.append(response.headers["x-imgserve-lora-load"])
            results[label] = {"median_s": round(statistics.median(seconds), 4), "seconds": [round(s, 4) for s in seconds],
                              "lora_load": loads}
            serve.delete("imgserve")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "overlap.json"))
    args = parser.parse_args()
    import ray
    import torch

    with tempfile.TemporaryDirectory(prefix="imgserve-overlap-") as cache:
        results = run(Path(cache), args.requests)
    warm = results["warm"]["median_s"]
    extra = {label: round(results[label]["median_s"] - warm, 4) for label in ("overlapped", "sequential")}
    # the load a request waits for is LOAD_S plus reading the tiny adapter: what sequential shows
    load = extra["sequential"]
    expected = {"overlapped": round(max(ENCODE_S, load) - ENCODE_S, 4), "sequential": LOAD_S}
    report = {**report_header("overlap", torch=torch.__version__, ray=ray.__version__),
              "encode_s": ENCODE_S, "load_s": LOAD_S, "results": results,
              "extra_over_warm_s": extra, "expected_extra_s": expected,
              "load_measured_s": load,
              "saved_per_switch_s": round(extra["sequential"] - extra["overlapped"], 4),
              "saved_expected_s": round(min(ENCODE_S, load), 4),
              "goal": "a version switch costs max(encode, load): overlapped − warm ≈ "
                      f"{expected['overlapped']:.2f} s, sequential − warm ≈ {expected['sequential']:.2f} s"}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"extra_over_warm_s": extra, "expected_extra_s": expected,
                      "lora_load": {k: v["lora_load"] for k, v in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
