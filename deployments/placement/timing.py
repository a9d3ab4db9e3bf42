"""A time model of the two stages, and how to split a cluster's cards between them.

Contract: `transformer_seconds(plan, steps, cfg)` and `encoder_seconds(plan, task)` predict the
seconds one request spends in the diffusion replica's denoising loop and in the text encoder
(the TextEncoder stage's `EncoderPlan`, or an inline `Plan`'s own encoder) on a card class
(`CardSpeed`, RTX 4090 by default) or the CPU; `recommend_split(cards, ...)` divides N cards into
encoder and transformer replicas for the most requests per second. Pure arithmetic on
`ComponentSize`s and plans: it never loads weights, never touches a GPU, never imports torch.

The model, per forward pass: compute seconds = FLOPs / the card's rate for the format it computes
in (linear layers ≈ 2·params·tokens; the transformer's attention 4·tokens²·hidden·blocks, in
bf16), memory seconds = weight bytes read / memory bandwidth; the forward takes the larger of the
two, plus streamed weights / the PCIe rate where the plan streams (diffusers' group offload, as
placed, copies synchronously: the copy does not overlap compute). fp8 storage with layerwise
casting reads the fp8 weight, writes its bf16 copy and reads that copy: 5 bytes per cast
parameter where bf16 reads 2. The denoising loop is steps × (2 with CFG, else 1) forwards over
the image tokens (`activation.image_tokens`) plus `TEXT_TOKENS`; prompt encoding is one forward
over the prompt (and for `real` the condition image's vision tokens), two with a negative prompt;
the `layers` caption is a prefill of the image's vision tokens and then one memory-bound forward
per generated token. VAE encode/decode are left out (under 1 % of a 1024 px denoising loop).
Every figure is a datasheet number: uncalibrated until a GPU run measures the stage times.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from deployments.placement.activation import (
    CAPTION_EXTRA_TOKENS,
    EDIT_CONDITION_TEXT_PIXELS,
    TEXT_TOKENS,
    VISION_PATCH_PIXELS,
    image_tokens,
)
from deployments.placement.config import FP8, GB, Dtype, Task
from deployments.placement.encoder import EncoderPlan
from deployments.placement.plans import Plan
from deployments.placement.sizes import TASK_MODELS, ComponentSize, component_sizes


@dataclass(frozen=True)
class CardSpeed:
    """Throughput figures of one device class."""

    name: str
    bf16_flops: float
    """Dense bf16 tensor FLOP/s (FP32 accumulate)."""
    fp8_flops: float
    """Dense float8 tensor FLOP/s (what torchao's float8 Linear layers reach at best)."""
    memory_bytes_s: float
    """Memory bandwidth, bytes/s."""
    host_link_bytes_s: float
    """Host-to-device copies (group offload), bytes/s; infinite for the CPU itself."""


RTX_4090 = CardSpeed("RTX 4090", bf16_flops=165e12, fp8_flops=330e12, memory_bytes_s=1008e9, host_link_bytes_s=25e9)
"""Datasheet figures (Ada whitepaper: 165 dense bf16 / 330 dense fp8 TFLOP/s, 1008 GB/s GDDR6X);
PCIe 4.0 x16 is 32 GB/s raw, ~25 GB/s for pinned copies. Uncalibrated: real kernels reach less."""
CPU_SPEED = CardSpeed("CPU", bf16_flops=1.0e12, fp8_flops=1.0e12, memory_bytes_s=100e9, host_link_bytes_s=math.inf)
"""An assumed 16-core server CPU with AVX-512 bf16 (~1 TFLOP/s reached by PyTorch matmuls) and
~100 GB/s of DDR bandwidth: an order of magnitude, not a measurement; fp8 storage computes in bf16."""

PROMPT_TOKENS = 160
"""Tokens of a typical prompt with the pipelines' chat template (~64 template + ~100 prompt); the
transformer's `TEXT_TOKENS` is the 1024-token cap, an upper bound."""
CAPTION_NEW_TOKENS = CAPTION_EXTRA_TOKENS - 64
"""Tokens a `layers` caption may generate (512, diffusers' cap; `layers.caption_max_new_tokens`):
an upper bound, captions usually end earlier."""


@dataclass(frozen=True)
class StageTime:
    """Predicted seconds of one request in one stage, and how they came about."""

    stage: str
    seconds: float
    detail: str
    """e.g. `60 forwards × 2.29 s (compute-bound)`."""


def _weight_traffic(size: ComponentSize, dtype: Dtype, fp8_compute: bool = False) -> float:
    """Bytes of weights one forward moves through memory (see the module docstring)."""
    if dtype != FP8:
        return size.bytes_bf16
    if fp8_compute:
        return size.bytes_fp8
    return size.bytes_fp8 + 4 * (size.bytes_bf16 - size.bytes_fp8)


def _forward(flops: float, attention_flops: float, traffic: float, streamed: float, speed: CardSpeed,
             fp8_compute: bool = False) -> tuple[float, str]:
    compute = flops / (speed.fp8_flops if fp8_compute else speed.bf16_flops) + attention_flops / speed.bf16_flops
    memory = traffic / speed.memory_bytes_s
    seconds = max(compute, memory) + streamed / speed.host_link_bytes_s
    bound = "compute" if compute >= memory else "memory"
    if streamed and streamed / speed.host_link_bytes_s > max(compute, memory):
        bound = "PCIe"
    return seconds, bound


def _sizes(task: Task, sizes: dict[str, ComponentSize] | None) -> dict[str, ComponentSize]:
    return sizes if sizes is not None else component_sizes(TASK_MODELS[task])


def transformer_seconds(plan: Plan, steps: int, cfg: float, sizes: dict[str, ComponentSize] | None = None,
                        card: CardSpeed = RTX_4090) -> StageTime:
    """Seconds of the denoising loop of one request placed by `plan` (a replica's cards)."""
    t = _sizes(plan.task, sizes)["transformer"]
    tokens = image_tokens(plan.task, plan.resolution, plan.layers or 1) + TEXT_TOKENS
    fp8_compute = plan.transformer.compute == "fp8"
    streamed = plan.transformer.cpu_weights_gb * GB
    one, bound = _forward(2 * t.params * tokens, 4 * tokens**2 * t.hidden_size * t.blocks,
                          _weight_traffic(t, plan.transformer.dtype, fp8_compute), streamed, card, fp8_compute)
    forwards = steps * (2 if cfg > 1 else 1)
    return StageTime("transformer", forwards * one, f"{forwards} forwards × {one:.2f} s ({bound}-bound)")


def _encoder_where(plan: EncoderPlan | Plan, card: CardSpeed, cpu: CardSpeed) -> tuple[CardSpeed, Dtype, bool, str]:
    """(speed, dtype, streamed, where) of the text encoder `plan` places."""
    if isinstance(plan, EncoderPlan):
        on_cpu = plan.device == "cpu"
        return (cpu if on_cpu else card), plan.dtype, False, "CPU" if on_cpu else card.name
    te = plan.text_encoder
    if te.offload == "stage":
        raise ValueError("this plan's text encoder is in the TextEncoder stage: time the stage's EncoderPlan")
    if te.offload == "cpu":
        return cpu, te.dtype, False, "CPU"
    return card, te.dtype, te.offload == "group", card.name + (", streamed" if te.offload == "group" else "")


def encoder_seconds(plan: EncoderPlan | Plan, task: Task | None = None, negative: bool = True,
                    caption_tokens: int | None = CAPTION_NEW_TOKENS, sizes: dict[str, ComponentSize] | None = None,
                    card: CardSpeed = RTX_4090, cpu: CardSpeed = CPU_SPEED) -> StageTime:
    """Seconds the text encoder spends on one `task` request (None: the plan's one task):
    the prompt (and with `negative`, the negative prompt: CFG on), and for `layers` with
    `caption_tokens` the caption first (None: the request has a prompt, no caption)."""
    if task is None:  # the plan's own task, or the one task an EncoderPlan serves
        task = plan.task if isinstance(plan, Plan) else (plan.tasks[0] if len(plan.tasks) == 1 else None)
    if task not in TASK_MODELS:
        raise ValueError(f"task must be one of {sorted(TASK_MODELS)}, got {task!r}")
    te = _sizes(task, sizes)["text_encoder"]
    speed, dtype, streamed, where = _encoder_where(plan, card, cpu)
    traffic = _weight_traffic(te, dtype)
    stream = te.weight_bytes(dtype) if streamed else 0.0  # leaf-level offload streams all of it, every forward

    def forward(tokens: int) -> float:
        return _forward(2 * te.params * tokens, 0.0, traffic, stream, speed)[0]

    prompts = 2 if negative else 1
    parts: list[str] = []
    if task == "real":
        tokens = PROMPT_TOKENS + int(EDIT_CONDITION_TEXT_PIXELS / VISION_PATCH_PIXELS**2) // 4
        seconds = prompts * forward(tokens)
        parts.append(f"{prompts} × {tokens}-token prompt")
    else:
        caption = 0.0
        if caption_tokens:
            resolution = plan.resolution
            image = int(resolution**2 / VISION_PATCH_PIXELS**2) // 4 + 64
            caption = forward(image) + caption_tokens * forward(1)
            parts.append(f"caption ({image}-token prefill, {caption_tokens} new tokens)")
        tokens = 64 + caption_tokens if caption_tokens else PROMPT_TOKENS  # the caption is the prompt
        seconds = caption + prompts * forward(tokens)
        parts.append(f"{prompts} × {tokens}-token prompt")
    return StageTime("text encoder", seconds, f"{' + '.join(parts)} on {where}")


@dataclass(frozen=True)
class Split:
    """How N cards are divided between TextEncoder and diffusion (transformer) replicas."""

    cards: int
    encoder_replicas: int
    encoder_cards: int
    """Cards the encoder replicas use (0 when the encoder runs on CPU)."""
    transformer_replicas: int
    transformer_cards: int
    idle_cards: int
    transformer_s: float
    """Predicted seconds of one request in a transformer replica."""
    encoder_s: float
    """Predicted seconds of one request in an encoder replica."""
    feeds: float
    """Transformer replicas one encoder replica keeps busy: transformer_s / encoder_s."""
    requests_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        def count(n: int, noun: str) -> str:
            return f"{n} {noun}{'s' if n != 1 else ''}"

        where = count(self.encoder_cards, "card") if self.encoder_cards else "CPU"
        idle = f", {self.idle_cards} idle" if self.idle_cards else ""
        encoders = count(self.encoder_replicas, "TextEncoder replica")
        diffusion = count(self.transformer_replicas, "diffusion replica")
        lines = [
            f"split of {self.cards} cards: {encoders} ({where}), {diffusion} ({count(self.transformer_cards, 'card')})",
            f"per request: transformer {self.transformer_s:.2f} s, text encoder {self.encoder_s:.2f} s",
            f"one TextEncoder replica feeds {self.feeds:.1f} diffusion replicas",
            f"throughput: {self.requests_per_s:.4f} requests/s ({self.requests_per_s * 3600:.1f} per hour)",
        ]
        lines[0] += idle
        return "\n".join(lines)


def recommend_split(cards: int, transformer_s: float, encoder_s: float, transformer_gpus: int = 1,
                    encoder_gpus: int = 1) -> Split:
    """The split of `cards` cards that serves the most requests per second.

    With E encoder replicas of `encoder_gpus` cards and T transformer replicas of
    `transformer_gpus` cards (E·encoder_gpus + T·transformer_gpus ≤ cards, E ≥ 1, T ≥ 1), a request
    spends `encoder_s` in one encoder and `transformer_s` in one transformer replica, so
    throughput = min(T / transformer_s, E / encoder_s) requests/s; the split maximises it, and
    among equals uses the fewest encoder replicas. One encoder replica feeds
    transformer_s / encoder_s transformer replicas. With `encoder_gpus=0` (the encoder on CPU) all
    cards go to transformers and E = ceil(T · encoder_s / transformer_s) CPU replicas keep up
    (each needs its own cores and ~17 GB of host memory). Raises ValueError when the cards cannot
    hold one of each."""
    if min(transformer_s, encoder_s) <= 0 or transformer_gpus < 1 or encoder_gpus < 0:
        raise ValueError("stage times must be > 0, transformer_gpus >= 1, encoder_gpus >= 0")
    need = transformer_gpus + encoder_gpus
    if cards < need:
        raise ValueError(f"{cards} cards cannot hold one diffusion replica ({transformer_gpus} cards) and one "
                         f"TextEncoder replica ({encoder_gpus} cards): at least {need} are needed")
    best: tuple[float, int, int] | None = None
    if encoder_gpus == 0:
        replicas = cards // transformer_gpus
        best = (replicas / transformer_s, max(1, math.ceil(replicas * encoder_s / transformer_s)), replicas)
    else:
        for encoders in range(1, (cards - transformer_gpus) // encoder_gpus + 1):
            replicas = (cards - encoders * encoder_gpus) // transformer_gpus
            rate = min(replicas / transformer_s, encoders / encoder_s)
            if best is None or rate > best[0] * (1 + 1e-12):
                best = (rate, encoders, replicas)
    rate, encoders, replicas = best
    used = encoders * encoder_gpus + replicas * transformer_gpus
    return Split(cards=cards, encoder_replicas=encoders, encoder_cards=encoders * encoder_gpus,
                 transformer_replicas=replicas, transformer_cards=replicas * transformer_gpus,
                 idle_cards=cards - used, transformer_s=round(transformer_s, 4), encoder_s=round(encoder_s, 4),
                 feeds=round(transformer_s / encoder_s, 2), requests_per_s=rate)
