"""Pillow block reuse in the CPU replicas: switched on by constructing Preprocess or Postprocess,
bounded, and invisible in the results (same bytes as with Pillow's defaults)."""

from __future__ import annotations

import textwrap

from deployments import imagememory
from tests.conftest import run_fresh

# Pillow's settings are process-wide and start at its defaults: each check runs in a new interpreter.


def test_constructing_a_cpu_stage_keeps_freed_blocks_within_the_bound() -> None:
    out = run_fresh("""
        from PIL import Image
        before = (Image.core.get_blocks_max(), Image.core.get_block_size())
        from deployments.postprocess import Postprocess
        Postprocess()
        print(before, (Image.core.get_blocks_max(), Image.core.get_block_size()))
    """)
    assert out == f"(0, 16777216) ({imagememory.BLOCKS}, {imagememory.BLOCK_SIZE})"
    assert imagememory.BLOCKS * imagememory.BLOCK_SIZE <= 64 << 20  # what one replica may hold on to


def test_results_are_byte_identical_with_and_without_block_reuse() -> None:
    code = """
        import hashlib, io
        import numpy as np
        from PIL import Image
        from deployments.preprocess import Preprocess
        from deployments.postprocess import Postprocess
        from deployments.records import Generated, ImageSpec
        pre, post = Preprocess(), Postprocess()
        if MODE == "plain":
            Image.core.set_blocks_max(0)  # Pillow's default: every freed block goes back at once
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(3).integers(0, 256, (900, 1300, 3), dtype=np.uint8)).save(buf, "JPEG")
        digests = []
        for _ in range(3):  # later rounds run on reused blocks
            prepared = pre.prepare(buf.getvalue(), ImageSpec())
            out = post.encode(Generated(array=prepared.array, info=prepared.info, params={"task": "t"}), "png")
            digests.append(hashlib.sha256(prepared.array.tobytes() + out.data).hexdigest())
        print(Image.core.get_blocks_max(), len(set(digests)), digests[0])
    """
    reuse = run_fresh("MODE = 'reuse'\n" + textwrap.dedent(code)).split()
    plain = run_fresh("MODE = 'plain'\n" + textwrap.dedent(code)).split()
    assert reuse[0] == str(imagememory.BLOCKS) and plain[0] == "0"
    assert reuse[1] == plain[1] == "1"
    assert reuse[2] == plain[2]
