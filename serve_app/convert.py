"""Convert published pickled weights to safetensors, once, in a separate Python process.

Some weights are published only as PyTorch pickles (the AnimeGANv2 styles: bryandlee/animegan2-pytorch
``weights/*.pt``). The service reads safetensors only and `imgserve fetch` never downloads a pickle
into a model directory, so a manifest entry with ``convert: animegan`` has its pickles downloaded
into a quarantine directory and converted here:

- The pickle is read in a **child process** (``python -m serve_app.convert KIND SRC OUT``), never in
  the process that runs `fetch` (nor, of course, in a serving replica), with
  ``torch.load(weights_only=True)``: torch's restricted unpickler, which builds tensors and plain
  containers and refuses every other global, so an unexpected object in the file is an error, not a
  call.
- Only a **flat** ``dict[str, Tensor]`` is accepted: no wrapper (``{"state_dict": ...}``), no
  non-tensor values, float32 and finite. Its keys and shapes must be exactly the generator's
  (`deployments.animegan.check_state_dict`, which names every missing, unexpected or wrongly
  shaped key).
- The child writes ``OUT`` (``<style>.safetensors``; metadata ``converted_from``: JSON with the
  converter, the source's name and its sha256; the same pickle always gives the same bytes) and
  reads it back with `deployments.animegan.load_generator`, comparing every tensor with the input.
  The parent then checks the output again the same way, with the safetensors reader only, and
  computes its sha256 itself (the child's report is not trusted for it).

What the process boundary gives: whatever the unpickler builds lives and dies in the child; the
fetching process only ever opens the safetensors file. It is not a sandbox: the child runs as the
same user, so the guard against code in the pickle is ``weights_only=True``, and the child refuses
to run on a torch whose restricted unpickler has known bypasses (before 2.10: CVE-2025-32434,
CVE-2026-24747; pyproject.toml's floor, checked again here for an environment installed otherwise).

`convert_styles(SRC, DEST)` does the same for a directory of ``.pt``/``.pth`` files (for weights
copied by hand onto an offline host), deleting each pickle once its safetensors file is written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from deployments.identity import sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 300.0
"""Seconds one conversion may take (an 8.6 MB style takes about two, most of it importing torch)."""
SAFE_UNPICKLER_TORCH = (2, 10)
"""The first torch release whose ``weights_only`` unpickler has no published bypass."""


class ConversionError(Exception):
    """A file that cannot be converted; the message names the file and, where one is at fault, the key."""


def _animegan_expected() -> dict:
    from deployments.animegan import Generator

    return Generator().state_dict()


def _animegan_check_output(path: Path) -> None:
    from deployments.animegan import load_generator

    load_generator(path)  # the service's own loader: safetensors reader, key/shape check, strict load


CONVERTERS: dict[str, tuple[tuple[str, ...], Callable[[], dict], Callable[[Path], None]]] = {
    "animegan": ((".pt", ".pth"), _animegan_expected, _animegan_check_output),
}
"""kind → (pickle suffixes it reads, the expected state_dict, the check of a written output)."""


def check_kind(kind: str) -> tuple[str, ...]:
    """The input suffixes of converter `kind`; raises ConversionError for an unknown kind."""
    if kind not in CONVERTERS:
        raise ConversionError(f"unknown converter {kind!r}; known: {', '.join(sorted(CONVERTERS))}")
    return CONVERTERS[kind][0]


def output_name(relative: str) -> str:
    """Where the conversion of `relative` goes, relative to the destination: its stem + .safetensors."""
    return PurePosixPath(relative).stem + ".safetensors"


# -- the child ------------------------------------------------------------------------------------

def check_torch(version: str) -> None:
    """Raise ConversionError unless torch `version` (``torch.__version__``) is at least
    `SAFE_UNPICKLER_TORCH`: an older unpickler could run code from a crafted file despite
    ``weights_only=True``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or (int(found.group(1)), int(found.group(2))) < SAFE_UNPICKLER_TORCH:
        floor = ".".join(map(str, SAFE_UNPICKLER_TORCH))
        raise ConversionError(f"torch {version} cannot read pickles safely (weights_only bypasses before {floor}: "
                              f"CVE-2025-32434, CVE-2026-24747); install torch>={floor} (scripts/setup.sh does)")


