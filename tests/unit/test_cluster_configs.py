"""The RTX 4090 configs, the builder's GPU requests, and the cluster files generated from them,
which run Ray with token authentication and keep its ports from everyone but the cluster."""

from __future__ import annotations

import copy
import re
import shlex
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from deployments import placement
from serve_app.config import load_config
from serve_app.kuberay import RAY_VERSION, min_workers_for, render
from tests.conftest import REPO, demo_args


def config_args(name: str) -> dict:
    document = yaml.safe_load((REPO / "configs" / name).read_text())
    return copy.deepcopy(document["applications"][0]["args"])


def assert_streams_nothing_for_the_encoder(plan: placement.Plan) -> None:
    """The replica's plan leaves the text encoder to the stage: none of it on its cards or streamed."""
    assert plan.text_encoder_mode == "stage"
    assert plan.text_encoder.offload == "stage" and plan.text_encoder.gpus == ()
    assert plan.text_encoder.weights_gb == () and plan.text_encoder.cpu_weights_gb == 0
    assert max(plan.peak_gb) <= plan.gpu_memory_gb - plan.margin_gb


def test_one_card_config_encodes_prompts_on_the_cpu_and_the_card_streams_no_encoder() -> None:
    config = load_config(config_args("rtx4090.yaml"))
    assert config.text_encoder.mode == "stage" and config.staged() == ("real", "layers")
    real = config.real.plan()
    assert_streams_nothing_for_the_encoder(real)
    # the whole fp8 transformer and the float32 VAE on the card: nothing streamed during a request
    assert real.transformer.offload == "none" and real.transformer.streamed_blocks == 0
    assert real.transformer.cpu_weights_gb == 0 and real.transformer.dtype == placement.FP8
    assert real.vae.gpus == (0,) and real.vae.dtype == placement.FP32 and real.vae_tiling
    # `layers` (6 layers) still streams some transformer blocks, as the config's comment says
    layers = config.layers.plan()
    assert_streams_nothing_for_the_encoder(layers)
    assert 0 < layers.transformer.streamed_blocks <= 60 * placement.MAX_STREAMED_FRACTION
    # the encoder on the CPU in bf16, asking Ray for no card: the node's one card stays with the transformer
    encoder = config.text_encoder
    assert encoder.placement is None and encoder.device == "cpu" and encoder.dtype == "bfloat16"
    options = encoder.stage_options(config.staged())
    actor = options["ray_actor_options"]
    assert "num_gpus" not in actor and "rtx4090" not in actor.get("resources", {})
    assert "placement_group_bundles" not in options and options["num_replicas"] == 1
    cpu = placement.plan_encoder(config.staged(), None)
    assert cpu.device == "cpu" and cpu.dtype == "bfloat16" and cpu.gpus == 0


def test_cluster_config_runs_the_encoder_stage_on_a_4090_of_its_own() -> None:
    config = load_config(config_args("rtx4090-cluster.yaml"))
    assert config.text_encoder.mode == "stage" and config.staged() == ("real", "layers")
    for section in (config.real, config.layers):
        plan = section.plan()
        assert_streams_nothing_for_the_encoder(plan)
        assert plan.gpus_used == 2 and plan.transformer.streamed_blocks == 0
        assert plan.transformer.cpu_weights_gb == 0 and len(plan.transformer.gpus) == 2
    # without the encoder beside it, `real`'s transformer is bf16, split over its two cards
    assert config.real.plan().transformer.dtype == "bfloat16"
    encoder = config.text_encoder
    assert encoder.placement.gpus == 1 and encoder.placement.gpu_resource == "rtx4090"
    plan = encoder.plan(config.staged())
    assert plan.device == "cuda" and plan.dtype == "bfloat16" and plan.peak_gb <= plan.usable_gb
    assert set(plan.tasks) == {"real", "layers"}
    options = encoder.stage_options(config.staged())
    actor = options["ray_actor_options"]
    assert actor["num_gpus"] == 1 and actor["resources"] == {"rtx4090": 1}
    assert "placement_group_bundles" not in options  # one card needs no bundle
    replicas = options.get("num_replicas") or options["autoscaling_config"]["max_replicas"]
    assert 1 <= replicas <= 2


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
    manifest, policy = yaml.safe_load_all(committed)
    assert manifest["kind"] == "RayService" and policy["kind"] == "NetworkPolicy"
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
    # the workers it starts with hold real and layers at their minimum and the encoder stage's card
    config = load_config(serve_config["applications"][0]["args"])
    assert config.text_encoder.mode == "stage"
    needed = min_workers_for(config, int(gpus))
    assert needed == 2  # 2 + 2 cards for real and layers, 1 (or 2, not shared) for the encoder
    assert workers["minReplicas"] == workers["replicas"] >= needed


