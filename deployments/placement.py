"""Memory placement planner for the Qwen-Image diffusion replicas (DESIGN.md §5).

Contract: `plan(task, config)` is a pure function of the component sizes, the GPUs one replica
owns (`PlacementConfig`: count × memory), the resolution and the allowed trade-offs; it loads no
weights and touches no GPU. It returns a `Plan`: which component sits on which GPU (whole, or the
transformer split at block boundaries), in which dtype (bf16, or fp8 storage with bf16 compute by
layerwise casting), what is streamed from CPU (group offload), whether the VAE tiles, and the
predicted peak of every GPU, which is at most the card's memory minus the margin. When nothing
fits it raises `DoesNotFit`, naming why and the smallest configuration that would fit.
`ray_options(plan, config, num_cpus)` turns a plan into the Ray Serve options of one replica, and
`place_pipeline(pipe, plan)` (the only torch-touching part, in its own section at the end) applies
a plan to a pipeline loaded on CPU.

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
encode/decode would not fit. Activation figures come from tensor-shape accounting (live tensor
bytes traced on the meta device through the real diffusers/transformers code, see the constants
below); they are uncalibrated until a GPU run measures `torch.cuda.max_memory_allocated` per
phase, and the margin is there for what tracing cannot see (kernel workspaces, allocator slack).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from deployments.validation import between

GB = 1e9
"""Sizes are decimal GB as model cards state them (40.9 GB bf16
transformer). An RTX 4090's 24 GiB is 25.8 GB, so planning for 24 GB leaves ~1.8 GB for the CUDA
context and the driver."""

Task = Literal["real", "layers"]
Dtype = Literal["bfloat16", "float8_e4m3fn"]
Offload = Literal["none", "group", "cpu"]

BF16: Dtype = "bfloat16"
FP8: Dtype = "float8_e4m3fn"

MODEL_CONFIGS = Path(__file__).with_name("model_configs")
"""Published configs of the two models (no weights), see model_configs/SOURCE.md."""
TASK_MODELS: dict[str, str] = {"real": "qwen-image-edit-2511", "layers": "qwen-image-layered"}
COMPONENTS = ("transformer", "text_encoder", "vae")

# --------------------------------------------------------------------------------------------
# token and pixel counts (what the diffusers 0.42.1 pipelines feed each component)

TOKEN_PIXELS = 16
"""Pixels per transformer token along an edge: VAE downsampling 8 × patch size 2."""
TEXT_TOKENS = 1024
"""Prompt budget in tokens (template + prompt, and for `real` the ~190 vision tokens of the
condition image); the pipelines cap prompt embeddings at 1024 (`max_sequence_length`)."""
EDIT_CONDITION_PIXELS = 1024 * 1024
"""QwenImageEditPlusPipeline resizes the condition image to about this area for the VAE
(`VAE_IMAGE_SIZE`) whatever the output size, so its token count is fixed."""
EDIT_CONDITION_TEXT_PIXELS = 384 * 384
"""...and to about this area for the text encoder's vision tower (`CONDITION_IMAGE_SIZE`)."""
VISION_PATCH_PIXELS = 14
"""Qwen2.5-VL vision patch edge; 2×2 patches merge into one text-side token."""
CAPTION_EXTRA_TOKENS = 64 + 512
"""`layers` captions the image first: template tokens plus at most 512 generated tokens."""

# --------------------------------------------------------------------------------------------
# activation coefficients (bf16, batch 1). Derived by running the real diffusers/transformers
# forward passes on the meta device under a TorchDispatchMode that adds up the bytes of every
# tensor an op creates and subtracts them when the tensor dies (views and in-place ops excluded),
# at the published sizes; SDPA stubbed as a memory-efficient kernel (output only, no N² scores).
# Not measured on a GPU: kernel workspaces (cuBLAS, cuDNN conv3d) and allocator rounding are not
# in them. A GPU run should calibrate each against torch.cuda.max_memory_allocated per phase.

