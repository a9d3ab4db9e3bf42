"""The ingress's shared event follower (serve_app/events.py) against a fake job runner: one
`wait_events` call at a time whatever the number of streams, none with no stream open, the caps,
heartbeats, the lifetime, queue positions and resuming with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from deployments.errors import InvalidParameter
from serve_app.config import IngressSection
from serve_app.errors import TooManyStreams
from serve_app.events import HEARTBEAT, LIFETIME_END, EventHub, last_event_id


def event(state: str, stage: str | None = None, step: int | None = None) -> dict[str, Any]:
    return {"state": state, "stage": stage, "step": step, "total_steps": 3 if step else None}


class _Call:
    """What `handle.method.remote(...)` returns: awaitable, cancellable."""

    def __init__(self, coroutine: Any) -> None:
        self.task = asyncio.ensure_future(coroutine)

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.task.cancel()


class FakeRunner:
    """The runner's `wait_events` long poll over in-memory event logs; counts its calls and how
    many are in flight at once."""

    def __init__(self) -> None:
        self.logs: dict[str, list[dict[str, Any]]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.changed = asyncio.Event()
        self.wait_events = self  # `runner.wait_events.remote(...)`

    def add(self, job_id: str, *events: dict[str, Any], position: int | None = None) -> None:
        self.logs.setdefault(job_id, []).extend(events)
        last = self.logs[job_id][-1]
        self.statuses[job_id] = {**last, "id": job_id, "queue_position": position}
        self.changed.set()
        self.changed = asyncio.Event()

    def remote(self, cursors: dict[str, int], timeout_s: float) -> _Call:
        self.calls += 1
        return _Call(self._wait(dict(cursors), timeout_s))

    async def _wait(self, cursors: dict[str, int], timeout_s: float) -> dict[str, Any]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                answer = {job: (self.logs[job][cursor:], self.statuses[job]) for job, cursor in cursors.items()
                          if job in self.logs and (self.logs[job][cursor:] or self.statuses[job]["state"] in
                                                   ("succeeded", "failed", "cancelled"))}
                if answer or loop.time() >= deadline:
                    return answer
                try:
                    await asyncio.wait_for(self.changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    pass
        finally:
            self.in_flight -= 1


def settings(**overrides: Any) -> IngressSection:
    return IngressSection(**{"max_event_streams": 50, "max_event_streams_per_key": 50, **overrides})


async def read_until_end(hub: EventHub, stream: Any) -> list[str]:
    return [frame async for frame in hub.frames(stream)]


def progress(frames: list[str]) -> list[dict[str, Any]]:
    return [json.loads(frame.split("data: ", 1)[1]) for frame in frames if frame.startswith("event: progress")]


def test_many_streams_share_one_call_and_each_gets_its_jobs_events_in_order() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        hub = EventHub(runner, settings(), poll_timeout_s=30)
        jobs = [f"job{i}" for i in range(5)]
        for job in jobs:
            runner.add(job, event("queued"), position=0)
        streams = []
        for job in jobs:
            for _ in range(4):  # 20 streams, four per job
                stream = hub.admit(job, "ip:1.2.3.4")
                hub.follow(stream)
                streams.append(stream)
        readers = [asyncio.ensure_future(read_until_end(hub, s)) for s in streams]
        await asyncio.sleep(0.05)
        for step in (1, 2, 3):
            for job in jobs:
                runner.add(job, event("running", "denoise", step))
            await asyncio.sleep(0.01)
        for job in jobs:
            runner.add(job, event("succeeded", "done"))
        results = await asyncio.wait_for(asyncio.gather(*readers), 10)
        for stream, frames in zip(streams, results):
            seen = progress(frames)
            assert [(e["state"], e["step"]) for e in seen] == [
                ("queued", None), ("running", 1), ("running", 2), ("running", 3), ("succeeded", None)], stream.job_id
            assert seen[0]["queue_position"] == 0 and seen[1]["queue_position"] is None
        assert runner.most_in_flight == 1  # one long poll at a time for all 20 streams
        assert runner.calls < 20
        # every stream ended: its reservation is back and the follower stops calling the runner
        assert hub.total == 0 and not hub.followed
        await asyncio.sleep(0.05)
        calls = runner.calls
        await asyncio.sleep(0.2)
        assert runner.calls == calls and runner.in_flight == 0

    asyncio.run(scenario())


def test_a_stream_opened_while_a_call_waits_gets_its_past_events_at_once() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        hub = EventHub(runner, settings(), poll_timeout_s=30)
        runner.add("a", event("queued"), position=0)
        runner.add("b", event("running", "denoise", 1))
        first = hub.admit("a", "k1")
        hub.follow(first)
        reader_a = asyncio.ensure_future(read_until_end(hub, first))
        await asyncio.sleep(0.05)  # the follower now waits for news of `a` only (30 s)
        second = hub.admit("b", "k1")
        hub.follow(second)
        batch = await asyncio.wait_for(second.frames.get(), 5)  # not after the 30 s poll
        assert progress(batch)[0]["step"] == 1
        runner.add("a", event("cancelled", "cancelled"))
        assert progress(await asyncio.wait_for(reader_a, 5))[-1]["state"] == "cancelled"
        hub.close(second)
        assert hub.total == 0

    asyncio.run(scenario())


def test_caps_per_replica_and_per_key_and_close_gives_the_slot_back() -> None:
    hub = EventHub(FakeRunner(), settings(max_event_streams=3, max_event_streams_per_key=2))
    a1, a2 = hub.admit("j", "key-a"), hub.admit("j", "key-a")
    with pytest.raises(TooManyStreams) as per_key:
        hub.admit("j", "key-a")
    assert per_key.value.retry_after_s >= 1 and "this key" in per_key.value.message
    b1 = hub.admit("j", "key-b")
    with pytest.raises(TooManyStreams, match="this ingress replica"):
        hub.admit("j", "key-c")
    hub.close(a1)
    hub.close(a1)  # idempotent
    assert hub.total == 2
    hub.admit("j", "key-c")
    for stream in (a2, b1):
        hub.close(stream)
    assert hub.open == {"key-c": 1}


def test_a_quiet_stream_gets_heartbeats_and_ends_at_its_lifetime() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.add("j", event("running", "denoise", 1))
        hub = EventHub(runner, settings(event_heartbeat_s=0.05, event_stream_max_s=0.5), poll_timeout_s=30)
        stream = hub.admit("j", "k")
        hub.follow(stream)
        frames = await asyncio.wait_for(read_until_end(hub, stream), 10)
        assert progress(frames)[0]["step"] == 1
        assert HEARTBEAT in frames and frames[-1] == LIFETIME_END
        assert all(f.startswith((":", "event: progress")) for f in frames)  # comments: no reader takes them for events
        assert hub.total == 0 and not hub.followed

    asyncio.run(scenario())


def test_queue_moves_become_queued_events_and_a_final_status_ends_the_stream() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.add("j", event("queued"), position=2)
        hub = EventHub(runner, settings(), poll_timeout_s=30, queue_refresh_s=0.1)
        stream = hub.admit("j", "k")
        hub.follow(stream)
        frames = hub.frames(stream)
        seen = [progress([await asyncio.wait_for(anext(frames), 5)])[0]]
        # another job left the queue: no event for this one, only its status changes
        runner.statuses["j"] = {**runner.statuses["j"], "queue_position": 1}
        seen += progress([await asyncio.wait_for(anext(frames), 5)])
        # the job failed; its final event is not recorded yet (the store is written first)
        runner.statuses["j"] = {**event("failed", "failed"), "id": "j", "queue_position": None}
        seen += progress([frame async for frame in frames])
        assert [(e["state"], e["queue_position"]) for e in seen] == [("queued", 2), ("queued", 1), ("failed", None)]
        assert seen[-1] == {"state": "failed", "stage": "failed", "step": None, "total_steps": None,
                            "queue_position": None}
        assert hub.total == 0

    asyncio.run(scenario())


def test_a_forgotten_job_ends_its_stream() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.add("j", event("running", "denoise", 1))
        hub = EventHub(runner, settings(), poll_timeout_s=30)
        stream = hub.admit("j", "k")
        hub.follow(stream)
        frames = hub.frames(stream)
        await asyncio.wait_for(anext(frames), 5)
        runner.logs.pop("j")  # retention forgot it: the runner answers ([], None)
        runner.remote = lambda cursors, timeout_s: _Call(_answer({job: ([], None) for job in cursors}))
        hub._changed.set()  # the fake does not wake its waiters for this
        assert [frame async for frame in frames] == []
        assert hub.total == 0

    asyncio.run(scenario())


async def _answer(value: Any) -> Any:
    return value


def test_a_reconnecting_client_resumes_after_its_last_event_id() -> None:
    async def scenario() -> None:
        runner = FakeRunner()
        runner.add("j", event("queued"), event("running", "preprocess"), event("running", "denoise", 1))
        hub = EventHub(runner, settings(), poll_timeout_s=30)
        stream = hub.admit("j", "k", cursor=last_event_id("2"))
        hub.follow(stream)
        reader = asyncio.ensure_future(read_until_end(hub, stream))
        await asyncio.sleep(0.05)
        runner.add("j", event("succeeded", "done"))
        frames = await asyncio.wait_for(reader, 5)
        assert [(e["stage"], e["step"]) for e in progress(frames)] == [("denoise", 1), ("done", None)]
        assert [f.split("\n")[1] for f in frames] == ["id: 3", "id: 4"]

    asyncio.run(scenario())


@pytest.mark.parametrize("value", ["-1", "x", "1.5", str(10**12)])
def test_a_last_event_id_that_is_not_ours_is_refused_naming_the_header(value: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        last_event_id(value)
    assert refused.value.field == "Last-Event-ID"
    assert last_event_id(None) == 0 and last_event_id("") == 0
