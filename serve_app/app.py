"""Builds the one driver graph from a validated config: `serve_app.app:build_app(args)`.

Ingress → Preprocess (CPU) → [TextEncoder, in stage mode] → each task's model (GPU or CPU) →
Postprocess (CPU), plus the job runner, composed by handles passed to `.bind()`. The builder loops
over a task registry: one model deployment per task, named after its model class, with the Serve
options its section asks for (placement included), and in stage mode one TextEncoder deployment
per distinct text encoder (tasks whose encoder files are the same bytes share one). Deployment
classes are plain classes; this module alone attaches Ray Serve options, makes Serve call a
model's separate `load()` step when a replica starts, and routes a task's requests by its choice
(`serve.multiplexed`) where the task says so. Model deployments and the TextEncoder stage get a
graceful shutdown long enough for the longest request they may hold (derived from the ingress's
`request_timeout_s` and the jobs' `max_run_s` unless their section sets one) and run their request
methods on the replica's event loop (`deployments.options.model_serving`: a request whose caller
went away holds its slot until the model has stopped); the ingress one long enough for the
longest synchronous request.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.options import DeploymentOptions, longest_request_s, model_serving, with_shutdown
from deployments.postprocess import Postprocess
from deployments.preprocess import Preprocess
from deployments.task import Task, Tasks, TaskSection
from deployments.tasks import TASKS
from deployments.text_encoder import TextEncoder, identity
from serve_app import catalogs
from serve_app.config import BaseAppConfig, JobsSection, load_config
from serve_app.ingress import Ingress
from serve_app.jobs import JobRunner
from serve_app.orchestrator import Handles, Orchestrator


def loading(cls: type, resident: int | None = None) -> type:
    """A subclass of a model class whose constructor also loads it, then reports what it can serve
    by name (its catalog, `serve_app.catalogs`) to the ingress: what a Serve replica needs.

    With `resident`, the class's `adapter(choice)` method is wrapped with `serve.multiplexed`, so
    Serve routes a request for a choice to a replica that already holds it.
    """

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        self.load()
        self.reporter = catalogs.report_from(self)

    namespace: dict[str, Any] = {"__init__": __init__}
    if resident is not None:
        namespace["adapter"] = serve.multiplexed(max_num_models_per_replica=resident)(cls.adapter)
    return type(cls.__name__, (cls,), namespace)


class ServedJobRunner(JobRunner):
    """The job runner as a Serve replica: reaches itself through its own handle (model replicas
    report progress there), names its claims after its replica actor (a runner whose actor is gone
    loses its jobs at once, not after their lease), reads Serve's status for run_timeout messages,
    and on graceful shutdown (Serve awaits `__del__`) stops claiming and hands its jobs back."""

    async def __init__(self, config: JobsSection, orchestrator: Orchestrator) -> None:
        import uuid

        import ray

        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(context.deployment, context.app_name)
        self._app_name = context.app_name
        self._actor_name = ray.get_runtime_context().get_actor_name() or ""
        JobRunner.__init__(self, config, orchestrator.open(), handle,
                           runner_id=f"{self._actor_name}|{uuid.uuid4().hex[:8]}")
        await self.start()

    async def __del__(self) -> None:
        if getattr(self, "_tasks", None):  # also reached by garbage collection after Serve's call
            await self.stop()

    def _dead_runners(self, runners: set[str]) -> set[str]:
        from serve_app.housekeeping import actor_gone

        dead = set()
        for runner in runners:
            actor = runner.partition("|")[0]
            # this actor restarted (a new id under the same name) or another one that is gone
            if actor and (actor == self._actor_name or actor_gone(actor)):
                dead.add(runner)
        return dead

    def _placement(self) -> dict[str, tuple[int, str]] | None:
        from serve_app.housekeeping import serve_placement

        return serve_placement(self._app_name)


def deployment(cls: type, options: DeploymentOptions | dict[str, Any], name: str | None = None) -> serve.Deployment:
    """`cls` as a Serve deployment with the options from config."""
    if isinstance(options, DeploymentOptions):
        options = options.serve_options()
    return serve.deployment(cls, name=name or cls.__name__).options(**options)


def model_deployment(task: Task, section: TaskSection, cache_dir: Any, cls: type | None = None,
                     shutdown_s: float | None = None) -> Application:
    """The task's model deployment, bound to its section; `cls` substitutes a subclass of its model;
    `shutdown_s`: its graceful shutdown unless the section sets one (default: no request limit known)."""
    resident = section.resident_limit() if task.route is not None else None
    served = loading(cls or task.model, resident)
    options = model_serving(section.serve_options(), section.serve, shutdown_s or longest_request_s())
    return deployment(served, options, name=task.deployment).bind(section, cache_dir)


def model_shutdown_s(config: BaseAppConfig) -> float:
    """A model replica's graceful shutdown: the longest a request it holds may run (a synchronous
    request's `ingress.request_timeout_s` or a job's `jobs.max_run_s`, the larger) plus a margin."""
    return longest_request_s(config.ingress.request_timeout_s, config.jobs.max_run_s)


def text_encoders(config: BaseAppConfig, tasks: Tasks, cls: type = TextEncoder) -> dict[str, Application]:
    """Task → the TextEncoder deployment encoding its prompts (stage mode; {} inline). Tasks whose
    text encoder files have the same bytes share one deployment, named `TextEncoder`; where they
    differ (or cannot be read here) each group gets its own, `TextEncoder_<tasks>`."""
    groups: dict[str, list[str]] = {}
    for name in config.staged():
        digest = identity(tasks[name].model, config.section(name), config.cache_dir)
        groups.setdefault(digest or f"unknown:{name}", []).append(name)
    encoders: dict[str, Application] = {}
    for names in groups.values():
        label = "TextEncoder" if len(groups) == 1 else "TextEncoder_" + "_".join(names)
        models = {name: (tasks[name].model, config.section(name)) for name in names}
        options = model_serving(config.text_encoder.stage_options(tuple(names)), config.text_encoder.serve,
                                model_shutdown_s(config))
        app = deployment(loading(cls), options, name=label).bind(
            config.text_encoder, models, config.cache_dir)
        encoders.update(dict.fromkeys(names, app))
    return encoders


def build_app(args: dict[str, Any]) -> Application:
    """The imgserve application from a Serve config's `args` (Serve requires exactly one parameter)."""
    return build_graph(args)


