"""The OpenAI-compatible image edit route of the ingress: `POST /v1/images/edits`.

Contract (what an OpenAI client, litellm or Open WebUI sends, on top of the service's own routes):
- A multipart form, OpenAI's, read by `serve_app.uploads.read_upload` with its limits: `image` or
  `image[]` (one file: every task takes one picture, so a second is 422 naming its field; `mask` or
  any other file is 422 too; a raw image body with query fields works as on the other routes), `prompt`, `model`, `n`,
  `size`, `response_format`, `output_format`, `user` (noted in the request's log line, else
  ignored), `quality` and `safety_identifier` (ignored), `stream` (false only), and any field
  of the task (`steps`, `seed`, `lora`, `preset`, `style`, `layers`, ...), validated by the same
  `Orchestrator.resolve` as `POST /v1/{task}`. `format` is refused by name: `output_format` says it.
- `model` is `<task>` or `<task>:<choice>`, the choice being the task's catalog field
  (`TaskSection.choice_field`: `real:<version>`, `anime:<style>`); absent: the registry's first task.
  An unknown task or choice is 404 `not_found` with param `model`, as OpenAI answers an unknown model.
- `prompt` goes to a task whose params have one; a task without (anime) ignores it, since OpenAI
  clients always send one.
- `n` (1 … `ingress.max_images`) results run concurrently. With n > 1 the request is resolved once,
  which fixes the seed, and result i runs with seed + i (a task without a seed makes n equal runs).
- `output_format` (png, webp, jpeg) is the task's `format`. A task whose formats are archives (layers:
  zip, psd) answers one data item per layer PNG, bottom first, taken from its ZIP; it takes png only.
- `response_format=b64_json` (default): each result is `Ingress.run(...)`, the very call of
  `POST /v1/{task}`, with the caller's key id and `caller="http"`: the same validation, queues,
  limits, model-time metrics, time limit (504) and stop on disconnect.
- `response_format=url`: n jobs, submitted as `POST /v1/jobs` submits them (owned by the caller's
  key, counted in its quota), awaited through the runner's `wait_events` long poll; each data item
  is the absolute URL of its job's result (`?layer=i` per layer), readable with the same key. A
  job that failed or was cancelled answers with its error (status from its code). Past
  `ingress.request_timeout_s` (504), or when the caller hangs up, the jobs are cancelled, unless the
  request carried an `Idempotency-Key`: then they run on, and a retry with the same key and the same
  request (job i remembered as `<key>#<i>`, one fingerprint of the whole edits request) gets them,
  replayed (header `Idempotent-Replayed: true`). An Idempotency-Key with b64_json is 422.
- The answer: `{"created", "data": [{"b64_json" | "url", "revised_prompt"?}], "output_format"}`;
  `revised_prompt` is the prompt the result's metadata records when it differs from the one sent
  (the default prompt, a caption the model wrote). No `usage`: there are no tokens to count.

`OpenAIRoutes` is a mixin of `serve_app.ingress.Ingress`, which provides `run`, `jobs`,
`orchestrator`, `settings` and `_error`. Type hints stay real objects (no `from __future__ import
annotations`): FastAPI reads them.
"""

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deployments import packaging
from deployments.errors import InvalidParameter, TimedOut
from deployments.postprocess import IMAGE_FORMATS
from serve_app.access import note
from serve_app.errors import STATUS, NotFound, error_body
from serve_app.idempotency import idempotency
from serve_app.job_routes import client_key, owner
from serve_app.orchestrator import hop
from serve_app.job_record import FINAL_STATES
from serve_app.uploads import read_upload

ROUTE = "/v1/images/edits"
IMAGE_FIELDS = ("image", "image[]")
RESPONSE_FORMATS = ("b64_json", "url")
IGNORED = ("quality", "safety_identifier")
"""OpenAI fields accepted and ignored: `quality` (the task's steps and preset choose it here) and
`safety_identifier` (like `user`, for OpenAI's abuse monitoring)."""
POLL_TIMEOUT_S = 10.0
"""How long one `wait_events` call of the url path waits before asking again."""
JOB_ERROR_STATUS = {**{cls.code: status for cls, status in STATUS.items()}, "cancelled": 409,
                    "replica_lost": 503, "interrupted": 503, "run_timeout": 504, "queue_timeout": 504}
"""A failed job's error code → the status the edits route answers it with (others: 500)."""
_BACKGROUND: set[asyncio.Task] = set()


@dataclass(frozen=True)
class Edit:
    """One edits request, in the service's terms."""

    model: str
    task: str
    fields: dict[str, Any]
    """The task's fields, `format` included."""
    n: int
    response_format: str
    output_format: str
    prompt: str | None
    """The prompt as sent (for `revised_prompt`)."""
    layered: bool
    """The task packages layers: each layer PNG is one data item."""


