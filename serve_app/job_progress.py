"""`JobProgress`: the `Progress` a job's run carries to the orchestrator and the model replica.

Each stage and denoising step is reported to the job runner; the answer says whether the run must
stop (the job was cancelled, or this run lost its claim). Picklable: in a model replica it keeps
only the runner's handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.jobs import JobRunner
    from serve_app.job_record import Claim


class JobProgress:
    """What the orchestrator and the model call while running a job.

    In the runner's own process it calls the runner directly (its event loop must not block on
    its own handle); pickled to a model replica it keeps only the runner's handle and waits for
    each answer there, on the model's worker thread. Carries the job's claim, so a run whose claim
    was lost (handed back, re-queued by the reaper, failed by a limit) is told to stop.
    """

    def __init__(self, runner: JobRunner, handle: Any, job_id: str, claim: Claim | None = None) -> None:
        self.runner: JobRunner | None = runner
        self.handle = handle
        self.job_id = job_id
        self.claim = list(claim) if claim is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"runner": None, "handle": self.handle, "job_id": self.job_id, "claim": self.claim}

    def stage(self, name: str) -> None:
        self._report(name, None, None)

    def step(self, step: int, total: int) -> bool:
        return self._report("denoise", step, total)

    def _report(self, stage: str, step: int | None, total: int | None) -> bool:
        if self.runner is not None:
            return self.runner.report(self.job_id, stage, step, total, self.claim)
        return bool(self.handle.report.remote(self.job_id, stage, step, total, self.claim).result())
