"""The ingress: HTTP routes and the Python-handle entry point; never touches pixels or tensors.

Reads the upload (multipart `image` + fields, or a raw `image/*` body + query), validates the
request's fields against the task's config (422 before any pixel is decoded), then drives the graph
Preprocess → model → Postprocess through the orchestrator and answers with the encoded bytes and
`X-Imgserve-*` headers. Errors from anywhere become the one JSON shape
(`serve_app.errors.error_response`), here and in the access middleware that runs before the routes.

`Ingress` is a plain class; the builder makes it a Serve ingress whose FastAPI app the replica
builds once it is constructed (`__serve_build_asgi_app__` → `make_api`), so the middlewares and
the OpenAPI document get their settings where they are constructed, never through module state.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import BadImage, ImgserveError, InvalidParameter, TooLarge, UnsupportedFormat
from deployments.postprocess import Encoded
from serve_app import forms, openapi
from serve_app.access import AccessMiddleware, AccessSettings, note
from serve_app.config import IngressSection
from serve_app.errors import MethodNotAllowed, NotFound, NotReady, error_body, error_response
from serve_app.observability import Observability
from serve_app.orchestrator import Orchestrator
from serve_app.store import FINAL_STATES

log = logging.getLogger("imgserve")

# Type hints stay real objects (no `from __future__ import annotations`): FastAPI reads them to
# tell a `Request` parameter from a query parameter on Serve's class-based routes.

FORM_OVERHEAD_BYTES = 256 * 1024
"""What a multipart body may carry on top of the image limit: its framing and the text fields."""
# Every result's headers echo these metadata keys, and each task's own (`Task.headers`); ASCII
# only: prompts stay in the PNG chunk.
COMMON_HEADERS = ("task", "size", "scale")
APP_NAME = "imgserve"


async def _body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, refusing (413) as soon as it passes `limit` bytes: never
    read it all first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes", "image")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body exceeds the limit of {limit} bytes", "image")
        yield chunk


async def _read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _body_chunks(request, limit)])


def _add_field(fields: dict[str, str], key: str, value: str) -> None:
    if key in fields:
        raise InvalidParameter("given more than once", key)
    fields[key] = value


async def read_upload(request: Request, max_image_bytes: int) -> tuple[bytes, dict[str, str]]:
    """(image bytes, text fields) from a multipart form or a raw image body with query fields."""
    fields: dict[str, str] = {}
    for key, value in forms.parse_query(request.scope.get("query_string", b"")):  # 422 on non-UTF-8
        _add_field(fields, key, value)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        # parsed as it arrives: the image is copied once, into the form's file, not first into a body
        limit = max_image_bytes + FORM_OVERHEAD_BYTES
        form = await forms.parse_multipart(request.headers, _body_chunks(request, limit), limit)
        image: bytes | None = None
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "image":
                        raise InvalidParameter("only the `image` field may be a file", key)
                    if image is not None:
                        raise InvalidParameter("given more than once", "image")
                    image = await value.read()
                elif key == "image":
                    raise BadImage("`image` must be a file part, not a text field", "image")
                else:
                    _add_field(fields, key, value)
        finally:
            await form.close()
        if image is None:
            raise BadImage("the multipart body has no `image` file", "image")
        return image, fields
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return await _read_body(request, max_image_bytes), fields
    raise UnsupportedFormat(
        f"content type {content_type or '(none)'!r}: send multipart/form-data with an `image` file "
        "or a raw image/* body",
        "image",
    )


def result_headers(encoded: Encoded, keys: tuple[str, ...]) -> dict[str, str]:
    """X-Imgserve-* headers: the parameters used (those of `keys`), and how the request was served."""
    facts = {key: encoded.metadata[key] for key in keys if key in encoded.metadata}
    facts.update({key: value for key, value in encoded.served.items() if isinstance(value, (str, int, float))})
    return {"X-Imgserve-" + "-".join(part.capitalize() for part in key.split("_")): str(value)
            for key, value in facts.items()}


_EVENT_POLL_S = 0.1

# The web page (serve_app/web/, package data): exactly these files, with these content types.
WEB_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def web_file(name: str) -> Response:
    """One file of the web page; 404 in the one JSON shape for any other name."""
    if name not in WEB_FILES:
        return error_response(NotFound(f"no file {name[:64]!r} in the web page"), retry_after_s=1)
    data = resources.files("serve_app").joinpath("web", name).read_bytes()
    return Response(data, media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error: ImgserveError
    if exc.status_code == 404:
        error = NotFound(f"no route {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        return JSONResponse(error_body("http_error", str(exc.detail)), status_code=exc.status_code)
    return error_response(error, retry_after_s=1)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    field = str(first["loc"][-1]) if first["loc"] else None
    return error_response(InvalidParameter(first["msg"], field), retry_after_s=1)


class Ingress:
    """The HTTP routes, and `run` for callers of `serve.get_app_handle("imgserve").run.remote(...)`."""

    def __init__(self, settings: IngressSection, orchestrator: Orchestrator, jobs: Any) -> None:
        self.settings = settings
        self.orchestrator = orchestrator.open()
        self.jobs = jobs

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this in the replica, after the constructor."""
        return make_api(self)

    async def run(self, task: str, image: bytes, fields: dict[str, Any] | None = None) -> Encoded:
        """Run one task on one image (the Python-handle entry point); raises `deployments.errors`."""
        return await self.orchestrator.run(self.orchestrator.resolve(task, fields), image,
                                           timeout_s=self.settings.request_timeout_s)

    def _error(self, exc: BaseException) -> JSONResponse:
        return error_response(exc, self.settings.retry_after_s)

    def _result(self, task: str, encoded: Encoded) -> Response:
        served = self.orchestrator.tasks.get(task)
        keys = (*COMMON_HEADERS, *(served.task.headers if served else ()))
        return Response(encoded.data, media_type=encoded.media_type, headers=result_headers(encoded, keys))

    # -- HTTP ----------------------------------------------------------------------------------------
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "app": APP_NAME}

    async def web_page(self) -> Response:
        """The web page: upload, task, progress, result (serve_app/web/)."""
        return web_file("index.html")

    async def web_asset(self, name: str) -> Response:
        return web_file(name)

    async def list_models(self) -> dict[str, Any]:
        return self.orchestrator.models_info()

    # -- jobs ----------------------------------------------------------------------------------------
    async def submit_job(self, request: Request) -> Response:
        try:
            image, fields = await read_upload(request, self.orchestrator.upload.max_bytes)
            task = fields.pop("task", None)
            if task is None:
                raise InvalidParameter(f"required: {self.orchestrator.registry.choices_text()}", "task")
            note(request, task=task[:32])
            status = await self.jobs.submit.remote(task, image, fields, request.headers.get("x-request-id"))
        except Exception as exc:
            return self._error(exc)
        note(request, job_id=status["id"])
        return JSONResponse(status, status_code=202, headers={"Location": f"/v1/jobs/{status['id']}"})

    async def _json(self, response: Any) -> Response:
        """A runner call's answer as JSON, or its error in the one JSON shape."""
        try:
            return JSONResponse(await response)
        except Exception as exc:
            return self._error(exc)

    async def job_status(self, job_id: str) -> Response:
        return await self._json(self.jobs.status.remote(job_id))

    async def cancel_job(self, job_id: str) -> Response:
        return await self._json(self.jobs.cancel.remote(job_id))

    async def job_result(self, job_id: str) -> Response:
        try:
            status, data, media_type, metadata, served = await self.jobs.result.remote(job_id)
            if data is None:
                error = status.get("error") or {}
                detail = f": {error.get('code')}: {error.get('message')}" if error else ""
                raise NotReady(f"job {job_id} is {status['state']}{detail}")
        except Exception as exc:
            return self._error(exc)
        return self._result(status["task"], Encoded(data=data, media_type=media_type, metadata=metadata, served=served))

    async def job_events(self, job_id: str) -> Response:
        """Server-Sent Events: one `progress` event per change of state, stage, denoising step or
        queue position, ending with the final state."""
        try:
            await self.jobs.status.remote(job_id)
        except Exception as exc:
            return self._error(exc)

        async def events():
            seen, position, quiet_final_polls = 0, None, 0
            while True:
                new, status = await self.jobs.events.remote(job_id, seen)
                seen += len(new)
                if status["state"] == "queued" and status["queue_position"] != position:
                    position = status["queue_position"]
                    if not any(event["state"] == "queued" for event in new):  # the queue moved
                        new = [*new, {"state": "queued", "stage": None, "step": None, "total_steps": None}]
                if status["state"] in FINAL_STATES and not new:
                    quiet_final_polls += 1  # the final event is recorded just after the store
                    if quiet_final_polls > 2:
                        new = [{key: status[key] for key in ("state", "stage", "step", "total_steps")}]
                for event in new:
                    event = {**event, "queue_position": position if event["state"] == "queued" else None}
                    yield f"event: progress\ndata: {json.dumps(event)}\n\n"
                    if event["state"] in FINAL_STATES:
                        return
                await asyncio.sleep(_EVENT_POLL_S)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def run_task(self, task: str, request: Request) -> Response:
        try:
            self.orchestrator.task(task)  # NotFound naming the available tasks, before reading the body
            image, fields = await read_upload(request, self.orchestrator.upload.max_bytes)
            encoded = await self.run(task, image, fields)
        except Exception as exc:
            return self._error(exc)
        return self._result(task, encoded)


