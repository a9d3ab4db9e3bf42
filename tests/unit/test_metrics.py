"""What the deployments record (deployments/metrics.py), seen through `metrics.capture()` without
Ray: the stage times of each task, LoRA loads/hits/evictions, peak GPU memory only with CUDA,
nothing recorded for a failed stage, and plain use without Ray neither imports Ray nor fails."""

from __future__ import annotations

import asyncio
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from deployments import metrics
from deployments.anime import AnimeModel, AnimeParams
from deployments.errors import BadImage, InvalidParameter
from deployments.layers import LayersModel, LayersModelConfig, LayersParams
from deployments.lora import TINY_VERSIONS
from deployments.postprocess import Postprocess
from deployments.preprocess import Preprocess
from deployments.real import RealModel
from deployments.real_config import RealModelConfig, RealParams
from tests.conftest import run_fresh

A, B, C = TINY_VERSIONS
DIFFUSION_STAGES = {"encode_prompt", "encode_image", "denoise", "decode"}


def png(size=(96, 64), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def stages(records, task: str) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {}
    for name, value, tags in records:
        if name == "imgserve_stage_seconds" and tags["task"] == task:
            seen.setdefault(tags["stage"], []).append(value)
    return seen


@pytest.fixture(scope="module")
def real(model_cache) -> RealModel:
    model = RealModel(RealModelConfig(source="tiny", condition_area=4096, num_threads=1, lora_dir="tiny",
                                      max_adapters_per_replica=2), model_cache)
    model.load()
    return model


def test_without_ray_recording_is_a_no_op_that_never_imports_ray() -> None:
    code = (
        "import sys\n"
        "from deployments import metrics\n"
        "with metrics.capture() as seen:\n"
        "    metrics.requests.inc(tags={'task': 'real', 'status': 200, 'api': 'sync'})\n"
        "    metrics.stage_seconds.observe(0.5, tags={'task': 'real', 'stage': 'denoise'})\n"
        "    metrics.jobs_queued.set(3)\n"
        "assert 'ray' not in sys.modules, 'recording imported ray'\n"
        "assert all(m._ray is None for m in metrics.ALL)\n"
        "assert seen[0] == ('imgserve_requests', 1.0, {'task': 'real', 'status': '200', 'api': 'sync'}), seen\n"
        "print(len(seen))\n"
    )
    assert run_fresh(code) == "3"


def test_exported_names_follow_rays_prefix_and_suffixes() -> None:
    names = metrics.exported_names()
    assert {"ray_imgserve_requests_total", "ray_imgserve_stage_seconds_bucket", "ray_imgserve_jobs_queued",
            "ray_imgserve_lora_events_total", "ray_imgserve_gpu_peak_bytes_count"} <= names
    assert all(name.startswith("ray_imgserve_") for name in names)
    # every metric is documented in the module docstring under its exported name
    for metric in metrics.ALL:
        assert f"`{metric.exported}`" in metrics.__doc__, metric.name


def test_buckets_cover_the_demo_and_real_gpus() -> None:
    assert metrics.SECONDS_BUCKETS[0] <= 0.005 and metrics.SECONDS_BUCKETS[-1] >= 1800
    assert list(metrics.SECONDS_BUCKETS) == sorted(set(metrics.SECONDS_BUCKETS))
    gb = [b / 1e9 for b in metrics.GPU_BYTES_BUCKETS]
    assert gb == sorted(set(gb)) and gb[0] <= 0.25 and gb[-1] >= 80 and 22.5 in gb and 24 in gb


def test_preprocess_and_postprocess_record_their_stage_with_the_task() -> None:
    with metrics.capture() as records:
        prepared = Preprocess().prepare(png(), RealModel.input_spec, task="real")
        with pytest.raises(BadImage):
            Preprocess().prepare(b"not an image", RealModel.input_spec, task="real")
    assert list(stages(records, "real")) == ["preprocess"] and len(stages(records, "real")["preprocess"]) == 1
    from deployments.records import Generated

    generated = Generated(array=prepared.array, info=prepared.info, params={"task": "anime"})
    with metrics.capture() as records:
        Postprocess().encode(generated, "png")
    assert list(stages(records, "anime")) == ["postprocess"]


def test_real_records_each_diffusion_stage_once_per_request(real: RealModel) -> None:
    prepared = Preprocess().prepare(png(), RealModel.input_spec)
    with metrics.capture() as records:
        real.generate(prepared, RealParams(steps=2, seed=1, lora="none"))
    seen = stages(records, "real")
    assert set(seen) == DIFFUSION_STAGES
    assert all(len(values) == 1 and values[0] > 0 for values in seen.values()), seen
    # the pipeline is left exactly as it was: no wrapper stays on the instance
    assert not {"encode_prompt", "prepare_latents"} & set(vars(real.pipe)) and "decode" not in vars(real.pipe.vae)
    if not metrics._cuda():
        assert not [r for r in records if r[0] == "imgserve_gpu_peak_bytes"]  # absent on CPU, never 0


def test_a_failed_request_records_no_stage(real: RealModel) -> None:
    prepared = Preprocess().prepare(png(), RealModel.input_spec)

    def broken(*args, **kwargs):
        raise RuntimeError("the VAE broke")

    real.pipe.vae.decode = broken
    try:
        with metrics.capture() as records, pytest.raises(Exception, match="the VAE broke"):
            real.generate(prepared, RealParams(steps=2, seed=1, lora="none"))
    finally:
        del real.pipe.vae.decode
    assert not stages(records, "real")


def test_lora_loads_hits_and_evictions(real: RealModel) -> None:
    prepared = Preprocess().prepare(png(), RealModel.input_spec)
    with metrics.capture() as records:
        served = [asyncio.run(real(prepared, RealParams(steps=2, seed=1, lora=version))).served["lora_load"]
                  for version in (A, A, B, C)]  # A loaded, A resident, B loaded, C loaded evicting A (2 resident)
    assert served == ["cold", "warm", "cold", "cold"]
    events = [(tags["event"], tags["version"]) for name, _, tags in records if name == "imgserve_lora_events"]
    assert events == [("load", A), ("hit", A), ("load", B), ("evict", A), ("load", C)]


def test_layers_records_its_stages(model_cache) -> None:
    model = LayersModel(LayersModelConfig(source="tiny", tiny_edge=64, caption_max_new_tokens=4, num_threads=1),
                        model_cache)
    model.load()
    prepared = Preprocess().prepare(png(mode="RGBA"), LayersModel.input_spec)
    with metrics.capture() as records:
        model.generate(prepared, LayersParams(layers=2, steps=2, seed=1, prompt="a poster"))
        model.generate(prepared, LayersParams(layers=2, steps=2, seed=1))  # no prompt: it captions
    seen = stages(records, "layers")
    assert set(seen) == DIFFUSION_STAGES | {"caption"}
    assert len(seen["caption"]) == 1 and all(len(seen[stage]) == 2 for stage in DIFFUSION_STAGES)


def test_anime_records_one_stylize_time_per_request(model_cache) -> None:
    model = AnimeModel(cache_dir=model_cache)
    model.load()
    good = Preprocess().prepare(png((64, 48)), AnimeModel.input_spec)
    bad = Preprocess().prepare(png((64, 48)), AnimeModel.input_spec)
    with metrics.capture() as records:
        results = model.generate_batch([good, good, bad], [AnimeParams(), AnimeParams(), AnimeParams(style="nope")])
    assert isinstance(results[2], InvalidParameter) and results[2].field == "style"
    assert list(stages(records, "anime")) == ["stylize"] and len(stages(records, "anime")["stylize"]) == 2


class FakeCuda:
    """torch.cuda's peak-memory API for two devices (this machine may have no CUDA)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.peaks = {0: 0, 1: 0}

    def device_count(self) -> int:
        return 2

    def synchronize(self, device: int) -> None:
        self.calls.append(("synchronize", device))

    def reset_peak_memory_stats(self, device: int) -> None:
        self.calls.append(("reset", device))
        self.peaks[device] = 0

    def max_memory_allocated(self, device: int) -> int:
        return self.peaks[device]


def test_with_cuda_peak_memory_is_reset_per_request_and_recorded_per_device(real: RealModel, monkeypatch) -> None:
    cuda = FakeCuda()
    monkeypatch.setattr(metrics, "_cuda", lambda: cuda)
    encode_prompt = real.pipe.encode_prompt

    def allocating(*args, **kwargs):  # the request allocates on both cards while it runs
        cuda.peaks.update({0: 18_000_000_000, 1: 3_000_000_000})
        return encode_prompt(*args, **kwargs)

    monkeypatch.setattr(real.pipe, "encode_prompt", allocating)
    cuda.peaks.update({0: 23_000_000_000, 1: 9})  # a previous request's peaks must not count
    prepared = Preprocess().prepare(png(), RealModel.input_spec)
    with metrics.capture() as records:
        real.generate(prepared, RealParams(steps=2, seed=1, lora="none"))
    peaks = [(tags, value) for name, value, tags in records if name == "imgserve_gpu_peak_bytes"]
    assert peaks == [({"task": "real", "gpu": "0"}, 18e9), ({"task": "real", "gpu": "1"}, 3e9)]
    assert cuda.calls[:2] == [("reset", 0), ("reset", 1)]
    # every stage boundary waits for both devices, so kernels count in the stage that queued them
    assert cuda.calls.count(("synchronize", 0)) == cuda.calls.count(("synchronize", 1)) >= 6
