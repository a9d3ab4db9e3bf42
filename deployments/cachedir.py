"""Directories generated once into a shared cache, safely when several processes race.

`build_once(final, build, complete)` returns `final`, building it first when `complete(final)` is
false: `build(tmp)` writes into a private temporary sibling, which is renamed into place. A rename
onto an existing non-empty directory fails atomically, so when Ray replicas start together the
losers discard their copies, and a half-written directory is never visible under the final name.
Temporary directories left by a process killed mid-build are removed once they are an hour old.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STALE_TMP_SECONDS = 3600


def build_once(final: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    final = Path(final)
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    remove_stale(final.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is shared
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if not complete(final):  # not a lost race
                raise RuntimeError(f"cannot create {final}: {exc}; if it exists but is incomplete, delete it") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


def remove_stale(directory: Path, prefix: str) -> None:
    now = time.time()
    for entry in directory.glob(prefix + "*"):
        try:
            if now - entry.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            pass
