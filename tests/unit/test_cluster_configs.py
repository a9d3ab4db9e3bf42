"""The RTX 4090 configs, the builder's GPU requests, and the cluster files generated from them."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import load_config
from serve_app.kuberay import render
from tests.conftest import REPO, demo_args


def config_args(name: str) -> dict:
    document = yaml.safe_load((REPO / "configs" / name).read_text())
    return copy.deepcopy(document["applications"][0]["args"])


def test_one_card_config_asks_ray_for_one_4090_per_replica() -> None:
    config = load_config(config_args("rtx4090.yaml"))
    for section in (config.real, config.layers):
        options = section.serve_options()
        actor = options["ray_actor_options"]
        assert actor["num_gpus"] == 1
        assert actor["resources"] == {"rtx4090": 1}
        assert "placement_group_bundles" not in options  # one GPU needs no bundle
        plan = section.plan()
        assert plan.gpus_used == 1 and max(plan.peak_gb) <= 22.5


def test_cluster_config_asks_for_two_cards_in_one_strict_pack_bundle() -> None:
    config = load_config(config_args("rtx4090-cluster.yaml"))
    options = config.real.serve_options()
    actor = options["ray_actor_options"]
    assert actor["num_gpus"] == 2 and actor["resources"] == {"rtx4090": 2}
    assert options["placement_group_strategy"] == "STRICT_PACK"
    [bundle] = options["placement_group_bundles"]
    # the replica actor itself must fit in the bundle it is placed in
    assert bundle["GPU"] == 2 and bundle["rtx4090"] == 2 and bundle["CPU"] >= actor["num_cpus"]
    assert options["autoscaling_config"]["max_replicas"] > options["autoscaling_config"]["min_replicas"]
    assert options["max_queued_requests"] > 0
    assert config.jobs.serve.ray_actor_options["resources"] == {"imgserve_head": 0.01}


def test_demo_config_plans_nothing_and_asks_for_no_gpu() -> None:
    config = load_config(demo_args())
    options = config.real.serve_options()
    assert "num_gpus" not in options["ray_actor_options"] and "placement_group_bundles" not in options


def test_placement_and_num_gpus_together_are_refused_naming_both() -> None:
    args = config_args("rtx4090.yaml")
    args["real"]["serve"]["ray_actor_options"]["num_gpus"] = 1
    with pytest.raises(ValidationError, match=r"real\.serve\.ray_actor_options\.num_gpus .*real\.placement"):
        load_config(args)


def test_a_placement_that_does_not_fit_is_refused_at_config_time() -> None:
    args = config_args("rtx4090.yaml")
    args["real"]["placement"].update(gpu_memory_gb=8, allow_offload=False)
    with pytest.raises(ValidationError, match=r"real\.placement does not fit"):
        load_config(args)


def test_a_plan_smaller_than_the_largest_request_is_refused() -> None:
    args = config_args("rtx4090.yaml")
    args["layers"]["max_layers"] = 10
    with pytest.raises(ValidationError, match=r"layers\.placement\.layers \(6\) must be >= layers\.max_layers \(10\)"):
        load_config(args)
    args = config_args("rtx4090.yaml")
    args["real"]["placement"]["resolution"] = 768
    with pytest.raises(ValidationError, match=r"real\.placement\.resolution \(768\) must be >= preprocess\.max_long_edge"):
        load_config(args)


def test_kuberay_manifest_is_generated_from_the_cluster_config_not_hand_copied() -> None:
    committed = (REPO / "cluster" / "rayservice.yaml").read_text()
    assert committed == render("configs/rtx4090-cluster.yaml"), (
        "cluster/rayservice.yaml is stale: imgserve kuberay configs/rtx4090-cluster.yaml > cluster/rayservice.yaml")
    manifest = yaml.safe_load(committed)
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((REPO / "configs" / "rtx4090-cluster.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and "imgserve_head" in head["rayStartParams"]["resources"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    [workers] = cluster["workerGroupSpecs"]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert workers["rayStartParams"]["num-gpus"] == gpus
    assert f'\\"rtx4090\\": {gpus}' in workers["rayStartParams"]["resources"]


def test_kuberay_refuses_a_bad_config(tmp_path) -> None:
    document = yaml.safe_load((REPO / "configs" / "rtx4090-cluster.yaml").read_text())
    document["applications"][0]["args"]["real"]["serve"]["max_ongoing_requests"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        render(bad)


def test_onprem_launcher_keeps_gpu_work_off_the_head() -> None:
    launcher = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    head = " ".join(launcher["head_start_ray_commands"])
    workers = " ".join(launcher["worker_start_ray_commands"])
    assert "--num-gpus=0" in head and "imgserve_head" in head
    assert "rtx4090" in workers and "--head" not in workers
    assert any("scripts/setup.sh" in command for command in launcher["setup_commands"])