def read_flat_state_dict(source: Path) -> dict:
    """A pickled state dict, read with ``weights_only=True`` and accepted only if it is a flat
    ``dict[str, Tensor]`` of finite float32 tensors. Raises ConversionError naming what is wrong."""
    import torch

    check_torch(torch.__version__)
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for any global outside torch's allow-list, or a bad file
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        detail = (f"it holds {found.group(1)}, which is neither a tensor nor a plain container" if found
                  else f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0]}")
        raise ConversionError(f"{source.name}: refused by torch.load(weights_only=True): {detail}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{source.name}: expected a flat state_dict (dict of tensors), got {type(data).__name__}")
    problems = []
    for key, value in data.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string ({type(key).__name__})")
        elif not isinstance(value, torch.Tensor):
            problems.append(f"`{key}` is not a tensor ({type(value).__name__})")
        elif value.dtype != torch.float32:
            problems.append(f"`{key}` is {value.dtype}, not float32")
        elif not bool(torch.isfinite(value).all()):
            problems.append(f"`{key}` has non-finite values")
    if problems:
        raise ConversionError(f"{source.name}: only a flat state_dict of finite float32 tensors is converted: "
                              + "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    return data


def convert_file(kind: str, source: Path, output: Path) -> dict[str, object]:
    """Convert one pickle in this process (the child's work; tests call it directly for speed).

    Writes `output` atomically and returns what the child reports: output, tensors, source_sha256."""
    import torch
    from safetensors.torch import load_file, save_file

    from deployments.animegan import WeightsMismatch, check_state_dict

    check_kind(kind)
    _, expected, check_output = CONVERTERS[kind]
    state = read_flat_state_dict(source)
    try:
        check_state_dict(state, expected(), source.name)
    except WeightsMismatch as exc:
        raise ConversionError(str(exc)) from None
    tensors = {key: value.detach().clone().contiguous() for key, value in state.items()}  # plain, unshared
    source_sha = sha256(source)
    partial = output.with_name(output.name + ".partial")
    # One metadata entry: safetensors writes several in hash-map order, which differs between
    # processes, and the output's bytes must not (its sha256 is recorded and checked again).
    origin = json.dumps({"converter": kind, "source": source.name, "source_sha256": source_sha}, sort_keys=True)
    save_file(tensors, str(partial), metadata={"converted_from": origin})
    written = load_file(str(partial))
    if set(written) != set(tensors) or any(not torch.equal(written[k], tensors[k]) for k in tensors):
        partial.unlink()
        raise ConversionError(f"{output.name}: read back differs from {source.name}")
    os.replace(partial, output)
    try:
        check_output(output)
    except Exception as exc:
        output.unlink()
        raise ConversionError(f"{output.name}: {exc}") from None
    return {"output": str(output), "tensors": len(tensors), "source_sha256": source_sha}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m serve_app.convert KIND SOURCE OUTPUT``; one JSON line on stdout."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m serve_app.convert KIND SOURCE OUTPUT", file=sys.stderr)
        return 2
    kind, source, output = args[0], Path(args[1]), Path(args[2])
    try:
        report = convert_file(kind, source, output)
    except ConversionError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


# -- the parent -----------------------------------------------------------------------------------

def convert(kind: str, source: Path | str, output: Path | str, *, timeout: float = CHILD_TIMEOUT_S) -> str:
    """Convert `source` (a pickle) to `output` (safetensors) in a child process; return the output's
    sha256, computed here after checking the output with the converter's loader.

    Raises ConversionError (nothing is left at `output`) if the child refuses the file, fails or
    runs out of time."""
    source, output = Path(source), Path(output)
    check_kind(kind)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONSTARTUP", None)
    command = [sys.executable, "-m", "serve_app.convert", kind, str(source.resolve()), str(output.resolve())]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        _remove(output)
        raise ConversionError(f"{source.name}: conversion took longer than {timeout:.0f} s") from None
    if done.returncode != 0:
        _remove(output)
        message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise ConversionError(message)
    if not output.is_file():
        raise ConversionError(f"{source.name}: the conversion wrote no {output.name}")
    try:
        CONVERTERS[kind][2](output)  # parent-side check, safetensors reader only
    except Exception as exc:
        _remove(output)
        raise ConversionError(f"{output.name}: {exc}") from None
    return sha256(output)


def _remove(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + ".partial")):
        candidate.unlink(missing_ok=True)


def convert_styles(source_dir: Path | str, dest_dir: Path | str, kind: str = "animegan") -> dict[str, str]:
    """Convert every ``.pt``/``.pth`` in `source_dir` (a quarantine directory) into
    ``dest_dir/<stem>.safetensors``, each in its own child process, printing and returning
    {output name: sha256}; each pickle is deleted once converted. Stops at the first refusal."""
    source_dir, dest_dir = Path(source_dir), Path(dest_dir)
    suffixes = check_kind(kind)
    if not source_dir.is_dir():
        raise ConversionError(f"{source_dir} is not a directory")
    if source_dir.resolve() == dest_dir.resolve():
        raise ConversionError("the pickles' directory must not be the styles directory (they are deleted after conversion)")
    pickles = sorted(p for p in source_dir.iterdir() if p.suffix in suffixes and p.is_file())
    if not pickles:
        raise ConversionError(f"{source_dir}: no {'/'.join(suffixes)} files")
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for pickle in pickles:
        name = output_name(pickle.name)
        written[name] = convert(kind, pickle, dest_dir / name)
        pickle.unlink()
        print(f"{pickle.name} → {dest_dir / name} sha256 {written[name]}")
    return written


def add_parser(commands) -> None:
    """`imgserve convert-styles SOURCE DEST` on the CLI's subparsers."""
    parser = commands.add_parser("convert-styles", help="pickled AnimeGANv2 styles (.pt) → safetensors, "
                                 "each read with weights_only=True in a separate process (offline)")
    parser.add_argument("source", help="a quarantine directory of .pt/.pth files; each is deleted once converted")
    parser.add_argument("dest", help="the styles directory (anime.styles_dir) that receives <style>.safetensors")


def command(source: str, dest: str) -> int:
    """The CLI command: 0 when every file was converted, 2 on a refusal, 1 on an OS error."""
    try:
        convert_styles(source, dest)
    except ConversionError as error:
        print(f"imgserve: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"imgserve: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
