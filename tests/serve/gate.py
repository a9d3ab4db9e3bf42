"""Test models: one that holds each request until the test opens a gate, one that is slow, and
a real out-of-memory error on demand.

Lets a test fill a queue deterministically (no sleeps tuned to this machine): requests enter the
model and wait on a Ray actor; the test watches how many are waiting and opens the gate.
"""

from __future__ import annotations

import asyncio

import ray

from deployments.real import RealModel
from deployments.text_encoder import TextEncoder

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


HOLD_PROMPT = "hold in the text encoder"
"""A request with this prompt waits in the (gated) text encoder until the gate opens."""
OVERLAP_PROMPT = "meet the adapter load"
"""A request with this prompt is encoded only once the model replica has started loading its
version, and that load finishes only once the encoding has started: if the two ran one after the
other instead of together, neither would."""
RENDEZVOUS_NAME = "imgserve-test-rendezvous"
MEET_TIMEOUT_S = 60.0


@ray.remote(num_cpus=0)
class Rendezvous:
    """Named events two deployments wait for each other on; `arm` makes the model's next adapter
    load take part."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.armed = False

    def _event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    def arm(self) -> None:
        self.events, self.armed = {}, True

    def take(self) -> bool:
        armed, self.armed = self.armed, False
        return armed

    def arrive(self, name: str) -> None:
        self._event(name).set()

    async def meet(self, name: str) -> None:
        """Wait until `name` arrived; TimeoutError after MEET_TIMEOUT_S (the request then fails)."""
        await asyncio.wait_for(self._event(name).wait(), MEET_TIMEOUT_S)


def _meet(arrive: str, wait_for: str) -> None:
    rendezvous = ray.get_actor(RENDEZVOUS_NAME)
    ray.get(rendezvous.arrive.remote(arrive))
    ray.get(rendezvous.meet.remote(wait_for))


class StageTestEncoder(TextEncoder):
    """TextEncoder that holds HOLD_PROMPT requests at the gate and meets the adapter load for
    OVERLAP_PROMPT ones."""

    def encode_now(self, task, prepared, params):
        if params.prompt == HOLD_PROMPT:
            ray.get(ray.get_actor(GATE_NAME).wait.remote())
        elif params.prompt == OVERLAP_PROMPT:
            _meet("encoding", "loading")
        return super().encode_now(task, prepared, params)


class MeetingRealModel(RealModel):
    """RealModel whose next version load after `Rendezvous.arm` waits for the encoding to start."""

    def ensure_adapter(self, version):
        if ray.get(ray.get_actor(RENDEZVOUS_NAME).take.remote()):
            _meet("loading", "encoding")
        return super().ensure_adapter(version)
