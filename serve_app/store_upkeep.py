"""The job store's upkeep: reaping lapsed claims, time limits, lost results, retention, byte budget.

A mixin of `serve_app.store.SqliteJobStore` (same connection, lock and compare-and-set helper), kept
apart so each file stays readable; every change here is also a compare-and-set, so upkeep racing a
runner's own transition leaves exactly one of them applied.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from serve_app import store_files as files

if TYPE_CHECKING:
    from serve_app.job_record import Job


class StoreUpkeep:
    """Needs from its store: `_tx`, `_lock`, `_db`, `_one`, `_row`, `_set`, `_claimed`, `_path`,
    `select`, `order`, `files`."""

    def result_lost(self, job_id: str, max_attempts: int) -> Job | None:
        """A succeeded job whose result is missing or damaged: queued again (its file removed)
        within `max_attempts`, else failed. None when it is no longer `succeeded`."""
        with self._tx() as db:
            job = self._one(job_id)
            if job is None or job.state != "succeeded":
                return None
            if job.attempts < max_attempts:
                self._set(db, job_id, "state = 'succeeded'", (), state="queued", stage=None, step=None,
                          total_steps=None, finished_at=None, result_bytes=None, result_sha256=None, runner=None)
            else:
                self._set(db, job_id, "state = 'succeeded'", (), state="failed", stage="failed", result_bytes=None,
                          result_sha256=None, error={"code": "result_lost", "message":
                                                     "the stored result was lost or damaged and the job ran "
                                                     f"{job.attempts} times; submit it again"})
            job = self._one(job_id)
        self._path(job_id, "result").unlink(missing_ok=True)
        return job

    def reap(self, max_attempts: int, dead_runners: set[str] = frozenset(), everything: bool = False
             ) -> list[tuple[Job, str]]:
        """Running jobs whose claim lapsed (lease expired, runner known dead, claimed before leases
        existed, or `everything`): queued again within `max_attempts`, else failed `interrupted`.
        [(job after, "queued" | "failed")]."""
        now = time.time()
        outcomes = []
        with self._tx() as db:
            rows = db.execute(f"{self.select} WHERE state = 'running'").fetchall()
            for job in map(self._row, rows):
                lapsed = (everything or job.runner is None or job.runner in dead_runners
                          or (job.lease_until is not None and job.lease_until < now))
                if not lapsed:
                    continue
                where, params = self._claimed(job.claim)
                if job.attempts >= max_attempts:
                    done = self._set(db, job.id, where, params, state="failed", stage="failed", finished_at=now,
                                     lease_until=None, error={"code": "interrupted", "message":
                                                              f"the job's runner stopped while it ran, {job.attempts} "
                                                              "times"})
                else:
                    done = self._set(db, job.id, where, params, state="queued", stage=None, step=None,
                                     total_steps=None, runner=None, lease_until=None)
                if done:
                    outcomes.append((self._one(job.id), "failed" if job.attempts >= max_attempts else "queued"))
        return outcomes

    def requeue_unfinished(self, max_attempts: int) -> list[str]:
        """Every running job queued again (or failed past `max_attempts`): a store nobody else uses."""
        return [job.id for job, outcome in self.reap(max_attempts, everything=True) if outcome == "queued"]

    def expire_queued(self, max_wait_s: float) -> list[Job]:
        """Fail the jobs queued for longer than `max_wait_s` (`queue_timeout`)."""
        now = time.time()
        error = {"code": "queue_timeout", "message": f"waited longer than jobs.max_wait_s ({max_wait_s:g} s) "
                 "to start; the service is busy, submit it again later"}
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'queued' AND created_at < ?",
                                            (now - max_wait_s,)).fetchall()]
            ended = [self._one(i) for i in ids
                     if self._set(db, i, "state = 'queued'", (), state="failed", stage="failed", finished_at=now,
                                  error=error)]
        return ended

    # -- bytes -----------------------------------------------------------------------------------
    def store_bytes(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COALESCE(SUM(input_bytes + COALESCE(result_bytes, 0)), 0)"
                                    " FROM jobs").fetchone()
            return int(n)

    def free_bytes(self) -> int:
        return files.free_bytes(self.files)

    def _forget(self, ids: list[str]) -> int:
        with self._tx() as db:
            gone = [i for i in ids if db.execute("DELETE FROM jobs WHERE id = ? AND finished_at IS NOT NULL",
                                                 (i,)).rowcount]
        for job_id in gone:  # rows first: a crash between leaves files without rows, never rows without files
            for kind in ("input", "result"):
                self._path(job_id, kind).unlink(missing_ok=True)
        return len(gone)

    def purge(self, older_than_s: float) -> int:
        """Forget finished jobs (rows and files) that ended more than `older_than_s` ago."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE finished_at < ?",
                                                  (time.time() - older_than_s,))]
        forgotten = self._forget(ids)
        with self._tx():
            self.order.forget_idle_keys()
        return forgotten

    def evict(self, max_bytes: int, room: int = 0) -> int:
        """Forget finished jobs, oldest first, until inputs + results + `room` fit in `max_bytes`;
        how many. May stop short: only queued and running jobs are left then."""
        excess = self.store_bytes() + room - max_bytes
        if excess <= 0:
            return 0
        ids: list[str] = []
        with self._lock:
            rows = self._db.execute("SELECT id, input_bytes + COALESCE(result_bytes, 0) FROM jobs"
                                    " WHERE finished_at IS NOT NULL ORDER BY finished_at, id")
            for job_id, size in rows:
                if excess <= 0:
                    break
                ids.append(job_id)
                excess -= size
        return self._forget(ids)
