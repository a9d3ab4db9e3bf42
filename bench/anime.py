"""Benchmark: AnimeModel's serving path against a plain eager fp32 run of the same module.

Per size (512², 1024²) and batch (1, 8), on CPU, in one process:

  baseline: the published recipe: `Generator` (deployments.animegan, the published module layout)
            loaded from the same style file, input `x / 127.5 - 1` as float32 NCHW, `net(x)` under
            `torch.no_grad()`, output `(y + 1) * 127.5` rounded to uint8; batch 8 is one tensor.
  ours:     `AnimeModel.generate_batch` (the synchronous core of the batch handler, what a replica
            runs on its model thread), constructed directly without Ray, default config: channels-
            last float32, `inference_mode`, `Generator.forward_lean`; batch 8 is split by
            `max_batch_pixels` (1024² → 1 image per tensor, 512² → 4).

The two run alternately (ABBA order across repeats), so the load of other programs on the machine
hits both alike; batch 1 gets one warm-up call each and `--repeat` timed calls, batch 8 one timed
call each (they take tens of seconds). Reported: median ms per call, images/s, speedup (baseline
median / ours median), max abs difference of the uint8 outputs and the share of pixels whose three
channels are all within 2/255, and peak RSS per call.

Peak RSS: `VmHWM` of this process after resetting it to the current RSS (writing 5 to
/proc/self/clear_refs, Linux ≥ 4.0) just before the call; so it is the process's peak during that
call, including everything already resident (torch, both models with 4 styles, the input arrays,
the serving path's kept workspace), plus the same minus the RSS just before the call ("added").
A replica adds Ray's own worker overhead (~0.1–0.2 GB). Where clear_refs is not writable the peak
cannot be reset, so the figure is the process's peak so far (VmHWM, or `ru_maxrss` without /proc;
the JSON's peak_rss_method says so).

GPU: where CUDA exists, AnimeModel with `device: cuda` (float16) at 1024², batch 1 and 8: median
latency, images/s, peak `torch.cuda.max_memory_allocated`, and the agreement with fp32 eager on
the GPU. Elsewhere the JSON records "cuda": "not available on this machine".

    .venv/bin/python bench/anime.py [--sizes 512 1024] [--batches 1 8] [--repeat 3]
        [--out bench/results/anime.json] [--plot bench/results/anime.png]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import report_header  # noqa: E402
from deployments.anime import AnimeModel, AnimeModelConfig, AnimeParams  # noqa: E402
from deployments.animegan import Generator, load_generator  # noqa: E402
from deployments.records import Prepared, PreparedImage  # noqa: E402

SAMPLES = ROOT / "tests" / "data" / "samples"
STYLE = "face_paint_512_v2"
GOAL = {
    "speedup_1024_batch1>=": 1.5,
    "pct_pixels_within_2_of_255>=": 99.9,
    "peak_rss_gb_1024_batch1<=": 1.5,
}
_GB = 1024**3


# -- inputs ------------------------------------------------------------------------------------------
def photos(size: int, count: int) -> list[np.ndarray]:
    """`count` square RGB photos: the sample photos (center crop, LANCZOS) or photo-like synthetics."""
    found = sorted(SAMPLES.glob("*.jpg"))
    out = []
    for i in range(count):
        if found:
            im = Image.open(found[i % len(found)]).convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(im)
            if i >= len(found):  # more images than samples: mirror so the batch is not repeated pixels
                array = array[:, ::-1] if (i // len(found)) % 2 else array[::-1]
            out.append(np.ascontiguousarray(array))
        else:
            rng = np.random.default_rng(i)
            y, x = np.mgrid[0:size, 0:size].astype(np.float32)
            base = np.stack([x / size * 255, y / size * 255, 128 + 80 * np.sin((x + y) / 37)], axis=-1)
            out.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    return out


def prepared(array: np.ndarray) -> Prepared:
    h, w = array.shape[:2]
    return Prepared(array=array, info=PreparedImage((w, h), (w, h), (w, h), 1.0, "PNG", "RGB"))


# -- the two paths -----------------------------------------------------------------------------------
def eager(net: Generator, arrays: list[np.ndarray], device: str = "cpu") -> np.ndarray:
    x = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        y = net(x)
    return ((y + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def served(model: AnimeModel, items: list[Prepared]) -> np.ndarray:
    results = model.generate_batch(items, [AnimeParams(style=STYLE)] * len(items))
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return np.stack([result.array for result in results])


# -- measuring ---------------------------------------------------------------------------------------
def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_kb(path: str, key: str) -> int | None:
    """The `key:  N kB` line of a /proc file, in bytes; None where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# How each measured call's peak was read (the JSON's peak_rss_method): only what was actually read.
PEAK_RSS_METHODS: set[str] = set()