# (method, path, Ingress method, FastAPI options), matched in this order: /v1/jobs before /v1/{task}.
ROUTES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("GET", "/healthz", "healthz", {}),
    ("GET", "/", "web_page", {"include_in_schema": False}),
    ("GET", "/web/{name}", "web_asset", {"include_in_schema": False}),
    ("GET", "/v1/models", "list_models", {}),
    ("POST", "/v1/jobs", "submit_job", {"status_code": 202}),
    ("GET", "/v1/jobs/{job_id}", "job_status", {}),
    ("DELETE", "/v1/jobs/{job_id}", "cancel_job", {}),
    ("GET", "/v1/jobs/{job_id}/result", "job_result", {}),
    ("GET", "/v1/jobs/{job_id}/events", "job_events", {}),
    ("POST", "/v1/{task}", "run_task", {}),
)


def make_api(ingress: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica: its routes, the access middleware with this replica's
    settings (API keys read from the environment now), observability outermost, the error
    handlers, and an OpenAPI document of the tasks this ingress serves."""
    orchestrator = ingress.orchestrator
    served = "; ".join(f"{name} ({task.task.summary})" for name, task in orchestrator.tasks.items())
    api = FastAPI(title=APP_NAME, version="0.1.0",
                  description=f"Image-to-image models behind one HTTP API: {served}.")
    for method, path, name, options in ROUTES:
        api.add_api_route(path, getattr(ingress, name), methods=[method], **options)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    # keys, rate limit, CORS and the request-id check (serve_app/access.py)
    api.add_middleware(AccessMiddleware, settings=AccessSettings.from_config(ingress.settings))
    # outermost: the log line of every request and the task requests' metrics (serve_app/observability.py)
    api.add_middleware(Observability, tasks=list(orchestrator.tasks))
    # /openapi.json: the upload routes' bodies, limits and error responses (serve_app/openapi.py)
    api.openapi = lambda: openapi.document(api, orchestrator)  # type: ignore[method-assign]
    return api
