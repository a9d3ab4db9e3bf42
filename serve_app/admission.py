"""Admitting a job submission into the store: idempotent replays, the limits, the durable create.

Contract (the runner's side, both blocking: called on a thread):
- `replay(owner, (key, fingerprint))`: the job an earlier identical submission of `owner` created
  under that Idempotency-Key (None: none), or IdempotencyConflict (422, field `Idempotency-Key`)
  when the key came with another request. The runner asks first: a replay creates nothing, so no
  limit refuses it.
- `create(...)`: refuses with QueueFull (503, `max_queued`), QuotaExceeded (429 past
  `max_queued_per_key` for the quota key, Retry-After from recent run times) or InsufficientStorage
  (507: `max_store_bytes` after forgetting finished jobs, `min_free_bytes`, or a disk that refuses
  the write), else saves the job. With an idempotency key the store checks it again inside the
  insert's transaction, so of two identical submissions racing each other one creates the job and
  the other gets it back with `replayed` set (or IdempotencyConflict when they differ); a limit
  that refuses the second is asked again too, since the first may be what filled it.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from typing import TYPE_CHECKING, Any

from serve_app.errors import IdempotencyConflict, InsufficientStorage, QueueFull, QuotaExceeded
from serve_app.idempotency import FIELD
from serve_app.store_idempotency import KeyReused

if TYPE_CHECKING:
    from serve_app.config import JobsSection
    from serve_app.job_record import Job
    from serve_app.store import SqliteJobStore

log = logging.getLogger("imgserve.jobs")


class Admission:
    def __init__(self, config: JobsSection, store: SqliteJobStore) -> None:
        self.config = config
        self.store = store

    def replay(self, owner: str | None, idempotency: tuple[str, str]) -> Job | None:
        try:
            return self.store.replay(owner, *idempotency)
        except KeyReused:
            raise self.conflict() from None

    def create(self, task: str, fields: dict[str, Any], image: bytes, *, owner: str | None,
               quota_key: str | None, idempotency: tuple[str, str] | None, **job: Any) -> Job:
        """The queued job (`job`: the rest of `SqliteJobStore.create`'s keywords), or an earlier one
        with `replayed` set; raises as the module says."""
        try:
            self.limits(len(image), quota_key or owner)
        except (QueueFull, QuotaExceeded, InsufficientStorage):
            # an identical submission racing this one may be what filled the queue: it is the answer
            earlier = self.replay(owner, idempotency) if idempotency else None
            if earlier is None:
                raise
            earlier.replayed = True
            return earlier
        try:
            return self.store.create(task, fields, image, owner=owner, quota_key=quota_key,
                                     idempotency=idempotency, **job)
        except KeyReused:
            raise self.conflict() from None
        except (OSError, sqlite3.OperationalError) as exc:
            log.warning("job store refused a submission: %s", exc)
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise InsufficientStorage(f"the job store could not save the input: {reason}") from None

    def conflict(self) -> IdempotencyConflict:
        return IdempotencyConflict(f"this key was already used for a different request (keys are remembered for "
                                   f"jobs.idempotency_ttl_s, {self.config.idempotency_ttl_s:g} s); send a new key "
                                   "with a new request", FIELD)

    def limits(self, size: int, key: str | None) -> None:
        """Raise unless one more job of `size` bytes may wait, for quota key `key`."""
        if self.store.count("queued") >= self.config.max_queued:
            waiting = self.config.max_queued
            raise QueueFull(f"{waiting} {'job is' if waiting == 1 else 'jobs are'} waiting; retry later")
        limit = self.config.max_queued_per_key
        if key and limit is not None and self.store.count("queued", key) >= limit:
            mean = self.store.recent_run_seconds()
            raise QuotaExceeded(f"this key has {limit} {'job' if limit == 1 else 'jobs'} waiting "
                                "(jobs.max_queued_per_key); retry when one has started",
                                retry_after_s=max(1, math.ceil(mean)) if mean else None)
        budget = self.config.max_store_bytes
        if budget is not None and self.store.store_bytes() + size > budget:
            self.store.evict(budget, room=size)
            held = self.store.store_bytes()
            if held + size > budget:
                raise InsufficientStorage(
                    f"the job store is full: unfinished jobs hold {held} bytes and this upload has {size}; "
                    f"jobs.max_store_bytes is {budget}. Retry when jobs have finished")
        free = self.store.free_bytes()
        if free - size < self.config.min_free_bytes:
            raise InsufficientStorage(
                f"the job store's disk has {free} bytes free; this upload would leave less than "
                f"jobs.min_free_bytes ({self.config.min_free_bytes})")
