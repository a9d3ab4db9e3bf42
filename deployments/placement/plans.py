"""What the planner returns: the placement of one diffusion replica's pipeline.

Contract: `ComponentPlan` (where one component lives and in what form) and `Plan` (every
component, the VAE switches, the predicted peak of each GPU, `describe()` and `to_dict()`), frozen
dataclasses; `strategy_text` is the one-line summary a plan carries. Data only: it plans nothing,
never imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from deployments.placement.config import FP8, Dtype, Offload, Task, TextEncoderMode
from deployments.placement.sizes import COMPONENTS


@dataclass(frozen=True)
class ComponentPlan:
    """Where one component lives and in what form."""

    gpus: tuple[int, ...]
    """GPU indices (within the replica) holding it; empty: it runs on the CPU (or, offload
    `stage`, outside the replica)."""
    dtype: Dtype
    offload: Offload
    """`none`: resident on its GPU(s); `group`: weights in CPU memory, streamed to the GPU as it runs
    (all of them for the text encoder, `streamed_blocks` blocks for the transformer); `cpu`: runs
    on the CPU; `stage` (text encoder only): not in this replica, the TextEncoder stage runs it."""
    weights_gb: tuple[float, ...]
    """Resident weights on each GPU of `gpus`, same order."""
    cpu_weights_gb: float = 0.0
    """Weights kept in host memory (streamed, or the whole component when it runs on CPU)."""
    blocks: tuple[int, ...] = ()
    """Transformer only: its resident blocks on each GPU of `gpus` (one entry when whole, several
    when split at block boundaries); empty for the other components."""
    streamed_blocks: int = 0
    """Transformer blocks kept on CPU and streamed to the GPU on every call."""
    compute: Literal["bf16", "fp8"] = "bf16"
    """Transformer only: `fp8`, its Linear layers compute in float8 (torchao, per-row scales);
    `bf16`, in bfloat16 (fp8 storage upcast layer by layer)."""

    def device_text(self) -> str:
        if self.offload == "stage":
            return "TextEncoder stage"
        if not self.gpus:
            return "CPU"
        text = "GPU " + ",".join(str(g) for g in self.gpus)
        if len(self.blocks) > 1:
            text += " (blocks " + "+".join(str(b) for b in self.blocks) + ")"
        return text


@dataclass(frozen=True)
class Plan:
    """Placement of one replica's pipeline; see the `deployments.placement` docstring."""

    task: Task
    gpus: int
    """GPUs the replica owns (the budget)."""
    gpu_memory_gb: float
    margin_gb: float
    resolution: int
    layers: int | None
    gpus_used: int
    transformer: ComponentPlan
    text_encoder: ComponentPlan
    vae: ComponentPlan
    vae_tiling: bool
    vae_slicing: bool
    """Decode the frames one at a time (`layers`: every layer is a frame)."""
    peak_gb: tuple[float, ...]
    """Predicted peak of each used GPU."""
    peak_phase: tuple[str, ...]
    """The phase that sets each GPU's peak."""
    strategy: str

    @property
    def components(self) -> dict[str, ComponentPlan]:
        return {"transformer": self.transformer, "text_encoder": self.text_encoder, "vae": self.vae}

    @property
    def text_encoder_mode(self) -> TextEncoderMode:
        return "stage" if self.text_encoder.offload == "stage" else "inline"

    @property
    def usable_gb(self) -> float:
        """What a GPU's peak may reach: memory minus margin."""
        return self.gpu_memory_gb - self.margin_gb

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in COMPONENTS:
            data[name] = {key: list(value) if isinstance(value, tuple) else value for key, value in data[name].items()}
        data["peak_gb"], data["peak_phase"] = list(self.peak_gb), list(self.peak_phase)
        data["usable_gb"] = self.usable_gb
        data["text_encoder_mode"] = self.text_encoder_mode
        return data

    def describe(self) -> str:
        layers = f", {self.layers} layers" if self.task == "layers" else ""
        lines = [
            (f"plan: {self.task}, {self.resolution} px{layers} on {self.gpus}x{self.gpu_memory_gb:g} GB "
             f"(uses {self.gpus_used} GPU{'s' if self.gpus_used > 1 else ''})"),
            f"strategy: {self.strategy}",
            "",
            f"{'component':<13} {'device(s)':<22} {'dtype':<14} {'offload':<17} {'GPU GB':>7} {'CPU GB':>7}",
        ]
        for name, part in self.components.items():
            offload = part.offload if not part.streamed_blocks else f"group ({part.streamed_blocks} blocks)"
            dtype = "-" if part.offload == "stage" else part.dtype  # the stage's own plan says
            lines.append(
                f"{name:<13} {part.device_text():<22} {dtype:<14} {offload:<17} "
                f"{sum(part.weights_gb):>7.2f} {part.cpu_weights_gb:>7.2f}"
            )
        on = {True: "on", False: "off"}
        lines.append(f"vae tiling: {on[self.vae_tiling]}, vae slicing: {on[self.vae_slicing]}")
        lines += ["", f"{'GPU':<4} {'peak GB':>8} {'budget GB':>10} {'margin GB':>10} {'free GB':>8}  peak phase"]
        for gpu, (peak, phase) in enumerate(zip(self.peak_gb, self.peak_phase)):
            lines.append(
                f"{gpu:<4} {peak:>8.2f} {self.gpu_memory_gb:>10.1f} {self.margin_gb:>10.2f} "
                f"{self.usable_gb - peak:>8.2f}  {phase}"
            )
        return "\n".join(lines)



def strategy_text(transformer: ComponentPlan, text_encoder: ComponentPlan, tiled: bool) -> str:
    """One line saying where everything goes, for `Plan.strategy`."""
    if transformer.compute == "fp8":
        t = "fp8 transformer (float8 compute, torchao)"
    else:
        t = "fp8 transformer (layerwise casting)" if transformer.dtype == FP8 else "bf16 transformer"
    if len(transformer.gpus) > 1:
        t += f" split over GPUs {','.join(map(str, transformer.gpus))}"
    else:
        t += f" on GPU {transformer.gpus[0]}"
    if transformer.streamed_blocks:
        t += f", {transformer.streamed_blocks} blocks streamed from CPU"
    te = "fp8 text encoder" if text_encoder.dtype == FP8 else "bf16 text encoder"
    if text_encoder.offload == "stage":
        te = f"VAE on GPU {transformer.gpus[0]}; text encoder in the TextEncoder stage"
    elif text_encoder.offload == "group":
        te += f" streamed from CPU to GPU {text_encoder.gpus[0]} (group offload)"
    elif text_encoder.offload == "cpu":
        te += " on CPU"
    else:
        te += f" + VAE on GPU {text_encoder.gpus[0]}"
    return f"{t}; {te}" + ("; VAE tiling" if tiled else "")
