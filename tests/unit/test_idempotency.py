"""Idempotent submission: the fingerprint of a request, the store's memory of (owner, key) kept in
the jobs' SQLite (replays, conflicts, scopes, restarts, TTL, retention, two submissions racing) and
the runner's side (a replay is never refused by a limit, a conflict is 422 `idempotency_conflict`)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from deployments.errors import InvalidParameter
from serve_app.errors import IdempotencyConflict, QueueFull, QuotaExceeded, error_body, status_of
from serve_app.idempotency import FIELD, idempotency
from serve_app.store import SqliteJobStore
from serve_app.store_idempotency import KeyReused
from tests.unit.test_jobs_runner import make_runner

A, B = "aaaa0001", "bbbb0002"


def inputs(directory: Path) -> list[Path]:
    return sorted((directory / "files").glob("*.input"))


# -- the request's fingerprint ---------------------------------------------------------------------
def test_the_fingerprint_is_of_the_request_as_sent() -> None:
    headers = {"idempotency-key": "order-42"}
    first = idempotency(headers, "/v1/jobs", "real", {"steps": "4", "seed": "1"}, b"image")
    assert first == ("order-42", first[1])
    assert idempotency(headers, "/v1/jobs", "real", {"seed": "1", "steps": "4"}, b"image") == first  # field order
    for other in (("/v1/jobs", "real", {"steps": "4", "seed": "2"}, b"image"),
                  ("/v1/jobs", "real", {"steps": "4", "seed": "1"}, b"other image"),
                  ("/v1/jobs", "anime", {"steps": "4", "seed": "1"}, b"image"),
                  ("/v1/images/edits", "real", {"steps": "4", "seed": "1"}, b"image")):
        assert idempotency(headers, *other)[1] != first[1], other
    assert idempotency({}, "/v1/jobs", "real", {}, b"image") is None
    for bad in ("", "has space", "x" * 256, "caf\u00e9"):
        with pytest.raises(InvalidParameter) as refused:
            idempotency({"idempotency-key": bad}, "/v1/jobs", "real", {}, b"image")
        assert refused.value.field == FIELD


# -- the store ---------------------------------------------------------------------------------------
def test_the_same_key_and_request_returns_the_first_job_and_leaves_no_input(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    first = store.create("real", {}, b"one", owner=A, idempotency=("k1", "fp"))
    assert not first.replayed and len(inputs(tmp_path)) == 1
    again = store.create("real", {}, b"one", owner=A, idempotency=("k1", "fp"))
    assert again.id == first.id and again.replayed
    assert inputs(tmp_path) == [tmp_path / "files" / f"{first.id}.input"]  # the replay's upload is gone
    assert store.count("queued") == 1
    # a finished job is returned too, in its final state
    store.finish(first.id, "succeeded", claim=store.claim_next("r", lease_s=60).claim, result=b"r")
    replayed = store.replay(A, "k1", "fp")
    assert replayed.id == first.id and replayed.state == "succeeded"


def test_the_same_key_with_another_request_is_refused(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    store.create("real", {}, b"one", owner=A, idempotency=("k1", "fp-1"))
    with pytest.raises(KeyReused):
        store.create("real", {}, b"two", owner=A, idempotency=("k1", "fp-2"))
    with pytest.raises(KeyReused):
        store.replay(A, "k1", "fp-2")
    assert store.count("queued") == 1 and len(inputs(tmp_path)) == 1


def test_keys_are_scoped_per_owner(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    mine = store.create("real", {}, b"x", owner=A, idempotency=("one-key", "fp"))
    theirs = store.create("real", {}, b"x", owner=B, idempotency=("one-key", "fp-other"))
    keyless = store.create("real", {}, b"x", idempotency=("one-key", "fp"))  # keys off: one scope of its own
    assert len({mine.id, theirs.id, keyless.id}) == 3 and not (theirs.replayed or keyless.replayed)
    assert store.replay(B, "one-key", "fp-other").id == theirs.id
    assert store.replay(None, "one-key", "fp").id == keyless.id
    assert store.replay(A, "unused", "fp") is None


def test_a_remembered_key_survives_a_restart(tmp_path: Path) -> None:
    job = SqliteJobStore(tmp_path).create("real", {}, b"x", owner=A, idempotency=("k", "fp"))
    reopened = SqliteJobStore(tmp_path)  # a new runner process
    again = reopened.create("real", {}, b"x", owner=A, idempotency=("k", "fp"))
    assert again.id == job.id and again.replayed
    with pytest.raises(KeyReused):
        reopened.create("real", {}, b"y", owner=A, idempotency=("k", "other"))


def test_keys_past_their_ttl_are_purged_and_start_afresh(tmp_path: Path) -> None:
    remembering = SqliteJobStore(tmp_path, idempotency_ttl_s=3600)
    forgetting = SqliteJobStore(tmp_path, idempotency_ttl_s=0)  # the same file, a TTL already over
    job = remembering.create("real", {}, b"x", owner=A, idempotency=("k", "fp"))
    assert forgetting.replay(A, "k", "fp") is None  # expired for it, not yet purged
    assert remembering.replay(A, "k", "fp").id == job.id
    assert remembering.purge_idempotency() == 0 and forgetting.purge_idempotency() == 1
    assert remembering.replay(A, "k", "fp") is None  # gone from the file
    fresh = remembering.create("real", {}, b"y", owner=A, idempotency=("k", "another request"))
    assert fresh.id != job.id and not fresh.replayed


def test_a_key_whose_job_retention_forgot_creates_a_new_job(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    old = store.create("real", {}, b"x", owner=A, idempotency=("k", "fp"))
    store.finish(old.id, "succeeded", claim=store.claim_next("r", lease_s=60).claim, result=b"r")
    assert store.purge(older_than_s=-1) == 1  # retention forgot it
    new = store.create("real", {}, b"x", owner=A, idempotency=("k", "fp"))
    assert new.id != old.id and not new.replayed
    assert store.replay(A, "k", "fp").id == new.id  # the key now names the new job


def test_two_identical_submissions_racing_create_one_job(tmp_path: Path) -> None:
    SqliteJobStore(tmp_path)
    stores = [SqliteJobStore(tmp_path) for _ in range(4)]  # four connections: as many processes' view
    start = threading.Barrier(len(stores))
    made: list = [None] * len(stores)

    def submit(i: int) -> None:
        start.wait()
        made[i] = stores[i].create("real", {}, b"x", owner=A, idempotency=("race", "fp"))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({job.id for job in made}) == 1
    assert sorted(job.replayed for job in made) == [False, True, True, True]
    assert stores[0].count("queued") == 1 and len(inputs(tmp_path)) == 1


# -- the runner ----------------------------------------------------------------------------------------
def test_the_runner_replays_without_refusing_and_refuses_a_different_request(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path, max_queued_per_key=1, max_queued=2)

    async def scenario() -> None:
        first = await runner.submit("anime", b"x", {}, owner=A, idempotency=("k", "fp"))
        assert "replayed" not in first
        # A's quota is full now, yet the replay (which creates nothing) is answered
        again = await runner.submit("anime", b"x", {}, owner=A, idempotency=("k", "fp"))
        assert again == {**first, "replayed": True}
        with pytest.raises(QuotaExceeded):
            await runner.submit("anime", b"x", {}, owner=A, idempotency=("k2", "fp"))
        await runner.submit("anime", b"x", {}, owner=B)  # the queue is full now (max_queued 2)
        with pytest.raises(QueueFull):
            await runner.submit("anime", b"x", {}, owner=B, idempotency=("k", "fp"))
        assert (await runner.submit("anime", b"x", {}, owner=A, idempotency=("k", "fp")))["replayed"]
        with pytest.raises(IdempotencyConflict) as refused:
            await runner.submit("anime", b"y", {}, owner=A, idempotency=("k", "another fingerprint"))
        error = error_body(refused.value.code, refused.value.message, refused.value.field,
                           status_of(refused.value))["error"]
        assert status_of(refused.value) == 422 and error["code"] == "idempotency_conflict"
        assert error["param"] == "Idempotency-Key" and error["type"] == "invalid_request_error"
        assert "different request" in error["message"]
        assert runner.store.count("queued") == 2
        # a twin that passed the first look before the job existed, then met the full queue: a replay
        twin = runner.admission.create("anime", {}, b"x", owner=A, quota_key=None, idempotency=("k", "fp"))
        assert twin.id == first["id"] and twin.replayed
        with pytest.raises(QueueFull):  # without the key it is refused as before
            runner.admission.create("anime", {}, b"x", owner=A, quota_key=None, idempotency=None)

    asyncio.run(scenario())


def test_housekeeping_purges_keys_past_the_ttl(tmp_path: Path) -> None:
    runner, _ = make_runner(tmp_path, idempotency_ttl_s=1e-6)  # over by the first tick
    remembering = SqliteJobStore(tmp_path / "jobs", idempotency_ttl_s=3600)

    async def scenario() -> None:
        job = await runner.submit("anime", b"x", {}, owner=A, idempotency=("k", "fp"))
        assert remembering.replay(A, "k", "fp").id == job["id"]
        await runner.housekeeping.tick()
        assert remembering.replay(A, "k", "fp") is None

    asyncio.run(scenario())
