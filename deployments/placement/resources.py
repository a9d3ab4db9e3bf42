"""Ray Serve options of one replica, from its plan.

Contract: `ray_options(plan, config, num_cpus)` returns the deployment options that give one
replica exactly the GPUs `plan` uses: actor CPUs and GPUs, the custom GPU resource when the config
names one, and one STRICT_PACK bundle holding every GPU when the plan uses several. A pure
function of its arguments: it never imports or calls Ray.
"""

from __future__ import annotations

from typing import Any

from deployments.placement.config import PlacementConfig
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
