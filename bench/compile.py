"""`real.compile` on the tiny demo model, on CPU: versions swapped into a compiled transformer.

Loads the demo's `real` model twice, eager and with `compile: true` (`torch.compile` of the
transformer, LoRA versions hot-swapped into one adapter sized for `compile_max_rank`), runs the
same request (the `fast` preset stacked with a version) for each of the three tiny versions on
both, and records: the compiled result against the eager one (uint8 images: at most 1/255 apart),
torch.compile's count of distinct graphs after each version (it must not grow after the first),
and the time of each compiled call (the first pays the compilation).

    .venv/bin/python bench/compile.py     # writes bench/results/compile.json (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import REPO, report_header  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compile.json")
    args = parser.parse_args()

    import diffusers
    import peft
    import torch
    from torch._dynamo.utils import counters

    from deployments.lora import TINY_VERSIONS
    from deployments.real import RealModel
    from deployments.real_config import RealParams
    from deployments.records import Prepared, PreparedImage
    import yaml

    from serve_app.config import load_config

    cache = Path(tempfile.mkdtemp(prefix="imgserve-compile-"))
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["applications"][0]["args"]
    section = load_config(demo).real
    eager = RealModel(section.model_copy(update={"max_adapters_per_replica": 1}), cache)
    compiled = RealModel(section.model_copy(update={"max_adapters_per_replica": 1, "compile": True}), cache)
    eager.load()
    compiled.load()
    array = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    image = Prepared(array, PreparedImage((96, 64), (96, 64), (96, 64), 1.0, "PNG", "RGB"))
    rows = []
    for version in TINY_VERSIONS:
        params = RealParams(preset="fast", lora=version, seed=1)
        expected = eager.generate(image, params).array
        started = time.perf_counter()
        result = compiled.generate(image, params).array
        seconds = time.perf_counter() - started
        rows.append({"version": version, "seconds": round(seconds, 3),
                     "unique_graphs": int(counters["stats"]["unique_graphs"]),
                     "max_abs_diff_uint8": int(np.abs(result.astype(int) - expected).max()),
                     "mean_abs_diff_uint8": round(float(np.abs(result.astype(int) - expected).mean()), 4)})
        print(rows[-1])
    flat = len({row["unique_graphs"] for row in rows}) == 1
    close = all(row["max_abs_diff_uint8"] <= 1 for row in rows)
    report = {
        **report_header("compile", torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__),
        "setup": "demo real section, max_adapters_per_replica 1, compile_max_rank 64, preset fast (4 steps) "
                 "with each tiny version in turn, seed 1, a 96x64 random image, on CPU",
        "versions": rows,
        "goal": {"graphs_flat_across_versions": flat, "outputs_equal_eager_within_1_of_255": close,
                 "pass": flat and close},
        "stats": {key: value for key, value in compiled.stats().items() if key in ("adapters", "adapter_loads", "speed_adapters")},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}: graphs flat {flat}, equal to eager {close}")
    return 0 if flat and close else 1


if __name__ == "__main__":
    sys.exit(main())
