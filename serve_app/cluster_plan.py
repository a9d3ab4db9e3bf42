"""Whether a config's GPU deployments can run on a cluster: `imgserve plan --config FILE --cluster NxMxGB`.

Contract: `gpu_deployments(config)` lists every deployment the builder (`serve_app.app`) would make
that asks Ray for GPUs, with the GPUs, custom resources and card size (its `placement`'s
`gpu_memory_gb`) of one replica, taken from the same `serve_options()` / `stage_options()` the
builder hands to Serve, and the replicas it keeps up (`min_replicas`, or `initial_replicas` where
larger; `num_replicas` when fixed). `plan_cluster(config, cluster)` places those minimum replicas on
`cluster` (N GPU nodes of M cards of G GB; the head, CPU only, is not one of them) and returns a
`ClusterPlan`: where every replica went, the cards left, how many more replicas of each deployment
would fit on them, and the `problems` that make the config unable to run there:

- a deployment whose minimum replicas do not fit what the deployments before it left (named, with
  the cards one replica needs and the cards left);
- a deployment with `min_replicas: 0` whose one replica cannot be placed once every other
  deployment holds its minimum: it could never start, so its requests would wait until they time
  out. This is refused like the first kind, not warned about: such a config serves a task that
  never answers.

Rules, as Ray applies them: a replica's GPUs are all on one node (an actor's GPUs, or its one
STRICT_PACK bundle); a whole-card request takes free cards only; fractional `num_gpus` replicas
share a card up to 1; a custom resource such as `rtx4090` is assumed to be advertised by every GPU
node once per card (as `cluster/onprem.yaml` and `cluster/local.sh` start them); a replica pinned to
`imgserve_head` cannot get a card. A replica whose `placement` was planned for cards of G GB needs
cards of at least G GB. The search is exact (every distinct placement is tried), so "does not fit"
means no placement exists; Ray's scheduler places replicas one at a time and may fragment a cluster
that fits only tightly. With the text encoder stage and several staged tasks, one TextEncoder per
task is counted: the builder shares one only where their encoder files are the same bytes, which
this check (no model files read) cannot know. CPUs and host memory are not checked. Pure: no Ray,
no model files, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import BaseAppConfig

HEAD_RESOURCE = "imgserve_head"
"""The custom resource only the CPU-only head advertises (cluster/onprem.yaml, cluster/local.sh, KubeRay)."""
UNITS = 10_000
"""Units per card: Ray accounts fractional resources in steps of 0.0001."""


@dataclass(frozen=True)
class Cluster:
    """The GPU nodes: `nodes` × `cards` per node × `card_gb` per card."""

    nodes: int
    cards: int
    card_gb: float

    @property
    def shape(self) -> str:
        return f"{self.nodes}x{self.cards}x{self.card_gb:g}"


def parse_cluster(text: str) -> Cluster:
    """`"4x1x24"` → Cluster(4, 1, 24.0); `"1x0x0"`: one node without a card. ValueError naming the text."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+(?:\.\d+)?)\s*(?:GB|gb)?\s*", text or "")
    if not match or int(match.group(1)) < 1 or (int(match.group(2)) > 0) != (float(match.group(3)) > 0):
        raise ValueError(f"--cluster must look like NODESxCARDSxGB (e.g. 4x1x24; 1x0x0: no card), got {text!r}")
    return Cluster(int(match.group(1)), int(match.group(2)), float(match.group(3)))


@dataclass(frozen=True)
class GpuDeployment:
    """One deployment that asks for GPUs, as the builder would deploy it."""

    name: str
    """Its Serve deployment name."""
    gpus: float
    """GPUs one replica asks for."""
    card_gb: float | None
    """The card size its `placement` was planned for; None: no placement (any card)."""
    resources: dict[str, float]
    """Custom resources one replica asks for."""
    minimum: int
    """Replicas it keeps up (at the start: `initial_replicas` where larger than `min_replicas`)."""
    maximum: int
    """Replicas it may scale to."""

    @property
    def units(self) -> int:
        return round(self.gpus * UNITS)

    def need(self) -> str:
        """`1 card of 24 GB` / `0.5 of a card`: what one replica needs."""
        size = f" of {self.card_gb:g} GB" if self.card_gb is not None else ""
        if self.gpus < 1:
            return f"{self.gpus:g} of a card{size}"
        return f"1 card{size}" if self.gpus == 1 else f"{self.gpus:g} cards{size} on one node"


