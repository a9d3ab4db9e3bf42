"""A small extra task declared here, outside serve_app/ and deployments/: `gray`, colour → grayscale
with one parameter. The tests serve it next to the built-in tasks (`TASKS.plus(GRAY)`), to show
that a task is one unit: its params, section, model class and `Task` are all the service needs."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import InvalidParameter
from deployments.model import Model, ModelSettings
from deployments.options import DeploymentOptions, model_defaults
from deployments.records import Generated, ImageSpec, Prepared, Progress
from deployments.task import Task


class GrayParams(BaseModel):
    """Per-request choices for `gray`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    amount: float | None = None
    """How far towards gray: 0 keeps the colours, 1 is fully gray."""


class GraySection(ModelSettings):
    """The `gray` section."""

    serve: DeploymentOptions = Field(default_factory=lambda: model_defaults(num_cpus=0.1))
    """Ray Serve options of the GrayModel deployment."""
    default_amount: float = 1.0
    """`amount` when the request gives none."""

    def resolve(self, params: GrayParams, catalog: Any = None) -> GrayParams:
        amount = self.default_amount if params.amount is None else params.amount
        if not 0.0 <= amount <= 1.0:
            raise InvalidParameter(f"must be between 0 and 1, got {amount}", "amount")
        return GrayParams(amount=amount)

    def describe(self, catalog: Any = None) -> dict[str, Any]:
        return {"default_amount": self.default_amount}

    def limits(self, catalog: Any = None) -> dict[str, dict[str, Any]]:
        return {"amount": {"minimum": 0.0, "maximum": 1.0, "default": self.default_amount}}


class GrayModel(Model):
    """Mixes each pixel with its luma (Rec. 601 weights, "loaded" by `load`)."""

    input_spec = ImageSpec(multiple=1, alpha=False)
    task = "gray"
    config_class = GraySection

    def __init__(self, config: GraySection | None = None, cache_dir: Any = "~/.cache/imgserve") -> None:
        super().__init__(config, cache_dir)
        self.weights: np.ndarray | None = None

    def load_model(self) -> None:
        self.weights = np.array([0.299, 0.587, 0.114], np.float32)

    def loaded(self) -> bool:
        return self.weights is not None

    async def __call__(self, prepared: Prepared, params: GrayParams, progress: Progress | None = None) -> Generated:
        if progress is not None:
            await asyncio.to_thread(progress.stage, "gray")  # a job's progress waits for the runner's answer
        return await self.on_model_thread(self.generate, prepared, params)

    def generate(self, prepared: Prepared, params: GrayParams) -> Generated:
        params = self.config.resolve(params)
        rgb = prepared.array.astype(np.float32)
        luma = rgb @ self.weights
        mixed = rgb * (1.0 - params.amount) + luma[..., None] * params.amount
        return Generated(array=np.clip(mixed, 0, 255).round().astype(np.uint8), info=prepared.info,
                         params={"task": self.task, "amount": params.amount}, served={"replica": self.replica})


GRAY = Task(name="gray", summary="colour → grayscale", model=GrayModel, params=GrayParams, section=GraySection,
            headers=("amount",))