def build_graph(args: dict[str, Any] | None = None, *, tasks: Tasks = TASKS,
                models: dict[str, type] | None = None, encoder: type = TextEncoder) -> Application:
    """The graph of `tasks` (the built-in ones by default); `models` lets tests substitute a
    subclass of a task's model class (e.g. a gated one), by task name, and `encoder` one of the
    TextEncoder."""
    config = load_config(args, tasks)
    models = models or {}
    unknown = sorted(set(models) - set(tasks.names))
    if unknown:
        raise ValueError(f"models given for tasks that are not in the registry: {unknown}")
    handles = Handles(
        preprocess=deployment(Preprocess, config.preprocess.serve).bind(config.preprocess),
        models={task.name: model_deployment(task, config.section(task.name), config.cache_dir, models.get(task.name),
                                            model_shutdown_s(config))
                for task in tasks},
        postprocess=deployment(Postprocess, config.postprocess.serve).bind(config.postprocess),
        encoders=text_encoders(config, tasks, encoder),
    )
    orchestrator = Orchestrator(tasks, config.sections(), config.preprocess, config.cache_dir, handles,
                                catalog_ttl_s=config.ingress.catalog_ttl_s)
    jobs = deployment(ServedJobRunner, config.jobs.serve, name="JobRunner").bind(config.jobs, orchestrator)
    # the ingress holds each synchronous request as long as the model does: it drains as long
    ingress = with_shutdown(config.ingress.serve.serve_options(), config.ingress.serve,
                            longest_request_s(config.ingress.request_timeout_s))
    return deployment(serve.ingress()(Ingress), ingress, name="Ingress").bind(
        config.ingress, orchestrator, jobs)
