"""Pillow's image memory in long-lived CPU replicas: freed blocks are kept for the next request.

Pillow allocates every image's pixels in blocks and, by default, hands each block back to the C
allocator as soon as the image is freed; in a Ray worker those pages go back to the kernel and the
next request faults in fresh ones. `keep_freed_blocks` makes Pillow keep up to `BLOCKS` freed
blocks of at most `BLOCK_SIZE` bytes for reuse, bounding what a replica holds on to at
`BLOCKS × BLOCK_SIZE`. Process-wide and idempotent; knows nothing about requests. Measurements:
bench/results/README.md (`bench/imagememory.py`).
"""

from __future__ import annotations

from PIL import Image

BLOCKS = 16
"""Freed blocks kept: enough for the images of a few requests in flight (decode, reduce, resize,
convert each hold one)."""
BLOCK_SIZE = 4 << 20
"""Largest block, bytes: a 1024×1024 RGB image (4 bytes a pixel in Pillow) fits in one; larger
images are split over several."""


def keep_freed_blocks() -> None:
    """Keep up to BLOCKS freed Pillow blocks (of at most BLOCK_SIZE bytes) for reuse."""
    if Image.core.get_block_size() != BLOCK_SIZE:
        Image.core.set_block_size(BLOCK_SIZE)
    if Image.core.get_blocks_max() < BLOCKS:
        Image.core.set_blocks_max(BLOCKS)
