"""Input monitoring: what goes into the watched model (``attach(inputs=...)``, on by default).

The root call's tensor arguments, on sampled eager calls. Floating-point inputs get the usual
:class:`~torchwatch.ModuleStats` under ``"<input>"`` names (range, NaN/Inf, zeros, casts) plus
per-channel means along dim 1 (an image's colour channels, a table's feature columns); integer
inputs (token ids, categorical features, attention masks) get an :class:`~torchwatch.IdStats`
frequency sketch. Accumulators live on the data's own device (no host sync); each flush copies
and zeroes them on the serving thread and turns them into host statistics on the worker. The
default rules chart these like the activation statistics (:class:`torchwatch.rules.EdgeChart`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import _validate, values
from .._pytree import tensors_in
from .._schema import Fields, entries
from .._transfer import copy_to_host, state_mode
from ..kernels import PLAIN_TENSOR_TYPES
from ..kernels import cpu as cpu_kernel
from ..values import Export, Scalar, Series
from .base import Call, Collect, Monitor
from .ids import ID_DTYPES, IdAccumulator, IdStats

__all__ = ["InputMonitor", "InputStats"]

INPUT = "<input>"  # the name of the root call's first tensor argument; others: <input>[1], <input>.key


@dataclass(frozen=True)
class InputMonitor:
    """What :func:`torchwatch.attach` measures of the root call's inputs (``attach(inputs=...)``).

    Args:
        channels: floating-point inputs with 2 <= ``size(1)`` <= ``channels`` also get per-channel
            means along dim 1 (NCHW images, [N, features] tables); 0 turns them off.
        exact_ids: integer values in ``[0, exact_ids)`` are counted exactly (vocabulary specials,
            padding ids, categories); others go to ``hashed_ids`` hashed buckets.
        hashed_ids: buckets for the other integer values.
        max_inputs: tensor arguments measured per call (positional first, then keyword).
    """

    channels: int = 64
    exact_ids: int = 1024
    hashed_ids: int = 1024
    max_inputs: int = 8

    def __post_init__(self) -> None:
        for name, low, high in (("channels", 0, 1 << 16), ("exact_ids", 1, 1 << 24), ("hashed_ids", 1, 1 << 24),
                                ("max_inputs", 1, 1024)):  # fmt: skip
            _validate.integer("InputMonitor", name, getattr(self, name), low=low, high=high)


@dataclass(frozen=True)
class InputStats:
    """One input position's statistics beyond its :class:`~torchwatch.ModuleStats`.

    Attributes:
        kind: ``"float"`` or ``"ids"``.
        channel_means: per-channel means along dim 1 (float inputs with few channels), else None.
        ids: the :class:`IdStats` of an integer input, else None.
    """

    kind: str
    channel_elements: int = 0
    channel_sums: tuple[float, ...] | None = None
    ids: IdStats | None = None

    @property
    def channel_means(self) -> tuple[float, ...] | None:
        if self.channel_sums is None or not self.channel_elements:
            return None
        return tuple(s / self.channel_elements for s in self.channel_sums)

    def merge(self, other: InputStats) -> InputStats:
        if self.kind != other.kind:
            return other
        if self.ids is not None and other.ids is not None:
            return InputStats("ids", ids=self.ids.merge(other.ids))
        if self.channel_sums is None or other.channel_sums is None or len(self.channel_sums) != len(other.channel_sums):
            return other if other.channel_sums is not None else self
        sums = tuple(a + b for a, b in zip(self.channel_sums, other.channel_sums, strict=True))
        return InputStats("float", self.channel_elements + other.channel_elements, sums)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.channel_means is not None:
            out["channel_means"] = list(self.channel_means)
        if self.ids is not None:
            out["ids"] = self.ids.to_dict()
        return out

    @staticmethod
    def summary_from_json(f: Fields) -> dict[str, Any]:
        """The :meth:`to_dict` summary read back from JSON, every field checked (FormatError)."""
        out: dict[str, Any] = {"kind": f.str("kind")}
        means = f.numbers("channel_means")
        if means is not None:
            out["channel_means"] = means
        ids = f.obj("ids", optional=True)
        if ids is not None:
            out["ids"] = IdStats.summary_from_json(ids)
        return out


def channel_layout(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(outer, channels, inner)`` of a float32 CPU tensor whose memory is contiguous with dim 1
    as the channels (``cpu.channel_sums``: row-major, or channels-last where channels are
    innermost); None where the C kernel is absent or the layout is another (torch sums it)."""
    if cpu_kernel.channel_sums is None or x.dtype is not torch.float32 or not x.is_cpu:
        return None
    n, c = x.shape[0], x.shape[1]
    if x.is_contiguous():
        return n, c, x.numel() // (n * c)
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if last is not None and x.is_contiguous(memory_format=last):
        return x.numel() // c, c, 1
    return None


