"""The /v1/jobs routes of the ingress: submit, list, status, cancel, result, event stream.

Contract: every runner call carries the caller's `owner` (its API key id, `access.facts(scope)
["key_id"]`; None with keys off, when the service is single-tenant), and the runner answers
404 for a job of another owner exactly as for an unknown id. A submission also carries its
`quota_key` (the key id, else `ip:<client address>`) for `jobs.max_queued_per_key`. Errors
come back in the one JSON shape (`serve_app.errors`). An event stream opens only once the caller
may see the job (`status(job_id, owner)`), within the replica's stream caps (`serve_app.events`).

`JobRoutes` is a mixin of `serve_app.ingress.Ingress`, which provides `jobs` (the runner's
handle), `events` (the replica's EventHub), `orchestrator`, `settings`, `_error` and `_result`.
Type hints stay real objects (no `from __future__ import annotations`): FastAPI reads them to tell
a `Request` parameter from a query parameter.
"""

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deployments import packaging
from deployments.errors import InvalidParameter
from deployments.postprocess import Encoded
from serve_app import forms
from serve_app.access import facts, note
from serve_app.errors import NotReady
from serve_app.events import EventResponse, last_event_id
from serve_app.idempotency import idempotency
from serve_app.job_record import FINAL_STATES
from serve_app.uploads import add_field, read_upload

JOB_STATES = ("queued", "running", *FINAL_STATES)
JOB_OPTIONS = ("priority", "webhook_url", "webhook_events")
"""Fields of `POST /v1/jobs` about the job itself, not the task: `JobRunner.submit` keywords."""
LIST_LIMIT_MAX = 100
LIST_PARAMS = ("limit", "cursor", "state", "task")
MAX_CURSOR_CHARS = 256


def owner(request: Request) -> str | None:
    """The caller's API key id (the jobs it may see); None with keys off."""
    return facts(request.scope).get("key_id")


def client_key(request: Request) -> str:
    """Who a per-caller limit counts: the key id, else the client address."""
    kid = owner(request)
    if kid is not None:
        return kid
    client = request.scope.get("client")
    return f"ip:{client[0]}" if client else "ip:unknown"


def list_query(query: bytes, tasks: list[str]) -> dict[str, Any]:
    """GET /v1/jobs's query as `list_jobs` keywords; 422 naming the parameter that is wrong."""
    given: dict[str, str] = {}
    for key, value in forms.parse_query(query):
        if key not in LIST_PARAMS:
            raise InvalidParameter(f"unknown parameter; this route takes {', '.join(LIST_PARAMS)}", key)
        add_field(given, key, value)
    options: dict[str, Any] = {"limit": 20, "cursor": None, "state": None, "task": None}
    if "limit" in given:
        text = given["limit"].strip()
        if not text.isdigit() or not 1 <= int(text) <= LIST_LIMIT_MAX:
            raise InvalidParameter(f"must be an integer from 1 to {LIST_LIMIT_MAX}", "limit")
        options["limit"] = int(text)
    if given.get("cursor"):
        if len(given["cursor"]) > MAX_CURSOR_CHARS:
            raise InvalidParameter("not a cursor this service sent (use `next_cursor` of the previous page)", "cursor")
        options["cursor"] = given["cursor"]
    if given.get("state"):
        if given["state"] not in JOB_STATES:
            raise InvalidParameter(f"must be one of {', '.join(JOB_STATES)}", "state")
        options["state"] = given["state"]
    if given.get("task"):
        if given["task"] not in tasks:
            raise InvalidParameter(f"must be one of {', '.join(tasks)}", "task")
        options["task"] = given["task"]
    return options


class JobRoutes:
    """The job routes; mixed into `Ingress`."""

    jobs: Any
    events: Any
    orchestrator: Any
    settings: Any

    async def submit_job(self, request: Request) -> Response:
        try:
            image, fields = await read_upload(request, self.orchestrator.upload.max_bytes,
                                              self.settings.read_timeout_s,
                                              self.settings.min_body_bytes_per_s)
            task = fields.pop("task", None)
            if task is None:
                raise InvalidParameter(f"required: {self.orchestrator.registry.choices_text()}", "task")
            note(request, task=task[:32])
            key = idempotency(request.headers, "/v1/jobs", task, fields, image)
            options = {name: fields.pop(name) for name in JOB_OPTIONS if name in fields}
            status = await self.jobs.submit.remote(task, image, fields, request.headers.get("x-request-id"),
                                                   owner=owner(request), quota_key=client_key(request),
                                                   idempotency=key, **options)
        except Exception as exc:
            return self._error(exc)
        note(request, job_id=status["id"])
        replayed = bool(status.pop("replayed", False))
        return JSONResponse(status, status_code=200 if replayed else 202,
                            headers={"Location": f"/v1/jobs/{status['id']}",
                                     **({"Idempotent-Replayed": "true"} if replayed else {})})

    async def _json(self, response: Any) -> Response:
        """A runner call's answer as JSON, or its error in the one JSON shape."""
        try:
            return JSONResponse(await response)
        except Exception as exc:
            return self._error(exc)

    async def list_jobs(self, request: Request) -> Response:
        """The caller's jobs, newest first, a page at a time (`next_cursor`), by state and task."""
        try:
            options = list_query(request.scope.get("query_string", b""), list(self.orchestrator.tasks))
        except Exception as exc:
            return self._error(exc)
        return await self._json(self.jobs.list_jobs.remote(owner=owner(request), **options))

    async def job_status(self, job_id: str, request: Request) -> Response:
        return await self._json(self.jobs.status.remote(job_id, owner=owner(request)))

    async def cancel_job(self, job_id: str, request: Request) -> Response:
        return await self._json(self.jobs.cancel.remote(job_id, owner=owner(request)))

    async def job_result(self, job_id: str, request: Request, layer: int | None = None) -> Response:
        """The job's result; `layer=i`: layer i (0 = the bottom) of a ZIP of layers, as its PNG (the
        URLs `POST /v1/images/edits` answers for a layers job)."""
        try:
            status, data, media_type, metadata, served = await self.jobs.result.remote(job_id, owner=owner(request))
            if data is None:
                error = status.get("error") or {}
                detail = f": {error.get('code')}: {error.get('message')}" if error else ""
                raise NotReady(f"job {job_id} is {status['state']}{detail}")
            if layer is not None:
                layers = packaging.zip_layer_pngs(data) if media_type == packaging.MEDIA_TYPES["zip"] else []
                if not 0 <= layer < len(layers):
                    raise InvalidParameter(f"no layer {layer}: this result has {len(layers)} layers (0 = the bottom; "
                                           "only a ZIP of layers has any)", "layer")
                data, media_type = layers[layer], "image/png"
        except Exception as exc:
            return self._error(exc)
        return self._result(status["task"], Encoded(data=data, media_type=media_type, metadata=metadata, served=served))

    async def job_events(self, job_id: str, request: Request) -> Response:
        """Server-Sent Events: one `progress` event per change of state, stage, denoising step or
        queue position, ending with the final state (`serve_app.events` for heartbeats, lifetime
        and resuming with Last-Event-ID)."""
        try:
            stream = self.events.admit(job_id, client_key(request), last_event_id(request.headers.get("last-event-id")))
        except Exception as exc:
            return self._error(exc)
        try:
            await self.jobs.status.remote(job_id, owner=owner(request))  # 404 for another key's job
        except Exception as exc:
            self.events.close(stream)
            return self._error(exc)
        self.events.follow(stream)
        return EventResponse(self.events, stream)
