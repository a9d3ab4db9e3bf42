"""Request metrics at the ingress: an ASGI middleware around the FastAPI app.

Counts and times every task request — `POST /v1/{task}` (`api=sync`) and `POST /v1/jobs`
(`api=jobs`) — by task and the HTTP status it was answered with, whichever code path produced
the answer (validation, backpressure, time limits, an unexpected 500), and counts the refusals
for capacity or time (429, 503, 504) by the JSON error code (`queue_full`, `unavailable`, ...).
A request the client abandons reaches this middleware as a cancellation (Serve's proxy answers
it, outside this app): it is recorded with status 499, the "client closed request" of common
proxies, so a dashboard's server-error rate does not count clients that gave up. The metrics
themselves are `deployments.metrics` (names, types and tags documented there).

The task label is the path's task when it is one the service knows; for `POST /v1/jobs` it is
the form's `task` field, which the route notes in the request's facts (`access.note(request,
task=...)`, `scope["state"]["imgserve"]`) once it has read the form. Anything else is `unknown`,
so a client cannot create label values. Registered after `access.AccessMiddleware`, so it is the
outer one and also sees that middleware's refusals (401, 429).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from deployments import metrics
from serve_app.access import AnswerStatus, route_path
from serve_app.pipeline import TASKS

REJECTION_STATUSES = frozenset({429, 503, 504})
_TASK_PATH = re.compile(r"/v1/([^/]+)")


def task_label(name: Any) -> str:
    return name if isinstance(name, str) and name in TASKS else "unknown"


def error_code(body: bytes, status: int) -> str:
    """The `error.code` of a JSON error body (`http_<status>` when there is none)."""
    try:
        code = json.loads(body)["error"]["code"]
    except Exception:
        code = None
    return code if isinstance(code, str) and re.fullmatch(r"[a-z_]{1,40}", code) else f"http_{status}"


class RequestMetrics:
    """ASGI middleware recording `imgserve_requests`, `imgserve_request_seconds` and
    `imgserve_rejections` for task requests; every other request passes straight through."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        match = None
        if scope["type"] == "http" and scope.get("method") == "POST":
            match = _TASK_PATH.fullmatch(route_path(scope))
        if match is None:
            await self.app(scope, receive, send)
            return
        api = "jobs" if match.group(1) == "jobs" else "sync"
        state = scope.setdefault("state", {})
        started = time.perf_counter()
        answer = AnswerStatus()
        body = b""

        async def watching_send(message: dict) -> None:
            nonlocal body
            answer.see(message)
            if message["type"] == "http.response.body" and answer.code in REJECTION_STATUSES and len(body) < 4096:
                body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except asyncio.CancelledError:
            answer.cancelled()
            raise
        finally:
            facts = state.get("imgserve")
            noted = facts.get("task") if isinstance(facts, dict) else None
            task = task_label(noted if api == "jobs" else match.group(1))
            tags = {"task": task, "status": str(answer.code), "api": api}
            metrics.requests.inc(tags=tags)
            metrics.request_seconds.observe(time.perf_counter() - started, tags=tags)
            if answer.code in REJECTION_STATUSES:
                metrics.rejections.inc(tags={"task": task, "reason": error_code(body, answer.code)})