DIT_IMAGE_TOKEN_UNITS = 15.0
"""Transformer peak per image token, in units of hidden × 2 bytes (hidden 3072 → 92 kB/token).
Traced: Qwen-Image-Layered at 640/1024 px with 4/8 layers, 15.0-15.1."""
DIT_ZERO_COND_EXTRA_UNITS = 2.2
"""Edit-2511's `zero_cond_t` modulates condition tokens with their own timestep, so shift/scale/
gate become per-token tensors: traced 17.2 units per image token (106 kB) at 512/1024 px."""
DIT_TEXT_TOKEN_UNITS = 4.0
"""Transformer peak per text token (traced 2.3-4.0 units)."""
TE_TOKEN_UNITS = 9.0
"""Text encoder (Qwen2.5-VL LM) transients per token besides logits and kept hidden states, in
units of hidden × 2 bytes. Traced at 256-2048 tokens: 569 kB/token with `output_hidden_states`
(as the pipelines call it) = logits (vocab × 2) + 29 hidden states + 8-9 units."""
VISION_PATCH_BYTES_UNITS = (10.0, 3.0)
"""Vision tower peak per patch: 10 × hidden + 3 × intermediate (× 2 bytes); counted by hand
(residual, norm, q/k/v, rotary q/k, attention out, MLP gate/up/act), not traced: the window
attention needs real index values, which meta tensors do not have. ~46 kB per patch."""
VAE_DECODE_BYTES_PER_PIXEL = 3460.0
"""Untiled VAE decode of one frame, bytes per output pixel (base_dim 96): traced 3459-3466 from
256² to 1024² (3.63 GB at 1024²)."""
VAE_ENCODE_BYTES_PER_PIXEL = 1960.0
"""Untiled VAE encode of one frame, bytes per input pixel (traced 1935-1962 at 256²-512²)."""
VAE_ENCODE_CACHE_BYTES_PER_PIXEL = 1500.0
"""Causal-conv feature caches still alive when the encoder reaches its mid-block attention."""
VAE_ATTENTION_BYTES_PER_TOKEN2 = 6.3
"""The VAE mid-block attends over all (pixels/64) latent positions with one 384-wide head; the
trace counts the scores (head dim 384 is beyond flash attention's 256, so a materialised score
matrix is assumed). Fits the traced 3.27 GB encode at 1024², 8.7 GB decode at 1536² and
26.7 GB at 2048²."""
VAE_TILED_DECODE_BYTES = (0.227e9, 13.0)
"""Tiled decode (256 px tiles, 192 px stride, diffusers defaults): fixed bytes + bytes per pixel
(traced 0.227 GB at 256², 0.237 GB at 1024², 0.282 GB at 2048²)."""
VAE_TILED_ENCODE_BYTES = (0.127e9, 1.7)
"""Tiled encode: fixed bytes + bytes per pixel (traced 0.127-0.134 GB up to 2048²)."""
VAE_OUTPUT_COPIES = 3
"""Decoded frames held on the GPU at once while the pipeline denormalises them (bf16)."""

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


class PlacementConfig(BaseModel):
    """The GPUs one replica owns and the trade-offs it may make to fit them."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = 1
    """GPUs one replica owns (all on one node); the plan may use fewer."""
    gpu_memory_gb: float = 24.0
    """Memory of each GPU in decimal GB (an RTX 4090: 24; its 24 GiB are 25.8 GB, the rest is left
    to the CUDA context)."""
    gpu_resource: str | None = None
    """Custom Ray resource the replica asks for once per GPU it uses (e.g. `rtx4090`), so replicas
    land on nodes started with that resource; None asks for plain GPUs only."""
    resolution: int = 1024
    """Longest pixel edge the plan must hold (square images are the worst case)."""
    layers: int = 8
    """`layers` task only: the layer count the plan must hold (each layer is a frame of tokens)."""
    allow_fp8: bool = True
    """Allow fp8 weight storage (float8_e4m3fn, computed in bf16 by layerwise casting)."""
    allow_offload: bool = True
    """Allow streaming weights from CPU memory (group offload) or running the text encoder on CPU."""
    margin_gb: float | None = None
    """GB kept free on every GPU below its memory; None → max(1.5, 6.25 % of the memory)
    (24 GB → peaks up to 22.5 GB)."""

    _count = between(1, 64, "gpus", "layers")
    _resolution = between(256, 4096, "resolution")

    @field_validator("gpu_memory_gb")
    @classmethod
    def _memory(cls, value: float, info: ValidationInfo) -> float:
        if not (0 < value < float("inf")):  # also rejects NaN
            raise ValueError(f"{info.field_name} must be a finite number > 0, got {value}")
        return value

    @field_validator("gpu_resource")
    @classmethod
    def _resource(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (not value.strip() or value in ("CPU", "GPU", "memory")):
            raise ValueError(f"{info.field_name} must be a custom resource name, got {value!r}")
        return value

    @field_validator("margin_gb")
    @classmethod
    def _margin(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not (0 <= value < float("inf")):
            raise ValueError(f"{info.field_name} must be a finite number >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _margin_below_memory(self) -> PlacementConfig:
        if self.margin_gb is not None and self.margin_gb >= self.gpu_memory_gb:
            raise ValueError(f"margin_gb must be below gpu_memory_gb ({self.gpu_memory_gb}), got {self.margin_gb}")
        return self

    @property
    def margin(self) -> float:
        """The margin in GB actually kept (the default resolved)."""
        return self.margin_gb if self.margin_gb is not None else max(1.5, 0.0625 * self.gpu_memory_gb)

    @property
    def shape(self) -> str:
        """`2x24` style text of the budget."""
        return f"{self.gpus}x{self.gpu_memory_gb:g}"


def parse_gpus(text: str) -> tuple[int, float]:
    """`"2x24"` → (2, 24.0): GPU count × memory per GPU in GB. Raises ValueError naming the text."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+(?:\.\d+)?)\s*(?:GB|gb)?\s*", text or "")
    if not match or int(match.group(1)) < 1 or float(match.group(2)) <= 0:
        raise ValueError(f"GPUs must look like COUNTxGB (e.g. 2x24), got {text!r}")
    return int(match.group(1)), float(match.group(2))


