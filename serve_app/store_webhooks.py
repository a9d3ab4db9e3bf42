"""Webhook deliveries kept in the job store's SQLite, so they outlive a runner (at-least-once).

One row per message (one event of one job): its id (the `webhook-id`, the same on every retry),
the URL, the exact body, when it is next due and until when it may be retried, and how its attempts
went. `pending` rows are delivered; `delivered` and `failed` (given up) ones only count in the job's
`webhook` summary. `claim_due` takes due rows by pushing their `next_at` past one attempt's time
(a lease), so a second runner sharing the store (a redeploy) does not send the same message at the
same time, and a runner that dies mid-attempt leaves its rows due again once the lease lapses.
Rows go when their job is forgotten (retention, the byte budget) and they are no longer pending.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from serve_app.store import SqliteJobStore


class Delivery(NamedTuple):
    id: str
    job_id: str
    url: str
    event: str
    body: bytes
    deadline: float
    attempts: int


_DELIVERY = "id, job_id, url, event, body, deadline, attempts"


class WebhookStore:
    """The `webhook_deliveries` table on `store`'s connection, under its lock and transactions."""

    def __init__(self, store: SqliteJobStore) -> None:
        self.store = store
        with store._lock:
            store._db.execute(
                "CREATE TABLE IF NOT EXISTS webhook_deliveries (id TEXT PRIMARY KEY, job_id TEXT NOT NULL,"
                " url TEXT NOT NULL, event TEXT NOT NULL, body BLOB NOT NULL, created_at REAL NOT NULL,"
                " next_at REAL NOT NULL, deadline REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',"
                " attempts INTEGER NOT NULL DEFAULT 0, last_status INTEGER, last_error TEXT, last_attempt_at REAL)")
            store._db.execute("CREATE INDEX IF NOT EXISTS webhook_due ON webhook_deliveries (state, next_at)")
            store._db.execute("CREATE INDEX IF NOT EXISTS webhook_job ON webhook_deliveries (job_id)")

    def add(self, job_id: str, url: str, event: str, body: bytes, retry_s: float, message_id: str | None = None
            ) -> str:
        """Record a message, due now; its id."""
        message_id = message_id or f"msg_{uuid.uuid4().hex}"
        now = time.time()
        with self.store._tx() as db:
            db.execute("INSERT INTO webhook_deliveries (id, job_id, url, event, body, created_at, next_at, deadline)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (message_id, job_id, url, event, body, now, now, now + retry_s))
        return message_id

    def claim_due(self, limit: int, lease_s: float, exclude: set[str]) -> list[Delivery]:
        """Up to `limit` pending messages due now (oldest due first, none of `exclude`), each
        leased for `lease_s`."""
        now = time.time()
        with self.store._tx() as db:
            rows = db.execute(f"SELECT {_DELIVERY} FROM webhook_deliveries WHERE state = 'pending' AND next_at <= ?"
                              " ORDER BY next_at LIMIT ?", (now, limit + len(exclude))).fetchall()
            due = [Delivery(*row) for row in rows if row[0] not in exclude][:limit]
            for delivery in due:
                db.execute("UPDATE webhook_deliveries SET next_at = ? WHERE id = ?", (now + lease_s, delivery.id))
        return due

    def next_due(self) -> float | None:
        """When the earliest pending message is due (epoch seconds); None when none is pending."""
        with self.store._lock:
            (when,) = self.store._db.execute(
                "SELECT MIN(next_at) FROM webhook_deliveries WHERE state = 'pending'").fetchone()
        return when

    def attempted(self, message_id: str, status: int | None, error: str | None, next_at: float | None,
                  delivered: bool) -> None:
        """Record one attempt: delivered, due again at `next_at`, or (next_at None) given up."""
        state = "delivered" if delivered else "pending" if next_at is not None else "failed"
        with self.store._tx() as db:
            db.execute("UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = ?, last_error = ?,"
                       " last_attempt_at = ?, state = ?, next_at = COALESCE(?, next_at) WHERE id = ?",
                       (status, error, time.time(), state, next_at, message_id))

    def summary(self, job_id: str) -> dict[str, Any]:
        """attempts, last_status, last_error, delivered, pending, failed: over the job's messages."""
        with self.store._lock:
            db = self.store._db
            attempts, delivered, pending, failed = db.execute(
                "SELECT COALESCE(SUM(attempts), 0), COALESCE(SUM(state = 'delivered'), 0),"
                " COALESCE(SUM(state = 'pending'), 0), COALESCE(SUM(state = 'failed'), 0)"
                " FROM webhook_deliveries WHERE job_id = ?", (job_id,)).fetchone()
            last = db.execute("SELECT last_status, last_error FROM webhook_deliveries WHERE job_id = ?"
                              " AND last_attempt_at IS NOT NULL ORDER BY last_attempt_at DESC LIMIT 1",
                              (job_id,)).fetchone()
        return {"attempts": int(attempts), "last_status": last[0] if last else None,
                "last_error": last[1] if last else None, "delivered": int(delivered), "pending": int(pending),
                "failed": int(failed)}

    def forget_orphans(self) -> int:
        """Remove the finished messages of jobs the store no longer has; how many."""
        with self.store._tx() as db:
            return db.execute("DELETE FROM webhook_deliveries WHERE state != 'pending'"
                              " AND job_id NOT IN (SELECT id FROM jobs)").rowcount
