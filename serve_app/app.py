"""Builds the one driver graph from a validated config: `serve_app.app:build_app(args)`.

Ingress → Preprocess (CPU) → model (GPU or CPU) → Postprocess (CPU), composed by handles passed to
`.bind()`. Deployment classes are plain classes; this module alone attaches Ray Serve options from
config, and for model classes makes Serve call their separate `load()` step when a replica starts.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments import placement
from deployments.anime import AnimeModel
from deployments.layers import LayersModel
from deployments.postprocess import Postprocess
from deployments.preprocess import Preprocess
from deployments.real import RealModel
from serve_app.config import AppConfig, DeploymentOptions, LayersSection, RealSection, load_config
from serve_app.ingress import Ingress
from serve_app.jobs import JobRunner
from serve_app.pipeline import Pipeline


def loading(cls: type, max_adapters: int | None = None) -> type:
    """A subclass of a model class whose constructor also loads it: what a Serve replica needs.

    With `max_adapters`, the class's `adapter(version)` method is wrapped with `serve.multiplexed`,
    so Serve routes a request for a version to a replica that already holds it.
    """

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        self.load()

    namespace: dict[str, Any] = {"__init__": __init__}
    if max_adapters is not None:
        namespace["adapter"] = serve.multiplexed(max_num_models_per_replica=max_adapters)(cls.adapter)
    return type(cls.__name__, (cls,), namespace)


class ServedJobRunner(JobRunner):
    """The job runner as a Serve replica: builds its pipeline from handles, reaches itself through
    its own handle (model replicas report progress there), and starts dispatching."""

    async def __init__(self, config: AppConfig, preprocess: Any, models: dict[str, Any], postprocess: Any) -> None:
        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(context.deployment, context.app_name)
        JobRunner.__init__(self, config.jobs, Pipeline(config, preprocess, models, postprocess), handle)
        await self.start()


def deployment(cls: type, options: DeploymentOptions | dict[str, Any], name: str | None = None) -> serve.Deployment:
    """`cls` as a Serve deployment with the options from config."""
    if isinstance(options, DeploymentOptions):
        options = options.serve_options()
    return serve.deployment(cls, name=name or cls.__name__).options(**options)


def model_options(section: RealSection | LayersSection, task: str) -> dict[str, Any]:
    """Serve options of a diffusion model deployment: from config, and with `placement` the GPUs,
    custom resources and placement-group bundle its plan needs (exactly those, no more)."""
    options = section.serve.serve_options()
    plan = section.plan(task)
    if plan is None:
        return options
    actor = dict(options["ray_actor_options"])
    planned = placement.ray_options(plan, section.placement, num_cpus=actor.get("num_cpus", 1))
    resources = {**actor.get("resources", {}), **planned["ray_actor_options"].get("resources", {})}
    options["ray_actor_options"] = {**actor, **planned["ray_actor_options"], **({"resources": resources} if resources else {})}
    for key in ("placement_group_bundles", "placement_group_strategy"):
        if key in planned:
            options[key] = planned[key]
    return options


def build_app(args: dict[str, Any]) -> Application:
    """The imgserve application from a Serve config's `args` (Serve requires exactly one parameter)."""
    return build_graph(args)


def build_graph(args: dict[str, Any] | AppConfig | None = None, *, real_cls: type = RealModel) -> Application:
    """The graph; `real_cls` lets tests substitute a subclass of the model (e.g. a gated one)."""
    config = load_config(args)
    preprocess = deployment(Preprocess, config.preprocess.serve).bind(config.preprocess)
    postprocess = deployment(Postprocess, config.postprocess.serve).bind(config.postprocess)
    real_cls = loading(real_cls, max_adapters=config.real.max_adapters_per_replica)
    real = deployment(real_cls, model_options(config.real, "real"), name="RealModel").bind(config.real, config.cache_dir)
    layers = deployment(loading(LayersModel), model_options(config.layers, "layers"), name="LayersModel").bind(
        config.layers, config.cache_dir)
    anime = deployment(loading(AnimeModel), config.anime.serve, name="AnimeModel").bind(config.anime, config.cache_dir)
    models = {"real": real, "anime": anime, "layers": layers}
    jobs = deployment(ServedJobRunner, config.jobs.serve, name="JobRunner").bind(config, preprocess, models, postprocess)
    return deployment(Ingress, config.ingress.serve).bind(config, preprocess, models, postprocess, jobs)
