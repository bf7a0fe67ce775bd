"""Switches for tests and benchmarks: context managers, never ``attach()`` arguments.

* :func:`device_path` — watches attached inside it measure CPU tensors the way accelerator ones
  are (device tables, grouped launches through the torch-ops twin): the CPU twin of the GPU path,
  so CI tests it without a GPU.
* :func:`triton_in_compile` — compiled graphs launch the Triton kernel directly instead of the
  opaque custom op (``benchmarks/_compile_probe.py`` reproduces the crash that choice avoids).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

DEVICE_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar("torchwatch_device_path", default=False)


class Flag:
    """A process-wide switch read inside traced code (torch.compile cannot trace a ContextVar)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


TRITON_IN_COMPILE = Flag()


@contextlib.contextmanager
def _set(var: contextvars.ContextVar[bool], enabled: bool) -> Iterator[None]:
    token = var.set(bool(enabled))
    try:
        yield
    finally:
        var.reset(token)


def device_path(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Watches attached in this block measure CPU tensors through the device path."""
    return _set(DEVICE_PATH, enabled)


@contextlib.contextmanager
def triton_in_compile(enabled: bool = True) -> Iterator[None]:
    """Graphs traced in this block launch the Triton kernel directly (a benchmark's probe)."""
    before, TRITON_IN_COMPILE.on = TRITON_IN_COMPILE.on, bool(enabled)
    try:
        yield
    finally:
        TRITON_IN_COMPILE.on = before
