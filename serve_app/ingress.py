"""The ingress: HTTP routes and the Python-handle entry point; never touches pixels or tensors.

Reads the upload (multipart `image` + fields, or a raw `image/*` body + query: `serve_app.uploads`,
bounded in size and in the pauses between its pieces, `ingress.read_timeout_s` → 408), validates
the request's fields against the task's config (422 before any pixel is decoded), then drives the
graph Preprocess → model → Postprocess through the orchestrator, with the caller's key id (model
time is accounted to it) and `caller="http"` (a client that hangs up cancels the call, and the
model stops), and answers with the encoded bytes and `X-Imgserve-*` headers. The /v1/jobs routes
are `serve_app.job_routes`, event streams `serve_app.events`, the OpenAI-compatible
`POST /v1/images/edits` `serve_app.openai_api` (through this class's `run`, the same call). Errors from anywhere become the one
JSON shape (`serve_app.errors.error_response`), here and in the access middleware that runs before
the routes.

`Ingress` is a plain class; the builder makes it a Serve ingress whose FastAPI app the replica
builds once it is constructed (`__serve_build_asgi_app__` → `make_api`), so the middlewares and
the OpenAPI document get their settings where they are constructed, never through module state;
/docs is `serve_app.docs_page`.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import ImgserveError, InvalidParameter
from deployments.postprocess import Encoded
from serve_app import docs_page, openapi
from serve_app.access import AccessMiddleware, AccessSettings, facts
from serve_app.config import IngressSection
from serve_app.errors import MethodNotAllowed, NotFound, error_body, error_response
from serve_app.events import EventHub
from serve_app.job_routes import JobRoutes
from serve_app.observability import Observability
from serve_app.openai_api import OpenAIRoutes
from serve_app.orchestrator import Orchestrator
from serve_app.uploads import read_upload


log = logging.getLogger("imgserve")

# Type hints stay real objects (no `from __future__ import annotations`): FastAPI reads them to
# tell a `Request` parameter from a query parameter on Serve's class-based routes.

# Every result's headers echo these metadata keys, and each task's own (`Task.headers`); ASCII
# only: prompts stay in the PNG chunk.
COMMON_HEADERS = ("task", "size", "scale")
APP_NAME = "imgserve"


PROCESS_FACTS = ("replica", "encoder")
"""Serving facts that name a host and process: sent only with `ingress.expose_replica`."""


def result_headers(encoded: Encoded, keys: tuple[str, ...], expose_replica: bool = False) -> dict[str, str]:
    """X-Imgserve-* headers: the parameters used (those of `keys`), and how the request was served
    (without the replicas' host names and pids unless `expose_replica`)."""
    facts = {key: encoded.metadata[key] for key in keys if key in encoded.metadata}
    facts.update({key: value for key, value in encoded.served.items() if isinstance(value, (str, int, float))
                  and (expose_replica or key not in PROCESS_FACTS)})
    return {"X-Imgserve-" + "-".join(part.capitalize() for part in key.split("_")): str(value)
            for key, value in facts.items()}


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
        return JSONResponse(error_body("http_error", str(exc.detail), status=exc.status_code), status_code=exc.status_code)
    return error_response(error, retry_after_s=1)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    field = str(first["loc"][-1]) if first["loc"] else None
    return error_response(InvalidParameter(first["msg"], field), retry_after_s=1)


class Ingress(JobRoutes, OpenAIRoutes):
    """The HTTP routes, and `run` for callers of `serve.get_app_handle("imgserve").run.remote(...)`;
    the /v1/jobs routes are `JobRoutes` (serve_app/job_routes.py), `POST /v1/images/edits`
    `OpenAIRoutes` (serve_app/openai_api.py)."""

    def __init__(self, settings: IngressSection, orchestrator: Orchestrator, jobs: Any) -> None:
        self.settings = settings
        self.orchestrator = orchestrator.open()
        self.jobs = jobs
        self.events = EventHub(jobs, settings)
        """This replica's event streams and the one follower of the runner they share."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this in the replica, after the constructor."""
        return make_api(self)

    async def run(self, task: str, image: bytes, fields: dict[str, Any] | None = None, *,
                  key_id: str | None = None, caller: str = "handle") -> Encoded:
        """Run one task on one image (the Python-handle entry point); raises `deployments.errors`.
        `key_id`: whom the model time is accounted to; `caller`: "handle" or "http" (the route), for
        the abandoned-request metric's reason when the call is cancelled."""
        return await self.orchestrator.run(await self.orchestrator.validate(task, fields), image,
                                           timeout_s=self.settings.request_timeout_s, key_id=key_id, caller=caller)

    def _error(self, exc: BaseException) -> JSONResponse:
        return error_response(exc, self.settings.retry_after_s)

    def _result(self, task: str, encoded: Encoded) -> Response:
        served = self.orchestrator.tasks.get(task)
        keys = (*COMMON_HEADERS, *(served.task.headers if served else ()))
        return Response(encoded.data, media_type=encoded.media_type,
                        headers=result_headers(encoded, keys, self.settings.expose_replica))

    # -- HTTP ----------------------------------------------------------------------------------------
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "app": APP_NAME}

    async def web_page(self) -> Response:
        """The web page: upload, task, progress, result (serve_app/web/)."""
        return web_file("index.html")

    async def web_asset(self, name: str) -> Response:
        return web_file(name)

    async def list_models(self) -> dict[str, Any]:
        """The tasks' document and, in the same answer, OpenAI's model list (`object`, `data`)."""
        await self.orchestrator.refresh()
        return self.orchestrator.models_info()

    async def readiness(self) -> dict[str, Any]:
        """Per task: is a replica of its model up, and what do its replicas serve and hold
        (`Orchestrator.readiness`). Asks Serve's controller: a view for operators, not a probe
        (/healthz stays cheap)."""
        await self.orchestrator.refresh()
        placement = await asyncio.to_thread(_placement, self.orchestrator.app_name)
        return self.orchestrator.readiness(placement, self.settings.expose_replica)

    async def run_task(self, task: str, request: Request) -> Response:
        try:
            self.orchestrator.task(task)  # NotFound naming the available tasks, before reading the body
            image, fields = await read_upload(request, self.orchestrator.upload.max_bytes, self.settings.read_timeout_s,
                                              self.settings.min_body_bytes_per_s)
            encoded = await self.run(task, image, fields, key_id=facts(request.scope).get("key_id"), caller="http")
        except Exception as exc:
            return self._error(exc)
        return self._result(task, encoded)