class DoesNotFit(ValueError):
    """No placement fits the budget; `smallest` is the smallest configuration that would (the same
    options on more or larger cards, else with fp8/offload allowed), None when none does."""

    def __init__(self, reason: str, smallest: PlacementConfig | None):
        super().__init__(reason)
        self.reason = reason
        self.smallest = smallest


# --------------------------------------------------------------------------------------------
# component sizes (meta device, never weights)


@dataclass(frozen=True)
class ComponentSize:
    """What the planner needs to know about one component, counted from its config."""

    name: str
    params: int
    """Parameters (buffers not included)."""
    bytes_bf16: int
    """Weights and buffers in bf16."""
    bytes_fp8: int
    """Weights and buffers after fp8 layerwise casting (layers diffusers skips stay bf16)."""
    blocks: int
    """Repeated blocks: the largest ModuleList (transformer blocks, text decoder layers)."""
    block_bytes_bf16: int
    block_bytes_fp8: int
    largest_layer_bytes: int
    """Largest single Linear/Conv/Embedding in bf16: what one group-offload leaf brings onto the
    GPU, and the transient bf16 copy fp8 layerwise casting makes while that layer runs."""
    hidden_size: int
    """Transformer inner dim, text hidden size, or VAE base_dim."""
    dims: tuple[tuple[str, float], ...] = ()
    """Other config numbers the activation formulas read (see `dim`)."""

    def dim(self, key: str, default: float = 0.0) -> float:
        return dict(self.dims).get(key, default)

    def weight_bytes(self, dtype: Dtype) -> int:
        return self.bytes_fp8 if dtype == FP8 else self.bytes_bf16

    def block_bytes(self, dtype: Dtype) -> int:
        return self.block_bytes_fp8 if dtype == FP8 else self.block_bytes_bf16

    def nonblock_bytes(self, dtype: Dtype) -> int:
        return self.weight_bytes(dtype) - self.blocks * self.block_bytes(dtype)


def _model_dir(model: str | Path) -> Path:
    if isinstance(model, str) and model in TASK_MODELS.values():
        return MODEL_CONFIGS / model
    directory = Path(model).expanduser()
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model {str(model)!r} is neither one of {sorted(TASK_MODELS.values())} nor a local diffusers "
            "directory (no model_index.json)"
        )
    return directory


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # The published text-encoder config predates transformers 5's rope_parameters; the warnings
    # it prints on load say nothing about sizes.
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _fp8_cast_params(module, patterns: tuple[str, ...]) -> set[str]:
    """Names of the parameters diffusers' layerwise casting stores in fp8: the same walk as
    `diffusers.hooks.layerwise_casting._apply_layerwise_casting` (skip a module whose dotted name
    matches a pattern, cast a supported layer whole, else recurse)."""
    try:
        from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS as supported
    except ImportError:  # private name; the same tuple in diffusers 0.42.1
        import torch

        supported = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                     torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Linear, torch.nn.Embedding)
    cast: set[str] = set()

    def walk(mod, prefix: str) -> None:
        if prefix and any(re.search(pattern, prefix) for pattern in patterns):
            return
        if isinstance(mod, supported):
            cast.update(f"{prefix}.{name}" if prefix else name for name, _ in mod.named_parameters())
            return
        for name, child in mod.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(module, "")
    return cast


