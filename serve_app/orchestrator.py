"""The one request path, shared by synchronous requests, handle callers and jobs.

`Orchestrator` resolves a task's fields without pixels (422 before any decoding), then drives
Preprocess → [the TextEncoder stage, for a task it encodes for] → the task's model → Postprocess
through deployment handles, awaiting each hop so every queue limit holds. While the stage encodes,
the model replica that will take the request is asked to make the request's choice resident (a
LoRA version), so the two overlap. An optional `Progress` receives the stages (and, from the model, each denoising
step) and can stop the run. It holds handles, the configured tasks and the upload limits; it
knows nothing about HTTP and never names a task.

Whoever calls `run` says who it is (`caller`: `http`, `handle`, `job`) and for whom (`key_id`, the
API key's id or None): a run whose caller goes away (its task cancelled: the HTTP client
disconnected, a handle caller cancelled its response) or that passes its time limit is counted in
`imgserve_abandoned{task, reason}` (`client_disconnected`, `caller_cancelled`, `timeout`; the job
runner's own cancellations are not abandoned work) and the cancellation reaches the deployments,
whose models stop at their next step. A finished run's model time (the model's seconds and the
text encoder stage's) is `Encoded.served["model_seconds"]` and `imgserve_model_seconds{task, key_id}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments import metrics
from deployments.errors import InvalidParameter, TimedOut
from deployments.postprocess import Encoded
from deployments.preprocess import PreprocessConfig
from deployments.records import Deadline, Progress
from deployments.task import ConfiguredTask, Resolved, Tasks, TaskSection
from serve_app import catalogs
from serve_app.catalogs import Catalogs
from serve_app.errors import NotFound


@dataclass(frozen=True)
class Handles:
    """The deployments a request passes through."""

    preprocess: Any
    models: dict[str, Any]
    """Task name → its model deployment's handle."""
    postprocess: Any
    encoders: dict[str, Any] = field(default_factory=dict)
    """Task name → the handle of the TextEncoder deployment encoding its prompts (stage mode)."""


