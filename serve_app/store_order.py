"""Fair dispatch order over the job store's queued jobs: which job starts next, and a job's place.

Queued jobs wait in one queue per quota key (the caller's API key id, or what the ingress passes
for keys-off callers, e.g. its address; "" for none). The next job comes from the key with the
fewest running jobs, ties broken by the key whose last claim is oldest (never claimed first), then by
the key's earliest effective time; within a key, by effective time (`order_at`: `created_at` shifted
by the job's priority and `jobs.priority_ageing_s`, see `store_schema`), then id. That is round-robin
across keys: a key with 50 queued jobs delays another key's single job by at most one claim, and a
priority only reorders its own key's queue. With a single key (keys off, no quota key) and one
priority it is plain FIFO.

`position` estimates a queued job's place under that order, as if every key took one turn per round
in the current order: its rank r within its key (by effective time, as claims take them), plus from each other key min(queued, r + 1) when
that key's turn comes first this round, else min(queued, r). Exact for one key; for several an
estimate (jobs submitted later by an idle key may pass it, one per round, and so may a later job
of its own key with a higher priority).

Runs inside the store's lock or write transaction, on its connection.
"""

from __future__ import annotations

import sqlite3


class FairOrder:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def keys(self) -> list[tuple[str, int]]:
        """(quota key, queued jobs) of every key with queued jobs, in the order their turns come."""
        queued = self.db.execute(
            "SELECT quota_key, COUNT(*), MIN(order_at) FROM jobs WHERE state = 'queued' GROUP BY quota_key"
        ).fetchall()
        if len(queued) <= 1:
            return [(key, n) for key, n, _ in queued]
        running = dict(self.db.execute(
            "SELECT quota_key, COUNT(*) FROM jobs WHERE state = 'running' GROUP BY quota_key").fetchall())
        last = dict(self.db.execute("SELECT quota_key, last_claim FROM fair").fetchall())
        queued.sort(key=lambda row: (running.get(row[0], 0), last.get(row[0], -1.0), row[2], row[0]))
        return [(key, n) for key, n, _ in queued]

    def next(self) -> tuple[str, str] | None:
        """(job id, its quota key) of the job to claim next; None when nothing is queued."""
        keys = self.keys()
        if not keys:
            return None
        key = keys[0][0]
        (job_id,) = self.db.execute(
            "SELECT id FROM jobs WHERE state = 'queued' AND quota_key = ? ORDER BY order_at, id LIMIT 1", (key,)
        ).fetchone()
        return job_id, key

    def position(self, job_id: str) -> int | None:
        row = self.db.execute("SELECT state, order_at, quota_key FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] != "queued":
            return None
        _, order_at, key = row
        (rank,) = self.db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND quota_key = ?"
            " AND (order_at < ? OR (order_at = ? AND id < ?))", (key, order_at, order_at, job_id),
        ).fetchone()
        ahead, before = int(rank), True
        for other, n in self.keys():
            if other == key:
                before = False
            else:
                ahead += min(n, rank + 1 if before else rank)
        return ahead

    def forget_idle_keys(self) -> None:
        """Drop the last-claim times of keys that have no jobs left (keeps the table small)."""
        self.db.execute("DELETE FROM fair WHERE quota_key NOT IN (SELECT DISTINCT quota_key FROM jobs)")
