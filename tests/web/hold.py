"""A signal for the page tests: hold a `real` job right after a chosen denoising step.

The page then shows "step i/N" for as long as the test needs (a screenshot, a second job waiting
in the queue, a third refused) without sleeps tuned to this machine; `release` lets it finish.
"""

from __future__ import annotations

import asyncio

import ray

from deployments.real import RealModel

HOLD_NAME = "imgserve-web-hold"
HOLD_NAMESPACE = "imgserve-tests"


@ray.remote(num_cpus=0)
class StepHold:
    def __init__(self) -> None:
        self.step: int | None = None
        self.event = asyncio.Event()
        self.held = 0

    def hold_at(self, step: int) -> None:
        self.step, self.event, self.held = step, asyncio.Event(), 0

    def target(self) -> int | None:
        return self.step

    async def wait(self) -> None:
        self.held += 1
        await self.event.wait()

    def holding(self) -> int:
        return self.held

    def release(self) -> None:
        self.step = None
        self.event.set()


class _Holding:
    """A job's progress sink that waits on the hold after reporting step `at`."""

    def __init__(self, progress, hold, at: int) -> None:
        self.progress, self.hold, self.at = progress, hold, at

    def stage(self, name: str) -> None:
        self.progress.stage(name)

    def step(self, step: int, total: int) -> bool:
        stop = self.progress.step(step, total)
        if step == self.at:
            ray.get(self.hold.wait.remote())
        return stop


class HeldRealModel(RealModel):
    """RealModel whose jobs stop after the hold's step until the test releases them."""

    def generate(self, prepared, params, progress=None):
        if progress is not None:
            hold = ray.get_actor(HOLD_NAME, namespace=HOLD_NAMESPACE)
            at = ray.get(hold.target.remote())
            if at is not None:
                progress = _Holding(progress, hold, at)
        return super().generate(prepared, params, progress)
