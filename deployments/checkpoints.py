"""Loads a Qwen-Image pipeline from a local diffusers directory (a real checkout or a tiny one);
never downloads, and reads weights from ``.safetensors`` only (``use_safetensors=True``: a component
that has only a pickled ``.bin``/``.pt`` checkpoint is an error naming the missing file, never an
unpickling). The one place that maps a model kind to its diffusers pipeline class.

`edit` is `QwenImageEditPlusPipeline` (Qwen-Image-Edit-2509/2511), `layered` is
`QwenImageLayeredPipeline` (Qwen-Image-Layered). Where torchvision is missing (no CPU build of it
here), the stock `Qwen2VLProcessor` cannot be built, so `NoVideoProcessor` is loaded in its place.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Qwen2VLProcessor

Kind = Literal["edit", "layered"]


class NoVideoProcessor(Qwen2VLProcessor):
    """A ``Qwen2VLProcessor`` without the video sub-processor.

    In transformers 5.x ``Qwen2VLProcessor`` insists on a video processor, which needs torchvision;
    there is no CPU torchvision build here. The Qwen-Image pipelines only ever pass images, so this
    subclass passes ``None`` for the video processor. Built fresh it gets a
    ``Qwen2VLImageProcessorPil``; loaded with ``NoVideoProcessor.from_pretrained(dir)`` from a
    directory written by a ``Qwen2VLProcessor`` (tiny or real), ``AutoImageProcessor`` resolves the
    saved ``Qwen2VLImageProcessor`` config to that same PIL backend when torchvision is missing.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def pipeline_class(kind: Kind) -> Any:
    """The diffusers pipeline class of `kind`."""
    from diffusers import QwenImageEditPlusPipeline, QwenImageLayeredPipeline

    classes = {"edit": QwenImageEditPlusPipeline, "layered": QwenImageLayeredPipeline}
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    return classes[kind]


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def load_pipeline(kind: Kind, directory: Path, torch_dtype: torch.dtype = torch.float32, **components: Any) -> Any:
    """Load a Qwen-Image pipeline of ``kind`` from a local diffusers directory; never downloads,
    weights from safetensors only. ``components`` replace what would be loaded (None: leave that
    component out)."""
    directory = Path(directory)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch_dtype}  # diffusers 0.42: not `torch_dtype`
    if not _torchvision_available() and "processor" not in components:
        # A processor has no weights (JSON configs and the tokenizer's files only).
        kwargs["processor"] = NoVideoProcessor.from_pretrained(directory / "processor", local_files_only=True)
    # use_safetensors=True reaches every diffusers and transformers component: none falls back to a pickle.
    return pipeline_class(kind).from_pretrained(directory, use_safetensors=True, **kwargs, **components)


def load_text_pipeline(kind: Kind, directory: Path, torch_dtype: torch.dtype = torch.float32,
                       text_encoder: Any = None) -> Any:
    """The pipeline of ``kind`` with its text parts only (text encoder, tokenizer, processor): what
    the text encoder stage runs ``encode_prompt`` and captions with. ``text_encoder``: an already
    loaded one to share. The VAE is not loaded, but its scale factor (which sizes the caption's
    image) is read from its config, as the whole pipeline would compute it."""
    import json

    from diffusers.image_processor import VaeImageProcessor

    shared = {"text_encoder": text_encoder} if text_encoder is not None else {}
    pipe = load_pipeline(kind, directory, torch_dtype, transformer=None, vae=None, **shared)
    vae = json.loads((Path(directory) / "vae" / "config.json").read_text())
    pipe.vae_scale_factor = 2 ** len(vae["temperal_downsample"])
    pipe.latent_channels = vae["z_dim"]
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2)
    return pipe


class EncoderElsewhere:
    """Stands in for the text encoder of a pipeline whose prompts are encoded by the text encoder
    stage: the layered pipeline reads only ``text_encoder.dtype`` (the dtype it casts its input
    image to), which is the dtype the encoder would have had here."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"EncoderElsewhere({self.dtype})"
