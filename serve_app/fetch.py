"""`imgserve fetch`: download model files ahead of time and verify every file's SHA-256.

A manifest (YAML, e.g. `models.yaml`) lists models: a source, a revision, a local destination,
and either `files` (path → sha256) or, before the first trusted download, `include` patterns.

- Source: `repo` (a Hugging Face hub repo, downloaded with huggingface_hub) or `url` (an https base
  URL containing `{revision}`, e.g. a GitHub raw URL at a commit: for weights published nowhere
  else; each listed file is fetched from the base URL + its path, and only `files` can be listed).
- `fetch` downloads exactly the listed files at a pinned 40-hex commit, checks each hash and deletes
  a file that does not match (exit status 2).
- `--lock` resolves a hub revision to its commit (a `url` entry must name its commit already),
  downloads the `include` patterns (or the listed `files`) once and writes the commit and the
  concrete files with their hashes back into the manifest: trust on first use, asked for explicitly,
  except for a file whose sha256 the manifest already records (e.g. a hash the publisher shows),
  which is checked like any fetch.
- `--verify` only checks what is already on disk (offline).

Pickle formats are refused outright, with one exception kept out of every model directory: an
entry with `convert: KIND` (see `serve_app.convert`) lists pickles that are downloaded into a
quarantine directory next to `dest` (never into it), each converted in a separate process to
`<stem>.safetensors` in `dest`, and deleted with the quarantine. Such an entry also records
`outputs` (the converted files with their sha256, written by `--lock`); `fetch` skips a file whose
verified output is already there, and `--verify` checks the outputs. No listed path may leave its
destination. The service itself never downloads: it reads the destinations as local directories.
Knows nothing about serving.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import yaml

from deployments.identity import sha256

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Formats that can run code when loaded: never fetched into a model directory (the service reads
safetensors only); only an entry with `convert` downloads them, into quarantine."""
COMMIT = re.compile(r"[0-9a-f]{40}")


class FetchError(Exception):
    """A manifest or a downloaded file is not what it must be; the message names it."""


@dataclass
class ModelEntry:
    name: str
    repo: str | None
    revision: str
    dest: Path
    files: dict[str, str | None]
    include: list[str]
    url: str | None = None
    convert: str | None = None
    outputs: dict[str, str | None] = field(default_factory=dict)
    """`convert` entries: converted file (in `dest`) → sha256, one per listed pickle."""


