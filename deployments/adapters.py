"""The LoRA adapters resident on one pipeline: pinned speed adapters and an LRU of versions, stacked.

Speed adapters (step-distilled, one per preset) are read once when the replica starts and never
evicted; a file that does not fit the base is refused then, naming it (`AdapterDoesNotFit`), so a
bad file is a start-up error, not a 422 on every request. Versions are made resident on demand,
the least recently used evicted beyond `max_versions`; a version that does not fit is the
request's 422 and leaves the model exactly as it was. `activate([(adapter, weight), ...])` makes
exactly those adapters active with those weights (diffusers `set_adapters`), or none. Every file
is checked against the base's Linear shapes (taken before any adapter wraps a layer) and converted
by the project's own inspector (`deployments.lora`). The base is never reloaded.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from deployments import metrics
from deployments.errors import InvalidParameter
from deployments.lora import NONE, LoraReport, LoraStore, diffusers_state_dict, inspect_lora, linear_shapes

SPEED_PREFIX = "speed:"
"""Adapter names of speed adapters start with this; `:` never appears in a version's name."""
VERSION_SLOT = "version:slot"
"""With hot swapping (a compiled transformer), the one adapter every version is swapped into."""


class AdapterDoesNotFit(ValueError):
    """A configured speed adapter's file cannot be loaded into this base (a start-up error)."""


