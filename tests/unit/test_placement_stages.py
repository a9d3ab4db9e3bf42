"""The text encoder stage in the placement planner: transformer cards without the encoder, the
TextEncoder stage's own plan and Ray options, both applied to the tiny pipelines (every GPU mapped
to the CPU), the time model's split of a cluster, and `imgserve plan` showing the stages."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deployments import checkpoints, placement, tiny
from deployments.placement import (
    GB,
    DoesNotFit,
    PlacementConfig,
    encoder_ray_options,
    encoder_seconds,
    plan,
    plan_encoder,
    recommend_split,
    transformer_seconds,
)

FP8, BF16, FP32 = "float8_e4m3fn", "bfloat16", "float32"


def _stage(task: str, gpus: int = 1, memory: float = 24.0, **options) -> placement.Plan:
    return plan(task, PlacementConfig(gpus=gpus, gpu_memory_gb=memory, **options), text_encoder="stage")


def _inline(task: str, gpus: int = 1, memory: float = 24.0, **options) -> placement.Plan:
    return plan(task, PlacementConfig(gpus=gpus, gpu_memory_gb=memory, **options))


def _encoder_peaks(task: str = "real") -> dict[str, float]:
    """The encoder's predicted peak (GB) in bf16 (from the planner) and in fp8 storage (the same
    transient, fp8 weights, plus one layer's bf16 copy)."""
    bf16 = plan_encoder(task, PlacementConfig(gpu_memory_gb=80.0))
    te = placement.component_sizes(placement.TASK_MODELS[task])["text_encoder"]
    assert bf16.dtype == BF16  # 80 GB holds bf16: fp8 is only the fallback
    return {BF16: bf16.peak_gb, FP8: bf16.peak_gb - (te.bytes_bf16 - te.bytes_fp8 - te.largest_layer_bytes) / GB}


# ---------------------------------------------------------------------------------------------
# transformer cards without the encoder


@pytest.mark.parametrize("task,gpus,memory", [("real", 1, 24), ("real", 2, 24), ("real", 4, 24), ("real", 1, 80),
                                              ("layers", 1, 24), ("layers", 4, 24), ("layers", 1, 80)])
def test_stage_plans_put_nothing_of_the_encoder_on_the_cards_and_need_less(task, gpus, memory) -> None:
    stage, inline = _stage(task, gpus, memory), _inline(task, gpus, memory)
    te = stage.text_encoder
    assert (te.offload, te.gpus, te.weights_gb, te.cpu_weights_gb) == ("stage", (), (), 0.0)
    assert not {"encode_prompt", "caption"} & set(stage.peak_phase)
    assert "text encoder in the TextEncoder stage" in stage.strategy and "TextEncoder stage" in stage.describe()
    assert stage.text_encoder_mode == "stage" and inline.text_encoder_mode == "inline"
    for peak in stage.peak_gb:
        assert 0 < peak <= stage.usable_gb + 1e-9
    # the pipeline executes on the transformer's first card: the VAE must be there
    assert stage.vae.gpus == stage.transformer.gpus[:1]
    # never worse: as good a transformer (bf16 before fp8, fewer streamed blocks) on no more cards ...
    def rank(result: placement.Plan) -> tuple[bool, int]:
        return result.transformer.dtype == FP8, result.transformer.streamed_blocks

    assert rank(stage) <= rank(inline) and stage.gpus_used <= inline.gpus_used
    if (rank(stage), stage.gpus_used) == (rank(inline), inline.gpus_used):
        # ... and the same transformer needs less memory without the encoder next to it
        assert sum(stage.peak_gb) <= sum(inline.peak_gb)
        if inline.text_encoder.offload == "none" or "encode_prompt" in inline.peak_phase:
            assert sum(stage.peak_gb) < sum(inline.peak_gb)


def test_a_replica_of_four_24gb_cards_needs_fewer_of_them_with_the_stage() -> None:
    inline, stage = _inline("real", 4), _stage("real", 4)
    assert inline.gpus_used == 3 and stage.gpus_used == 2  # 16.6 GB of encoder no longer needs its own card
    assert stage.transformer.dtype == BF16 and sum(stage.transformer.blocks) == 60


