"""Applying a plan to a loaded pipeline: the only part of the package that touches torch modules.

Contract: `apply_formats(pipe, plan)` gives the components the plan's number formats (bf16,
fp8 storage computed in bf16 by layerwise casting, the VAE in its dtype) without moving anything:
what a CPU replica runs to compute as a card would. `place_pipeline(pipe, plan, devices)` applies
them, then streams (group offload), splits (accelerate `dispatch_model`), moves and hooks the
components of a Qwen-Image pipeline loaded on CPU, in place, exactly as `plan` says, and checks
that the pipeline executes where its VAE is. With a stage plan (`plan.text_encoder.offload ==
"stage"`) the pipeline has no text encoder module (None, or a stand-in that is not a torch module)
and both skip it. For the TextEncoder stage, `apply_encoder_format(module, plan)` gives the text
encoder an `EncoderPlan`'s format in place and `place_text_encoder(module, plan, device)` also moves
it where the plan runs it. It never plans or second-guesses the plan; torch, accelerate and
diffusers are imported inside the functions, never at module import.
"""

from __future__ import annotations

from typing import Any

from deployments.placement.config import FP8
from deployments.placement.encoder import EncoderPlan
from deployments.placement.search import Plan


def _scaled_counts(counts: tuple[int, ...], actual: int) -> list[int]:
    """The plan's per-GPU block counts (for the published model) scaled to a model with `actual`
    blocks (a tiny test model), keeping the sum and giving every GPU at least one when possible."""
    total = sum(counts)
    scaled = [max(1, round(c * actual / total)) if c else 0 for c in counts]
    while sum(scaled) > actual:
        scaled[scaled.index(max(scaled))] -= 1
    while sum(scaled) < actual:
        scaled[scaled.index(max(scaled))] += 1
    return scaled


def _align(module, device) -> None:
    """Run `module` on `device`: inputs moved there, outputs moved back to where the inputs were."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(module, AlignDevicesHook(execution_device=device, io_same_device=True))


def _cast_fp8(module, apply) -> None:
    """fp8 storage, bf16 compute for `module` (`apply` installs diffusers' layerwise casting), then
    give every cast layer a `compute_dtype` attribute: PEFT creates a LoRA adapter in the dtype of
    its base layer, which would be fp8 here (and nothing upcasts adapters, so the LoRA matmul fails
    or loses precision); PEFT reads `compute_dtype` first when a layer has one (as for bnb)."""
    import torch

    apply()
    for layer in module.modules():
        registry = getattr(layer, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            layer.compute_dtype = torch.bfloat16


def fp8_compute_problem(device: str) -> str | None:
    """Why float8 compute cannot run on `device` (no CUDA, a card below compute capability 8.9,
    torchao missing), or None when it can."""
    import importlib.util

    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return "it needs a CUDA GPU of compute capability >= 8.9 (RTX 4090, H100/H200); this replica has none"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        name = torch.cuda.get_device_name()
        return f"it needs compute capability >= 8.9 (RTX 4090, H100/H200); this replica's {name} has {capability[0]}.{capability[1]}"
    if importlib.util.find_spec("torchao") is None:
        return "it needs torchao (pip install -e '.[gpu]')"
    return None


def _quantize_float8(transformer) -> None:
    """Every Linear of the transformer computes in float8: torchao's dynamic activation + weight
    scheme with one scale per row (scaled fp8, not a plain down-cast, which shows grid artifacts
    when a bf16-trained speed LoRA runs on top). LoRA layers, added later, stay bf16."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and "lora_" not in name)


def _text_encoder(pipe, plan: Plan):
    """The pipeline's text encoder module, or None with a stage plan; raises ValueError when the
    pipeline and the plan disagree about where the text encoder is."""
    import torch

    te = getattr(pipe, "text_encoder", None)
    loaded = isinstance(te, torch.nn.Module)
    if plan.text_encoder.offload == "stage":
        if loaded:
            raise ValueError("the plan puts the text encoder in the TextEncoder stage, but the pipeline has one "
                             "loaded: load it without (text_encoder=None)")
        return None
    if not loaded:
        raise ValueError(f"the plan places the text encoder ({plan.text_encoder.offload}), but the pipeline has none")
    return te


def _encoder_format(te, dtype: str) -> None:
    """bf16 weights, then fp8 storage (bf16 compute) when `dtype` says fp8: the inline encoder and
    the stage's get the same casting."""
    import torch
    from diffusers.hooks import apply_layerwise_casting

    te.to(torch.bfloat16)  # the plans' sizes are bf16 weights (a no-op when loaded in bf16)
    if dtype == FP8:
        _cast_fp8(te, lambda: apply_layerwise_casting(te, torch.float8_e4m3fn, torch.bfloat16,
                                                      skip_modules_pattern="auto"))


def apply_formats(pipe, plan: Plan) -> None:
    """The plan's number formats on every component, in place, on whatever device it is (the text
    encoder skipped when the plan puts it in the TextEncoder stage)."""
    import torch

    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    te, t = _text_encoder(pipe, plan), pipe.transformer
    if te is not None:
        _encoder_format(te, plan.text_encoder.dtype)
    t.to(bf16)
    if plan.transformer.compute == "fp8":
        _quantize_float8(t)
    elif plan.transformer.dtype == FP8:
        _cast_fp8(t, lambda: t.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=bf16))
    if pipe.vae.dtype != getattr(torch, plan.vae.dtype):
        pipe.vae.to(dtype=getattr(torch, plan.vae.dtype))