class InputAccumulators:
    """Per input position: channel sums (float) or an id sketch (integer), on the input's device."""

    def __init__(self, config: InputMonitor, *, path: str | None = None) -> None:
        self.config = config
        self.path = path  # see resolve_path
        self._lock = threading.Lock()
        self._ids: dict[str, IdAccumulator] = {}
        self._channels: dict[str, list[Any]] = {}  # name -> [elements per channel (host), sums (device)]

    def add_float(self, name: str, x: torch.Tensor) -> None:
        if x.dim() < 2 or not 2 <= x.shape[1] <= self.config.channels or x.numel() == 0:
            return
        layout = channel_layout(x)
        if layout is None:
            sums = x.detach().sum(dim=[d for d in range(x.dim()) if d != 1], dtype=torch.float64)
        with self._lock:
            slot = self._channels.get(name)
            if slot is None or slot[1].numel() != x.shape[1] or slot[1].device != x.device:
                with state_mode():
                    slot = self._channels[name] = [0, torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)]
            slot[0] += x.numel() // x.shape[1]
            if layout is None:
                slot[1] += sums
            else:  # the C loop adds into the slot itself (a contiguous float64 CPU tensor)
                cpu_kernel.channel_sums(x.data_ptr(), *layout, slot[1].data_ptr(), False)

    def add_ids(self, name: str, x: torch.Tensor) -> None:
        with self._lock:
            acc = self._ids.get(name)
            if acc is None or acc.state.device != x.device:
                acc = self._ids[name] = IdAccumulator(
                    x.device, self.config.exact_ids, self.config.hashed_ids, path=self.path
                )
            acc.add(x)

    def take(self, *, keep: bool = False) -> dict[str, Any]:
        """Device copies of every accumulator (zeroed unless ``keep``); host conversion is later."""
        with self._lock:
            out: dict[str, Any] = {}
            for name, slot in self._channels.items():
                n, sums = slot
                if n:
                    out[name] = ("float", n, copy_to_host([sums]))
                    if not keep:
                        slot[0] = 0
                        sums.zero_()
            for name, acc in self._ids.items():
                out[name] = ("ids", acc.take(keep=keep), acc.exact, acc.hashed)
            return out


def inputs_to_host(taken: Mapping[str, Any]) -> dict[str, InputStats]:
    """Worker side of :meth:`InputAccumulators.take` (waits for the copies)."""
    out = {}
    for name, item in taken.items():
        if item[0] == "float":
            out[name] = InputStats("float", item[1], tuple(item[2].wait()[0].tolist()))
        else:
            ids = IdStats.from_state(item[1].wait()[0].numpy(), item[2], item[3])
            if ids.count:
                out[name] = InputStats("ids", ids=ids)
    return out


class Inputs(Monitor):
    """The input monitor of a watch: float inputs measured like outputs (through ``measure``)
    plus channel means; integer inputs into frequency sketches. Value: ``{position: InputStats}``."""

    name = "inputs"
    error_key = INPUT

    def __init__(
        self, config: InputMonitor, measure: Callable[[Call, str, torch.Tensor], None], *, path: str | None = None
    ) -> None:
        self.config = config
        self.accumulators = InputAccumulators(config, path=path)
        self._measure = measure

    def before_call(self, call: Call, args: Any, kwargs: dict[str, Any]) -> None:
        acc = self.accumulators
        limit = self.config.max_inputs
        n = 0
        with torch.no_grad():
            for base, value in [*((f"[{i}]" if i else "", v) for i, v in enumerate(args)),
                                *((f".{k}", v) for k, v in kwargs.items())]:  # fmt: skip
                found = (("", value),) if type(value) is torch.Tensor else tensors_in(value)
                for label, x in found:
                    if n >= limit:
                        return
                    if type(x) not in PLAIN_TENSOR_TYPES or x.layout is not torch.strided or x.is_meta:
                        continue
                    name = INPUT + base + label
                    if x.is_floating_point():
                        n += 1
                        self._measure(call, name, x)
                        acc.add_float(name, x)
                    elif x.dtype in ID_DTYPES:
                        n += 1
                        acc.add_ids(name, x)

    def take(self, *, keep: bool) -> dict[str, Any] | None:
        return self.accumulators.take(keep=keep) or None

    def collect(self, taken: dict[str, Any] | None, ctx: Collect) -> dict[str, InputStats]:
        return inputs_to_host(taken or {})

    def merge(self, earlier: dict[str, InputStats], later: dict[str, InputStats]) -> dict[str, InputStats]:
        out = dict(earlier)
        for name, stats in later.items():
            out[name] = out[name].merge(stats) if name in out else stats
        return out

    def active(self, value: dict[str, InputStats]) -> bool:
        return bool(value)

    def reset(self) -> None:
        self.accumulators.take(keep=False)


def _decode(doc: Any, where: str) -> dict[str, dict[str, Any]]:
    return {name: InputStats.summary_from_json(f) for name, f in entries(doc, where)}


def _export(value: Mapping[str, InputStats], record: Any) -> Iterator[Export]:
    """Per input position: channel means; an integer input's top value's share and distinct ids."""
    for name, stats in value.items():
        base = f"inputs/{name}/"
        for c, mean in enumerate(stats.channel_means or ()):
            yield Scalar(f"{base}channel_mean_{c}", mean)
        if stats.ids is not None:
            yield Scalar(base + "top1_fraction", stats.ids.top1_fraction)
            yield Scalar(base + "distinct", stats.ids.distinct)
            yield Series("torchwatch_input_top1_fraction", "gauge", "Share of an integer input's top value.",
                         stats.ids.top1_fraction, (("input", name),))  # fmt: skip


values.register("inputs", decode=_decode, export=_export)