def _measure(name: str, module, patterns: tuple[str, ...], hidden_size: int, dims: dict[str, float]) -> ComponentSize:
    import torch

    cast = _fp8_cast_params(module, patterns)
    param_bytes = {n: (p.numel(), n in cast, p.is_floating_point()) for n, p in module.named_parameters()}
    buffer_bytes = sum(b.numel() * (2 if b.is_floating_point() else b.element_size()) for b in module.buffers())

    def total(prefix: str, fp8: bool) -> int:
        size = 0
        for n, (numel, is_cast, floating) in param_bytes.items():
            if n.startswith(prefix):
                size += numel * (1 if fp8 and is_cast else 2 if floating else 4)
        return size

    lists = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    blocks, block_prefix = 0, None
    if lists:
        list_name, biggest = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
        blocks, block_prefix = len(biggest), f"{list_name}.0."
    supported = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d, torch.nn.Conv3d)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) * 2 for m in module.modules()
                   if isinstance(m, supported)), default=0)
    return ComponentSize(
        name=name,
        params=sum(numel for numel, _, _ in param_bytes.values()),
        bytes_bf16=total("", False) + buffer_bytes,
        bytes_fp8=total("", True) + buffer_bytes,
        blocks=blocks,
        block_bytes_bf16=total(block_prefix, False) if block_prefix else 0,
        block_bytes_fp8=total(block_prefix, True) if block_prefix else 0,
        largest_layer_bytes=largest,
        hidden_size=hidden_size,
        dims=tuple(sorted(dims.items())),
    )


@functools.lru_cache(maxsize=8)
def _component_sizes(directory: str) -> dict[str, ComponentSize]:
    import diffusers
    import torch
    import transformers
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    root = Path(directory)
    index = json.loads((root / "model_index.json").read_text())
    sizes: dict[str, ComponentSize] = {}
    for name in COMPONENTS:
        library, class_name = index[name]
        sub = root / name
        if library == "diffusers":
            cls = getattr(diffusers, class_name)
            config = cls.load_config(sub)
            with torch.device("meta"):
                module = cls.from_config(config)
            # what ModelMixin.enable_layerwise_casting adds to the default skip patterns
            patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(module._keep_in_fp32_modules or ()) + tuple(
                module._skip_layerwise_casting_patterns or ()
            )
        else:
            cls = getattr(transformers, class_name)
            with _quiet_transformers():
                config = transformers.AutoConfig.from_pretrained(sub, local_files_only=True)
                with torch.device("meta"):
                    module = cls._from_config(config)
            patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN)  # apply_layerwise_casting(..., "auto")
        cfg = module.config
        if name == "transformer":
            hidden = int(cfg.num_attention_heads * cfg.attention_head_dim)
            dims = {"zero_cond_t": float(bool(getattr(cfg, "zero_cond_t", False)))}
        elif name == "text_encoder":
            text = getattr(cfg, "text_config", cfg)
            vision = cfg.vision_config
            hidden = int(text.hidden_size)
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            dims = {
                "layers": text.num_hidden_layers,
                "vocab": text.vocab_size,
                "kv_bytes_per_token": 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2,
                "vision_hidden": vision.hidden_size,
                "vision_intermediate": vision.intermediate_size,
            }
        else:
            hidden = int(cfg.base_dim)
            dims = {"input_channels": float(getattr(cfg, "input_channels", 3)), "z_dim": float(cfg.z_dim)}
        sizes[name] = _measure(name, module, patterns, hidden, dims)
        del module
    return sizes


def component_sizes(model: str | Path) -> dict[str, ComponentSize]:
    """Sizes of transformer, text_encoder and vae of `model`: `qwen-image-edit-2511` or
    `qwen-image-layered` (the stored published configs) or a local diffusers directory. Each is
    built from its config on the meta device (no memory, no weights); cached per directory."""
    return dict(_component_sizes(str(_model_dir(model).resolve())))


# --------------------------------------------------------------------------------------------
# activation model: one small function per component and phase, bytes


