"""The planner: the best placement of a task's pipeline on the GPUs one replica owns.

Contract: `plan(task, config, sizes, vae_dtype, text_encoder)` tries the candidate recipes from best
to worst (the order is in the `deployments.placement` docstring) on 1..`config.gpus` GPUs and
returns the first `Plan` whose predicted peak fits every GPU (memory minus margin); otherwise it
raises `DoesNotFit`, naming why and the smallest standard configuration that would fit. With
`text_encoder="stage"` the cards hold only the transformer and the VAE (the prompts are encoded by
the TextEncoder stage, `deployments.placement.encoder`). Pure arithmetic on
`ComponentSize`s and the activation model: it never loads weights, never touches a GPU, never
imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deployments.placement.activation import phase_transients
from deployments.placement.config import (
    BF16,
    FP8,
    FP32,
    GB,
    DoesNotFit,
    Dtype,
    Offload,
    PlacementConfig,
    Task,
    TextEncoderMode,
)
from deployments.placement.plans import ComponentPlan, Plan, strategy_text
from deployments.placement.sizes import COMPONENTS, TASK_MODELS, ComponentSize, component_sizes

__all__ = ["MAX_STREAMED_FRACTION", "ComponentPlan", "Plan", "plan"]

# --------------------------------------------------------------------------------------------
# policy

VAE_TILING_ABOVE_PIXELS = 1024 * 1024
"""Tile the VAE above ~1 MP even when the untiled pass would fit: beyond it the mid-block
attention grows with the square of the pixels (8.7 GB at 1536², 26.7 GB at 2048²) while tiles
stay at ~0.25 GB; at or below 1 MP the untiled pass is kept when it fits (no seams, faster)."""
MAX_STREAMED_FRACTION = 0.25
"""Most of the transformer's blocks that may be streamed from CPU each forward (15 of 60). A
policy, not physics: a streamed block is copied over PCIe on every transformer call (two per step
with CFG); a few hide behind the compute of large token counts, streaming most of the model would
not (and would need ~20 GB of pinned host memory per replica). A GPU run should measure step time
against streamed blocks before this is raised."""
STANDARD_CARDS_GB = (48.0, 80.0)
"""Single-card sizes tried after 1..8 cards of the configured size when looking for the smallest
configuration that fits."""
MAX_SEARCH_GPUS = 8


@dataclass(frozen=True)
class _Recipe:
    transformer: Dtype
    text_encoder: Dtype
    text_offload: Offload
    stream: bool

    def uses_fp8(self) -> bool:
        return FP8 in (self.transformer, self.text_encoder)

    def uses_offload(self) -> bool:
        return self.text_offload in ("group", "cpu") or self.stream


def _recipes(allow_fp8: bool, allow_offload: bool, fp8_compute: bool = False, stage: bool = False) -> list[_Recipe]:
    """Candidates from best to worst (quality first, then speed); with fp8 compute, only those with
    an fp8 transformer that is not streamed (torchao's float8 weights are not offloaded). With the
    text encoder in the stage, recipes that differ only in where it goes are one recipe."""
    ladder = [
        _Recipe(BF16, BF16, "none", False),
        _Recipe(FP8, BF16, "none", False),
        _Recipe(FP8, FP8, "none", False),
    ]
    for text_offload in ("group", "cpu"):
        for stream in (False, True):
            ladder += [_Recipe(BF16, BF16, text_offload, stream), _Recipe(FP8, BF16, text_offload, stream)]
    if stage:
        ladder = list(dict.fromkeys(_Recipe(r.transformer, BF16, "stage", r.stream) for r in ladder))
    return [r for r in ladder if (allow_fp8 or not r.uses_fp8()) and (allow_offload or not r.uses_offload())
            and (not fp8_compute or (r.transformer == FP8 and not r.stream))]


@dataclass
class _Card:
    resident: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def peak(self) -> tuple[float, str]:
        phase, transient = max(self.phases.items(), key=lambda item: item[1], default=("idle", 0.0))
        return self.resident + transient, phase


def _layout(
    task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize], recipe: _Recipe, n: int, tiled: bool,
    vae_dtype: Dtype = BF16,
) -> Plan | None:
    """Place `recipe` on exactly `n` GPUs, or None. Text encoder and VAE share the last GPU; the
    transformer fills GPUs from the first, whole when it fits, else split at block boundaries
    (evenly over the GPUs that hold only transformer blocks); on one GPU, blocks that do not fit
    are streamed when the recipe allows. With the text encoder in the stage the VAE goes on the
    first GPU instead: the pipeline then executes where the transformer's first GPU is (accelerate
    dispatches a split transformer with that as its main device), and the VAE must be there."""
    if recipe.stream and n > 1:
        return None  # streaming is the one-card fallback; with more cards, splitting is the answer
    limit = (config.gpu_memory_gb - config.margin) * GB
    t, te, vae = sizes["transformer"], sizes["text_encoder"], sizes["vae"]
    act = phase_transients(task, config, sizes, tiled, vae_dtype)
    vae_bytes = vae.bytes_bf16 * (2 if vae_dtype == FP32 else 1)
    cards = [_Card() for _ in range(n)]
    stage = recipe.text_offload == "stage"
    home_index = 0 if stage else n - 1
    home = cards[home_index]

    # text encoder and VAE on the last card (the VAE alone on the first with the stage)
    if recipe.text_offload in ("none", "group"):
        # a streamed leaf, or the bf16 copy of an fp8 layer while it runs
        extra = te.largest_layer_bytes if (recipe.text_offload == "group" or recipe.text_encoder == FP8) else 0
        if recipe.text_offload == "none":
            home.resident += te.weight_bytes(recipe.text_encoder)
        for phase in ("encode_prompt", "caption"):
            if phase in act:
                home.phases[phase] = act[phase] + extra
    home.resident += vae_bytes
    home.phases["encode_image"] = act["encode_image"]
    home.phases["decode"] = act["decode"]

    # transformer: non-block layers on the first card, blocks greedily from the first card on
    dtype = recipe.transformer
    block = t.block_bytes(dtype)
    # the bf16 copy of one fp8-stored layer while it runs; float8 compute needs none
    denoise = act["denoise"] + (t.largest_layer_bytes if dtype == FP8 and config.compute != "fp8" else 0)
    cards[0].resident += t.nonblock_bytes(dtype)
    stream_buffer = block if recipe.stream else 0  # the one streamed block on the GPU at a time (n == 1)
    caps = []
    for card in cards:
        transient = denoise + stream_buffer
        room = limit - card.resident - max(max(card.phases.values(), default=0.0), transient)
        caps.append(max(0, int(room // block)))
    alloc = [0] * n
    remaining = t.blocks
    for index in range(n):
        alloc[index] = min(caps[index], remaining)
        remaining -= alloc[index]
    streamed = 0
    if remaining:
        if not recipe.stream or remaining > int(MAX_STREAMED_FRACTION * t.blocks):
            return None
        streamed = remaining
    # spread the blocks evenly over the cards that hold nothing but transformer blocks
    only = [i for i in range(n) if alloc[i] and (stage or i < n - 1)]
    if len(only) > 1:
        total = sum(alloc[i] for i in only)
        share = [total // len(only) + (1 if k < total % len(only) else 0) for k in range(len(only))]
        if all(s <= caps[i] for s, i in zip(share, only)):
            for s, i in zip(share, only):
                alloc[i] = s
    for index, card in enumerate(cards):
        card.resident += alloc[index] * block
        if index == 0 or alloc[index]:
            card.phases["denoise"] = denoise + (block if streamed else 0)

    peaks = [card.peak() for card in cards]
    if any(peak > limit for peak, _ in peaks):
        return None
    used = [i for i in range(n) if alloc[i] or i in (0, home_index)]
    if used != list(range(n)):  # an empty card in the middle: a smaller n places this recipe too
        return None

    t_gpus = tuple(i for i in range(n) if alloc[i] or i == 0)
    t_weights = tuple(
        round((alloc[i] * block + (t.nonblock_bytes(dtype) if i == 0 else 0)) / GB, 3) for i in t_gpus
    )
    transformer = ComponentPlan(
        gpus=t_gpus,
        dtype=dtype,
        offload="group" if streamed else "none",
        weights_gb=t_weights,
        cpu_weights_gb=round(streamed * block / GB, 3),
        blocks=tuple(alloc[i] for i in t_gpus),
        streamed_blocks=streamed,
        compute=config.compute,
    )
    te_bytes = te.weight_bytes(recipe.text_encoder)
    if stage:
        text_encoder = ComponentPlan((), BF16, "stage", ())
    elif recipe.text_offload == "none":
        text_encoder = ComponentPlan((n - 1,), recipe.text_encoder, "none", (round(te_bytes / GB, 3),))
    elif recipe.text_offload == "group":
        text_encoder = ComponentPlan((n - 1,), recipe.text_encoder, "group", (0.0,), round(te_bytes / GB, 3))
    else:
        text_encoder = ComponentPlan((), recipe.text_encoder, "cpu", (), round(te_bytes / GB, 3))
    vae_plan = ComponentPlan((home_index,), vae_dtype, "none", (round(vae_bytes / GB, 3),))
    return Plan(
        task=task,
        gpus=config.gpus,
        gpu_memory_gb=config.gpu_memory_gb,
        margin_gb=config.margin,
        resolution=config.resolution,
        layers=config.layers if task == "layers" else None,
        gpus_used=n,
        transformer=transformer,
        text_encoder=text_encoder,
        vae=vae_plan,
        vae_tiling=tiled,
        vae_slicing=task == "layers",
        peak_gb=tuple(round(peak / GB, 3) for peak, _ in peaks),
        peak_phase=tuple(phase for _, phase in peaks),
        strategy=strategy_text(transformer, text_encoder, tiled),
    )


def _search(task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize], vae_dtype: Dtype,
            text_encoder: TextEncoderMode = "inline") -> Plan | None:
    forced_tiling = config.resolution**2 > VAE_TILING_ABOVE_PIXELS
    stage = text_encoder == "stage"
    for recipe in _recipes(config.allow_fp8, config.allow_offload, config.compute == "fp8", stage):
        for n in range(1, config.gpus + 1):
            for tiled in ((True,) if forced_tiling else (False, True)):
                placed = _layout(task, config, sizes, recipe, n, tiled, vae_dtype)
                if placed is not None:
                    return placed
    return None


def _smallest(
    task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize], vae_dtype: Dtype,
    text_encoder: TextEncoderMode = "inline",
) -> list[tuple[str, PlacementConfig]]:
    """Smallest standard configurations that fit: the same options first, then with what is off
    turned on. `[(description, config), ...]`."""
    variants = [("", config.allow_fp8, config.allow_offload)]
    if not config.allow_fp8:
        variants.append(("with fp8", True, config.allow_offload))
    if not config.allow_offload:
        variants.append(("with offload", config.allow_fp8, True))
    if not config.allow_fp8 and not config.allow_offload:
        variants.append(("with fp8 and offload", True, True))
    shapes = [(count, config.gpu_memory_gb) for count in range(1, MAX_SEARCH_GPUS + 1)]
    shapes += [(1, size) for size in STANDARD_CARDS_GB if size > config.gpu_memory_gb]
    found = []
    for label, fp8, offload in variants:
        for count, memory in shapes:
            if label == "" and memory == config.gpu_memory_gb and count <= config.gpus:
                continue  # already known not to fit
            candidate = config.model_copy(
                update={"gpus": count, "gpu_memory_gb": memory, "allow_fp8": fp8, "allow_offload": offload}
            )
            if _search(task, candidate, sizes, vae_dtype, text_encoder) is not None:
                found.append((f"{count}x{memory:g} GB " + (label or "as configured"), candidate))
                break
    return found


def plan(task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize] | None = None,
         vae_dtype: Dtype = BF16, text_encoder: TextEncoderMode = "inline") -> Plan:
    """The best placement of `task`'s pipeline on `config`'s GPUs, its VAE in `vae_dtype` (bf16, or
    float32 where the task decodes in float32), its text encoder on these cards (`inline`) or in
    the TextEncoder stage (`stage`: not on them at all); raises DoesNotFit."""
    if task not in TASK_MODELS:
        raise ValueError(f"task must be one of {sorted(TASK_MODELS)}, got {task!r}")
    if text_encoder not in ("inline", "stage"):
        raise ValueError(f"text_encoder must be 'inline' or 'stage', got {text_encoder!r}")
    sizes = sizes if sizes is not None else component_sizes(TASK_MODELS[task])
    missing = [name for name in COMPONENTS if name not in sizes]
    if missing:
        raise ValueError(f"sizes lack {missing}")
    found = _search(task, config, sizes, vae_dtype, text_encoder)
    if found is not None:
        return found
    alternatives = _smallest(task, config, sizes, vae_dtype, text_encoder)
    t = sizes["transformer"]
    smallest_t = FP8 if config.allow_fp8 else BF16
    need = t.weight_bytes(smallest_t) / GB
    denoise = phase_transients(task, config, sizes, True)["denoise"] / GB
    layers = f", {config.layers} layers" if task == "layers" else ""
    options = f"fp8 {'allowed' if config.allow_fp8 else 'off'}, offload {'allowed' if config.allow_offload else 'off'}"
    if text_encoder == "stage":
        options += ", text encoder in the TextEncoder stage"
    reason = (
        f"{task} at {config.resolution} px{layers} does not fit {config.shape} GB ({options}; "
        f"{config.gpu_memory_gb - config.margin:.1f} GB usable per GPU after the {config.margin:.1f} GB margin): "
        f"the {smallest_t} transformer alone is {need:.1f} GB of weights plus {denoise:.1f} GB of activations"
    )
    if config.allow_offload:
        streamable = int(MAX_STREAMED_FRACTION * t.blocks)
        reason += f" (at most {streamable} of its {t.blocks} blocks may be streamed from CPU, on one GPU)"
    reason += "; " + (
        "needs " + ", or ".join(text for text, _ in alternatives) if alternatives else "no standard configuration fits"
    )
    raise DoesNotFit(reason, alternatives[0][1] if alternatives else None)
