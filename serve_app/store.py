"""Job records and results that outlive every replica: one interface, SQLite by default.

`JobStore` is what the job runner and the ingress need: create a job (its input saved as a file),
claim the next queued job, record progress and the end state, save the result as a file, list
positions, and forget jobs past the retention period. `SqliteJobStore` keeps rows in one SQLite
file (WAL, so readers never block the writer) and bytes under a directory, so memory stays bounded
however many jobs there are. Another database can be configured behind the same interface on a
cluster. Knows nothing about Ray, HTTP or models.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")


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

    def public(self, queue_position: int | None = None) -> dict[str, Any]:
        """The client's view: GET /v1/jobs/{id}."""
        return {
            "id": self.id,
            "task": self.task,
            "state": self.state,
            "stage": self.stage,
            "step": self.step,
            "total_steps": self.total_steps,
            "queue_position": queue_position,
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "request_id": self.request_id,
        }


class JobStore(Protocol):
    def create(self, task: str, fields: dict[str, Any], image: bytes, request_id: str | None = None) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def input(self, job_id: str) -> bytes: ...
    def claim_next(self) -> Job | None: ...
    def requeue_unfinished(self, max_attempts: int) -> list[str]: ...
    def update(self, job_id: str, **changes: Any) -> Job | None: ...
    def finish(self, job_id: str, state: State, *, error: dict | None = None, result: bytes | None = None,
               media_type: str | None = None, metadata: dict | None = None, served: dict | None = None) -> Job | None: ...
    def result(self, job_id: str) -> bytes | None: ...
    def queue_position(self, job_id: str) -> int | None: ...
    def count(self, state: State) -> int: ...
    def purge(self, older_than_s: float) -> int: ...


_COLUMNS = ("id", "task", "state", "stage", "step", "total_steps", "error", "created_at", "started_at",
            "finished_at", "attempts", "cancel_requested", "fields", "media_type", "metadata", "served", "request_id")
_JSON_COLUMNS = {"error", "fields", "metadata", "served"}


class SqliteJobStore:
    """Jobs in `<directory>/jobs.sqlite3`, inputs and results in `<directory>/files/`."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).expanduser()
        self.files = self.directory / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.directory / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, task TEXT, state TEXT, stage TEXT, step INTEGER,"
            " total_steps INTEGER, error TEXT, created_at REAL, started_at REAL, finished_at REAL,"
            " attempts INTEGER, cancel_requested INTEGER, fields TEXT, media_type TEXT, metadata TEXT, served TEXT)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at)")
        if "request_id" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:
            self._db.execute("ALTER TABLE jobs ADD COLUMN request_id TEXT")  # a store from before request ids

    # -- rows ------------------------------------------------------------------------------------
    def _row(self, row: tuple | None) -> Job | None:
        if row is None:
            return None
        values = dict(zip(_COLUMNS, row))
        for key in _JSON_COLUMNS:
            values[key] = json.loads(values[key]) if values[key] else ({} if key != "error" else None)
        values["cancel_requested"] = bool(values["cancel_requested"])
        return Job(**values)

    def _write(self, job: Job) -> None:
        values = asdict(job)
        for key in _JSON_COLUMNS:
            values[key] = json.dumps(values[key]) if values[key] is not None else None
        values["cancel_requested"] = int(values["cancel_requested"])
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                         [values[c] for c in _COLUMNS])

    def _path(self, job_id: str, kind: str) -> Path:
        if not all(c in "0123456789abcdef" for c in job_id) or len(job_id) != 32:
            raise KeyError(job_id)  # ids are ours: never a path from a client
        return self.files / f"{job_id}.{kind}"

    # -- the interface ---------------------------------------------------------------------------
    def create(self, task: str, fields: dict[str, Any], image: bytes, request_id: str | None = None) -> Job:
        job = Job(id=uuid.uuid4().hex, task=task, fields=fields, request_id=request_id)
        _atomic_write(self._path(job.id, "input"), image)
        with self._lock:
            self._write(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
            return self._row(cursor.fetchone())

    def input(self, job_id: str) -> bytes:
        return self._path(job_id, "input").read_bytes()

    def claim_next(self) -> Job | None:
        """The oldest queued job, now `running` with one more attempt; None when nothing is queued."""
        with self._lock:
            cursor = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE state = 'queued' ORDER BY created_at, id LIMIT 1"
            )
            job = self._row(cursor.fetchone())
            if job is None:
                return None
            job.state, job.attempts, job.started_at, job.stage = "running", job.attempts + 1, time.time(), "queued"
            self._write(job)
            return job

    def requeue_unfinished(self, max_attempts: int) -> list[str]:
        """After a runner restart: jobs left `running` are queued again, or failed past `max_attempts`."""
        with self._lock:
            cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE state = 'running'")
            jobs = [self._row(row) for row in cursor.fetchall()]
            for job in jobs:
                if job.attempts >= max_attempts:
                    job.state, job.finished_at = "failed", time.time()
                    job.error = {"code": "interrupted", "message": "the service restarted while this job ran, twice"}
                else:
                    job.state, job.stage, job.step = "queued", None, None
                self._write(job)
            return [job.id for job in jobs if job.state == "queued"]

    def update(self, job_id: str, **changes: Any) -> Job | None:
        with self._lock:
            cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
            job = self._row(cursor.fetchone())
            if job is None:
                return None
            for key, value in changes.items():
                setattr(job, key, value)
            self._write(job)
            return job

    def finish(self, job_id: str, state: State, *, error: dict | None = None, result: bytes | None = None,
               media_type: str | None = None, metadata: dict | None = None, served: dict | None = None) -> Job | None:
        if result is not None:
            _atomic_write(self._path(job_id, "result"), result)
        return self.update(job_id, state=state, error=error, finished_at=time.time(), media_type=media_type,
                    metadata=metadata or {}, served=served or {}, stage=state if state != "succeeded" else "done")

    def result(self, job_id: str) -> bytes | None:
        try:
            return self._path(job_id, "result").read_bytes()
        except (FileNotFoundError, KeyError):
            return None

    def queue_position(self, job_id: str) -> int | None:
        """0-based position among queued jobs (0: next to start); None when not queued."""
        with self._lock:
            row = self._db.execute("SELECT state, created_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] != "queued":
                return None
            (ahead,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND (created_at < ? OR (created_at = ? AND id < ?))",
                (row[1], row[1], job_id),
            ).fetchone()
            return int(ahead)

    def count(self, state: State) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()
            return int(n)

    def purge(self, older_than_s: float) -> int:
        """Forget finished jobs (rows and files) that ended more than `older_than_s` ago."""
        cutoff = time.time() - older_than_s
        with self._lock:
            ids = [row[0] for row in self._db.execute(
                "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (cutoff,)).fetchall()]
            for job_id in ids:
                for kind in ("input", "result"):
                    self._path(job_id, kind).unlink(missing_ok=True)
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return len(ids)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