def _placement(app_name: str | None) -> dict[str, tuple[int, str]]:
    """Serve's view of the application's deployments ({} outside Serve, or when it cannot be read)."""
    from serve_app.housekeeping import serve_placement

    try:
        return serve_placement(app_name) if app_name else {}
    except Exception:  # noqa: BLE001 - the controller unreachable: every task reads as not ready
        log.warning("could not read Serve's status", exc_info=True)
        return {}


# (method, path, Ingress method, FastAPI options), matched in this order: /v1/jobs and
# /v1/images/edits before /v1/{task}.
ROUTES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("GET", "/healthz", "healthz", {}),
    ("GET", "/", "web_page", {"include_in_schema": False}),
    ("HEAD", "/", "web_page", {"include_in_schema": False}),
    ("GET", "/web/{name}", "web_asset", {"include_in_schema": False}),
    ("GET", "/v1/models", "list_models", {}),
    ("GET", "/v1/status", "readiness", {}),
    ("POST", "/v1/jobs", "submit_job", {"status_code": 202}),
    ("GET", "/v1/jobs", "list_jobs", {}),
    ("GET", "/v1/jobs/{job_id}", "job_status", {}),
    ("DELETE", "/v1/jobs/{job_id}", "cancel_job", {}),
    ("GET", "/v1/jobs/{job_id}/result", "job_result", {}),
    ("GET", "/v1/jobs/{job_id}/events", "job_events", {}),
    ("POST", "/v1/images/edits", "images_edits", {}),
    ("POST", "/v1/{task}", "run_task", {}),
)


def make_api(ingress: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica: its routes, the access middleware with this replica's
    settings (API keys read from the environment now), observability outermost, the error
    handlers, and an OpenAPI document of the tasks this ingress serves."""
    orchestrator = ingress.orchestrator
    served = "; ".join(f"{name} ({task.task.summary})" for name, task in orchestrator.tasks.items())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        background = [loop.create_task(ingress.events.refresh_gauge()), loop.create_task(orchestrator.keep_fresh())]
        try:
            yield
        finally:
            for task in background:
                task.cancel()

    # FastAPI's /docs and /redoc load their scripts from a CDN: off; /docs is serve_app/docs_page.py
    api = FastAPI(title=APP_NAME, version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Image-to-image models behind one HTTP API: {served}.")
    for method, path, name, options in ROUTES:
        api.add_api_route(path, getattr(ingress, name), methods=[method], **options)
    docs_page.add_routes(api)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    # keys, rate limit, CORS and the request-id check (serve_app/access.py)
    api.add_middleware(AccessMiddleware, settings=AccessSettings.from_config(ingress.settings))
    # outermost: the log line of every request and the task requests' metrics (serve_app/observability.py)
    api.add_middleware(Observability, tasks=list(orchestrator.tasks))
    # /openapi.json: the upload routes' bodies, limits and error responses (serve_app/openapi.py)
    api.openapi = lambda: openapi.document(api, orchestrator, ingress.settings.max_images)  # type: ignore[method-assign]
    return api
