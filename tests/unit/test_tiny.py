"""Tiny offline Qwen-Image pipelines: building, caching (also under concurrency), loading, running."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deployments import checkpoints, tiny  # noqa: E402


def _image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _edit(pipe, *, seed: int, height: int = 48, width: int = 80, steps: int = 2, **kwargs) -> np.ndarray:
    out = pipe(
        image=[_image(96, 64)],
        prompt="make it photoreal",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    return out.images


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def small_conditions():
    tiny.set_condition_areas(64 * 64, 64 * 64)
    yield
    tiny.set_condition_areas(tiny.DEFAULT_VAE_AREA, tiny.DEFAULT_TEXT_AREA)


@pytest.fixture(scope="module")
def edit_pipe(cache_dir, small_conditions):
    pipe = checkpoints.load_pipeline("edit", tiny.ensure_tiny("edit", cache_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def layered_pipe(cache_dir):
    pipe = checkpoints.load_pipeline("layered", tiny.ensure_tiny("layered", cache_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# ensure_tiny: the on-disk cache


def test_ensure_tiny_creates_a_loadable_diffusers_directory(cache_dir, edit_pipe):
    from diffusers import QwenImageEditPlusPipeline

    directory = tiny.ensure_tiny("edit", cache_dir)
    assert directory == cache_dir / "tiny-qwen-edit-v1"
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    # what a stock Qwen2VLProcessor needs on a host with torchvision (not loadable here)
    processor_config = json.loads((directory / "processor" / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2VLProcessor"
    assert processor_config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert {"transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"} <= {
        p.name for p in directory.iterdir()
    }
    assert isinstance(edit_pipe, QwenImageEditPlusPipeline)
    # the real checkpoints' geometry: sizes align to 16 (vae_scale_factor 8 x patch 2)
    assert edit_pipe.vae_scale_factor == 8
    assert edit_pipe.scheduler.config.use_dynamic_shifting


def test_ensure_tiny_reuses_an_existing_directory_without_rebuilding(cache_dir, edit_pipe, monkeypatch):
    directory = tiny.ensure_tiny("edit", cache_dir)
    before = {p: p.stat().st_mtime_ns for p in directory.rglob("*")}

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the directory exists")

    monkeypatch.setattr(tiny, "_build", no_build)
    assert tiny.ensure_tiny("edit", cache_dir) == directory
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*")} == before


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_build(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_build", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.ensure_tiny("edit", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_losing_the_rename_race_keeps_the_winner_and_discards_our_copy(tmp_path, monkeypatch):
    real_save = tiny.save_tiny
    final = tmp_path / "tiny-qwen-edit-v1"

    def save_then_lose_race(pipe, directory):
        real_save(pipe, directory)
        shutil.copytree(directory, final)  # another process finished first
        (final / "winner").write_text("other process")

    monkeypatch.setattr(tiny, "save_tiny", save_then_lose_race)
    assert tiny.ensure_tiny("edit", tmp_path) == final
    assert (final / "winner").read_text() == "other process"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def _ensure_in_subprocess(cache_dir: str, barrier, results) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    from deployments import tiny as tiny_module

    barrier.wait(timeout=60)
    results.put(str(tiny_module.ensure_tiny("edit", Path(cache_dir))))


def test_concurrent_ensure_tiny_from_two_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_subprocess, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    paths = {results.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / "tiny-qwen-edit-v1")}
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-qwen-edit-v1"]  # no temp leftovers
    pipe = checkpoints.load_pipeline("edit", tmp_path / "tiny-qwen-edit-v1")
    assert pipe.transformer.config.in_channels == 16


# ---------------------------------------------------------------------------------------------
# building


def test_building_is_deterministic_per_seed():
    def weights(seed):
        pipe = tiny.build_tiny_edit_pipeline(seed)
        return {
            name: tensor
            for component in ("transformer", "vae", "text_encoder")
            for name, tensor in getattr(pipe, component).state_dict().items()
        }

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# running


def test_edit_pipeline_returns_an_image_of_the_requested_size(edit_pipe):
    images = _edit(edit_pipe, seed=0, height=48, width=80)  # multiples of 16, not of 32
    assert images.shape == (1, 48, 80, 3)
    assert images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0  # not a blank image


def test_edit_pipeline_same_seed_same_image_other_seed_other_image(edit_pipe):
    first, again, other = _edit(edit_pipe, seed=1), _edit(edit_pipe, seed=1), _edit(edit_pipe, seed=2)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_edit_pipeline_reports_every_denoising_step(edit_pipe):
    seen = []

    def on_step_end(pipe, step, timestep, callback_kwargs):
        seen.append(step)
        return {}

    _edit(edit_pipe, seed=0, steps=3, callback_on_step_end=on_step_end)
    assert seen == [0, 1, 2]


def _decompose(pipe, *, resolution: int, layers: int):
    out = pipe(
        image=_image(96, 64, mode="RGBA"),
        prompt="a cat on a sofa",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        layers=layers,
        resolution=resolution,
        generator=torch.Generator().manual_seed(0),
    )
    (result,) = out.images  # one list of layers per input image
    return result


def test_layered_pipeline_returns_the_requested_number_of_rgba_layers(layered_pipe):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered

    original = pipeline_qwenimage_layered.calculate_dimensions
    with tiny.small_layered_sizes():
        small = _decompose(layered_pipe, resolution=640, layers=3)
        large = _decompose(layered_pipe, resolution=1024, layers=2)
    assert pipeline_qwenimage_layered.calculate_dimensions is original  # patch undone

    assert len(small) == 3 and len(large) == 2
    assert all(layer.mode == "RGBA" for layer in small + large)
    assert len({layer.size for layer in small}) == 1 and len({layer.size for layer in large}) == 1
    # the resolution buckets still mean something: 1024 is larger than 640 and keeps the 3:2 aspect
    (small_w, small_h), (large_w, large_h) = small[0].size, large[0].size
    assert large_w * large_h > small_w * small_h
    assert large_w > large_h
