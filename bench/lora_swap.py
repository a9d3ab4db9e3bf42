"""LoRA hot swap on `real`: switch between resident versions, load a new version from disk, reload
the whole pipeline — all measured in one run, so the figures are ratios of the same machine.

Demo profile (CPU, tiny pipeline, the three tiny versions), model class constructed directly:
  .venv/bin/python bench/lora_swap.py
Where CUDA is available, `--transformer-config PATH` builds that transformer (e.g. the real
Qwen-Image-Edit-2511 `transformer/config.json`) with random bf16 weights on the GPU and times a
rank-64 adapter on every attention and MLP Linear against reading the transformer's weights from a
safetensors file of the same size (the dominant cost of reloading the pipeline):
  python bench/lora_swap.py --transformer-config deployments/model_configs/qwen-image-edit-2511/transformer/config.json
Writes bench/results/lora_swap.json (or --out), after bench.common's report header (command,
machine, versions, git state, environment).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import report_header  # noqa: E402


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 3),
        "n": len(ordered),
    }


def versions() -> dict[str, str]:
    """Versions of the libraries on the measured path (the header adds python)."""
    import diffusers
    import peft
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "numpy": np.__version__}


def demo_profile(repeat: int, cache_dir: Path) -> dict:
    """The demo's RealModel: switch (resident), load (from disk), reload (whole pipeline)."""
    from PIL import Image

    from deployments.lora import TINY_VERSIONS
    from deployments.preprocess import Preprocess
    from deployments.real import RealModel
    from deployments.real_config import RealModelConfig, RealParams

    config = RealModelConfig(source="tiny", condition_area=4096, num_threads=1, lora_dir="tiny",
                             max_adapters_per_replica=len(TINY_VERSIONS))
    model = RealModel(config, cache_dir)
    model.load()  # builds the tiny pipeline once if missing; the timed reloads below read it from disk

    # switch: all versions resident, activate them in turn (what a request does before denoising)
    for version in TINY_VERSIONS:
        model._activate(version)
    switch = []
    for i in range(repeat * 10):
        version = TINY_VERSIONS[i % len(TINY_VERSIONS)]
        start = time.perf_counter()
        model._activate(version)
        switch.append(time.perf_counter() - start)

    # load from disk: K=1 and alternate, so every activation reads, checks and loads a file
    cold = RealModel(config.model_copy(update={"max_adapters_per_replica": 1}), cache_dir)
    cold.load()
    load = []
    for i in range(repeat * 3):
        version = TINY_VERSIONS[i % len(TINY_VERSIONS)]
        start = time.perf_counter()
        cold._activate(version)
        load.append(time.perf_counter() - start)
    file_bytes = statistics.mean(cold.store.path(v).stat().st_size for v in TINY_VERSIONS)

    # reload the whole pipeline (what a version change would cost without hot swap)
    reload = []
    for _ in range(max(3, repeat // 2)):
        fresh = RealModel(config, cache_dir)
        start = time.perf_counter()
        fresh.load()
        reload.append(time.perf_counter() - start)

    # sanity: the versions really differ on the same input
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    prepared = Preprocess().prepare(buffer.getvalue(), RealModel.input_spec)
    outputs = [model.generate(prepared, RealParams(steps=2, seed=0, lora=v)).array for v in TINY_VERSIONS]
    distinct = len({o.tobytes() for o in outputs}) == len(outputs)

    load_stats = percentiles(load)
    result = {
        "switch_resident": percentiles(switch),
        "load_from_disk": {**load_stats, "file_bytes": int(file_bytes),
                           "mb_per_s": round(file_bytes / 1e6 / (load_stats["p50_ms"] / 1000), 2)},
        "reload_pipeline": percentiles(reload),
        "versions_give_distinct_outputs": distinct,
    }
    result["ratios"] = {
        "reload_over_load": round(result["reload_pipeline"]["p50_ms"] / load_stats["p50_ms"], 1),
        "reload_over_switch": round(result["reload_pipeline"]["p50_ms"] / result["switch_resident"]["p50_ms"], 1),
    }
    result["goal"] = {"switch_p50_ms<=": 5.0, "pass": result["switch_resident"]["p50_ms"] <= 5.0}
    return result


def real_size(transformer_config: Path, rank: int, repeat: int) -> dict:
    """Real-size transformer with random bf16 weights on CUDA, a rank-`rank` adapter on every
    attention and MLP Linear: load it, switch it, and read the base weights from disk for scale."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file, save_file

    from deployments.lora import diffusers_state_dict, inspect_lora, linear_shapes

    device = "cuda"
    config = json.loads(Path(transformer_config).read_text())
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(config)
    transformer = transformer.to_empty(device=device).to(torch.bfloat16)
    params = sum(p.numel() for p in transformer.parameters())
    shapes = {name: shape for name, shape in linear_shapes(transformer).items()
              if ".attn." in name or ".img_mlp." in name or ".txt_mlp." in name}
    with tempfile.TemporaryDirectory() as tmp:
        rng = torch.Generator().manual_seed(0)
        files = []
        for index in range(2):
            state = {}
            for name, (fan_in, fan_out) in shapes.items():
                state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=rng).to(torch.bfloat16) * 0.01
                state[f"transformer.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=rng).to(torch.bfloat16) * 0.01
            path = Path(tmp) / f"v{index}.safetensors"
            save_file(state, str(path))
            files.append(path)
        load = []
        for i in range(repeat):
            path = files[i % 2]
            torch.cuda.synchronize()
            start = time.perf_counter()
            report = inspect_lora(path, shapes)
            transformer.load_lora_adapter(diffusers_state_dict(path, report), adapter_name=f"v{i}", prefix="transformer")
            torch.cuda.synchronize()
            load.append(time.perf_counter() - start)
            if i:
                transformer.delete_adapters([f"v{i - 1}"])
        switch = []
        transformer.load_lora_adapter(diffusers_state_dict(files[0], inspect_lora(files[0], shapes)),
                                      adapter_name="a", prefix="transformer")
        for i in range(repeat * 5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            transformer.set_adapters(["a" if i % 2 else f"v{repeat - 1}"])
            torch.cuda.synchronize()
            switch.append(time.perf_counter() - start)
        # the base weights read back from disk: the dominant part of reloading the pipeline
        base_path = Path(tmp) / "base.safetensors"
        save_file({k: v.contiguous() for k, v in transformer.state_dict().items() if "lora" not in k}, str(base_path))
        start = time.perf_counter()
        weights = load_file(str(base_path), device=device)
        torch.cuda.synchronize()
        reload_s = time.perf_counter() - start
        del weights
        file_bytes = files[0].stat().st_size
    load_stats = percentiles(load)
    return {
        "device": torch.cuda.get_device_name(),
        "transformer_params": params,
        "adapter": {"rank": rank, "modules": len(shapes), "file_bytes": file_bytes},
        "load_from_disk": {**load_stats, "mb_per_s": round(file_bytes / 1e6 / (load_stats["p50_ms"] / 1000), 1)},
        "switch_resident": percentiles(switch),
        "reload_transformer_weights_s": round(reload_s, 2),
        "ratio_reload_over_load": round(reload_s / (load_stats["p50_ms"] / 1000), 1),
        "goal": {"load_s<=": 1.5, "ratio>=": 50,
                 "pass": load_stats["p50_ms"] <= 1500 and reload_s / (load_stats["p50_ms"] / 1000) >= 50},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/imgserve").expanduser())
    parser.add_argument("--transformer-config", type=Path, help="real-size run on CUDA with this transformer config")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lora_swap.json")
    args = parser.parse_args()

    import torch

    library_versions = versions()  # first: its imports stay out of the timings
    measured: dict = {}
    if args.transformer_config:
        if not torch.cuda.is_available():
            raise SystemExit("--transformer-config needs CUDA")
        measured["real_size"] = real_size(args.transformer_config, args.rank, args.repeat)
    else:
        measured["demo_profile"] = demo_profile(args.repeat, args.cache_dir)
        measured["real_size"] = "not run: needs CUDA and --transformer-config"
    header = report_header("lora_swap", **library_versions)
    header["machine"]["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    result = {**header, **measured}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
