"""Job priorities: within one key's queue high before normal before low, with ageing so a low job
is never held back forever; queue positions agree with the claim order; keys stay fair; the runner
validates the field and dispatches in that order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from deployments.errors import InvalidParameter
from serve_app.store import SqliteJobStore
from tests.unit.test_jobs_runner import make_runner, until

AGEING = 60.0


def claims(store: SqliteJobStore, n: int) -> list[str]:
    return [store.claim_next("r", lease_s=60).id for _ in range(n)]


def test_one_keys_queue_runs_high_then_normal_then_low(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path, priority_ageing_s=AGEING)
    low, normal, high = (store.create("real", {}, b"x", owner="aaaa0001", priority=p)
                         for p in ("low", "normal", "high"))
    assert [store.queue_position(j.id) for j in (high, normal, low)] == [0, 1, 2]
    assert store.get(high.id).public()["priority"] == "high"
    assert claims(store, 3) == [high.id, normal.id, low.id]


def test_queue_positions_match_the_order_jobs_are_claimed_in(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path, priority_ageing_s=AGEING)
    jobs = [store.create("real", {}, b"x", priority=p) for p in ("normal", "low", "high", "normal", "high", "low")]
    by_position = sorted(jobs, key=lambda j: store.queue_position(j.id))
    assert sorted(store.queue_position(j.id) for j in jobs) == list(range(len(jobs)))
    assert claims(store, len(jobs)) == [j.id for j in by_position]


def test_a_low_job_that_waited_long_enough_goes_before_a_new_high_one(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path, priority_ageing_s=AGEING)
    now = time.time()
    # low counts ageing later and high ageing earlier: low wins once it waited more than 2 × ageing
    aged = store.create("real", {}, b"x", priority="low")
    store.update(aged.id, created_at=now - 2 * AGEING - 10)
    young = store.create("real", {}, b"x", priority="low")
    store.update(young.id, created_at=now - 2 * AGEING + 10)
    high = store.create("real", {}, b"x", priority="high")
    assert [store.queue_position(j.id) for j in (aged, high, young)] == [0, 1, 2]
    assert claims(store, 3) == [aged.id, high.id, young.id]


def test_a_changed_ageing_applies_to_waiting_jobs_when_the_store_opens(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path, priority_ageing_s=AGEING)
    low = store.create("real", {}, b"x", priority="low")
    store.update(low.id, created_at=time.time() - AGEING)
    high = store.create("real", {}, b"x", priority="high")
    assert store.queue_position(high.id) == 0
    reopened = SqliteJobStore(tmp_path, priority_ageing_s=AGEING / 10)  # priorities now worth less
    assert reopened.queue_position(low.id) == 0 and reopened.claim_next().id == low.id


def test_a_requeued_job_keeps_its_priority_place(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path, priority_ageing_s=AGEING)
    normal = store.create("real", {}, b"x")
    high = store.create("real", {}, b"x", priority="high")
    claimed = store.claim_next("r", lease_s=60)
    assert claimed.id == high.id
    store.requeue(high.id, claimed.claim, spend_attempt=False)  # e.g. a full model queue
    assert store.queue_position(high.id) == 0 and claims(store, 2) == [high.id, normal.id]


def test_priority_reorders_only_its_own_keys_queue(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path, priority_ageing_s=AGEING)
    first = store.create("real", {}, b"x", owner="aaaa0001", priority="low")
    urgent = [store.create("real", {}, b"x", owner="bbbb0002", priority="high") for _ in range(3)]
    later = store.create("real", {}, b"x", owner="aaaa0001", priority="high")
    # keys take turns whatever the priorities: b, a, b, a, b (b's earliest effective time breaks the
    # first tie between keys; within a, its later high job goes before its low one)
    assert claims(store, 5) == [urgent[0].id, later.id, urgent[1].id, first.id, urgent[2].id]


def test_the_runner_validates_shows_and_dispatches_by_priority(tmp_path: Path) -> None:
    runner, orchestrator = make_runner(tmp_path, concurrency=1)

    async def scenario() -> None:
        with pytest.raises(InvalidParameter) as refused:
            await runner.submit("anime", b"x", {}, priority="urgent")
        assert refused.value.field == "priority"
        assert runner.store.count("queued") == 0  # nothing saved
        assert (await runner.submit("anime", b"n", {}))["priority"] == "normal"
        for priority in ("low", "high"):
            status = await runner.submit("anime", priority[0].encode(), {}, priority=priority)
            assert status["priority"] == priority
        assert status["queue_position"] == 0  # the high one
        await runner.start()
        await until(lambda: len(orchestrator.entered) == 3, "three runs")
        assert orchestrator.entered == [b"h", b"n", b"l"]
        await runner.stop()

    asyncio.run(scenario())
