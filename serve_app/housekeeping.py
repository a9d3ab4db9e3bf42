"""The job runner's upkeep, run at its start and every `jobs.housekeeping_s` while it is up.

- Leases: running jobs whose lease lapsed (their runner died or hung), or whose runner is known to
  be gone, are queued again within `max_attempts`, else failed `interrupted` (metric reason
  `lease_expired`). A runner renews its own leases while it waits, so only a dead or stuck runner
  loses them; a crashed runner's jobs are taken back at once when Serve shows its actor gone.
- Limits: queued jobs older than `max_wait_s` fail `queue_timeout`; this runner's jobs running
  longer than `max_run_s` fail `run_timeout` and their run is cancelled (a model still working is
  told to stop at its next step by its progress answer). The message names the deployment the job
  was waiting for when Serve shows it has no RUNNING replica (e.g. one that can never be placed).
- Storage: retention (`retention_s`), then `max_store_bytes` (oldest finished jobs forgotten first),
  and idempotency keys first used more than `idempotency_ttl_s` ago.

Each step is guarded: a failing one is logged and tried again at the next tick.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from deployments import metrics
from deployments.errors import InvalidParameter

if TYPE_CHECKING:
    from serve_app.jobs import JobRunner
    from serve_app.job_record import Job

log = logging.getLogger("imgserve.jobs")


class Housekeeping:
    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self.config = runner.config
        self.store = runner.store

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.housekeeping_s)
            await self.tick()

    async def tick(self) -> None:
        for step in (self.reap, self.limits, self.storage):
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - upkeep must outlive a bad tick (a full disk, a Serve hiccup)
                log.exception("job housekeeping step %s failed; retrying at the next tick", step.__name__)

    # -- leases ------------------------------------------------------------------------------------
    async def reap(self) -> None:
        others = {job.runner for job in self.store.running() if job.runner and job.runner != self.runner.id}
        dead: set[str] = set()
        if others:
            try:
                dead = await asyncio.to_thread(self.runner._dead_runners, others)
            except Exception:  # noqa: BLE001 - without it, leases still end those jobs
                log.warning("could not tell which job runners are gone", exc_info=True)
        for job, outcome in self.store.reap(self.config.max_attempts, dead):
            log.warning("job %s: its runner's lease lapsed; %s", job.id, outcome)
            metrics.job_limits.inc(tags={"task": job.task, "reason": "lease_expired"})
            if outcome == "failed":
                self.runner._ended(job)
            else:
                self.runner._record(job.id, state="queued")
                self.runner._notify(dispatch=True)

    # -- time limits -------------------------------------------------------------------------------
    async def limits(self) -> None:
        if self.config.max_wait_s is not None:
            for job in self.store.expire_queued(self.config.max_wait_s):
                metrics.job_limits.inc(tags={"task": job.task, "reason": "queue_timeout"})
                self.runner._ended(job)
        if self.config.max_run_s is None:
            return
        now = time.time()
        for task, job in list(self.runner._running.values()):
            if job.started_at is None or job.started_at + self.config.max_run_s > now:
                continue
            message = await self.run_timeout_message(job)
            if self.runner._end(job, "failed", error={"code": "run_timeout", "message": message}) is not None:
                metrics.job_limits.inc(tags={"task": job.task, "reason": "run_timeout"})
                log.warning("job %s: %s", job.id, message)
            task.cancel()

    async def run_timeout_message(self, job: Job) -> str:
        limit = f"ran longer than jobs.max_run_s ({self.config.max_run_s:g} s)"
        current = self.store.get(job.id)
        stage = current.stage if current is not None else None
        names = self.waiting_for(job.task, stage)
        try:
            placement = await asyncio.to_thread(self.runner._placement)
        except Exception:  # noqa: BLE001 - only the detail is lost
            log.warning("could not read Serve's status for a run_timeout message", exc_info=True)
            placement = None
        for name in names:
            if placement and name in placement and placement[name][0] == 0:
                detail = placement[name][1]
                return (f"{limit} waiting for the deployment {name!r}, which has no replica placed and running"
                        f"{': ' + detail if detail else ''}")
        where = f" in the deployment {names[0]!r}" if len(names) == 1 else ""
        return f"{limit}; its last stage was {stage or 'queued'!r}{where}"

    def waiting_for(self, task: str, stage: str | None) -> list[str]:
        """The deployments a job at `stage` may be waiting for, in the order it reaches them."""
        handles = getattr(self.runner.orchestrator, "handles", None)
        if handles is None:
            return []

        def name(handle: Any) -> str | None:
            return getattr(handle, "deployment_name", None) if handle is not None else None

        model, encoder = name(handles.models.get(task)), name(handles.encoders.get(task))
        if stage in (None, "queued", "preprocess"):
            names = [name(handles.preprocess), encoder, model]
        elif stage == "encode_prompt":
            names = [encoder, model]
        elif stage == "postprocess":
            names = [name(handles.postprocess)]
        else:
            names = [model]
        return [n for n in names if n]

    # -- storage -----------------------------------------------------------------------------------
    async def storage(self) -> None:
        forgotten = await asyncio.to_thread(self.store.purge, self.config.retention_s)
        if self.config.max_store_bytes is not None:
            forgotten += await asyncio.to_thread(self.store.evict, self.config.max_store_bytes)
        if forgotten:
            log.info("forgot %d finished jobs (retention, max_store_bytes)", forgotten)
        await asyncio.to_thread(self.store.purge_idempotency)


def encode_cursor(job: Job) -> str:
    """The opaque `next_cursor` after `job` in a newest-first listing."""
    return base64.urlsafe_b64encode(json.dumps([job.created_at, job.id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(job_id, str) or not isinstance(created, (int, float)):
            raise ValueError(cursor)
        return float(created), job_id
    except (ValueError, TypeError):
        raise InvalidParameter("cursor is not one this service gave out", "cursor") from None


def serve_placement(app_name: str) -> dict[str, tuple[int, str]]:
    """Deployment name → (RUNNING replicas, Serve's message) of `app_name`, from `serve.status()`."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    placement = {}
    for name, deployment in app.deployments.items():
        states = {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items()}
        # Serve's message tells a replica that cannot be scheduled from one still starting
        detail = "; ".join(filter(None, [", ".join(f"{n} {state}" for state, n in states.items()) or "no replica",
                                         deployment.message]))
        placement[name] = (states.get("RUNNING", 0), detail)
    return placement


def actor_gone(name: str) -> bool:
    """Whether no live Serve actor is named `name` (a replica that died is not restarted under it)."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:
        return True
    return False
