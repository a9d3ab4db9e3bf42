"""`imgserve fetch`: download model files ahead of time and verify every file's SHA-256.

A manifest (YAML, e.g. `models.yaml`) lists models: hub repo, revision, local destination,
and either `files` (path → sha256) or, before the first trusted download, `include` patterns.
`fetch` downloads exactly the listed files at a pinned 40-hex commit with huggingface_hub, checks
each hash and deletes a file that does not match (exit status 2); `--lock` resolves the revision
to its commit, downloads the `include` patterns once and writes the commit and the concrete files
with their hashes back into the manifest (trust on first use, asked for explicitly); `--verify` only checks what is already on disk (offline). Pickle formats are
refused outright and no listed path may leave its destination. The service itself never downloads:
it reads the destinations as local directories. Knows nothing about serving.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Formats that can run code when loaded: never fetched (the service reads safetensors only)."""


class FetchError(Exception):
    """A manifest or a downloaded file is not what it must be; the message names it."""


@dataclass
class ModelEntry:
    name: str
    repo: str
    revision: str
    dest: Path
    files: dict[str, str | None]
    include: list[str]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_path(name: str, relative: str) -> str:
    """A listed path, refused if it could leave the destination or is a pickle format."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or "\\" in relative or "\x00" in relative or not path.parts:
        raise FetchError(f"{name}: path {relative!r} leaves the model directory")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FetchError(f"{name}: {relative!r} is a pickle format; only safetensors and plain files are fetched")
    return str(path)


def load_manifest(path: str | Path) -> list[ModelEntry]:
    document = yaml.safe_load(Path(path).read_text()) or {}
    entries = []
    for index, item in enumerate(document.get("models") or []):
        name = item.get("name") or f"models[{index}]"
        for key in ("repo", "revision", "dest"):
            if not item.get(key):
                raise FetchError(f"{name}: `{key}` is required")
        files = {_safe_path(name, key): value for key, value in (item.get("files") or {}).items()}
        include = list(item.get("include") or [])
        if not files and not include:
            raise FetchError(f"{name}: list `files` (path: sha256) or `include` patterns for --lock")
        entries.append(ModelEntry(name, item["repo"], str(item["revision"]), Path(item["dest"]).expanduser(),
                                  files, include))
    if not entries:
        raise FetchError(f"{path}: no models listed")
    return entries


def _download(entry: ModelEntry, relative: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(entry.repo, relative, revision=entry.revision, local_dir=entry.dest))


def _pin(entry: ModelEntry) -> str:
    """The commit a branch or tag names now (for --lock)."""
    from huggingface_hub import HfApi

    return HfApi().model_info(entry.repo, revision=entry.revision).sha


def _listed(entry: ModelEntry) -> list[str]:
    """The repo's files at the revision that match `include` (for --lock)."""
    from huggingface_hub import list_repo_files

    names = list_repo_files(entry.repo, revision=entry.revision)
    return sorted(n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in entry.include))


def _pinned(entry: ModelEntry) -> None:
    if not re.fullmatch(r"[0-9a-f]{40}", entry.revision):
        raise FetchError(f"{entry.name}: revision must be a pinned 40-hex commit (run --lock once), got {entry.revision!r}")


def verify(entry: ModelEntry, relative: str, expected: str, *, remove: bool) -> None:
    """Check one file on disk against its manifest hash (`fetch` refuses a manifest without one);
    raises FetchError (after deleting the file when `remove`) on a mismatch."""
    path = entry.dest / relative
    if not path.is_file():
        raise FetchError(f"{entry.name}: {relative} is missing from {entry.dest}")
    actual = sha256(path)
    if actual != expected.lower():
        if remove:
            path.unlink()
        raise FetchError(f"{entry.name}: {relative} has sha256 {actual}, the manifest says {expected}"
                         + (" (deleted)" if remove else ""))


def fetch(manifest: str | Path, *, lock: bool = False, verify_only: bool = False) -> None:
    """Run the command, printing one line per model. Raises FetchError on the first problem."""
    entries = load_manifest(manifest)
    if not lock:  # refuse an incomplete manifest before anything is downloaded
        for entry in entries:
            if not verify_only:
                _pinned(entry)
            missing = [name for name, value in entry.files.items() if not value]
            if missing or not entry.files:
                raise FetchError(f"{entry.name}: {', '.join(missing) or 'no file'} has no sha256 in the manifest "
                                 "(run with --lock once)")
    for entry in entries:
        if lock:
            entry.revision = _pin(entry)
            names = [_safe_path(entry.name, n) for n in _listed(entry)] if entry.include else list(entry.files)
            entry.files = {n: sha256(_download(entry, n)) for n in names}
            print(f"{entry.name}: locked {len(names)} files at {entry.revision}")
            continue
        for relative, expected in entry.files.items():
            if not verify_only and not (entry.dest / relative).is_file():
                _download(entry, relative)
            verify(entry, relative, expected, remove=not verify_only)
        print(f"{entry.name}: {len(entry.files)} files verified in {entry.dest}")
    if lock:
        document = yaml.safe_load(Path(manifest).read_text())
        for item, entry in zip(document["models"], entries):
            item["revision"], item["files"] = entry.revision, entry.files
        Path(manifest).write_text(yaml.safe_dump(document, sort_keys=False))
