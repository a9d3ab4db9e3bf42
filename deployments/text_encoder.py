"""The text encoder as its own stage: `TextEncoder` turns requests into prompt embeddings.

With `text_encoder.mode: stage` the diffusion replicas load without a text encoder and the
`TextEncoder` deployment runs it for them: for each task it serves it holds that task's model
class with the text parts of its pipeline only, and calls the model's own `encode_text` (the
pipeline's `encode_prompt`, and for `layers` its caption), so the embeddings are those the model
would have made itself. It returns a `Conditioning` of plain arrays. Tasks whose text encoder
files have the same bytes (`deployments.identity`) share one loaded encoder; the builder gives
tasks with different files a deployment each. The encoder's stage metrics (`encode_prompt`,
`caption`) are recorded here, where the work happens; their sum is the stage's model time for
the request. A request whose caller went away is stopped like a model's (`Model.on_request`):
it never starts, or the replica waits for the encoder's end before it takes the next. Knows
nothing about HTTP.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from deployments import metrics, placement
from deployments.diffusion import DiffusionModel, failures
from deployments.diffusion_config import DiffusionConfig
from deployments.errors import ModelFailure
from deployments.identity import text_encoder_identity
from deployments.model import Model, ModelSettings
from deployments.options import DeploymentOptions, model_defaults, with_planned
from deployments.placement import DoesNotFit, PlacementConfig
from deployments.records import Conditioning, Prepared


class TextEncoderConfig(ModelSettings):
    """The `text_encoder` section: where the diffusion tasks' prompts are encoded."""

    mode: Literal["inline", "stage"] = "inline"
    """`inline`: each diffusion replica encodes its own prompts with its own copy of the text
    encoder (one-card laptops, tests). `stage`: the TextEncoder deployment encodes them for every
    diffusion task, and the diffusion replicas load no text encoder."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; `auto`: bfloat16 on CUDA, float32 on CPU. With `placement` on CUDA the plan
    decides (bf16, or fp8 storage computed in bf16)."""
    placement: PlacementConfig | None = None
    """The card one encoder replica owns (`gpus: 1`): the planner puts the encoder there in bf16,
    else in fp8 storage, else (offload allowed) on the CPU. None: the encoder runs on whatever
    device the replica has (CPU without a GPU)."""
    serve: DeploymentOptions = Field(default_factory=lambda: model_defaults(num_cpus=1))
    """Ray Serve options of the TextEncoder deployment (a CPU replica by default; with
    `placement`, leave out `num_gpus`: the plan asks for its card)."""

    @model_validator(mode="after")
    def _placement(self) -> TextEncoderConfig:
        if self.placement is not None:
            if self.placement.gpus != 1:
                raise ValueError(f"text_encoder.placement.gpus must be 1 (one card per encoder replica), "
                                 f"got {self.placement.gpus}")
            if "num_gpus" in self.serve.ray_actor_options:
                raise ValueError(f"text_encoder.serve.ray_actor_options.num_gpus "
                                 f"({self.serve.ray_actor_options['num_gpus']}) conflicts with "
                                 "text_encoder.placement: the plan decides; remove num_gpus")
        return self

    def plan(self, tasks: tuple[str, ...]) -> Any:
        """The encoder stage's plan for `tasks` on `placement` (None without one); DoesNotFit."""
        return placement.plan_encoder(tasks, self.placement) if self.placement is not None else None

    def check(self, tasks: tuple[str, ...]) -> None:
        """Raise ValueError when the stage's placement cannot hold the encoder of `tasks`."""
        try:
            self.plan(tasks)
        except DoesNotFit as error:
            raise ValueError(f"text_encoder.placement does not fit: {error}") from None

    def stage_options(self, tasks: tuple[str, ...]) -> dict[str, Any]:
        """Serve options of the deployment serving `tasks`: from config, and with `placement` the
        card its plan needs."""
        options, plan = self.serve.serve_options(), self.plan(tasks)
        if plan is None:
            return options
        return with_planned(options, lambda cpus: placement.encoder_ray_options(plan, self.placement, num_cpus=cpus))


