"""Observability at the ingress: the outermost ASGI middleware, around every HTTP request.

It writes one JSON log line per request (`"event": "http_request"`, with the request id, method,
path, status, duration and the facts the routes and the access middleware noted: task, key id, job
id) and records the request metrics of task requests — `POST /v1/{task}` (`api=sync`) and
`POST /v1/jobs` (`api=jobs`) and `POST /v1/images/edits` (`api=openai`) — by task and the status they were answered with, whichever code path
produced the answer (validation, backpressure, time limits, an unexpected 500), counting the
refusals for capacity or time (429, 503, 504) by their JSON error code. Being outermost, it also
sees the access middleware's refusals (401, 429). The status is tracked once, here
(`AnswerStatus`): a request the client abandons reaches this middleware as a cancellation (Serve's
proxy answers it, outside this app) and is recorded as 499, the "client closed request" of common
proxies, so a dashboard's server-error rate does not count clients that gave up.

The metrics' task label is the path's task when it is one the service serves (the task names are
given to the constructor); for `POST /v1/jobs` it is the form's `task` field (for the OpenAI route
the task its `model` names), which the route notes
(`access.note`) once it has read the form. Anything else is `unknown`, so a client cannot create
label values. The metrics themselves are `deployments.metrics` (names, types and tags there).
Without a Serve proxy in front (a test client), it makes the request id itself and returns it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import metrics
from serve_app.access import facts, route_path

# A child of Serve's logger: its records go to the replica's Serve log file, in Serve's encoding
# (JSON with `logging_config: {encoding: JSON}`), with Serve's request id, route and replica.
log = logging.getLogger("ray.serve.imgserve")

CLIENT_CLOSED = 499
"""The status logged and counted for a request whose client left before the answer began (the
"client closed request" of common proxies): not a server error."""
REJECTION_STATUSES = frozenset({429, 503, 504})
_TASK_PATH = re.compile(r"/v1/([^/]+)")
OPENAI_PATH = "/v1/images/edits"
"""Counted with api="openai"; its task is the one the route notes (from `model`)."""


class AnswerStatus:
    """The status a request was answered with, as a `send` wrapper sees it: 500 until a response
    starts (an error nothing turned into a response); CLIENT_CLOSED where the request is cancelled
    before that (Serve cancels the app's task when its client hangs up)."""

    def __init__(self) -> None:
        self.code = 500
        self._started = False

    def see(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.code, self._started = message["status"], True

    def cancelled(self) -> None:
        if not self._started:
            self.code = CLIENT_CLOSED


def error_code(body: bytes, status: int) -> str:
    """The `error.code` of a JSON error body (`http_<status>` when there is none)."""
    try:
        code = json.loads(body)["error"]["code"]
    except Exception:
        code = None
    return code if isinstance(code, str) and re.fullmatch(r"[a-z_]{1,40}", code) else f"http_{status}"


def _task_of(method: str, path: str) -> str | None:
    parts = path.strip("/").split("/")
    if method == "POST" and len(parts) == 2 and parts[0] == "v1" and parts[1] not in ("jobs", "models"):
        return parts[1][:32]
    return None


class Observability:
    """ASGI middleware: the access log line of every request; `imgserve_requests`,
    `imgserve_request_seconds` and `imgserve_rejections` of task requests."""

    def __init__(self, app: ASGIApp, tasks: Iterable[str]) -> None:
        self.app = app
        self.tasks = frozenset(tasks)

    def task_label(self, name: Any) -> str:
        return name if isinstance(name, str) and name in self.tasks else "unknown"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, path = scope["method"], route_path(scope)
        request_id = Headers(scope=scope).get("x-request-id")
        own_request_id = request_id is None  # no Serve proxy in front (e.g. a test client): make one here
        noted = facts(scope)
        noted.update(request_id=request_id or uuid.uuid4().hex, task=_task_of(method, path), key_id=None)
        match = _TASK_PATH.fullmatch(path) if method == "POST" else None
        route = match.group(1) if match is not None else ("images/edits" if method == "POST" and path == OPENAI_PATH
                                                           else None)
        answer = AnswerStatus()
        body = b""

        async def watching_send(message: Message) -> None:
            nonlocal body
            answer.see(message)
            if message["type"] == "http.response.start" and own_request_id:
                MutableHeaders(scope=message)["X-Request-Id"] = noted["request_id"]
            if message["type"] == "http.response.body" and answer.code in REJECTION_STATUSES and len(body) < 4096:
                body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except asyncio.CancelledError:
            answer.cancelled()
            raise
        finally:
            duration_ms = (time.perf_counter() - started) * 1000.0
            if route is not None:
                self._record(route, noted, answer.code, body, duration_ms / 1000.0)
            line = {"event": "http_request", "method": method, "path": path[:200], "status": answer.code,
                    "duration_ms": round(duration_ms, 1), **noted}
            log.info("%s %s %s %.1fms task=%s key=%s job=%s", method, path[:200], answer.code, duration_ms,
                     noted.get("task") or "-", noted.get("key_id") or "-", noted.get("job_id") or "-", extra=line)

    def _record(self, route: str, noted: dict[str, Any], status: int, body: bytes, seconds: float) -> None:
        api = {"jobs": "jobs", "images/edits": "openai"}.get(route, "sync")
        task = self.task_label(route if api == "sync" else noted.get("task"))
        tags = {"task": task, "status": str(status), "api": api}
        metrics.requests.inc(tags=tags)
        metrics.request_seconds.observe(seconds, tags=tags)
        if status in REJECTION_STATUSES:
            metrics.rejections.inc(tags={"task": task, "reason": error_code(body, status)})
