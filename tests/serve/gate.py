"""Test models: one that holds each request until the test opens a gate, one that is slow, and
a real out-of-memory error on demand.

Lets a test fill a queue deterministically (no sleeps tuned to this machine): requests enter the
model and wait on a Ray actor; the test watches how many are waiting and opens the gate.
"""

from __future__ import annotations

import asyncio

import ray

from deployments.real import RealModel

GATE_NAME = "imgserve-test-gate"


@ray.remote(num_cpus=0)
class Gate:
    """While closed, every `wait` blocks until `open`. `close(step)` also names the denoising step
    after which a step-aware model (tests/web/hold.py) waits; plain gated models wait on entry."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiting = 0
        self.step: int | None = None

    async def wait(self) -> None:
        self.waiting += 1
        await self.event.wait()

    def count(self) -> int:
        return self.waiting

    def at_step(self) -> int | None:
        return self.step

    def open(self) -> None:
        self.event.set()

    def close(self, step: int | None = None) -> None:
        self.event = asyncio.Event()
        self.waiting = 0
        self.step = step


class GatedRealModel(RealModel):
    """RealModel whose every request first waits for the test's gate to open."""

    def generate(self, prepared, params, progress=None, conditioning=None):
        gate = ray.get_actor(GATE_NAME)
        ray.get(gate.wait.remote())
        return super().generate(prepared, params, progress, conditioning)


SLOW_STEP_S = 0.25


def raise_oom_once(model: RealModel) -> None:
    """The next transformer call of `model` raises a real `torch.cuda.OutOfMemoryError`, inside the
    pipeline, as a card that ran out of memory would; the calls after it run normally."""
    import torch

    transformer = model.pipe.transformer
    forward = transformer.forward

    def out_of_memory(*args, **kwargs):
        transformer.forward = forward
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test model)")

    transformer.forward = out_of_memory


class SlowRealModel(RealModel):
    """RealModel whose every transformer call first sleeps SLOW_STEP_S: a slow test model, so a
    request outlives a short time limit at any machine speed. `inject_oom()` (called through a
    handle) makes its next request fail with a real out-of-memory error. Both act inside the
    pipeline call, so inside the model's `guarded(...)` block, as a slow or full card would."""

    def inject_oom(self) -> None:
        raise_oom_once(self)

    def load_model(self) -> None:
        super().load_model()
        forward = self.pipe.transformer.forward

        def slow_forward(*args, **kwargs):
            import time

            time.sleep(SLOW_STEP_S)
            return forward(*args, **kwargs)

        self.pipe.transformer.forward = slow_forward
