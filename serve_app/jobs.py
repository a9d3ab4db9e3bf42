"""Asynchronous jobs: admission, a FIFO dispatcher, progress, cancellation, one retry, durability.

`JobRunner` is a single Serve deployment that owns the job store (`serve_app.store`). `submit`
validates a request exactly as the synchronous path does (same `Orchestrator.resolve`), refuses it
with `QueueFull` when the configured depth is reached (an accepted job is never dropped), saves
the input and the resolved fields (seed included), and wakes the dispatcher. The dispatcher runs
the oldest queued jobs through the same `Orchestrator.run` with a `JobProgress` that the model calls
per stage and per denoising step; its answer stops a cancelled job at the next step. A job whose
model replica died is queued again once, then failed with the reason. On start the runner
re-queues what a previous runner left running, so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError

from deployments import metrics
from deployments.errors import Cancelled, ImgserveError
from serve_app.errors import NotFound, QueueFull, error_body
from serve_app.orchestrator import Orchestrator
from serve_app.store import Job, SqliteJobStore

if TYPE_CHECKING:
    from serve_app.config import JobsSection

log = logging.getLogger("imgserve.jobs")

_EVENT_LOGS_KEPT = 1000  # memory stays bounded: older jobs' streams start from their status
_REPLICA_LOST = (ray_exceptions.ActorDiedError, ray_exceptions.ActorUnavailableError, ray_exceptions.RayActorError)


class JobProgress:
    """What the orchestrator and the model call while running a job.

    In the runner's own process it calls the runner directly (its event loop must not block on
    its own handle); pickled to a model replica it keeps only the runner's handle and waits for
    each answer there, on the model's worker thread.
    """

    def __init__(self, runner: JobRunner, handle: Any, job_id: str) -> None:
        self.runner: JobRunner | None = runner
        self.handle = handle
        self.job_id = job_id

    def __getstate__(self) -> dict[str, Any]:
        return {"runner": None, "handle": self.handle, "job_id": self.job_id}

    def stage(self, name: str) -> None:
        self._report(name, None, None)

    def step(self, step: int, total: int) -> bool:
        return self._report("denoise", step, total)

    def _report(self, stage: str, step: int | None, total: int | None) -> bool:
        if self.runner is not None:
            return self.runner.report(self.job_id, stage, step, total)
        return bool(self.handle.report.remote(self.job_id, stage, step, total).result())


class JobRunner:
    """Serve deployment owning the jobs; plain class, `start()` begins dispatching."""

    def __init__(self, config: JobsSection, orchestrator: Orchestrator, self_handle: Any = None) -> None:
        self.config = config
        self.orchestrator = orchestrator
        self.store = SqliteJobStore(config.directory)
        self.handle = self_handle
        """How model replicas reach this runner (its own DeploymentHandle); None → direct calls."""
        self._events: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        """job id → every state/stage/step change, for the events stream (recent jobs only)."""
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task] = {}
        self._dispatcher: asyncio.Task | None = None

    async def start(self) -> None:
        """Re-queue what a previous runner left running, forget expired jobs, start dispatching."""
        requeued = self.store.requeue_unfinished(self.config.max_attempts)
        if requeued:
            log.warning("re-queued %d jobs left running by a previous runner", len(requeued))
        self.store.purge(self.config.retention_s)
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    # -- the API the ingress calls -----------------------------------------------------------------
    async def submit(self, task: str, image: bytes, fields: dict[str, Any],
                     request_id: str | None = None) -> dict[str, Any]:
        """Validate and enqueue; raises the same errors as a synchronous request, or QueueFull.
        `request_id`: the submitting HTTP request's id, kept in the job's record."""
        resolved = self.orchestrator.resolve(task, fields)
        if self.store.count("queued") >= self.config.max_queued:
            waiting = self.config.max_queued
            raise QueueFull(f"{waiting} {'job is' if waiting == 1 else 'jobs are'} waiting; retry later")
        job = self.store.create(task, resolved.fields(), image, request_id=request_id)
        self._record(job.id, state="queued")
        self._wake.set()
        return self.status(job.id)

    def status(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        return job.public(self.store.queue_position(job_id))

    def result(self, job_id: str) -> tuple[dict[str, Any], bytes | None, str | None, dict, dict]:
        """(status, bytes, media type, embedded metadata, serving facts); bytes None until succeeded."""
        job = self._job(job_id)
        data = self.store.result(job_id) if job.state == "succeeded" else None
        return job.public(self.store.queue_position(job_id)), data, job.media_type, job.metadata, job.served

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Queued: cancelled now. Running: stops at the next denoising step. Finished: unchanged."""
        job = self._job(job_id)
        if job.state == "queued":
            self._finish(job_id, "cancelled", error={"code": "cancelled", "message": "cancelled by the client"})
        elif job.state == "running":
            self.store.update(job_id, cancel_requested=True)
        return self.status(job_id)

    def report(self, job_id: str, stage: str, step: int | None, total: int | None) -> bool:
        """Called by the model per stage and per step; returns True when the job must stop."""
        changes: dict[str, Any] = {"stage": stage}
        if step is not None:
            changes.update(step=step, total_steps=total)
        job = self.store.update(job_id, **changes)
        self._record(job_id, state="running", stage=stage, step=step, total_steps=total)
        return job is None or job.cancel_requested

    def events(self, job_id: str, since: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The changes of a job after the first `since` ones, and its current status."""
        status = self.status(job_id)
        log = self._events.get(job_id)
        if log is None:  # a job from before this runner started: its status is the one event
            log = self._events[job_id] = [{"state": status["state"], "stage": status["stage"],
                                           "step": status["step"], "total_steps": status["total_steps"]}]
        return log[since:], status

    def _record(self, job_id: str, **event: Any) -> None:
        self._events.setdefault(job_id, []).append({"stage": None, "step": None, "total_steps": None, **event})
        self._events.move_to_end(job_id)
        while len(self._events) > _EVENT_LOGS_KEPT:
            self._events.popitem(last=False)

    def _finish(self, job_id: str, state: str, **kwargs: Any) -> None:
        job = self.store.finish(job_id, state, **kwargs)
        self._record(job_id, state=state, stage="done" if state == "succeeded" else state)
        if job is not None:
            metrics.jobs_finished.inc(tags={"task": job.task, "state": state})
            metrics.job_seconds.observe(job.finished_at - job.created_at, tags={"task": job.task, "state": state})

    def _job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id[:64]!r}", "id")
        return job

    # -- dispatching -----------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            while len(self._running) < self.config.concurrency:
                job = self.store.claim_next()
                if job is None:
                    break
                self._record(job.id, state="running", stage="queued")
                self._running[job.id] = asyncio.get_running_loop().create_task(self._execute(job))
            # gauges age out of Ray's metrics agent unless refreshed: this loop turns at least every second
            metrics.jobs_queued.set(self.store.count("queued"))
            metrics.jobs_running.set(len(self._running))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    async def _execute(self, job: Job) -> None:
        try:
            await self._run(job)
        except Exception:  # never let one job kill the dispatcher
            log.exception("job %s failed unexpectedly", job.id)
            self._finish(job.id, "failed", error={"code": "internal", "message": "internal error"})
        finally:
            self._running.pop(job.id, None)
            self._wake.set()

    async def _run(self, job: Job) -> None:
        progress = JobProgress(self, self.handle, job.id)
        try:
            request = self.orchestrator.resolve(job.task, job.fields)
            encoded = await self.orchestrator.run(request, self.store.input(job.id), progress)
        except Cancelled as exc:
            self._finish(job.id, "cancelled", error={"code": exc.code, "message": exc.message})
        except BackPressureError:
            # the model queue is full: the job keeps its place and its attempt count
            await asyncio.sleep(self.config.backpressure_retry_s)
            self.store.update(job.id, state="queued", attempts=job.attempts - 1, stage=None)
            self._record(job.id, state="queued")
        except _REPLICA_LOST as exc:
            if job.attempts < self.config.max_attempts:
                log.warning("job %s lost its replica (%s); retrying", job.id, type(exc).__name__)
                self.store.update(job.id, state="queued", stage=None, step=None)
                self._record(job.id, state="queued")
            else:
                self._finish(job.id, "failed", error={
                    "code": "replica_lost",
                    "message": f"the model replica died during this job {job.attempts} times; last: {type(exc).__name__}",
                })
        except ImgserveError as exc:
            self._finish(job.id, "failed", error=error_body(exc.code, exc.message, exc.field)["error"])
        else:
            if self.store.get(job.id).cancel_requested:
                self._finish(job.id, "cancelled", error={"code": "cancelled", "message": "cancelled by the client"})
            else:
                self._finish(job.id, "succeeded", result=encoded.data, media_type=encoded.media_type,
                             metadata=encoded.metadata, served=encoded.served)