@pytest.mark.parametrize("compute", ["bf16", "fp8"])
@pytest.mark.parametrize("vae_dtype", [BF16, FP32])
def test_real_on_one_24gb_card_streams_nothing_with_the_stage(compute, vae_dtype) -> None:
    config = PlacementConfig(compute=compute)
    stage = plan("real", config, vae_dtype=vae_dtype, text_encoder="stage")
    inline = plan("real", config, vae_dtype=vae_dtype)
    # inline, 16.6 GB of encoder do not fit next to the transformer: streamed every prompt, or run on CPU
    assert inline.text_encoder.offload in ("group", "cpu")
    assert stage.gpus_used == 1 and stage.transformer.dtype == FP8 and stage.transformer.compute == compute
    assert stage.transformer.offload == "none" and stage.transformer.streamed_blocks == 0
    assert stage.transformer.cpu_weights_gb == 0 and stage.text_encoder.cpu_weights_gb == 0
    assert stage.peak_phase == ("denoise",) and stage.peak_gb[0] <= inline.peak_gb[0]
    if inline.text_encoder.offload == "group":  # its streamed layers no longer pass through the card
        assert stage.peak_gb[0] < inline.peak_gb[0]
    assert "streamed" not in stage.strategy and "fp8 transformer" in stage.strategy


def test_a_stage_plan_that_does_not_fit_names_a_smaller_fix_than_inline() -> None:
    options = {"allow_fp8": False, "allow_offload": False}
    with pytest.raises(DoesNotFit) as stage_error:
        _stage("real", 1, 24, **options)
    with pytest.raises(DoesNotFit) as inline_error:
        _inline("real", 1, 24, **options)
    assert "TextEncoder stage" in str(stage_error.value) and "does not fit 1x24 GB" in str(stage_error.value)
    smallest = stage_error.value.smallest
    assert smallest is not None and smallest.gpus < inline_error.value.smallest.gpus
    assert f"{smallest.gpus}x24 GB as configured" in str(stage_error.value)
    placed = plan("real", smallest, text_encoder="stage")  # the suggestion is itself plannable
    assert placed.text_encoder.offload == "stage" and placed.transformer.dtype == BF16
    with pytest.raises(ValueError, match="text_encoder"):
        plan("real", PlacementConfig(), text_encoder="elsewhere")


# ---------------------------------------------------------------------------------------------
# the encoder stage's plan


def test_encoder_on_a_24gb_card_is_bf16_with_its_largest_phase_as_the_peak() -> None:
    result = plan_encoder("real", PlacementConfig())
    sizes = placement.component_sizes(placement.TASK_MODELS["real"])
    transient = placement.phase_transients("real", PlacementConfig(), sizes, True)["encode_prompt"]
    assert (result.device, result.dtype, result.gpus) == ("cuda", BF16, 1)
    assert result.peak_gb == pytest.approx((sizes["text_encoder"].bytes_bf16 + transient) / GB, abs=1e-3)
    assert result.peak_phase == "encode_prompt (real)" and result.peak_gb <= result.usable_gb == 22.5
    assert "bf16 text encoder on its own GPU" in result.strategy and "22.5" not in result.describe().split("\n")[0]
    data = json.loads(json.dumps(result.to_dict()))
    assert data["device"] == "cuda" and data["tasks"] == ["real"] and "encode_prompt (real)" in data["transients_gb"]


def test_encoder_serving_both_tasks_holds_every_phase_and_grows_with_the_caption_image() -> None:
    both = plan_encoder(["real", "layers"], PlacementConfig())
    assert {name for name, _ in both.transients_gb} == {"encode_prompt (real)", "encode_prompt (layers)",
                                                        "caption (layers)"}
    assert both.peak_gb == pytest.approx(both.weights_gb + max(gb for _, gb in both.transients_gb), abs=2e-3)
    small = dict(plan_encoder("layers", PlacementConfig(), resolution=1024).transients_gb)
    large = dict(plan_encoder("layers", PlacementConfig(), resolution=2048).transients_gb)
    assert large["caption (layers)"] > small["caption (layers)"]


def test_encoder_on_a_card_too_small_for_bf16_stores_fp8() -> None:
    peaks = _encoder_peaks()
    usable = (peaks[BF16] + peaks[FP8]) / 2  # between the two peaks
    result = plan_encoder("real", PlacementConfig(gpu_memory_gb=usable + 1.5, margin_gb=1.5))
    assert (result.device, result.dtype, result.gpus) == ("cuda", FP8, 1)
    assert result.peak_gb == pytest.approx(peaks[FP8], abs=2e-3) and result.peak_gb <= result.usable_gb
    assert "fp8 text encoder" in result.strategy
    # without fp8 that card cannot hold it: the CPU
    cpu = plan_encoder("real", PlacementConfig(gpu_memory_gb=usable + 1.5, margin_gb=1.5, allow_fp8=False))
    assert (cpu.device, cpu.gpus, cpu.dtype) == ("cpu", 0, BF16)


