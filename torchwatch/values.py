"""Monitor values that describe themselves: how each comes back from JSON and what it exports.

A monitor's value reaches a :class:`~torchwatch.Record` under its name. For the value to come
back typed from a JSON log and to show in TensorBoard and Prometheus, the monitor's file
registers the name once (the way a config type is mapped to its handler)::

    values.register("histograms", decode=Histograms.from_json, export=Histograms.export)

``export(value, record)`` lists what the sinks show of it: :class:`Scalar` and :class:`Histogram`
for TensorBoard (tags under the sink's prefix), :class:`Series` for Prometheus (one metric family
per name, ``model`` label added by the sink, label values bounded by the sink). Sinks read these
and nothing else: no sink names a monitor. A name never registered still reaches every sink: JSON
as its ``to_dict()``, TensorBoard as up to ``MAX_EXTRA_SCALARS`` numbers found in it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["ROOT_LABEL", "Histogram", "Scalar", "Series", "ValueType", "decode", "exports", "register"]

ROOT_LABEL = "<root>"  # how the watched model itself ("" as a module name) is shown in tags and labels
MAX_EXTRA_SCALARS = 256  # numbers shown per value of a monitor that exports nothing of its own


@dataclasses.dataclass(frozen=True)
class Scalar:
    """A TensorBoard scalar: ``tag`` (``/``-separated, the sink adds its prefix) and its value."""

    tag: str
    value: float


@dataclasses.dataclass(frozen=True)
class Histogram:
    """A TensorBoard histogram: ``counts[i]`` values in the bucket ``(edges[i], edges[i + 1]]``."""

    tag: str
    edges: tuple[float, ...]
    counts: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1:
            raise ValueError(f"Histogram {self.tag!r}: {len(self.edges)} edges for {len(self.counts)} buckets")


@dataclasses.dataclass(frozen=True)
class Series:
    """One Prometheus sample: metric ``name`` (``torchwatch_...``; counters without ``_total``,
    which prometheus_client adds), ``kind`` ``"gauge"`` (set to ``value``) or ``"counter"``
    (incremented by ``value``, this record's increase), its ``help`` and its labels."""

    name: str
    kind: str
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("gauge", "counter"):
            raise ValueError(f"Series {self.name!r}: kind must be 'gauge' or 'counter', got {self.kind!r}")


Export = Scalar | Histogram | Series


@dataclasses.dataclass(frozen=True)
class ValueType:
    """How a monitor's value is read back and shown.

    Attributes:
        name: the monitor's name (its key in records).
        decode: ``decode(doc, where)`` — the value from its JSON form (raise
            :class:`~torchwatch.FormatError` naming ``where`` on a bad document).
        export: ``export(value, record)`` — what TensorBoard and Prometheus show of it.
    """

    name: str
    decode: Callable[[Any, str], Any] | None = None
    export: Callable[[Any, Any], Iterable[Export]] | None = None


_types: dict[str, ValueType] = {}
_lock = threading.Lock()


def register(name: str, *, decode: Callable[[Any, str], Any] | None = None,
             export: Callable[[Any, Any], Iterable[Export]] | None = None) -> ValueType:  # fmt: skip
    """Register how the value of the monitor called ``name`` is decoded and exported (once per
    name; registering the same functions again is a no-op, as a re-imported module does)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a value type needs a non-empty name, got {name!r}")
    kind = ValueType(name, decode, export)
    with _lock:
        known = _types.get(name)
        if known is not None and known != kind and _qualnames(known) != _qualnames(kind):
            raise ValueError(
                f"a value type named {name!r} is already registered ({known}); give the monitor another name"
            )
        _types[name] = kind
    return kind


def _qualnames(kind: ValueType) -> tuple[str | None, ...]:
    return tuple(getattr(f, "__qualname__", None) for f in (kind.decode, kind.export))


def decode(name: str, doc: Any, where: str) -> Any:
    """``doc`` (a value as JSON wrote it) back as the registered type; plain data if unregistered."""
    kind = _types.get(name)
    if kind is None or kind.decode is None:
        return doc
    return kind.decode(doc, where)


def exports(name: str, value: Any, record: Any) -> list[Export]:
    """What the sinks show of ``value``: the registered export, or for an unregistered value up to
    ``MAX_EXTRA_SCALARS`` numbers found in it: scalars under ``extra/<name>/<path>`` and gauges
    ``torchwatch_extra{monitor="<name>", key="<path>"}``."""
    kind = _types.get(name)
    if kind is not None and kind.export is not None:
        return list(kind.export(value, record))
    out: list[Export] = []
    for tag, v in numbers(f"extra/{name}", value)[:MAX_EXTRA_SCALARS]:
        out.append(Scalar(tag, v))
        key = tag[len(f"extra/{name}") :].lstrip("/") or "value"
        help_ = "Numbers in the value of a monitor that exports none of its own."
        out.append(Series("torchwatch_extra", "gauge", help_, v, (("monitor", name), ("key", key))))
    return out


def numbers(tag: str, value: Any, depth: int = 0) -> list[tuple[str, float]]:
    """The numbers in a plain value (its ``to_dict()`` first), tagged by their path: mappings to
    depth 4, bools and strings skipped, at most ``MAX_EXTRA_SCALARS``."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        value = to_dict()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(tag, float(value))]
    if isinstance(value, Mapping) and depth < 4:
        out: list[tuple[str, float]] = []
        for key, item in value.items():
            out += numbers(f"{tag}/{key or ROOT_LABEL}", item, depth + 1)
            if len(out) >= MAX_EXTRA_SCALARS:
                break
        return out
    return []


def module_label(name: str) -> str:
    """A module name as shown in tags and labels (the model itself, ``""``, as ``<root>``)."""
    return name or ROOT_LABEL
