"""The AnimeGANv2 generator (photo → anime), in the layout of the published PyTorch port.

The module tree, and therefore every ``state_dict`` key and shape, is the one of
bryandlee/animegan2-pytorch ``model.py`` (class ``Generator`` with ``block_a`` … ``block_e`` and
``out_layer``, built from ``ConvNormLReLU`` and ``InvertedResBlock``), so its released style files
(``face_paint_512_v2.pt``, ``paprika.pt``, …) load unchanged with ``strict=True``. 2,143,552
parameters (8.6 MB in float32) per style.

Input: RGB in [-1, 1], shape (N, 3, H, W); output: RGB in [-1, 1] (tanh), same shape. The network
is fully convolutional: two stride-2 convolutions down, two bilinear upsamplings back to the exact
input size, so any H and W work; the training and released checkpoints use sides that are
multiples of 32, which is what `deployments.anime` feeds it (by reflect padding, then cropping).

`load_generator` reads a ``.safetensors`` file only and checks every key and shape against the
architecture before anything is loaded, naming whatever does not fit. A released ``.pt`` is a
pickle, which can run code when loaded: it is refused, naming the file and the converter
(``imgserve convert-styles``, or ``imgserve fetch`` with ``convert: animegan``), which turns it into
``.safetensors`` ahead of time in a process of its own (`serve_app.convert`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from deployments.styles import PICKLE_SUFFIXES, pickle_refusal

if TYPE_CHECKING:
    from deployments.stylize import Workspace

#: Parameters of one generator (weights of one style); a unit test pins it.
PARAMETER_COUNT = 2_143_552


class ConvNormLReLU(nn.Sequential):
    """Padding → convolution (no padding of its own) → GroupNorm(1 group) → LeakyReLU(0.2).

    A ``Sequential`` so the keys are ``<i>.1.weight`` (conv) and ``<i>.2.weight/bias`` (norm), as
    in the published port. ``padding`` is an int or a (left, right, top, bottom) tuple.
    """

    _PADS = {"zero": nn.ZeroPad2d, "same": nn.ReplicationPad2d, "reflect": nn.ReflectionPad2d}

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | tuple[int, int, int, int] = 1,
        pad_mode: str = "reflect",
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        if pad_mode not in self._PADS:
            raise ValueError(f"pad_mode must be one of {sorted(self._PADS)}, got {pad_mode!r}")
        super().__init__(
            self._PADS[pad_mode](padding),
            nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, stride=stride, padding=0, groups=groups, bias=bias),
            nn.GroupNorm(num_groups=1, num_channels=out_ch, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
        )


class InvertedResBlock(nn.Module):
    """MobileNetV2-style block: 1×1 expand → 3×3 depthwise → 1×1 project (+ residual if shapes match)."""

    def __init__(self, in_ch: int, out_ch: int, expansion_ratio: float = 2) -> None:
        super().__init__()
        self.use_res_connect = in_ch == out_ch
        hidden = int(round(in_ch * expansion_ratio))
        layers: list[nn.Module] = []
        if expansion_ratio != 1:
            layers.append(ConvNormLReLU(in_ch, hidden, kernel_size=1, padding=0))
        layers.append(ConvNormLReLU(hidden, hidden, groups=hidden, bias=True))  # depthwise
        layers.append(nn.Conv2d(hidden, out_ch, kernel_size=1, padding=0, bias=False))  # pointwise
        layers.append(nn.GroupNorm(num_groups=1, num_channels=out_ch, affine=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.use_res_connect else out


class Generator(nn.Module):
    """AnimeGANv2 generator; ``forward(x, align_corners=True)`` maps [-1, 1] RGB to [-1, 1] RGB."""

    def __init__(self) -> None:
        super().__init__()
        down = (0, 1, 0, 1)  # stride-2 convolutions pad right and bottom only (TF "same")
        self.block_a = nn.Sequential(
            ConvNormLReLU(3, 32, kernel_size=7, padding=3),
            ConvNormLReLU(32, 64, stride=2, padding=down),
            ConvNormLReLU(64, 64),
        )
        self.block_b = nn.Sequential(
            ConvNormLReLU(64, 128, stride=2, padding=down),
            ConvNormLReLU(128, 128),
        )
        self.block_c = nn.Sequential(
            ConvNormLReLU(128, 128),
            InvertedResBlock(128, 256, 2),
            InvertedResBlock(256, 256, 2),
            InvertedResBlock(256, 256, 2),
            InvertedResBlock(256, 256, 2),
            ConvNormLReLU(256, 128),
        )
        self.block_d = nn.Sequential(
            ConvNormLReLU(128, 128),
            ConvNormLReLU(128, 128),
        )
        self.block_e = nn.Sequential(
            ConvNormLReLU(128, 64),
            ConvNormLReLU(64, 64),
            ConvNormLReLU(64, 32, kernel_size=7, padding=3),
        )
        self.out_layer = nn.Sequential(
            nn.Conv2d(32, 3, kernel_size=1, stride=1, padding=0, bias=False),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor, align_corners: bool = True) -> torch.Tensor:
        # align_corners=True resizes to the exact recorded sizes (the port's default and what its
        # torch.hub face2paint uses); False doubles with half-pixel centres (its test.py default).
        out = self.block_a(x)
        half_size = out.shape[-2:]
        out = self.block_c(self.block_b(out))
        out = self._up(out, half_size, align_corners)
        out = self.block_d(out)
        out = self._up(out, x.shape[-2:], align_corners)
        return self.out_layer(self.block_e(out))

    def forward_lean(
        self, x: torch.Tensor, align_corners: bool = True, workspace: Workspace | None = None
    ) -> torch.Tensor:
        """`forward` with less memory traffic on CPU; equal up to float rounding (~1e-5).

        - Every stride-1 convolution uses the convolution's own zero padding and recomputes only
          its border rows and columns from reflect-padded strips (`_conv_reflect`), instead of
          first materialising a reflect-padded copy of the whole activation.
        - GroupNorm and LeakyReLU run in place (`_group_norm_`), and each layer's input is released
          as soon as its convolution is done: one activation is allocated per layer, and at most
          an input and an output are alive at once.
        - With a `Workspace`, activations are written into memory kept from the previous call
          (oneDNN convolution accumulating into a zeroed buffer, ``out=`` upsampling and padding),
          so a call does not page-fault its activations in afresh — on a VM that costs more than
          the normalisations and upsamplings together.

        Inference only; ``x`` in channels-last float32 is the fast layout.
        """
        from deployments.stylize import forward_lean

        return forward_lean(self, x, align_corners, workspace)

    @staticmethod
    def _up(x: torch.Tensor, size: torch.Size, align_corners: bool) -> torch.Tensor:
        if align_corners:
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class WeightsMismatch(ValueError):
    """A style file the generator cannot take (an operator error at load time): not a
    ``.safetensors`` file, or keys and shapes that do not fit."""


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file; a pickle (``.pt``/``.pth``) is refused, never opened."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsMismatch(pickle_refusal([path]))
    if path.suffix != ".safetensors":
        raise WeightsMismatch(f"{path}: unknown weights format {path.suffix!r}; styles are .safetensors files")
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a broken header
        raise WeightsMismatch(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc})") from exc


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Raise `WeightsMismatch` naming missing, unexpected and wrongly shaped keys, if any."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise WeightsMismatch(f"{source} does not fit the AnimeGANv2 generator: " + "; ".join(problems))


def load_generator(path: Path | str) -> Generator:
    """A float32 `Generator` in eval mode with the weights of one style file, strictly checked."""
    net = Generator()
    state = read_state_dict(path)
    check_state_dict(state, net.state_dict(), str(path))
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def random_generator(seed: int) -> Generator:
    """A generator with seeded random weights (demo and tests): same seed, same weights."""
    generator = torch.Generator().manual_seed(seed)
    net = Generator()
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.ndim == 1:  # GroupNorm scale and shift, depthwise conv bias: near 1 / near 0
                base = 1.0 if name.endswith(".weight") else 0.0
                tensor.copy_(base + 0.1 * torch.randn(tensor.shape, generator=generator))
            else:  # conv weights: He-style init, so activations neither vanish nor explode
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return net.eval().requires_grad_(False)
