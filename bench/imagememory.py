"""Benchmark: Pillow block reuse (`deployments/imagememory.py`) in the CPU replicas, on Ray.

Two single-replica deployments run the same Preprocess and Postprocess, one as shipped (freed
Pillow blocks kept for reuse) and one with Pillow's default restored (`set_blocks_max(0)`: every
freed block goes back at once). Requests alternate between them: `prepare` of one upload, then
`encode` (PNG) of a model-sized array passed through the object store, as in the served graph.
Inside the replica each call is measured with `getrusage(RUSAGE_THREAD)`: wall ms, user and
system CPU ms, minor page faults. Reported: medians per variant and the reuse/default ratios. The
page faults are the point (the wall time moves with the machine's load); block reuse must not
change a single output byte, which is checked too.

    .venv/bin/python bench/imagememory.py [--input PATH] [--repeat N] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import report_header  # noqa: E402
from deployments.postprocess import Postprocess  # noqa: E402
from deployments.preprocess import Preprocess  # noqa: E402
from deployments.real import RealModel  # noqa: E402
from deployments.records import Generated  # noqa: E402

DEFAULT_INPUT = ROOT / "tests" / "data" / "samples" / "photo_1.jpg"
FIELDS = ("wall_ms", "user_ms", "system_ms", "minor_faults")


def _usage() -> np.ndarray:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return np.array([time.perf_counter() * 1e3, r.ru_utime * 1e3, r.ru_stime * 1e3, r.ru_minflt])


class Stages:
    """Preprocess + Postprocess in one replica; `reuse=False` restores Pillow's default."""

    def __init__(self, reuse: bool) -> None:
        self.pre, self.post = Preprocess(), Postprocess()  # both switch block reuse on
        if not reuse:
            from PIL import Image

            Image.core.set_blocks_max(0)

    def prepare(self, data: bytes) -> tuple[list[float], str]:
        before = _usage()
        prepared = self.pre.prepare(data, RealModel.input_spec)
        return (_usage() - before).tolist(), hashlib.sha256(prepared.array.tobytes()).hexdigest()

    def encode(self, generated: Generated) -> tuple[list[float], str]:
        before = _usage()
        encoded = self.post.encode(generated, "png")
        return (_usage() - before).tolist(), hashlib.sha256(encoded.data).hexdigest()


def medians(rows: list[list[float]]) -> dict[str, float]:
    return {name: round(statistics.median(r[i] for r in rows), 2) for i, name in enumerate(FIELDS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per stage and variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "imagememory.json")
    args = parser.parse_args()
    data = args.input.read_bytes()
    prepared = Preprocess().prepare(data, RealModel.input_spec)
    # a model-sized output like the tiny model's: noise-like pixels
    array = np.random.default_rng(0).integers(0, 256, prepared.array.shape, dtype=np.uint8)
    generated = Generated(array=array, info=prepared.info, params={"task": "real", "seed": 1})

    import ray
    from ray import serve

    ray_init = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
    ray.init(**ray_init)
    rows: dict[str, dict[str, list[list[float]]]] = {v: {"prepare": [], "encode": []} for v in ("reuse", "default")}
    digests: dict[str, set[str]] = {"prepare": set(), "encode": set()}
    try:
        handles = {}
        for variant in rows:
            deployment = serve.deployment(Stages, name=f"Stages_{variant}", ray_actor_options={"num_cpus": 0.25})
            handles[variant] = serve.run(deployment.bind(variant == "reuse"), name=variant, route_prefix=None)
        ref = ray.put(generated)  # one object-store copy, read by both replicas like a hop's argument
        for i in range(args.warmup + args.repeat):
            for variant, handle in handles.items():
                for stage, call in (("prepare", handle.prepare.remote(data)), ("encode", handle.encode.remote(ref))):
                    usage, digest = call.result()
                    digests[stage].add(digest)
                    if i >= args.warmup:
                        rows[variant][stage].append(usage)
    finally:
        serve.shutdown()
        ray.shutdown()

    results: dict[str, Any] = {}
    for stage in ("prepare", "encode"):
        reuse, default = medians(rows["reuse"][stage]), medians(rows["default"][stage])
        results[stage] = {"reuse": reuse, "default": default,
                          "ratio_reuse_to_default": {k: round(reuse[k] / default[k], 3) if default[k] else None
                                                     for k in FIELDS}}
    results["byte_identical"] = {stage: len(found) == 1 for stage, found in digests.items()}
    report = {
        **report_header("imagememory", ray=ray.__version__),
        "settings": {"input": args.input.name, "input_bytes": len(data), "model_size": list(prepared.info.model_size),
                     "repeat": args.repeat, "warmup": args.warmup, "ray_init": ray_init,
                     "order": "alternating: every round calls reuse then default, prepare then encode"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for stage in ("prepare", "encode"):
        r = results[stage]
        print(f"{stage:8} reuse {r['reuse']}  default {r['default']}")
    print(f"byte-identical outputs: {results['byte_identical']}; wrote {args.out}")


if __name__ == "__main__":
    main()