def image_tokens(task: Task, resolution: int, layers: int) -> int:
    """Image tokens the transformer sees: `real` = output frame + the condition image (resized by
    the pipeline to ~1 MP whatever the output size); `layers` = (layers + 1) frames denoised (frame
    0 is the re-generated whole image) + the condition image, all at the bucket area."""
    frame = (resolution // TOKEN_PIXELS) ** 2
    if task == "real":
        return frame + EDIT_CONDITION_PIXELS // TOKEN_PIXELS**2
    return (layers + 2) * frame


def transformer_activation_bytes(size: ComponentSize, image: int, text: int) -> float:
    """Peak transients of one transformer call (batch 1: the pipelines run the CFG passes one
    after the other, not as a doubled batch). Attention is memory-efficient (SDPA flash/efficient:
    no tokens² matrix; batch-1 prompts are unpadded, so no mask is passed). Linear in tokens."""
    units = DIT_IMAGE_TOKEN_UNITS + DIT_ZERO_COND_EXTRA_UNITS * size.dim("zero_cond_t")
    return (units * image + DIT_TEXT_TOKEN_UNITS * text) * size.hidden_size * 2


def text_encoder_activation_bytes(size: ComponentSize, tokens: int, vision_patches: int, *, generate: bool) -> float:
    """Peak transients of the text encoder. Prompt encoding runs one forward with
    `output_hidden_states=True`: logits over the vocabulary and every layer's hidden states stay
    alive. Captioning (`generate=True`) keeps a KV cache and only the last position's logits. The
    vision tower runs first, on its own patches."""
    hidden = size.hidden_size
    per_token = TE_TOKEN_UNITS * hidden * 2
    if generate:
        per_token += size.dim("kv_bytes_per_token")
    else:
        per_token += size.dim("vocab") * 2 + (size.dim("layers") + 1) * hidden * 2
    unit_h, unit_i = VISION_PATCH_BYTES_UNITS
    vision = vision_patches * (unit_h * size.dim("vision_hidden") + unit_i * size.dim("vision_intermediate")) * 2
    return max(tokens * per_token, vision)


def vae_decode_bytes(size: ComponentSize, pixels: int, frames: int, tiled: bool) -> float:
    """Peak of decoding `frames` frames of `pixels` each one frame at a time (slicing): the decoder
    at full resolution grows with pixels, its mid-block attention with pixels² (the larger of the
    two is the peak: they are not alive together); tiling bounds both by the tile. Plus the
    decoded frames held while the pipeline denormalises them."""
    scale = size.hidden_size / 96
    if tiled:
        fixed, per_pixel = VAE_TILED_DECODE_BYTES
        one = scale * (fixed + per_pixel * pixels)
    else:
        one = max(scale * VAE_DECODE_BYTES_PER_PIXEL * pixels, VAE_ATTENTION_BYTES_PER_TOKEN2 * (pixels / 64) ** 2)
    output = VAE_OUTPUT_COPIES * frames * size.dim("input_channels", 3) * pixels * 2
    return one + output


def vae_encode_bytes(size: ComponentSize, pixels: int, tiled: bool) -> float:
    """Peak of encoding one frame: the encoder's full-resolution stages, or its mid-block attention
    on top of the causal-conv caches still alive then; tiling bounds it by the tile."""
    scale = size.hidden_size / 96
    if tiled:
        fixed, per_pixel = VAE_TILED_ENCODE_BYTES
        return scale * (fixed + per_pixel * pixels)
    attention = scale * VAE_ENCODE_CACHE_BYTES_PER_PIXEL * pixels + VAE_ATTENTION_BYTES_PER_TOKEN2 * (pixels / 64) ** 2
    return max(scale * VAE_ENCODE_BYTES_PER_PIXEL * pixels, attention)


def _vision_patches(pixels: int) -> int:
    return int(pixels / VISION_PATCH_PIXELS**2)


def phase_transients(
    task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize], tiled: bool
) -> dict[str, float]:
    """Transient bytes of each phase on the GPU that runs it, before any dtype/offload extras:
    `encode_prompt`, `caption` (layers), `encode_image` and `decode` (VAE), `denoise`."""
    pixels = config.resolution**2
    te, vae = sizes["text_encoder"], sizes["vae"]
    phases: dict[str, float] = {}
    if task == "real":
        phases["encode_prompt"] = text_encoder_activation_bytes(
            te, TEXT_TOKENS, _vision_patches(EDIT_CONDITION_TEXT_PIXELS), generate=False
        )
        phases["encode_image"] = vae_encode_bytes(vae, EDIT_CONDITION_PIXELS, tiled)
        phases["decode"] = vae_decode_bytes(vae, pixels, 1, tiled)
    else:
        patches = _vision_patches(pixels)
        tokens = patches // 4 + CAPTION_EXTRA_TOKENS  # 2×2 patches merge into one token
        phases["caption"] = text_encoder_activation_bytes(te, tokens, patches, generate=True)
        phases["encode_prompt"] = text_encoder_activation_bytes(te, TEXT_TOKENS, 0, generate=False)
        phases["encode_image"] = vae_encode_bytes(vae, pixels, tiled)
        phases["decode"] = vae_decode_bytes(vae, pixels, config.layers, tiled)
    phases["denoise"] = transformer_activation_bytes(
        sizes["transformer"], image_tokens(task, config.resolution, config.layers), TEXT_TOKENS
    )
    return phases


