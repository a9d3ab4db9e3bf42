"""Memory placement planner for the Qwen-Image diffusion replicas (DESIGN.md §5).

Contract: `plan(task, config)` is a pure function of the component sizes, the GPUs one replica
owns (`PlacementConfig`: count × memory), the resolution and the allowed trade-offs; it loads no
weights and touches no GPU. It returns a `Plan`: which component sits on which GPU (whole, or the
transformer split at block boundaries), in which dtype (bf16, or fp8 storage with bf16 compute by
layerwise casting), what is streamed from CPU (group offload), whether the VAE tiles, and the
predicted peak of every GPU, which is at most the card's memory minus the margin. When nothing
fits it raises `DoesNotFit`, naming why and the smallest configuration that would fit.
`ray_options(plan, config, num_cpus)` turns a plan into the Ray Serve options of one replica, and
`place_pipeline(pipe, plan)` (the only torch-touching part) applies a plan to a pipeline loaded on
CPU. Importing the package imports none of torch, diffusers, transformers or ray.

Text encoder stage: with `plan(..., text_encoder="stage")` a replica's cards hold only the
transformer and the VAE (the VAE on the first card, where the pipeline then executes); the
separate TextEncoder deployment encodes the prompts (and `layers` captions) for them.
`plan_encoder(tasks, config)` places that encoder on its one card (bf16, else fp8 storage) or on
the CPU (`EncoderPlan`), `encoder_ray_options` asks Ray for it, `place_text_encoder` applies it,
and `timing` predicts each stage's seconds per request and splits N cards between the two
(`recommend_split`).

Modules, each depending only on those before it: `config` (the budget, `GB`, `DoesNotFit`),
`sizes` (component sizes on the meta device), `activation` (transient bytes per phase), `plans`
(`Plan`, `ComponentPlan`), `search` (the candidates, `plan`), `encoder` (`EncoderPlan`,
`plan_encoder`), `timing` (stage seconds, `recommend_split`), `resources` (`ray_options`,
`encoder_ray_options`), `apply` (`place_pipeline`, `place_text_encoder`).

Sizes come from the published configs stored in `deployments/model_configs/` (or a local
diffusers directory), built on the meta device (`component_sizes`): the transformer is
20,430,401,088 parameters (40.86 GB bf16), the Qwen2.5-VL-7B text encoder 8,292,166,656 (16.58 GB),
the VAE 126,892,531 (0.25 GB). Sizes are decimal GB (1e9 bytes), as model cards state them.

Candidates are tried from best quality and speed to worst; the first that fits every GPU wins,
on the fewest GPUs (<= `config.gpus`) for that candidate:

1. everything bf16, no offload (the transformer whole on one card or split at block boundaries
   over several; text encoder and VAE share the last card);
2. fp8 transformer, bf16 text encoder, no offload;
3. fp8 transformer and fp8 text encoder, no offload;
4. (offload allowed) text encoder streamed from CPU leaf by leaf (group offload); then, on one
   GPU only, the transformer with up to `MAX_STREAMED_FRACTION` of its blocks streamed too; then
   the text encoder run on the CPU. Within each, bf16 transformer before fp8.

The VAE tiles when the resolution is above `VAE_TILING_ABOVE_PIXELS` or when the untiled
encode/decode would not fit. The transformer and text encoder activation figures (`activation`)
match torch's memory profiler on full-width CPU slices within 10 %
(`bench/results/activation_calibration.json`); a GPU run (`torch.cuda.max_memory_allocated` per
phase) has not checked them yet, and the margin is there for what neither sees (kernel
workspaces, allocator slack).
"""

from __future__ import annotations

from deployments.placement.activation import TEXT_TOKENS, phase_transients
from deployments.placement.apply import (
    apply_encoder_format,
    apply_formats,
    fp8_compute_problem,
    place_pipeline,
    place_text_encoder,
)
from deployments.placement.config import FP8, FP32, GB, DoesNotFit, PlacementConfig, TextEncoderMode, parse_gpus
from deployments.placement.encoder import EncoderPlan, plan_encoder
from deployments.placement.resources import encoder_ray_options, ray_options
from deployments.placement.search import MAX_STREAMED_FRACTION, ComponentPlan, Plan, plan
from deployments.placement.sizes import COMPONENTS, MODEL_CONFIGS, TASK_MODELS, ComponentSize, component_sizes
from deployments.placement.timing import (
    RTX_4090,
    CardSpeed,
    Split,
    StageTime,
    encoder_seconds,
    recommend_split,
    transformer_seconds,
)

__all__ = [
    "COMPONENTS",
    "FP8",
    "FP32",
    "GB",
    "MAX_STREAMED_FRACTION",
    "MODEL_CONFIGS",
    "RTX_4090",
    "TASK_MODELS",
    "TEXT_TOKENS",
    "CardSpeed",
    "ComponentPlan",
    "ComponentSize",
    "DoesNotFit",
    "EncoderPlan",
    "PlacementConfig",
    "Plan",
    "Split",
    "StageTime",
    "TextEncoderMode",
    "apply_encoder_format",
    "apply_formats",
    "component_sizes",
    "encoder_ray_options",
    "encoder_seconds",
    "fp8_compute_problem",
    "parse_gpus",
    "phase_transients",
    "place_pipeline",
    "place_text_encoder",
    "plan",
    "plan_encoder",
    "ray_options",
    "recommend_split",
    "transformer_seconds",
]
