"""Typed reads from untrusted JSON objects: every wrong type is a FormatError naming where and the field.

The writers (``to_dict``/``to_json`` of records, statistics and alerts) and the readers
(``from_dict``/``from_json``, which :mod:`torchwatch.report` uses) live side by side in the
classes they serialise; this module is the one way their readers check what they got.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import FormatError

_MISSING = object()


class Fields:
    """A JSON object being read, at ``where`` (e.g. ``"'run/stats.jsonl' line 7, modules.'0'"``).

    Example:
        >>> f = Fields({"calls": 3, "mean": None}, "record")
        >>> f.int("calls"), f.float("mean")
        (3, nan)
        >>> f.int("step")
        Traceback (most recent call last):
        ...
        torchwatch.errors.FormatError: record: field 'step' is missing
    """

    def __init__(self, doc: object, where: str) -> None:
        if not isinstance(doc, Mapping):
            raise FormatError(f"{where}: expected a JSON object, got {_kind(doc)}")
        self.doc = doc
        self.where = where

    def _get(self, key: str, default: Any) -> Any:
        value = self.doc.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise FormatError(f"{self.where}: field {key!r} is missing")
            return default
        return value

    def _bad(self, key: str, want: str, value: object) -> FormatError:
        return FormatError(f"{self.where}: field {key!r} must be {want}, got {_kind(value)}")

    def int(self, key: str, default: Any = _MISSING) -> int:
        """An integer (not a bool, not a float)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        return value

    def count(self, key: str) -> int:
        """A non-negative integer; missing or null reads as 0."""
        value = self.int(key, 0)
        if value < 0:
            raise self._bad(key, "a non-negative integer", value)
        return value

    def float(self, key: str, default: Any = math.nan) -> float:
        """A number; null (how NaN and infinities are written) or missing reads as ``default``."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "a number", value)
        return float(value)

    def number(self, key: str) -> float:
        """A finite number that must be there."""
        value = self._get(key, _MISSING)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, "a finite number", value)
        return float(value)

    def str(self, key: str, default: Any = _MISSING) -> str:
        """A string; with a ``default``, also null or missing."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def get(self, key: str) -> Any:
        """The raw value of ``key`` (None when missing or null)."""
        return self.doc.get(key)

    def obj(self, key: str, *, optional: bool = False) -> Fields | None:
        """A nested object; with ``optional``, null or missing reads as None."""
        value = self._get(key, None if optional else _MISSING)
        if value is None:
            return None
        return Fields(value, f"{self.where}, {key}")

    def items(self, key: str) -> Iterator[tuple[str, Fields]]:
        """``(name, Fields)`` for an object of objects (missing or null: none)."""
        value = self._get(key, {})
        if not isinstance(value, Mapping):
            raise self._bad(key, "an object", value)
        for name, item in value.items():
            yield name, Fields(item, f"{self.where}, {key}.{name!r}")

    def counts(self, key: str) -> dict[str, int]:
        """An object of non-negative integers (missing or null: empty)."""
        value = self._get(key, {})
        if not isinstance(value, Mapping):
            raise self._bad(key, "an object", value)
        inner = Fields(value, f"{self.where}, {key}")
        return {name: inner.count(name) for name in value}

    def list(self, key: str) -> list[Any]:
        """A list (missing or null: empty)."""
        value = self._get(key, [])
        if not isinstance(value, list):
            raise self._bad(key, "a list", value)
        return value

    def numbers(self, key: str) -> list[float] | None:
        """A list of numbers (null as NaN), or None when missing or null."""
        value = self._get(key, None)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value
        ):
            raise self._bad(key, "a list of numbers", value)
        return [math.nan if v is None else float(v) for v in value]


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}" if abs(value) < 1e18 else "a number"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def entries(doc: object, where: str) -> Iterator[tuple[str, Fields]]:
    """``(name, Fields)`` for a JSON object of objects at ``where`` (a monitor value's decoder)."""
    if not isinstance(doc, Mapping):
        raise FormatError(f"{where}: expected a JSON object, got {_kind(doc)}")
    for name, item in doc.items():
        yield name, Fields(item, f"{where}.{name!r}")