# --------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class ComponentPlan:
    """Where one component lives and in what form."""

    gpus: tuple[int, ...]
    """GPU indices (within the replica) holding it; empty: it runs on the CPU."""
    dtype: Dtype
    offload: Offload
    """`none`: resident on its GPU(s); `group`: weights in CPU memory, streamed to the GPU as it runs
    (all of them for the text encoder, `streamed_blocks` blocks for the transformer); `cpu`: runs
    on the CPU."""
    weights_gb: tuple[float, ...]
    """Resident weights on each GPU of `gpus`, same order."""
    cpu_weights_gb: float = 0.0
    """Weights kept in host memory (streamed, or the whole component when it runs on CPU)."""
    blocks: tuple[int, ...] = ()
    """Transformer only: its resident blocks on each GPU of `gpus` (one entry when whole, several
    when split at block boundaries); empty for the other components."""
    streamed_blocks: int = 0
    """Transformer blocks kept on CPU and streamed to the GPU on every call."""

    def device_text(self) -> str:
        if not self.gpus:
            return "CPU"
        text = "GPU " + ",".join(str(g) for g in self.gpus)
        if len(self.blocks) > 1:
            text += " (blocks " + "+".join(str(b) for b in self.blocks) + ")"
        return text


@dataclass(frozen=True)
class Plan:
    """Placement of one replica's pipeline; see the module docstring."""

    task: Task
    gpus: int
    """GPUs the replica owns (the budget)."""
    gpu_memory_gb: float
    margin_gb: float
    resolution: int
    layers: int | None
    gpus_used: int
    transformer: ComponentPlan
    text_encoder: ComponentPlan
    vae: ComponentPlan
    vae_tiling: bool
    vae_slicing: bool
    """Decode the frames one at a time (`layers`: every layer is a frame)."""
    peak_gb: tuple[float, ...]
    """Predicted peak of each used GPU."""
    peak_phase: tuple[str, ...]
    """The phase that sets each GPU's peak."""
    strategy: str

    @property
    def components(self) -> dict[str, ComponentPlan]:
        return {"transformer": self.transformer, "text_encoder": self.text_encoder, "vae": self.vae}

    @property
    def usable_gb(self) -> float:
        """What a GPU's peak may reach: memory minus margin."""
        return self.gpu_memory_gb - self.margin_gb

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in COMPONENTS:
            data[name] = {key: list(value) if isinstance(value, tuple) else value for key, value in data[name].items()}
        data["peak_gb"], data["peak_phase"] = list(self.peak_gb), list(self.peak_phase)
        data["usable_gb"] = self.usable_gb
        return data

    def describe(self) -> str:
        layers = f", {self.layers} layers" if self.task == "layers" else ""
        lines = [
            f"plan: {self.task}, {self.resolution} px{layers} on {self.gpus}x{self.gpu_memory_gb:g} GB "
            f"(uses {self.gpus_used} GPU{'s' if self.gpus_used > 1 else ''})",
            f"strategy: {self.strategy}",
            "",
            f"{'component':<13} {'device(s)':<22} {'dtype':<14} {'offload':<17} {'GPU GB':>7} {'CPU GB':>7}",
        ]
        for name, part in self.components.items():
            offload = part.offload if not part.streamed_blocks else f"group ({part.streamed_blocks} blocks)"
            lines.append(
                f"{name:<13} {part.device_text():<22} {part.dtype:<14} {offload:<17} "
                f"{sum(part.weights_gb):>7.2f} {part.cpu_weights_gb:>7.2f}"
            )
        on = {True: "on", False: "off"}
        lines.append(f"vae tiling: {on[self.vae_tiling]}, vae slicing: {on[self.vae_slicing]}")
        lines += ["", f"{'GPU':<4} {'peak GB':>8} {'budget GB':>10} {'margin GB':>10} {'free GB':>8}  peak phase"]
        for gpu, (peak, phase) in enumerate(zip(self.peak_gb, self.peak_phase)):
            lines.append(
                f"{gpu:<4} {peak:>8.2f} {self.gpu_memory_gb:>10.1f} {self.margin_gb:>10.2f} "
                f"{self.usable_gb - peak:>8.2f}  {phase}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Recipe:
    transformer: Dtype
    text_encoder: Dtype
    text_offload: Offload
    stream: bool

    def uses_fp8(self) -> bool:
        return FP8 in (self.transformer, self.text_encoder)

    def uses_offload(self) -> bool:
        return self.text_offload != "none" or self.stream


def _recipes(allow_fp8: bool, allow_offload: bool) -> list[_Recipe]:
    """Candidates from best to worst (quality first, then speed)."""
    ladder = [
        _Recipe(BF16, BF16, "none", False),
        _Recipe(FP8, BF16, "none", False),
        _Recipe(FP8, FP8, "none", False),
    ]
    for text_offload in ("group", "cpu"):
        for stream in (False, True):
            ladder += [_Recipe(BF16, BF16, text_offload, stream), _Recipe(FP8, BF16, text_offload, stream)]
    return [r for r in ladder if (allow_fp8 or not r.uses_fp8()) and (allow_offload or not r.uses_offload())]


@dataclass
class _Card:
    resident: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def peak(self) -> tuple[float, str]:
        phase, transient = max(self.phases.items(), key=lambda item: item[1], default=("idle", 0.0))
        return self.resident + transient, phase


def _layout(
    task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize], recipe: _Recipe, n: int, tiled: bool
) -> Plan | None:
    """Place `recipe` on exactly `n` GPUs, or None. Text encoder and VAE share the last GPU; the
    transformer fills GPUs from the first, whole when it fits, else split at block boundaries
    (evenly over the GPUs that hold only transformer blocks); on one GPU, blocks that do not fit
    are streamed when the recipe allows."""
    if recipe.stream and n > 1:
        return None  # streaming is the one-card fallback; with more cards, splitting is the answer
    limit = (config.gpu_memory_gb - config.margin) * GB
    t, te, vae = sizes["transformer"], sizes["text_encoder"], sizes["vae"]
    act = phase_transients(task, config, sizes, tiled)
    cards = [_Card() for _ in range(n)]
    last = cards[-1]

    # text encoder and VAE on the last card
    if recipe.text_offload != "cpu":
        # a streamed leaf, or the bf16 copy of an fp8 layer while it runs
        extra = te.largest_layer_bytes if (recipe.text_offload == "group" or recipe.text_encoder == FP8) else 0
        if recipe.text_offload == "none":
            last.resident += te.weight_bytes(recipe.text_encoder)
        for phase in ("encode_prompt", "caption"):
            if phase in act:
                last.phases[phase] = act[phase] + extra
    last.resident += vae.bytes_bf16
    last.phases["encode_image"] = act["encode_image"]
    last.phases["decode"] = act["decode"]

    # transformer: non-block layers on the first card, blocks greedily from the first card on
    dtype = recipe.transformer
    block = t.block_bytes(dtype)
    denoise = act["denoise"] + (t.largest_layer_bytes if dtype == FP8 else 0)
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
    only = [i for i in range(n - 1) if alloc[i]]
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
    used = [i for i in range(n) if alloc[i] or i in (0, n - 1)]
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
    )
    te_bytes = te.weight_bytes(recipe.text_encoder)
    if recipe.text_offload == "none":
        text_encoder = ComponentPlan((n - 1,), recipe.text_encoder, "none", (round(te_bytes / GB, 3),))
    elif recipe.text_offload == "group":
        text_encoder = ComponentPlan((n - 1,), recipe.text_encoder, "group", (0.0,), round(te_bytes / GB, 3))
    else:
        text_encoder = ComponentPlan((), recipe.text_encoder, "cpu", (), round(te_bytes / GB, 3))
    vae_plan = ComponentPlan((n - 1,), BF16, "none", (round(vae.bytes_bf16 / GB, 3),))
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
        strategy=_strategy_text(transformer, text_encoder, tiled),
    )