class Orchestrator:
    """Preprocess → model → postprocess for every task of a registry, through deployment handles."""

    def __init__(self, tasks: Tasks, sections: dict[str, TaskSection], upload: PreprocessConfig, cache_dir: Path,
                 handles: Handles, catalog_ttl_s: float = 5.0) -> None:
        self.registry = tasks
        self.sections = sections
        self.upload = upload
        """The upload limits preprocess enforces (for /v1/models and the OpenAPI document)."""
        self.cache_dir = cache_dir
        self.handles = handles
        self.created = int(time.time())
        """When this orchestrator was made: the `created` of its OpenAI-style model ids."""
        self.catalogs = Catalogs({}, lambda deployment: [], catalog_ttl_s)
        """What the model replicas report they serve (`serve_app.catalogs`); reads nothing until `open`."""
        self.app_name: str | None = None
        """The Serve application this orchestrator serves in (after `open` in a replica)."""

    @property
    def tasks(self) -> dict[str, ConfiguredTask]:
        """Task name → the task with its config section and its catalog as last read, in the
        registry's order."""
        return {task.name: task.configured(self.sections[task.name], self.catalogs.get(task.name))
                for task in self.registry}

    def open(self, app_name: str | None = None) -> Orchestrator:
        """In the replica that uses it (never the builder, which only passes it on): read the
        catalogs the model replicas of application `app_name` (this replica's when None) report."""
        if app_name is None:
            from ray import serve
            from ray.serve.exceptions import RayServeException

            try:
                app_name = serve.get_replica_context().app_name
            except RayServeException:  # not in a Serve replica (a test): no reports to read
                return self
        deployments = {task.name: task.deployment for task in self.registry
                       if self.sections[task.name].choice_field is not None}
        self.catalogs = Catalogs(deployments, functools.partial(catalogs.read, app_name), self.catalogs.ttl_s)
        self.app_name = app_name
        return self

    async def refresh(self, task: str | None = None, fresh: bool = False) -> None:
        """Read the catalog reports of `task` (every task when None) where they are older than the TTL
        (with `fresh`, than a second), on a thread: the cluster store is a network call."""
        names = [task] if task is not None else list(self.catalogs.deployments)
        for name in names:
            if self.catalogs.stale(name, fresh):
                await asyncio.to_thread(self.catalogs.reports, name, fresh)

    async def keep_fresh(self) -> None:
        """Read every task's reports again each TTL, for as long as this runs (an ingress replica's
        life): what only reads the catalogs as they are (/openapi.json) is never older than that."""
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - logged by the catalogs; the next round tries again
                pass
            missing = any(self.catalogs.get(task) is None for task in self.catalogs.deployments)
            await asyncio.sleep(min(self.catalogs.ttl_s, catalogs.MIN_REFRESH_S) if missing else self.catalogs.ttl_s)

    async def validate(self, task: str, fields: dict[str, Any] | None) -> Resolved:
        """`resolve` against catalogs read at most a TTL ago; a name they do not list (a version
        added since) reads them again once before it is refused."""
        if task in self.catalogs.deployments:
            await self.refresh(task)
        try:
            return self.resolve(task, fields)
        except InvalidParameter as exc:
            if task not in self.catalogs.deployments or exc.field != self.sections[task].choice_field:
                raise
            await self.refresh(task, fresh=True)
            return self.resolve(task, fields)

    def task(self, name: str) -> ConfiguredTask:
        """The configured task `name`; NotFound naming the available ones."""
        if name not in self.tasks:
            raise NotFound(f"unknown task {name!r}; available: {', '.join(sorted(self.tasks))}", "task")
        return self.tasks[name]

    def resolve(self, task: str, fields: dict[str, Any] | None) -> Resolved:
        """Check the task and its fields without touching pixels; fills defaults and the seed. A
        `size` may ask for at most the upload's long-edge limit."""
        return self.task(task).resolve(fields, self.upload.max_long_edge)

    async def run(self, request: Resolved, image: bytes, progress: Progress | None = None,
                  timeout_s: float | None = None, key_id: str | None = None, caller: str = "handle") -> Encoded:
        """Run a resolved request; raises the `deployments.errors` classes on bad input, and
        `TimedOut` after `timeout_s` (the model, told the same deadline, stops at its next step).
        `key_id` names whose model time it is; `caller` (`http`, `handle`, `job`) why a cancelled
        run was abandoned (module docstring)."""
        task = request.task
        try:
            encoded = await self._limited(request, image, progress, timeout_s)
        except TimedOut:
            if caller != "job":
                metrics.abandoned.inc(tags={"task": task, "reason": "timeout"})
            raise
        except asyncio.CancelledError:
            if caller != "job":
                reason = "client_disconnected" if caller == "http" else "caller_cancelled"
                metrics.abandoned.inc(tags={"task": task, "reason": reason})
            raise
        seconds = encoded.served.get("model_seconds")
        if isinstance(seconds, (int, float)):
            metrics.model_seconds.inc(seconds, tags={"task": task, "key_id": key_id or "-"})
        return encoded

    async def _limited(self, request: Resolved, image: bytes, progress: Progress | None,
                       timeout_s: float | None) -> Encoded:
        if timeout_s is None:
            return await self._run(request, image, progress)
        deadline = Deadline(time.time() + timeout_s, timeout_s, progress)
        try:
            # a timeout scope on this task, not a task of its own as `wait_for` would start: one task
            # switch less on every hop's result
            async with asyncio.timeout(timeout_s):
                return await self._run(request, image, deadline)
        except TimeoutError:
            raise TimedOut(f"took longer than the limit of {timeout_s:g} s") from None

    async def _run(self, request: Resolved, image: bytes, progress: Progress | None) -> Encoded:
        task = self.tasks[request.task].task
        # 1. preprocess on CPU replicas; awaited so the model's queue limit is enforced (a
        #    DeploymentResponse passed straight on bypasses max_queued_requests in Ray Serve 2.60)
        if progress is not None:
            progress.stage("preprocess")
        spec = task.spec_for(request.params)
        if request.size is not None:  # the request's `size`: one more bound preprocess applies
            spec = dataclasses.replace(spec, fit=request.size)
        prepared = await hop(self.handles.preprocess.prepare.remote(image, spec, task=task.name))
        # 2. the model, on a replica that already holds the request's choice when one is free
        handle = self.handles.models[task.name]
        route = task.route(request.params) if task.route is not None else None
        if route is not None:
            handle = handle.options(multiplexed_model_id=route)
        conditioning = None
        encoder = self.handles.encoders.get(task.name)
        if encoder is not None:
            # 2a. the text encoder stage; meanwhile the replica that will take the request loads
            #     its choice (a LoRA version) if it is cold, so a switch costs max(encode, load)
            if progress is not None:
                progress.stage("encode_prompt")
            encoding = hop(encoder.encode.remote(task.name, prepared, request.params))
            if route is not None:
                conditioning, _ = await asyncio.gather(encoding, _warm(handle, route))
            else:
                conditioning = await encoding
        extra = (conditioning,) if conditioning is not None else ()  # only models that encode text take it
        generated = await hop(handle.remote(prepared, request.params, progress, *extra))
        # model time: the model's thread and the text encoder stage's (its stage seconds)
        encoder_seconds = sum(conditioning.seconds.values()) if conditioning is not None else 0.0
        model_seconds = generated.served.get("model_seconds", 0.0) + encoder_seconds
        generated.served["model_seconds"] = round(model_seconds, 3)
        # 3. encode on CPU replicas
        if progress is not None:
            progress.stage("postprocess")
        return await hop(self.handles.postprocess.encode.remote(generated, request.format))

    def readiness(self, placement: dict[str, tuple[int, str]], expose_replica: bool = False) -> dict[str, Any]:
        """GET /v1/status: per task, whether its model deployment has a running replica (`placement`:
        deployment → (running replicas, Serve's words), `serve_app.housekeeping.serve_placement`) and
        what its replicas report: the names they serve, the default, why other files are not
        listed, what each holds in memory (the replicas' names only with `expose_replica`)."""
        tasks: dict[str, Any] = {}
        for name, configured in self.tasks.items():
            deployment = configured.task.deployment
            running, detail = placement.get(deployment, (0, "not deployed"))
            entry: dict[str, Any] = {"deployment": deployment, "ready": running > 0,
                                     "replicas": {"running": running, "detail": detail}}
            if name in self.catalogs.deployments:
                reports = self.catalogs.reports(name)
                entry["catalog"] = configured.catalog.to_dict() if configured.catalog is not None else None
                entry["reports"] = [{"age_s": round(time.time() - report.at, 1), "holds": list(report.holds),
                                     **({"replica": report.replica} if expose_replica else {})} for report in reports]
            tasks[name] = entry
        return {"ready": all(entry["ready"] for entry in tasks.values()), "tasks": tasks}

    def model_ids(self) -> list[str]:
        """The OpenAI-style model ids: each task's name, then `<task>:<choice>` for each entry of its
        catalog worth addressing (`TaskSection.choices`: LoRA versions, styles)."""
        ids = []
        for name, task in self.tasks.items():
            ids.append(name)
            ids.extend(f"{name}:{choice}" for choice in task.section.choices(task.catalog))
        return ids

    def models_info(self) -> dict[str, Any]:
        """GET /v1/models: tasks, their defaults, limits, choices and formats; and next to them the
        same as OpenAI's model list (`object`, `data`), so both kinds of clients read one document."""
        return {
            "tasks": {name: task.describe() for name, task in self.tasks.items()},
            "max_long_edge": self.upload.max_long_edge,
            "max_bytes": self.upload.max_bytes,
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": self.created, "owned_by": "imgserve"}
                     for model_id in self.model_ids()],
        }


async def hop(response: Any) -> Any:
    """Await one deployment's `DeploymentResponse`; when this run is cancelled meanwhile (its caller
    went away, its own time limit), cancel that request too, explicitly: the deployment stops its
    work (a model at its next step) rather than finishing it for nobody."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


async def _warm(handle: Any, choice: str) -> None:
    """Have a replica of `handle` (routed by `choice`) make it resident (the model's `prefetch`). Only a head start: a
    failure here (a full queue, a lost replica) is the model call's to report, not this one's."""
    try:
        await handle.prefetch.remote(choice)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the request's own model call surfaces any real problem
        return
