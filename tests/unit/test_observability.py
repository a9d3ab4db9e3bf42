"""The ingress's observability middleware (serve_app/observability.py) on a small ASGI app, no Ray:
every task request is counted once with its task, status and API, refusals by their error code,
labels a client controls stay within the known tasks, and every request gets one log line."""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from deployments import metrics
from serve_app.errors import error_body
from serve_app import observability
from serve_app.access import AccessMiddleware, AccessSettings
from serve_app.observability import Observability, error_code

TASKS = ("real", "anime", "layers")


async def task_route(request: Request) -> Response:
    answer = request.query_params.get("answer", "200")
    if answer == "boom":
        raise RuntimeError("unexpected")
    status = int(answer)
    if status == 200:
        return Response(b"image", media_type="image/png")
    code = {503: "queue_full", 429: "rate_limited", 504: "timeout", 422: "invalid_parameter"}.get(status, "x")
    return JSONResponse(error_body(code, "refused"), status_code=status)


async def jobs_route(request: Request) -> Response:
    facts = request.scope.setdefault("state", {}).setdefault("imgserve", {})  # what access.note does
    facts["task"] = request.query_params.get("task")
    return JSONResponse({"id": "1"}, status_code=202)


@pytest.fixture()
def client():
    app = Starlette(routes=[Route("/v1/jobs", jobs_route, methods=["POST"]),
                            Route("/v1/images/edits", jobs_route, methods=["POST"]),  # notes its task too
                            Route("/v1/{task}", task_route, methods=["POST"]),
                            Route("/v1/models", task_route, methods=["GET"])])
    app.add_middleware(Observability, tasks=TASKS)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def recorded(records, name: str) -> list[tuple[float, dict[str, str]]]:
    return [(value, tags) for metric, value, tags in records if metric == name]


def test_task_requests_are_counted_and_timed_by_task_status_and_api(client) -> None:
    with metrics.capture() as records:
        assert client.post("/v1/real").status_code == 200
        assert client.post("/v1/anime?answer=422").status_code == 422
        assert client.post("/v1/real?answer=boom").status_code == 500
        assert client.post("/v1/jobs?task=layers").status_code == 202
        assert client.post("/v1/images/edits?task=anime").status_code == 202
        assert client.get("/v1/models").status_code == 200  # not a task request: not counted
    counted = [tags for _, tags in recorded(records, "imgserve_requests")]
    assert counted == [
        {"task": "real", "status": "200", "api": "sync"},
        {"task": "anime", "status": "422", "api": "sync"},
        {"task": "real", "status": "500", "api": "sync"},
        {"task": "layers", "status": "202", "api": "jobs"},
        {"task": "anime", "status": "202", "api": "openai"},  # the OpenAI route: the task its `model` names
    ]
    timed = recorded(records, "imgserve_request_seconds")
    assert [tags for _, tags in timed] == counted and all(seconds > 0 for seconds, _ in timed)
    assert not recorded(records, "imgserve_rejections")


def test_refusals_are_counted_by_their_error_code(client) -> None:
    with metrics.capture() as records:
        for answer in ("503", "429", "504", "422"):
            client.post(f"/v1/layers?answer={answer}")
    assert [tags for _, tags in recorded(records, "imgserve_rejections")] == [
        {"task": "layers", "reason": "queue_full"},
        {"task": "layers", "reason": "rate_limited"},
        {"task": "layers", "reason": "timeout"},
    ]


def test_labels_a_client_controls_stay_known(client) -> None:
    with metrics.capture() as records:
        client.post("/v1/sketch?answer=503")
        client.post("/v1/jobs?task=" + "x" * 300)
    assert [tags["task"] for _, tags in recorded(records, "imgserve_requests")] == ["unknown", "unknown"]
    assert recorded(records, "imgserve_rejections")[0][1] == {"task": "unknown", "reason": "queue_full"}
    assert error_code(b'{"error": {"code": "Bad Code!"}}', 503) == "http_503"
    assert error_code(b"not json", 504) == "http_504"


def test_a_request_its_client_abandons_is_counted_and_logged_as_499() -> None:
    """Serve cancels the app's task when the client leaves. Before the answer began, that is a
    499 in the metrics and the access log (not a 500 that would page someone); once the answer
    has begun, its status stands."""
    lines: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lines.append  # type: ignore[method-assign]
    observability.log.addHandler(handler)

    async def abandon(answer_first: bool) -> None:
        entered = asyncio.Event()

        async def app(scope, receive, send) -> None:
            if answer_first:
                await send({"type": "http.response.start", "status": 200, "headers": []})
            entered.set()
            await asyncio.Event().wait()  # the model is still working when the client leaves

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/real", "root_path": "", "query_string": b"",
                 "headers": [(b"x-request-id", b"left-early")]}
        # as in the ingress: the metrics middleware outside the access middleware
        middlewares = Observability(AccessMiddleware(app, AccessSettings()), TASKS)
        task = asyncio.create_task(middlewares(scope, receive, send))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        with metrics.capture() as records:
            asyncio.run(abandon(answer_first=False))
            asyncio.run(abandon(answer_first=True))
    finally:
        observability.log.removeHandler(handler)
    counted = [tags for _, tags in recorded(records, "imgserve_requests")]
    assert counted == [{"task": "real", "status": "499", "api": "sync"}, {"task": "real", "status": "200", "api": "sync"}]
    assert not recorded(records, "imgserve_rejections")
    logged = [line.status for line in lines if getattr(line, "event", None) == "http_request"]
    assert logged == [499, 200]
