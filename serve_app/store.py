"""Job records and results that outlive every replica: one interface, SQLite by default.

`JobStore` is what the job runner needs: create a job (its input saved as a file), claim the next
job fairly across keys, hold a claim by a lease, record progress and the end state, save and verify
the result, list a caller's jobs, and forget jobs past retention or a byte budget. Within a key's
queue jobs go by effective time, their age shifted by their priority (`store_schema.ORDER_AT`); an
idempotency key's job is remembered in the same transaction (`store_idempotency`). Every state change
is a compare-and-set in SQL (`UPDATE … WHERE state = …`), so two runners (a redeploy) never claim one
job twice, a cancelled job never becomes succeeded, and a runner that lost its claim (lease expired,
job handed back) cannot finish it. A claim is (runner id, attempt number).

Durability: rows in `<directory>/jobs.sqlite3` (WAL, `synchronous=FULL`: a committed state survives
power loss), bytes under `<directory>/files/` written by `store_files` (tmp, fsync, rename, fsync
dir) *before* the row that names them, with their size and SHA-256, so a row never points at bytes
that are not whole. Knows nothing about Ray, HTTP or models.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from serve_app import store_files as files
from serve_app.job_record import Claim, Job, State
from serve_app.store_idempotency import IdempotencyMemory
from serve_app.store_order import FairOrder
from serve_app.store_schema import COLUMNS, JSON_COLUMNS, ORDER_AT, PRIORITIES, SELECT, open_database
from serve_app.store_upkeep import StoreUpkeep


class JobStore(Protocol):
    def create(self, task: str, fields: dict[str, Any], image: bytes, request_id: str | None = None,
               owner: str | None = None, quota_key: str | None = None, priority: str = "normal",
               webhook: dict[str, Any] | None = None, idempotency: tuple[str, str] | None = None) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def input(self, job_id: str) -> bytes: ...
    def claim_next(self, runner: str = "", lease_s: float = float("inf")) -> Job | None: ...
    def renew(self, runner: str, lease_s: float, job_ids: list[str]) -> int: ...
    def progress(self, job_id: str, claim: Claim | None, lease_s: float | None, **changes: Any) -> Job | None: ...
    def cancel(self, job_id: str) -> Job | None: ...
    def requeue(self, job_id: str, claim: Claim | None, spend_attempt: bool = True) -> Job | None: ...
    def finish(self, job_id: str, state: State, **kwargs: Any) -> Job | None: ...
    def result(self, job_id: str) -> bytes | None: ...
    def queue_position(self, job_id: str) -> int | None: ...
    def count(self, state: State, quota_key: str | None = None) -> int: ...
    def purge(self, older_than_s: float) -> int: ...
    def replay(self, owner: str | None, key: str, fingerprint: str) -> Job | None: ...
    def purge_idempotency(self) -> int: ...


class SqliteJobStore(StoreUpkeep, IdempotencyMemory):
    """Jobs in `<directory>/jobs.sqlite3`, inputs and results in `<directory>/files/` (0700, files 0600).
    `priority_ageing_s`: what a priority is worth in seconds of waiting (`store_schema`);
    `idempotency_ttl_s`: how long an idempotency key is remembered (`store_idempotency`)."""

    select = SELECT

    def __init__(self, directory: Path | str, priority_ageing_s: float = 300.0,
                 idempotency_ttl_s: float = 24 * 3600.0) -> None:
        self.directory = Path(directory).expanduser()
        self.files = self.directory / "files"
        self.priority_ageing_s = priority_ageing_s
        self.idempotency_ttl_s = idempotency_ttl_s
        files.private_dir(self.directory)
        files.private_dir(self.files)
        self.orphans_removed = files.remove_orphans(self.files)
        self._lock = threading.Lock()
        self._db, present = open_database(self.directory / "jobs.sqlite3", priority_ageing_s)
        if "input_bytes" not in present:
            self._count_old_bytes()
        for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).chmod(files.FILE_MODE)
        self.order = FairOrder(self._db)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialized in this process (the lock) and across processes
        (BEGIN IMMEDIATE takes SQLite's write lock before the first read)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _count_old_bytes(self) -> None:
        for (job_id,) in self._db.execute("SELECT id FROM jobs").fetchall():
            with contextlib.suppress(KeyError):
                size = files.file_size(self._path(job_id, "input"))
                result = files.file_size(self._path(job_id, "result"))
                self._db.execute("UPDATE jobs SET input_bytes = ?, result_bytes = ? WHERE id = ?",
                                 (size, result or None, job_id))

    # -- rows ------------------------------------------------------------------------------------
    def _row(self, row: tuple | None) -> Job | None:
        if row is None:
            return None
        values = dict(zip(COLUMNS, row))
        for key in JSON_COLUMNS:
            values[key] = json.loads(values[key]) if values[key] else ({} if key not in ("error", "webhook") else None)
        values["cancel_requested"] = bool(values["cancel_requested"])
        values["quota_key"] = values["quota_key"] or ""
        values["input_bytes"] = values["input_bytes"] or 0
        return Job(**values)

    def _one(self, job_id: str) -> Job | None:
        return self._row(self._db.execute(f"{SELECT} WHERE id = ?", (job_id,)).fetchone())

    def _path(self, job_id: str, kind: str) -> Path:
        if not all(c in "0123456789abcdef" for c in job_id) or len(job_id) != 32:
            raise KeyError(job_id)  # ids are ours: never a path from a client
        return self.files / f"{job_id}.{kind}"

    def _set(self, db: sqlite3.Connection, job_id: str, where: str, params: tuple, **changes: Any) -> bool:
        """UPDATE one job's `changes` when `where` holds (the compare of compare-and-set)."""
        for key in JSON_COLUMNS & set(changes):
            changes[key] = json.dumps(changes[key]) if changes[key] is not None else None
        assignments = ", ".join(f"{key} = ?" for key in changes)
        cursor = db.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND {where}",
                            (*changes.values(), job_id, *params))
        return cursor.rowcount == 1

    @staticmethod
    def _claimed(claim: Claim | None) -> tuple[str, tuple]:
        if claim is None:
            return "state = 'running'", ()
        return "state = 'running' AND runner IS ? AND attempts = ?", (claim[0] or None, claim[1])

    # -- creating and reading --------------------------------------------------------------------
    def create(self, task: str, fields: dict[str, Any], image: bytes, request_id: str | None = None,
               owner: str | None = None, quota_key: str | None = None, priority: str = "normal",
               webhook: dict[str, Any] | None = None, idempotency: tuple[str, str] | None = None) -> Job:
        """A queued job; its input is on disk before its row exists. Raises OSError/sqlite3.Error
        when the disk refuses (the input is then removed). With `idempotency` (key, fingerprint),
        in the same transaction: an earlier job of `owner` under that key is returned instead
        (`replayed`, this input removed), or KeyReused raised (`store_idempotency`)."""
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        job = Job(id=uuid.uuid4().hex, task=task, fields=fields, request_id=request_id, owner=owner,
                  quota_key=quota_key or owner or "", input_bytes=len(image), priority=priority, webhook=webhook)
        path = self._path(job.id, "input")
        files.atomic_write(path, image)
        values = asdict(job)
        for key in JSON_COLUMNS:
            values[key] = json.dumps(values[key]) if values[key] is not None else None
        values["cancel_requested"] = int(values["cancel_requested"])
        try:
            with self._tx() as db:
                earlier = self._recall(db, owner, *idempotency) if idempotency else None
                if earlier is None:
                    db.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})",
                               [values[c] for c in COLUMNS])
                    self._order_at(db, job.id)
                    if idempotency:
                        self._remember(db, owner, *idempotency, job)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if earlier is not None:  # an identical submission won the race: this one creates nothing
            path.unlink(missing_ok=True)
            earlier.replayed = True
            return earlier
        return job

    def _order_at(self, db: sqlite3.Connection, job_id: str) -> None:
        """(Re)compute a job's effective time in its key's queue (`store_schema.ORDER_AT`)."""
        db.execute(f"UPDATE jobs SET order_at = {ORDER_AT} WHERE id = :id", {"ageing": self.priority_ageing_s,
                                                                            "id": job_id})

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._one(job_id)

    def input(self, job_id: str) -> bytes:
        return self._path(job_id, "input").read_bytes()

    def result(self, job_id: str) -> bytes | None:
        """The result's bytes when the job succeeded and they are whole (size and SHA-256 as
        recorded); None otherwise — never a truncated or missing file's empty bytes."""
        job = self.get(job_id) if len(job_id) == 32 else None
        if job is None or job.state != "succeeded":
            return None
        return files.read_verified(self._path(job_id, "result"), job.result_bytes, job.result_sha256)

    def list(self, owner: str | None, limit: int, after: tuple[float, str] | None = None,
             state: str | None = None, task: str | None = None) -> list[Job]:
        """`owner`'s jobs newest first, those strictly older than `after` (created_at, id)."""
        where, params = ["owner IS ?"], [owner]
        if after is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [after[0], after[0], after[1]]
        for column, value in (("state", state), ("task", task)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        with self._lock:
            rows = self._db.execute(f"{SELECT} WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC"
                                    " LIMIT ?", (*params, limit)).fetchall()
        return [self._row(row) for row in rows]

    def count(self, state: State, quota_key: str | None = None) -> int:
        with self._lock:
            if quota_key is None:
                (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()
            else:
                (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE quota_key = ? AND state = ?",
                                        (quota_key, state)).fetchone()
            return int(n)

    def queue_position(self, job_id: str) -> int | None:
        """Jobs expected to start before this one under fair dispatch (0: next); None when not queued."""
        with self._lock:
            return self.order.position(job_id)

    def running(self, runner: str | None = None) -> list[Job]:
        with self._lock:
            if runner is None:
                rows = self._db.execute(f"{SELECT} WHERE state = 'running'").fetchall()
            else:
                rows = self._db.execute(f"{SELECT} WHERE state = 'running' AND runner = ?", (runner,)).fetchall()
        return [self._row(row) for row in rows]

    def recent_run_seconds(self, n: int = 20) -> float | None:
        """Mean run time of the last `n` jobs that succeeded (a Retry-After hint)."""
        with self._lock:
            (mean,) = self._db.execute(
                "SELECT AVG(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs"
                " WHERE state = 'succeeded' AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?)", (n,),
            ).fetchone()
        return mean

    # -- state changes, each a compare-and-set ----------------------------------------------------
    def claim_next(self, runner: str = "", lease_s: float = float("inf")) -> Job | None:
        """The next queued job in fair order, now `running` under (runner, attempts + 1) with a
        lease of `lease_s`; None when nothing is queued."""
        now = time.time()
        with self._tx() as db:
            job_id, key = self.order.next() or (None, None)
            if job_id is None:
                return None
            claimed = self._set(db, job_id, "state = 'queued'", (), state="running", runner=runner or None,
                                lease_until=now + lease_s if lease_s != float("inf") else None,
                                started_at=now, stage="queued", step=None, total_steps=None)
            if not claimed:  # cannot happen inside the write transaction; kept as the CAS it is
                return None
            db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (job_id,))
            db.execute("INSERT OR REPLACE INTO fair (quota_key, last_claim) VALUES (?, ?)", (key, now))
            return self._one(job_id)

    def renew(self, runner: str, lease_s: float, job_ids: list[str]) -> int:
        """Extend the leases of the jobs `runner` runs (of `job_ids`: the runs it still awaits); how many."""
        until = time.time() + lease_s
        with self._tx() as db:
            return sum(db.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND state = 'running' AND runner = ?",
                                  (until, job_id, runner)).rowcount for job_id in job_ids)

    def progress(self, job_id: str, claim: Claim | None, lease_s: float | None, **changes: Any) -> Job | None:
        """Record a running job's progress (and renew its lease) while `claim` still holds; None
        when it does not (the job ended, was handed back, or another runner claimed it)."""
        where, params = self._claimed(claim)
        if lease_s is not None:
            changes["lease_until"] = time.time() + lease_s
        with self._tx() as db:
            return self._one(job_id) if self._set(db, job_id, where, params, **changes) else None

    def cancel(self, job_id: str) -> Job | None:
        """Queued: cancelled now. Running: marked, its runner stops it at the next step (and can no
        longer make it succeed). Finished: unchanged. The job afterwards (None: unknown)."""
        now = time.time()
        with self._tx() as db:
            if not self._set(db, job_id, "state = 'queued'", (), state="cancelled", finished_at=now, stage="cancelled",
                             error={"code": "cancelled", "message": "cancelled by the client"}):
                self._set(db, job_id, "state = 'running'", (), cancel_requested=1)
            return self._one(job_id)

    def requeue(self, job_id: str, claim: Claim | None, spend_attempt: bool = True) -> Job | None:
        """Put a running job back in the queue (keeping its place by age); without `spend_attempt`
        the run does not count (backpressure, a runner handing back at shutdown)."""
        where, params = self._claimed(claim)
        with self._tx() as db:
            if not self._set(db, job_id, where, params, state="queued", stage=None, step=None, total_steps=None,
                             runner=None, lease_until=None):
                return None
            if not spend_attempt:
                db.execute("UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE id = ?", (job_id,))
            return self._one(job_id)

    def finish(self, job_id: str, state: State, *, claim: Claim | None = None, error: dict | None = None,
               result: bytes | None = None, media_type: str | None = None, metadata: dict | None = None,
               served: dict | None = None, model_seconds: float | None = None,
               from_states: tuple[str, ...] = ("running",)) -> Job | None:
        """End a job: only from `from_states` (running, under `claim` when given), and `succeeded`
        only when no cancel was requested. The result is durable on disk before the row names it.
        None when the job was not in a state to end this way (a result written for it is removed).
        Raises OSError when the result cannot be written (nothing recorded then)."""
        changes: dict[str, Any] = dict(state=state, error=error, finished_at=time.time(), media_type=media_type,
                                       metadata=metadata or {}, served=served or {}, model_seconds=model_seconds,
                                       stage=state if state != "succeeded" else "done", lease_until=None)
        path = self._path(job_id, "result")
        if result is not None:
            files.atomic_write(path, result)
            changes.update(result_bytes=len(result), result_sha256=files.digest(result))
        if from_states == ("running",):
            where, params = self._claimed(claim)
        else:
            where, params = f"state IN ({', '.join('?' for _ in from_states)})", from_states
        if state == "succeeded":
            where += " AND cancel_requested = 0"
        try:
            with self._tx() as db:
                done = self._set(db, job_id, where, params, **changes)
                job = self._one(job_id) if done else None
        except BaseException:
            if result is not None:
                path.unlink(missing_ok=True)
            raise
        if job is None and result is not None:
            path.unlink(missing_ok=True)
        return job

    def update(self, job_id: str, **changes: Any) -> Job | None:
        """Unconditional change (tests, repairs): the runner's transitions use the methods above."""
        with self._tx() as db:
            if not self._set(db, job_id, "1 = 1", (), **changes):
                return None
            if {"created_at", "priority"} & set(changes):
                self._order_at(db, job_id)
            return self._one(job_id)

