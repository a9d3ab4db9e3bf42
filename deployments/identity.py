"""Content identity of model files: which components are the same bytes, whatever their names.

`sha256(path)` is a file's digest. `text_encoder_identity(directory, cache_dir)` is the digest of
everything a diffusers directory's text encoder stage reads (the `text_encoder`, `tokenizer` and
`processor` folders: weights, configs, vocabularies), so two pipelines share one encoder only when
those bytes are equal; never from names. Digests of large files are remembered in
`cache_dir/file-digests.json` by path, size, modification time and inode, so a 16 GB encoder is
read once, not at every start. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TEXT_PARTS = ("text_encoder", "tokenizer", "processor")
"""The folders of a diffusers directory that the text encoder stage loads."""
_DIGESTS = "file-digests.json"


def sha256(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remembered(path: Path, memo: dict[str, str]) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    if key not in memo:
        memo[key] = sha256(path)
    return memo[key]


def text_encoder_identity(directory: Path | str, cache_dir: Path | str | None = None) -> str | None:
    """The digest of `directory`'s text encoder files (relative paths and contents), or None when
    the directory has none of them here (e.g. a model present on the workers only)."""
    directory = Path(directory).expanduser()
    files = sorted(file for part in TEXT_PARTS if (directory / part).is_dir()
                   for file in (directory / part).rglob("*") if file.is_file())
    if not files:
        return None
    store = Path(cache_dir).expanduser() / _DIGESTS if cache_dir is not None else None
    memo: dict[str, str] = {}
    if store is not None and store.is_file():
        try:
            memo = json.loads(store.read_text())
        except (OSError, ValueError):
            memo = {}  # a damaged memo only costs reading the files again
    known = len(memo)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(directory).as_posix()}\0{_remembered(file, memo)}\n".encode())
    if store is not None and len(memo) != known:
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            temporary = store.with_name(f"{store.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(memo, indent=0, sort_keys=True))
            temporary.replace(store)
        except OSError:
            pass  # read-only cache: the digests are recomputed next time
    return digest.hexdigest()
