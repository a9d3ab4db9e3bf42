"""The anime styles on disk: a directory of AnimeGANv2 generator weights, one file per style.

`style_files(directory)` lists `<style>.safetensors|.pt|.pth` (safetensors preferred where one
name has several); a name is a plain file stem, never a path. `ensure_tiny_styles(cache_dir)`
generates the four published style names with seeded random weights (demo, tests), safely when
several replicas start together. Loads no weights (`deployments.animegan.load_generator` does).
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

from deployments.cachedir import build_once

#: The released styles of the published PyTorch port; `styles_dir: tiny` makes random-weight ones.
TINY_STYLES = ("celeba_distill", "face_paint_512_v1", "face_paint_512_v2", "paprika")
#: Bump when the tiny styles' generation changes, so cached files are rebuilt.
TINY_DIR = "anime-styles-v1"
STYLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
"""What a style name looks like (a file stem; no path)."""
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")  # preference order when one name has several


def style_files(directory: Path) -> dict[str, Path]:
    """{style: file} for `<style>.safetensors|.pt|.pth` in ``directory`` (safetensors preferred)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"styles directory {str(directory)!r} does not exist")
    found: dict[str, Path] = {}
    for entry in os.scandir(directory):
        path = Path(entry.path)
        if path.suffix not in _WEIGHT_SUFFIXES or not STYLE_NAME.fullmatch(path.stem) or not entry.is_file():
            continue
        known = found.get(path.stem)
        if known is None or _WEIGHT_SUFFIXES.index(path.suffix) < _WEIGHT_SUFFIXES.index(known.suffix):
            found[path.stem] = path
    return found


def style_seed(name: str) -> int:
    """Stable per-name seed for the tiny styles (``hash()`` differs between processes)."""
    return zlib.crc32(name.encode())


def ensure_tiny_styles(cache_dir: Path | str) -> Path:
    """Return ``cache_dir / "anime-styles-v1"`` holding the tiny styles, generating it first if missing
    (safe when several replicas start together: ``deployments.cachedir.build_once``)."""
    from safetensors.torch import save_file

    from deployments.animegan import random_generator

    def build(directory: Path) -> None:
        for name in TINY_STYLES:
            state = {k: v.contiguous() for k, v in random_generator(style_seed(name)).state_dict().items()}
            save_file(state, str(directory / f"{name}.safetensors"), metadata={"style": name, "weights": "random"})

    return build_once(
        Path(cache_dir).expanduser() / TINY_DIR,
        build,
        lambda final: all((final / f"{name}.safetensors").is_file() for name in TINY_STYLES),
    )