def _replicas(options: dict[str, Any]) -> tuple[int, int]:
    scaling = options.get("autoscaling_config")
    if not scaling:
        return options.get("num_replicas") or 1, options.get("num_replicas") or 1
    minimum = scaling.get("min_replicas", 1)  # Ray Serve's defaults: min 1, max 1
    return max(minimum, scaling.get("initial_replicas") or 0), max(minimum, scaling.get("max_replicas", 1))


def gpu_deployments(config: BaseAppConfig) -> list[GpuDeployment]:
    """The deployments of `config` that ask for GPUs, models first (registry order), then the
    TextEncoder stage (one per staged task: the larger count), then any other."""
    sections: list[tuple[str, dict[str, Any], Any]] = []
    for task in config.tasks:
        section = config.section(task.name)
        sections.append((task.deployment, section.serve_options(), getattr(section, "placement", None)))
    staged = config.staged()
    for task in staged:
        name = "TextEncoder" if len(staged) == 1 else f"TextEncoder_{task}"
        sections.append((name, config.text_encoder.stage_options((task,)), config.text_encoder.placement))
    for name, section in (("Ingress", config.ingress), ("Preprocess", config.preprocess),
                          ("Postprocess", config.postprocess), ("JobRunner", config.jobs)):
        sections.append((name, section.serve.serve_options(), None))
    found = []
    for name, options, placement in sections:
        actor = options["ray_actor_options"]
        gpus = float(actor.get("num_gpus", 0))
        if gpus <= 0:
            continue
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"{name}: num_gpus {gpus:g} is refused by Ray (above 1 it must be a whole number)")
        minimum, maximum = _replicas(options)
        found.append(GpuDeployment(name, gpus, placement.gpu_memory_gb if placement is not None else None,
                                   dict(actor.get("resources") or {}), minimum, maximum))
    return found


