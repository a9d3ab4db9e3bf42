"""The serving scaffold the Qwen-Image diffusion models share (their settings and request fields are
`deployments.diffusion_config`).

`DiffusionModel` is the base of both model classes: it loads the pipeline (planned placement on
CUDA; without a text encoder when the TextEncoder stage encodes for it), encodes prompts with the
pipeline's own `encode_prompt` (`encode_text`, also what the stage calls), runs requests on the
model thread (`Model.on_request`: stopped at the next step when the caller goes away, timed into
`served["model_seconds"]`), and wraps each pipeline call in `guarded` (stage metrics and peak GPU memory;
out of memory → `OutOfMemory`, 507; cancellation and time limits counted in `stats()`; any other
failure → `ModelFailure`). Subclasses keep only what differs: what they pass to the pipeline and
what they do around it. Knows nothing about HTTP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from deployments import metrics, placement
from deployments.diffusion_config import DiffusionConfig
from deployments.errors import Cancelled, ModelFailure, OutOfMemory, TimedOut
from deployments.model import Abandoned, Model, model_seconds
from deployments.records import Conditioning, Generated, Prepared, Progress

if TYPE_CHECKING:
    from deployments.checkpoints import Kind

PIPELINE_MAX_SEQUENCE = 512
"""The pipelines' `max_sequence_length` default, used for their prompts here too."""


