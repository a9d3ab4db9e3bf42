"""A typed HTTP client for imgserve: the same calls as the Python handle, over the network.

`Client("http://127.0.0.1:8000").real("art.png", steps=20, seed=1)` returns a `Result` (bytes,
media type, the echoed parameters); `run(task, image, **fields)` runs any task, and the typed
`real`, `anime` and `layers` pass fields they do not name through `**fields`, so a field added to a
task's params works without a new client. `client.submit("layers", "poster.png", layers=4).wait(print)`
queues a job (with `priority`, `idempotency_key`, a webhook) and follows its progress events to the
result (reconnecting, with `Last-Event-ID`, when the service ends a long stream);
`client.jobs(state="running")` lists this key's jobs, a page at a time. Error responses raise
`ServiceError` carrying the status and the JSON error's code, message and field; 429 and 503 also
carry the server's Retry-After.

Retries: a 429 or 503 is retried up to `max_retries` times (0: never), after the server's
Retry-After (seconds or an HTTP date; without one 1, 2, 4 … s), but never after more than
`max_retry_wait` seconds: a longer Retry-After is raised at once (the service said it will not
take the request sooner). Every request this client makes is safe to repeat on those two answers:
the service sends 429/503 only for a request it did not take (a full queue, a rate limit or
quota, too many event streams), so a retried job submission is never queued twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

FINAL_STATES = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (429, 503)
"""Answers that mean "not taken, try later": the only ones retried."""

ImageInput = bytes | str | Path
"""An input image: its bytes or a file path."""


@dataclass
class Result:
    """One result: the encoded bytes and what the service says it did."""

    data: bytes
    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    """The X-Imgserve-* headers, lower-cased without the prefix (size, steps, cfg, seed, scale, ...)."""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path


class ServiceError(Exception):
    """The service refused or failed a request (`retry_after`: seconds, on 429 and 503)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (delta seconds or an HTTP date) as seconds from now; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _error(response: httpx.Response) -> ServiceError:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": response.text[:200]}
    return ServiceError(response.status_code, error.get("code", "error"), error.get("message", ""),
                        error.get("field"), retry_after_seconds(response.headers.get("retry-after")))


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise _error(response)


def _result(response: httpx.Response) -> Result:
    prefix = "x-imgserve-"
    params = {k[len(prefix):]: v for k, v in response.headers.items() if k.lower().startswith(prefix)}
    return Result(response.content, response.headers.get("content-type", ""), params)


