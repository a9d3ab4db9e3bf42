"""The job store's memory of idempotency keys: (owner, Idempotency-Key) → (fingerprint, job).

A mixin of `serve_app.store.SqliteJobStore` (its connection, lock and `_one`), in the same SQLite
file as the jobs (table `idempotency`, `store_schema`), so a remembered key survives restarts and is
written in the same transaction as the job it created: two identical submissions racing each other
create one job. A key is remembered for `idempotency_ttl_s` from its first use.

Looking a key up (`_recall`): unknown, older than the TTL, or naming a job that retention already
forgot → None (a new request; the entry is then replaced); same fingerprint → the original job,
whatever its state; another fingerprint → `KeyReused`. Knows nothing about Ray, HTTP or models:
the runner turns `KeyReused` into the 422 `idempotency_conflict`.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.job_record import Job


class KeyReused(Exception):
    """The idempotency key was first used, within its TTL, for a request with another fingerprint."""


class IdempotencyMemory:
    """Needs from its store: `_tx`, `_lock`, `_db`, `_one`, `idempotency_ttl_s`."""

    idempotency_ttl_s: float

    @staticmethod
    def _scope(owner: str | None) -> str:
        return owner or ""  # API key ids are never empty: '' is the keys-off scope

    def _recall(self, db: sqlite3.Connection, owner: str | None, key: str, fingerprint: str) -> Job | None:
        row = db.execute("SELECT fingerprint, job_id, created_at FROM idempotency WHERE scope = ? AND key = ?",
                         (self._scope(owner), key)).fetchone()
        if row is None or row[2] <= time.time() - self.idempotency_ttl_s:
            return None
        job = self._one(row[1])
        if job is None:  # forgotten by retention: nothing to return, so the key starts afresh
            return None
        if row[0] != fingerprint:
            raise KeyReused(key)
        return job

    def _remember(self, db: sqlite3.Connection, owner: str | None, key: str, fingerprint: str, job: Job) -> None:
        db.execute("INSERT OR REPLACE INTO idempotency (scope, key, fingerprint, job_id, created_at)"
                   " VALUES (?, ?, ?, ?, ?)", (self._scope(owner), key, fingerprint, job.id, job.created_at))

    def replay(self, owner: str | None, key: str, fingerprint: str) -> Job | None:
        """The job an earlier identical submission of `owner` created under `key`; None when there
        is none to return (see the module); raises KeyReused for another request's key. Reads only:
        `create(..., idempotency=)` checks again inside its write transaction."""
        with self._lock:
            return self._recall(self._db, owner, key, fingerprint)

    def purge_idempotency(self) -> int:
        """Forget the keys first used more than `idempotency_ttl_s` ago; how many."""
        with self._tx() as db:
            return db.execute("DELETE FROM idempotency WHERE created_at <= ?",
                              (time.time() - self.idempotency_ttl_s,)).rowcount
