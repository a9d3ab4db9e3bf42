"""Abandoned work stops, without Ray: the scaffold's stoppable progress and `Model.on_request`
(a cancelled request stops at its next boundary, its caller waits for the thread's end, one that
has not started never runs, the stop counted by reason), anime's path, the orchestrator's
abandoned and model-time metrics, and the graceful shutdown the builder derives."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from deployments import metrics
from deployments.anime import AnimeModel, AnimeModelConfig, AnimeParams
from deployments.model import Abandoned, Model, Stoppable
from deployments.options import DeploymentOptions, longest_request_s, model_serving
from deployments.postprocess import Encoded
from deployments.records import Deadline, Generated, Prepared, PreparedImage
from deployments.tasks import TASKS
from serve_app.config import load_config
from serve_app.orchestrator import Handles, Orchestrator


class Recorder:
    def __init__(self, stop_at: int | None = None) -> None:
        self.seen: list[Any] = []
        self.stop_at = stop_at

    def stage(self, name: str) -> None:
        self.seen.append(name)

    def step(self, step: int, total: int) -> bool:
        self.seen.append((step, total))
        return step == self.stop_at


class Plain(Model):
    task = "plain"

    def load_model(self) -> None:
        pass

    def loaded(self) -> bool:
        return True


def test_the_stoppable_progress_forwards_until_its_signal_and_then_stops_at_the_next_boundary() -> None:
    inner = Recorder(stop_at=5)
    progress = Stoppable(inner)
    progress.stage("denoise")
    assert progress.step(1, 10) is False
    assert progress.step(5, 10) is True  # the inner progress (a job's cancel) still decides
    progress.signal.set()
    with pytest.raises(Abandoned, match="after step 2 of 10"):
        progress.step(2, 10)
    with pytest.raises(Abandoned, match="before decode"):
        progress.stage("decode")
    assert inner.seen == ["denoise", (1, 10), (5, 10), (2, 10)]


def gated_work(entered: threading.Event, release: threading.Event, steps: list[int], at: int = 3):
    def work(progress: Any) -> str:
        for step in range(1, 101):
            if step == at:
                entered.set()
                release.wait()
            steps.append(step)
            progress.step(step, 100)
        return "done"

    return work


def test_a_cancelled_request_stops_at_its_next_step_and_its_caller_waits_for_that() -> None:
    model = Plain()
    entered, release, steps = threading.Event(), threading.Event(), []

    async def scenario() -> None:
        task = asyncio.create_task(model.on_request(gated_work(entered, release, steps)))
        await asyncio.to_thread(entered.wait)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
        assert not done  # the model thread is still on step 3: the request holds its slot
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert steps == [1, 2, 3]
    stats = model.stats()
    assert stats["stops"] == {"abandoned": 1}
    assert "after step 3 of 100" in stats["last_stop"]["message"]


def test_a_request_cancelled_before_the_model_thread_took_it_never_runs() -> None:
    model = Plain()
    entered, release, steps = threading.Event(), threading.Event(), []
    second: list[str] = []

    async def scenario() -> None:
        first = asyncio.create_task(model.on_request(gated_work(entered, release, steps)))
        await asyncio.to_thread(entered.wait)
        waiting = asyncio.create_task(model.on_request(lambda progress: second.append("ran")))
        await asyncio.sleep(0)  # it is queued behind the first on the model thread
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        result, seconds = await first
        assert result == "done" and seconds > 0

    asyncio.run(scenario())
    assert second == []
    assert model.stats()["last_stop"] == {"reason": "abandoned", "message": "stopped before it started"}


def test_a_request_cancelled_past_its_deadline_counts_as_a_timeout() -> None:
    model = Plain()
    entered, release = threading.Event(), threading.Event()

    def work(progress: Any) -> None:
        entered.set()
        release.wait()
        progress.stage("decode")

    async def scenario() -> None:
        task = asyncio.create_task(model.on_request(work, Deadline(time.time() - 1, 1.0)))
        await asyncio.to_thread(entered.wait)
        task.cancel()
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert model.stats()["stops"] == {"timeout": 1}
    assert "before decode" in model.stats()["last_stop"]["message"]


def prepared(width: int = 8) -> Prepared:
    info = PreparedImage((width, 8), (width, 8), (width, 8), 1.0, "PNG", "RGB")
    return Prepared(np.zeros((8, width, 3), np.uint8), info)


def test_an_anime_request_cancelled_before_it_started_never_runs() -> None:
    model = AnimeModel(AnimeModelConfig())
    entered, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def generate_batch(items: list[Prepared], params: list[AnimeParams]) -> list[Generated]:
        width = items[0].array.shape[1]
        ran.append(width)
        if width == 8:
            entered.set()
            release.wait()
        return [Generated(item.array, item.info, {"task": "anime"}, {"model_seconds": 0.0}) for item in items]

    model.generate_batch = generate_batch

    async def scenario() -> None:
        first = asyncio.create_task(model(prepared(8), AnimeParams()))
        await asyncio.to_thread(entered.wait)
        second = asyncio.create_task(model(prepared(16), AnimeParams()))
        await asyncio.sleep(0)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        assert (await first).array.shape == (8, 8, 3)

    asyncio.run(scenario())
    assert ran == [8]
    assert model.stats()["stops"] == {"abandoned": 1}


def test_anime_results_carry_their_batch_time_as_model_seconds(tmp_path) -> None:
    model = AnimeModel(AnimeModelConfig(), cache_dir=tmp_path)
    model.load()
    good, bad = model.generate_batch([prepared(8), prepared(8)], [AnimeParams(), AnimeParams(style="nope")])
    assert isinstance(good, Generated) and good.served["model_seconds"] >= 0
    assert isinstance(bad, Exception)


# -- the orchestrator ------------------------------------------------------------------------------
class Response:
    """A DeploymentResponse stand-in: awaits `result` (a coroutine function), remembers `cancel`."""

    def __init__(self, result: Any, log: list[str], name: str) -> None:
        self.result, self.log, self.name = result, log, name

    def __await__(self):
        return self.result().__await__()

    def cancel(self) -> None:
        self.log.append(f"cancel {self.name}")


class Method:
    def __init__(self, result: Any, log: list[str], name: str) -> None:
        self.result, self.log, self.name = result, log, name

    def remote(self, *args: Any, **kwargs: Any) -> Response:
        async def call() -> Any:
            return await self.result(*args)

        return Response(call, self.log, self.name)


class Handle:
    def __init__(self, **methods: Method) -> None:
        self.__dict__.update(methods)
        self.call = methods.get("call")

    def remote(self, *args: Any) -> Response:
        return self.call.remote(*args)


def orchestrator(model: Any, log: list[str]) -> Orchestrator:
    config = load_config({"anime": {"styles_dir": "tiny"}})

    async def prepare(image: bytes, spec: Any, **_: Any) -> Prepared:
        return prepared(8)

    async def encode(generated: Generated, fmt: str) -> Encoded:
        return Encoded(b"png", "image/png", {}, served=generated.served)

    handles = Handles(preprocess=Handle(prepare=Method(prepare, log, "preprocess")),
                      models={task.name: Handle(call=Method(model, log, task.name)) for task in TASKS},
                      postprocess=Handle(encode=Method(encode, log, "postprocess")))
    return Orchestrator(TASKS, config.sections(), config.preprocess, config.cache_dir, handles)


def test_a_finished_run_reports_and_records_its_model_time_for_the_key() -> None:
    async def model(item: Prepared, params: Any, progress: Any) -> Generated:
        return Generated(item.array, item.info, {"task": "anime"}, {"model_seconds": 0.25})

    runner = orchestrator(model, [])
    with metrics.capture() as records:
        encoded = asyncio.run(runner.run(runner.resolve("anime", {}), b"x", key_id="k1", caller="http"))
    assert encoded.served["model_seconds"] == 0.25
    assert ("imgserve_model_seconds", 0.25, {"task": "anime", "key_id": "k1"}) in records
    assert not [r for r in records if r[0] == "imgserve_abandoned"]


@pytest.mark.parametrize(("caller", "reason"), [("http", "client_disconnected"), ("handle", "caller_cancelled"),
                                                ("job", None)])
def test_a_cancelled_run_cancels_the_model_request_and_counts_who_went_away(caller: str, reason: str | None) -> None:
    log: list[str] = []
    entered = asyncio.Event()

    async def model(item: Prepared, params: Any, progress: Any) -> Generated:
        entered.set()
        await asyncio.Event().wait()  # until cancelled

    runner = orchestrator(model, log)

    async def scenario() -> None:
        task = asyncio.create_task(runner.run(runner.resolve("anime", {}), b"x", caller=caller))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with metrics.capture() as records:
        asyncio.run(scenario())
    assert log == ["cancel anime"]  # the model's request is cancelled explicitly
    abandoned = [tags for name, _, tags in records if name == "imgserve_abandoned"]
    assert abandoned == ([{"task": "anime", "reason": reason}] if reason else [])


def test_a_run_past_its_time_limit_cancels_the_model_and_counts_a_timeout() -> None:
    from deployments.errors import TimedOut

    log: list[str] = []

    async def model(item: Prepared, params: Any, progress: Any) -> Generated:
        await asyncio.Event().wait()

    runner = orchestrator(model, log)
    with metrics.capture() as records, pytest.raises(TimedOut):
        asyncio.run(runner.run(runner.resolve("anime", {}), b"x", timeout_s=0.05))
    assert log == ["cancel anime"]
    assert [tags for name, _, tags in records if name == "imgserve_abandoned"] == [
        {"task": "anime", "reason": "timeout"}]


# -- graceful shutdown -------------------------------------------------------------------------------
def test_model_deployments_drain_for_their_longest_request_unless_their_section_says() -> None:
    from serve_app.app import model_shutdown_s

    config = load_config({"ingress": {"request_timeout_s": 600}, "jobs": {"max_run_s": 900}})
    assert model_shutdown_s(config) == 930.0
    assert longest_request_s(None, None) == 3600.0
    unset = DeploymentOptions()
    assert unset.serve_options()["graceful_shutdown_timeout_s"] == 20.0  # any other deployment
    served = model_serving(unset.serve_options(), unset, 930.0)
    assert served["graceful_shutdown_timeout_s"] == 930.0 and served["graceful_shutdown_wait_loop_s"] == 2.0
    assert served["ray_actor_options"]["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    own = DeploymentOptions(graceful_shutdown_timeout_s=45, graceful_shutdown_wait_loop_s=1,
                            ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1"}}})
    served = model_serving(own.serve_options(), own, 930.0)
    assert served["graceful_shutdown_timeout_s"] == 45 and served["graceful_shutdown_wait_loop_s"] == 1
    assert served["ray_actor_options"]["runtime_env"]["env_vars"]["A"] == "1"
