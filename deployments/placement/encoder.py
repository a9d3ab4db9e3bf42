"""The TextEncoder stage's plan: the Qwen2.5-VL text encoder alone, on one card or on the CPU.

Contract: `plan_encoder(tasks, config, sizes, resolution)` places the text encoder that serves the
diffusion replicas of `tasks` (whose own plans leave it out: `plan(..., text_encoder="stage")`)
and returns an `EncoderPlan`: bf16 on its card when the weights plus the largest transient of
every phase it runs for those tasks fit the card (memory minus margin); else fp8 storage (bf16
compute by layerwise casting, which adds one layer's bf16 copy) when `allow_fp8`; else the CPU when
`allow_offload`; else `DoesNotFit` naming the numbers. `config=None` is the CPU plan. The stage
uses exactly one card: `config.gpus` other than 1 is a ValueError. The phases are those of
`activation.phase_transients` (`encode_prompt` for `real` with the condition image's vision
patches; `caption` and `encode_prompt` for `layers` at the resolution). Pure arithmetic on
`ComponentSize`s: it never loads weights, never touches a GPU, never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from deployments.placement.activation import phase_transients
from deployments.placement.config import BF16, FP8, GB, DoesNotFit, Dtype, PlacementConfig, Task
from deployments.placement.sizes import TASK_MODELS, ComponentSize, component_sizes

ENCODER_PHASES = ("encode_prompt", "caption")
"""The phases the stage runs (of those `phase_transients` names); the others stay on the diffusion
replicas."""
ENCODER_CARDS_GB = (16.0, 24.0, 32.0, 48.0, 80.0)
"""Single-card sizes tried, above the configured one, when looking for one that would fit."""


@dataclass(frozen=True)
class EncoderPlan:
    """Where the TextEncoder stage runs the text encoder, in what format, and its predicted peak."""

    tasks: tuple[Task, ...]
    """The tasks whose prompts (and `layers` captions) it encodes."""
    device: Literal["cuda", "cpu"]
    dtype: Dtype
    """`bfloat16`, or `float8_e4m3fn` storage computed in bf16 (layerwise casting)."""
    gpus: int
    """Cards it uses: 1 on `cuda`, 0 on `cpu`."""
    gpu_memory_gb: float | None
    """Memory of its card; None on the CPU."""
    margin_gb: float
    """Kept free below the card's memory (0 on the CPU)."""
    resolution: int
    """Longest pixel edge planned for (the `layers` caption sees the image at this size)."""
    weights_gb: float
    """Weights resident where it runs (host memory on the CPU)."""
    peak_gb: float
    """Predicted peak where it runs: weights + the largest phase transient (+ one layer's bf16
    copy with fp8 storage)."""
    peak_phase: str
    """`encode_prompt` or `caption`, with the task: e.g. `caption (layers)`."""
    transients_gb: tuple[tuple[str, float], ...]
    """Every phase it runs (`phase (task)`) and its transient, GB."""
    strategy: str

    @property
    def usable_gb(self) -> float | None:
        """What the card's peak may reach (memory minus margin); None on the CPU."""
        return None if self.gpu_memory_gb is None else self.gpu_memory_gb - self.margin_gb

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tasks"] = list(self.tasks)
        data["transients_gb"] = dict(self.transients_gb)
        data["usable_gb"] = self.usable_gb
        return data

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else f"1x{self.gpu_memory_gb:g} GB"
        lines = [
            f"text encoder stage: {', '.join(self.tasks)}, {self.resolution} px on {where}",
            f"strategy: {self.strategy}",
            "",
        ]
        if self.usable_gb is None:
            lines.append(f"{'device':<7} {'dtype':<14} {'weights GB':>10} {'peak GB':>8}  peak phase (host memory)")
            lines.append(f"{'cpu':<7} {self.dtype:<14} {self.weights_gb:>10.2f} {self.peak_gb:>8.2f}  {self.peak_phase}")
        else:
            lines.append(f"{'device':<7} {'dtype':<14} {'weights GB':>10} {'peak GB':>8} {'budget GB':>10} "
                         f"{'margin GB':>10} {'free GB':>8}  peak phase")
            lines.append(f"{'cuda':<7} {self.dtype:<14} {self.weights_gb:>10.2f} {self.peak_gb:>8.2f} "
                         f"{self.gpu_memory_gb:>10.1f} {self.margin_gb:>10.2f} {self.usable_gb - self.peak_gb:>8.2f}  "
                         f"{self.peak_phase}")
        return "\n".join(lines)


def _transients(tasks: tuple[Task, ...], config: PlacementConfig, sizes: dict[str, ComponentSize] | None
                ) -> tuple[ComponentSize, dict[str, float]]:
    """The text encoder's size and the transient bytes of every phase it runs, `phase (task)`."""
    found: dict[str, float] = {}
    size = None
    for task in tasks:
        task_sizes = sizes if sizes is not None else component_sizes(TASK_MODELS[task])
        size = task_sizes["text_encoder"]
        # tiling only changes the VAE phases, which the stage does not run
        phases = phase_transients(task, config, task_sizes, tiled=True)
        found.update({f"{phase} ({task})": phases[phase] for phase in ENCODER_PHASES if phase in phases})
    assert size is not None
    return size, found


