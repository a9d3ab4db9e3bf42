"""LayersModel deployment: image → N semantically separated RGBA layers with Qwen-Image-Layered.

Receives a `Prepared` RGBA array and resolved `LayersParams`, runs diffusers'
`QwenImageLayeredPipeline` and returns a `Generated` whose array holds all layers at once.
Knows nothing about HTTP, jobs or packaging (ZIP/PSD is `deployments.packaging`, called by
postprocess). The serving scaffold (construction vs `load()`, the model thread, the guarded
pipeline call) is `DiffusionModel`'s; this module holds what differs: buckets and captioning.

What the pipeline does (diffusers 0.42.1, `pipeline_qwenimage_layered.py`), and what follows here:

- **Size: a resolution bucket.** There are no height/width arguments. The output size is
  `calculate_dimensions(resolution², input_width / input_height)`: the bucket's area at the input's
  aspect, each side rounded to 32 (then floored to 16); `resolution` must be 640 or 1024 (asserted).
  The input is resized to that size too. So layers come back at the *bucket* size, not the input
  size (e.g. a 1024×683 upload at 640 gives 768×512 layers). They are returned as produced, never
  resized back: resizing RGBA layers resamples their alpha edges, and a designer wants the pixels
  the model made. `PreparedImage.size` keeps describing the input; `params["layer_size"]` records
  the layers' size, and postprocess must not resize this task's arrays.
- **Count and order.** The model denoises `layers + 1` frames; frame 0 (the re-generated whole
  image) is dropped before decoding, so `layers=N` gives exactly N RGBA images, index 0 at the
  bottom of the stack (the reference app stacks them in list order, the first at the back).
- **Prompt.** An empty prompt (None, "" or " ") makes the pipeline caption the image with its
  Qwen2.5-VL text encoder, in Chinese unless `use_en_prompt=True`. This class captions explicitly
  instead (same template, same bucket-size image, same processor; greedy decoding, at most
  `caption_max_new_tokens` new tokens where diffusers hardcodes 512) and passes the caption as the
  prompt, so the prompt actually used is recorded in `params["prompt"]`, costs its own stage time
  and is the same on every replica. The reference checkpoint's own generation config samples with
  top_k=1, which is greedy too.
- **Guidance.** CFG runs only when `true_cfg_scale > 1` *and* a negative prompt is given (two
  transformer passes per step); the default negative prompt is a blank " " (guidance on, nothing in
  particular avoided), as in the reference app. `cfg_normalize` rescales the guided prediction to the
  norm of the conditional one; the reference app and README enable it, diffusers' default is off.
- **Input.** The RGBA VAE takes 4 channels: RGBA stays RGBA (alpha preserved), RGB gets an opaque
  alpha (preprocess does it with `ImageSpec(alpha=True)`; a handle caller's RGB array is converted
  here). Preprocess only applies its long-edge limit (`multiple=1`): the pipeline resizes to the
  bucket itself, so aligning the sides first would only add a second resample and bend the aspect.

`Generated` for this task: `array` is ONE uint8 array of shape (N, H, W, 4): N straight-alpha RGBA
layers, bottom first, each H×W = the bucket size. `info` is the input's `PreparedImage`. `params`
holds the resolved parameters with the prompt actually used, plus `prompt_source`
(`request`/`caption`), `layer_size` ("WxH") and `task`. `served` holds the replica and the stage
times in seconds (`timings_s`: caption, encode_prompt, encode_image, denoise, decode, total), which
vary per run and so are never part of `params`.

Progress (jobs): `generate(..., progress)` reports the stages `encode_prompt` (the caption
included), `denoise` (with each finished step through `callback_on_step_end`) and `decode`, and
raises `Cancelled` between steps when `progress.step` says stop.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
from pydantic import field_validator, model_validator

from deployments.diffusion import DiffusionModel, step_callback, to_uint8
from deployments.diffusion_config import DiffusionConfig, DiffusionParams
from deployments.errors import InvalidParameter, ModelFailure
from deployments.postprocess import LAYER_FORMATS
from deployments.records import Conditioning, Generated, ImageSpec, Prepared, Progress
from deployments.task import Task
from deployments.validation import at_least

#: The buckets `QwenImageLayeredPipeline` accepts (it asserts `resolution in [640, 1024]`).
RESOLUTIONS: tuple[int, ...] = (640, 1024)
#: Used as the prompt when the caption comes out blank: the pipeline would caption again otherwise.
BLANK_CAPTION_PROMPT = "an image"


class LayersParams(DiffusionParams):
    """Per-request choices for `layers`; None means "use the configured default". A None or blank
    `prompt` makes the model caption the image itself."""

    prompt: str | None = None
    """The whole image's description; blank → the model captions the image."""
    layers: int | None = None
    """How many RGBA layers to return (1 … `max_layers`)."""
    resolution: int | None = None
    """Resolution bucket, 640 or 1024: the layers have about resolution² pixels at the input's aspect."""
    cfg_normalize: bool | None = None
    """Rescale the guided prediction to the conditional prediction's norm."""


