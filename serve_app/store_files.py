"""The job store's bytes on disk: private, crash-safe files and the space they may use.

A file is written to `<name>.<random>.tmp` in the same directory (created 0600 whatever the umask),
fsynced, renamed over its final name, and the directory fsynced, so after a crash a name holds either
nothing or every byte. `*.tmp` files left by a crash are removed when a store opens (`remove_orphans`).
Directories are 0700: the jobs' inputs and results are readable by the service's user only.
Knows nothing about jobs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700; chmod, because mkdir's mode obeys the umask."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def remove_orphans(directory: Path) -> int:
    """Remove the `*.tmp` files a crashed writer left in `directory`; how many."""
    removed = 0
    for tmp in directory.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def atomic_write(path: Path, data: bytes) -> None:
    """`path` holds `data` (0600), durably, or is left as it was; raises OSError (ENOSPC, EFBIG …).

    A store opening meanwhile may remove the temporary file as an orphan (a redeploy starts the new
    runner while the old one still writes): the rename then fails with ENOENT and the write is done
    once more.
    """
    for attempt in range(2):
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)  # umask-proof
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except FileNotFoundError:
            if attempt:
                raise
            continue
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        break
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(path: Path, size: int | None, sha256: str | None) -> bytes | None:
    """The bytes at `path` when they are the ones recorded (size and SHA-256); None when the file is
    missing, truncated or changed. A record without size and digest (a store from before they were
    kept) accepts any existing file but an empty one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if size is None and sha256 is None:
        return data or None
    if len(data) != size or (sha256 is not None and digest(data) != sha256):
        return None
    return data


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on `directory`'s file system."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def storage_error(exc: BaseException) -> bool:
    """Whether `exc` means the disk (or a limit on it) refused the bytes."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
