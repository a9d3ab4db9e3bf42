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

`load_state_dict_file` reads a released ``.pt`` (only with ``torch.load(weights_only=True)``, never
arbitrary pickles) or a ``.safetensors`` file and checks every key and shape against the
architecture before anything is loaded, naming whatever does not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
        ws = workspace if workspace is not None and workspace.usable(x) else None
        # Activations travel in one-element lists that `_seq` empties, so no frame here keeps a
        # consumed activation alive (at 1024² that would add 128 MB to the peak).
        out = _seq(self.block_a, [x], ws)
        half_size = out.shape[-2:]
        out = _seq(self.block_b, [out], ws)
        out = _seq(self.block_c, [out], ws)
        box = [_upsample(out, half_size, align_corners, ws)]
        _release(ws, out)
        del out
        out = _seq(self.block_d, box, ws)
        box = [_upsample(out, x.shape[-2:], align_corners, ws)]
        _release(ws, out)
        del out
        out = _seq(self.block_e, box, ws)
        result = self.out_layer(out)  # 3 channels: a fresh, small tensor
        _release(ws, out)
        return result

    @staticmethod
    def _up(x: torch.Tensor, size: torch.Size, align_corners: bool) -> torch.Tensor:
        if align_corners:
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class Workspace:
    """Activation memory kept between `Generator.forward_lean` calls on CPU.

    A fresh multi-hundred-megabyte tensor is page-faulted in by the kernel on first touch, and
    glibc returns such blocks to the OS on free (they are above its mmap threshold), so without
    this every call pays for faulting in all its activations again (~3 GB per 1024² image).
    Blocks are flat float32 tensors handed out best-fit as channels-last views and given back when
    the activation is dead; after a call, free blocks beyond ``max_bytes`` are dropped (largest
    kept), so the replica's resident memory stays near one call's peak. Not thread-safe: one per
    model thread. Needs oneDNN's in-place convolution (``torch.ops.mkldnn._convolution_pointwise_``);
    where that is missing `usable` is False and the plain allocations are used.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._free: list[torch.Tensor] = []
        self._blocks: dict[int, torch.Tensor] = {}  # storage address → block, for release

    @staticmethod
    def supported() -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")

    def usable(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and self.supported()

    def empty(self, n: int, c: int, h: int, w: int) -> torch.Tensor:
        """An uninitialised channels-last (n, c, h, w) float32 tensor on a kept block."""
        numel = n * c * h * w
        fits = [b for b in self._free if b.numel() >= numel]
        if fits:
            block = min(fits, key=lambda b: b.numel())
            self._free = [b for b in self._free if b is not block]
        else:
            # Free blocks too small for this request are dropped before a new one is made: kept,
            # they would only add to the peak (a later call reuses the larger blocks instead).
            for small in self._free:
                del self._blocks[small.untyped_storage().data_ptr()]
            self._free = []
            block = torch.empty(numel, dtype=torch.float32)
            self._blocks[block.untyped_storage().data_ptr()] = block
        return block[:numel].view(n, h, w, c).permute(0, 3, 1, 2)

    def release(self, t: torch.Tensor) -> None:
        """Give ``t``'s block back; ``t`` must not be used afterwards. Others are ignored."""
        block = self._blocks.get(t.untyped_storage().data_ptr())
        if block is not None and all(b is not block for b in self._free):
            self._free.append(block)

    def trim(self) -> None:
        """Drop free blocks beyond ``max_bytes`` (largest kept); call between forward passes."""
        kept, total = [], 0
        for block in sorted(self._free, key=lambda b: -b.numel()):
            size = block.numel() * block.element_size()
            if total + size <= self.max_bytes:
                kept.append(block)
                total += size
            else:
                del self._blocks[block.untyped_storage().data_ptr()]
        self._free = kept

    def reset(self) -> None:
        """Forget every block (after a failed call, whose taken blocks were never given back)."""
        self._free = []
        self._blocks = {}

    @property
    def kept_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._blocks.values())


def _release(ws: Workspace | None, t: torch.Tensor) -> None:
    if ws is not None:
        ws.release(t)


def _conv(x: torch.Tensor, conv: nn.Conv2d, padding: int, ws: Workspace | None) -> torch.Tensor:
    """``F.conv2d`` with symmetric zero ``padding``; with a workspace, into a kept block."""
    if ws is None:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, 1, conv.groups)
    n, _, h, w = x.shape
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    out = ws.empty(n, conv.out_channels, (h + 2 * padding - kh) // sh + 1, (w + 2 * padding - kw) // sw + 1)
    out.zero_()  # the in-place oneDNN convolution adds to `out`
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x.contiguous(memory_format=torch.channels_last), conv.weight, conv.bias,
        [padding, padding], list(conv.stride), [1, 1], conv.groups, "add", None, None, [], None,
    )


def _upsample(x: torch.Tensor, size: torch.Size, align_corners: bool, ws: Workspace | None) -> torch.Tensor:
    """`Generator._up`, writing into a kept block when there is a workspace."""
    if ws is None:
        return Generator._up(x, size, align_corners)
    n, c = x.shape[:2]
    if align_corners:
        h, w = size
        return torch.ops.aten.upsample_bilinear2d.out(x, [h, w], True, None, None, out=ws.empty(n, c, h, w))
    h, w = x.shape[-2] * 2, x.shape[-1] * 2  # what F.interpolate(scale_factor=2) computes
    return torch.ops.aten.upsample_bilinear2d.out(x, [h, w], False, 2.0, 2.0, out=ws.empty(n, c, h, w))


