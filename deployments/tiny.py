"""Builds tiny random-weight Qwen-Image pipelines (same classes as the real models) for tests and the
offline demo profile; writes them in diffusers layout into a directory; never downloads. The
classes are ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509/2511) and
``QwenImageLayeredPipeline`` (Qwen-Image-Layered); their outputs are noise, but every code path of
the real pipelines runs (Qwen2.5-VL prompt encoding with the processor, VAE encode/decode, MMDiT
transformer, flow-matching scheduler, true CFG, LoRA loading), and they load like a real local
checkout (``deployments.checkpoints.load_pipeline``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

from deployments.cachedir import build_once
from deployments.checkpoints import Kind, NoVideoProcessor, pipeline_class

#: Bump when the tiny architecture/configs below change, so cached directories are rebuilt.
TINY_VERSION = "v1"

#: Special tokens of the Qwen2.5-VL tokenizer that the Qwen-Image pipelines rely on.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Scheduler config of the real Qwen-Image / Qwen-Image-Edit(-2509/-2511) checkpoints
#: (``scheduler/scheduler_config.json``). ``use_dynamic_shifting`` is required: both pipelines
#: pass ``mu`` to ``set_timesteps``. Qwen-Image-Layered computes its own ``mu`` and ignores
#: base/max shift.
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


# --------------------------------------------------------------------------------------------
# building


def _tiny_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


def _tiny_text_encoder(tokenizer, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default"},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 16,
            "fullatt_block_indexes": [1],
            # patch_size 14, temporal_patch_size 2, spatial_merge_size 2: as the real model and the
            # processor expect
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _tiny_processor(tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return NoVideoProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)


def _tiny_vae(seed: int, *, input_channels: int, z_dim: int):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    # Three downsampling stages (like the real VAE): vae_scale_factor 8, so the pipelines align
    # sizes to the same multiple (16) and the latent grid has the same geometry as the real model.
    return AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        input_channels=input_channels,
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    ).eval()


def _tiny_transformer(seed: int, *, z_dim: int, layered: bool):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    # flags of the real checkpoints: Qwen-Image-Layered's, and Qwen-Image-Edit-2511's zero_cond_t
    # (condition-image tokens modulated with timestep 0)
    extra = {"use_additional_t_cond": True, "use_layer3d_rope": True} if layered else {"zero_cond_t": True}
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=z_dim * 4,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,  # == text encoder hidden size
        axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim
        **extra,
    ).eval()


def _tiny_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)


def _build(kind: Kind, seed: int):
    tokenizer = _tiny_tokenizer()
    if kind == "edit":
        vae = _tiny_vae(seed, input_channels=3, z_dim=4)
        transformer = _tiny_transformer(seed, z_dim=4, layered=False)
    else:
        # RGBA VAE; z_dim must differ from 4, or a 4-channel image is mistaken for latents.
        vae = _tiny_vae(seed, input_channels=4, z_dim=8)
        transformer = _tiny_transformer(seed, z_dim=8, layered=True)
    return pipeline_class(kind)(
        scheduler=_tiny_scheduler(),
        vae=vae,
        text_encoder=_tiny_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        processor=_tiny_processor(tokenizer),
        transformer=transformer,
    )


def build_tiny_edit_pipeline(seed: int = 0):
    """A tiny random ``QwenImageEditPlusPipeline`` (the Qwen-Image-Edit-2509/2511 pipeline class).

    Deterministic given ``seed``: every component is built after ``torch.manual_seed(seed)``.
    RGB in, RGB out; ``pipe.vae_scale_factor == 8`` as in the real model.
    """
    return _build("edit", seed)


def build_tiny_layered_pipeline(seed: int = 0):
    """A tiny random ``QwenImageLayeredPipeline`` (RGBA VAE with ``z_dim=8``).

    Deterministic given ``seed``. Feed it RGBA images (an RGB image fails in the 4-channel VAE).
    """
    return _build("layered", seed)


def save_tiny(pipe, directory: Path) -> None:
    """Write ``pipe`` in diffusers layout into ``directory``.

    ``save_pretrained`` records the processor's defining module (ours) in ``model_index.json``; it
    is rewritten to ``["transformers", "Qwen2VLProcessor"]`` as in the real checkpoints (and so is
    ``processor_class`` in ``processor/processor_config.json``, which also gets the video processor
    entry that a stock ``Qwen2VLProcessor`` needs), so the directory looks and loads like a real
    one (see ``deployments.checkpoints.load_pipeline``).
    """
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)  # what `load_pipeline` reads (safetensors only)
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    processor_config_path = directory / "processor" / "processor_config.json"
    if processor_config_path.is_file():
        processor_config = json.loads(processor_config_path.read_text())
        processor_config["processor_class"] = "Qwen2VLProcessor"
        # A stock Qwen2VLProcessor (where torchvision exists) also wants a video processor config.
        image_config = processor_config.get("image_processor", {})
        processor_config.setdefault(
            "video_processor",
            {
                "video_processor_type": "Qwen2VLVideoProcessor",
                **{
                    key: image_config[key]
                    for key in ("image_mean", "image_std", "patch_size", "temporal_patch_size", "merge_size")
                    if key in image_config
                },
            },
        )
        processor_config_path.write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")


def tiny_dir(kind: Kind, cache_dir: Path) -> Path:
    """Where :func:`ensure_tiny` keeps the tiny pipeline of ``kind``."""
    pipeline_class(kind)  # validates kind
    return Path(cache_dir) / f"tiny-qwen-{kind}-{TINY_VERSION}"


def ensure_tiny(kind: Kind, cache_dir: Path) -> Path:
    """Return ``cache_dir / f"tiny-qwen-{kind}-v1"``, building and saving it first if missing.

    Safe when several processes call it at once (``deployments.cachedir.build_once``).
    """
    return build_once(
        tiny_dir(kind, Path(cache_dir)),
        lambda tmp: save_tiny(_build(kind, seed=0), tmp),
        lambda final: (final / "model_index.json").is_file(),
    )


# --------------------------------------------------------------------------------------------
# small sizes for tiny models


def set_condition_areas(vae_area: int, text_area: int) -> None:
    """Set the condition-image areas of ``QwenImageEditPlusPipeline`` (process-wide).

    diffusers resizes every input image of the edit pipeline, whatever the output size, to about
    ``VAE_IMAGE_SIZE`` pixels (default 1024*1024) for the VAE encode and ``CONDITION_IMAGE_SIZE``
    (default 384*384) for the text encoder, keeping the aspect ratio and rounding each side to 32.
    Both are module globals of ``diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus``, read
    at call time; this sets them for the whole process, for every pipeline instance. Only for tiny
    models: with tiny weights on CPU the 1024² VAE encode alone costs ~14 s per call. Never call it
    in a process that serves a real model: it changes what the real model sees.
    Restore the defaults with ``set_condition_areas(1024 * 1024, 384 * 384)``.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    if vae_area <= 0 or text_area <= 0:
        raise ValueError("areas must be positive")
    edit_plus.VAE_IMAGE_SIZE = int(vae_area)
    edit_plus.CONDITION_IMAGE_SIZE = int(text_area)


