"""Test models: one that holds each request until the test opens a gate, one that is slow, and
a real out-of-memory error on demand.

Lets a test fill a queue deterministically (no sleeps tuned to this machine): requests enter the
model and wait on a Ray actor; the test watches how many are waiting and opens the gate.
"""

from __future__ import annotations

import asyncio
import threading

import ray

from deployments.anime import AnimeModel
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

    def mark(self, name: str) -> None:
        """Note that `name` happened (a test model's signal to the test)."""
        self.marks_seen = [*getattr(self, "marks_seen", []), name]

    def marks(self) -> list[str]:
        return list(getattr(self, "marks_seen", []))


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


class _StepHold:
    """A request's progress that records each finished step on `model` and, while the gate is
    closed at a step (`Gate.close(step)`), waits on the gate after that step."""

    def __init__(self, progress, gate, at, model, seed) -> None:
        self.progress, self.gate, self.at, self.model, self.seed = progress, gate, at, model, seed

    def stage(self, name: str) -> None:
        if self.progress is not None:
            self.progress.stage(name)

    def step(self, step: int, total: int) -> bool:
        self.model.log.append(("step", self.seed, step))
        if step == self.at:
            ray.get(self.gate.wait.remote())
        return self.progress.step(step, total) if self.progress is not None else False


class SteppedRealModel(RealModel):
    """RealModel whose requests (sync ones too) wait on the test gate after the gate's step
    (`Gate.close(step)`) and log what the replica did, in order (`history()`): ("enter", seed) when
    a request reaches the deployment, ("step", seed, i) after each denoising step, ("end", seed,
    outcome) when it leaves. Tells a test which request ran, how far, and in which order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple] = []

    def history(self) -> list[tuple]:
        return list(self.log)

    async def __call__(self, prepared, params, progress=None, conditioning=None):
        self.log.append(("enter", params.seed))
        try:
            generated = await super().__call__(prepared, params, progress, conditioning)
        except BaseException as exc:
            self.log.append(("end", params.seed, type(exc).__name__))
            raise
        self.log.append(("end", params.seed, "ok"))
        return generated

    def generate(self, prepared, params, progress=None, conditioning=None):
        gate = ray.get_actor(GATE_NAME)
        done = threading.Event()
        if progress is not None and hasattr(progress, "signal"):  # the scaffold's stoppable progress
            threading.Thread(target=_tell_stopping, args=(progress.signal, done, gate, params.seed), daemon=True).start()
        try:
            held = _StepHold(progress, gate, ray.get(gate.at_step.remote()), self, params.seed)
            return super().generate(prepared, params, held, conditioning)
        finally:
            done.set()


def _tell_stopping(signal: threading.Event, done: threading.Event, gate, seed: int) -> None:
    """Marks `stopping <seed>` on the gate once the request's stop signal is set (its caller went
    away), while the model thread may still be held: the test's signal that the cancellation
    arrived. Polls, because the model thread may be blocked on the gate itself."""
    while not done.is_set():
        if signal.wait(0.05):
            ray.get(gate.mark.remote(f"stopping {seed}"))
            return


ANIME_HOLD = -1
"""`Gate.close(ANIME_HOLD)`: every anime batch waits on the gate before it runs."""


class GatedAnimeModel(AnimeModel):
    """AnimeModel whose batches wait on the test gate while it is closed at ANIME_HOLD, and which
    logs the image sizes (height, width) of every batch it ran (`batches_run()`): a test tells its
    requests apart by size."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ran: list[list[tuple[int, int]]] = []

    def batches_run(self) -> list[list[tuple[int, int]]]:
        return list(self.ran)

    def generate_batch(self, prepared, params):
        gate = ray.get_actor(GATE_NAME)
        if ray.get(gate.at_step.remote()) == ANIME_HOLD:
            ray.get(gate.wait.remote())
        self.ran.append([item.array.shape[:2] for item in prepared])
        return super().generate_batch(prepared, params)