class DiffusionModel(Model):
    """A Qwen-Image pipeline as a model deployment: load, the model thread, the guarded call."""

    kind: ClassVar[Kind]
    """Which pipeline class (`deployments.checkpoints`)."""
    config_class = DiffusionConfig

    def __init__(self, config: DiffusionConfig | None = None, cache_dir: Path | str = "~/.cache/imgserve") -> None:
        super().__init__(config, cache_dir)
        self.pipe: Any = None
        self.attention = "native"
        """The attention backend the transformer runs (`attention_backend` resolved)."""

    def loaded(self) -> bool:
        return self.pipe is not None

    def load_model(self) -> None:
        """The pipeline from `source` on this replica's device; the plan applied when CUDA is present,
        and without CUDA (fake GPU resources) its number formats only: bf16 compute, fp8 storage
        and the VAE's dtype, as a card would compute."""
        from deployments.checkpoints import EncoderElsewhere, load_pipeline

        config = self.config
        self.plan = config.plan()
        directory = self.directory()
        if self.plan is not None and self.plan.transformer.compute == "fp8":
            problem = placement.fp8_compute_problem(self.device)
            if problem:
                raise ValueError(f"{config.task}.placement.compute is fp8, but {problem}")
        staged = {"text_encoder": None} if config.text_encoder == "stage" else {}
        pipe = load_pipeline(self.kind, directory, torch_dtype=self.dtype, **staged)
        if staged:
            pipe.text_encoder = EncoderElsewhere(self.compute_dtype())
        pipe.set_progress_bar_config(disable=True)
        if self.device == "cuda" and self.plan is not None:
            # loaded on CPU first: the plan may cast to fp8 or offload before anything reaches a GPU
            placement.place_pipeline(pipe, self.plan)
        else:
            pipe = pipe.to(self.device)
            if self.plan is not None:
                # no card here (fake GPU resources): compute in the plan's number formats all the same
                placement.apply_formats(pipe, self.plan)
        if config.vae_dtype == "float32":
            float32_vae(pipe)
        self.attention = use_attention(pipe.transformer, config.attention_backend, self.device, config.task)
        self.pipe = pipe

    def directory(self) -> Path:
        """The local diffusers directory of `source` (the tiny one generated first if asked)."""
        from deployments import tiny

        config = self.config
        if config.source == "tiny":
            return tiny.ensure_tiny(self.kind, self.cache_dir)
        directory = Path(config.source).expanduser()
        if not (directory / "model_index.json").is_file():
            raise FileNotFoundError(f"{config.task}.source {str(directory)!r} is not a local diffusers directory "
                                    "(no model_index.json); prepare it ahead")
        return directory

    def compute_dtype(self) -> Any:
        """The dtype prompt embeddings reach the transformer in: the plan's bf16 when there is a
        plan, else the replica's dtype (what its own text encoder would have computed in)."""
        import torch

        return torch.bfloat16 if self.plan is not None else self.dtype

    # -- text --------------------------------------------------------------------------------------
    def load_text(self, text_encoder: Any = None) -> None:
        """Load only the text parts of the pipeline (for the text encoder stage, which sets
        `device` and `dtype` first); `text_encoder`: an already loaded one with the same bytes."""
        from deployments.checkpoints import load_text_pipeline

        self.pipe = load_text_pipeline(self.kind, self.directory(), self.dtype, text_encoder)
        if text_encoder is None:
            self.pipe.text_encoder.to(self.device)

    def encode_text(self, prepared: Prepared, params: Any) -> Conditioning:
        """The request's prompt embeddings, made with the pipeline's own `encode_prompt` (and, for
        a task that captions, its caption): the same wherever it runs."""
        raise NotImplementedError

    def encoded(self, prompt: str, negative: str | None, **inputs: Any) -> Conditioning:
        """`encode_prompt` of `prompt` (and of `negative` when given, for CFG) with the pipeline's
        call arguments, as arrays; `inputs` are the task's extra inputs (the condition image)."""
        import torch

        pipe = self.pipe
        arrays: list[np.ndarray | None] = []
        dtype = None
        for text in (prompt, negative):
            if text is None:
                arrays += [None, None]
                continue
            embeds, mask = pipe.encode_prompt(prompt=text, device=pipe._execution_device, num_images_per_prompt=1,
                                              max_sequence_length=PIPELINE_MAX_SEQUENCE, **inputs)
            if mask is None:  # the pipeline drops an all-ones mask; passing it back in drops it again
                mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            dtype = embeds.dtype
            arrays += [embeds.detach().float().cpu().numpy(), mask.detach().cpu().numpy()]
        return Conditioning(*arrays, dtype=str(dtype).removeprefix("torch."), prompt=prompt,
                            served={"encoder": self.replica})

    def conditioned(self, conditioning: Conditioning) -> dict[str, Any]:
        """The pipeline's embedding arguments from `conditioning`, on its execution device in the
        dtype the transformer takes them."""
        import torch

        device, dtype = self.pipe._execution_device, self.compute_dtype()

        def tensor(array: np.ndarray | None, cast: Any = None) -> Any:
            return None if array is None else torch.from_numpy(array).to(device=device, dtype=cast)

        return {"prompt_embeds": tensor(conditioning.embeds, dtype),
                "prompt_embeds_mask": tensor(conditioning.mask),
                "negative_prompt_embeds": tensor(conditioning.negative_embeds, dtype),
                "negative_prompt_embeds_mask": tensor(conditioning.negative_mask)}

    def extra_stats(self) -> dict[str, Any]:
        """Where its prompts are encoded (`inline`, `stage`), and the settings no request can
        change: the VAE's dtype, the scheduler (the model's own), the batch size (one image per
        request)."""
        if self.pipe is None:
            return {}
        return {"attention": self.attention, "text_encoder": self.config.text_encoder,
                "locked": {"vae_dtype": str(self.pipe.vae.dtype).removeprefix("torch."),
                           "scheduler": type(self.pipe.scheduler).__name__, "batch_size": 1}}

    async def __call__(self, prepared: Prepared, params: Any, progress: Progress | None = None,
                       conditioning: Conditioning | None = None) -> Generated:
        """Serve entry point: runs `generate` on the model thread (`conditioning`: the text
        encoder stage's work for this request), stopped at its next step if the caller goes away."""
        return await self.serve_generate(prepared, params, progress, conditioning)

    async def serve_generate(self, prepared: Prepared, params: Any, progress: Progress | None,
                             conditioning: Conditioning | None) -> Generated:
        """`generate` through `on_request`: its progress always a stoppable one (so a step callback
        is always installed), its model time in `served["model_seconds"]`."""
        generated, seconds = await self.on_request(
            lambda stoppable: self.generate(prepared, params, stoppable, conditioning), progress)
        return model_seconds(generated, seconds)

    def generate(self, prepared: Prepared, params: Any, progress: Progress | None = None,
                 conditioning: Conditioning | None = None) -> Generated:
        raise NotImplementedError

    def needs_conditioning(self, conditioning: Conditioning | None) -> None:
        """A replica without a text encoder cannot run a request that brings no embeddings."""
        if conditioning is None and self.config.text_encoder == "stage":
            raise ModelFailure(f"{type(self).__name__} has no text encoder (text_encoder.mode is stage): "
                               "its requests must come through the TextEncoder stage")

    @contextlib.contextmanager
    def guarded(self, what: str, conditioning: Conditioning | None = None) -> Iterator[metrics.DiffusionStages]:
        """Around one request's model work (`what` describes its size for the out-of-memory
        message): stage times and the GPU peak recorded when it succeeds, and every failure turned
        into the request's own error; the replica keeps serving. With `conditioning` the prompt
        was encoded elsewhere, and its stages are recorded there."""
        import torch

        with failures(self, f"at {what}", "the model"), \
                metrics.diffusion_request(self.pipe, self.task, encode_prompt=conditioning is None) as stages, \
                torch.inference_mode():
            yield stages