DEFAULT_VAE_AREA = 1024 * 1024
DEFAULT_TEXT_AREA = 384 * 384


@contextlib.contextmanager
def small_layered_sizes(edge_per_640: int = 64) -> Iterator[None]:
    """Within the block, make ``QwenImageLayeredPipeline`` work at a small size (process-wide).

    The layered pipeline has no height/width arguments: the output and condition size come from
    ``calculate_dimensions(resolution**2, aspect)`` in
    ``diffusers.pipelines.qwenimage.pipeline_qwenimage_layered`` (``resolution`` asserted to be
    640 or 1024). This patches that module function so the target area is scaled by
    ``(edge_per_640 / 640)**2``: with the default, ``resolution=640`` gives ~64² and
    ``resolution=1024`` ~102² pixels. The bucket semantics remain: aspect ratio kept, sides
    rounded to 32 (then floored to the pipeline's multiple, 16), the larger bucket gives the
    larger image. Only for tiny models and tests; the original is restored on exit. Not safe to
    use from concurrent threads.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as layered

    original = layered.calculate_dimensions
    scale = edge_per_640 / 640

    def scaled(target_area, ratio):
        width, height = original(target_area * scale * scale, ratio)
        return max(width, 32), max(height, 32)

    layered.calculate_dimensions = scaled
    try:
        yield
    finally:
        layered.calculate_dimensions = original


__all__ = [
    "DEFAULT_TEXT_AREA",
    "DEFAULT_VAE_AREA",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "build_tiny_edit_pipeline",
    "build_tiny_layered_pipeline",
    "ensure_tiny",
    "save_tiny",
    "set_condition_areas",
    "small_layered_sizes",
    "tiny_dir",
]
