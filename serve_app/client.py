"""A typed HTTP client for imgserve: the same calls as the Python handle, over the network.

`Client("http://127.0.0.1:8000").real("art.png", steps=20, seed=1)` returns a `Result` (bytes,
media type, the echoed parameters); `client.submit("layers", "poster.png", layers=4).wait(print)`
queues a job and follows its progress events to the result (reconnecting, with `Last-Event-ID`,
when the service ends a long stream); `client.jobs(state="running")` lists this key's jobs, a page at
a time. Error responses raise `ServiceError` carrying the status and the JSON error's code, message
and field; 429 and 503 also carry the server's Retry-After.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import httpx

FINAL_STATES = ("succeeded", "failed", "cancelled")


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


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": response.text[:200]}
    retry_after = response.headers.get("retry-after")
    raise ServiceError(response.status_code, error.get("code", "error"), error.get("message", ""),
                       error.get("field"), float(retry_after) if retry_after else None)


def _result(response: httpx.Response) -> Result:
    prefix = "x-imgserve-"
    params = {k[len(prefix):]: v for k, v in response.headers.items() if k.lower().startswith(prefix)}
    return Result(response.content, response.headers.get("content-type", ""), params)


class Client:
    """HTTP client for one imgserve service."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0,
                 api_key: str | None = None) -> None:
        """`api_key`: sent as `Authorization: Bearer <key>` when the service needs one."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict[str, Any]:
        response = self.http.get("/healthz")
        _raise_for_error(response)
        return response.json()

    def models(self) -> dict[str, Any]:
        response = self.http.get("/v1/models")
        _raise_for_error(response)
        return response.json()

    def _upload(self, path: str, image: bytes | str | Path, fields: dict[str, Any]) -> httpx.Response:
        """POST a multipart form: `image` (bytes or a path) and the fields (None values omitted)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        form = {key: str(value) for key, value in fields.items() if value is not None}
        response = self.http.post(path, files={"image": ("image", data, "application/octet-stream")}, data=form)
        _raise_for_error(response)
        return response

    def run(self, task: str, image: bytes | str | Path, **fields: Any) -> Result:
        """POST /v1/{task} with `image` (bytes or a path) and the task's fields (None values omitted)."""
        return _result(self._upload(f"/v1/{task}", image, fields))

    def jobs(self, *, limit: int | None = None, cursor: str | None = None, state: str | None = None,
             task: str | None = None) -> dict[str, Any]:
        """GET /v1/jobs: one page of this key's jobs, newest first: {"object": "list", "data": [status...],
        "next_cursor": str | None}; pass `next_cursor` back as `cursor` for the next page."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor), ("state", state), ("task", task))
                  if v is not None}
        response = self.http.get("/v1/jobs", params=params)
        _raise_for_error(response)
        return response.json()

    def all_jobs(self, *, state: str | None = None, task: str | None = None) -> Iterator[dict[str, Any]]:
        """Every job of this key, newest first, following the pages."""
        cursor = None
        while True:
            page = self.jobs(limit=100, cursor=cursor, state=state, task=task)
            yield from page["data"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def submit(self, task: str, image: bytes | str | Path, **fields: Any) -> Job:
        """POST /v1/jobs: queue a task; returns the Job to follow (503 QueueFull raises ServiceError)."""
        return Job(self, self._upload("/v1/jobs", image, {"task": task, **fields}).json()["id"])

    def real(self, image: bytes | str | Path, *, prompt: str | None = None, negative_prompt: str | None = None,
             steps: int | None = None, cfg: float | None = None, seed: int | None = None, lora: str | None = None,
             preset: str | None = None, lora_scale: float | None = None, format: str = "png") -> Result:
        """2.5D / anime art → photoreal person (`preset`: `full` or a speed preset; `lora`: a version)."""
        return self.run("real", image, prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg=cfg,
                        seed=seed, lora=lora, preset=preset, lora_scale=lora_scale, format=format)


class Job:
    """A submitted job: its id and the client that can follow it."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def status(self) -> dict[str, Any]:
        response = self.client.http.get(f"/v1/jobs/{self.id}")
        _raise_for_error(response)
        return response.json()

    def events(self) -> Iterator[dict[str, Any]]:
        """The job's progress events (Server-Sent Events), ending with its final state. A stream the
        service ends before that (its lifetime, `ingress.event_stream_max_s`) is reopened with
        `Last-Event-ID`, so it resumes after the last event seen."""
        last_id: str | None = None
        quiet = 0  # streams in a row that ended with no event at all: the service is not following the job
        while quiet < 3:
            quiet += 1
            headers = {"Last-Event-ID": last_id} if last_id else None
            with self.client.http.stream("GET", f"/v1/jobs/{self.id}/events", headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
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
        response = self.client.http.delete(f"/v1/jobs/{self.id}")
        _raise_for_error(response)
        return response.json()

    def result(self) -> Result:
        """The result bytes; raises ServiceError (409 not_ready) until the job succeeded."""
        response = self.client.http.get(f"/v1/jobs/{self.id}/result")
        _raise_for_error(response)
        return _result(response)

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
