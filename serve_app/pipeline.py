"""The one request pipeline, shared by synchronous requests, handle callers and jobs.

Validates a task's fields without pixels (422 before any decoding), then drives Preprocess → model
→ Postprocess through deployment handles, awaiting each hop so every queue limit holds. An optional
`Progress` receives the stages (and, from the model, each denoising step) and can stop the run.
Holds handles and config only; knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from ray.serve.handle import DeploymentHandle

from deployments.errors import InvalidParameter, TimedOut
from deployments.lora import NONE
from deployments.layers import LayersModel, LayersParams
from deployments.postprocess import IMAGE_FORMATS, LAYER_FORMATS, Encoded
from deployments.anime import AnimeModel, AnimeParams
from deployments.diffusion import MIN_STEPS
from deployments.real import RealModel, RealParams
from deployments.records import Deadline, Progress
from serve_app.errors import NotFound

if TYPE_CHECKING:  # config imports the job runner, which imports this module
    from serve_app.config import AppConfig


@dataclass(frozen=True)
class TaskSpec:
    """How the pipeline treats one task: its model class, request parameters and output formats."""

    model: type
    params: type[BaseModel]
    formats: tuple[str, ...] = IMAGE_FORMATS


TASKS: dict[str, TaskSpec] = {
    "real": TaskSpec(RealModel, RealParams),
    "anime": TaskSpec(AnimeModel, AnimeParams),
    "layers": TaskSpec(LayersModel, LayersParams, LAYER_FORMATS),
}


def parse_params(model: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
    """Request fields (strings from a form or query) → the task's parameter model; 422 naming the field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidParameter(f"{message} (got {first.get('input')!r})"[:300], field) from None


@dataclass
class Resolved:
    """A validated request: everything needed to run it again with the same result."""

    task: str
    params: BaseModel
    format: str

    def fields(self) -> dict[str, Any]:
        """The resolved request as plain fields (seed included): what a job stores to retry."""
        return {**self.params.model_dump(exclude_none=True), "format": self.format}


class Pipeline:
    """Preprocess → model → postprocess for every task, through deployment handles."""

    def __init__(self, config: AppConfig, preprocess: DeploymentHandle, models: dict[str, DeploymentHandle],
                 postprocess: DeploymentHandle) -> None:
        self.config = config
        self.preprocess = preprocess
        self.models = models
        self.postprocess = postprocess
        self.lora_store = config.real.lora_store(config.cache_dir)
        self._resolvers: dict[str, Callable[[BaseModel], BaseModel]] = {
            "real": lambda params: config.real.resolve(params, self.lora_store),
            "anime": config.anime.resolve,
            "layers": config.layers.resolve,
        }

    def resolve(self, task: str, fields: dict[str, Any] | None) -> Resolved:
        """Check the task and its fields without touching pixels; fills defaults and the seed."""
        if task not in self.models:
            raise NotFound(f"unknown task {task!r}; available: {', '.join(sorted(self.models))}", "task")
        spec = TASKS[task]
        fields = dict(fields or {})
        fmt = fields.pop("format", spec.formats[0])
        if fmt not in spec.formats:
            raise InvalidParameter(f"unknown format {fmt!r}; allowed: {', '.join(spec.formats)}", "format")
        return Resolved(task, self._resolvers[task](parse_params(spec.params, fields)), fmt)

    async def run(self, request: Resolved, image: bytes, progress: Progress | None = None,
                  timeout_s: float | None = None) -> Encoded:
        """Run a resolved request; raises the `deployments.errors` classes on bad input, and
        `TimedOut` after `timeout_s` (the model, told the same deadline, stops at its next step)."""
        if timeout_s is None:
            return await self._run(request, image, progress)
        deadline = Deadline(time.time() + timeout_s, timeout_s, progress)
        try:
            # a timeout scope on this task, not a task of its own as `wait_for` would start: one task
            # switch less on every hop's result
            async with asyncio.timeout(timeout_s):
                return await self._run(request, image, deadline)
        except TimeoutError:
            raise TimedOut(f"took longer than the limit of {timeout_s:g} s") from None

    async def _run(self, request: Resolved, image: bytes, progress: Progress | None) -> Encoded:
        # 1. preprocess on CPU replicas; awaited so the model's queue limit is enforced (a
        #    DeploymentResponse passed straight on bypasses max_queued_requests in Ray Serve 2.60)
        if progress is not None:
            progress.stage("preprocess")
        prepared = await self.preprocess.prepare.remote(image, TASKS[request.task].model.input_spec, task=request.task)
        # 2. the model
        handle = self.models[request.task]
        lora = getattr(request.params, "lora", NONE)
        if lora != NONE:
            # routes to a replica that already holds this version, when one is free
            handle = handle.options(multiplexed_model_id=lora)
        generated = await handle.remote(prepared, request.params, progress)
        # 3. encode on CPU replicas
        if progress is not None:
            progress.stage("postprocess")
        return await self.postprocess.encode.remote(generated, request.format)

    def lora_versions(self) -> list[str]:
        """The LoRA versions in the configured directory, oldest first (none without a directory)."""
        return self.lora_store.versions() if self.lora_store else []

    def styles(self) -> list[str]:
        """The anime styles in the configured directory; none where the directory is only on the
        model replicas' machines."""
        try:
            return self.config.anime.styles()
        except FileNotFoundError:
            return []

    def models_info(self) -> dict[str, Any]:
        """GET /v1/models: tasks, their defaults, limits, choices and formats."""
        real = self.config.real
        versions = self.lora_versions()
        return {
            "tasks": {
                "real": {
                    "defaults": {
                        "prompt": real.default_prompt,
                        "negative_prompt": real.default_negative_prompt,
                        "steps": real.default_steps,
                        "cfg": real.default_cfg,
                    },
                    "limits": {"steps": [MIN_STEPS, real.max_steps], "cfg": [1.0, real.max_cfg]},
                    "lora": {
                        "versions": [NONE, *versions],
                        "default": real.default_lora or (versions[-1] if versions else NONE),
                    },
                    "formats": list(TASKS["real"].formats),
                },
                "anime": {
                    "styles": self.styles(),
                    "default_style": self.config.anime.default_style,
                    "formats": list(TASKS["anime"].formats),
                },
                "layers": {**self.config.layers.describe(), "formats": list(TASKS["layers"].formats)},
            },
            "max_long_edge": self.config.preprocess.max_long_edge,
            "max_bytes": self.config.preprocess.max_bytes,
        }