def parse_edit(given: dict[str, str], orchestrator: Any, max_images: int) -> Edit:
    """The edits form's fields → an `Edit`; 404 for an unknown model, 422 naming a bad field."""
    fields = dict(given)
    model = (fields.pop("model", None) or "").strip() or orchestrator.registry.names[0]
    name, colon, choice = model.partition(":")
    configured = orchestrator.tasks.get(name)
    if configured is None:
        raise NotFound(f"unknown model {model[:64]!r}; GET /v1/models lists them", "model")
    if colon:
        section = configured.section
        known = section.choices(configured.catalog)
        if section.choice_field is None or not choice or (known and choice not in known):
            raise NotFound(f"unknown model {model[:64]!r}; GET /v1/models lists them", "model")
        if fields.get(section.choice_field, choice) != choice:
            raise InvalidParameter(f"model {model!r} already chooses {section.choice_field}={choice}",
                                   section.choice_field)
        fields[section.choice_field] = choice
    n = _n(fields.pop("n", "1"), max_images)
    response_format = fields.pop("response_format", None) or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidParameter(f"must be one of {', '.join(RESPONSE_FORMATS)}", "response_format")
    if fields.pop("stream", "false").strip().lower() not in ("false", "0", ""):
        raise InvalidParameter("streaming is not supported; ask for response_format=url to poll jobs", "stream")
    for ignored in IGNORED:
        fields.pop(ignored, None)
    fields.pop("user", None)
    if "format" in fields:
        raise InvalidParameter("this route takes `output_format` (png, webp, jpeg) instead", "format")
    prompt = fields.pop("prompt", None)
    if prompt is not None and "prompt" in configured.task.params.model_fields:
        fields["prompt"] = prompt
    output_format = fields.pop("output_format", None)
    formats = configured.task.formats
    layered = not set(formats) & set(IMAGE_FORMATS)
    if layered:
        if "zip" not in formats:
            raise InvalidParameter(f"model {name!r} makes no images this route can return", "model")
        if output_format not in (None, "png"):
            raise InvalidParameter(f"model {name!r} returns each layer as a PNG: output_format must be png",
                                   "output_format")
        output_format, fields["format"] = "png", "zip"
    else:
        output_format = output_format or formats[0]
        if output_format not in formats or output_format not in IMAGE_FORMATS:
            allowed = [fmt for fmt in formats if fmt in IMAGE_FORMATS]
            raise InvalidParameter(f"must be one of {', '.join(allowed)}", "output_format")
        fields["format"] = output_format
    return Edit(model, name, fields, n, response_format, output_format, prompt, layered)


def _n(text: str, max_images: int) -> int:
    text = str(text).strip()
    if not text.isdigit() or not 1 <= int(text) <= max_images:
        raise InvalidParameter(f"must be an integer from 1 to {max_images} (ingress.max_images)", "n")
    return int(text)


def _background(work: Any) -> None:
    """Run `work` (a coroutine) to its end although the request that started it is cancelled."""
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_BACKGROUND.discard)


def _item(key: str, value: str, metadata: dict[str, Any], sent: str | None) -> dict[str, str]:
    item = {key: value}
    used = metadata.get("prompt")
    if isinstance(used, str) and used != sent:
        item["revised_prompt"] = used
    return item


