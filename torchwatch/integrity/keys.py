"""Signing keys for manifests: a new random key file only its owner can read."""

from __future__ import annotations

import contextlib
import os
import secrets

from .._files import shown
from ..errors import ConfigError

KEY_BYTES = 32  # HMAC-SHA256's block size is 64 bytes; 32 random bytes is its full security


def write_key(path: str | os.PathLike[str], *, size: int = KEY_BYTES) -> None:
    """Create ``path`` holding ``size`` random bytes (``secrets``), file mode 0600.

    An existing file is never replaced: manifests signed with it would stop verifying. The file is
    created exclusively (not through a link), written, fsynced, and removed again if writing fails,
    so a failure leaves no partial key behind.

    Raises:
        ConfigError: ``path`` exists, or ``size`` is below 16 bytes (what :meth:`Manifest.save` accepts).
        OSError: the directory is missing or not writable, or the disk is full.

    Example:
        >>> import os, tempfile, torchwatch as tw
        >>> path = os.path.join(tempfile.mkdtemp(), "manifest.key")
        >>> tw.write_key(path)
        >>> oct(os.stat(path).st_mode & 0o777), os.path.getsize(path)
        ('0o600', 32)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"write_key needs a path, got {type(path).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1 << 16:
        raise ConfigError(f"write_key: size must be an integer from 16 to 65536 bytes, got {size!r}")
    path = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"{shown(path)} already exists; a new key there would make every manifest signed with the old one "
            "fail to verify. Choose another name, or remove the old key first if that is what you want"
        ) from None
    try:
        if hasattr(os, "fchmod"):  # the umask can only take bits away; this makes the mode exact
            os.fchmod(fd, 0o600)
        data = secrets.token_bytes(size)
        written = 0
        while written < size:
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
