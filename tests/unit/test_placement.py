"""Memory placement planner: published sizes from stored configs, plans for the usual GPU budgets,
impossible budgets, Ray options, config validation, the `imgserve plan` command, and a plan applied
to the tiny pipelines (every GPU mapped to the CPU) still generating images."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deployments import checkpoints, placement, tiny  # noqa: E402
from deployments.placement import DoesNotFit, PlacementConfig, parse_gpus, plan, ray_options  # noqa: E402

FP8, BF16 = "float8_e4m3fn", "bfloat16"


def _plan(task: str, gpus: int, memory: float = 24.0, **options) -> placement.Plan:
    return plan(task, PlacementConfig(gpus=gpus, gpu_memory_gb=memory, **options))


def _assert_fits(result: placement.Plan) -> None:
    assert len(result.peak_gb) == result.gpus_used <= result.gpus
    for peak in result.peak_gb:
        assert 0 < peak <= result.gpu_memory_gb - result.margin_gb + 1e-9


# ---------------------------------------------------------------------------------------------
# sizes from the stored published configs (meta device)


@pytest.mark.parametrize("model", ["qwen-image-edit-2511", "qwen-image-layered"])
def test_stored_configs_give_the_published_sizes(model) -> None:
    sizes = placement.component_sizes(model)
    transformer, text_encoder, vae = sizes["transformer"], sizes["text_encoder"], sizes["vae"]
    assert transformer.params == pytest.approx(20_430_401_088, rel=0.005)
    assert transformer.bytes_bf16 / placement.GB == pytest.approx(40.86, abs=0.05)  # the 9 bf16 shards
    assert transformer.bytes_fp8 / placement.GB == pytest.approx(20.45, abs=0.1)  # norms/embeddings stay bf16
    assert transformer.blocks == 60
    assert text_encoder.params == pytest.approx(8.29e9, rel=0.01)
    assert text_encoder.bytes_bf16 / placement.GB == pytest.approx(16.6, abs=0.1)
    assert text_encoder.largest_layer_bytes / placement.GB == pytest.approx(152064 * 3584 * 2 / 1e9)  # embedding
    assert vae.params == pytest.approx(0.127e9, rel=0.01)
    assert vae.bytes_bf16 / placement.GB == pytest.approx(0.25, abs=0.01)


def test_layered_configs_differ_where_the_models_do() -> None:
    edit, layered = placement.component_sizes("qwen-image-edit-2511"), placement.component_sizes("qwen-image-layered")
    assert edit["transformer"].dim("zero_cond_t") == 1 and layered["transformer"].dim("zero_cond_t") == 0
    assert layered["vae"].dim("input_channels") == 4 and edit["vae"].dim("input_channels") == 3
    assert layered["transformer"].params == edit["transformer"].params + 2 * 3072  # the additional t-cond embedding


def test_a_local_diffusers_directory_is_sized_exactly(model_cache) -> None:
    directory = tiny.ensure_tiny("edit", model_cache)
    sizes = placement.component_sizes(directory)
    pipe = checkpoints.load_pipeline("edit", directory)
    for name in placement.COMPONENTS:
        assert sizes[name].params == sum(p.numel() for p in getattr(pipe, name).parameters()), name
    assert sizes["transformer"].blocks == 2
    # the fp8 sizes follow the layers diffusers' layerwise casting actually casts
    from diffusers.hooks import apply_layerwise_casting

    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    apply_layerwise_casting(pipe.text_encoder, torch.float8_e4m3fn, torch.bfloat16, skip_modules_pattern="auto")
    for name in ("transformer", "text_encoder"):
        cast = sum(p.numel() * (1 if p.dtype == torch.float8_e4m3fn else 2) for p in getattr(pipe, name).parameters())
        buffers = sum(b.numel() * 2 for b in getattr(pipe, name).buffers() if b.is_floating_point())
        assert sizes[name].bytes_fp8 == cast + buffers, name
    # a tiny model fits a tiny card: sizes passed in are what the plan uses
    result = plan("real", PlacementConfig(gpu_memory_gb=2.0, resolution=256), sizes)
    assert result.transformer.dtype == BF16 and result.gpus_used == 1


def test_unknown_model_names_what_it_expected(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="qwen-image-edit-2511"):
        placement.component_sizes(tmp_path)


# ---------------------------------------------------------------------------------------------
# plans for the usual budgets


@pytest.mark.parametrize("task", ["real", "layers"])
@pytest.mark.parametrize("gpus,memory", [(1, 24), (2, 24), (4, 24), (1, 80)])
def test_every_gpu_peak_stays_below_budget_minus_margin(task, gpus, memory) -> None:
    result = _plan(task, gpus, memory)
    _assert_fits(result)
    if (gpus, memory) == (1, 24):
        assert result.margin_gb == 1.5 and max(result.peak_gb) <= 22.5
    if memory == 80:
        assert result.margin_gb == 5.0


def test_real_on_one_24gb_card_is_fp8_with_the_text_encoder_streamed_and_vae_tiling() -> None:
    result = _plan("real", 1)
    assert result.gpus_used == 1
    assert result.transformer.dtype == FP8 and result.transformer.gpus == (0,)
    assert result.transformer.offload == "none" and result.transformer.streamed_blocks == 0
    assert result.text_encoder.offload == "group" and result.text_encoder.dtype == BF16
    assert result.text_encoder.gpus == (0,) and result.text_encoder.weights_gb == (0.0,)
    assert result.text_encoder.cpu_weights_gb == pytest.approx(16.58, abs=0.05)
    assert result.vae.gpus == (0,) and result.vae_tiling


def test_real_on_two_24gb_cards_needs_no_offload() -> None:
    result = _plan("real", 2)
    assert result.gpus_used == 2
    assert (result.transformer.dtype, result.transformer.gpus, result.transformer.offload) == (FP8, (0,), "none")
    assert (result.text_encoder.dtype, result.text_encoder.gpus, result.text_encoder.offload) == (BF16, (1,), "none")
    assert result.vae.gpus == (1,) and not result.vae_tiling


def test_real_on_four_24gb_cards_stays_bf16_with_the_transformer_split() -> None:
    result = _plan("real", 4)
    assert result.gpus_used in (3, 4)
    assert {part.dtype for part in result.components.values()} == {BF16}
    assert {part.offload for part in result.components.values()} == {"none"}
    assert len(result.transformer.gpus) >= 2 and sum(result.transformer.blocks) == 60
    assert result.text_encoder.gpus[0] not in result.transformer.gpus
    assert sum(result.transformer.weights_gb) == pytest.approx(40.86, abs=0.05)


@pytest.mark.parametrize("task", ["real", "layers"])
def test_one_80gb_card_holds_everything_in_bf16_untiled(task) -> None:
    result = _plan(task, 1, 80)
    assert result.gpus_used == 1 and not result.vae_tiling
    for part in result.components.values():
        assert part.gpus == (0,) and part.dtype == BF16 and part.offload == "none"


def test_layers_on_one_24gb_card_streams_a_few_transformer_blocks() -> None:
    # 8 layers at 1024 px are ~41k tokens: 3.8 GB of activations next to a 20.4 GB fp8 transformer
    result = _plan("layers", 1)
    assert result.gpus_used == 1 and result.transformer.dtype == FP8
    assert 0 < result.transformer.streamed_blocks <= 60 * placement.MAX_STREAMED_FRACTION
    assert result.transformer.offload == "group" and result.text_encoder.offload == "group"
    assert result.vae_slicing  # layers decode one frame at a time
    # fewer layers need fewer streamed blocks
    assert _plan("layers", 1, layers=4).transformer.streamed_blocks < result.transformer.streamed_blocks


@pytest.mark.parametrize("gpus,expect_dtype", [(2, FP8), (4, BF16)])
def test_layers_on_several_cards_needs_no_offload(gpus, expect_dtype) -> None:
    result = _plan("layers", gpus)
    assert {part.offload for part in result.components.values()} == {"none"}
    assert result.transformer.dtype == expect_dtype


def test_bigger_requests_need_more_memory_and_tiling_above_a_megapixel() -> None:
    assert _plan("layers", 1, 80, resolution=1024).peak_gb[0] > _plan("layers", 1, 80, resolution=640).peak_gb[0]
    assert _plan("real", 1, 80, resolution=2048).vae_tiling  # above 1 MP it tiles even on an 80 GB card
    assert not _plan("real", 1, 80, resolution=1024).vae_tiling
    assert _plan("layers", 1, 80, layers=10).peak_gb[0] > _plan("layers", 1, 80, layers=2).peak_gb[0]


def test_the_fewest_gpus_are_used() -> None:
    assert _plan("real", 8, 80).gpus_used == 1
    assert _plan("real", 8).gpus_used == 3  # bf16 is preferred over fp8 when the cards are there
    assert _plan("real", 8, allow_fp8=False).gpus_used == 3


# ---------------------------------------------------------------------------------------------
# impossible budgets


@pytest.mark.parametrize(
    "task,gpus,memory,options,expect",
    [
        ("real", 1, 12, {"allow_offload": False}, "4x12 GB as configured"),
        ("real", 1, 8, {}, "x8 GB as configured"),
        ("layers", 1, 8, {}, "1x48 GB as configured"),  # 8 GB cards cannot hold its activations next to blocks
        ("real", 1, 24, {"allow_fp8": False, "allow_offload": False}, "3x24 GB as configured"),
    ],
)
def test_impossible_budgets_name_why_and_a_smallest_config_that_fits(task, gpus, memory, options, expect) -> None:
    with pytest.raises(DoesNotFit) as error:
        _plan(task, gpus, memory, **options)
    message = str(error.value)
    assert f"does not fit {gpus}x{memory} GB" in message and "transformer" in message
    assert expect in message
    smallest = error.value.smallest
    assert smallest is not None and (smallest.gpus, smallest.gpu_memory_gb) != (gpus, memory)
    _assert_fits(plan(task, smallest))  # the suggestion is itself plannable


def test_does_not_fit_lists_what_relaxing_each_option_would_need() -> None:
    with pytest.raises(DoesNotFit) as error:
        _plan("real", 1, 24, allow_fp8=False, allow_offload=False)
    message = str(error.value)
    assert "2x24 GB with fp8" in message and "1x24 GB with fp8 and offload" in message
    assert error.value.smallest.allow_fp8 is False  # same options first: 3 cards of bf16


# ---------------------------------------------------------------------------------------------
# Ray options


def test_single_gpu_replica_asks_for_one_gpu_and_its_resource() -> None:
    config = PlacementConfig(gpus=1, gpu_resource="rtx4090")
    options = ray_options(plan("real", config), config, num_cpus=4)
    assert options == {"ray_actor_options": {"num_cpus": 4, "num_gpus": 1, "resources": {"rtx4090": 1}}}


def test_multi_gpu_replica_gets_one_strict_pack_bundle_with_all_its_gpus() -> None:
    config = PlacementConfig(gpus=4, gpu_resource="rtx4090")
    result = plan("real", config)
    options = ray_options(result, config, num_cpus=4)
    used = result.gpus_used
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": used, "resources": {"rtx4090": used}}
    assert options["placement_group_bundles"] == [{"CPU": 4, "GPU": used, "rtx4090": used}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    plain = ray_options(result, PlacementConfig(gpus=4), num_cpus=2)
    assert "resources" not in plain["ray_actor_options"]
    assert plain["placement_group_bundles"] == [{"CPU": 2, "GPU": used}]


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "field,value",
    [
        ("gpus", 0),
        ("gpu_memory_gb", 0),
        ("gpu_memory_gb", math.nan),
        ("resolution", 100),
        ("resolution", 8192),
        ("layers", 0),
        ("margin_gb", -1.0),
        ("margin_gb", 30.0),
        ("gpu_resource", " "),
    ],
)
def test_bad_config_values_name_the_field_and_value(field, value) -> None:
    with pytest.raises(ValidationError) as error:
        PlacementConfig(**{field: value})
    assert field in str(error.value) and str(value).strip() in str(error.value)


def test_unknown_config_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="num_gpus"):
        PlacementConfig(num_gpus=2)


def test_parse_gpus() -> None:
    assert parse_gpus("2x24") == (2, 24.0)
    assert parse_gpus("1x80") == (1, 80.0)
    assert parse_gpus("4X22.5") == (4, 22.5)
    for bad in ("", "24", "0x24", "2x0", "x24", "2x24x2", "two x 24"):
        with pytest.raises(ValueError, match="COUNTxGB") as error:
            parse_gpus(bad)
        assert repr(bad) in str(error.value)


def test_plan_output_is_json_and_a_readable_table() -> None:
    result = _plan("real", 2)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["gpus_used"] == 2 and data["transformer"]["dtype"] == FP8 and data["text_encoder"]["gpus"] == [1]
    assert data["peak_gb"] == list(result.peak_gb) and data["usable_gb"] == 22.5
    table = result.describe()
    for text in ("transformer", "text_encoder", "vae", "GPU 0", "GPU 1", "float8_e4m3fn", "24.0", "1.50", "peak phase"):
        assert text in table


# ---------------------------------------------------------------------------------------------
# the command


def test_cli_plan_prints_the_table(capsys) -> None:
    from serve_app.cli import main

    assert main(["plan", "--task", "real", "--gpus", "2x24", "--text-encoder", "inline"]) == 0
    out = capsys.readouterr().out
    assert "uses 2 GPUs" in out and "float8_e4m3fn" in out and "GPU 1" in out


def test_cli_plan_json_and_options(capsys) -> None:
    from serve_app.cli import main

    assert main(["plan", "--task", "layers", "--gpus", "1x80", "--resolution", "640", "--layers", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task"] == "layers" and data["resolution"] == 640 and data["layers"] == 4 and data["gpus_used"] == 1
    assert main(["plan", "--task", "real", "--gpus", "4x24", "--no-fp8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["transformer"]["dtype"] == BF16


def test_cli_plan_that_does_not_fit_exits_2_with_the_reason(capsys) -> None:
    from serve_app.cli import main

    assert main(["plan", "--task", "real", "--gpus", "1x24", "--no-fp8", "--no-offload", "--text-encoder", "inline"]) == 2
    err = capsys.readouterr().err
    assert "does not fit 1x24 GB" in err and "2x24 GB with fp8" in err
    assert main(["plan", "--task", "real", "--gpus", "two"]) == 1
    assert "COUNTxGB" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# applying plans to the tiny pipelines (all GPUs mapped to the CPU)


@pytest.fixture(scope="module")
def small_conditions():
    tiny.set_condition_areas(64 * 64, 64 * 64)
    yield
    tiny.set_condition_areas(tiny.DEFAULT_VAE_AREA, tiny.DEFAULT_TEXT_AREA)


def _edit_pipe(model_cache):
    pipe = checkpoints.load_pipeline("edit", tiny.ensure_tiny("edit", model_cache), torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe) -> np.ndarray:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    return pipe(image=[image], prompt="make it photoreal", negative_prompt=" ", true_cfg_scale=4.0,
                num_inference_steps=2, height=48, width=80, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_two_gpu_fp8_plan_applied_on_cpu_generates_and_stores_fp8(model_cache, small_conditions) -> None:
    from deployments.lora import ensure_tiny_loras

    pipe = _edit_pipe(model_cache)
    result = _plan("real", 2)
    placement.place_pipeline(pipe, result, ["cpu", "cpu"])
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert to_q.weight.dtype == torch.float8_e4m3fn
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    first = _generate(pipe)
    assert first.shape == (1, 48, 80, 3) and np.isfinite(first).all() and first.std() > 0
    with pytest.raises(ValueError):
        pipe.to("cpu")  # a placed pipeline refuses to be moved as a whole
    # a LoRA loaded after the fp8 cast stays bf16 (PEFT would copy the fp8 base dtype) and takes effect
    adapter = sorted(ensure_tiny_loras(model_cache).glob("*.safetensors"))[0]
    pipe.load_lora_weights(str(adapter), adapter_name="v")
    pipe.set_adapters(["v"])
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q  # now PEFT's wrapper around the base layer
    assert to_q.lora_A["v"].weight.dtype == torch.bfloat16 and to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert not np.allclose(_generate(pipe), first)


def test_one_gpu_plan_streams_the_text_encoder_and_tiles(model_cache, small_conditions) -> None:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    pipe = _edit_pipe(model_cache)
    placement.place_pipeline(pipe, _plan("real", 1), ["cpu"])
    assert _is_group_offload_enabled(pipe.text_encoder) and pipe.vae.use_tiling
    assert _generate(pipe).shape == (1, 48, 80, 3)


def test_split_transformer_plan_dispatches_blocks_over_devices(model_cache, small_conditions) -> None:
    pipe = _edit_pipe(model_cache)
    result = _plan("real", 4)
    placement.place_pipeline(pipe, result, ["cpu"] * result.gpus_used)
    device_map = pipe.transformer.hf_device_map
    assert device_map["transformer_blocks.0"] == device_map["transformer_blocks.1"] == "cpu"
    assert _generate(pipe).shape == (1, 48, 80, 3)
    with pytest.raises(ValueError, match="uses 3 GPUs"):
        placement.place_pipeline(_edit_pipe(model_cache), result, ["cpu"])


def test_layers_plan_with_streamed_blocks_generates_layers(model_cache) -> None:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    pipe = checkpoints.load_pipeline("layered", tiny.ensure_tiny("layered", model_cache), torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    result = _plan("layers", 1)
    placement.place_pipeline(pipe, result, ["cpu"])
    streamed = [_is_group_offload_enabled(block) for block in pipe.transformer.transformer_blocks]
    assert streamed == [False, True]  # the plan's streamed share, scaled to the tiny model's 2 blocks
    assert pipe.vae.use_slicing
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA")
    with tiny.small_layered_sizes():
        out = pipe(image=image, prompt="a cat", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2,
                   layers=3, resolution=640, generator=torch.Generator().manual_seed(0), output_type="np")
    layers = np.asarray(out.images[0])
    assert layers.shape[0] == 3 and layers.shape[-1] == 4 and np.isfinite(layers).all()