def _peak_rss_bytes(reset: bool) -> int:
    """The process's peak RSS: VmHWM, since the reset where `reset` (clear_refs was written), else
    the peak so far; `ru_maxrss` (never reset) where /proc/self/status gives no VmHWM."""
    peak = _proc_kb("/proc/self/status", "VmHWM")
    if peak is not None:
        PEAK_RSS_METHODS.add("VmHWM after /proc/self/clear_refs reset" if reset
                             else "VmHWM (monotonic: /proc/self/clear_refs not writable)")
        return peak
    PEAK_RSS_METHODS.add("ru_maxrss (monotonic)")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def measured(fn: Callable[[], np.ndarray]) -> tuple[float, int, int, np.ndarray]:
    """(seconds, peak RSS bytes during the call, RSS bytes just before it, output)."""
    reset = _reset_peak()
    before = _current_rss_bytes()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return seconds, _peak_rss_bytes(reset), before, out


def agreement(ours: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    within = (diff.max(axis=-1) <= 2).mean() * 100  # a pixel counts when all three channels are within 2
    return {"max_abs_diff": int(diff.max()), "pct_pixels_within_2_of_255": round(float(within), 4)}


def mem_available() -> int:
    available = _proc_kb("/proc/meminfo", "MemAvailable")
    return available if available is not None else 1 << 62


def cpu_case(net: Generator, model: AnimeModel, size: int, batch: int, repeat: int) -> dict[str, Any]:
    arrays = photos(size, batch)
    items = [prepared(a) for a in arrays]
    paths = {"baseline": lambda: eager(net, arrays), "ours": lambda: served(model, items)}
    row: dict[str, Any] = {"size": f"{size}x{size}", "batch": batch}
    # the eager batch is one tensor: about 1.1 GB of activations per 1024² image in float32
    need = 1.2 * _GB * batch * (size / 1024) ** 2
    if need > 0.7 * mem_available():
        row["skipped"] = f"needs ~{need / _GB:.1f} GB, {mem_available() / _GB:.1f} GB available"
        return row
    times: dict[str, list[float]] = {k: [] for k in paths}
    peaks: dict[str, int] = {k: 0 for k in paths}
    added: dict[str, int] = {k: 0 for k in paths}
    outs: dict[str, np.ndarray] = {}
    rounds = repeat if batch == 1 else 1
    if batch == 1:
        for fn in paths.values():  # warm-up: oneDNN primitives for this shape, allocator
            fn()
    for r in range(rounds):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        for name in order:
            seconds, peak, before, out = measured(paths[name])
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
            added[name] = max(added[name], peak - before)
            outs[name] = out
    for name in paths:
        median = statistics.median(times[name])
        row[name] = {
            "median_ms": round(median * 1000, 1),
            "min_ms": round(min(times[name]) * 1000, 1),
            "runs_ms": [round(t * 1000, 1) for t in times[name]],
            "images_per_s": round(batch / median, 3),
            "peak_rss_gb": round(peaks[name] / _GB, 3),
            "peak_rss_added_gb": round(added[name] / _GB, 3),
        }
    row["speedup"] = round(row["baseline"]["median_ms"] / row["ours"]["median_ms"], 2)
    row["speedup_of_min"] = round(row["baseline"]["min_ms"] / row["ours"]["min_ms"], 2)
    row.update(agreement(outs["ours"], outs["baseline"]))
    print(
        f"{row['size']:>9} x{batch}  baseline {row['baseline']['median_ms']:9.1f} ms"
        f"  ours {row['ours']['median_ms']:9.1f} ms  x{row['speedup']:.2f}"
        f"  max diff {row['max_abs_diff']}  within 2: {row['pct_pixels_within_2_of_255']:.3f} %"
        f"  peak RSS {row['ours']['peak_rss_gb']:.2f} GB (added: baseline {row['baseline']['peak_rss_added_gb']:.2f},"
        f" ours {row['ours']['peak_rss_added_gb']:.2f})",
        flush=True,
    )
    return row


def gpu_cases(style_file: Path, cache_dir: Path, repeat: int) -> Any:
    if not torch.cuda.is_available():
        return "not available on this machine"
    model = AnimeModel(AnimeModelConfig(device="cuda", max_batch_pixels=8 * 1024 * 1024), cache_dir)
    model.load()
    net = load_generator(style_file).cuda()
    rows = []
    for batch in (1, 8):
        arrays = photos(1024, batch)
        items = [prepared(a) for a in arrays]
        served(model, items)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out = served(model, items)  # returns host arrays: includes the copies back
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated()
        reference = eager(net, arrays, device="cuda")
        median = statistics.median(times)
        rows.append(
            {
                "size": "1024x1024",
                "batch": batch,
                "dtype": "float16",
                "median_ms": round(median * 1000, 2),
                "images_per_s": round(batch / median, 2),
                "peak_gpu_memory_gb": round(peak / _GB, 3),
                "vs_fp32_eager_on_gpu": agreement(out, reference),
            }
        )
        print(f"cuda 1024x1024 x{batch}: {rows[-1]}", flush=True)
    return {"device": torch.cuda.get_device_name(0), "results": rows}


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if "ours" in r]
    labels = [f"{r['size']}\nbatch {r['batch']}" for r in rows]
    base = [r["baseline"]["median_ms"] / r["batch"] for r in rows]
    ours = [r["ours"]["median_ms"] / r["batch"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, base, 0.4, label="plain eager fp32 (baseline)")
    ax.bar(x + 0.2, ours, 0.4, label="AnimeModel serving path")
    for i, r in enumerate(rows):
        ax.annotate(f"x{r['speedup']:.2f}", (x[i] + 0.2, ours[i]), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms per image (median)")
    ax.set_title(f"AnimeGANv2 on CPU ({os.cpu_count()} cores), lower is better")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per path at batch 1")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "anime.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "anime.png")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    for value in args.sizes + args.batches:
        if value < 1:
            parser.error(f"sizes and batches must be >= 1, got {value}")

    started = time.perf_counter()
    load_before = os.getloadavg()
    cache_dir = Path(tempfile.mkdtemp(prefix="imgserve-bench-anime-"))
    config = AnimeModelConfig(max_long_edge=max(args.sizes))
    model = AnimeModel(config, cache_dir)
    model.load()
    style_file = model.styles_path / f"{STYLE}.safetensors"
    net = load_generator(style_file)  # the same weights, plain module: contiguous NCHW float32
    rss_loaded = _current_rss_bytes()
    try:
        rows = [cpu_case(net, model, size, batch, args.repeat) for batch in args.batches for size in args.sizes]
        cuda = gpu_cases(style_file, cache_dir, args.repeat)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    measured_rows = [r for r in rows if "ours" in r]
    key = next((r for r in measured_rows if r["size"] == "1024x1024" and r["batch"] == 1), None)
    checks = {
        "speedup_1024_batch1>=": None if key is None else key["speedup"] >= GOAL["speedup_1024_batch1>="],
        "pct_pixels_within_2_of_255>=": bool(measured_rows)
        and all(r["pct_pixels_within_2_of_255"] >= GOAL["pct_pixels_within_2_of_255>="] for r in measured_rows),
        "peak_rss_gb_1024_batch1<=": None
        if key is None
        else key["ours"]["peak_rss_gb"] <= GOAL["peak_rss_gb_1024_batch1<="],
    }
    header = report_header("anime", torch=torch.__version__, numpy=np.__version__, pillow=PIL.__version__,
                           torch_threads=torch.get_num_threads(), onednn=torch.backends.mkldnn.is_available())
    header["machine"]["load_average_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    report = {
        **header,
        "style": f"{STYLE} (random weights of the demo profile; speed and agreement do not depend on the values)",
        "inputs": "sample photos from tests/data/samples, center-cropped and resized" if list(SAMPLES.glob("*.jpg"))
        else "synthetic photo-like images",
        "baseline": "Generator (published layout) float32 NCHW, x/127.5-1, net(x) under torch.no_grad(), "
        "(y+1)*127.5 rounded to uint8; batch 8 as one tensor",
        "ours": "AnimeModel.generate_batch, default config: channels-last float32, inference_mode, "
        "Generator.forward_lean (no reflect-padded copies, in-place GroupNorm, activations in a "
        f"workspace kept between calls, {config.workspace_mb} MiB cap), batch split by max_batch_pixels "
        f"({config.max_batch_pixels} px)",
        # what the measured calls read ("not measured": every case skipped)
        "peak_rss_method": " + ".join(sorted(PEAK_RSS_METHODS)) or "not measured",
        "process_rss_gb_after_loading": round(rss_loaded / _GB, 3),
        "goal": GOAL,
        "checks": checks,
        "pass": all(v is True for v in checks.values()),
        "results": rows,
        "cuda": cuda,
        "notes": [
            "Timings alternate baseline and ours in ABBA order, so machine load from other programs "
            "hits both; the load average before and after the run is recorded under machine.",
            "peak_rss_gb is the whole benchmark process's peak during the call (torch, both models with "
            "all 4 styles, inputs, and the serving path's kept workspace, which stays resident from its "
            "first call on, so it is also inside the baseline's figure); peak_rss_added_gb is that peak "
            "minus the RSS just before the call. For the serving path peak_rss_gb is what a replica "
            "holds, plus Ray's own worker overhead (~0.1-0.2 GB); the baseline alone would need about "
            "process_rss_gb_after_loading + its peak_rss_added_gb.",
            "Batching on CPU: compare images_per_s of batch 8 and batch 1 for 'ours'; the CPU profile "
            "keeps max_batch_size 1 because batching did not raise throughput here.",
        ],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']} s); checks: {checks}")
    if plot(rows, args.plot):
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
