"""The job store's SQLite schema: tables, columns, indexes, and bringing an older store up to date.

`open_database(path, priority_ageing_s)` opens (or creates) `jobs.sqlite3` in WAL mode with
`synchronous=FULL`, adds the columns and tables later versions introduced (`ADDED`; a store from
any earlier version opens), creates the indexes, and (re)computes `order_at` for queued jobs.

`order_at` is a queued job's effective time, what its key's queue is ordered by: `created_at`
minus `priority_ageing_s` for `high`, plus it for `low` (`ORDER_AT`). It is a column (indexed with
the key and state) rather than an expression so the next claim and a queue position are index
lookups; it is recomputed when the store opens, so a changed `priority_ageing_s` applies to the jobs
already waiting. Knows nothing about Ray, HTTP or models.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

COLUMNS = ("id", "task", "state", "stage", "step", "total_steps", "error", "created_at", "started_at",
           "finished_at", "attempts", "cancel_requested", "fields", "media_type", "metadata", "served", "request_id",
           "owner", "quota_key", "runner", "lease_until", "model_seconds", "input_bytes", "result_bytes",
           "result_sha256", "priority", "webhook")
"""The columns a `Job` is read from (`order_at` is the store's own, derived from two of them)."""
ADDED = {"request_id": "TEXT", "owner": "TEXT", "quota_key": "TEXT NOT NULL DEFAULT ''", "runner": "TEXT",
         "lease_until": "REAL", "model_seconds": "REAL", "input_bytes": "INTEGER NOT NULL DEFAULT 0",
         "result_bytes": "INTEGER", "result_sha256": "TEXT",
         "priority": "TEXT NOT NULL DEFAULT 'normal'", "webhook": "TEXT", "order_at": "REAL"}
"""Columns later than the first schema: added to an older store when it opens."""
JSON_COLUMNS = {"error", "fields", "metadata", "served", "webhook"}
SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"
PRIORITIES = {"high": 1, "normal": 0, "low": -1}
"""Each priority's sign: its effective time is `created_at - sign × priority_ageing_s`."""
ORDER_AT = "created_at - CASE priority WHEN 'high' THEN :ageing WHEN 'low' THEN -:ageing ELSE 0 END"
"""`order_at` in SQL (named parameter `ageing`), the one place the formula is written."""


def open_database(path: Path, priority_ageing_s: float) -> tuple[sqlite3.Connection, set[str]]:
    """The connection (autocommit: the store opens its own transactions) and the jobs table's
    columns as they were before this call (to tell an older store)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the call returns
    db.execute(
        "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, task TEXT, state TEXT, stage TEXT, step INTEGER,"
        " total_steps INTEGER, error TEXT, created_at REAL, started_at REAL, finished_at REAL,"
        " attempts INTEGER, cancel_requested INTEGER, fields TEXT, media_type TEXT, metadata TEXT, served TEXT)"
    )
    present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for column, kind in ADDED.items():
        if column not in present:  # a store from before this column
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
    db.execute("CREATE TABLE IF NOT EXISTS fair (quota_key TEXT PRIMARY KEY, last_claim REAL)")
    # (scope, key) → the job it created; scope is the owner, '' with keys off (NULLs would never collide)
    db.execute("CREATE TABLE IF NOT EXISTS idempotency (scope TEXT NOT NULL, key TEXT NOT NULL,"
               " fingerprint TEXT NOT NULL, job_id TEXT NOT NULL, created_at REAL NOT NULL,"
               " PRIMARY KEY (scope, key))")
    db.execute("CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_key_state ON jobs (quota_key, state, created_at)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_key_order ON jobs (quota_key, state, order_at, id)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at)")
    db.execute(f"UPDATE jobs SET order_at = {ORDER_AT} WHERE state = 'queued' OR order_at IS NULL",
               {"ageing": priority_ageing_s})
    return db, present