class OpenAIRoutes:
    """`POST /v1/images/edits`; mixed into `Ingress`."""

    jobs: Any
    orchestrator: Any
    settings: Any

    async def images_edits(self, request: Request) -> Response:
        try:
            image, given = await read_upload(request, self.orchestrator.upload.max_bytes, self.settings.read_timeout_s,
                                             self.settings.min_body_bytes_per_s, image_fields=IMAGE_FIELDS)
            edit = await self._parse(given)
            note(request, task=edit.task, **({"user": given["user"][:64]} if given.get("user") else {}))
            if edit.response_format == "url":
                key = idempotency(request.headers, ROUTE, edit.model, given, image)
                return await self._edit_jobs(request, edit, image, key)
            if request.headers.get("idempotency-key") is not None:
                raise InvalidParameter("needs response_format=url (a stored job to return again)", "Idempotency-Key")
            return await self._edit_now(request, edit, image)
        except Exception as exc:
            return self._error(exc)  # type: ignore[attr-defined]

    async def _parse(self, given: dict[str, str]) -> Edit:
        """`parse_edit` against the catalogs as the replicas report them; a model id they do not
        list reads them again once before it is refused."""
        await self.orchestrator.refresh()
        try:
            return parse_edit(given, self.orchestrator, self.settings.max_images)
        except NotFound as exc:
            if exc.field != "model":
                raise
            await self.orchestrator.refresh(fresh=True)
            return parse_edit(given, self.orchestrator, self.settings.max_images)

    async def _runs(self, edit: Edit) -> list[dict[str, Any]]:
        """The fields of each of the n runs: with n > 1, resolved once (the seed fixed), then seed + i."""
        if edit.n == 1:
            return [edit.fields]
        resolved = (await self.orchestrator.validate(edit.task, edit.fields)).fields()
        if "seed" not in resolved:
            return [resolved] * edit.n
        seed = resolved["seed"]
        try:  # the last seed in range too; a drawn seed at the top of the range counts down instead
            self.orchestrator.resolve(edit.task, {**resolved, "seed": seed + edit.n - 1})
        except InvalidParameter as exc:
            if exc.field != "seed" or "seed" in edit.fields:
                raise
            seed -= edit.n - 1
        return [{**resolved, "seed": seed + i} for i in range(edit.n)]

    async def _edit_now(self, request: Request, edit: Edit, image: bytes) -> Response:
        runs = [self.run(edit.task, image, fields, key_id=owner(request), caller="http")  # type: ignore[attr-defined]
                for fields in await self._runs(edit)]
        if len(runs) == 1:
            results = [await runs[0]]
        else:
            pending = [asyncio.ensure_future(run) for run in runs]
            try:
                results = await asyncio.gather(*pending)
            except BaseException:  # one failed (or the caller left): the others stop too
                for task in pending:
                    task.cancel()
                raise
        data = []
        for encoded in results:
            pngs = packaging.zip_layer_pngs(encoded.data) if edit.layered else [encoded.data]
            data.extend(_item("b64_json", base64.b64encode(png).decode("ascii"), encoded.metadata, edit.prompt)
                        for png in pngs)
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": edit.output_format})

    async def _edit_jobs(self, request: Request, edit: Edit, image: bytes, key: tuple[str, str] | None) -> Response:
        who = owner(request)
        submissions = [self.jobs.submit.remote(edit.task, image, fields, request.headers.get("x-request-id"),
                                               owner=who, quota_key=client_key(request),
                                               idempotency=(f"{key[0]}#{i}", key[1]) if key else None)
                       for i, fields in enumerate(await self._runs(edit))]
        submitting = asyncio.ensure_future(asyncio.gather(*submissions, return_exceptions=True))
        try:  # shielded: jobs submitted while the caller hangs up are still known, and cancelled
            answers = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            if key is None:
                _background(self._cancel_submitted(submitting, who))
            raise
        statuses = [answer for answer in answers if isinstance(answer, dict)]
        ids = [status["id"] for status in statuses]
        failed = next((answer for answer in answers if isinstance(answer, BaseException)), None)
        if failed is not None:
            if key is None:  # the request is refused as a whole: its other jobs are not left behind
                await self._cancel(ids, who)
            raise failed
        note(request, job_id=",".join(ids)[:200])
        replayed = all([status.pop("replayed", False) for status in statuses])
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                finals = await self._wait(statuses)
        except TimeoutError:
            kept = "they continue: retry with the same Idempotency-Key to get them" if key else "they were cancelled"
            if key is None:
                await self._cancel(ids, who)
            raise TimedOut(f"the jobs took longer than the limit of {self.settings.request_timeout_s:g} s; {kept}") from None
        except asyncio.CancelledError:  # the caller hung up
            if key is None:
                _background(self._cancel(ids, who))
            raise
        for job_id in ids:
            if finals[job_id]["state"] != "succeeded":
                return self._job_error(finals[job_id])
        data = []
        for job_id in ids:
            _, result, media_type, metadata, _ = await self.jobs.result.remote(job_id, owner=who)
            url = f"{request.base_url}v1/jobs/{job_id}/result"
            if edit.layered:
                count = len(packaging.zip_layer_pngs(result)) if result is not None else 0
                data.extend(_item("url", f"{url}?layer={i}", metadata, edit.prompt) for i in range(count))
            else:
                data.append(_item("url", url, metadata, edit.prompt))
        body = {"created": int(min(status["created_at"] for status in statuses)), "data": data,
                "output_format": edit.output_format}
        return JSONResponse(body, headers={"Idempotent-Replayed": "true"} if replayed and key else None)

    async def _wait(self, statuses: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The final status of each job, through the runner's long poll (one call for all of them)."""
        finals = {status["id"]: status for status in statuses if status["state"] in FINAL_STATES}
        cursors = {status["id"]: 0 for status in statuses if status["id"] not in finals}
        while cursors:
            answer = await hop(self.jobs.wait_events.remote(dict(cursors), POLL_TIMEOUT_S))
            for job_id, (events, status) in answer.items():
                if job_id not in cursors:
                    continue
                if status is None:
                    raise NotFound(f"job {job_id} was forgotten before it ended", "id")
                cursors[job_id] += len(events)
                if status["state"] in FINAL_STATES:
                    finals[job_id] = status
                    del cursors[job_id]
        return finals

    async def _cancel(self, ids: list[str], who: str | None) -> None:
        await asyncio.gather(*(self.jobs.cancel.remote(job_id, owner=who) for job_id in ids), return_exceptions=True)

    async def _cancel_submitted(self, submitting: asyncio.Future, who: str | None) -> None:
        answers = await submitting
        await self._cancel([answer["id"] for answer in answers if isinstance(answer, dict)], who)

    def _job_error(self, status: dict[str, Any]) -> JSONResponse:
        """A job that did not succeed, answered with its own error."""
        error = status.get("error") or {}
        code = error.get("code") or status["state"]
        http_status = JOB_ERROR_STATUS.get(code, 500)
        message = f"job {status['id']} {status['state']}: {error.get('message') or code}"
        headers = {"Retry-After": str(self.settings.retry_after_s)} if http_status in (429, 503) else None
        return JSONResponse(error_body(code, message, error.get("field"), http_status), status_code=http_status,
                            headers=headers)
