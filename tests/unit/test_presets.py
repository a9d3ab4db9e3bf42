"""Speed presets and stacked adapters on `real`, without Ray: config checks, defaults per preset,
the stacked output equal to the adapters merged by hand, speed adapters pinned for the replica's
life and checked when it starts."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.adapters import AdapterDoesNotFit
from deployments.errors import InvalidParameter
from deployments.lora import TINY_VERSIONS, ensure_tiny_loras, ensure_tiny_speed_adapter
from deployments.real import RealModel
from deployments.real_config import RealModelConfig, RealParams
from deployments.records import Prepared, PreparedImage
from tests.stacking import merged_output

FAST = {"fast": {"file": "tiny", "steps": 4, "cfg": 1.0}}


def config(**changes) -> RealModelConfig:
    return RealModelConfig(**{"source": "tiny", "condition_area": 4096, "num_threads": 1, "lora_dir": "tiny",
                              "max_adapters_per_replica": 3, "speed_adapters": FAST, **changes})


@pytest.fixture(scope="module")
def model(model_cache) -> RealModel:
    real = RealModel(config(), model_cache)
    real.load()
    return real


def prepared(size=(48, 32), seed=0) -> Prepared:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Prepared(array, PreparedImage(size, size, size, 1.0, "PNG", "RGB"))


@pytest.mark.parametrize("changes, words", [
    ({"speed_adapters": {"full": {"file": "tiny"}}}, "'full' is reserved"),
    ({"speed_adapters": {"../x": {"file": "tiny"}}}, "not a version name"),
    ({"speed_adapters": {"fast": {"file": "tiny", "steps": 500}}}, "speed_adapters.fast: steps (500)"),
    ({"speed_adapters": {"fast": {"file": "tiny", "weight": 3}}}, "weight must be between 0.0 and 2.0"),
    ({"default_preset": "turbo"}, "default_preset must be one of ['full', 'fast'], got 'turbo'"),
])
def test_bad_presets_are_refused_naming_the_field(changes: dict, words: str) -> None:
    with pytest.raises(ValidationError, match=__import__("re").escape(words)):
        config(**changes)


def test_a_preset_sets_the_defaults_of_steps_and_cfg_and_a_request_may_override_them() -> None:
    section = config()
    full = section.resolve(RealParams(seed=1))
    assert (full.preset, full.steps, full.cfg, full.lora_scale) == ("full", 30, 7.0, 1.0)
    fast = section.resolve(RealParams(seed=1, preset="fast"))
    assert (fast.preset, fast.steps, fast.cfg) == ("fast", 4, 1.0)
    assert section.resolve(RealParams(preset="fast", steps=6, cfg=2.0)).steps == 6
    assert config(default_preset="fast").resolve(RealParams()).steps == 4
    with pytest.raises(InvalidParameter, match="unknown preset 'turbo'; available: full, fast") as error:
        section.resolve(RealParams(preset="turbo"))
    assert error.value.field == "preset"
    for scale in (-0.1, 2.5, float("nan")):
        with pytest.raises(InvalidParameter) as error:
            section.resolve(RealParams(lora_scale=scale))
        assert error.value.field == "lora_scale"


def test_the_stacked_output_equals_the_adapters_merged_by_hand(model: RealModel, model_cache) -> None:
    image = prepared((48, 32), seed=4)
    params = RealParams(preset="fast", lora=TINY_VERSIONS[0], lora_scale=0.5, seed=3)
    served = model.generate(image, params)
    assert served.params["adapters"] == f"fast:1,{TINY_VERSIONS[0]}:0.5" and served.params["preset"] == "fast"
    version = ensure_tiny_loras(model_cache) / f"{TINY_VERSIONS[0]}.safetensors"
    speed = ensure_tiny_speed_adapter(model_cache)
    expected = merged_output(model_cache, [(speed, 1.0), (version, 0.5)], image.array, steps=4, cfg=1.0, seed=3)
    assert np.abs(served.array.astype(int) - expected).max() <= 1
    # the comparison can tell stacks apart: the version at full weight, or the speed adapter alone, differ
    for other in ([(speed, 1.0), (version, 1.0)], [(speed, 1.0)]):
        wrong = merged_output(model_cache, other, image.array, steps=4, cfg=1.0, seed=3)
        assert np.abs(served.array.astype(int) - wrong).mean() > 1.0


def test_versions_switch_under_the_pinned_speed_adapter_without_reloading_it(model: RealModel) -> None:
    image = prepared()
    before = model.stats()
    for version in [*TINY_VERSIONS, TINY_VERSIONS[0]]:
        result = model.generate(image, RealParams(preset="fast", lora=version, steps=2, seed=1))
        assert result.params["adapters"] == f"fast:1,{version}:1"
    stats = model.stats()
    assert stats["loads"] == before["loads"] == 1  # the base was never reloaded
    assert stats["speed_adapters"] == {"fast": 1}  # read once, when the replica started
    assert all(stats["adapter_loads"][version] == 1 for version in TINY_VERSIONS)
    full = model.generate(image, RealParams(preset="full", lora="none", steps=2, seed=1))
    assert full.params["adapters"] == "none"


def test_a_speed_adapter_that_does_not_fit_stops_the_replica_naming_the_file(model_cache, tmp_path) -> None:
    from safetensors.numpy import save_file

    bad = tmp_path / "lightning.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((4, 99), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((48, 4), np.float32)}, str(bad))
    real = RealModel(config(speed_adapters={"fast": {"file": str(bad), "steps": 4}}), model_cache)
    with pytest.raises(AdapterDoesNotFit, match=r"speed adapter 'fast' \(.*lightning.safetensors\) does not fit"):
        real.load()


# -- the card's settings: float8 compute, attention kernels, the locked knobs -------------------------
def test_float8_compute_is_planned_without_upcast_copies_and_needs_fp8_storage() -> None:
    from deployments import placement

    storage = config(placement={"gpus": 2, "gpu_memory_gb": 24}, serve={"ray_actor_options": {}}).plan()
    compute = config(placement={"gpus": 2, "gpu_memory_gb": 24, "compute": "fp8"},
                     serve={"ray_actor_options": {}}).plan()
    assert (storage.transformer.dtype, storage.transformer.compute) == ("float8_e4m3fn", "bf16")
    assert (compute.transformer.dtype, compute.transformer.compute) == ("float8_e4m3fn", "fp8")
    assert "float8 compute" in compute.strategy and compute.transformer.streamed_blocks == 0
    assert compute.peak_gb[0] < storage.peak_gb[0]  # no bf16 copy of the layer that runs
    assert storage.vae.dtype == "float32"  # real's locked VAE, planned
    with pytest.raises(ValidationError, match="compute: fp8 stores the transformer in fp8: it needs allow_fp8"):
        placement.PlacementConfig(compute="fp8", allow_fp8=False)


def test_float8_compute_is_refused_where_there_is_no_card_that_has_it(model_cache) -> None:
    real = RealModel(config(placement={"gpus": 1, "gpu_memory_gb": 24, "compute": "fp8"},
                            serve={"ray_actor_options": {}}), model_cache)
    with pytest.raises(ValueError, match=r"real\.placement\.compute is fp8, but it needs a CUDA GPU of compute "
                                         r"capability >= 8\.9 \(RTX 4090, H100/H200\); this replica has none"):
        real.load()


def test_attention_backend_auto_is_native_without_cuda_and_a_named_kernel_is_refused(model: RealModel,
                                                                                      model_cache) -> None:
    assert model.stats()["attention"] == "native"
    with pytest.raises(ValueError, match=r"real\.attention_backend is 'flash', but it runs on CUDA only"):
        RealModel(config(attention_backend="flash"), model_cache).load()
    with pytest.raises(ValidationError, match="attention_backend"):
        config(attention_backend="magic")


def test_the_locked_knobs_are_shown_in_stats(model: RealModel) -> None:
    assert model.stats()["locked"] == {"vae_dtype": "float32", "scheduler": "FlowMatchEulerDiscreteScheduler",
                                       "batch_size": 1}
    with pytest.raises(ValidationError, match="vae_dtype"):
        config(vae_dtype="model")  # locked for real


def test_compile_swaps_versions_into_one_adapter_sized_for_its_rank(model_cache) -> None:
    with pytest.raises(ValidationError, match="max_adapters_per_replica must be 1, got 3"):
        config(compile=True)
    # the swapping without the compilation (bench/compile.py compiles: too slow for the suite)
    from deployments.adapters import VERSION_SLOT, Adapters

    real = RealModel(config(max_adapters_per_replica=1, speed_adapters={}), model_cache)
    real.load()
    real.pipe.enable_lora_hotswap(target_rank=4)
    real.adapters = Adapters(real.pipe, real.store, 1, hotswap_rank=4)
    outputs = [real.generate(prepared(), RealParams(lora=version, steps=2, seed=1)).array for version in TINY_VERSIONS]
    assert real.pipe.get_list_adapters()["transformer"] == [VERSION_SLOT]  # one adapter, swapped in place
    assert real.stats()["adapters"] == [TINY_VERSIONS[-1]] and real.stats()["adapter_loads"] == dict.fromkeys(TINY_VERSIONS, 1)
    plain = RealModel(config(max_adapters_per_replica=1, speed_adapters={}), model_cache)
    plain.load()
    for version, output in zip(TINY_VERSIONS, outputs):  # each version's own result, as without swapping
        assert np.array_equal(output, plain.generate(prepared(), RealParams(lora=version, steps=2, seed=1)).array)
    narrow = Adapters(real.pipe, real.store, 1, hotswap_rank=2)
    with pytest.raises(InvalidParameter, match="rank 4 is above the compiled replica's real.compile_max_rank"):
        narrow.ensure_version(TINY_VERSIONS[0])
