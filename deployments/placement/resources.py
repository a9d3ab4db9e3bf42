"""Ray Serve options of one replica, from its plan.

Contract: `ray_options(plan, config, num_cpus)` returns the deployment options that give one
replica exactly the GPUs `plan` uses: actor CPUs and GPUs, the custom GPU resource when the config
names one, and one STRICT_PACK bundle holding every GPU when the plan uses several.
`encoder_ray_options(plan, config, num_cpus)` does the same for the TextEncoder stage: one GPU
(and the custom resource) for a card plan, none for a CPU plan. Pure functions of their
arguments: they never import or call Ray.
"""

from __future__ import annotations

from typing import Any

from deployments.placement.config import PlacementConfig
from deployments.placement.encoder import EncoderPlan
from deployments.placement.search import Plan


def ray_options(plan: Plan, config: PlacementConfig, num_cpus: float) -> dict[str, Any]:
    """Ray Serve deployment options that give one replica exactly the GPUs `plan` uses."""
    gpus = plan.gpus_used
    actor: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": gpus}
    if config.gpu_resource:
        actor["resources"] = {config.gpu_resource: gpus}
    options: dict[str, Any] = {"ray_actor_options": actor}
    if gpus > 1:
        # ONE bundle holding every GPU: Ray puts only the GPUs of the replica's own bundle in its
        # CUDA_VISIBLE_DEVICES, so a bundle per GPU would hide all but one of them from the
        # process. STRICT_PACK keeps the bundle (and the replica) on one node.
        bundle: dict[str, float] = {"CPU": num_cpus, "GPU": gpus}
        if config.gpu_resource:
            bundle[config.gpu_resource] = gpus
        options["placement_group_bundles"] = [bundle]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def encoder_ray_options(plan: EncoderPlan, config: PlacementConfig | None, num_cpus: float) -> dict[str, Any]:
    """Ray Serve deployment options of one TextEncoder replica: its one GPU (and `gpu_resource`)
    for a card plan; no GPU for a CPU plan (a CPU replica asking for a GPU would hold a card idle)."""
    gpus = plan.gpus
    actor: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": gpus}
    if gpus and config is not None and config.gpu_resource:
        actor["resources"] = {config.gpu_resource: gpus}
    return {"ray_actor_options": actor}
