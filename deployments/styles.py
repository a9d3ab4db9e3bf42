"""The anime styles on disk: a directory of AnimeGANv2 generator weights, one file per style.

`style_files(directory)` lists `<style>.safetensors`; a name is a plain file stem, never a path.
Weights are served from safetensors only: a pickled `<style>.pt|.pth` (how the published styles come)
is never a style. `pickled_styles` finds such files that have no safetensors twin and
`refuse_pickled_styles` stops a replica that would otherwise start without them, naming the files
and the converter (`imgserve convert-styles`, or `imgserve fetch` with `convert: animegan`).
`ensure_tiny_styles(cache_dir)` generates the four published style names with seeded random weights
as safetensors (demo, tests), safely when several replicas start together. Loads no weights
(`deployments.animegan.load_generator` does) and imports no torch at module level (the config
module `deployments.anime_config` imports this one).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable
from pathlib import Path

from deployments.cachedir import build_once

#: The released styles of the published PyTorch port; `styles_dir: tiny` makes random-weight ones.
TINY_STYLES = ("celeba_distill", "face_paint_512_v1", "face_paint_512_v2", "paprika")
#: Bump when the tiny styles' generation changes, so cached files are rebuilt.
TINY_DIR = "anime-styles-v1"
STYLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
"""What a style name looks like (a file stem; no path)."""
SUFFIX = ".safetensors"
"""The only weights format a style is served from."""
PICKLE_SUFFIXES = (".pt", ".pth")
"""Pickled PyTorch files (the published styles' format): converted ahead of time, never loaded."""


class PickledStyles(ValueError):
    """A styles directory holding pickled weights that have no safetensors twin (a start-up error)."""


def _weight_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"styles directory {str(directory)!r} does not exist")
    return [Path(entry.path) for entry in os.scandir(directory)
            if STYLE_NAME.fullmatch(Path(entry.name).stem) and entry.is_file()]


def style_files(directory: Path) -> dict[str, Path]:
    """{style: file} for every `<style>.safetensors` in ``directory``."""
    return {path.stem: path for path in _weight_files(directory) if path.suffix == SUFFIX}


def pickled_styles(directory: Path) -> list[Path]:
    """The `.pt`/`.pth` files of ``directory`` without a `.safetensors` of the same name, sorted."""
    files = _weight_files(directory)
    converted = {path.stem for path in files if path.suffix == SUFFIX}
    return sorted(path for path in files if path.suffix in PICKLE_SUFFIXES and path.stem not in converted)


def pickle_refusal(paths: Iterable[Path]) -> str:
    """Why pickled style files are not loaded and how to convert them (one message for every caller)."""
    paths = list(paths)
    names = ", ".join(str(path) for path in paths)
    styles_dir = paths[0].parent if paths else Path("STYLES_DIR")
    return (f"{names}: pickled PyTorch weights, which can run code when loaded; styles are served from "
            f".safetensors only. Convert them ahead of time: move them to a directory of their own and run "
            f"`imgserve convert-styles THAT_DIR {styles_dir}` (or list them in the `imgserve fetch` manifest "
            f"with `convert: animegan`)")


def refuse_pickled_styles(directory: Path) -> None:
    """Raise `PickledStyles` if ``directory`` holds `.pt`/`.pth` files without a `.safetensors` twin:
    the operator meant them as styles, and starting without them would hide that."""
    pickles = pickled_styles(directory)
    if pickles:
        raise PickledStyles(pickle_refusal(pickles))


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
