"""Job event streams (`GET /v1/jobs/{id}/events`) of one ingress replica, and the one follower they share.

Contract:
- `EventHub.admit(job_id, who, cursor)` reserves a stream or raises `TooManyStreams` (429): at most
  `ingress.max_event_streams` per replica and `ingress.max_event_streams_per_key` per `who` (the
  API key id, else `ip:<client address>`). The route checks the caller may see the job
  (`status(job_id, owner)`) and only then calls `follow(stream)`; `close(stream)` (idempotent)
  gives the reservation back — `EventResponse` does so however the response ends.
- One follower task per replica holds the cursors of every followed stream and long-polls the job
  runner's `wait_events(cursors, timeout_s)` in one loop, handing each stream its new events
  through the stream's own queue. It runs only while a stream is followed: with none open the runner
  is not called at all. The runner sees one call per replica at a time, whatever the number of
  streams (the per-stream 100 ms polling it replaces made 10 calls a second per stream).
- The stream's frames are what the web page and the client read: `event: progress` with the event as
  JSON `data:`, plus `id: <n>` (the runner's event count so far: a reconnecting EventSource sends it
  back as `Last-Event-ID` and the stream resumes after it). A quiet stream gets an SSE comment
  `: keep-alive` every `ingress.event_heartbeat_s`; after `ingress.event_stream_max_s` the stream
  sends the comment `: stream lifetime reached ...` and ends: the client reconnects (EventSource does
  by itself, sending `Last-Event-ID`). Comments are ignored by every SSE reader, so no reader mistakes
  the end of a stream's lifetime for an event.
- `metrics.event_streams` (gauge) is the number of streams open on this replica, refreshed every
  second by `refresh_gauge` (the ingress's lifespan runs it): Ray's agent ages out a gauge left alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from deployments import metrics
from deployments.errors import InvalidParameter
from serve_app.errors import TooManyStreams
from serve_app.job_record import FINAL_STATES

log = logging.getLogger("imgserve")

POLL_TIMEOUT_S = 10.0
"""How long one `wait_events` call waits for news: streams with nothing to say cost one call per
this long per replica."""
QUEUE_REFRESH_S = 2.0
"""How often the queue positions of followed queued jobs are refreshed. A queued job's position
changes when another job leaves the queue, which records no event of its own: every this long the
follower asks for the queued jobs from their first event (cursor 0), which the runner answers at
once with their status; each stream still gets only the events it has not had."""
RETRY_S = 1.0
"""Pause after a failed `wait_events` call (the runner is restarting) before the next one."""
GAUGE_S = 1.0
HEARTBEAT = ": keep-alive\n\n"
LIFETIME_END = (": stream lifetime reached (ingress.event_stream_max_s); reconnect, with Last-Event-ID "
                "to resume after the last event\n\n")
MAX_EVENT_ID = 10**9


def last_event_id(value: str | None) -> int:
    """The cursor a reconnecting client resumes from (its `Last-Event-ID`); 0 without one."""
    if value is None or value.strip() == "":
        return 0
    value = value.strip()
    if not value.isdigit() or int(value) > MAX_EVENT_ID:
        raise InvalidParameter("must be an event id this service sent (a non-negative integer)", "Last-Event-ID")
    return int(value)


def final_event(status: dict[str, Any]) -> dict[str, Any]:
    """The final event as the runner records it when a job ends; used when the status is final
    but its event is not recorded yet (the store is written first)."""
    state = status["state"]
    return {"state": state, "stage": "done" if state == "succeeded" else state, "step": None, "total_steps": None}


@dataclass(eq=False)
class Stream:
    """One open event stream: the job, who holds it, how many of the job's events it has had."""

    job_id: str
    who: str
    cursor: int = 0
    position: int | None = None
    state: str | None = None
    """The job's state in the last status seen."""
    done: bool = False
    closed: bool = False
    frames: asyncio.Queue = field(default_factory=asyncio.Queue)
    """Lists of SSE frames to send, in order; filled by the follower."""

    def deliver(self, new: list[dict[str, Any]], status: dict[str, Any] | None) -> None:
        """Turn the runner's answer for this stream's job into frames: one `progress` event per
        change of state, stage, step or queue position, ending with the final state. No status:
        the job is gone (forgotten by retention): the stream ends."""
        if status is None:
            self.done = True
            self.frames.put_nowait([])
            return
        self.state = status["state"]
        if status["state"] == "queued" and status.get("queue_position") != self.position:
            self.position = status.get("queue_position")
            if not any(event["state"] == "queued" for event in new):  # the queue moved: no event of its own
                new = [*new, {"state": "queued", "stage": None, "step": None, "total_steps": None, "synthetic": True}]
        if status["state"] in FINAL_STATES and not any(event["state"] in FINAL_STATES for event in new):
            new = [*new, {**final_event(status), "synthetic": True}]
        frames = []
        for event in new:
            if not event.pop("synthetic", False):
                self.cursor += 1
            event = {**event, "queue_position": self.position if event["state"] == "queued" else None}
            frames.append(f"event: progress\nid: {self.cursor}\ndata: {json.dumps(event)}\n\n")
            if event["state"] in FINAL_STATES:
                self.done = True
                break
        if frames:
            self.frames.put_nowait(frames)