def form_value(value: Any) -> str:
    """A field as a form value: booleans as `true`/`false` (what the service's parser reads), lists
    comma-separated (webhook_events), everything else as `str`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


class Client:
    """HTTP client for one imgserve service."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0,
                 api_key: str | None = None, *, max_retries: int = 3, max_retry_wait: float = 30.0,
                 on_retry: Callable[[ServiceError, float], None] | None = None) -> None:
        """`api_key`: sent as `Authorization: Bearer <key>` when the service needs one.
        `max_retries`: how often a 429/503 is retried (0: never); `max_retry_wait`: the longest
        wait before one; `on_retry(error, seconds)` is told before each wait."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.on_retry = on_retry

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def retry_wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying `response` (the `attempt`-th retry, from 0); None: do not
        retry (not a 429/503, retries spent, or the server asked for longer than `max_retry_wait`).
        Tells `on_retry` when it answers a wait."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        error = _error(response)
        wait = error.retry_after if error.retry_after is not None else min(2.0 ** attempt, self.max_retry_wait)
        if wait > self.max_retry_wait:
            return None
        if self.on_retry is not None:
            self.on_retry(error, wait)
        return wait

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on 429/503 (see the module's docstring); raises ServiceError on an error."""
        attempt = 0
        while True:
            response = self.http.request(method, path, **kwargs)
            wait = self.retry_wait(response, attempt)
            if wait is None:
                _raise_for_error(response)
                return response
            attempt += 1
            time.sleep(wait)

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz").json()

    def models(self) -> dict[str, Any]:
        return self.request("GET", "/v1/models").json()

    def _upload(self, path: str, image: ImageInput, fields: dict[str, Any],
                headers: dict[str, str] | None = None) -> httpx.Response:
        """POST a multipart form: `image` (bytes or a path) and the fields (None values omitted)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        form = {key: form_value(value) for key, value in fields.items() if value is not None}
        return self.request("POST", path, files={"image": ("image", data, "application/octet-stream")}, data=form,
                            headers=headers)

    def run(self, task: str, image: ImageInput, **fields: Any) -> Result:
        """POST /v1/{task} with `image` (bytes or a path) and the task's fields (None values omitted),
        plus the generic `format` and `size` (`auto` or `WxH`: the result fits inside it)."""
        return _result(self._upload(f"/v1/{task}", image, fields))

    def real(self, image: ImageInput, *, prompt: str | None = None, negative_prompt: str | None = None,
             steps: int | None = None, cfg: float | None = None, seed: int | None = None, lora: str | None = None,
             preset: str | None = None, lora_scale: float | None = None, depth_compensation: bool | None = None,
             format: str | None = None, size: str | None = None, **fields: Any) -> Result:
        """2.5D / anime art → photoreal person (`preset`: `full` or a speed preset; `lora`: a version)."""
        return self.run("real", image, prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg=cfg,
                        seed=seed, lora=lora, preset=preset, lora_scale=lora_scale,
                        depth_compensation=depth_compensation, format=format, size=size, **fields)

    def anime(self, image: ImageInput, *, style: str | None = None, format: str | None = None, size: str | None = None,
              **fields: Any) -> Result:
        """Photo → anime in a style (`GET /v1/models` lists the styles)."""
        return self.run("anime", image, style=style, format=format, size=size, **fields)

    def layers(self, image: ImageInput, *, layers: int | None = None, resolution: int | None = None,
               prompt: str | None = None, negative_prompt: str | None = None, steps: int | None = None,
               cfg: float | None = None, seed: int | None = None, cfg_normalize: bool | None = None,
               format: str | None = None, size: str | None = None, **fields: Any) -> Result:
        """Image → RGBA layers: a ZIP of layer_00.png … (bottom first) or, with `format="psd"`, a PSD."""
        return self.run("layers", image, layers=layers, resolution=resolution, prompt=prompt,
                        negative_prompt=negative_prompt, steps=steps, cfg=cfg, seed=seed,
                        cfg_normalize=cfg_normalize, format=format, size=size, **fields)

    def submit(self, task: str, image: ImageInput, *, priority: str | None = None, idempotency_key: str | None = None,
               webhook_url: str | None = None, webhook_events: str | list[str] | None = None,
               **fields: Any) -> Job:
        """POST /v1/jobs: queue a task; returns the Job to follow (a 503 full queue or 429 quota is
        retried like any request, then raises ServiceError). `priority`: low, normal or high;
        `idempotency_key`: the same key and request within a day return the original job
        (`Job.replayed`); `webhook_url`/`webhook_events`: where the job's events are posted."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        response = self._upload("/v1/jobs", image, {"task": task, **fields, "priority": priority,
                                                    "webhook_url": webhook_url, "webhook_events": webhook_events},
                                headers)
        status = response.json()
        return Job(self, status["id"], status, replayed=response.headers.get("idempotent-replayed") == "true")

    def job(self, job_id: str) -> Job:
        """A job by id (one this key submitted, or any with keys off)."""
        return Job(self, job_id)

    def jobs(self, *, limit: int | None = None, cursor: str | None = None, state: str | None = None,
             task: str | None = None) -> dict[str, Any]:
        """GET /v1/jobs: one page of this key's jobs, newest first: {"object": "list", "data": [status...],
        "next_cursor": str | None}; pass `next_cursor` back as `cursor` for the next page."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor), ("state", state), ("task", task))
                  if v is not None}
        return self.request("GET", "/v1/jobs", params=params).json()

    def all_jobs(self, *, state: str | None = None, task: str | None = None,
                 limit: int | None = None) -> Iterator[dict[str, Any]]:
        """This key's jobs, newest first, following the pages (at most `limit` of them)."""
        cursor, left = None, limit
        while left is None or left > 0:
            page = self.jobs(limit=100 if left is None else min(100, left), cursor=cursor, state=state, task=task)
            yield from page["data"]
            if left is not None:
                left -= len(page["data"])
            cursor = page["next_cursor"]
            if not cursor:
                return