def identity(model: type[DiffusionModel], section: DiffusionConfig, cache_dir: Path | str) -> str | None:
    """The content digest of the text encoder `section`'s source holds, or None when its files
    are not on this machine (then it is not shared: nothing is assumed from names)."""
    try:
        directory = model(section, cache_dir).directory()
    except FileNotFoundError:
        return None
    return text_encoder_identity(directory, cache_dir)


class TextEncoder(Model):
    """The text encoder stage: (task, prepared image, resolved params) → `Conditioning`."""

    task = "text_encoder"
    config_class = TextEncoderConfig

    def __init__(self, config: TextEncoderConfig | None = None,
                 models: dict[str, tuple[type[DiffusionModel], DiffusionConfig]] | None = None,
                 cache_dir: Path | str = "~/.cache/imgserve") -> None:
        super().__init__(config, cache_dir)
        self.models = {name: cls(section, self.cache_dir) for name, (cls, section) in (models or {}).items()}
        """Task → its model, holding the text parts of its pipeline only (after `load`)."""
        self.identities: dict[str, str | None] = {}
        """Task → the digest of its text encoder files."""
        self.encoders = 0
        """Text encoders loaded (fewer than tasks where they share one)."""

    def load_model(self) -> None:
        import torch

        self.plan = self.config.plan(tuple(self.models))
        on_card = self.plan is not None and self.plan.device == "cuda" and self.device == "cuda"
        if self.plan is not None:
            self.dtype = torch.bfloat16  # the plan's compute dtype; fp8 is storage only
        loaded: dict[str, Any] = {}
        for name, model in self.models.items():
            model.device, model.dtype = ("cpu" if on_card else self.device), self.dtype
            digest = identity(type(model), model.config, self.cache_dir)
            shared = loaded.get(digest) if digest is not None else None
            model.load_text(shared)
            if shared is None:
                self.encoders += 1
                self.place(model.pipe.text_encoder, on_card)
                if digest is not None:
                    loaded[digest] = model.pipe.text_encoder
            self.identities[name] = digest

    def place(self, module: Any, on_card: bool) -> None:
        """One loaded encoder where the plan says (formats only without a card)."""
        if self.plan is None:
            module.to(self.device)
        elif on_card:
            placement.place_text_encoder(module, self.plan)
        else:
            placement.apply_encoder_format(module, self.plan)

    def loaded(self) -> bool:
        return bool(self.models) and all(model.pipe is not None for model in self.models.values())

    def extra_stats(self) -> dict[str, Any]:
        return {"tasks": dict(self.identities), "encoders": self.encoders}

    async def encode(self, task: str, prepared: Prepared, params: Any) -> Conditioning:
        """Serve entry point: one request's conditioning, on the model thread; a request whose caller
        went away before the thread took it never runs, one that is running ends before the
        replica takes the next (`Model.on_request`). Its model time is `sum(seconds.values())`."""
        if task not in self.models:
            raise ModelFailure(f"this text encoder serves {', '.join(self.models)}, not {task!r}")
        conditioning, _ = await self.on_request(lambda stoppable: self.encode_now(task, prepared, params))
        return conditioning

    def encode_now(self, task: str, prepared: Prepared, params: Any) -> Conditioning:
        """`encode` on the calling thread: stage times recorded, failures the request's own."""
        import torch

        self.check_health()
        started = time.perf_counter()
        with failures(self, "encoding the prompt", "the text encoder"), torch.inference_mode():
            conditioning = self.models[task].encode_text(prepared, params)
            metrics.sync_cuda()
        elapsed = time.perf_counter() - started
        conditioning.seconds["encode_prompt"] = max(0.0, elapsed - conditioning.seconds.get("caption", 0.0))
        metrics.record_stages(task, conditioning.seconds)
        return conditioning