class EventHub:
    """The event streams of one ingress replica and the follower they share (see the module)."""

    def __init__(self, runner: Any, settings: Any, poll_timeout_s: float = POLL_TIMEOUT_S,
                 queue_refresh_s: float = QUEUE_REFRESH_S) -> None:
        self.runner = runner
        self.settings = settings
        self.poll_timeout_s = poll_timeout_s
        self.queue_refresh_s = queue_refresh_s
        self.open: dict[str, int] = {}
        """who → streams reserved or open."""
        self.followed: list[Stream] = []
        self.calls = 0
        """`wait_events` calls made (tests and benchmarks read it)."""
        self._inflight: dict[str, int] | None = None
        self._queue_refreshed = 0.0
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def total(self) -> int:
        return sum(self.open.values())

    def admit(self, job_id: str, who: str, cursor: int = 0) -> Stream:
        """Reserve a stream for `who`, or raise TooManyStreams."""
        if self.total >= self.settings.max_event_streams:
            raise TooManyStreams(f"this ingress replica has {self.settings.max_event_streams} event streams open; "
                                 "retry later or poll GET /v1/jobs/{id}", retry_after_s=self.settings.retry_after_s)
        if self.open.get(who, 0) >= self.settings.max_event_streams_per_key:
            raise TooManyStreams(f"{self.settings.max_event_streams_per_key} event streams are open for this key; "
                                 "close one or poll GET /v1/jobs/{id}", retry_after_s=self.settings.retry_after_s)
        self.open[who] = self.open.get(who, 0) + 1
        metrics.event_streams.set(self.total)
        return Stream(job_id, who, cursor)

    def follow(self, stream: Stream) -> None:
        """Start handing `stream` its job's events (after the route checked the caller may see it)."""
        if stream.closed:
            return
        self.followed.append(stream)
        inflight = self._inflight
        if inflight is not None and inflight.get(stream.job_id, stream.cursor + 1) > stream.cursor:
            self._changed.set()  # the call in flight does not ask for this stream's events: ask again
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    def close(self, stream: Stream) -> None:
        """Give the stream's reservation back and stop following it (idempotent)."""
        if stream.closed:
            return
        stream.closed = True
        if stream in self.followed:
            self.followed.remove(stream)
        left = self.open.get(stream.who, 1) - 1
        if left > 0:
            self.open[stream.who] = left
        else:
            self.open.pop(stream.who, None)
        metrics.event_streams.set(self.total)
        if not self.followed:
            self._changed.set()  # the follower stops calling the runner

    async def refresh_gauge(self) -> None:
        """Set the open-streams gauge every second, for the life of the replica."""
        while True:
            metrics.event_streams.set(self.total)
            await asyncio.sleep(GAUGE_S)

    async def frames(self, stream: Stream) -> AsyncIterator[str]:
        """The stream's SSE frames: events as they come, heartbeats when quiet, an end at its lifetime."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.event_stream_max_s
        try:
            while not stream.done or not stream.frames.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    yield LIFETIME_END
                    return
                try:
                    batch = await asyncio.wait_for(stream.frames.get(), min(self.settings.event_heartbeat_s, remaining))
                except asyncio.TimeoutError:
                    if loop.time() < deadline:
                        yield HEARTBEAT
                    continue
                for frame in batch:
                    yield frame
        finally:
            self.close(stream)

    # -- the follower ------------------------------------------------------------------------------
    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.followed:
                cursors: dict[str, int] = {}
                for stream in self.followed:
                    cursors[stream.job_id] = min(cursors.get(stream.job_id, stream.cursor), stream.cursor)
                timeout_s = self.poll_timeout_s
                if any(stream.state == "queued" for stream in self.followed):
                    due = self._queue_refreshed + self.queue_refresh_s - loop.time()
                    if due <= 0:  # answered at once, with every queued job's current position
                        cursors.update({s.job_id: 0 for s in self.followed if s.state == "queued"})
                        self._queue_refreshed = loop.time()
                    timeout_s = min(timeout_s, max(due, 0.0) or self.queue_refresh_s)
                self._changed.clear()
                self._inflight = cursors
                response = self.runner.wait_events.remote(cursors, timeout_s)
                self.calls += 1
                call = asyncio.ensure_future(response)
                woken = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait({call, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if not call.done():  # streams changed: drop this call and ask for what is wanted now
                    response.cancel()
                    call.cancel()
                    continue
                try:
                    answer = call.result()
                except Exception as exc:  # the runner is restarting, or refused: the streams wait
                    log.warning("event follower: wait_events failed (%s); retrying in %.0f s", exc, RETRY_S)
                    await asyncio.sleep(RETRY_S)
                    continue
                self._fan_out(cursors, answer)
        finally:
            self._inflight = None
            self._task = None

    def _fan_out(self, cursors: dict[str, int], answer: dict[str, Any]) -> None:
        for job_id, (events, status) in answer.items():
            base = cursors.get(job_id)
            if base is None:
                continue
            for stream in [s for s in self.followed if s.job_id == job_id]:
                if stream.cursor < base:
                    continue  # opened after the call left: the next call asks from its cursor
                stream.deliver([dict(event) for event in events[stream.cursor - base:]], status)
                if stream.done:
                    self.followed.remove(stream)


class EventResponse(StreamingResponse):
    """The SSE response of one stream; gives the stream back however the response ends (finished,
    client gone, or cancelled before its body started)."""

    def __init__(self, hub: EventHub, stream: Stream) -> None:
        super().__init__(hub.frames(stream), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.hub = hub
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.hub.close(self.stream)
