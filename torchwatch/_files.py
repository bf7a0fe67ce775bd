"""Writing files so that a crash never leaves half of one, and naming paths in messages."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable


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