def _conv_reflect(x: torch.Tensor, conv: nn.Conv2d, p: int, ws: Workspace | None = None) -> torch.Tensor:
    """``conv(reflection_pad(x, p))`` for a stride-1 convolution, without the padded copy of ``x``.

    The interior of a zero-padded convolution already equals the reflect-padded one; only the
    outer ``p`` rows and columns differ. Those are recomputed from thin strips of ``x`` (``2p``
    wide), reflect-padded on their own: reflecting a strip at the image edge reads the same
    pixels as reflecting the whole image there, because the strip is wider than ``p``.
    """
    w, b, groups = conv.weight, conv.bias, conv.groups
    height, width = x.shape[-2:]
    if height <= 2 * p or width <= 2 * p:  # too small for strips: pad the (small) tensor
        return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), w, b, groups=groups)
    out = _conv(x, conv, p, ws)
    strip = 2 * p
    out[..., :p, :] = F.conv2d(F.pad(x[..., :strip, :], (p, p, p, 0), mode="reflect"), w, b, groups=groups)
    out[..., -p:, :] = F.conv2d(F.pad(x[..., -strip:, :], (p, p, 0, p), mode="reflect"), w, b, groups=groups)
    out[..., :, :p] = F.conv2d(F.pad(x[..., :, :strip], (p, 0, p, p), mode="reflect"), w, b, groups=groups)
    out[..., :, -p:] = F.conv2d(F.pad(x[..., :, -strip:], (0, p, p, p), mode="reflect"), w, b, groups=groups)
    return out


def _group_norm_(y: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(y)`` computed in place for a single group, so no activation-sized output is allocated.

    Statistics per sample over all of (C, H, W): a float32 pairwise sum and BLAS dot products of
    2**20-element chunks accumulated in float64 (more exact than torch's own GroupNorm kernel here:
    ~5e-7 against a float64 reference, the kernel ~1e-4); then one fused ``y * scale + shift``
    pass with per-(sample, channel) scale and shift. Falls back to ``norm(y)`` where the layout or
    group count does not allow a flat view.
    """
    n, channels = y.shape[:2]
    if norm.num_groups != 1 or y.dtype != torch.float32:
        return norm(y)
    if y.is_contiguous(memory_format=torch.channels_last):
        flat = y.permute(0, 2, 3, 1).reshape(n, -1)  # a view: no copy
    elif y.is_contiguous():
        flat = y.view(n, -1)
    else:
        return norm(y)
    count = flat.shape[1]
    chunk = 1 << 20
    sums = flat.sum(dim=1).double()
    squares = torch.tensor(
        [sum(float(torch.dot(row[i : i + chunk], row[i : i + chunk])) for i in range(0, count, chunk)) for row in flat],
        dtype=torch.float64,
    )
    mean = sums / count
    var = (squares / count - mean * mean).clamp_min(0.0)
    scale = norm.weight.double().view(1, -1) * torch.rsqrt(var + norm.eps).view(-1, 1)  # (N, C)
    shift = norm.bias.double().view(1, -1) - mean.view(-1, 1) * scale
    return torch.addcmul(
        shift.float().view(n, channels, 1, 1), y, scale.float().view(n, channels, 1, 1), out=y
    )


def _seq(
    blocks: nn.Sequential, box: list[torch.Tensor], ws: Workspace | None = None, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Run ``blocks`` on ``box.pop()`` like ``blocks(x)``, allocating one activation per layer: each
    convolution's output is normalised and activated in place, and its input is released as soon
    as the convolution is done (the caller hands it over in ``box`` and keeps no reference), except
    ``keep``, which the caller still needs (a residual input)."""
    x = box.pop()

    def release(t: torch.Tensor) -> None:
        if ws is not None and t is not keep:
            ws.release(t)

    for block in blocks:
        if isinstance(block, ConvNormLReLU):
            pad, conv, norm, act = block
            p = pad.padding
            if isinstance(pad, nn.ReflectionPad2d) and conv.stride == (1, 1) and len(set(p)) == 1 and p[0] > 0:
                y = _conv_reflect(x, conv, p[0], ws)
            elif any(p):  # the two stride-2 convolutions, padded right and bottom only
                if ws is None or not isinstance(pad, nn.ReflectionPad2d):
                    padded = pad(x)
                else:
                    n, c, h, w = x.shape
                    padded = ws.empty(n, c, h + p[2] + p[3], w + p[0] + p[1])
                    torch.ops.aten.reflection_pad2d.out(x, list(p), out=padded)
                y = _conv(padded, conv, 0, ws)
                release(padded)
                del padded
            else:  # 1x1 convolutions: ReflectionPad2d(0) would still copy the activation
                y = _conv(x, conv, 0, ws)
            release(x)
            del x
            x = F.leaky_relu_(_group_norm_(y, norm), act.negative_slope)
            del y
        elif isinstance(block, InvertedResBlock):
            out = _seq(block.layers, [x], ws, keep=x)
            if block.use_res_connect:
                out.add_(x)
            release(x)
            x = out
            del out
        elif isinstance(block, nn.GroupNorm):
            x = _group_norm_(x, block)
        elif isinstance(block, nn.Conv2d) and block.padding == (0, 0):
            y = _conv(x, block, 0, ws)
            release(x)
            x = y
            del y
        else:
            x = block(x)
    return x


class WeightsMismatch(ValueError):
    """A style file whose keys or shapes do not fit the generator (an operator error at load time)."""


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pt`` state dict (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pt", ".pth"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an UnpicklingError for anything that is not plain tensors
            raise WeightsMismatch(f"{path}: not a plain tensor state dict ({type(exc).__name__}: {exc})") from exc
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise WeightsMismatch(f"{path}: expected a dict of tensors (a state_dict), got {type(data).__name__}")
        return data
    raise WeightsMismatch(f"{path}: unknown weights format {path.suffix!r}; use .safetensors or .pt")


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
