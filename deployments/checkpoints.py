"""Loads a Qwen-Image pipeline from a local diffusers directory (a real checkout or a tiny one);
never downloads. The one place that maps a model kind to its diffusers pipeline class.

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


def load_pipeline(kind: Kind, directory: Path, torch_dtype: torch.dtype = torch.float32) -> Any:
    """Load a Qwen-Image pipeline of ``kind`` from a local diffusers directory; never downloads."""
    directory = Path(directory)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch_dtype}  # diffusers 0.42: not `torch_dtype`
    if not _torchvision_available():
        kwargs["processor"] = NoVideoProcessor.from_pretrained(directory / "processor", local_files_only=True)
    return pipeline_class(kind).from_pretrained(directory, **kwargs)
