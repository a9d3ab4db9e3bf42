"""A real multi-node Ray cluster on this machine (`cluster/local.sh`), with imgserve deployed on it
from `configs/rtx4090-cluster.yaml` (tiny models, CPU, shortened autoscaling delays).

Ray's token authentication is on (the token is `ENV["RAY_AUTH_TOKEN"]`). The LoRA versions are in a
directory that only the worker nodes are told of: `real.lora_dir` names the environment variable
`LORA_DIR_VARIABLE`, which cluster/local.sh sets on the workers alone (all nodes here share one
filesystem, so a directory the head cannot find stands for one the head does not have)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import ray
import yaml
from ray import serve

from deployments.lora import ensure_tiny_loras
from serve_app.app import build_graph
from tests.cluster import local
from tests.conftest import REPO, Service, free_port
from tests.serve.gate import GATE_NAME, Gate, GatedRealModel

PORT = int(os.environ.get("IMGSERVE_TEST_CLUSTER_PORT", "6391"))
WORKER_GPUS = 5
"""Fake GPUs (and rtx4090) per worker: real (2 cards), layers (2) and the TextEncoder stage (1) at
their minimum must fit on the one worker left when the other is lost."""
ENV = local.cluster_env(PORT, dashboard_port=8266, worker_gpus=WORKER_GPUS)
ADDRESS = f"{local.cluster_ip(ENV)}:{PORT}"
"""The cluster's address (its GCS), as `local_cluster` connects to it."""
DASHBOARD = local.dashboard_url(ENV)
"""The head's dashboard and job API."""
LORA_DIR_VARIABLE = "IMGSERVE_TEST_LORA_DIR"
"""Set on the worker nodes only: the directory of the tiny LoRA versions."""


def local_sh(*args: str) -> str:
    return local.local_sh(ENV, *args, timeout=180)


def cluster_args(cache_dir: Any) -> dict[str, Any]:
    """configs/rtx4090-cluster.yaml's args, kept as they are for placement (GPUs per replica, the
    rtx4090 and imgserve_head resources, autoscaling on queue depth, queue limits), with tiny local
    models, CPU shares that fit this 2-core machine, and autoscaling delays of seconds."""
    document = yaml.safe_load((REPO / "configs" / "rtx4090-cluster.yaml").read_text())
    args = copy.deepcopy(document["applications"][0]["args"])
    args["cache_dir"] = str(cache_dir)
    args["jobs"]["directory"] = str(cache_dir / "jobs")
    args["ingress"]["expose_replica"] = True  # the tests follow requests to replicas
    for name in ("ingress", "preprocess", "anime", "postprocess"):
        serve_options = args[name]["serve"]
        serve_options["ray_actor_options"]["num_cpus"] = 0.1
        serve_options["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    args["jobs"]["serve"]["ray_actor_options"]["num_cpus"] = 0.05
    # the versions' directory as the workers' environment names it: the head cannot list it
    args["real"].update(source="tiny", lora_dir=f"${{{LORA_DIR_VARIABLE}}}", condition_area=4096, num_threads=1)
    for adapter in args["real"]["speed_adapters"].values():  # the presets as configured, on a tiny stand-in
        adapter["file"] = "tiny"
    args["real"]["serve"]["ray_actor_options"]["num_cpus"] = 0.2
    args["real"]["serve"]["autoscaling_config"].update(
        min_replicas=1, max_replicas=2, upscale_delay_s=0.5, downscale_delay_s=3, look_back_period_s=2, metrics_interval_s=0.5,
    )
    args["layers"].update(source="tiny", tiny_edge=64, caption_max_new_tokens=8, num_threads=1)
    args["layers"]["serve"]["ray_actor_options"]["num_cpus"] = 0.2
    args["layers"]["serve"]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    args["anime"].update(styles_dir="tiny", num_threads=1)
    # the stage as configured (its own card: 1 fake GPU and rtx4090, shared by real and layers)
    args["text_encoder"]["num_threads"] = 1
    args["text_encoder"]["serve"]["ray_actor_options"]["num_cpus"] = 0.1
    return args


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Head (no GPUs) + two workers (5 fake GPUs and rtx4090 each, and the LoRA directory in their
    environment); imgserve deployed on it."""
    if ray.is_initialized():
        pytest.skip("this process is already connected to another Ray; run tests/cluster first or alone")
    assert LORA_DIR_VARIABLE not in os.environ  # the driver, which builds the app, must not see it either
    loras = ensure_tiny_loras(tmp_path_factory.mktemp("imgserve-worker-loras"))
    env = {**ENV, **local.worker_env({LORA_DIR_VARIABLE: str(loras)})}
    http_port = free_port()
    with local.local_cluster(env, http_port, timeout=180):
        gate = Gate.options(name=GATE_NAME, resources={"imgserve_head": 0.01}).remote()
        gate.open.remote()
        cache = tmp_path_factory.mktemp("imgserve-cluster-cache")
        serve.run(build_graph(cluster_args(cache), models={"real": GatedRealModel}), name="imgserve",
                  route_prefix="/")
        service = Service(http_port)
        try:
            yield {"service": service, "gate": gate, "port": http_port, "loras": loras}
        finally:
            service.http.close()