@dataclass
class _Node:
    free: list[int]
    """Free units of each card."""
    resources: dict[str, float]
    """Free amount of each card resource."""
    held: list[list[str]]
    """The replicas on each card."""

    def key(self) -> tuple[Any, ...]:
        return tuple(sorted(self.free)), tuple(sorted(self.resources.items()))

    def options(self, deployment: GpuDeployment) -> list[list[int]]:
        """The distinct card choices on this node for one replica (none: it does not fit here)."""
        if any(self.resources.get(name, 0) < amount - 1e-9 for name, amount in deployment.resources.items()):
            return []
        units = deployment.units
        if units >= UNITS:
            whole = [card for card, free in enumerate(self.free) if free == UNITS]
            return [whole[:units // UNITS]] if len(whole) >= units // UNITS else []
        choices: dict[int, int] = {}  # tightest card first: packs fractions together
        for card, free in sorted(enumerate(self.free), key=lambda pair: pair[1]):
            if free >= units:
                choices.setdefault(free, card)
        return [[card] for card in choices.values()]

    def take(self, deployment: GpuDeployment, cards: list[int], label: str) -> _Node:
        units = min(deployment.units, UNITS)
        free = [value - units if card in cards else value for card, value in enumerate(self.free)]
        resources = {name: value - deployment.resources.get(name, 0) for name, value in self.resources.items()}
        held = [list(names) + ([label] if card in cards else []) for card, names in enumerate(self.held)]
        return _Node(free, resources, held)


class Undecided(ValueError):
    """The search gave up (more than SEARCH_STEPS tries) without finding a placement or ruling it out."""


SEARCH_STEPS = 200_000
"""Most placement attempts one search makes; configs of a few dozen replicas need far fewer."""


def _search(nodes: list[_Node], replicas: list[tuple[GpuDeployment, str]]) -> list[_Node] | None:
    """The nodes with every replica placed, or None when no placement exists (exact: depth first over
    the distinct node and card choices, largest replicas first, failed states remembered); Undecided
    past SEARCH_STEPS."""
    if sum(d.units for d, _ in replicas) > sum(sum(node.free) for node in nodes):
        return None  # more than all the cards together
    replicas = sorted(replicas, key=lambda replica: -replica[0].units)  # stable: each deployment's in order
    failed: set[tuple[int, tuple[Any, ...]]] = set()
    steps = 0

    def place(index: int, state: list[_Node]) -> list[_Node] | None:
        nonlocal steps
        if index == len(replicas):
            return state
        key = (index, tuple(sorted(node.key() for node in state)))
        if key in failed:
            return None
        steps += 1
        if steps > SEARCH_STEPS:
            raise Undecided(f"no placement found or ruled out in {SEARCH_STEPS} tries")
        deployment, label = replicas[index]
        tried = set()
        for at, node in enumerate(state):
            if node.key() in tried:
                continue  # a node like one already tried: the same outcome
            tried.add(node.key())
            for cards in node.options(deployment):
                done = place(index + 1, [*state[:at], node.take(deployment, cards, label), *state[at + 1:]])
                if done is not None:
                    return done
        failed.add(key)
        return None

    return place(0, nodes)


@dataclass
class ClusterPlan:
    """Where the minimum replicas go on `cluster`, and what stops the config from running there."""

    cluster: Cluster
    deployments: list[GpuDeployment]
    nodes: list[_Node]
    """The placement found for every deployment that fits (a refused one's replicas are absent)."""
    problems: list[str] = field(default_factory=list)
    """Why the config cannot run on `cluster`, one line per deployment; empty: it fits."""
    room: dict[str, int] = field(default_factory=dict)
    """Deployment → more replicas that would fit on the cards left (alone, up to its maximum)."""

    @property
    def fits(self) -> bool:
        return not self.problems

    def cards_left(self) -> str:
        free = [sum(value == UNITS for value in node.free) for node in self.nodes]
        shared = sum(0 < value < UNITS for node in self.nodes for value in node.free)
        text = f"{sum(free)} of {self.cluster.nodes * self.cluster.cards} cards free"
        if len(free) > 1:
            text += " (" + ", ".join(f"node {index + 1}: {count}" for index, count in enumerate(free)) + ")"
        return text + (f", {shared} partly used" if shared else "")

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": {"nodes": self.cluster.nodes, "cards_per_node": self.cluster.cards,
                            "card_gb": self.cluster.card_gb},
                "fits": self.fits, "problems": self.problems,
                "deployments": [{"name": d.name, "gpus": d.gpus, "card_gb": d.card_gb, "resources": d.resources,
                                 "min_replicas": d.minimum, "max_replicas": d.maximum,
                                 "more_replicas_fit": self.room.get(d.name, 0)} for d in self.deployments],
                "nodes": [{"node": index + 1,
                           "cards": [{"card": card, "free": free / UNITS, "replicas": held}
                                     for card, (free, held) in enumerate(zip(node.free, node.held))]}
                          for index, node in enumerate(self.nodes)]}

    def describe(self) -> str:
        cluster = self.cluster
        lines = [f"cluster {cluster.shape}: {cluster.nodes} GPU node(s) x {cluster.cards} card(s) of "
                 f"{cluster.card_gb:g} GB (the head, CPU only, is not counted)"]
        if not self.deployments:
            return "\n".join([*lines, "no deployment asks for a GPU: nothing to place; fits"])
        lines.append("GPU deployments (per replica; replicas kept up .. most):")
        lines += [f"  {d.name:<20} {d.need():<32} {d.minimum} .. {d.maximum}" for d in self.deployments]
        if any(d.name.startswith("TextEncoder_") for d in self.deployments):
            lines.append("  (a TextEncoder per staged task: the builder makes one for all only where their encoder "
                         "files are the same bytes, which this check does not read; then a card less)")
        lines.append("placement of the minimum replicas:")
        lines += [f"  node {index + 1}: {_cards_text(node)}" for index, node in enumerate(self.nodes)]
        lines.append(f"room left: {self.cards_left()}")
        for d in self.deployments:
            if d.name in self.room and d.maximum > d.minimum:
                lines.append(f"  {d.name}: {self.room[d.name]} more replica(s) would fit, of the "
                             f"{d.maximum - d.minimum} it may scale up by")
        lines += [f"does not fit: {problem}" for problem in self.problems] or [
            f"fits: the minimum replicas of every GPU deployment fit {cluster.shape}"]
        return "\n".join(lines)


