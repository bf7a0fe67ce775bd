"""Writing files so that a crash never leaves half of one, and naming paths in messages."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable

_TAIL = 1 << 20  # a torn last line is looked for in the file's last MiB


def shown(path: str | os.PathLike[str] | bytes) -> str:
    """A path as a message can print it: undecodable bytes become ``\\xNN`` escapes, never an error."""
    raw = os.fsencode(path)
    return "'" + raw.decode("utf-8", "backslashreplace") + "'"


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path next to ``path``, fsync it, then rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{id(write):x}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_log(path: str | os.PathLike[str]) -> int:
    """Open a JSON-lines log for appending (parent directories are created) and return its fd.

    A regular file whose last line was torn by a crash (no final newline) is cut back to its
    last whole line first, so a new record never glues onto a fragment. Anything else (a
    terminal, ``/dev/stdout``, a pipe with a reader) is appended to as it is.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        regular = True
    # O_NONBLOCK: a FIFO without a reader fails now (ENXIO) instead of blocking the writer forever
    flags = (os.O_RDWR if regular else os.O_WRONLY) | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK
    fd = os.open(path, flags, 0o644)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size:
            tail = os.pread(fd, min(info.st_size, _TAIL), max(0, info.st_size - _TAIL))
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                os.ftruncate(fd, info.st_size - len(tail) + cut + 1 if cut >= 0 else max(0, info.st_size - len(tail)))
    except BaseException:
        os.close(fd)
        raise
    return fd


def replaced(fd: int, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` no longer names the open file ``fd`` (deleted, or rotated and recreated)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return True
    was = os.fstat(fd)
    return (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino)