def test_kuberay_starts_enough_workers_for_the_minimum_replicas() -> None:
    config = load_config(config_args("rtx4090-cluster.yaml"))
    # on 4-card nodes: [2, 2] on one, the encoder (counted once per staged task) on another
    assert min_workers_for(config, 4) == 2
    assert min_workers_for(config, 8) == 1
    inline = config_args("rtx4090-cluster.yaml")
    inline["text_encoder"] = {"mode": "inline"}
    assert min_workers_for(load_config(inline), 4) == 1
    with pytest.raises(ValueError, match="a replica asks for 2 GPUs, more than gpus_per_node \\(1\\)"):
        min_workers_for(config, 1)
    manifest, _ = yaml.safe_load_all(render("configs/rtx4090-cluster.yaml", min_workers=3))
    assert manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] == 3
    with pytest.raises(ValueError, match="need 2 workers of 4 GPUs, more than max_workers \\(1\\)"):
        render("configs/rtx4090-cluster.yaml", max_workers=1)


def ray_containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def test_kuberay_runs_ray_with_the_token_of_a_secret_never_in_the_manifest() -> None:
    text = render("configs/rtx4090-cluster.yaml", name="imgs", auth_secret="imgs-token")
    manifest, _ = yaml.safe_load_all(text)
    cluster = manifest["spec"]["rayClusterConfig"]
    # the operator reads the same Secret for its own dashboard calls (it deploys serveConfigV2)
    assert cluster["authOptions"] == {"mode": "token", "secretName": "imgs-token"}
    assert cluster["rayVersion"] == RAY_VERSION
    for container in ray_containers(manifest):
        env = {variable["name"]: variable for variable in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert "value" not in env["RAY_AUTH_TOKEN"], container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "imgs-token", "key": "auth_token"}}
        assert "RAY_AUTH_TOKEN_PATH" not in env
    # no Secret (and so no token) among the documents, only the command that makes one
    assert "kind: Secret" not in text and "kubectl create secret generic imgs-token" in text
    default, _ = yaml.safe_load_all(render("configs/rtx4090-cluster.yaml"))
    assert default["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "imgserve-ray-token"


def test_kuberay_ray_version_is_the_pinned_one() -> None:
    pin = re.search(r'"ray\[serve\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin and pin.group(1) == RAY_VERSION
    assert tuple(int(part) for part in RAY_VERSION.split(".")) >= (2, 52)  # KubeRay's floor for authOptions


def admitted(policy: dict[str, Any], port: int, namespace: str, labels: dict[str, str]) -> bool:
    """Whether `policy` (applied in namespace "apps") lets a pod of `namespace` with `labels` reach
    `port` on the pods it selects (Kubernetes' NetworkPolicy semantics, for the selectors used)."""
    def matches(selector: dict[str, Any], have: dict[str, str]) -> bool:
        return all(have.get(key) == value for key, value in selector.get("matchLabels", {}).items())

    def peer(entry: dict[str, Any]) -> bool:
        in_namespace = (matches(entry["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
                        if "namespaceSelector" in entry else namespace == "apps")
        return in_namespace and matches(entry.get("podSelector", {}), labels)

    for rule in policy["spec"]["ingress"]:
        ports = [entry["port"] for entry in rule.get("ports", [])]
        if (not ports or port in ports) and ("from" not in rule or any(peer(entry) for entry in rule["from"])):
            return True
    return False


def test_kuberay_network_policy_admits_serve_from_anywhere_and_the_rest_from_few() -> None:
    manifest, policy = yaml.safe_load_all(render("configs/rtx4090-cluster.yaml", monitoring_namespace="observability"))
    cluster = manifest["spec"]["rayClusterConfig"]
    own = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        assert group["template"]["metadata"]["labels"] == own  # the policy covers every Ray pod
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        assert not group["template"]["spec"].get("hostNetwork")  # the pod's interfaces are private ones
    serve_port = yaml.safe_load(manifest["spec"]["serveConfigV2"])["http_options"]["port"]
    sources = {  # who connects: (namespace, pod labels)
        "client": ("elsewhere", {}),
        "prometheus": ("observability", {"app": "prometheus"}),
        "operator": ("default", {"app.kubernetes.io/name": "kuberay-operator"}),
        "neighbour": ("apps", {"app": "other"}),  # another workload in the same namespace
        "peer": ("apps", own),  # another Ray pod of this cluster
    }
    expected = {
        serve_port: set(sources),
        8080: {"prometheus", "peer"},  # metrics
        8265: {"operator", "peer"},    # dashboard and job API: the operator deploys serveConfigV2 through it
        6379: {"peer"},                # GCS
        10001: {"peer"},               # Ray client
        52365: {"peer"},               # dashboard agent
    }
    for port, allowed in expected.items():
        got = {name for name, (namespace, labels) in sources.items() if admitted(policy, port, namespace, labels)}
        assert got == allowed, port
    # the dashboard listens on the pod's own interfaces: its private address and loopback
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_kuberay_refuses_names_kubernetes_would_refuse() -> None:
    for option in ("monitoring_namespace", "operator_namespace", "auth_secret", "name"):
        with pytest.raises(ValueError, match=f"{option} must be a Kubernetes name.*'Bad Name'"):
            render("configs/rtx4090-cluster.yaml", **{option: "Bad Name"})


def test_kuberay_refuses_a_bad_config(tmp_path) -> None:
    document = yaml.safe_load((REPO / "configs" / "rtx4090-cluster.yaml").read_text())
    document["applications"][0]["args"]["real"]["serve"]["max_ongoing_requests"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        render(bad)


def test_onprem_launcher_runs_ray_with_a_token_from_outside_the_repository() -> None:
    launcher = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    starts = [command for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
              if "ray start" in command]
    assert len(starts) == 2
    token_paths = set()
    for command in starts:
        words = shlex.split(command)
        # the variables exported before `ray start`, which every process Ray starts inherits
        before = words[:next(index for index, word in enumerate(words) if word.endswith("/ray"))]
        exported = dict(word.rstrip(";").split("=", 1) for word in before if re.fullmatch(r"[A-Z_]+=\S+", word))
        assert "export" in before and exported.get("RAY_AUTH_MODE") == "token", command
        assert "RAY_AUTH_TOKEN" not in exported, command  # never the token itself
        token_paths.add(exported["RAY_AUTH_TOKEN_PATH"])
    [token_path] = token_paths
    assert token_path.startswith("$HOME/") and not token_path.startswith("/opt/imgserve")
    # the file reaches every node from the launching machine, from outside the repository
    mounted = {remote: local for remote, local in launcher["file_mounts"].items() if remote != "/opt/imgserve"}
    [(remote, local)] = mounted.items()
    assert remote.replace("~", "$HOME", 1) == token_path and local.startswith("~/")
    assert launcher["file_mounts"]["/opt/imgserve"] == "."
    # the dashboard and job API on the head's loopback only (`ray dashboard` forwards it over SSH)
    [head] = [command for command in starts if "--head" in command]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert all("--metrics-export-port=8080" in command for command in starts)


def test_onprem_launcher_keeps_gpu_work_off_the_head() -> None:
    launcher = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    head = " ".join(launcher["head_start_ray_commands"])
    workers = " ".join(launcher["worker_start_ray_commands"])
    assert "--num-gpus=0" in head and "imgserve_head" in head
    assert "rtx4090" in workers and "--head" not in workers
    assert any("scripts/setup.sh" in command for command in launcher["setup_commands"])