def _strategy_text(transformer: ComponentPlan, text_encoder: ComponentPlan, tiled: bool) -> str:
    t = "fp8 transformer (layerwise casting)" if transformer.dtype == FP8 else "bf16 transformer"
    if len(transformer.gpus) > 1:
        t += f" split over GPUs {','.join(map(str, transformer.gpus))}"
    else:
        t += f" on GPU {transformer.gpus[0]}"
    if transformer.streamed_blocks:
        t += f", {transformer.streamed_blocks} blocks streamed from CPU"
    te = "fp8 text encoder" if text_encoder.dtype == FP8 else "bf16 text encoder"
    if text_encoder.offload == "group":
        te += f" streamed from CPU to GPU {text_encoder.gpus[0]} (group offload)"
    elif text_encoder.offload == "cpu":
        te += " on CPU"
    else:
        te += f" + VAE on GPU {text_encoder.gpus[0]}"
    return f"{t}; {te}" + ("; VAE tiling" if tiled else "")


def _search(task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize]) -> Plan | None:
    forced_tiling = config.resolution**2 > VAE_TILING_ABOVE_PIXELS
    for recipe in _recipes(config.allow_fp8, config.allow_offload):
        for n in range(1, config.gpus + 1):
            for tiled in ((True,) if forced_tiling else (False, True)):
                placed = _layout(task, config, sizes, recipe, n, tiled)
                if placed is not None:
                    return placed
    return None