def test_encoder_on_a_card_too_small_for_fp8_runs_on_cpu_or_does_not_fit() -> None:
    peaks = _encoder_peaks()
    memory = peaks[FP8] - 1.0 + 1.5  # 1 GB short of the fp8 peak after a 1.5 GB margin
    result = plan_encoder("real", PlacementConfig(gpu_memory_gb=memory, margin_gb=1.5))
    assert (result.device, result.gpus, result.gpu_memory_gb, result.usable_gb) == ("cpu", 0, None, None)
    assert "on CPU" in result.strategy and "host memory" in result.describe()
    with pytest.raises(DoesNotFit) as error:
        plan_encoder("real", PlacementConfig(gpu_memory_gb=memory, margin_gb=1.5, allow_offload=False))
    message = str(error.value)
    assert f"does not fit 1x{memory:g} GB" in message and f"peaks at {peaks[FP8]:.1f} GB" in message
    smallest = error.value.smallest
    assert smallest is not None and smallest.gpu_memory_gb > memory
    assert plan_encoder("real", smallest).device == "cuda"  # the suggestion fits a card


def test_encoder_without_a_config_runs_on_cpu_and_uses_exactly_one_card() -> None:
    result = plan_encoder("layers", None)
    assert (result.device, result.gpus, result.dtype) == ("cpu", 0, BF16)
    with pytest.raises(ValueError, match="text_encoder.placement.gpus"):
        plan_encoder("real", PlacementConfig(gpus=2))
    with pytest.raises(ValueError, match="tasks"):
        plan_encoder(["real", "paint"], None)


def test_encoder_ray_options_ask_for_one_gpu_or_none() -> None:
    config = PlacementConfig(gpu_resource="rtx4090")
    card = encoder_ray_options(plan_encoder("real", config), config, num_cpus=2)
    assert card == {"ray_actor_options": {"num_cpus": 2, "num_gpus": 1, "resources": {"rtx4090": 1}}}
    cpu = encoder_ray_options(plan_encoder("real", None), None, num_cpus=4)
    assert cpu == {"ray_actor_options": {"num_cpus": 4, "num_gpus": 0}}


# ---------------------------------------------------------------------------------------------
# applying stage plans to the tiny pipelines (all GPUs mapped to the CPU)


@pytest.fixture(scope="module")
def small_conditions():
    tiny.set_condition_areas(64 * 64, 64 * 64)
    yield
    tiny.set_condition_areas(tiny.DEFAULT_VAE_AREA, tiny.DEFAULT_TEXT_AREA)


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))


