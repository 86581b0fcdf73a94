"""Writing files so that a crash or a kill never leaves half of one behind."""

import contextlib
import os
import re
from pathlib import Path

TEMPORARY = re.compile(r"^\.(.+)\.tmp(\d+)$")  # temporary_name's `.<name>.tmp<pid>`: (name, pid)


def temporary_name(path) -> Path:
    """`.<name>.tmp<pid>` beside `path` (leftovers of killed writers match `.*.tmp*`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(folder) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file open on a temporary name beside `path`; on success it is fsynced and renamed over `path` (the
    folder fsynced too), on failure removed. Readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