def _place(tasks: tuple[Task, ...], config: PlacementConfig | None, te: ComponentSize,
           transients: dict[str, float], resolution: int, dtype: Dtype, device: Literal["cuda", "cpu"]
           ) -> EncoderPlan:
    phase, transient = max(transients.items(), key=lambda item: item[1])
    # the bf16 copy of one fp8-stored layer while it runs, as `search._layout` counts it
    extra = te.largest_layer_bytes if dtype == FP8 else 0
    weights = te.weight_bytes(dtype)
    if device == "cpu":
        strategy = "bf16 text encoder on CPU (TextEncoder stage; no card)"
    elif dtype == FP8:
        strategy = "fp8 text encoder (layerwise casting) on its own GPU (TextEncoder stage)"
    else:
        strategy = "bf16 text encoder on its own GPU (TextEncoder stage)"
    return EncoderPlan(
        tasks=tasks,
        device=device,
        dtype=dtype,
        gpus=1 if device == "cuda" else 0,
        gpu_memory_gb=config.gpu_memory_gb if device == "cuda" and config is not None else None,
        margin_gb=config.margin if device == "cuda" and config is not None else 0.0,
        resolution=resolution,
        weights_gb=round(weights / GB, 3),
        peak_gb=round((weights + transient + extra) / GB, 3),
        peak_phase=phase,
        transients_gb=tuple((name, round(value / GB, 3)) for name, value in transients.items()),
        strategy=strategy,
    )


def _fits(candidate: EncoderPlan) -> bool:
    return candidate.usable_gb is not None and candidate.peak_gb <= candidate.usable_gb + 1e-9


def _on_card(tasks: tuple[Task, ...], config: PlacementConfig, te: ComponentSize, transients: dict[str, float],
             resolution: int) -> EncoderPlan | None:
    """The best card plan on `config`'s card (bf16, then fp8 when allowed), or None."""
    for dtype in (BF16, FP8) if config.allow_fp8 else (BF16,):
        candidate = _place(tasks, config, te, transients, resolution, dtype, "cuda")
        if _fits(candidate):
            return candidate
    return None


def plan_encoder(tasks: Task | Iterable[Task], config: PlacementConfig | None,
                 sizes: dict[str, ComponentSize] | None = None, resolution: int | None = None) -> EncoderPlan:
    """The TextEncoder stage's plan for `tasks` on `config`'s one card (None: on the CPU).

    `sizes`: component sizes (as `component_sizes` returns them) used for every task; None → the
    published configs of each task's model (the same Qwen2.5-VL for both). `resolution`: the longest
    edge to plan for; None → `config.resolution` (1024 without a config). Raises ValueError for a
    config that is not one card, DoesNotFit when neither a card nor the CPU is allowed to hold it."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(dict.fromkeys(tasks))
    unknown = [task for task in tasks if task not in TASK_MODELS]
    if not tasks or unknown:
        raise ValueError(f"tasks must be some of {sorted(TASK_MODELS)}, got {list(tasks)}")
    if config is not None and config.gpus != 1:
        raise ValueError(f"text_encoder.placement.gpus must be 1 (the TextEncoder stage uses exactly one card), "
                         f"got {config.gpus}")
    if config is not None and config.compute != "bf16":
        raise ValueError("text_encoder.placement.compute must be bf16: the text encoder computes in bf16 "
                         "(allow_fp8 lets it store its weights in fp8)")
    budget = config if config is not None else PlacementConfig()
    if resolution is not None:
        budget = budget.model_copy(update={"resolution": resolution})
    te, transients = _transients(tasks, budget, sizes)
    if config is None:
        return _place(tasks, None, te, transients, budget.resolution, BF16, "cpu")
    found = _on_card(tasks, budget, te, transients, budget.resolution)
    if found is not None:
        return found
    if budget.allow_offload:
        return _place(tasks, budget, te, transients, budget.resolution, BF16, "cpu")
    raise _does_not_fit(tasks, budget, te, transients)


def _does_not_fit(tasks: tuple[Task, ...], config: PlacementConfig, te: ComponentSize,
                  transients: dict[str, float]) -> DoesNotFit:
    """Why nothing fits, with the smallest single card that would (same options, then with fp8)."""
    smallest = FP8 if config.allow_fp8 else BF16
    best = _place(tasks, config, te, transients, config.resolution, smallest, "cuda")
    alternatives: list[tuple[str, PlacementConfig]] = []
    variants = [("as configured", config.allow_fp8)] + ([("with fp8", True)] if not config.allow_fp8 else [])
    for label, fp8 in variants:
        for memory in ENCODER_CARDS_GB:
            candidate = config.model_copy(update={"gpu_memory_gb": memory, "allow_fp8": fp8})
            if memory > config.gpu_memory_gb and _on_card(tasks, candidate, te, transients, config.resolution):
                alternatives.append((f"1x{memory:g} GB {label}", candidate))
                break
    options = f"fp8 {'allowed' if config.allow_fp8 else 'off'}, offload off"
    reason = (
        f"the text encoder stage for {', '.join(tasks)} at {config.resolution} px does not fit 1x{config.gpu_memory_gb:g} "
        f"GB ({options}; {config.gpu_memory_gb - config.margin:.1f} GB usable after the {config.margin:.1f} GB margin): "
        f"the {smallest} text encoder is {best.weights_gb:.1f} GB of weights and peaks at {best.peak_gb:.1f} GB "
        f"in {best.peak_phase}; "
        + ("needs " + ", or ".join(text for text, _ in alternatives) + ", or allow_offload (CPU)"
           if alternatives else "needs allow_offload (CPU)")
    )
    return DoesNotFit(reason, alternatives[0][1] if alternatives else config.model_copy(update={"allow_offload": True}))
