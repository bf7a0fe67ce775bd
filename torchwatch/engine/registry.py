"""Which watch is attached to which model (one per model), and the watches to flush at exit."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError

_watches: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()


def watch_of(model: nn.Module) -> Any:
    """The attached :class:`~torchwatch.Watch` of ``model``, or None."""
    with _lock:
        watch = _watches.get(model)
    return watch if watch is not None and watch.attached else None


def register(model: nn.Module, watch: Any, start: Callable[[], None]) -> None:
    """Make ``watch`` the watch of ``model`` and run ``start`` (hooks go in), atomically.

    Raises:
        ConfigError: ``model`` already has an attached watch.
    """
    with _lock:
        other = _watches.get(model)
        if other is not None and other.attached:
            raise ConfigError(
                f"this {type(model).__name__} is already watched by {other!r}; "
                "call watch.detach() before attaching again, or keep using that watch"
            )
        start()
        _watches[model] = watch
        _live.add(watch)


def unregister(model: nn.Module | None, watch: Any, stop: Callable[[], None]) -> bool:
    """Run ``stop`` (hooks come out) and forget ``watch``; False if it was not registered."""
    with _lock:
        if not watch.attached:
            return False
        stop()
        if model is not None and _watches.get(model) is watch:
            del _watches[model]
        _live.discard(watch)
        return True


def live() -> list[Any]:
    """Every watch still attached."""
    with _lock:
        return list(_live)