def _safe_path(name: str, relative: str, pickles: tuple[str, ...] = ()) -> str:
    """A listed path, refused if it could leave the destination or is a pickle format (other than
    the `pickles` suffixes a converter reads)."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or "\\" in relative or "\x00" in relative or not path.parts:
        raise FetchError(f"{name}: path {relative!r} leaves the model directory")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and suffix not in pickles:
        raise FetchError(f"{name}: {relative!r} is a pickle format; only safetensors and plain files are fetched"
                         + (f" (the converter reads {', '.join(pickles)})" if pickles else
                            " (an entry with `convert` may list pickles, which are converted in quarantine)"))
    return str(path)


def _converter(name: str, kind: str) -> tuple[str, ...]:
    from serve_app.convert import ConversionError, check_kind

    try:
        return check_kind(kind)
    except ConversionError as exc:
        raise FetchError(f"{name}: convert: {exc}") from None


def _convertible(name: str, kind: str, files: list[str], pickles: tuple[str, ...]) -> None:
    """Every file of a `convert` entry is a pickle its converter reads, with an output of its own."""
    from serve_app.convert import output_name

    not_pickles = [f for f in files if PurePosixPath(f).suffix.lower() not in pickles]
    if not_pickles:
        raise FetchError(f"{name}: with `convert: {kind}` every file is converted; "
                         f"{', '.join(not_pickles)} is not {'/'.join(pickles)}")
    if len({output_name(f) for f in files}) != len(files):
        raise FetchError(f"{name}: two files convert to the same output name")


def load_manifest(path: str | Path) -> list[ModelEntry]:
    from serve_app.convert import output_name

    document = yaml.safe_load(Path(path).read_text()) or {}
    entries = []
    for index, item in enumerate(document.get("models") or []):
        name = item.get("name") or f"models[{index}]"
        if bool(item.get("repo")) == bool(item.get("url")):
            raise FetchError(f"{name}: give exactly one source, `repo` (Hugging Face) or `url`")
        for key in ("revision", "dest"):
            if not item.get(key):
                raise FetchError(f"{name}: `{key}` is required")
        url = item.get("url")
        if url is not None:
            if not str(url).startswith("https://") or "{revision}" not in str(url):
                raise FetchError(f"{name}: `url` must be an https URL containing {{revision}}, got {url!r}")
            if item.get("include"):
                raise FetchError(f"{name}: a `url` source cannot be listed: name its `files`, not `include` patterns")
        kind = item.get("convert")
        pickles = _converter(name, str(kind)) if kind is not None else ()
        files = {_safe_path(name, key, pickles): value for key, value in (item.get("files") or {}).items()}
        include = list(item.get("include") or [])
        if not files and not include:
            raise FetchError(f"{name}: list `files` (path: sha256) or `include` patterns for --lock")
        outputs: dict[str, str | None] = {}
        if kind is not None:
            _convertible(name, str(kind), list(files), pickles)
            recorded = dict(item.get("outputs") or {})
            for key in recorded:
                _safe_path(name, key)
            outputs = {output_name(f): recorded.get(output_name(f)) for f in files}
            stray = sorted(set(recorded) - set(outputs))
            if stray:
                raise FetchError(f"{name}: outputs {', '.join(stray)} come from no listed file")
        elif item.get("outputs"):
            raise FetchError(f"{name}: `outputs` belong to an entry with `convert`")
        entries.append(ModelEntry(name, item.get("repo"), str(item["revision"]), Path(item["dest"]).expanduser(),
                                  files, include, url, kind, outputs))
    if not entries:
        raise FetchError(f"{path}: no models listed")
    return entries


def _source_url(entry: ModelEntry, relative: str) -> str:
    assert entry.url is not None
    return entry.url.replace("{revision}", entry.revision).rstrip("/") + "/" + quote(relative)


def _download_url(url: str, target: Path) -> Path:
    """`url` into `target` (through `target.part`, so a broken transfer never looks complete)."""
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:  # noqa: S310 (https only)
        shutil.copyfileobj(response, out, 1 << 20)
    partial.replace(target)
    return target


def _download(entry: ModelEntry, relative: str, directory: Path) -> Path:
    """One listed file of `entry` into `directory / relative` (the destination or the quarantine)."""
    if entry.url is not None:
        return _download_url(_source_url(entry, relative), directory / relative)
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(entry.repo, relative, revision=entry.revision, local_dir=directory))


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
    if not COMMIT.fullmatch(entry.revision):
        how = "the commit its URL names" if entry.url else "run --lock once"
        raise FetchError(f"{entry.name}: revision must be a pinned 40-hex commit ({how}), got {entry.revision!r}")


def verify(entry: ModelEntry, relative: str, expected: str, *, remove: bool, directory: Path | None = None) -> None:
    """Check one file on disk (in `directory`, by default the destination) against its manifest
    hash; raises FetchError (after deleting the file when `remove`) on a mismatch."""
    where = entry.dest if directory is None else directory
    path = where / relative
    if not path.is_file():
        raise FetchError(f"{entry.name}: {relative} is missing from {where}")
    actual = sha256(path)
    if actual != expected.lower():
        if remove:
            path.unlink()
        raise FetchError(f"{entry.name}: {relative} has sha256 {actual}, the manifest says {expected}"
                         + (" (deleted)" if remove else ""))


def _quarantine(entry: ModelEntry) -> tempfile.TemporaryDirectory:
    """A fresh directory beside `dest` (same file system, never inside it) for pickles to convert;
    one left by an interrupted run is removed first."""
    entry.dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{entry.dest.name}.quarantine-"
    for stale in entry.dest.parent.glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=entry.dest.parent)


def _convert_one(entry: ModelEntry, relative: str, expected: str | None, quarantine: Path) -> tuple[str, str]:
    """Download one pickle of a `convert` entry into `quarantine`, check it against `expected`
    (when known), convert it there in a child process, check the output against the manifest
    (when known) and move it into `dest`. Returns (the pickle's sha256, the output's sha256)."""
    from serve_app.convert import ConversionError, convert, output_name

    _download(entry, relative, quarantine)
    if expected:
        verify(entry, relative, expected, remove=True, directory=quarantine)
    source_sha = expected or sha256(quarantine / relative)
    out_name = output_name(relative)
    staged = quarantine / out_name  # converted in quarantine, moved into `dest` once checked
    try:
        out_sha = convert(entry.convert, quarantine / relative, staged)
    except ConversionError as exc:
        raise FetchError(f"{entry.name}: {relative} not converted: {exc}") from None
    finally:
        (quarantine / relative).unlink(missing_ok=True)  # the pickle goes as soon as it was read
    recorded = entry.outputs.get(out_name)
    if recorded and out_sha != recorded.lower():
        staged.unlink()
        raise FetchError(f"{entry.name}: {out_name} converted from {relative} has sha256 {out_sha}, "
                         f"the manifest says {recorded} (deleted)")
    entry.dest.mkdir(parents=True, exist_ok=True)
    staged.replace(entry.dest / out_name)
    print(f"{entry.name}: {relative} → {entry.dest / out_name} sha256 {out_sha}")
    return source_sha, out_sha


def _fetch_converted(entry: ModelEntry, *, verify_only: bool) -> None:
    from serve_app.convert import output_name

    if verify_only:
        for out_name, expected in entry.outputs.items():
            verify(entry, out_name, expected, remove=False)
        return
    todo = []
    for relative in entry.files:
        out_name = output_name(relative)
        if (entry.dest / out_name).is_file():
            verify(entry, out_name, entry.outputs[out_name], remove=True)
        else:
            todo.append(relative)
    if todo:
        with _quarantine(entry) as quarantine:
            for relative in todo:
                _convert_one(entry, relative, entry.files[relative], Path(quarantine))


def _lock(entry: ModelEntry) -> None:
    """Pin the revision and record every file's sha256 (checking those already recorded)."""
    if entry.url is not None:
        _pinned(entry)  # nothing to resolve a branch with: the URL's commit is the pin
    else:
        entry.revision = _pin(entry)
    pickles = _converter(entry.name, entry.convert) if entry.convert else ()
    names = [_safe_path(entry.name, n, pickles) for n in _listed(entry)] if entry.include else list(entry.files)
    previous = entry.files
    if entry.convert:
        from serve_app.convert import output_name

        _convertible(entry.name, entry.convert, names, pickles)
        recorded = entry.outputs
        entry.files, entry.outputs = {}, {}
        with _quarantine(entry) as quarantine:
            for relative in names:
                entry.outputs[output_name(relative)] = recorded.get(output_name(relative))
                entry.files[relative], entry.outputs[output_name(relative)] = _convert_one(
                    entry, relative, previous.get(relative), Path(quarantine))
    else:
        entry.files = {}
        for relative in names:
            _download(entry, relative, entry.dest)
            if previous.get(relative):
                verify(entry, relative, previous[relative], remove=True)
            entry.files[relative] = previous.get(relative) or sha256(entry.dest / relative)
    print(f"{entry.name}: locked {len(names)} files at {entry.revision}")


