"""The job store: durable rows and files, FIFO claims, positions, restart recovery, retention."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from serve_app.config import load_config
from serve_app.jobs import JobRunner, _EVENT_LOGS_KEPT
from serve_app.orchestrator import Orchestrator
from serve_app.store import SqliteJobStore


def test_fifo_claims_positions_and_results_survive_reopening(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    jobs = [store.create("real", {"seed": i}, f"image-{i}".encode()) for i in range(3)]
    assert [store.queue_position(j.id) for j in jobs] == [0, 1, 2]
    first = store.claim_next()
    assert first.id == jobs[0].id and first.state == "running" and first.attempts == 1
    assert store.queue_position(jobs[0].id) is None and store.queue_position(jobs[2].id) == 1
    store.finish(first.id, "succeeded", result=b"PNG-bytes", media_type="image/png", metadata={"seed": 0})
    reopened = SqliteJobStore(tmp_path)  # a new process (restarted runner) sees everything
    assert reopened.get(first.id).state == "succeeded" and reopened.result(first.id) == b"PNG-bytes"
    assert reopened.input(jobs[1].id) == b"image-1" and reopened.get(jobs[1].id).fields == {"seed": 1}


def test_restart_requeues_running_jobs_once_then_fails_them(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = store.create("real", {}, b"x")
    store.claim_next()
    assert store.requeue_unfinished(max_attempts=2) == [job.id]
    assert store.get(job.id).state == "queued"
    store.claim_next()
    assert store.requeue_unfinished(max_attempts=2) == []
    failed = store.get(job.id)
    assert failed.state == "failed" and failed.error["code"] == "interrupted"


def test_retention_forgets_rows_and_files(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    old, new = store.create("real", {}, b"a"), store.create("real", {}, b"b")
    for job in (old, new):
        store.claim_next()
        store.finish(job.id, "succeeded", result=b"r")
    store.update(old.id, finished_at=time.time() - 100)
    assert store.purge(older_than_s=50) == 1
    assert store.get(old.id) is None and not list(tmp_path.glob(f"files/{old.id}.*"))
    assert store.result(new.id) == b"r"


def test_ids_are_never_paths(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    assert store.get("../../etc/passwd") is None
    assert store.result("../../etc/passwd") is None


def test_thousands_of_jobs_keep_memory_bounded(tmp_path: Path) -> None:
    config = load_config({"jobs": {"directory": str(tmp_path), "max_queued": 10_000}})
    # validation only: the runner never dispatches here, so no deployment handles are needed
    orchestrator = Orchestrator(config.tasks, config.sections(), config.preprocess, tmp_path, handles=None)
    runner = JobRunner(config.jobs, orchestrator)

    async def submit_all() -> None:
        for _ in range(_EVENT_LOGS_KEPT + 500):
            await runner.submit("anime", b"x" * 1000, {})

    asyncio.run(submit_all())
    assert len(runner._events) == _EVENT_LOGS_KEPT  # event logs of the oldest jobs are dropped (no public count)
    assert runner.store.count("queued") == _EVENT_LOGS_KEPT + 500  # the jobs themselves are all kept
    oldest = runner.store.claim_next()
    events, status = runner.events(oldest.id)
    assert status["state"] == "running" and events[0]["state"] == "running"  # rebuilt from the store
