"""The job runner without Ray: owners, listing, quotas, fair dispatch, cancel racing completion,
leases, time limits, shutdown hand-back and long-polled events, with a scripted orchestrator whose
runs wait on the test's signal."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.errors import Cancelled, InvalidParameter
from deployments.postprocess import Encoded
from serve_app.config import load_config
from serve_app.errors import NotFound, QuotaExceeded
from serve_app.jobs import JobRunner
from serve_app.orchestrator import Handles, Orchestrator

A, B = "aaaa0001", "bbbb0002"


class Named:
    """Stands for a deployment handle: only its name is read (run_timeout messages)."""

    def __init__(self, name: str) -> None:
        self.deployment_name = name


class Scripted(Orchestrator):
    """`run` records the job's input, reports a stage, waits for `release` (open unless `hold()`),
    reports one step (stopping when told to) and returns `result:<input>`."""

    def __init__(self, directory: Path) -> None:
        config = load_config({})
        handles = Handles(preprocess=Named("Preprocess"), models={"anime": Named("AnimeModel")},
                          postprocess=Named("Postprocess"))
        super().__init__(config.tasks, config.sections(), config.preprocess, directory, handles)
        self.entered: list[bytes] = []
        self.calls: list[dict[str, Any]] = []
        self.release: asyncio.Event | None = None
        self.check_steps = True

    def hold(self) -> None:
        self.release = asyncio.Event()

    async def run(self, request, image, progress=None, timeout_s=None, key_id=None, caller="handle") -> Encoded:
        self.entered.append(image)
        self.calls.append({"key_id": key_id, "caller": caller})
        progress.stage("preprocess")
        if self.release is not None:
            await self.release.wait()
        if progress.step(1, 1) and self.check_steps:
            raise Cancelled("cancelled by the client")
        return Encoded(data=b"result:" + image, media_type="image/png", metadata={}, served={"model_seconds": 0.25})


def make_runner(tmp_path: Path, **jobs: Any) -> tuple[JobRunner, Scripted]:
    settings = {"directory": str(tmp_path / "jobs"), "housekeeping_s": 0.05, "min_free_bytes": 0, **jobs}
    orchestrator = Scripted(tmp_path)
    return JobRunner(load_config({"jobs": settings}).jobs, orchestrator), orchestrator


async def until(condition, what: str, timeout: float = 30.0) -> Any:
    """Await `condition()` truthy (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return value


def state(runner: JobRunner, job_id: str, owner: str | None = None) -> str:
    return runner.status(job_id, owner)["state"]


def test_jobs_belong_to_their_owner_and_list_newest_first(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path)

    async def scenario() -> None:
        mine = [(await runner.submit("anime", b"x", {}, owner=A))["id"] for _ in range(3)]
        theirs = (await runner.submit("anime", b"x", {}, owner=B))["id"]
        for call in (runner.status, runner.cancel, runner.result, runner.events):
            with pytest.raises(NotFound):
                call(theirs, owner=A)
            with pytest.raises(NotFound):
                call(theirs)  # keys off (owner None) is not a key that owns it either
        assert "owner" not in runner.status(mine[0], A)
        page = runner.list_jobs(owner=A, limit=2)
        assert [j["id"] for j in page["data"]] == mine[:0:-1] and page["object"] == "list"
        rest = runner.list_jobs(owner=A, limit=2, cursor=page["next_cursor"])
        assert [j["id"] for j in rest["data"]] == mine[:1] and rest["next_cursor"] is None
        assert runner.list_jobs(owner=A, state="succeeded")["data"] == []
        assert len(runner.list_jobs(owner=A, state="queued", task="anime")["data"]) == 3
        for bad, field in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"state": "done"}, "state"),
                           ({"cursor": "not-a-cursor"}, "cursor"), ({"task": "sketch"}, "task")):
            with pytest.raises(InvalidParameter) as refused:
                runner.list_jobs(owner=A, **bad)
            assert refused.value.field == field

    asyncio.run(scenario())


def test_per_key_quota_with_a_retry_hint(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path, max_queued_per_key=2)

    async def scenario() -> None:
        for _ in range(2):
            await runner.submit("anime", b"x", {}, owner=A)
        with pytest.raises(QuotaExceeded) as refused:
            await runner.submit("anime", b"x", {}, owner=A)
        assert refused.value.code == "quota_exceeded"
        await runner.submit("anime", b"x", {}, owner=B)  # another key is not affected
        for _ in range(2):  # keys off: counted per quota key (the client address the ingress passes)
            await runner.submit("anime", b"x", {}, quota_key="ip:10.0.0.1")
        with pytest.raises(QuotaExceeded):
            await runner.submit("anime", b"x", {}, quota_key="ip:10.0.0.1")
        await runner.submit("anime", b"x", {})  # no key at all: only max_queued applies

    asyncio.run(scenario())


