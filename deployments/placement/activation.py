"""The activation model: transient bytes of each pipeline phase on the GPU that runs it.

Contract: small pure functions of a `ComponentSize` and token/pixel counts, one per component and
phase (`transformer_activation_bytes`, `text_encoder_activation_bytes`, `vae_decode_bytes`,
`vae_encode_bytes`), and `phase_transients`, which gives every phase of a task at a config. Bytes,
before any dtype/offload extras (the planner adds those). The coefficients come from tensor-shape
accounting on the meta device; those of the transformer and the text encoder are checked against a
CPU trace of full-width slices of the real modules (bench/activation_calibration.py), none on a
GPU. It never measures anything itself and never imports torch.
"""

from __future__ import annotations

from deployments.placement.config import PlacementConfig, Task
from deployments.placement.sizes import ComponentSize

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
# bench/activation_calibration.py traces the transformer and text encoder phases on CPU (torch
# memory profiler, full-width slices, random bf16 weights): the transformer coefficients predict
# 0.98-1.00 × the trace; the text-encoder ones below were corrected from it.

DIT_IMAGE_TOKEN_UNITS = 15.0
"""Transformer peak per image token, in units of hidden × 2 bytes (hidden 3072 → 92 kB/token).
Traced: Qwen-Image-Layered at 640/1024 px with 4/8 layers, 15.0-15.1."""
DIT_ZERO_COND_EXTRA_UNITS = 2.2
"""Edit-2511's `zero_cond_t` modulates condition tokens with their own timestep, so shift/scale/
gate become per-token tensors: traced 17.2 units per image token (106 kB) at 512/1024 px."""
DIT_TEXT_TOKEN_UNITS = 4.0
"""Transformer peak per text token (traced 2.3-4.0 units)."""
TE_ENCODE_TOKEN_UNITS = 3.0
"""Prompt encoding (one forward with `output_hidden_states`, as the pipelines call it): transients
per token besides the logits (vocab × 2), the kept hidden states (layers + 1) and the KV cache the
forward fills (use_cache is on), in units of hidden × 2 bytes. Traced on CPU (torch memory
profiler, full-width 2- and 4-layer slices, 1024 tokens, with the pipeline's own
`_get_qwen_prompt_embeds` cutting and stacking the last hidden state while the outputs live):
2.88-2.93 units, the same at both depths (bench/results/activation_calibration.json). The earlier 9
(meta tracing at full depth) held the 28-layer KV cache (8 units) as a constant, too high for
fewer layers."""
TE_PREFILL_TOKEN_UNITS = 20.0
"""Captioning (`generate`): the prefill's transients per token besides the KV cache, in units of
hidden × 2 bytes: the MLP's gate activation, up projection and their product (3 × intermediate,
15.9 units) alive together, plus the layer input, residual, norm and embeddings. Traced on CPU
(2- and 4-layer slices, 757 and 1597 tokens): 19.7-19.8 units whatever the depth (logits only for
the last position) (bench/results/activation_calibration.json). The earlier 9 was a
prompt-encoding figure and missed the MLP."""
VISION_MERGE = 4
"""Vision patches per text-side token (2×2 spatial merge)."""
VISION_PATCH_BYTES_UNITS = (10.0, 3.0)
"""Vision tower peak per patch: 10 × hidden + 3 × intermediate (× 2 bytes), counted by hand
(residual, norm, q/k/v, rotary q/k, attention out, MLP gate/up/act): ~46 kB per patch. Traced on
CPU (2-block tower, its last block full attention, 784-5476 patches): 46.53 kB per patch, 1.009 ×
the count (bench/results/activation_calibration.json)."""
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
    `output_hidden_states=True`: logits over the vocabulary, every layer's hidden states and the KV
    cache stay alive. Captioning (`generate=True`) peaks in the prefill, in the MLP of a layer, with
    the KV cache filling and only the last position's logits; the vision tower's last hidden state
    and the merged image features (twice: pooler_output and image_embeds) stay alive in
    Qwen2_5_VLModel.forward meanwhile. Generated tokens are counted like prompt tokens (an upper
    bound). The vision tower runs first, on its own patches."""
    hidden = size.hidden_size
    kv = size.dim("kv_bytes_per_token")
    if generate:
        kept = vision_patches * (size.dim("vision_hidden") + 2 * hidden / VISION_MERGE) * 2
        text = tokens * (TE_PREFILL_TOKEN_UNITS * hidden * 2 + kv) + kept
    else:
        logits_and_states = size.dim("vocab") * 2 + (size.dim("layers") + 1) * hidden * 2
        text = tokens * (TE_ENCODE_TOKEN_UNITS * hidden * 2 + kv + logits_and_states)
    unit_h, unit_i = VISION_PATCH_BYTES_UNITS
    vision = vision_patches * (unit_h * size.dim("vision_hidden") + unit_i * size.dim("vision_intermediate")) * 2
    return max(text, vision)


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
    task: Task, config: PlacementConfig, sizes: dict[str, ComponentSize], tiled: bool, vae_dtype: str = "bfloat16"
) -> dict[str, float]:
    """Transient bytes of each phase on the GPU that runs it, before any dtype/offload extras:
    `encode_prompt`, `caption` (layers), `encode_image` and `decode` (VAE, twice the bf16 figures
    with a float32 VAE), `denoise`."""
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
        tokens = patches // VISION_MERGE + CAPTION_EXTRA_TOKENS
        phases["caption"] = text_encoder_activation_bytes(te, tokens, patches, generate=True)
        phases["encode_prompt"] = text_encoder_activation_bytes(te, TEXT_TOKENS, 0, generate=False)
        phases["encode_image"] = vae_encode_bytes(vae, pixels, tiled)
        phases["decode"] = vae_decode_bytes(vae, pixels, config.layers, tiled)
    if vae_dtype == "float32":
        phases["encode_image"] *= 2
        phases["decode"] *= 2
    phases["denoise"] = transformer_activation_bytes(
        sizes["transformer"], image_tokens(task, config.resolution, config.layers), TEXT_TOKENS
    )
    return phases