def fetch(manifest: str | Path, *, lock: bool = False, verify_only: bool = False) -> None:
    """Run the command, printing one line per model. Raises FetchError on the first problem."""
    entries = load_manifest(manifest)
    if not lock:  # refuse an incomplete manifest before anything is downloaded
        for entry in entries:
            if not verify_only:
                _pinned(entry)
            if not entry.files:
                raise FetchError(f"{entry.name}: no files listed yet, only `include` patterns (run with --lock once)")
            missing = [name for name, value in {**entry.files, **entry.outputs}.items() if not value]
            if missing:
                raise FetchError(f"{entry.name}: {', '.join(missing)} has no sha256 in the manifest "
                                 "(run with --lock once)")
    for entry in entries:
        if lock:
            _lock(entry)
            continue
        if entry.convert:
            _fetch_converted(entry, verify_only=verify_only)
            print(f"{entry.name}: {len(entry.outputs)} converted files verified in {entry.dest}")
            continue
        for relative, expected in entry.files.items():
            if not verify_only and not (entry.dest / relative).is_file():
                _download(entry, relative, entry.dest)
            verify(entry, relative, expected, remove=not verify_only)
        print(f"{entry.name}: {len(entry.files)} files verified in {entry.dest}")
    if lock:
        document = yaml.safe_load(Path(manifest).read_text())
        for item, entry in zip(document["models"], entries):
            item["revision"], item["files"] = entry.revision, entry.files
            if entry.convert:
                item["outputs"] = entry.outputs
        Path(manifest).write_text(yaml.safe_dump(document, sort_keys=False))
