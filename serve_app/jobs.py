"""Asynchronous jobs: admission, fair dispatch, progress under a lease, cancellation, retries.

`JobRunner` is a single Serve deployment that owns the job store (`serve_app.store`). `submit`
validates a request exactly as the synchronous path does (same `Orchestrator.resolve`), refuses it
with `QueueFull` at the configured depth, `QuotaExceeded` past `max_queued_per_key` for its key and
`InsufficientStorage` when the store cannot take its bytes (an accepted job is never dropped), saves
the input and the resolved fields (seed included) with its `priority`, and wakes the dispatcher; an
`Idempotency-Key` seen before returns the job it created (`serve_app.admission`). The dispatcher claims
jobs fairly across keys (`serve_app.store_order`) and runs each through the same `Orchestrator.run`
with a `JobProgress` that the model calls per stage and per denoising step; its answer stops a
cancelled job, or one whose claim this runner lost, at the next step.

Every job belongs to its owner (the API key id that submitted it, None with keys off): for any
other caller it does not exist (NotFound). A claim is (runner id, attempt) with a lease in the store,
renewed by progress and by this runner while it waits for a model; `serve_app.housekeeping` re-queues
or fails jobs whose lease lapsed, enforces `max_wait_s`/`max_run_s`, retention and the byte budget.
Every transition is a compare-and-set in the store, so a cancelled job never succeeds and two runners
(a redeploy) never run one job at once. `stop()` (Serve awaits `__del__` on shutdown) stops claiming,
then hands its running jobs back without spending an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError

from deployments import metrics
from deployments.errors import Cancelled, ImgserveError, InvalidParameter
from serve_app import store_files
from serve_app.admission import Admission
from serve_app.errors import NotFound, error_body, status_of
from serve_app.housekeeping import Housekeeping, decode_cursor, encode_cursor
from serve_app.job_progress import JobProgress
from serve_app.orchestrator import Orchestrator
from serve_app.job_record import FINAL_STATES, STATES, Job
from serve_app.store_schema import PRIORITIES
from serve_app.store import SqliteJobStore
from serve_app.webhooks import Webhooks

if TYPE_CHECKING:
    from serve_app.config import JobsSection

log = logging.getLogger("imgserve.jobs")

_EVENT_LOGS_KEPT = 1000  # memory stays bounded: older jobs' streams start from their status
_REPLICA_LOST = (ray_exceptions.ActorDiedError, ray_exceptions.ActorUnavailableError, ray_exceptions.RayActorError)
MAX_LIST = 100


class JobRunner:
    """Serve deployment owning the jobs; plain class, `start()` begins dispatching."""

    def __init__(self, config: JobsSection, orchestrator: Orchestrator, self_handle: Any = None,
                 runner_id: str | None = None) -> None:
        self.config = config
        self.orchestrator = orchestrator
        self.store = SqliteJobStore(config.directory, config.priority_ageing_s, config.idempotency_ttl_s)
        self.handle = self_handle
        """How model replicas reach this runner (its own DeploymentHandle); None → direct calls."""
        self.id = runner_id or uuid.uuid4().hex
        """This runner's name on its claims (unique per process and start)."""
        self._events: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        """job id → every state/stage/step change, for the events stream (recent jobs only)."""
        self._events_lock = threading.Lock()  # Serve runs the sync methods on a thread pool
        self._wake = asyncio.Event()
        self._change = asyncio.Event()
        """Set (and replaced) on every recorded change: what `wait_events` waits on."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._running: dict[str, tuple[asyncio.Task, Job]] = {}
        self._tasks: list[asyncio.Task] = []
        self._claiming = True
        self.housekeeping = Housekeeping(self)
        self.admission = Admission(config, self.store)
        self.webhooks = Webhooks(self)

    async def start(self) -> None:
        """Take back what dead runners left running, apply retention, start dispatching and upkeep."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        if self.store.orphans_removed:
            log.warning("removed %d temporary files left by a crash", self.store.orphans_removed)
        await self.housekeeping.tick()
        if not self._tasks:
            self._tasks = [self._loop.create_task(self._dispatch()), self._loop.create_task(self.housekeeping.loop()),
                           self._loop.create_task(self.webhooks.run())]

    async def stop(self) -> None:
        """Stop claiming, then hand the running jobs back (queued again, the attempt not spent); a
        job whose hand-back cannot be written is left to its lease."""
        self._claiming = False
        for task in self._tasks:
            task.cancel()
        running = [task for task, _ in self._running.values()]
        for task in running:
            task.cancel()
        await asyncio.gather(*self._tasks, *running, return_exceptions=True)
        self._tasks = []

    def _dead_runners(self, runners: set[str]) -> set[str]:
        """Which of `runners` (ids on claims) are known to be gone; a plain runner knows of none, so
        their jobs wait for their leases. Blocking: called on a thread."""
        return set()

    def _placement(self) -> dict[str, tuple[int, str]] | None:
        """Deployment name → (RUNNING replicas, message); None when unknown. Blocking: on a thread."""
        return None

    # -- the API the ingress calls -----------------------------------------------------------------
    async def submit(self, task: str, image: bytes, fields: dict[str, Any], request_id: str | None = None,
                     owner: str | None = None, quota_key: str | None = None, priority: str | None = None,
                     webhook_url: str | None = None, webhook_events: str | list[str] | None = None,
                     idempotency: tuple[str, str] | None = None) -> dict[str, Any]:
        """Validate and enqueue; raises the same errors as a synchronous request, QueueFull,
        QuotaExceeded (for `quota_key or owner`) or InsufficientStorage. `request_id`: the
        submitting HTTP request's id, kept in the job's record; `owner`: the API key id;
        `priority`: low, normal (None) or high; `webhook_url`/`webhook_events`: where its events are
        delivered (`serve_app.webhooks`); `idempotency`: (Idempotency-Key, the request's fingerprint):
        an earlier job of `owner` with the same key and fingerprint is returned instead, its status
        carrying `"replayed": True` (the ingress answers 200 and drops the flag); the same key with
        another fingerprint raises IdempotencyConflict."""
        if priority not in (None, *PRIORITIES):
            raise InvalidParameter(f"must be one of {', '.join(PRIORITIES)}", "priority")
        # the store's reads and fsynced writes on a thread, so progress and event calls are not held up
        if idempotency and (earlier := await asyncio.to_thread(self.admission.replay, owner, idempotency)):
            return {**self.status(earlier.id, owner), "replayed": True}
        resolved = await self.orchestrator.validate(task, fields)
        webhook = self.webhooks.check(webhook_url, webhook_events)
        job = await asyncio.to_thread(self.admission.create, task, resolved.fields(), image, request_id=request_id,
                                      owner=owner, quota_key=quota_key, priority=priority or "normal",
                                      webhook=webhook, idempotency=idempotency)
        if job.replayed:  # an identical submission created it while this one was being checked
            return {**self.status(job.id, owner), "replayed": True}
        self._record(job.id, state="queued")
        self._notify(dispatch=True)
        return self.status(job.id, owner)

    def status(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        return self._public(self._job(job_id, owner))

    def result(self, job_id: str, owner: str | None = None
               ) -> tuple[dict[str, Any], bytes | None, str | None, dict, dict]:
        """(status, bytes, media type, embedded metadata, serving facts); bytes None unless succeeded.
        A succeeded job whose stored result is missing or damaged is re-run (or failed), never
        answered with empty bytes."""
        job = self._job(job_id, owner)
        data = self.store.result(job_id) if job.state == "succeeded" else None
        if job.state == "succeeded" and data is None:
            log.warning("job %s: its stored result is missing or damaged", job_id)
            lost = self.store.result_lost(job_id, self.config.max_attempts)
            if lost is not None:
                metrics.job_limits.inc(tags={"task": lost.task, "reason": "result_lost"})
                self._record(job_id, state=lost.state, stage=lost.stage)
                self._notify(dispatch=True)
            job = self._job(job_id, owner)
        return self._public(job), data, job.media_type, job.metadata, job.served

    def cancel(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        """Queued: cancelled now. Running: stops at the next denoising step. Finished: unchanged."""
        before = self._job(job_id, owner)
        job = self.store.cancel(job_id) or before
        if job.state == "cancelled" and before.state == "queued":
            self._ended(job)
        return self._public(job)

    def report(self, job_id: str, stage: str, step: int | None, total: int | None,
               claim: list | tuple | None = None) -> bool:
        """Called by the model per stage and per step; renews the lease; True when the job must stop
        (cancel requested, or the claim is no longer this run's)."""
        changes: dict[str, Any] = {"stage": stage}
        if step is not None:
            changes.update(step=step, total_steps=total)
        job = self.store.progress(job_id, tuple(claim) if claim else None, self.config.lease_s, **changes)
        if job is None:
            return True
        self._record(job_id, state="running", stage=stage, step=step, total_steps=total)
        self.webhooks.notify(job, "progress")
        return job.cancel_requested

    def events(self, job_id: str, since: int = 0, owner: str | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The changes of a job after the first `since` ones, and its current status."""
        status = self.status(job_id, owner)
        with self._events_lock:
            log_ = self._events.get(job_id)
            if log_ is None:  # a job from before this runner started: its status is the one event
                log_ = self._events[job_id] = [{"state": status["state"], "stage": status["stage"],
                                                "step": status["step"], "total_steps": status["total_steps"]}]
            return log_[since:], status

    async def wait_events(self, cursors: dict[str, int], timeout_s: float
                          ) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any] | None]]:
        """Long poll: as soon as any job in `cursors` (id → events seen) has newer events or is in a
        final state, {id: (new events, status)} for those; {} after `timeout_s` otherwise. A job that
        no longer exists (forgotten by retention) answers ([], None)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while True:
            changed = self._change  # taken before looking: a change after the look sets this one
            ready = self._ready(cursors)
            remaining = deadline - loop.time()
            if ready or remaining <= 0:
                return ready
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                pass

    def list_jobs(self, owner: str | None = None, limit: int = 20, cursor: str | None = None,
                  state: str | None = None, task: str | None = None) -> dict[str, Any]:
        """The caller's jobs, newest first, `limit` (1..100) a page; `next_cursor` continues."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise InvalidParameter(f"limit must be 1..{MAX_LIST}", "limit")
        if state is not None and state not in STATES:
            raise InvalidParameter(f"unknown state {state!r}; one of {', '.join(STATES)}", "state")
        if task is not None and task not in self.orchestrator.tasks:
            raise InvalidParameter(f"unknown task {task!r}; available: {', '.join(sorted(self.orchestrator.tasks))}",
                                   "task")
        after = decode_cursor(cursor) if cursor else None
        jobs = self.store.list(owner, limit + 1, after, state, task)
        page = jobs[:limit]
        more = len(jobs) > limit
        return {"object": "list", "data": [self._public(job) for job in page],
                "next_cursor": encode_cursor(page[-1]) if more else None}

    # -- records and events ----------------------------------------------------------------------
    def _public(self, job: Job) -> dict[str, Any]:
        status = job.public(self.store.queue_position(job.id) if job.state == "queued" else None)
        if job.webhook:
            status["webhook"] = self.webhooks.summary(job)
        return status

    def _job(self, job_id: str, owner: str | None) -> Job:
        job = self.store.get(job_id) if isinstance(job_id, str) and len(job_id) == 32 else None
        if job is None or job.owner != owner:  # another key's job does not exist for this caller
            raise NotFound(f"no job {str(job_id)[:64]!r}", "id")
        return job

    def _ready(self, cursors: dict[str, int]) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any] | None]]:
        ready: dict[str, tuple[list[dict[str, Any]], dict[str, Any] | None]] = {}
        for job_id, since in cursors.items():
            with self._events_lock:
                known = self._events.get(job_id)
                if known is not None and len(known) <= since and known[-1]["state"] not in FINAL_STATES:
                    continue
            job = self.store.get(job_id) if len(job_id) == 32 else None
            if job is None:
                ready[job_id] = ([], None)
                continue
            new, status = self.events(job_id, since, job.owner)
            if new or status["state"] in FINAL_STATES:
                ready[job_id] = (new, status)
        return ready

    def _record(self, job_id: str, **event: Any) -> None:
        with self._events_lock:
            self._events.setdefault(job_id, []).append({"stage": None, "step": None, "total_steps": None, **event})
            self._events.move_to_end(job_id)
            while len(self._events) > _EVENT_LOGS_KEPT:
                self._events.popitem(last=False)
        self._notify()

    def _notify(self, dispatch: bool = False) -> None:
        """Wake `wait_events` callers (and the dispatcher), from the loop or from a pool thread."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._fire(dispatch)
        else:
            self._loop.call_soon_threadsafe(self._fire, dispatch)

    def _fire(self, dispatch: bool) -> None:
        self._change.set()
        self._change = asyncio.Event()
        if dispatch:
            self._wake.set()

    def _ended(self, job: Job) -> None:
        """A job reached a final state (whoever ended it): its event and metrics."""
        self._record(job.id, state=job.state, stage=job.stage)
        self.webhooks.notify(job, job.state)
        metrics.jobs_finished.inc(tags={"task": job.task, "state": job.state})
        metrics.job_seconds.observe(job.finished_at - job.created_at, tags={"task": job.task, "state": job.state})

    def _end(self, job: Job, state: str, **kwargs: Any) -> Job | None:
        """End `job` under its claim; None when the claim no longer holds (nothing recorded)."""
        ended = self.store.finish(job.id, state, claim=job.claim, **kwargs)
        if ended is not None:
            self._ended(ended)
        return ended

    def _requeue(self, job: Job, spend_attempt: bool) -> None:
        if self.store.requeue(job.id, job.claim, spend_attempt) is not None:
            self._record(job.id, state="queued")
            self._notify(dispatch=True)

    # -- dispatching -----------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        renewed = asyncio.get_running_loop().time()
        while True:
            try:
                while self._claiming and len(self._running) < self.config.concurrency:
                    job = self.store.claim_next(self.id, self.config.lease_s)
                    if job is None:
                        break
                    self._record(job.id, state="running", stage="queued")
                    self.webhooks.notify(job, "started")
                    self._running[job.id] = (asyncio.get_running_loop().create_task(self._execute(job)), job)
                now = asyncio.get_running_loop().time()
                if self._running and now - renewed >= self.config.lease_s / 3:
                    # the runner holds its claims while it waits for a model that reports nothing
                    self.store.renew(self.id, self.config.lease_s, list(self._running))
                    renewed = now
                # gauges age out of Ray's metrics agent unless refreshed: this loop turns at least every second
                metrics.jobs_queued.set(self.store.count("queued"))
                metrics.jobs_running.set(len(self._running))
                metrics.job_store_bytes.set(self.store.store_bytes())
            except (OSError, sqlite3.Error):
                log.exception("job store error while dispatching; retrying")
            self._wake.clear()
            try:
                # a timeout scope, not wait_for: wait_for (3.11) can swallow a cancel that meets a wake-up
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _execute(self, job: Job) -> None:
        try:
            await self._run(job)
        except asyncio.CancelledError:
            # stopped by a limit (the job already ended: the hand-back is a no-op) or by shutdown
            self._requeue(job, spend_attempt=False)
        except Exception:  # never let one job kill the dispatcher
            log.exception("job %s failed unexpectedly", job.id)
            self._end(job, "failed", error={"code": "internal", "message": "internal error"})
        finally:
            self._running.pop(job.id, None)
            self._notify(dispatch=True)

    async def _run(self, job: Job) -> None:
        progress = JobProgress(self, self.handle, job.id, job.claim)
        try:
            request = await self.orchestrator.validate(job.task, job.fields)
            # model seconds are counted for the job's key (the orchestrator records the metric)
            encoded = await self.orchestrator.run(request, self.store.input(job.id), progress,
                                                  key_id=job.owner, caller="job")
        except Cancelled as exc:
            self._end(job, "cancelled", error={"code": exc.code, "message": exc.message})
        except BackPressureError:
            # the model queue is full: the job keeps its place and its attempt count
            await asyncio.sleep(self.config.backpressure_retry_s)
            self._requeue(job, spend_attempt=False)
        except _REPLICA_LOST as exc:
            if job.attempts < self.config.max_attempts:
                log.warning("job %s lost its replica (%s); retrying", job.id, type(exc).__name__)
                self._requeue(job, spend_attempt=True)
            else:
                self._end(job, "failed", error={
                    "code": "replica_lost",
                    "message": f"the model replica died during this job {job.attempts} times; "
                               f"last: {type(exc).__name__}",
                })
        except ImgserveError as exc:
            self._end(job, "failed", error=error_body(exc.code, exc.message, exc.field, status_of(exc))["error"])
        else:
            await asyncio.to_thread(self._succeed, job, encoded)  # the result's fsyncs off the event loop

    def _succeed(self, job: Job, encoded: Any) -> None:
        """Record the result; a cancel that arrived meanwhile wins. A result that cannot be stored
        fails the job without one; if even that write fails, the lapsing lease ends it."""
        seconds = encoded.served.get("model_seconds")
        try:
            if self._end(job, "succeeded", result=encoded.data, media_type=encoded.media_type,
                         metadata=encoded.metadata, served=encoded.served, model_seconds=seconds) is None:
                self._end(job, "cancelled", error={"code": "cancelled", "message": "cancelled by the client"},
                          model_seconds=seconds)
        except (OSError, sqlite3.Error) as exc:
            log.error("job %s: its result could not be stored: %s", job.id, exc)
            code = "insufficient_storage" if store_files.storage_error(exc) or "full" in str(exc) else "internal"
            try:
                self._end(job, "failed", error={"code": code, "message":
                                                f"the result could not be stored: {_reason(exc)}"})
            except (OSError, sqlite3.Error):
                log.exception("job %s: its failure could not be recorded either; its lease will end it", job.id)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
