"""Reading files without trusting them, writing them so that a crash never leaves half of one,
and naming paths in messages.

Every file torchwatch reads goes through :func:`open_regular` (only regular files: a FIFO or a
device named as a checkpoint or a log would block or never end) and every JSON document through
:func:`parse_json` (deep nesting, huge integers and bad encodings become a :class:`FormatError`
naming the file, never a ``RecursionError`` or a bare ``ValueError``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Callable
from typing import IO, Any

from .errors import FormatError

_TAIL = 1 << 20  # a torn last line is looked for in the file's last MiB


def shown(path: str | os.PathLike[str] | bytes) -> str:
    """A path as a message can print it: undecodable bytes become ``\\xNN`` escapes, never an error."""
    raw = os.fsencode(path)
    return "'" + raw.decode("utf-8", "backslashreplace") + "'"


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def _blocking(fd: int) -> None:
    """Clear O_NONBLOCK: opened without blocking to refuse FIFOs, the file is then read or written normally."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def open_regular(path: str | os.PathLike[str] | bytes, what: str) -> IO[bytes]:
    """Open ``path`` for reading in binary mode, if it is a regular file.

    Checked on the opened descriptor, and opened without blocking, so a FIFO, device or socket
    is refused rather than waited on; symbolic links are followed (a dangling one "does not exist").

    Raises:
        FormatError: ``"<what> '<path>' does not exist"``, is a directory / a FIFO / ..., or cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FormatError(f"{what} {shown(path)} does not exist") from None
    except OSError as exc:
        raise FormatError(f"cannot read {what} {shown(path)}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise FormatError(f"{what} {shown(path)} is {kind}, not a file torchwatch can read")
        _blocking(fd)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str] | bytes, what: str, *, limit: int | None = None) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`), at most ``limit`` of them.

    Raises:
        FormatError: as :func:`open_regular`, or the file is larger than ``limit``.
    """
    with open_regular(path, what) as f:
        try:
            data = f.read() if limit is None else f.read(limit + 1)
        except OSError as exc:
            raise FormatError(f"cannot read {what} {shown(path)}: {exc.strerror or exc}") from None
    if limit is not None and len(data) > limit:
        raise FormatError(f"{what} {shown(path)} is larger than {limit:,} bytes; it is not a {what}")
    return data


def parse_json(data: bytes | str, where: str) -> Any:
    """``json.loads`` for untrusted text: every way it can fail is a FormatError naming ``where``.

    Besides malformed JSON that covers invalid UTF-8, nesting deeper than the interpreter
    recurses (``RecursionError``) and integers longer than Python converts (``ValueError``).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text)
    except UnicodeDecodeError:
        raise FormatError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise FormatError(f"{where} is JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer of more digits than int() converts
        raise FormatError(f"{where} holds a value JSON cannot represent here: {exc}") from None


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path next to ``path``, fsync it, then rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was; an ``OSError``
    names ``path`` (not the temporary file) as its ``filename``.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{id(write):x}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """:func:`atomic_write` of a string."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)

    atomic_write(path, write)


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
        _blocking(fd)
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
