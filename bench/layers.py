"""The `layers` task: time per request split by stage, and the cost of packaging ZIP vs PSD.

Demo profile (CPU, tiny layered pipeline, model class constructed directly, one torch thread as in
the demo): requests at 640 and 1024 with the model's published defaults (4 layers, 50 steps, cfg 4.0 with
CFG normalisation), once with a prompt and once captioned; each split into caption, encode prompt,
encode image, denoise, decode (the model's own `served["timings_s"]`) and package (ZIP and PSD of
the request's layers). Then packaging alone for 4 layers at 1024² (the size the real model returns
at resolution 1024 for a square input): random RGBA (incompressible, the worst case) and sparse
layers (each opaque in one region, transparent elsewhere, like real decompositions).
  .venv/bin/python bench/layers.py
Writes bench/results/layers.json (or --out), after bench.common's report header (command, machine,
versions, git state, environment). Nothing here runs the real-size model: that needs a
GPU and the real weights, and this script has no GPU path.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import report_header  # noqa: E402


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": ms(statistics.median(ordered)), "min_ms": ms(ordered[0]), "max_ms": ms(ordered[-1]),
            "n": len(ordered)}


def versions() -> dict[str, str]:
    """Versions of the libraries on the measured path (the header adds python)."""
    import diffusers
    import PIL
    import psd_tools
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "psd_tools": psd_tools.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def upload(size: tuple[int, int], seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    array[: size[1] // 3, :, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(array, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def package(layers: np.ndarray, params: dict) -> tuple[float, float, int, int]:
    from deployments.packaging import layer_names, psd_layers, zip_layers

    start = time.perf_counter()
    zipped = zip_layers(layers, {"params": params})
    zip_s = time.perf_counter() - start
    start = time.perf_counter()
    psd = psd_layers(layers, layer_names(len(layers)))
    psd_s = time.perf_counter() - start
    return zip_s, psd_s, len(zipped), len(psd)


def demo_profile(repeat: int, cache_dir: Path, tiny_edge: int, caption_tokens: int, steps: int) -> dict:
    from deployments.layers import LayersModel, LayersModelConfig, LayersParams
    from deployments.preprocess import Preprocess

    config = LayersModelConfig(source="tiny", tiny_edge=tiny_edge, caption_max_new_tokens=caption_tokens,
                               num_threads=1)
    model = LayersModel(config, cache_dir)
    start = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - start
    prepared = Preprocess().prepare(upload((1024, 683)), LayersModel.input_spec)

    cases = {}
    for resolution in (640, 1024):
        for prompt_source, prompt in (("request", "a poster with a title, a person and a background"),
                                      ("caption", None)):
            params = LayersParams(prompt=prompt, layers=4, resolution=resolution, steps=steps, seed=0)
            model.generate(prepared, params)  # warm-up
            stages: dict[str, list[float]] = {}
            sizes = {}
            for _ in range(repeat):
                generated = model.generate(prepared, params)
                for stage, seconds in generated.served["timings_s"].items():
                    stages.setdefault(stage, []).append(seconds)
                zip_s, psd_s, zip_bytes, psd_bytes = package(generated.array, generated.params)
                stages.setdefault("package_zip", []).append(zip_s)
                stages.setdefault("package_psd", []).append(psd_s)
                sizes = {"zip_bytes": zip_bytes, "psd_bytes": psd_bytes}
            p50 = {stage: statistics.median(values) for stage, values in stages.items()}
            model_stages = ("caption", "encode_prompt", "encode_image", "denoise", "decode")
            accounted = sum(p50[s] for s in model_stages)
            cases[f"{resolution}_{prompt_source}"] = {
                "layer_size": generated.params["layer_size"],
                "prompt_source": generated.params["prompt_source"],
                "p50_ms": {stage: ms(value) for stage, value in p50.items()},
                "share_of_model_total": {s: round(p50[s] / p50["total"], 3) for s in model_stages},
                "unaccounted_ms": ms(p50["total"] - accounted),
                "denoise_per_step_ms": ms(p50["denoise"] / steps),
                "request_p50_ms_with_zip": ms(p50["total"] + p50["package_zip"]),
                **sizes,
            }
    return {
        "config": {"tiny_edge": tiny_edge, "caption_max_new_tokens": caption_tokens, "num_threads": 1,
                   "layers": 4, "steps": steps, "cfg": 4.0, "cfg_normalize": True, "input": "1024x683 RGBA PNG"},
        "load_s": round(load_s, 3),
        "repeat": repeat,
        "cases": cases,
        "note": ("tiny random-weight pipeline: the split shows where a request's time goes in the "
                 "demo profile (CPU, random weights, tiny sizes); real-size proportions differ "
                 "(the transformer dominates there)."),
    }


def packaging_cost(repeat: int) -> dict:
    """ZIP vs PSD for 4 layers of 1024×1024: random (worst case) and sparse (realistic) layers."""
    from deployments.packaging import layer_names, psd_layers, zip_layers

    rng = np.random.default_rng(0)
    random_layers = rng.integers(0, 256, (4, 1024, 1024, 4), dtype=np.uint8)
    sparse = np.zeros((4, 1024, 1024, 4), np.uint8)
    yy, xx = np.mgrid[0:1024, 0:1024]
    sparse[0, ..., :3] = np.stack([xx // 4, yy // 4, (xx + yy) // 8], axis=-1).astype(np.uint8)
    sparse[0, ..., 3] = 255  # an opaque gradient background
    for index, (cx, cy, r) in enumerate([(300, 300, 200), (700, 500, 250), (500, 800, 150)], start=1):
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        sparse[index][inside] = (40 * index, 255 - 60 * index, 90, 255)
    result = {}
    for name, layers in (("random_rgba", random_layers), ("sparse_rgba", sparse)):
        zip_times, psd_times = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            zipped = zip_layers(layers, {"seed": 0})
            zip_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            psd = psd_layers(layers, layer_names(4))
            psd_times.append(time.perf_counter() - start)
        zip_stats, psd_stats = summary(zip_times), summary(psd_times)
        result[name] = {
            "zip": {**zip_stats, "bytes": len(zipped)},
            "psd": {**psd_stats, "bytes": len(psd)},
            "psd_over_zip_time": round(psd_stats["p50_ms"] / zip_stats["p50_ms"], 2),
            "raw_bytes": int(layers.nbytes),
        }
    return {"layers": 4, "size": "1024x1024", "png_compress_level": 6, "psd_compression": "RLE", **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny-edge", type=int, default=64)
    parser.add_argument("--caption-tokens", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/imgserve").expanduser())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "layers.json")
    args = parser.parse_args()

    import torch

    library_versions = versions()  # first: its imports (psd_tools among them) stay out of the timings
    demo = demo_profile(args.repeat, args.cache_dir, args.tiny_edge, args.caption_tokens, args.steps)
    packaging = packaging_cost(args.repeat)
    header = report_header("layers", **library_versions)
    header["machine"]["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    result = {
        **header,
        "demo_profile": demo,
        "packaging_1024": packaging,
        "cuda": "not run: this script has no GPU path" if torch.cuda.is_available() else "not available on this machine",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
