"""The job store: durable rows and files, FIFO claims, positions, restart recovery, retention."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
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


# -- issue 18: compare-and-set transitions, leases, fairness, listing, crash safety ----------------
def test_cancel_and_finish_race_never_makes_a_cancelled_job_succeed(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = store.create("real", {}, b"x")
    claimed = store.claim_next("runner-a", lease_s=60)
    assert store.cancel(job.id).cancel_requested  # running: marked, the runner stops it
    assert store.finish(job.id, "succeeded", claim=claimed.claim, result=b"r") is None  # the cancel wins
    assert store.result(job.id) is None and not list(tmp_path.glob("files/*.result"))
    ended = store.finish(job.id, "cancelled", claim=claimed.claim)
    assert ended.state == "cancelled"
    # and the other order: finished first, a late cancel changes nothing
    other = store.create("real", {}, b"y")
    claim = store.claim_next("runner-a", lease_s=60).claim
    assert store.finish(other.id, "succeeded", claim=claim, result=b"r").state == "succeeded"
    assert store.cancel(other.id).state == "succeeded" and store.result(other.id) == b"r"


def test_a_lost_claim_cannot_finish_or_report(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = store.create("real", {}, b"x")
    first = store.claim_next("old", lease_s=60).claim
    assert store.requeue(job.id, first, spend_attempt=False).attempts == 0  # handed back, attempt not spent
    second = store.claim_next("new", lease_s=60).claim
    assert second == ("new", 1)
    assert store.progress(job.id, first, 60, stage="denoise", step=1) is None  # the old run is told to stop
    assert store.finish(job.id, "succeeded", claim=first, result=b"stale") is None
    assert store.progress(job.id, second, 60, stage="denoise", step=1).step == 1
    assert store.finish(job.id, "succeeded", claim=second, result=b"fresh").state == "succeeded"
    assert store.result(job.id) == b"fresh"


def test_expired_leases_are_requeued_then_failed(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = store.create("real", {}, b"x")
    store.claim_next("dead-runner", lease_s=60)
    assert store.reap(max_attempts=2) == []  # the lease still holds
    store.update(job.id, lease_until=time.time() - 1)
    [(requeued, outcome)] = store.reap(max_attempts=2)
    assert outcome == "queued" and requeued.state == "queued" and requeued.runner is None
    store.claim_next("other", lease_s=60)
    [(failed, outcome)] = store.reap(max_attempts=2, dead_runners={"other"})  # known dead: no wait
    assert outcome == "failed" and failed.state == "failed" and failed.error["code"] == "interrupted"


def test_renewed_leases_are_not_reaped(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = store.create("real", {}, b"x")
    store.claim_next("alive", lease_s=60)
    store.update(job.id, lease_until=time.time() - 1)
    assert store.renew("alive", 60, [job.id]) == 1
    assert store.reap(max_attempts=2) == [] and store.get(job.id).state == "running"


def test_two_runners_claiming_at_once_never_claim_one_job_twice(tmp_path: Path) -> None:
    SqliteJobStore(tmp_path)
    seed = SqliteJobStore(tmp_path)
    ids = {seed.create("real", {}, b"x").id for _ in range(40)}
    stores = [SqliteJobStore(tmp_path), SqliteJobStore(tmp_path)]  # two connections: two processes' view
    claimed: list[list[str]] = [[], []]

    def claim_all(i: int) -> None:
        while (job := stores[i].claim_next(f"runner-{i}", lease_s=60)) is not None:
            claimed[i].append(job.id)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)  # each exactly once
    assert {seed.get(i).attempts for i in ids} == {1}


def test_fair_order_a_single_job_is_claimed_no_later_than_second(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    busy = [store.create("real", {"n": i}, b"x", owner="aaaa0001") for i in range(50)]
    single = store.create("real", {}, b"x", owner="bbbb0002")
    assert store.queue_position(busy[0].id) == 0 and store.queue_position(single.id) == 1
    assert store.queue_position(busy[1].id) == 2  # round robin: a, b, a, a, …
    order = [store.claim_next("r", lease_s=60).id for _ in range(3)]
    assert order[:2] == [busy[0].id, single.id] and order[2] == busy[1].id
    # a key with fewer running jobs goes first even when its job is newer
    late = store.create("real", {}, b"x", owner="cccc0003")
    assert store.claim_next("r", lease_s=60).id == late.id


def test_quota_key_groups_keyless_callers_and_one_key_is_fifo(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    jobs = [store.create("real", {}, b"x", quota_key="ip:10.0.0.1") for _ in range(3)]
    assert store.count("queued", "ip:10.0.0.1") == 3 and store.get(jobs[0].id).owner is None
    assert [store.queue_position(j.id) for j in jobs] == [0, 1, 2]
    assert [store.claim_next().id for _ in jobs] == [j.id for j in jobs]


def test_listing_is_per_owner_newest_first_and_paginates(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    mine = [store.create("real" if i % 2 else "anime", {}, b"x", owner="aaaa0001") for i in range(5)]
    store.create("real", {}, b"x", owner="bbbb0002")
    page = store.list("aaaa0001", 2)
    assert [j.id for j in page] == [mine[4].id, mine[3].id]
    rest = store.list("aaaa0001", 10, after=(page[-1].created_at, page[-1].id))
    assert [j.id for j in rest] == [j.id for j in reversed(mine[:3])]
    assert {j.task for j in store.list("aaaa0001", 10, task="real")} == {"real"}
    assert store.list(None, 10) == []  # keys off sees only ownerless jobs


def test_results_are_private_durable_and_verified(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        store = SqliteJobStore(tmp_path / "jobs")
        job = store.create("real", {}, b"input")
        claim = store.claim_next("r", lease_s=60).claim
        store.finish(job.id, "succeeded", claim=claim, result=b"result")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "jobs").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "jobs" / "files").stat().st_mode) == 0o700
    for path in (tmp_path / "jobs" / "files").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "jobs" / "jobs.sqlite3").stat().st_mode) == 0o600
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    # a crash truncated the result after it was recorded: never served
    (tmp_path / "jobs" / "files" / f"{job.id}.result").write_bytes(b"res")
    assert store.result(job.id) is None


def test_orphaned_temporary_files_are_removed_when_the_store_opens(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = store.create("real", {}, b"x")
    orphan = tmp_path / "files" / f"{job.id}.result.1234abcd.tmp"
    orphan.write_bytes(b"half a result")
    reopened = SqliteJobStore(tmp_path)
    assert not orphan.exists() and reopened.orphans_removed == 1
    assert reopened.input(job.id) == b"x"


def test_an_older_store_gains_the_new_columns(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, task TEXT, state TEXT, stage TEXT, step INTEGER,"
               " total_steps INTEGER, error TEXT, created_at REAL, started_at REAL, finished_at REAL,"
               " attempts INTEGER, cancel_requested INTEGER, fields TEXT, media_type TEXT, metadata TEXT, served TEXT)")
    job_id = "0123456789abcdef0123456789abcdef"
    db.execute("INSERT INTO jobs VALUES (?, 'real', 'succeeded', 'done', NULL, NULL, NULL, 1, 1, 2, 1, 0, '{}',"
               " 'image/png', '{}', '{}')", (job_id,))
    waiting = "fedcba9876543210fedcba9876543210"
    db.execute("INSERT INTO jobs VALUES (?, 'real', 'queued', NULL, NULL, NULL, NULL, 3, NULL, NULL, 0, 0, '{}',"
               " NULL, '{}', '{}')", (waiting,))
    db.commit()
    db.close()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / f"{job_id}.result").write_bytes(b"old result")
    store = SqliteJobStore(tmp_path)
    old = store.get(job_id)
    assert old.owner is None and old.quota_key == "" and old.public()["model_seconds"] is None
    assert store.result(job_id) == b"old result" and store.store_bytes() == len(b"old result")
    assert {j.id for j in store.list(None, 10)} == {job_id, waiting}
    # a job queued before priorities is normal, has its place in the queue, and is claimed first
    newer = store.create("real", {}, b"x")
    assert store.get(waiting).priority == "normal" and store.queue_position(waiting) == 0
    assert store.queue_position(newer.id) == 1 and store.claim_next().id == waiting


def test_max_store_bytes_forgets_the_oldest_finished_jobs_first(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    jobs = [store.create("real", {}, b"i" * 10) for _ in range(3)]
    for job in jobs:
        claim = store.claim_next("r", lease_s=60).claim
        store.finish(job.id, "succeeded", claim=claim, result=b"r" * 90)
    assert store.store_bytes() == 300
    assert store.evict(max_bytes=250) == 1 and store.get(jobs[0].id) is None
    assert store.get(jobs[1].id) is not None and store.store_bytes() == 200
    queued = store.create("real", {}, b"q" * 500)
    assert store.evict(max_bytes=100) == 2 and store.get(queued.id).state == "queued"  # never an unfinished job