def _cards_text(node: _Node) -> str:
    """`cards 0-1: RealModel#1, card 2: free`: runs of cards with the same replicas."""
    runs: list[tuple[int, int, list[str]]] = []
    for card, held in enumerate(node.held):
        if runs and runs[-1][2] == held and held:
            runs[-1] = (runs[-1][0], card, held)
        else:
            runs.append((card, card, held))
    return ", ".join((f"card {first}" if first == last else f"cards {first}-{last}") + f": {' + '.join(held) or 'free'}"
                     for first, last, held in runs) or "no cards"


def _first_problem(deployment: GpuDeployment, cluster: Cluster) -> str | None:
    """Why no replica of `deployment` fits any node of `cluster`, whatever else runs (None: one may)."""
    if deployment.resources.get(HEAD_RESOURCE):
        return (f"{deployment.name} asks for {HEAD_RESOURCE} (the CPU-only head) and {deployment.gpus:g} GPU(s): "
                "the head has no cards")
    if deployment.card_gb is not None and cluster.card_gb < deployment.card_gb:
        return (f"{deployment.name} needs {deployment.need()} (its placement's gpu_memory_gb); "
                f"the cluster's cards have {cluster.card_gb:g} GB")
    if deployment.gpus > cluster.cards:
        return f"{deployment.name} needs {deployment.need()}; the cluster's nodes have {cluster.cards} card(s) each"
    return None


def plan_cluster(config: BaseAppConfig, cluster: Cluster) -> ClusterPlan:
    """Place `config`'s minimum GPU replicas on `cluster`, deployment by deployment (see the module)."""
    deployments = gpu_deployments(config)
    names = sorted({name for d in deployments for name in d.resources if name != HEAD_RESOURCE})
    empty = _Node([UNITS] * cluster.cards, dict.fromkeys(names, float(cluster.cards)),
                  [[] for _ in range(cluster.cards)])
    plan = ClusterPlan(cluster, deployments, [empty] * cluster.nodes)
    placed: list[tuple[GpuDeployment, str]] = []
    refused: set[str] = set()
    for deployment in deployments:
        problem = _first_problem(deployment, cluster)
        if problem is None and deployment.minimum:
            labels = [(deployment, f"{deployment.name}#{n + 1}") for n in range(deployment.minimum)]
            try:
                nodes = _search([empty] * cluster.nodes, placed + labels)
                if nodes is None:
                    fit = max(count for count in range(deployment.minimum)
                              if _search([empty] * cluster.nodes, placed + labels[:count]) is not None)
                    problem = (f"{deployment.name} keeps {deployment.minimum} replica(s) up, each needing "
                               f"{deployment.need()}; the cards left by the deployments before it "
                               f"({plan.cards_left()}) hold {fit}")
                else:
                    placed += labels
                    plan.nodes = nodes
            except Undecided as error:  # refused: a config this check cannot vouch for
                problem = f"{deployment.name} keeps {deployment.minimum} replica(s) up: {error}"
        if problem is not None:
            plan.problems.append(problem)
            refused.add(deployment.name)
    for deployment in deployments:
        if deployment.name in refused:
            continue
        plan.room[deployment.name] = _more(plan.nodes, deployment)
        if deployment.minimum == 0 and deployment.maximum > 0 and plan.room[deployment.name] == 0:
            plan.problems.append(
                f"{deployment.name} has min_replicas 0, and its one replica ({deployment.need()}) cannot be "
                f"placed once the others hold their minimum ({plan.cards_left()}): it could never start, so "
                "its requests would wait until they time out; give it a card (more nodes, or fewer replicas "
                "kept up by the others)")
    return plan


def _more(nodes: list[_Node], deployment: GpuDeployment) -> int:
    """More replicas of `deployment` that fit on `nodes` (alone, up to its maximum): first fit, which
    for identical replicas places as many as any order would."""
    count = 0
    while count < deployment.maximum - deployment.minimum:
        for at, node in enumerate(nodes):
            choices = node.options(deployment)
            if choices:
                nodes = [*nodes[:at], node.take(deployment, choices[0], "more"), *nodes[at + 1:]]
                break
        else:
            break
        count += 1
    return count