def test_a_key_with_50_queued_jobs_does_not_hold_back_another_keys_single_job(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path, concurrency=1)

    async def scenario() -> None:
        for i in range(50):
            await runner.submit("anime", f"a{i}".encode(), {}, owner=A)
        await runner.submit("anime", b"b0", {}, owner=B)
        await runner.start()
        await until(lambda: len(orchestrator.entered) >= 3, "three runs")
        assert b"b0" in orchestrator.entered[:2], orchestrator.entered[:3]
        await runner.stop()

    asyncio.run(scenario())


def test_runs_account_model_time_for_the_key(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path)

    async def scenario() -> None:
        await runner.start()
        job = await runner.submit("anime", b"x", {}, owner=A)
        await until(lambda: state(runner, job["id"], A) == "succeeded", "the job")
        status, data, *_ = runner.result(job["id"], A)
        assert data == b"result:x" and status["model_seconds"] == 0.25
        assert orchestrator.calls == [{"key_id": A, "caller": "job"}]
        await runner.stop()

    asyncio.run(scenario())


def test_a_cancel_racing_completion_never_ends_succeeded(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path)
    orchestrator.check_steps = False  # the model finishes without seeing the cancel

    async def scenario() -> None:
        orchestrator.hold()
        await runner.start()
        job = (await runner.submit("anime", b"x", {}))["id"]
        await until(lambda: orchestrator.entered, "the run to start")
        assert runner.cancel(job)["state"] == "running"
        orchestrator.release.set()
        final = await until(lambda: (s := runner.status(job))["state"] != "running" and s, "the end")
        assert final["state"] == "cancelled"
        status, data, *_ = runner.result(job)
        assert data is None and status["state"] == "cancelled"
        await runner.stop()

    asyncio.run(scenario())


def test_queue_and_run_time_limits_fail_with_their_own_codes(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path, concurrency=1, max_wait_s=0.3, max_run_s=0.6)
    runner._placement = lambda: {"AnimeModel": (0, "no node has the resources"), "Preprocess": (1, "")}

    async def scenario() -> None:
        orchestrator.hold()  # the run waits for a model that never answers
        await runner.start()
        held = (await runner.submit("anime", b"held", {}))["id"]
        waiting = (await runner.submit("anime", b"waiting", {}))["id"]
        queued = await until(lambda: (s := runner.status(waiting))["state"] == "failed" and s, "queue_timeout")
        assert queued["error"]["code"] == "queue_timeout" and "max_wait_s" in queued["error"]["message"]
        ran = await until(lambda: (s := runner.status(held))["state"] == "failed" and s, "run_timeout")
        assert ran["error"]["code"] == "run_timeout"
        message = ran["error"]["message"]
        assert "'AnimeModel'" in message and "no replica placed" in message, message
        await until(lambda: not runner._running, "the run to be cancelled")
        await runner.stop()

    asyncio.run(scenario())


def test_a_dead_runners_lease_lapses_and_the_job_runs_again(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path, lease_s=0.2)

    async def scenario() -> None:
        job = (await runner.submit("anime", b"x", {}))["id"]
        stale = runner.store.claim_next("a-runner-that-died", lease_s=0.2)
        assert stale.id == job
        await runner.start()
        await until(lambda: state(runner, job) == "succeeded", "the re-queued job to run")
        assert runner.store.get(job).attempts == 2 and orchestrator.entered == [b"x"]
        await runner.stop()

    asyncio.run(scenario())


def test_shutdown_stops_claiming_and_hands_running_jobs_back(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path, concurrency=1)

    async def scenario() -> None:
        orchestrator.hold()
        await runner.start()
        running = (await runner.submit("anime", b"1", {}))["id"]
        queued = (await runner.submit("anime", b"2", {}))["id"]
        await until(lambda: orchestrator.entered, "the first run")
        await runner.stop()
        job = runner.store.get(running)
        assert job.state == "queued" and job.attempts == 0  # handed back, the attempt not spent
        assert state(runner, queued) == "queued" and orchestrator.entered == [b"1"]
        successor, again = make_runner(tmp_path, concurrency=1)
        await successor.start()
        await until(lambda: state(successor, queued) == "succeeded" and state(successor, running) == "succeeded",
                    "the successor to run both")
        await successor.stop()

    asyncio.run(scenario())


def test_wait_events_wakes_on_a_change_and_times_out_without_one(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path)

    async def scenario() -> None:
        orchestrator.hold()
        await runner.start()
        job = (await runner.submit("anime", b"x", {}))["id"]
        await until(lambda: orchestrator.entered, "the run")
        seen = len(runner.events(job)[0])
        assert await runner.wait_events({job: seen}, 0.05) == {}
        waiter = asyncio.ensure_future(runner.wait_events({job: seen}, 60))
        await asyncio.sleep(0)
        assert not waiter.done()
        orchestrator.release.set()
        answer = await asyncio.wait_for(waiter, 30)
        events, status = answer[job]
        assert events and events[0]["state"] == "running" and status["id"] == job
        await until(lambda: state(runner, job) == "succeeded", "the end")
        final = await runner.wait_events({job: 10_000}, 60)  # a finished job answers at once
        assert final[job][1]["state"] == "succeeded"
        assert await runner.wait_events({"0" * 32: 0}, 60) == {"0" * 32: ([], None)}
        await runner.stop()

    asyncio.run(scenario())