class Adapters:
    """The adapters of one pipeline's transformer."""

    def __init__(self, pipe: Any, store: LoraStore | None, max_versions: int, hotswap_rank: int | None = None) -> None:
        self.pipe = pipe
        self.store = store
        self.max_versions = max_versions
        self.hotswap_rank = hotswap_rank
        """With a rank: versions share one adapter (`VERSION_SLOT`) sized for that rank, whose weights
        are swapped in place, so a compiled transformer keeps its graph; `max_versions` is then 1."""
        self.shapes = linear_shapes(pipe.transformer)
        """The base's Linear shapes, before any adapter wraps a layer."""
        self.speed: dict[str, str] = {}
        """Preset name → the adapter name of its pinned speed adapter."""
        self.versions: OrderedDict[str, None] = OrderedDict()
        """Resident versions, least recently used first."""
        self.loads: Counter[str] = Counter()
        """Adapter name → how many times it was read from disk into this pipeline."""
        self.keep: str | None = None
        """A resident version never evicted while another can be (the default, while its file is
        unusable: the resident copy is the only one left)."""

    # -- loading -------------------------------------------------------------------------------
    def pin_speed(self, preset: str, path: Path) -> None:
        """Read the speed adapter of `preset` now and keep it for the replica's life."""
        name = SPEED_PREFIX + preset
        report = inspect_lora(path, self.shapes)
        problems = report.problems + self._rank_problems(report)
        if problems:
            raise AdapterDoesNotFit(f"speed adapter {preset!r} ({path}) does not fit the base model: "
                                    f"{'; '.join(problems)}")
        try:
            self._read(name, path, report)
        except ValueError as exc:
            raise AdapterDoesNotFit(f"speed adapter {preset!r} ({path}) could not be loaded: {exc}"[:500]) from None
        self.loads[name] += 1
        self.speed[preset] = name

    def problems(self, path: Path) -> list[str]:
        """Why the file at `path` cannot be a version of this base ([]: it can): the store's check."""
        report = inspect_lora(path, self.shapes)
        return report.problems + self._rank_problems(report)

    def ensure_version(self, version: str) -> bool:
        """Make `version` resident (LRU beyond `max_versions`); True when it was read from disk now.

        The file is checked against the base before anything is touched: on any failure the model
        is exactly as before and the request gets InvalidParameter naming the problem.
        """
        if version in self.versions:
            self.versions.move_to_end(version)
            return False
        if self.store is None:
            raise InvalidParameter(f"no LoRA directory is configured; only {NONE!r} is available", "lora")
        path = self.store.path(version)
        report = inspect_lora(path, self.shapes)
        problems = report.problems + self._rank_problems(report)
        if problems:
            raise InvalidParameter(f"LoRA {version!r} does not fit the base model: {'; '.join(problems)}", "lora")
        swap = self.hotswap_rank is not None and bool(self.versions)  # the slot exists: its weights are replaced in place
        while len(self.versions) >= self.max_versions:
            evicted = next((name for name in self.versions if name != self.keep), next(iter(self.versions)))
            del self.versions[evicted]
            if not swap:
                self.pipe.delete_adapters([evicted])
            metrics.lora_events.inc(tags={"event": "evict", "version": evicted})
        try:
            self._read(self.adapter_name(version), path, report, swap)
        except ValueError as exc:
            raise InvalidParameter(f"LoRA {version!r} could not be loaded: {exc}"[:500], "lora") from None
        self.versions[version] = None
        self.loads[version] += 1
        metrics.lora_events.inc(tags={"event": "load", "version": version})
        return True

    def _rank_problems(self, report: LoraReport) -> list[str]:
        if self.hotswap_rank is not None and report.ranks and max(report.ranks) > self.hotswap_rank:
            return [f"rank {max(report.ranks)} is above the compiled replica's real.compile_max_rank "
                    f"({self.hotswap_rank})"]
        return []

    def adapter_name(self, version: str) -> str:
        """The adapter a resident version is loaded as."""
        return VERSION_SLOT if self.hotswap_rank is not None else version

    def _read(self, name: str, path: Path, report: LoraReport, swap: bool = False) -> None:
        """Load one checked file under `name` (`swap`: into that existing adapter, in place); on
        failure nothing of it stays (ValueError)."""
        try:
            self.pipe.load_lora_weights(diffusers_state_dict(path, report), adapter_name=name, hotswap=swap)
            if name not in self.pipe.get_list_adapters().get("transformer", []):
                raise ValueError("no weights matched the transformer")
        except Exception as exc:
            if name in self.pipe.get_list_adapters().get("transformer", []):
                self.pipe.delete_adapters([name])
            raise ValueError(str(exc)) from None

    # -- a request's stack -----------------------------------------------------------------------
    def stack(self, preset: str, version: str, version_weight: float, speed_weight: float) -> list[tuple[str, float]]:
        """The adapters a request runs with, in order: its preset's speed adapter (none for a preset
        without one), then its version (none for `none`), each with its weight."""
        stack = []
        if preset in self.speed:
            stack.append((self.speed[preset], speed_weight))
        if version != NONE:
            stack.append((version, version_weight))
        return stack

    def activate(self, stack: list[tuple[str, float]]) -> None:
        """Exactly these adapters active, with these weights; the base alone for an empty stack."""
        for name, _ in stack:
            if not name.startswith(SPEED_PREFIX):
                self.ensure_version(name)
        if not stack:
            if self.speed or self.versions:
                self.pipe.disable_lora()
            return
        names = [name if name.startswith(SPEED_PREFIX) else self.adapter_name(name) for name, _ in stack]
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[weight for _, weight in stack])

    def version_loads(self) -> int:
        """How many times versions were read from disk into this pipeline, in all."""
        return sum(count for name, count in self.loads.items() if not name.startswith(SPEED_PREFIX))

    def stats(self) -> dict[str, Any]:
        """Speed adapters (preset → reads from disk: 1 for the replica's life), resident versions
        (least recently used first) and how often each version was read."""
        return {"speed_adapters": {preset: self.loads[name] for preset, name in self.speed.items()},
                "adapters": list(self.versions),
                "adapter_loads": {name: count for name, count in self.loads.items() if not name.startswith(SPEED_PREFIX)}}


def stack_text(stack: list[tuple[str, float]]) -> str:
    """`name:weight,name:weight` (speed adapters by their preset's name); `none` for the base alone."""
    return ",".join(f"{name.removeprefix(SPEED_PREFIX)}:{weight:g}" for name, weight in stack) or NONE