def place_pipeline(pipe, plan: Plan, devices: list[str] | None = None) -> None:
    """Apply `plan` to `pipe`, a Qwen-Image pipeline loaded on CPU in bf16, in place.

    `devices` maps the plan's GPU indices to torch devices (default `cuda:0`, `cuda:1`, ...); tests
    map them all to `cpu` so the wiring runs without a GPU. fp8 is diffusers' layerwise casting
    (fp8 storage, bf16 compute), group offload is diffusers' group offloading (onload to the GPU,
    offload to CPU), whole components are moved and wrapped in an accelerate AlignDevicesHook so
    tensors cross devices, a split transformer is dispatched with accelerate's `dispatch_model`.
    The VAE shares the last GPU with the text encoder, and the pipeline's execution device (where
    latents and the VAE's inputs live) must be the VAE's: checked at the end.
    """
    import torch
    from accelerate import dispatch_model
    from diffusers.hooks import apply_group_offloading

    devices = devices or [f"cuda:{i}" for i in range(plan.gpus_used)]
    if len(devices) < plan.gpus_used:
        raise ValueError(f"the plan uses {plan.gpus_used} GPUs, got devices {devices}")
    device = [torch.device(d) for d in devices]
    apply_formats(pipe, plan)

    # text encoder (first: group offloading refuses modules that already carry accelerate hooks)
    te_plan, te = plan.text_encoder, _text_encoder(pipe, plan)
    if te is None:
        pass  # in the TextEncoder stage
    elif te_plan.offload == "group":
        # leaf level: diffusers' block level only groups ModuleLists that are direct children, and
        # Qwen2.5-VL keeps its layers at model.language_model.layers and calls its embedding from
        # outside language_model.forward; every leaf is onloaded by its own forward instead.
        apply_group_offloading(te, onload_device=device[te_plan.gpus[0]], offload_device=torch.device("cpu"),
                               offload_type="leaf_level")
    elif te_plan.offload == "cpu":
        te.to("cpu")
        _align(te, torch.device("cpu"))
    else:
        te.to(device[te_plan.gpus[0]])
        _align(te, device[te_plan.gpus[0]])

    # VAE
    vae_device = device[plan.vae.gpus[0]]
    pipe.vae.to(vae_device)
    _align(pipe.vae, vae_device)
    if plan.vae_tiling:
        pipe.vae.enable_tiling()
    if plan.vae_slicing:
        pipe.vae.enable_slicing()

    # transformer
    t_plan, t = plan.transformer, pipe.transformer
    blocks_name = "transformer_blocks"
    blocks = getattr(t, blocks_name)
    if len(t_plan.gpus) > 1:
        # model-level device map at block boundaries (blocks are t._no_split_modules): the plan
        # already knows the split, so it is written out rather than re-derived by
        # accelerate.infer_auto_device_map, whose greedy fill sends the tail layers to "disk" when
        # the allowance is tight.
        if type(blocks[0]).__name__ not in (t._no_split_modules or []):
            raise ValueError(f"{type(t).__name__} cannot be split at {blocks_name}")
        counts = _scaled_counts(t_plan.blocks, len(blocks))
        owners = [gpu for gpu, count in zip(t_plan.gpus, counts) for _ in range(count)]
        names = [name for name, _ in t.named_children()]
        split = names.index(blocks_name)
        device_map: dict[str, Any] = {}
        for name in names[:split]:
            device_map[name] = devices[t_plan.gpus[0]]
        for index, gpu in enumerate(owners):
            device_map[f"{blocks_name}.{index}"] = devices[gpu]
        for name in names[split + 1:]:
            device_map[name] = devices[owners[-1]]
        dispatch_model(t, device_map=device_map, main_device=devices[t_plan.gpus[0]], force_hooks=True)
    elif t_plan.streamed_blocks:
        home = device[t_plan.gpus[-1]]
        planned = sum(t_plan.blocks) + t_plan.streamed_blocks  # the published model's block count
        streamed = min(len(blocks), max(1, round(t_plan.streamed_blocks * len(blocks) / planned)))
        first_streamed = len(blocks) - streamed
        for name, child in t.named_children():
            if name != blocks_name:
                child.to(home)
        for index, block in enumerate(blocks):
            if index < first_streamed:
                block.to(home)
            else:
                # each streamed block is its own group: onloaded before it runs, offloaded after
                apply_group_offloading(block, onload_device=home, offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1)
        _align(t, home)
    else:
        t.to(device[t_plan.gpus[0]])
        _align(t, device[t_plan.gpus[0]])

    # Mark the pipeline device-mapped, as diffusers' own `device_map=` loading does: `pipe.to()`
    # and the CPU-offload switches then refuse to undo the placement, and `load_lora_weights`
    # stops reading our AlignDevicesHooks as sequential CPU offload (it would strip them and
    # call enable_sequential_cpu_offload after loading the adapter).
    pipe.hf_device_map = {
        "transformer": ",".join(devices[g] for g in t_plan.gpus),
        "vae": devices[plan.vae.gpus[0]],
    }
    if te is not None:
        pipe.hf_device_map["text_encoder"] = devices[te_plan.gpus[0]] if te_plan.gpus else "cpu"
    execution = torch.device(pipe._execution_device)
    if execution != vae_device and not (execution.type == vae_device.type == "cpu"):
        raise RuntimeError(f"pipeline executes on {execution}, but its VAE is on {vae_device}")


def apply_encoder_format(module, plan: EncoderPlan) -> None:
    """The TextEncoder stage's format on its text encoder `module`, in place, without moving it:
    bf16, or fp8 storage computed in bf16 (the same layerwise casting as an inline fp8 encoder).
    What a stage replica without CUDA (fake GPU resources) runs to compute as its card would."""
    _encoder_format(module, plan.dtype)


def place_text_encoder(module, plan: EncoderPlan, device: str | None = None) -> None:
    """Apply `plan` to the TextEncoder stage's text encoder `module` (loaded on CPU), in place: its
    format, then onto `device` (default: `cuda` for a card plan, `cpu` for a CPU plan; tests pass
    `cpu`), hooked so inputs move there and outputs come back to where the inputs were."""
    import torch

    apply_encoder_format(module, plan)
    target = torch.device(device or ("cuda" if plan.device == "cuda" else "cpu"))
    module.to(target)
    _align(module, target)
