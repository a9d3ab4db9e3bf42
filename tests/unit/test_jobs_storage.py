"""The job runner's storage without Ray: a lost or truncated result is re-run or failed (never an
empty success), the byte budget and the disk's free space refuse submissions with 507, a result that
cannot be written fails its job, and retention runs while the runner is up. Faults are injected from
the test side (files removed, truncated, a directory replaced by a file, a file size limit)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from serve_app.errors import InsufficientStorage, NotFound
from tests.conftest import run_fresh
from tests.unit.test_jobs_runner import make_runner, state, until


def result_file(tmp_path: Path, job_id: str) -> Path:
    return tmp_path / "jobs" / "files" / f"{job_id}.result"


@pytest.mark.parametrize("fault", ["truncated", "deleted"])
def test_a_lost_result_is_run_again_then_failed_never_served_empty(tmp_path: Path, fault: str) -> None:
    runner, orchestrator = make_runner(tmp_path, max_attempts=2)

    def damage(job_id: str) -> None:
        path = result_file(tmp_path, job_id)
        if fault == "truncated":
            path.write_bytes(path.read_bytes()[:3])
        else:
            path.unlink()

    async def scenario() -> None:
        await runner.start()
        job = (await runner.submit("anime", b"x", {}))["id"]
        await until(lambda: state(runner, job) == "succeeded", "the first run")
        damage(job)
        status, data, *_ = runner.result(job)
        assert data is None and status["state"] in ("queued", "running")  # re-run, not a 200
        await until(lambda: state(runner, job) == "succeeded", "the second run")
        assert runner.result(job)[1] == b"result:x" and len(orchestrator.entered) == 2
        damage(job)  # both attempts spent: failed with the reason
        status, data, *_ = runner.result(job)
        assert data is None and status["state"] == "failed" and status["error"]["code"] == "result_lost"
        await runner.stop()

    asyncio.run(scenario())


def test_max_store_bytes_forgets_finished_jobs_then_refuses_with_507(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path, max_store_bytes=1000)

    async def scenario() -> None:
        await runner.start()
        done = (await runner.submit("anime", b"d" * 400, {}))["id"]
        await until(lambda: state(runner, done) == "succeeded", "the first job")
        orchestrator.hold()
        queued = (await runner.submit("anime", b"q" * 600, {}))["id"]  # fits only by forgetting `done`
        with pytest.raises(NotFound):
            runner.status(done)
        with pytest.raises(InsufficientStorage) as refused:  # nothing finished is left to forget
            await runner.submit("anime", b"z" * 600, {})
        assert refused.value.code == "insufficient_storage" and "max_store_bytes" in refused.value.message
        assert state(runner, queued) in ("queued", "running")
        orchestrator.release.set()
        await runner.stop()

    asyncio.run(scenario())


def test_a_disk_without_min_free_bytes_refuses_submissions(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path, min_free_bytes=shutil.disk_usage(tmp_path).total * 2)
    with pytest.raises(InsufficientStorage) as refused:
        asyncio.run(runner.submit("anime", b"x", {}))
    assert "min_free_bytes" in refused.value.message
    assert runner.store.count("queued") == 0


def test_a_result_that_cannot_be_written_fails_the_job(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path)

    async def scenario() -> None:
        orchestrator.hold()
        await runner.start()
        job = (await runner.submit("anime", b"x", {}))["id"]
        await until(lambda: orchestrator.entered, "the run (its input is read)")
        files = tmp_path / "jobs" / "files"
        shutil.rmtree(files)
        files.write_bytes(b"")  # the files directory is now a file: every write there fails
        orchestrator.release.set()
        final = await until(lambda: (s := runner.status(job))["state"] != "running" and s, "the job to end")
        assert final["state"] == "failed" and "could not be stored" in final["error"]["message"]
        assert runner.result(job)[1] is None
        await runner.stop()

    asyncio.run(scenario())


def test_a_full_disk_refuses_the_submission_and_keeps_nothing(tmp_path: Path) -> None:
    # a file size limit makes the input write fail with EFBIG, as a full disk would with ENOSPC
    out = run_fresh(f"""
        import asyncio, resource, signal
        from pathlib import Path
        from tests.unit.test_jobs_runner import make_runner
        from serve_app.errors import InsufficientStorage
        runner, _ = make_runner(Path({str(tmp_path)!r}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        try:
            asyncio.run(runner.submit("anime", b"x" * 5000, {{}}))
        except InsufficientStorage as exc:
            print("507", exc.message)
        print("queued", runner.store.count("queued"), len(list(Path({str(tmp_path)!r}).glob("jobs/files/*"))))
    """)
    assert out.splitlines()[0].startswith("507 the job store could not save the input"), out
    assert out.splitlines()[1] == "queued 0 0"


def test_retention_runs_while_the_runner_is_up(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path, retention_s=0.2)

    async def scenario() -> None:
        await runner.start()
        job = (await runner.submit("anime", b"x", {}))["id"]
        # the record goes first, then its files (on the housekeeping thread): wait for both
        await until(lambda: runner.store.get(job) is None and not list((tmp_path / "jobs" / "files").glob(f"{job}.*")),
                    "the finished job and its files to be forgotten")
        await runner.stop()

    asyncio.run(scenario())
