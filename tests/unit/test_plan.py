"""`imgserve plan --config FILE --cluster NxMxGB`: whether a config's minimum GPU replicas fit a
cluster, through the real command line. The shipped configs fit the clusters their comments name
(and are refused on the ones their comments say they are refused on), `layers` in
configs/rtx4090.yaml gets a card of its own, a `min_replicas: 0` deployment that could never be
placed is refused, a replica's cards are all on one node, fractions of a card pack on one card,
and the search finds a placement where placing in order would not."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.cli import main
from serve_app.cluster_plan import Cluster, parse_cluster
from tests.conftest import REPO, demo_args

PLAN_LINE = re.compile(r"#\s+imgserve plan --config (configs/\S+\.yaml) --cluster (\S+)(.*)$")
"""A comment line of a shipped config giving the check of its cluster: `... # fits ...` or
`... # refused (exit 2): DeploymentName`."""


def plan(capsys: pytest.CaptureFixture[str], config: Path | str, cluster: str, *more: str) -> tuple[int, str, str]:
    """`imgserve plan --config config --cluster cluster`: exit status, stdout, stderr."""
    status = main(["plan", "--config", str(config), "--cluster", cluster, *more])
    out, err = capsys.readouterr()
    return status, out, err


def config_file(tmp_path: Path, args: dict[str, Any], name: str = "config.yaml") -> Path:
    """A Serve config file (the demo's, with `args`) to run the command on."""
    document = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    document["applications"][0]["args"] = args
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


def shipped_args(name: str) -> dict[str, Any]:
    document = yaml.safe_load((REPO / "configs" / name).read_text())
    return copy.deepcopy(document["applications"][0]["args"])


def with_gpus(args: dict[str, Any], section: str, gpus: float, replicas: int, **actor: Any) -> dict[str, Any]:
    """`args` with `replicas` replicas of `section` asking for `gpus` GPUs each (no placement)."""
    serve = args[section].setdefault("serve", {})
    serve["num_replicas"] = replicas
    serve["ray_actor_options"] = {"num_cpus": 0.25, "num_gpus": gpus, **actor}
    return args


# ---------------------------------------------------------------------------------------------
# the shipped configs, on the clusters their comments describe


@pytest.mark.parametrize("name", ["demo.yaml", "rtx4090.yaml", "rtx4090-cluster.yaml"])
def test_shipped_config_passes_for_the_cluster_its_comment_names(name: str, capsys) -> None:
    lines = [PLAN_LINE.search(line) for line in (REPO / "configs" / name).read_text().splitlines()
             if line.startswith("#")]
    checks = [match for match in lines if match is not None]
    assert checks, f"configs/{name} names no cluster it fits (`#   imgserve plan --config ... --cluster NxMxGB`)"
    assert {match.group(1) for match in checks} == {f"configs/{name}"}
    assert any("refused" not in match.group(3) for match in checks)
    for match in checks:
        status, out, err = plan(capsys, REPO / match.group(1), match.group(2))
        refused = re.search(r"refused \(exit 2\): (\w+)", match.group(3))
        if refused:
            assert status == 2 and out == "", err
            assert f"does not fit: {refused.group(1)} " in err
        else:
            assert status == 0 and err == "", err
            assert f"fits: the minimum replicas of every GPU deployment fit {match.group(2)}" in out \
                or "no deployment asks for a GPU" in out


def test_rtx4090_config_gives_layers_a_card_of_its_own_on_the_second_node(capsys) -> None:
    scaling = shipped_args("rtx4090.yaml")["layers"]["serve"]["autoscaling_config"]
    assert scaling["min_replicas"] >= 1  # never waits for the card `real` holds
    status, out, _ = plan(capsys, REPO / "configs" / "rtx4090.yaml", "2x1x24")
    assert status == 0
    assert "node 1: card 0: RealModel#1" in out and "node 2: card 0: LayersModel#1" in out
    assert "room left: 0 of 2 cards free" in out
    # a third node is where they scale
    status, out, _ = plan(capsys, REPO / "configs" / "rtx4090.yaml", "3x1x24")
    assert status == 0 and "node 3: card 0: free" in out
    assert "RealModel: 1 more replica(s) would fit" in out and "LayersModel: 1 more replica(s) would fit" in out
    # one node cannot hold both: refused, naming layers, what it needs and the cards left
    status, out, err = plan(capsys, REPO / "configs" / "rtx4090.yaml", "1x1x24")
    assert status == 2 and out == ""
    assert ("does not fit: LayersModel keeps 1 replica(s) up, each needing 1 card of 24 GB; the cards left by "
            "the deployments before it (0 of 1 cards free) hold 0") in err


def test_a_min_replicas_0_deployment_that_could_never_be_placed_is_refused(tmp_path, capsys) -> None:
    args = shipped_args("rtx4090.yaml")  # as it was: layers scaling from zero next to real on one card
    args["layers"]["serve"]["autoscaling_config"].update(min_replicas=0, initial_replicas=0)
    path = config_file(tmp_path, args)
    status, out, err = plan(capsys, path, "1x1x24")
    assert status == 2 and out == ""
    assert "does not fit: LayersModel has min_replicas 0, and its one replica (1 card of 24 GB) cannot be placed" in err
    assert "could never start" in err and "node 1: card 0: RealModel#1" in err
    # with a second node its replica has a card to start on
    status, out, _ = plan(capsys, path, "2x1x24")
    assert status == 0 and "node 2: card 0: free" in out and "LayersModel: 1 more replica(s) would fit" in out


# ---------------------------------------------------------------------------------------------
# refusals name the deployment and why


def test_cluster_config_on_one_node_is_refused_naming_the_encoder(capsys) -> None:
    status, out, err = plan(capsys, REPO / "configs" / "rtx4090-cluster.yaml", "1x4x24")
    assert status == 2 and out == ""
    assert "node 1: cards 0-1: RealModel#1, cards 2-3: LayersModel#1" in err
    assert "does not fit: TextEncoder_real keeps 1 replica(s) up, each needing 1 card of 24 GB" in err
    # 2 cards per replica on one node: nodes of one card never hold one, however many
    status, _, err = plan(capsys, REPO / "configs" / "rtx4090-cluster.yaml", "8x1x24")
    assert status == 2
    assert "RealModel needs 2 cards of 24 GB on one node; the cluster's nodes have 1 card(s) each" in err
    assert "LayersModel needs 2 cards of 24 GB on one node" in err


def test_cards_smaller_than_the_placement_was_planned_for_are_refused(capsys) -> None:
    status, _, err = plan(capsys, REPO / "configs" / "rtx4090.yaml", "4x1x16")
    assert status == 2
    assert "RealModel needs 1 card of 24 GB (its placement's gpu_memory_gb); the cluster's cards have 16 GB" in err
    # larger cards hold what was planned for 24 GB
    assert plan(capsys, REPO / "configs" / "rtx4090.yaml", "2x1x80")[0] == 0


def test_a_gpu_replica_pinned_to_the_cpu_only_head_is_refused(tmp_path, capsys) -> None:
    args = with_gpus(demo_args(), "anime", 1, 1, resources={"imgserve_head": 0.01})
    status, _, err = plan(capsys, config_file(tmp_path, args), "4x4x24")
    assert status == 2
    assert "AnimeModel asks for imgserve_head (the CPU-only head) and 1 GPU(s): the head has no cards" in err


# ---------------------------------------------------------------------------------------------
# how replicas are placed


def test_fractional_replicas_pack_on_one_card_and_whole_cards_need_free_ones(tmp_path, capsys) -> None:
    args = with_gpus(demo_args(), "real", 0.5, 2)
    status, out, _ = plan(capsys, config_file(tmp_path, args), "1x1x24")
    assert status == 0 and "node 1: card 0: RealModel#1 + RealModel#2" in out
    # three halves need two cards
    args = with_gpus(demo_args(), "real", 0.5, 3)
    status, out, err = plan(capsys, config_file(tmp_path, args), "1x1x24")
    assert status == 2 and "RealModel keeps 3 replica(s) up, each needing 0.5 of a card" in err and "hold 2" in err
    # a whole-card replica cannot use the half a card that is left
    args = with_gpus(with_gpus(demo_args(), "real", 0.5, 1), "layers", 1, 2)
    status, _, err = plan(capsys, config_file(tmp_path, args), "1x2x24")
    assert status == 2 and "LayersModel keeps 2 replica(s) up, each needing 1 card;" in err
    assert "(1 of 2 cards free, 1 partly used) hold 1" in err


def test_a_placement_is_found_where_placing_in_order_would_fail(tmp_path, capsys) -> None:
    # two 1-card replicas first on node 1 would leave no node with 2 free cards for the second
    # 2-card replica; one of each per node fits
    args = with_gpus(with_gpus(demo_args(), "real", 1, 2), "layers", 2, 2)
    status, out, _ = plan(capsys, config_file(tmp_path, args), "2x3x24")
    assert status == 0, out
    for node in (1, 2):
        line = next(line for line in out.splitlines() if line.startswith(f"  node {node}:"))
        assert line.count("RealModel#") == 1 and line.count("LayersModel#") == 1


def test_custom_resources_count_once_per_card(tmp_path, capsys) -> None:
    # a replica asking for 2 `rtx4090` but 1 GPU takes two of the node's two units
    args = with_gpus(demo_args(), "real", 1, 2, resources={"rtx4090": 2})
    status, _, err = plan(capsys, config_file(tmp_path, args), "1x2x24")
    assert status == 2 and "RealModel keeps 2 replica(s) up" in err and "hold 1" in err
    assert plan(capsys, config_file(tmp_path, args), "2x2x24")[0] == 0


def test_initial_replicas_above_the_minimum_are_placed_at_the_start(tmp_path, capsys) -> None:
    args = demo_args()
    args["real"]["serve"] = {"num_replicas": None, "ray_actor_options": {"num_cpus": 0.25, "num_gpus": 1},
                             "autoscaling_config": {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 3}}
    status, _, err = plan(capsys, config_file(tmp_path, args), "1x1x24")
    assert status == 2 and "RealModel keeps 2 replica(s) up" in err


def test_json_output(capsys) -> None:
    status, out, _ = plan(capsys, REPO / "configs" / "rtx4090-cluster.yaml", "2x4x24", "--json")
    assert status == 0
    data = json.loads(out)
    assert data["fits"] is True and data["problems"] == []
    assert data["cluster"] == {"nodes": 2, "cards_per_node": 4, "card_gb": 24.0}
    real = next(d for d in data["deployments"] if d["name"] == "RealModel")
    assert real["gpus"] == 2 and real["min_replicas"] == 1 and real["max_replicas"] == 8 and real["card_gb"] == 24
    held = [name for node in data["nodes"] for card in node["cards"] for name in card["replicas"]]
    assert held.count("RealModel#1") == 2 and held.count("TextEncoder_real#1") == 1
    assert sum(card["free"] for node in data["nodes"] for card in node["cards"]) == 2
    status, out, err = plan(capsys, REPO / "configs" / "rtx4090-cluster.yaml", "1x4x24", "--json")
    assert status == 2 and json.loads(out)["fits"] is False and "TextEncoder_real" in err


# ---------------------------------------------------------------------------------------------
# the command line


def test_cluster_shapes() -> None:
    assert parse_cluster("4x1x24") == Cluster(4, 1, 24.0)
    assert parse_cluster(" 2 × 4 × 23.5GB ") == Cluster(2, 4, 23.5)
    assert parse_cluster("1x0x0") == Cluster(1, 0, 0.0)
    for bad in ("4x24", "0x1x24", "1x1x0", "1x0x24", "axbxc", ""):
        with pytest.raises(ValueError, match="NODESxCARDSxGB"):
            parse_cluster(bad)


def test_usage_errors(tmp_path, capsys) -> None:
    assert main(["plan", "--config", str(REPO / "configs" / "rtx4090.yaml")]) == 2
    assert "takes both" in capsys.readouterr().err
    assert main(["plan", "--config", str(REPO / "configs" / "rtx4090.yaml"), "--cluster", "2x1x24",
                 "--task", "real"]) == 2
    assert "neither --task nor --gpus" in capsys.readouterr().err
    assert main(["plan"]) == 2
    assert "--task and --gpus" in capsys.readouterr().err
    status, _, err = plan(capsys, REPO / "configs" / "rtx4090.yaml", "2x24")
    assert status == 1 and "got '2x24'" in err
    status, _, err = plan(capsys, tmp_path / "missing.yaml", "1x1x24")
    assert status == 1 and "missing.yaml" in err
    args = demo_args()
    args["real"]["serve"] = {"max_ongoing_requests": 0}
    status, _, err = plan(capsys, config_file(tmp_path, args), "1x1x24")
    assert status == 1 and "real.serve.max_ongoing_requests" in err
    args = with_gpus(demo_args(), "real", 1.5, 1)
    status, _, err = plan(capsys, config_file(tmp_path, args), "1x2x24")
    assert status == 1 and "RealModel: num_gpus 1.5 is refused by Ray" in err


def test_a_search_that_gives_up_refuses_rather_than_guesses(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("serve_app.cluster_plan.SEARCH_STEPS", 1)
    args = with_gpus(demo_args(), "real", 0.5, 3)
    status, _, err = plan(capsys, config_file(tmp_path, args), "2x2x24")
    assert status == 2 and "RealModel keeps 3 replica(s) up: no placement found or ruled out in 1 tries" in err