class Job:
    """A submitted job: its id and the client that can follow it (`submitted`: the status the
    submission answered; `replayed`: True when that was an earlier job with the same Idempotency-Key)."""

    def __init__(self, client: Client, job_id: str, submitted: dict[str, Any] | None = None,
                 replayed: bool = False) -> None:
        self.client = client
        self.id = job_id
        self.submitted = submitted
        self.replayed = replayed

    def status(self) -> dict[str, Any]:
        return self.client.request("GET", f"/v1/jobs/{self.id}").json()

    def events(self) -> Iterator[dict[str, Any]]:
        """The job's progress events (Server-Sent Events), ending with its final state. A stream the
        service ends before that (its lifetime, `ingress.event_stream_max_s`) is reopened with
        `Last-Event-ID`, so it resumes after the last event seen; a 429 (too many streams) is retried
        like any request."""
        last_id: str | None = None
        quiet = 0  # streams in a row that ended with no event at all: the service is not following the job
        attempt = 0
        while quiet < 3:
            headers = {"Last-Event-ID": last_id} if last_id else None
            with self.client.http.stream("GET", f"/v1/jobs/{self.id}/events", headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    wait = self.client.retry_wait(response, attempt)
                    if wait is None:
                        _raise_for_error(response)
                    attempt += 1
                    time.sleep(wait)
                    continue
                attempt = 0
                quiet += 1
                kind, data = None, None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("id: "):
                        last_id = line[len("id: "):]
                    elif line.startswith("data: "):
                        data = line[len("data: "):]
                    elif line == "":  # the end of one event; comments (`: keep-alive`) carry none
                        if kind in (None, "progress") and data is not None:
                            event = json.loads(data)
                            quiet = 0
                            yield event
                            if event.get("state") in FINAL_STATES:
                                return
                        kind, data = None, None

    def cancel(self) -> dict[str, Any]:
        """Queued: cancelled now; running: stops at its next step; finished: unchanged. Its status."""
        return self.client.request("DELETE", f"/v1/jobs/{self.id}").json()

    def result(self) -> Result:
        """The result bytes; raises ServiceError (409 not_ready) until the job succeeded."""
        return _result(self.client.request("GET", f"/v1/jobs/{self.id}/result"))

    def wait(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> Result:
        """Follow the events to the end, then return the result (ServiceError if it did not succeed)."""
        for event in self.events():
            if on_event is not None:
                on_event(event)
        return self.result()


def progress_line(event: dict[str, Any], width: int = 30) -> str:
    """One line of a text progress bar for an event: state, stage, step i/N, queue position."""
    if event["state"] == "queued":
        position = event.get("queue_position")
        return "queued" + (f" (position {position + 1})" if position is not None else "")
    step, total = event.get("step"), event.get("total_steps")
    fraction = (step / total) if step and total else (1.0 if event["state"] == "succeeded" else 0.0)
    filled = int(round(fraction * width))
    detail = f" step {step}/{total}" if step and total and event.get("stage") == "denoise" else ""
    return f"[{'#' * filled}{'.' * (width - filled)}] {event['state']}: {event.get('stage') or ''}{detail}"


def embedded_metadata(png: bytes) -> dict[str, Any]:
    """The parameters a PNG result carries in its `imgserve` text chunk."""
    from io import BytesIO

    from PIL import Image

    return json.loads(Image.open(BytesIO(png)).info["imgserve"])