class LayersModelConfig(DiffusionConfig):
    """The `layers` section: the LayersModel deployment's settings (the shared ones are documented
    on DiffusionConfig) and Serve options."""

    task: ClassVar[Literal["layers"]] = "layers"
    tiny_only: ClassVar[tuple[str, ...]] = ("tiny_edge",)

    default_steps: int = 50
    """Denoising steps when the request gives none."""
    resolutions: list[int] = list(RESOLUTIONS)
    """Resolution buckets a request may ask for: a subset of 640 and 1024 (the only two the
    pipeline accepts); a memory-tight profile can drop 1024."""
    default_resolution: int = 640
    """Bucket used when the request names none (the model's recommended one); one of `resolutions`."""
    default_layers: int = 4
    """Layers returned when the request gives no count."""
    max_layers: int = 10
    """Most layers a request may ask for (cost grows with layers + 1 frames per step)."""
    default_cfg_normalize: bool = True
    """`cfg_normalize` when the request does not say (the model's reference app enables it)."""
    caption_language: Literal["en", "zh"] = "en"
    """Language of the automatic caption made when the request has no prompt (the pipeline's
    `use_en_prompt`: English prompt template for `en`, Chinese for `zh`)."""
    caption_max_new_tokens: int = 512
    """Most tokens the automatic caption may have (diffusers hardcodes 512); bounds its latency."""
    tiny_edge: int | None = None
    """Tiny models only: shrink the resolution buckets so `resolution=640` gives about
    tiny_edge² pixels (and 1024 proportionally more) by patching diffusers' layered
    `calculate_dimensions` around each call (process-wide, `deployments.tiny.small_layered_sizes`).
    None keeps the real sizes. Never set it for a real model: it changes what the model sees."""

    _layers_positive = at_least(1, "default_layers", "max_layers", "caption_max_new_tokens", "tiny_edge")

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, value: list[int]) -> list[int]:
        if not value or any(r not in RESOLUTIONS for r in value) or len(set(value)) != len(value):
            raise ValueError(
                f"resolutions must be a non-empty list of distinct values from {list(RESOLUTIONS)}, got {value}"
            )
        return sorted(value)

    @model_validator(mode="after")
    def _layer_defaults_within_limits(self) -> LayersModelConfig:
        if self.default_resolution not in self.resolutions:
            raise ValueError(
                f"default_resolution must be one of resolutions {self.resolutions}, got {self.default_resolution}"
            )
        if self.default_layers > self.max_layers:
            raise ValueError(f"default_layers must be <= max_layers ({self.max_layers}), got {self.default_layers}")
        return self

    def check_placement_request(self) -> None:
        """The plan must hold the largest request this section admits."""
        if self.placement.layers < self.max_layers:
            raise ValueError(f"layers.placement.layers ({self.placement.layers}) must be >= layers.max_layers "
                             f"({self.max_layers}): a request may ask for that many")
        if self.placement.resolution < max(self.resolutions):
            raise ValueError(f"layers.placement.resolution ({self.placement.resolution}) must be >= the largest "
                             f"of layers.resolutions ({max(self.resolutions)})")

    def limits(self, catalog: Any = None) -> dict[str, dict[str, Any]]:
        return {
            **super().limits(),
            "layers": {"minimum": 1, "maximum": self.max_layers, "default": self.default_layers},
            "resolution": {"enum": list(self.resolutions), "default": self.default_resolution},
            "cfg_normalize": {"default": self.default_cfg_normalize},
        }

    def describe(self, catalog: Any = None) -> dict[str, Any]:
        """Defaults and limits a client may rely on (for `GET /v1/models`); loads nothing."""
        return {
            "resolutions": list(self.resolutions),
            "default_resolution": self.default_resolution,
            "default_layers": self.default_layers,
            "max_layers": self.max_layers,
            "default_steps": self.default_steps,
            "max_steps": self.max_steps,
            "default_cfg": self.default_cfg,
            "max_cfg": self.max_cfg,
            "default_cfg_normalize": self.default_cfg_normalize,
            "caption_language": self.caption_language,
            "max_prompt_chars": self.max_prompt_chars,
        }

    def resolve(self, params: LayersParams, catalog: Any = None) -> LayersParams:
        """Fill defaults and check ranges; raises InvalidParameter naming the field.

        A None or blank prompt resolves to "" (= caption the image); the caption itself is made
        by the model, which records it in `Generated.params["prompt"]`.
        """
        layers = self.default_layers if params.layers is None else params.layers
        resolution = self.default_resolution if params.resolution is None else params.resolution
        normalize = self.default_cfg_normalize if params.cfg_normalize is None else params.cfg_normalize
        prompt = "" if params.prompt is None or not params.prompt.strip() else params.prompt
        if resolution not in self.resolutions:
            allowed = " or ".join(str(r) for r in self.resolutions)
            raise InvalidParameter(f"must be {allowed}, got {resolution}", "resolution")
        if not 1 <= layers <= self.max_layers:
            raise InvalidParameter(f"must be between 1 and {self.max_layers}, got {layers}", "layers")
        common = self.resolve_common(params, prompt)
        return LayersParams(**common, layers=layers, resolution=resolution, cfg_normalize=normalize)


