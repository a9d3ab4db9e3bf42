"""Webhooks: a job's events delivered to the URL its submission named, signed, retried, allowed.

Contract (the runner's side): `check(url, events)` validates a submission's `webhook_url` and
`webhook_events` (422 naming the field) and returns what the job stores (`{"url", "events"}`);
`notify(job, event)` records a delivery for one of the job's events (`started`, `progress` at most
one a second, `succeeded`, `failed`, `cancelled`) without waiting for it; `run()` is the delivery
loop the runner starts; `summary(job)` is the job status's `webhook` entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.jobs import JobRunner
    from serve_app.store import Job

EVENTS: tuple[str, ...] = ("started", "progress", "succeeded", "failed", "cancelled")


class Webhooks:
    """The runner's webhook deliveries (interface; the delivery side comes with its tests)."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def check(self, url: str | None, events: str | list[str] | None) -> dict[str, Any] | None:
        return None

    def notify(self, job: Job, event: str) -> None:
        return None

    async def run(self) -> None:
        return None

    def summary(self, job: Job) -> dict[str, Any] | None:
        return None
