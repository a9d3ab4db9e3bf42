"""A signal for the page tests: hold a `real` job right after a chosen denoising step.

The page then shows "step i/N" for as long as the test needs (a screenshot, a second job waiting
in the queue, a third refused) without sleeps tuned to this machine. The test closes the shared
test `Gate` at a step (`close(step)`) and opens it to let the job finish.
"""

from __future__ import annotations

import ray

from deployments.real import RealModel

HOLD_NAME = "imgserve-web-hold"
HOLD_NAMESPACE = "imgserve-tests"


class _Holding:
    """A job's progress sink that waits on the gate after reporting step `at`."""

    def __init__(self, progress, gate, at: int) -> None:
        self.progress, self.gate, self.at = progress, gate, at

    def stage(self, name: str) -> None:
        self.progress.stage(name)

    def step(self, step: int, total: int) -> bool:
        stop = self.progress.step(step, total)
        if step == self.at:
            ray.get(self.gate.wait.remote())
        return stop


class HeldRealModel(RealModel):
    """RealModel whose jobs stop after the gate's step while the gate is closed."""

    def generate(self, prepared, params, progress=None, conditioning=None):
        if progress is not None:
            gate = ray.get_actor(HOLD_NAME, namespace=HOLD_NAMESPACE)
            at = ray.get(gate.at_step.remote())
            if at is not None:
                progress = _Holding(progress, gate, at)
        return super().generate(prepared, params, progress, conditioning)
