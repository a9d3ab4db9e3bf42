"""Speed presets on `real`: transformer forwards and wall time per image, `full` against `fast`, and
what stacking a LoRA version on the speed adapter costs — all measured in one run, so the figures
are ratios of the same machine.

Demo profile (configs/demo.yaml's `real` section: CPU, tiny pipeline, the tiny versions and the
tiny `fast` speed adapter: 4 steps, CFG off), model class constructed directly, four variants:

    full_version  preset=full, the newest version (the demo's default)   30 steps, cfg 7 (2 passes/step)
    fast_version  preset=fast, the newest version                        4 steps, cfg 1 (1 pass/step)
    fast_none     preset=fast, lora=none (the speed adapter alone)
    full_none     preset=full, lora=none (the base alone)

1. Transformer forwards per image, counted by a forward hook on `model.pipe.transformer`; goal:
   full (60) → fast <= 8.
2. Wall time per image of `RealModel.generate` (median and p90 over `--repeat` rounds after one
   warm-up of each variant), full/fast ratio, and where the time goes: the transformer's forwards
   (timed by hooks around each forward) and the pipeline stages (`deployments.metrics.capture()`:
   encode_prompt, encode_image, denoise, decode).
3. The cost of stacking: fast_version against fast_none, full_version against full_none, per image
   (ms and %, also as the median of the paired differences of each round) and per forward.

One input for all (tests/data/samples/photo_1.jpg through the demo's Preprocess, as the service
would prepare it), one seed, the variants in alternating order (forward in even rounds, reversed
in odd ones), so machine load affects all alike. Threads as a demo replica has them: torch 1
(`real.num_threads`), OMP_NUM_THREADS=1 unless set.

    .venv/bin/python bench/speed.py [--repeat 7] [--out bench/results/speed.json] [--plot bench/results/speed.png]

Writes the JSON (after bench.common's report header: command, machine, versions, git state,
environment) and, where matplotlib is importable, the PNG (else it says the plot was skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEFAULT_INPUT = ROOT / "tests" / "data" / "samples" / "photo_1.jpg"
RESULTS = Path(__file__).resolve().parent / "results"

# A demo replica runs with OMP_NUM_THREADS = floor(num_cpus) = 1 (Ray sets it); read when torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.common import report_header  # noqa: E402

VARIANTS: dict[str, dict[str, str | None]] = {
    "full_version": {"preset": "full", "lora": None},
    "fast_version": {"preset": "fast", "lora": None},
    "fast_none": {"preset": "fast", "lora": "none"},
    "full_none": {"preset": "full", "lora": "none"},
}
"""Variant → its request fields (lora None: the configured default, the newest version)."""
GOAL_FULL_FORWARDS = 60
GOAL_FAST_FORWARDS_MAX = 8
SEED = 1
NOTE = ("On the tiny demo model the transformer has about 0.2 M parameters, so the text encoder and "
        "above all the float32 VAE (encode of the condition image, decode of the result at the input's "
        "size) are a much larger share of an image's time than on a real card, where the 20B-parameter "
        "transformer dominates (DESIGN.md §9: 46.8 s transformer time for 50 steps + CFG on an H100). "
        "The wall-time ratio full/fast therefore understates what a card gains; the forward count is "
        "exact and carries over unchanged (a card's transformer time scales with it). Likewise the "
        "tiny adapters are rank 4 on a width of 48 (8 % of the width; a real rank-64 LoRA on a "
        "width of 3072 is 2 %), so the per-forward stacking overhead here is no estimate of a card's.")


def versions() -> dict[str, str]:
    """Versions of the libraries on the measured path (the header adds python)."""
    import diffusers
    import numpy as np
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def matplotlib_version() -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    return matplotlib.__version__


def stats_ms(seconds: list[float]) -> dict[str, Any]:
    """Median, p90 (linear interpolation), min, max and every sample, in ms."""
    import numpy as np

    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1), "samples_ms": [round(v, 1) for v in ms]}


class ForwardMeter:
    """Forward hooks on the transformer: how many forwards, and their seconds (CUDA synchronised)."""

    def __init__(self, transformer: Any) -> None:
        import torch

        self.cuda = torch.cuda.is_available() and next(transformer.parameters()).is_cuda
        self.count = 0
        self.seconds = 0.0
        self._start = 0.0
        self.handles = [transformer.register_forward_pre_hook(self._pre), transformer.register_forward_hook(self._post)]

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _pre(self, module: Any, args: Any) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module: Any, args: Any, output: Any) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start
        self.count += 1

    def reset(self) -> None:
        self.count, self.seconds = 0, 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure(repeat: int, cache_dir: Path, input_path: Path) -> dict[str, Any]:
    import torch
    import yaml

    from deployments import metrics
    from deployments.preprocess import Preprocess
    from deployments.real import RealModel
    from deployments.real_config import RealParams
    from serve_app.config import load_config

    args = yaml.safe_load(DEMO_CONFIG.read_text())["applications"][0]["args"]
    config = load_config({**args, "cache_dir": str(cache_dir)})
    model = RealModel(config.real, cache_dir)
    start = time.perf_counter()
    model.load()  # generates the tiny pipeline, versions and speed adapter on first use
    load_s = time.perf_counter() - start
    prepared = Preprocess(config.preprocess).prepare(input_path.read_bytes(), RealModel.input_spec)
    meter = ForwardMeter(model.pipe.transformer)

    def run(name: str) -> dict[str, Any]:
        meter.reset()
        with metrics.capture() as records:
            start = time.perf_counter()
            generated = model.generate(prepared, RealParams(seed=SEED, **VARIANTS[name]))
            wall = time.perf_counter() - start
        stages = {tags["stage"]: value for metric, value, tags in records
                  if metric == metrics.stage_seconds.name and tags.get("task") == "real"}
        return {"wall_s": wall, "forwards": meter.count, "transformer_s": meter.seconds, "stages": stages,
                "params": generated.params, "sha256": hashlib.sha256(generated.array.tobytes()).hexdigest()}

    names = list(VARIANTS)
    for name in names:  # warm-up: one of each, not counted
        run(name)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    began = time.perf_counter()
    for round_ in range(repeat):
        for name in names if round_ % 2 == 0 else names[::-1]:
            runs[name].append(run(name))
    measured_s = time.perf_counter() - began
    meter.remove()

    per_variant: dict[str, Any] = {}
    for name in names:
        rs = runs[name]
        wall = [r["wall_s"] for r in rs]
        transformer = [r["transformer_s"] for r in rs]
        share = [r["transformer_s"] / r["wall_s"] for r in rs]
        stage_names = sorted({s for r in rs for s in r["stages"]})
        stage_ms = {s: round(statistics.median(r["stages"].get(s, 0.0) for r in rs) * 1000, 1) for s in stage_names}
        first = rs[0]["params"]
        forwards = sorted({r["forwards"] for r in rs})
        per_variant[name] = {
            "request": {k: v for k, v in VARIANTS[name].items() if v is not None},
            "resolved": {"preset": first["preset"], "lora": first["lora"], "steps": first["steps"], "cfg": first["cfg"],
                         "adapters": first["adapters"]},
            "forwards_per_image": forwards[0] if len(forwards) == 1 else forwards,
            "time_per_image": stats_ms(wall),
            "transformer_ms_per_image": {"p50_ms": round(statistics.median(transformer) * 1000, 1)},
            "transformer_ms_per_forward": round(statistics.median(transformer) * 1000 / max(forwards[0], 1), 2),
            "transformer_share": round(statistics.median(share), 3),
            "rest_ms_per_image_p50": round(statistics.median(w - t for w, t in zip(wall, transformer)) * 1000, 1),
            "stages_p50_ms": stage_ms,
            "identical_outputs_over_repeats": len({r["sha256"] for r in rs}) == 1,
        }

    def p50(name: str) -> float:
        return per_variant[name]["time_per_image"]["p50_ms"]

    def stacking(with_version: str, alone: str) -> dict[str, Any]:
        paired = [(a["wall_s"] - b["wall_s"]) * 1000 for a, b in zip(runs[with_version], runs[alone])]
        paired_t = [(a["transformer_s"] - b["transformer_s"]) * 1000 for a, b in zip(runs[with_version], runs[alone])]
        forwards = per_variant[alone]["forwards_per_image"]
        return {
            "with_version_p50_ms": p50(with_version), "without_p50_ms": p50(alone),
            "overhead_ms_per_image": round(p50(with_version) - p50(alone), 1),
            "overhead_pct": round((p50(with_version) / p50(alone) - 1) * 100, 1),
            "paired_overhead_ms_per_image_p50": round(statistics.median(paired), 1),
            "paired_overhead_ms_per_image_min_max": [round(min(paired), 1), round(max(paired), 1)],
            "transformer_overhead_ms_per_image_p50": round(statistics.median(paired_t), 1),
            "transformer_overhead_ms_per_forward": round(statistics.median(paired_t) / max(forwards, 1), 3),
            "transformer_overhead_pct": round(
                (per_variant[with_version]["transformer_ms_per_image"]["p50_ms"]
                 / per_variant[alone]["transformer_ms_per_image"]["p50_ms"] - 1) * 100, 1),
        }

    full_forwards = per_variant["full_version"]["forwards_per_image"]
    fast_forwards = per_variant["fast_version"]["forwards_per_image"]
    ratio = p50("full_version") / p50("fast_version")
    transformer_ratio = (per_variant["full_version"]["transformer_ms_per_image"]["p50_ms"]
                         / per_variant["fast_version"]["transformer_ms_per_image"]["p50_ms"])
    hashes = {name: runs[name][0]["sha256"] for name in names}
    return {
        "parameters": {
            "config": "configs/demo.yaml args (real, preprocess); RealModel constructed directly, no Ray",
            "cache_dir": str(cache_dir), "repeat": repeat, "warm_up": "one image of each variant, not counted",
            "order": "variants in the order listed in even rounds, reversed in odd rounds",
            "input": f"{input_path.relative_to(ROOT) if input_path.is_relative_to(ROOT) else input_path} through "
                     f"Preprocess(demo preprocess config) → {prepared.array.shape[1]}x{prepared.array.shape[0]} RGB",
            "seed": SEED, "prompt": "the configured default", "torch_threads": torch.get_num_threads(),
            "device": model.device, "dtype": str(model.pipe.transformer.dtype).removeprefix("torch."),
            "transformer_params": sum(p.numel() for p in model.pipe.transformer.parameters()),
            "load_s": round(load_s, 2), "measured_s": round(measured_s, 1),
        },
        "variants": per_variant,
        "forwards": {"full": full_forwards, "fast": fast_forwards,
                     "ratio": round(full_forwards / fast_forwards, 2) if fast_forwards else None},
        "time": {"full_p50_ms": p50("full_version"), "fast_p50_ms": p50("fast_version"),
                 "ratio_full_over_fast": round(ratio, 2),
                 "transformer_ratio_full_over_fast": round(transformer_ratio, 2),
                 "transformer_share": {"full": per_variant["full_version"]["transformer_share"],
                                       "fast": per_variant["fast_version"]["transformer_share"]}},
        "stacking": {"fast": stacking("fast_version", "fast_none"), "full": stacking("full_version", "full_none")},
        "outputs_distinct": {"fast_version_vs_fast_none": hashes["fast_version"] != hashes["fast_none"],
                             "full_version_vs_full_none": hashes["full_version"] != hashes["full_none"],
                             "fast_version_vs_full_version": hashes["fast_version"] != hashes["full_version"]},
        "goal": {"full_forwards==": GOAL_FULL_FORWARDS, "fast_forwards<=": GOAL_FAST_FORWARDS_MAX,
                 "pass": full_forwards == GOAL_FULL_FORWARDS and isinstance(fast_forwards, int)
                 and fast_forwards <= GOAL_FAST_FORWARDS_MAX},
        "note": NOTE,
    }


def plot(result: dict[str, Any], path: Path) -> str:
    """Forwards per image and time per image (transformer / rest, p90 whisker) per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not importable"
    variants = result["variants"]
    names = list(variants)
    labels = [n.replace("_", "\n") for n in names]
    colors = ["#c44e52" if n.startswith("full") else "#4c72b0" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    forwards = [variants[n]["forwards_per_image"] for n in names]
    bars = left.bar(labels, forwards, color=colors)
    left.bar_label(bars)
    left.axhline(GOAL_FAST_FORWARDS_MAX, color="k", ls="--", lw=1, label=f"goal for fast: <= {GOAL_FAST_FORWARDS_MAX}")
    left.set_ylabel("transformer forwards per image")
    left.set_title(f"forwards: full {result['forwards']['full']} → fast {result['forwards']['fast']} "
                   f"({'PASS' if result['goal']['pass'] else 'FAIL'})")
    left.legend()
    total = [variants[n]["time_per_image"]["p50_ms"] / 1000 for n in names]
    trans = [variants[n]["transformer_ms_per_image"]["p50_ms"] / 1000 for n in names]
    p90 = [variants[n]["time_per_image"]["p90_ms"] / 1000 for n in names]
    rest = [t - x for t, x in zip(total, trans)]
    right.bar(labels, trans, color=colors, label="transformer forwards")
    right.bar(labels, rest, bottom=trans, color=colors, alpha=0.35, label="rest (text encoder, VAE, scheduler)")
    right.errorbar(labels, total, yerr=[[0] * len(total), [max(p - t, 0) for p, t in zip(p90, total)]],
                   fmt="none", ecolor="k", capsize=4, label="p50 … p90")
    for x, (t, s) in enumerate(zip(total, (variants[n]["transformer_share"] for n in names))):
        right.text(x, t, f"{t:.2f} s\n({s:.0%} transformer)", ha="center", va="bottom", fontsize=8)
    right.set_ylabel("seconds per image (median)")
    right.set_ylim(0, max(p90) * 1.25)
    right.set_title(f"time: full/fast {result['time']['ratio_full_over_fast']}× "
                    f"(transformer alone {result['time']['transformer_ratio_full_over_fast']}×)")
    right.legend(fontsize=8, loc="upper center")
    p = result["parameters"]
    fig.suptitle(f"real, demo profile (tiny model, {p['device']}, {p['torch_threads']} thread), "
                 f"{p['repeat']} rounds; tiny model: VAE/text encoder dominate, so time ratio understates a card's",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="measured rounds of the four variants (default 7: a few minutes)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/imgserve").expanduser(),
                        help="where the tiny models are (generated on first use)")
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="the input image (one for all variants)")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "speed.png", help="the PNG (needs matplotlib)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    import torch

    library_versions = versions()  # first: its imports stay out of the timings
    measured = measure(args.repeat, args.cache_dir.expanduser(), args.input.resolve())
    header = report_header("speed", **library_versions, matplotlib=matplotlib_version())
    header["machine"]["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    result = {**header, **measured}
    result["plot"] = plot(result, args.plot.resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("forwards", "time", "stacking", "goal", "plot")}, indent=2))
    if result["plot"].startswith("skipped"):
        print(f"plot {result['plot']}", file=sys.stderr)


if __name__ == "__main__":
    main()