def _smallest(
    task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize]
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
            if _search(task, candidate, sizes) is not None:
                found.append((f"{count}x{memory:g} GB " + (label or "as configured"), candidate))
                break
    return found


def plan(task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize] | None = None) -> Plan:
    """The best placement of `task`'s pipeline on `config`'s GPUs; raises DoesNotFit."""
    if task not in TASK_MODELS:
        raise ValueError(f"task must be one of {sorted(TASK_MODELS)}, got {task!r}")
    sizes = sizes if sizes is not None else component_sizes(TASK_MODELS[task])
    missing = [name for name in COMPONENTS if name not in sizes]
    if missing:
        raise ValueError(f"sizes lack {missing}")
    found = _search(task, config, sizes)
    if found is not None:
        return found
    alternatives = _smallest(task, config, sizes)
    t = sizes["transformer"]
    smallest_t = FP8 if config.allow_fp8 else BF16
    need = t.weight_bytes(smallest_t) / GB
    denoise = phase_transients(task, config, sizes, True)["denoise"] / GB
    layers = f", {config.layers} layers" if task == "layers" else ""
    options = f"fp8 {'allowed' if config.allow_fp8 else 'off'}, offload {'allowed' if config.allow_offload else 'off'}"
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


def ray_options(plan: Plan, config: PlacementConfig, num_cpus: float) -> dict[str, Any]:
    """Ray Serve deployment options that give one replica exactly the GPUs `plan` uses."""
    gpus = plan.gpus_used
    actor: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": gpus}
    if config.gpu_resource:
        actor["resources"] = {config.gpu_resource: gpus}
    options: dict[str, Any] = {"ray_actor_options": actor}
    if gpus > 1:
        # ONE bundle holding every GPU: Ray puts only the GPUs of the replica's own bundle in its
        # CUDA_VISIBLE_DEVICES, so a bundle per GPU would hide all but one of them from the
        # process. STRICT_PACK keeps the bundle (and the replica) on one node.
        bundle: dict[str, float] = {"CPU": num_cpus, "GPU": gpus}
        if config.gpu_resource:
            bundle[config.gpu_resource] = gpus
        options["placement_group_bundles"] = [bundle]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


# ============================================================================================
# applying a plan to a loaded pipeline (the only part that touches torch modules)


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
    from diffusers.hooks import apply_group_offloading, apply_layerwise_casting

    devices = devices or [f"cuda:{i}" for i in range(plan.gpus_used)]
    if len(devices) < plan.gpus_used:
        raise ValueError(f"the plan uses {plan.gpus_used} GPUs, got devices {devices}")
    device = [torch.device(d) for d in devices]
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    for name in COMPONENTS:  # the plan's sizes are bf16 weights (a no-op when loaded in bf16)
        getattr(pipe, name).to(bf16)

    # text encoder (first: group offloading refuses modules that already carry accelerate hooks)
    te_plan, te = plan.text_encoder, pipe.text_encoder
    if te_plan.dtype == FP8:
        _cast_fp8(te, lambda: apply_layerwise_casting(te, fp8, bf16, skip_modules_pattern="auto"))
    if te_plan.offload == "group":
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
    if t_plan.dtype == FP8:
        _cast_fp8(t, lambda: t.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=bf16))
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
        "text_encoder": devices[te_plan.gpus[0]] if te_plan.gpus else "cpu",
        "vae": devices[plan.vae.gpus[0]],
    }
    execution = torch.device(pipe._execution_device)
    if execution != vae_device and not (execution.type == vae_device.type == "cpu"):
        raise RuntimeError(f"pipeline executes on {execution}, but its VAE is on {vae_device}")


__all__ = [
    "GB",
    "ComponentPlan",
    "ComponentSize",
    "DoesNotFit",
    "Plan",
    "PlacementConfig",
    "component_sizes",
    "parse_gpus",
    "place_pipeline",
    "plan",
    "ray_options",
]
