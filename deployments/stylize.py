"""Running an AnimeGANv2 generator on images: the padding, one tensor batch, and the lean CPU forward.

`run_batch(net, arrays, size, ...)` reflect-pads each uint8 RGB array to `size` (both sides
multiples of 32: the checkpoints' training geometry), runs one batch, and crops each result back to
its array's own size; it never resizes. On CPU, above about 160² pixels, it runs `forward_lean`:
`Generator.forward` with one activation allocated per layer, reflect padding computed only at the
borders, normalisation in place, and activations written into a `Workspace` kept between calls
(faulting fresh activation memory in on every call was the largest cost on CPU; measurements in
bench/results/README.md). Outputs equal the plain forward's to float rounding. The architecture
and its weights are `deployments.animegan`'s.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deployments.animegan import ConvNormLReLU, Generator, InvertedResBlock

#: Sides are padded to a multiple of this inside the model (the checkpoints' training geometry).
PAD_MULTIPLE = 32
# Below about this many (padded) pixels the lean forward's extra border convolutions cost more than
# the padded copies they avoid (measured on 2 cores: 0.8x at 64², even at ~160²); above it it wins.
LEAN_MIN_PIXELS = 160 * 160


def padding_for(height: int, width: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) reflect padding that brings both sides to a multiple of 32."""
    pad_h = -height % PAD_MULTIPLE
    pad_w = -width % PAD_MULTIPLE
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def run_batch(net: Generator, arrays: list[np.ndarray], size: tuple[int, int], *, device: str, dtype: torch.dtype,
              align_corners: bool, workspace: Workspace | None, lock: threading.Lock) -> list[np.ndarray]:
    """Pad each array to ``size`` (both sides multiples of 32), run one batch, crop each back. On CPU
    the lean forward runs under `lock` (one forward at a time owns the workspace)."""
    height, width = size
    with torch.inference_mode():
        batch = torch.empty(
            (len(arrays), 3, height, width), dtype=dtype, device=device, memory_format=torch.channels_last
        )
        pads = []
        for i, array in enumerate(arrays):
            h, w = array.shape[:2]
            pad = padding_for(h, w)  # the group's size is every member's own padded size
            pads.append(pad)
            # arrays from preprocess may be read-only (a view of a PIL buffer): torch warns on those
            source = array if array.flags.writeable else array.copy()
            x = torch.from_numpy(source).to(device).permute(2, 0, 1).unsqueeze(0).to(dtype)
            x = x.mul_(1 / 127.5).sub_(1.0)
            if any(pad):
                mode = "reflect" if max(pad[2:]) < h and max(pad[:2]) < w else "replicate"
                x = F.pad(x, pad, mode=mode)
            batch[i] = x[0]
        if device == "cpu" and height * width >= LEAN_MIN_PIXELS:
            with lock:
                try:
                    out = forward_lean(net, batch, align_corners, workspace)
                except BaseException:
                    if workspace is not None:
                        workspace.reset()  # blocks taken by the failed call were never given back
                    raise
                finally:
                    if workspace is not None:
                        workspace.trim()
        else:
            out = net(batch, align_corners)
        del batch
        # [-1, 1] → [0, 255], rounded (the published test.py truncates; rounding is the closer)
        out = out.add_(1.0).mul_(127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)
        out = out.permute(0, 2, 3, 1).cpu()  # NHWC; contiguous when `out` was channels-last
        results = []
        for i, array in enumerate(arrays):
            h, w = array.shape[:2]
            left, _, top, _ = pads[i]
            results.append(np.ascontiguousarray(out[i, top : top + h, left : left + w].numpy()))
        return results


def forward_lean(net: Generator, x: torch.Tensor, align_corners: bool = True,
                 workspace: Workspace | None = None) -> torch.Tensor:
    """`Generator.forward_lean`: `net.forward` with one activation allocated per layer (see there)."""
    ws = workspace if workspace is not None and workspace.usable(x) else None
    # Activations travel in one-element lists that `_seq` empties, so no frame here keeps a
    # consumed activation alive (at 1024² that would add 128 MB to the peak).
    out = _seq(net.block_a, [x], ws)
    half_size = out.shape[-2:]
    out = _seq(net.block_b, [out], ws)
    out = _seq(net.block_c, [out], ws)
    box = [_upsample(out, half_size, align_corners, ws)]
    _release(ws, out)
    del out
    out = _seq(net.block_d, box, ws)
    box = [_upsample(out, x.shape[-2:], align_corners, ws)]
    _release(ws, out)
    del out
    out = _seq(net.block_e, box, ws)
    result = net.out_layer(out)  # 3 channels: a fresh, small tensor
    _release(ws, out)
    return result


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