def _embeddings(text_pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    return text_pipe.encode_prompt(prompt=prompt, image=[_image()], device=torch.device("cpu"))


def test_stage_plan_on_a_pipeline_without_text_encoder_generates(model_cache, small_conditions) -> None:
    directory = tiny.ensure_tiny("edit", model_cache)
    text_pipe = checkpoints.load_text_pipeline("edit", directory, torch.bfloat16)
    positive, negative = _embeddings(text_pipe, "make it photoreal"), _embeddings(text_pipe, " ")
    pipe = checkpoints.load_pipeline("edit", directory, torch_dtype=torch.bfloat16, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    result = _stage("real", 1)
    placement.place_pipeline(pipe, result, ["cpu"])
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert "text_encoder" not in pipe.hf_device_map and pipe.vae.use_tiling
    out = pipe(image=[_image()], prompt_embeds=positive[0], prompt_embeds_mask=positive[1],
               negative_prompt_embeds=negative[0], negative_prompt_embeds_mask=negative[1], true_cfg_scale=4.0,
               num_inference_steps=2, height=48, width=80, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 48, 80, 3) and np.isfinite(out).all() and out.std() > 0


def test_pipeline_and_plan_must_agree_on_where_the_encoder_is(model_cache) -> None:
    directory = tiny.ensure_tiny("edit", model_cache)
    with_encoder = checkpoints.load_pipeline("edit", directory, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="TextEncoder stage"):
        placement.place_pipeline(with_encoder, _stage("real", 1), ["cpu"])
    without = checkpoints.load_pipeline("edit", directory, torch_dtype=torch.bfloat16, text_encoder=None)
    with pytest.raises(ValueError, match="has none"):
        placement.apply_formats(without, _inline("real", 1))


def test_fp8_text_encoder_stage_on_cpu_encodes_prompts(model_cache, small_conditions) -> None:
    directory = tiny.ensure_tiny("edit", model_cache)
    peaks = _encoder_peaks()
    fp8_plan = plan_encoder("real", PlacementConfig(gpu_memory_gb=(peaks[BF16] + peaks[FP8]) / 2 + 1.5, margin_gb=1.5))
    assert fp8_plan.dtype == FP8
    reference = _embeddings(checkpoints.load_text_pipeline("edit", directory, torch.bfloat16), "a cat")[0]
    text_pipe = checkpoints.load_text_pipeline("edit", directory, torch.bfloat16)
    placement.place_text_encoder(text_pipe.text_encoder, fp8_plan, device="cpu")
    stored = {p.dtype for p in text_pipe.text_encoder.parameters()}
    assert torch.float8_e4m3fn in stored and torch.bfloat16 in stored  # norms and embeddings stay bf16
    embeds = _embeddings(text_pipe, "a cat")[0]
    assert embeds.shape == reference.shape and torch.isfinite(embeds).all()
    assert not torch.equal(embeds, reference)  # fp8 storage is really in effect ...
    cosine = torch.nn.functional.cosine_similarity(embeds.float().flatten(), reference.float().flatten(), dim=0)
    assert cosine > 0.9  # ... and computes nearly the same embeddings
    bf16_plan = plan_encoder("real", PlacementConfig())
    module = checkpoints.load_text_pipeline("edit", directory, torch.float32).text_encoder
    placement.apply_encoder_format(module, bf16_plan)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# time model and the split


def _stage_times(task: str = "real", steps: int = 30, cfg: float = 7.0) -> tuple[float, float]:
    denoise = transformer_seconds(_stage(task, 1), steps, cfg).seconds
    encode = encoder_seconds(plan_encoder(task, PlacementConfig()), negative=cfg > 1).seconds
    return denoise, encode


def test_stage_times_follow_steps_guidance_format_and_streaming() -> None:
    result = _stage("real", 1)
    full = transformer_seconds(result, 30, 7.0).seconds
    assert full == pytest.approx(2 * transformer_seconds(result, 30, 1.0).seconds)  # CFG: two passes a step
    assert full == pytest.approx(2 * transformer_seconds(result, 15, 7.0).seconds)
    assert transformer_seconds(_stage("real", 1, compute="fp8"), 30, 7.0).seconds < full  # float8 compute
    card = encoder_seconds(plan_encoder("real", PlacementConfig())).seconds
    streamed = encoder_seconds(_inline("real", 1)).seconds  # inline on 1x24: streamed over PCIe
    cpu = encoder_seconds(plan_encoder("real", None)).seconds
    assert card < streamed and card < cpu and card < full / 100
    assert encoder_seconds(plan_encoder("layers", None), caption_tokens=512).seconds > encoder_seconds(
        plan_encoder("layers", None), caption_tokens=None).seconds  # the caption costs its own time


@pytest.mark.parametrize("task", ["real", "layers"])
def test_split_of_4_and_8_cards_keeps_one_encoder_busy_for_the_rest(task) -> None:
    denoise, encode = _stage_times(task, 30, 4.0)
    rates = []
    for cards in range(2, 17):
        split = recommend_split(cards, denoise, encode)
        assert split.encoder_replicas >= 1 and split.transformer_replicas >= split.encoder_replicas
        assert split.encoder_cards + split.transformer_cards + split.idle_cards == cards
        rates.append(split.requests_per_s)
    assert rates == sorted(rates) and rates[-1] > rates[0]  # more cards never serve fewer requests
    four, eight = recommend_split(4, denoise, encode), recommend_split(8, denoise, encode)
    assert (four.encoder_replicas, four.transformer_replicas) == (1, 3)
    assert (eight.encoder_replicas, eight.transformer_replicas) == (1, 7)
    assert four.feeds == pytest.approx(denoise / encode, rel=1e-3) and four.feeds > 7
    assert "split of 4 cards: 1 TextEncoder replica (1 card), 3 diffusion replicas" in four.describe()


def test_split_balances_stages_of_equal_cost_and_uses_cpu_encoders() -> None:
    even = recommend_split(8, 10.0, 10.0)
    assert (even.encoder_replicas, even.transformer_replicas) == (4, 4)
    two_card = recommend_split(7, 10.0, 1.0, transformer_gpus=2)
    assert (two_card.encoder_replicas, two_card.transformer_replicas, two_card.idle_cards) == (1, 3, 0)
    cpu = recommend_split(4, 100.0, 30.0, encoder_gpus=0)
    assert (cpu.encoder_cards, cpu.transformer_replicas, cpu.encoder_replicas) == (0, 4, 2)  # ceil(4·30/100)
    with pytest.raises(ValueError, match="at least 2"):
        recommend_split(1, 10.0, 1.0)


# ---------------------------------------------------------------------------------------------
# the command


def test_cli_plan_prints_both_stages_and_the_split(capsys) -> None:
    from serve_app.cli import main

    assert main(["plan", "--task", "real", "--gpus", "1x24", "--cards", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: real") and "text encoder in the TextEncoder stage" in out
    assert "text encoder stage: real, 1024 px on 1x24 GB" in out and "bf16 text encoder on its own GPU" in out
    assert "split of 4 cards: 1 TextEncoder replica (1 card), 3 diffusion replicas" in out
    assert "transformer:" in out and "s per request" in out and "uncalibrated" in out
    assert main(["plan", "--task", "real", "--gpus", "1x24"]) == 0  # without --cards: no split
    assert "split of" not in capsys.readouterr().out


def test_cli_plan_json_has_the_stages_and_the_split(capsys) -> None:
    from serve_app.cli import main

    assert main(["plan", "--task", "real", "--gpus", "1x24", "--cards", "8", "--steps", "8", "--cfg", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text_encoder"]["offload"] == "stage" and data["transformer"]["streamed_blocks"] == 0
    assert data["encoder_stage"]["device"] == "cuda" and data["encoder_stage"]["gpus"] == 1
    assert data["split"]["cards"] == 8 and data["split"]["encoder_replicas"] >= 1
    assert data["split"]["transformer_replicas"] + data["split"]["encoder_cards"] <= 8
    assert data["steps"] == 8 and data["stage_times"]["transformer"]["detail"].startswith("8 forwards")
    assert main(["plan", "--task", "layers", "--gpus", "1x24", "--encoder-gpus", "cpu", "--cards", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["encoder_stage"]["device"] == "cpu" and data["split"]["encoder_cards"] == 0
    assert data["split"]["transformer_replicas"] == 4


def test_cli_plan_inline_and_bad_encoder_cards(capsys) -> None:
    from serve_app.cli import main

    assert main(["plan", "--task", "real", "--gpus", "1x24", "--text-encoder", "inline", "--cards", "4"]) == 0
    out = capsys.readouterr().out
    assert "text encoder stage:" not in out and "streamed from CPU" in out and "inline: 4 replicas" in out
    assert main(["plan", "--task", "real", "--gpus", "1x24", "--encoder-gpus", "2x24"]) == 1
    assert "exactly one card" in capsys.readouterr().err
    assert main(["plan", "--task", "real", "--gpus", "1x24", "--encoder-gpus", "1x8", "--no-offload"]) == 2
    assert "text encoder stage for real" in capsys.readouterr().err


def test_cli_split_shows_the_cpu_encoder_trade_off(capsys) -> None:
    from serve_app.cli import main

    assert main(["plan", "--task", "real", "--gpus", "1x24", "--cards", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    card, cpu = data["split"], data["cpu_encoder"]
    assert card["encoder_cards"] == 1 and card["transformer_replicas"] == 3
    assert cpu["encoder_cards"] == 0 and cpu["transformer_replicas"] == 4  # every card denoises
    assert cpu["encoder_s"] > card["encoder_s"]  # at the price of slower encoding
    assert main(["plan", "--task", "real", "--gpus", "1x24", "--cards", "4"]) == 0
    assert "instead, with the encoder on CPUs: 4 diffusion replicas" in capsys.readouterr().out


def test_cli_split_with_the_encoder_on_cpu(capsys) -> None:
    from serve_app.cli import main

    assert main(["plan", "--task", "real", "--gpus", "1x24", "--encoder-gpus", "cpu", "--cards", "1"]) == 0
    out = capsys.readouterr().out
    assert "split of 1 card" in out and "instead, with the encoder on CPUs" not in out
