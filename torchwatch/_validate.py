"""Checks of public arguments: one way, one message shape, always a ConfigError.

``owner`` names the call or class (``"attach()"``, ``"MemorySink"``); messages read
``"<owner>: <name> must be <what>, got <value>"``, so a caller sees what to change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError


def _fail(owner: str, name: str, what: str, value: object) -> ConfigError:
    shown = repr(value)
    return ConfigError(f"{owner}: {name} must be {what}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")


def integer(owner: str, name: str, value: object, *, low: int = 1, high: int | None = None) -> int:
    """An int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        if high is not None:
            what = f"an integer from {low} to {high}"
        else:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise _fail(owner, name, what, value)
    return value


def number(
    owner: str, name: str, value: object, *, low: float | None = None, high: float | None = None,
    above: float | None = None, finite: bool = True,
) -> float:  # fmt: skip
    """A real number (not a bool), finite unless ``finite=False``, with optional bounds
    (``low``/``high`` inclusive, ``above`` exclusive)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (not finite or math.isfinite(v)) and (low is None or v >= low) and (high is None or v <= high)
        ok = ok and (above is None or v > above)
    if not ok:
        bounds = [f">= {low:g}" if low is not None else "", f"> {above:g}" if above is not None else "",
                  f"<= {high:g}" if high is not None else ""]  # fmt: skip
        what = " and ".join(b for b in bounds if b)
        raise _fail(owner, name, f"a {'finite ' if finite else ''}number{' ' + what if what else ''}", value)
    return float(value)  # type: ignore[arg-type]


def optional(check: Any, owner: str, name: str, value: object, **bounds: Any) -> Any:
    """``check(...)`` unless ``value`` is None."""
    return None if value is None else check(owner, name, value, **bounds)


def path(owner: str, name: str, value: object) -> str:
    """A filesystem path (str or os.PathLike), as a str."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, os.PathLike):
        result = os.fspath(value)
        if isinstance(result, str) and result:
            return result
    raise _fail(owner, name, "a path (a str or os.PathLike)", value)


def function(owner: str, name: str, value: object, *, optional: bool = False) -> Any:
    """A callable (or None with ``optional``)."""
    if (value is None and optional) or callable(value):
        return value
    raise _fail(owner, name, "callable" + (" or None" if optional else ""), value)


def flag(owner: str, name: str, value: object) -> bool:
    """True or False."""
    if not isinstance(value, bool):
        raise _fail(owner, name, "True or False", value)
    return value


def strings(owner: str, name: str, value: object, *, allow_empty: bool = False) -> list[str]:
    """A list (or other non-string iterable) of strings."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _fail(owner, name, "a list of strings", value)
    items = list(value)
    if not all(isinstance(v, str) for v in items) or (not items and not allow_empty):
        raise _fail(owner, name, "a non-empty list of strings" if not allow_empty else "a list of strings", value)
    return items


def instance(owner: str, name: str, value: object, kind: type, what: str, *, optional: bool = False) -> Any:
    """An instance of ``kind`` (``what`` names it, e.g. ``"a torch.nn.Module"``), or None with ``optional``."""
    if (value is None and optional) or isinstance(value, kind):
        return value
    raise ConfigError(f"{owner}: {name} must be {what}{' or None' if optional else ''}, got {type(value).__name__}")


def seed(owner: str, name: str, value: object) -> int | None:
    """A random seed: None or a non-negative integer."""
    return optional(integer, owner, name, value, low=0)


def one_of(owner: str, name: str, value: object, choices: Iterable[object]) -> Any:
    """One of ``choices`` (compared with ==, by type too so True is not 1)."""
    options = list(choices)
    if not any(type(value) is type(c) and value == c for c in options):
        raise _fail(owner, name, "one of " + ", ".join(repr(c) for c in options), value)
    return value