@contextlib.contextmanager
def failures(model: Model, where: str, who: str) -> Iterator[None]:
    """Whatever a model's work on one request raises, as that request's own error: a cancellation
    or time limit counted in the model's `stats()` and passed on; out of memory (`where` says at
    what) → the request's garbage released, counted, `OutOfMemory`; any other failure of `who` →
    `ModelFailure`. The replica keeps serving."""
    import torch

    try:
        yield
    except Abandoned:
        raise  # the caller went away: the entry point counts it (`Model.on_request`)
    except (Cancelled, TimedOut) as exc:
        model.stopped(exc.code, str(exc))
        raise
    except torch.cuda.OutOfMemoryError as exc:
        release_gpu_memory()
        model.stopped(OutOfMemory.code, str(exc))
        raise OutOfMemory(f"GPU out of memory {where}: {exc}") from None
    except (RuntimeError, ValueError) as exc:
        raise ModelFailure(f"{who} failed on this request: {exc}") from None


ATTENTION_PACKAGES = {"sage": "sageattention", "flash": "flash_attn", "xformers": "xformers"}
"""The Python package each attention backend needs, in the order `auto` tries them: fastest first
(SageAttention's 8-bit QK kernels outrun FlashAttention 2 on RTX 4090 and H100 class cards)."""


def use_attention(transformer: Any, choice: str, device: str, task: str) -> str:
    """Set the transformer's attention backend (`choice` resolved: `auto` → the fastest installed one
    on CUDA, else native) and return its name; ValueError naming the setting when it cannot run."""
    import importlib.util

    if choice == "native" or (choice == "auto" and device != "cuda"):
        return "native"  # diffusers' default: PyTorch's scaled dot-product attention, nothing to set
    if choice != "auto" and device != "cuda":
        raise ValueError(f"{task}.attention_backend is {choice!r}, but it runs on CUDA only; this replica has none")
    installed = [name for name, package in ATTENTION_PACKAGES.items() if importlib.util.find_spec(package)]
    for name in installed if choice == "auto" else [choice]:
        try:
            transformer.set_attention_backend(name)  # checks the package and its version
            return name
        except (RuntimeError, ValueError) as exc:
            if choice != "auto":
                raise ValueError(f"{task}.attention_backend is {name!r}, but it cannot run here: {exc}") from None
    return "native"


def float32_vae(pipe: Any) -> None:
    """The VAE in float32, whatever the transformer computes in. The edit pipeline hands its VAE
    encoder images in the prompt embeddings' dtype and keeps the latents in it: the encoder is
    wrapped to cast in and out. Decoding needs nothing: the pipeline casts the latents to the VAE's
    dtype, and the float32 image is what is wanted."""
    import torch

    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    encode = pipe._encode_vae_image

    def encode_in_float32(image: Any, generator: Any) -> Any:
        return encode(image.to(torch.float32), generator).to(image.dtype)

    pipe._encode_vae_image = encode_in_float32


def to_uint8(images: Any) -> np.ndarray:
    """A pipeline's float output in [0, 1] → uint8, rounded."""
    return (np.clip(np.asarray(images), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def step_callback(progress: Progress | None, total: int) -> Callable | None:
    """A diffusers `callback_on_step_end` that reports each step and stops a cancelled request.

    diffusers calls it after each step (a step is the `denoise` stage); the last one announces
    `decode`.
    """
    if progress is None:
        return None

    def callback(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
        if progress.step(index + 1, total):
            raise Cancelled(f"cancelled after step {index + 1} of {total}")
        if index + 1 == total:
            progress.stage("decode")
        return tensors

    return callback


def release_gpu_memory() -> None:
    """After a failed request (out of memory): its tensors are garbage now; collect them and give
    their cached blocks back to the card, so the next request starts from the same free memory as
    the one before. A no-op for the cache where CUDA was never initialised."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
