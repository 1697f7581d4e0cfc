"""Whole-file writes. A reader on any host (the login node over a network file system included)
sees the old file or the new one, never a part: the new content goes to a temporary file beside
the target, is fsynced and renamed over it. The new file gets the mode a plain open() would give
it (0666 less the umask) rather than mkstemp's 0600, so a group that shares the run directory
reads its reports, status and results like any other file in it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# os.umask can only be read by setting it, process-wide: once, at import, before any thread.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
NEW_FILE_MODE = 0o666 & ~_UMASK


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, NEW_FILE_MODE)
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_atomic(path: Path, data: bytes | Path) -> None:
    """`data` (bytes, or a file's content) as the whole new content of `path` (atomic_path)."""
    with atomic_path(path) as tmp:
        if isinstance(data, Path):
            shutil.copyfile(data, tmp)
        else:
            tmp.write_bytes(data)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; best effort, since some filesystems refuse O_RDONLY
    # fsync on directories and the data is already safe in the renamed file.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