class LayersModel(DiffusionModel):
    """Qwen-Image-Layered (`QwenImageLayeredPipeline`): Prepared (RGBA) → Generated (N RGBA layers).

    `Generated.array` is a single uint8 array of shape (N, H, W, 4): the N layers, index 0 at the
    bottom of the stack, at the resolution bucket's size H×W (not the input's size; see the module
    docstring). `Generated.params["layer_size"]` is "WxH" of the layers; `Generated.info.size` is
    the input's.
    """

    input_spec = ImageSpec(multiple=1, alpha=True)
    task = "layers"
    kind = "layered"
    config_class = LayersModelConfig
    _sized = False

    # -- sizes -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sizes(self) -> Iterator[None]:
        """The tiny size patch around one call when `tiny_edge` is set; nothing otherwise.
        Re-entrant: inside it (the caption within a request), the sizes are patched once."""
        if self.config.tiny_edge is None or self._sized:
            yield
            return
        from deployments.tiny import small_layered_sizes

        self._sized = True
        try:
            with small_layered_sizes(self.config.tiny_edge):
                yield
        finally:
            self._sized = False

    def bucket_size(self, width: int, height: int, resolution: int) -> tuple[int, int]:
        """(width, height) the pipeline resizes a width×height input to, and its layers' size.

        Exactly the pipeline's computation: `calculate_dimensions(resolution², aspect)` (looked up
        in diffusers' module at call time, so the tiny size patch applies inside `sizes()`),
        sides rounded to 32, then floored to the VAE factor × 2 (16).
        """
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as layered

        bucket_w, bucket_h = layered.calculate_dimensions(resolution * resolution, width / height)
        multiple = self.pipe.vae_scale_factor * 2 if self.pipe is not None else 16
        return int(bucket_w) // multiple * multiple, int(bucket_h) // multiple * multiple

    # -- captioning ------------------------------------------------------------------------------
    def caption(self, image: Any, bucket: tuple[int, int]) -> str:
        """The pipeline's automatic caption of `image` (PIL RGBA), made explicitly.

        Same steps as `QwenImageLayeredPipeline.get_image_caption`: the image resized to the
        bucket size, the English or Chinese captioning template, the Qwen2.5-VL processor and
        text encoder; decoding is greedy and limited to `caption_max_new_tokens`.
        """
        import torch

        pipe = self.pipe
        prompt_image = pipe.image_processor.resize(image, bucket[1], bucket[0])
        template = pipe.image_caption_prompt_en if self.config.caption_language == "en" else pipe.image_caption_prompt_cn
        inputs = pipe.vl_processor(text=template, images=prompt_image, padding=True, return_tensors="pt").to(
            pipe._execution_device
        )
        with torch.inference_mode():
            generated = pipe.text_encoder.generate(
                **inputs, max_new_tokens=self.config.caption_max_new_tokens, do_sample=False
            )
        new_tokens = generated[:, inputs.input_ids.shape[1]:]
        text = pipe.vl_processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        return text.strip()

    # -- serving ---------------------------------------------------------------------------------
    def checked(self, prepared: Prepared, params: LayersParams) -> tuple[Any, tuple[int, int]]:
        """The request's image as PIL RGBA (RGB made opaque) and its bucket size; InvalidParameter
        where the pipeline cannot take it. Call inside `sizes()`."""
        from PIL import Image

        array = prepared.array
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4) or 0 in array.shape:
            raise InvalidParameter(f"expected an RGBA (or RGB) uint8 array, got {array.dtype} {array.shape}", "image")
        if array.shape[2] == 3:  # the RGBA VAE needs 4 channels: RGB is opaque RGBA
            array = np.dstack([array, np.full(array.shape[:2], 255, np.uint8)])
        height, width = array.shape[:2]
        bucket = self.bucket_size(width, height, params.resolution)
        if min(bucket) < 16:
            raise InvalidParameter(
                f"aspect ratio {width}x{height} is too extreme for the {params.resolution} bucket "
                f"(layers would be {bucket[0]}x{bucket[1]})", "image")
        return Image.fromarray(np.ascontiguousarray(array), "RGBA"), bucket

    def encode_text(self, prepared: Prepared, params: LayersParams) -> Conditioning:
        """The prompt (the image's caption when the request has none) and, with CFG, the negative
        prompt, encoded; the caption's time is its own stage."""
        with self.sizes():
            image, bucket = self.checked(prepared, params)
            prompt, source, seconds = params.prompt, "request", {}
            if not prompt:
                start = time.perf_counter()
                prompt = self.caption(image, bucket) or BLANK_CAPTION_PROMPT
                seconds["caption"] = time.perf_counter() - start
                source = "caption"
            encoded = self.encoded(prompt, params.negative_prompt if params.cfg > 1 else None)
        encoded.prompt_source = source
        encoded.seconds.update(seconds)
        return encoded

    def generate(self, prepared: Prepared, params: LayersParams, progress: Progress | None = None,
                 conditioning: Conditioning | None = None) -> Generated:
        """One request: `progress` (optional) hears the stages and steps and can cancel between
        steps; `conditioning`, the text encoder stage's work, when it did it."""
        import torch

        started = time.perf_counter()
        # 1. validate
        params = self.config.resolve(params)
        self.check_health()
        self.needs_conditioning(conditioning)
        if progress is not None and conditioning is None:
            progress.stage("encode_prompt")  # the caption, when there is one, is part of it
        with self.sizes():
            image, bucket = self.checked(prepared, params)
            with self.guarded(f"resolution {params.resolution}, {params.layers} layers, {params.steps} steps",
                              conditioning) as stages:
                # 2. caption (only when the request has no prompt) and encode, unless the stage did
                encoded = conditioning or self.encode_text(prepared, params)
                if conditioning is None:
                    stages.seconds.update({k: v for k, v in encoded.seconds.items() if k == "caption"})
                # 3. run
                generator = torch.Generator(device="cpu").manual_seed(params.seed)
                output = self.pipe(
                    image=image,
                    prompt=encoded.prompt,  # never captioned again: the embeddings are given
                    **self.conditioned(encoded),
                    true_cfg_scale=params.cfg,
                    layers=params.layers,
                    num_inference_steps=params.steps,
                    resolution=params.resolution,
                    cfg_normalize=params.cfg_normalize,
                    use_en_prompt=self.config.caption_language == "en",
                    generator=generator,
                    output_type="np",
                    callback_on_step_end=step_callback(progress, params.steps),
                )
        # 4. package
        frames = np.asarray(output.images[0])  # (layers, H, W, 4) float in [0, 1]
        if frames.shape != (params.layers, bucket[1], bucket[0], 4):
            raise ModelFailure(
                f"the pipeline returned layers of shape {frames.shape}, expected "
                f"{(params.layers, bucket[1], bucket[0], 4)}"
            )
        elsewhere = conditioning.seconds if conditioning is not None else {}
        seconds = {"caption": stages.seconds.pop("caption", 0.0), **stages.seconds, **elsewhere,
                   "total": time.perf_counter() - started}
        used = {
            "task": self.task,
            **params.model_dump(),
            "prompt": encoded.prompt,
            "prompt_source": encoded.prompt_source,
            "layer_size": f"{bucket[0]}x{bucket[1]}",
        }
        served = {"replica": self.replica, **(conditioning.served if conditioning else {}),
                  "timings_s": {k: round(v, 6) for k, v in seconds.items()}}
        return Generated(array=to_uint8(frames), info=prepared.info, params=used, served=served)


TASK = Task(name="layers", summary="image → RGBA layers", model=LayersModel, params=LayersParams,
            section=LayersModelConfig, formats=LAYER_FORMATS,
            headers=("steps", "cfg", "seed", "layers", "resolution", "layer_size"))
