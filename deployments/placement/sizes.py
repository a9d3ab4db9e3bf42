"""Component sizes, counted from published configs on the meta device.

Contract: `component_sizes(model)` builds the transformer, text encoder and VAE of a stored
published config (`MODEL_CONFIGS`, named by `TASK_MODELS`) or of a local diffusers directory on
the meta device and returns a `ComponentSize` for each: parameters, bf16 and fp8 bytes, repeated
blocks, the largest layer, and the config numbers the activation model reads; cached per
directory. It never loads weights and never touches a GPU; torch, diffusers and transformers are
imported only when sizes are measured, never at module import.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from deployments.placement.config import FP8, Dtype

MODEL_CONFIGS = Path(__file__).parent.with_name("model_configs")
"""Published configs of the two models (no weights), see model_configs/SOURCE.md."""
TASK_MODELS: dict[str, str] = {"real": "qwen-image-edit-2511", "layers": "qwen-image-layered"}
COMPONENTS = ("transformer", "text_encoder", "vae")


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
