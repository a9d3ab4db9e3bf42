"""LoRA versions on the tiny transformer: ordering, the store, every key format, refusals, LRU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from deployments.errors import InvalidParameter
from deployments.lora import LoraStore, TINY_VERSIONS, base_linear_shapes, ensure_tiny_loras, inspect_lora, version_key
from deployments.preprocess import Preprocess
from deployments.real import RealModel
from deployments.real_config import RealModelConfig, RealParams


def test_versions_sort_by_number_not_by_text() -> None:
    names = ["v2511-0823", "v10-1", "v2511-0715", "v9-1", "v2511-0801", "v2511-900"]
    assert sorted(names, key=version_key) == ["v9-1", "v10-1", "v2511-0715", "v2511-0801", "v2511-0823", "v2511-900"]


def test_store_lists_rescans_and_refuses_paths(tmp_path: Path) -> None:
    source = ensure_tiny_loras(tmp_path / "cache")
    store = LoraStore(tmp_path / "loras", rescan_s=3600, settle_s=0)
    (tmp_path / "loras").mkdir()
    for version in ("v2511-0801", "v2511-0715"):
        (tmp_path / "loras" / f"{version}.safetensors").write_bytes((source / f"{version}.safetensors").read_bytes())
    (tmp_path / "loras" / "old.ckpt").write_bytes(b"pickle")
    assert store.versions() == ["v2511-0715", "v2511-0801"]
    assert store.newest() == "v2511-0801"
    # a file dropped in appears without a restart: asking for it rescans; it is listed once a
    # second scan finds it unchanged
    (tmp_path / "loras" / "v2511-0823.safetensors").write_bytes((source / "v2511-0823.safetensors").read_bytes())
    with pytest.raises(InvalidParameter, match="v2511-0823 is new: listed once a second scan"):
        store.path("v2511-0823")
    assert store.path("v2511-0823").name == "v2511-0823.safetensors"
    assert store.versions()[-1] == "v2511-0823"
    with pytest.raises(InvalidParameter) as error:
        store.path("v2511-9999")
    assert error.value.field == "lora"
    assert "none, v2511-0715, v2511-0801, v2511-0823" in error.value.message
    for hostile in ("../v2511-0715", "/etc/passwd", "a/b", "..", ".hidden", "old.ckpt/../x"):
        with pytest.raises(InvalidParameter, match="not a version name"):
            store.path(hostile)


# -- loading into the tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """The three tiny versions plus v2511-0715 re-written in every other key format, and bad files."""
    directory = tmp_path_factory.mktemp("loras")
    source = ensure_tiny_loras(model_cache)
    for version in TINY_VERSIONS:
        (directory / f"{version}.safetensors").write_bytes((source / f"{version}.safetensors").read_bytes())
    tensors = load_file(str(source / "v2511-0715.safetensors"))
    pairs = {}
    for key, value in tensors.items():
        module, role = key[len("transformer."):].rsplit(".lora_", 1)
        pairs.setdefault(module, {})[role.split(".")[0]] = value  # "A" / "B"
    rank = next(iter(pairs.values()))["A"].shape[0]
    formats = {
        "kohya": {k: v for m, p in pairs.items() for k, v in (
            (f"lora_unet_{m.replace('.', '_')}.lora_down.weight", p["A"]),
            (f"lora_unet_{m.replace('.', '_')}.lora_up.weight", p["B"]),
            (f"lora_unet_{m.replace('.', '_')}.alpha", np.array(float(rank), dtype=np.float32)))},
        "comfyui": {f"diffusion_model.{m}.lora_{r}.weight": v for m, p in pairs.items() for r, v in p.items()},
        "default": {f"transformer.{m}.lora_{r}.default.weight": v for m, p in pairs.items() for r, v in p.items()},
        "bare": {f"{m}.lora_{r}.weight": v for m, p in pairs.items() for r, v in p.items()},
    }
    for name, state in formats.items():
        save_file(state, str(directory / f"fmt-{name}.safetensors"))
    first = next(iter(pairs))
    save_file({**tensors, "transformer.no_such_block.attn.to_q.lora_A.weight": pairs[first]["A"],
               "transformer.no_such_block.attn.to_q.lora_B.weight": pairs[first]["B"]},
              str(directory / "bad-unknown-module.safetensors"))
    wide = {k: (np.zeros((v.shape[0], 40), np.float32) if ".lora_A." in k else v) for k, v in tensors.items()}
    save_file(wide, str(directory / "bad-shapes.safetensors"))
    save_file({f"transformer.{first}.lokr_w1": np.zeros((4, 4), np.float32),
               f"transformer.{first}.lokr_w2": np.zeros((12, 12), np.float32)}, str(directory / "bad-lokr.safetensors"))
    (directory / "bad-truncated.safetensors").write_bytes((source / "v2511-0715.safetensors").read_bytes()[:300])
    torch.save({"x": torch.zeros(1)}, directory / "pickled.pt")
    return directory


@pytest.fixture(scope="module")
def model(model_cache: Path, lora_dir: Path) -> RealModel:
    config = RealModelConfig(condition_area=4096, num_threads=1, lora_dir=str(lora_dir), max_adapters_per_replica=2)
    real = RealModel(config, model_cache)
    real.load()
    return real


@pytest.fixture(scope="module")
def image():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(buffer, "PNG")
    return Preprocess().prepare(buffer.getvalue(), RealModel.input_spec)


def run(model: RealModel, image, lora: str) -> np.ndarray:
    result = model.generate(image, RealParams(steps=2, seed=3, lora=lora))
    assert result.params["lora"] == lora
    return result.array


def test_versions_change_the_output_and_none_is_the_base(model: RealModel, image) -> None:
    base = run(model, image, "none")
    outputs = [run(model, image, version) for version in TINY_VERSIONS]
    for output in outputs:
        assert np.abs(output.astype(int) - base).mean() > 1.0
    assert not np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[1], outputs[2])
    assert np.array_equal(run(model, image, "none"), base)  # adapters resident but disabled
    assert np.array_equal(run(model, image, TINY_VERSIONS[0]), outputs[0])


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "default", "bare"])
def test_every_key_format_gives_the_diffusers_output(model: RealModel, image, lora_dir: Path, fmt: str) -> None:
    report = inspect_lora(lora_dir / f"fmt-{fmt}.safetensors", base_linear_shapes(model.config.transformer_dir(model.cache_dir)))
    assert report.ok, report.problems
    assert report.format == {"default": "peft-default"}.get(fmt, fmt)
    assert report.ranks == [4] and len(report.targets) == 8
    reference = run(model, image, "v2511-0715")
    converted = run(model, image, f"fmt-{fmt}")
    assert np.abs(converted.astype(int) - reference).max() <= 1
    assert np.abs(converted.astype(int) - run(model, image, "none")).mean() > 1.0  # it did load something


@pytest.mark.parametrize(
    "version,message",
    [
        ("bad-unknown-module", "no_such_block.attn.to_q"),
        ("bad-shapes", "do not fit a Linear(48 → 48)"),
        ("bad-lokr", "LoKr adapters are not supported"),
        ("bad-truncated", "not a readable .safetensors file"),
    ],
)
def test_refused_files_name_the_reason_and_leave_the_model_unchanged(model: RealModel, image, version, message) -> None:
    before = {v: run(model, image, v) for v in ("none", "v2511-0801")}
    resident = model.stats()["adapters"]
    with pytest.raises(InvalidParameter) as error:
        run(model, image, version)
    assert error.value.field == "lora" and message in error.value.message
    assert model.stats()["adapters"] == resident
    assert model.pipe.get_list_adapters().get("transformer", []) == resident
    for v, output in before.items():
        assert np.array_equal(run(model, image, v), output)


def test_pickle_is_never_a_version_and_inspect_refuses_it(model: RealModel, lora_dir: Path) -> None:
    assert "pickled" not in model.store.versions()
    report = inspect_lora(lora_dir / "pickled.pt")
    assert not report.ok and "pickle" in report.problems[0]


def test_lru_keeps_k_versions_and_the_base_is_loaded_once(model: RealModel, image) -> None:
    for version in TINY_VERSIONS:
        run(model, image, version)
    stats = model.stats()
    assert stats["adapters"] == list(TINY_VERSIONS[1:])  # K=2: the oldest was evicted
    assert model.pipe.get_list_adapters()["transformer"] == list(TINY_VERSIONS[1:])
    loads = stats["adapter_loads"][TINY_VERSIONS[2]]
    run(model, image, TINY_VERSIONS[2])
    assert model.stats()["adapter_loads"][TINY_VERSIONS[2]] == loads  # resident: no reload
    assert stats["loads"] == 1


def test_tiny_adapter_shapes_match_the_tiny_transformer(model: RealModel, model_cache: Path) -> None:
    for version in TINY_VERSIONS:
        report = inspect_lora(ensure_tiny_loras(model_cache) / f"{version}.safetensors", base_linear_shapes(model.config.transformer_dir(model.cache_dir)))
        assert report.ok, report.problems


def test_cli_inspect_reports_format_rank_targets_and_fit(lora_dir: Path, model_cache: Path, capsys) -> None:
    from deployments.tiny import ensure_tiny
    from serve_app import cli

    base = str(ensure_tiny("edit", model_cache))
    assert cli.main(["lora", "inspect", str(lora_dir / "fmt-kohya.safetensors"), "--base", base]) == 0
    out = capsys.readouterr().out
    assert "format:  kohya" in out and "rank:    4" in out and "alpha:   4" in out
    assert "targets: 8 modules (to_k, to_out.0, to_q, to_v)" in out and "fits:    yes" in out
    assert cli.main(["lora", "inspect", str(lora_dir / "bad-shapes.safetensors"), "--base", base]) == 2
    out = capsys.readouterr().out
    assert "fits:    NO" in out and "do not fit a Linear(48 → 48)" in out
    assert cli.main(["lora", "inspect", str(lora_dir / "pickled.pt")]) == 2
    assert "pickle file" in capsys.readouterr().out
