"""A job's record: what a client sees of one asynchronous request, plus what the runner needs to redo it.

`Job` is a plain dataclass with no behaviour beyond its public view (`public`, GET /v1/jobs/{id});
`serve_app.store` persists it (one row per job, `store_schema`) and re-exports these names, which is
where the rest of the service imports them from. A claim is (runner id, attempt number).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
Claim = tuple[str, int]
"""(runner id, attempt): who runs a job now; a finished or handed-back claim no longer matches."""


@dataclass
class Job:
    """One asynchronous request as the client sees it (plus what the runner needs to redo it)."""

    id: str
    task: str
    state: State = "queued"
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    error: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    fields: dict[str, Any] = field(default_factory=dict)
    """The request's resolved fields (seed included), so a retry reproduces the same result."""
    media_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    """The id of the HTTP request that submitted the job (its X-Request-Id), to find it in the logs."""
    owner: str | None = None
    """The API key id that submitted the job (None with keys off): only it sees the job."""
    quota_key: str = ""
    """Whose queue the job waits in (quota and fair dispatch): the ingress's quota key, else the owner."""
    runner: str | None = None
    lease_until: float | None = None
    """While running: the claiming runner and when its claim lapses unless renewed."""
    model_seconds: float | None = None
    input_bytes: int = 0
    result_bytes: int | None = None
    result_sha256: str | None = None
    priority: str = "normal"
    """`low`, `normal` or `high`: its order within its key's queue (with ageing, `store_order`)."""
    webhook: dict[str, Any] | None = None
    """{"url", "events"} when the submission asked to be called back (`serve_app.webhooks`)."""
    replayed: bool = field(default=False, compare=False)
    """Not stored: True on the job `create` returns when its idempotency key found this earlier job."""

    @property
    def claim(self) -> Claim:
        return (self.runner or "", self.attempts)

    def public(self, queue_position: int | None = None) -> dict[str, Any]:
        """The client's view: GET /v1/jobs/{id} (the owner is not shown)."""
        return {
            "id": self.id,
            "task": self.task,
            "state": self.state,
            "stage": self.stage,
            "step": self.step,
            "total_steps": self.total_steps,
            "queue_position": queue_position,
            "error": _error_view(self.error),
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "request_id": self.request_id,
            "model_seconds": self.model_seconds,
            "priority": self.priority,
        }


def _error_view(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's error in the one error shape: a request error already has OpenAI's `type` and
    `param`; one the service recorded itself (a cancel, a time limit, a lost replica) gets them here."""
    if error is None or "type" in error:
        return error
    kind = "invalid_request_error" if error.get("code") == "cancelled" else "server_error"
    return {**error, "type": kind, "param": error.get("field")}
