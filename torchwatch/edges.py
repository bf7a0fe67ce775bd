"""What goes into the model and what comes out: input and output-quality monitors.

Both run in the watched model's root hooks on sampled eager calls and accumulate into small
tensors on the data's own device with torch operations only (no ``.item()``, no host sync; on CPU
the same operations are the CPU twin). At each flush the accumulators are copied and zeroed on the
serving thread (device-side copies) and turned into host statistics on the flush worker.

* :class:`InputMonitor` — the root call's tensor arguments. Floating-point inputs get the usual
  :class:`~torchwatch.ModuleStats` under ``"<input>"`` names (range, NaN/Inf, zeros, casts) plus
  per-channel means along dim 1 (an image's colour channels, a table's feature columns); integer
  inputs (token ids, categorical features, attention masks) get an :class:`IdStats` frequency
  sketch: exact counts for values in ``[0, exact_ids)`` (special tokens, padding, classes), a hashed
  count table for the rest, and a ring of recent values that names heavy hashed buckets.
* :class:`OutputMonitor` — a classifier or LM head's logits: softmax confidence (max
  probability), margin (top-1 minus top-2 probability), entropy, predicted-class histogram and the
  abstention rate below a threshold; with labels fed back later (:meth:`Watch.record_labels`),
  accuracy and expected calibration error (ECE).

The default rules chart these like the activation statistics (:class:`torchwatch.rules.EdgeChart`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import _validate
from ._schema import Fields
from .errors import ConfigError, FormatError
from .kernels.cpu import _cstats

__all__ = ["IdStats", "InputMonitor", "InputStats", "OutputMonitor", "OutputQuality"]

INPUT = "<input>"  # the name of the root call's first tensor argument; others: <input>[1], <input>.key
_P = 2_147_483_647  # 2**31 - 1: ids are reduced modulo this prime before hashing
_A, _B = 1_103_515_245, 12_345
RING = 256  # recent ids kept per integer input (names heavy hashed buckets)
RING_PER_CALL = 16
TOP = 10
ID_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def _state_mode() -> Any:
    """Accumulators are ordinary tensors even when first made inside ``torch.inference_mode``
    (an inference tensor cannot be updated in place by a later call outside it)."""
    return torch.inference_mode(False)


def _start_copy(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying an accumulator to the host without waiting: a pinned buffer and an event on
    CUDA (the caller may zero the accumulator right after; stream order keeps the copy first)."""
    with _state_mode():
        if t.device.type != "cuda":
            return t.clone(), None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done


def _finish_copy(started: tuple[torch.Tensor, Any]) -> torch.Tensor:
    """Wait (off the serving thread) for :func:`_start_copy`: polls the event, never blocks in CUDA."""
    host, done = started
    if done is not None:
        while not done.query():
            time.sleep(0.0002)
    return host


def resolve_path(device: torch.device, path: str | None) -> str:
    """How a monitor computes on ``device``: ``"torch"`` ops on accelerators (or when forced, the
    device path's CPU twin in tests); on CPU ``"c"`` (the extension) or ``"numpy"`` (without it, or
    forced)."""
    if device.type != "cpu" or path == "torch":
        return "torch"
    if path == "numpy" or _cstats is None:
        return "numpy"
    return "c"


def hashed_bucket(value: int, buckets: int) -> int:
    """The hashed bucket of an integer outside the exact range (host oracle of the device op)."""
    return ((value % _P) * _A + _B) % _P % buckets


# ---- integer frequency sketch -----------------------------------------------------------------


class _IdAccumulator:
    """Device-side counts for one integer input (or the predicted classes of an output).

    ``state`` (int64): [count, min, max, ring position, counts[exact + hashed], ring[RING]].
    On CPU the same arithmetic runs in one pass of the C extension (``_cstats.id_counts``), or in
    numpy where it was not built (a torch op costs ~5-20 us there, the C pass ~1 us for 128 ids);
    ``path="torch"`` forces the device path on CPU (its twin, tested), ``path="numpy"`` the fallback.
    """

    def __init__(self, device: torch.device, exact: int, hashed: int, *, path: str | None = None) -> None:
        self.exact, self.hashed = exact, hashed
        self._base = 4
        self._ring = 4 + exact + hashed
        with _state_mode():
            self.state = torch.zeros(self._ring + RING, dtype=torch.int64, device=device)
        self.path = path = resolve_path(device, path)
        self._np = self.state.numpy() if path != "torch" else None
        self._fresh()

    def _fresh(self) -> None:
        big = torch.iinfo(torch.int64)
        with torch.no_grad():
            self.state[1] = big.max
            self.state[2] = big.min

    def add(self, ids: torch.Tensor) -> None:
        if self.path == "c":  # fewest tensor calls: each costs microseconds on a small CPU
            v = ids if ids.dtype is torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()
            n = v.numel()
            if n:
                _cstats.id_counts(v.data_ptr(), n, self.state.data_ptr(), self.exact, self.hashed, RING, RING_PER_CALL)
            return
        v = ids.detach().reshape(-1)
        n = v.numel()
        if n == 0:
            return
        v = v.to(torch.int64)
        if self._np is not None:
            self._add_numpy(v.numpy(), n)
            return
        s = self.state
        s[0:1] += n
        torch.minimum(s[1:2], v.min().reshape(1), out=s[1:2])
        torch.maximum(s[2:3], v.max().reshape(1), out=s[2:3])
        inside = (v >= 0) & (v < self.exact)
        bucket = torch.remainder(torch.remainder(v, _P) * _A + _B, _P).remainder_(self.hashed).add_(self.exact)
        s[self._base : self._ring].index_add_(0, torch.where(inside, v, bucket), torch.ones_like(v))
        m = min(n, RING_PER_CALL)
        sample = v[:: max(1, n // m)][:m]
        where = (s[3] + torch.arange(sample.numel(), device=v.device)).remainder_(RING)
        s[self._ring :].index_copy_(0, where, sample)
        s[3:4] += sample.numel()

    def _add_numpy(self, v: np.ndarray, n: int) -> None:
        s, exact = self._np, self.exact
        s[0] += n
        s[1] = min(s[1], v.min())
        s[2] = max(s[2], v.max())
        bucket = (v % _P * _A + _B) % _P % self.hashed + exact
        index = np.where((v >= 0) & (v < exact), v, bucket)
        s[self._base : self._ring] += np.bincount(index, minlength=exact + self.hashed)
        m = min(n, RING_PER_CALL)
        sample = v[:: max(1, n // m)][:m]
        s[self._ring + (s[3] + np.arange(len(sample))) % RING] = sample
        s[3] += len(sample)

    def take(self, *, keep: bool = False) -> tuple[torch.Tensor, Any]:
        """Start a host copy of the counts (see :func:`_start_copy`); unless ``keep``, the
        accumulator restarts (the ring is kept: it names buckets)."""
        out = _start_copy(self.state)
        if keep:
            return out
        self.state[: self._ring].zero_()
        self._fresh()
        return out


@dataclass(frozen=True)
class IdStats:
    """Frequencies of an integer input (or of predicted classes) over an interval or since a reset.

    Attributes:
        count: values seen. ``min``/``max``: their range (None when no value).
        exact: how many values are counted exactly (``[0, exact)``); ``counts[:exact]`` are those
            counts and ``counts[exact:]`` the hashed buckets of all other values.
        recent: a sample of recent values (names the values behind heavy hashed buckets).
    """

    count: int
    min: int | None
    max: int | None
    exact: int
    counts: np.ndarray = field(repr=False)
    recent: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def from_state(cls, state: np.ndarray, exact: int, hashed: int) -> IdStats:
        count = int(state[0])
        ring_at = 4 + exact + hashed
        filled = min(int(state[3]), RING)
        return cls(
            count=count, min=int(state[1]) if count else None, max=int(state[2]) if count else None, exact=exact,
            counts=state[4:ring_at].astype(np.int64), recent=tuple(int(x) for x in state[ring_at : ring_at + filled]),
        )  # fmt: skip

    def merge(self, other: IdStats) -> IdStats:
        if not other.count:
            return self
        if not self.count:
            return other
        return IdStats(
            self.count + other.count, min(self.min, other.min), max(self.max, other.max), self.exact,
            self.counts + other.counts, (self.recent + other.recent)[-RING:],
        )  # fmt: skip

    @property
    def top1_fraction(self) -> float:
        """Share of the most frequent value (an upper bound when it is hashed): 1.0 for constant or
        padding-only inputs."""
        return float(self.counts.max()) / self.count if self.count else math.nan

    @property
    def distinct(self) -> float:
        """Distinct values: exact below ``exact``, a linear-counting estimate above."""
        if not self.count:
            return 0.0
        exact = int(np.count_nonzero(self.counts[: self.exact]))
        buckets = self.counts[self.exact :]
        empty = int(np.count_nonzero(buckets == 0))
        hashed = len(buckets) if empty == 0 else -len(buckets) * math.log(empty / len(buckets))
        return exact + hashed

    def top(self, k: int = TOP) -> list[tuple[int | None, int, bool]]:
        """The ``k`` most frequent values as ``(value, count, exact)``; a hashed bucket is named by
        a recent value that falls in it (None when none does) and its count is an upper bound."""
        order = np.argsort(-self.counts, kind="stable")[:k]
        names: dict[int, int] = {}
        hashed = len(self.counts) - self.exact
        for v in self.recent:
            if not 0 <= v < self.exact:
                names.setdefault(self.exact + hashed_bucket(v, hashed), v)
        out = []
        for i in order:
            c = int(self.counts[i])
            if c == 0:
                break
            out.append((int(i), c, True) if i < self.exact else (names.get(int(i)), c, False))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count, "min": self.min, "max": self.max, "top1_fraction": self.top1_fraction,
            "distinct": self.distinct, "top": [list(t) for t in self.top()],
        }  # fmt: skip

    @staticmethod
    def summary_from_json(f: Fields) -> dict[str, Any]:
        """The :meth:`to_dict` summary read back from JSON, every field checked (FormatError)."""
        top = []
        for item in f.list("top"):
            ok = isinstance(item, list) and len(item) == 3 and (item[0] is None or type(item[0]) is int)
            if not (ok and type(item[1]) is int and isinstance(item[2], bool)):
                raise FormatError(f"{f.where}: field 'top' must hold [value, count, exact] items, got {item!r}")
            top.append(tuple(item))
        return {
            "count": f.count("count"), "min": f.int("min", None), "max": f.int("max", None),
            "top1_fraction": f.float("top1_fraction"), "distinct": f.float("distinct"), "top": top,
        }  # fmt: skip


# ---- inputs ------------------------------------------------------------------------------------


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


class _InputAccumulators:
    """Per input position: channel sums (float) or an id sketch (integer), on the input's device."""

    def __init__(self, config: InputMonitor, *, path: str | None = None) -> None:
        self.config = config
        self.path = path  # see resolve_path
        self._lock = threading.Lock()
        self._ids: dict[str, _IdAccumulator] = {}
        self._channels: dict[str, list[Any]] = {}  # name -> [elements per channel (host), sums (device)]

    def add_float(self, name: str, x: torch.Tensor) -> None:
        if x.dim() < 2 or not 2 <= x.shape[1] <= self.config.channels or x.numel() == 0:
            return
        dims = [d for d in range(x.dim()) if d != 1]
        sums = x.detach().sum(dim=dims, dtype=torch.float64)
        with self._lock:
            slot = self._channels.get(name)
            if slot is None or slot[1].numel() != sums.numel() or slot[1].device != sums.device:
                with _state_mode():
                    slot = self._channels[name] = [0, torch.zeros(sums.shape, dtype=sums.dtype, device=sums.device)]
            slot[0] += x.numel() // x.shape[1]
            slot[1] += sums

    def add_ids(self, name: str, x: torch.Tensor) -> None:
        with self._lock:
            acc = self._ids.get(name)
            if acc is None or acc.state.device != x.device:
                acc = self._ids[name] = _IdAccumulator(
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
                    out[name] = ("float", n, _start_copy(sums))
                    if not keep:
                        slot[0] = 0
                        sums.zero_()
            for name, acc in self._ids.items():
                out[name] = ("ids", acc.take(keep=keep), acc.exact, acc.hashed)
            return out


def inputs_to_host(taken: Mapping[str, Any]) -> dict[str, InputStats]:
    """Worker side of :meth:`_InputAccumulators.take` (waits for the copies)."""
    out = {}
    for name, item in taken.items():
        if item[0] == "float":
            out[name] = InputStats("float", item[1], tuple(_finish_copy(item[2]).tolist()))
        else:
            ids = IdStats.from_state(_finish_copy(item[1]).numpy(), item[2], item[3])
            if ids.count:
                out[name] = InputStats("ids", ids=ids)
    return out


# ---- outputs -----------------------------------------------------------------------------------

_SUMS = ("confidence", "confidence_sq", "margin", "entropy", "normalized_entropy", "abstained", "nonfinite")


@dataclass(frozen=True)
class OutputMonitor:
    """Output-quality monitoring of a classifier or LM head (``attach(outputs=...)``).

    Args:
        select: which tensor of the model's output holds the logits: a key or attribute name
            (``"logits"`` for Hugging Face outputs), an index into a tuple, a callable
            ``output -> tensor``, or None for a model that returns the logits tensor itself.
        abstain_below: a row whose confidence (max softmax probability) is below this counts as
            an abstention.
        positions: ``"all"`` rows of ``logits.reshape(-1, classes)``, or ``"last"``: only the last
            position of a ``[batch, seq, vocab]`` LM output (the token being generated).
        max_classes: classes counted exactly in the predicted-class histogram; higher class ids
            (an LM vocabulary) go to 1024 hashed buckets.
        max_traces: calls whose predictions are kept for :meth:`Watch.record_labels` (by trace id).
        calibration_bins: equal-width confidence bins of the expected calibration error.
    """

    select: str | int | Callable[[Any], Any] | None = "logits"
    abstain_below: float = 0.5
    positions: str = "all"
    max_classes: int = 1024
    max_traces: int = 4096
    calibration_bins: int = 15

    def __post_init__(self) -> None:
        if not (self.select is None or isinstance(self.select, (str, int)) or callable(self.select)):
            raise ConfigError(f"OutputMonitor select must be a key, an index, a callable or None, got {self.select!r}")
        _validate.number("OutputMonitor", "abstain_below", self.abstain_below, low=0.0, high=1.0)
        _validate.one_of("OutputMonitor", "positions", self.positions, ("all", "last"))
        for name, high in (("max_classes", 1 << 20), ("max_traces", 1 << 20), ("calibration_bins", 1 << 12)):
            _validate.integer("OutputMonitor", name, getattr(self, name), high=high)

    def logits(self, output: Any) -> torch.Tensor:
        """The logits tensor of a model output as ``[rows, classes]`` (raises :class:`OutputError`)."""
        sel = self.select
        try:
            if sel is None:
                x = output
            elif callable(sel):
                x = sel(output)
            elif isinstance(sel, str):
                x = output[sel] if isinstance(output, Mapping) else getattr(output, sel)
            else:
                x = output[sel]
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise OutputError(f"the model's output has no {sel!r} ({type(output).__name__}): {exc!r}") from None
        if not isinstance(x, torch.Tensor):
            raise OutputError(f"outputs selector {sel!r} gave a {type(x).__name__}, not a logits tensor")
        if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] < 2:
            raise OutputError(
                f"outputs selector {sel!r} gave a {x.dtype} tensor of shape {tuple(x.shape)}: logits are floating "
                "point with the classes in the last dimension (at least 2)"
            )
        if self.positions == "last" and x.dim() >= 3:
            x = x[:, -1]
        return x.detach().reshape(-1, x.shape[-1])


class OutputError(ValueError):
    """The selected output is not a logits tensor (counted in ``watch.errors["outputs"]``)."""


@dataclass(frozen=True)
class OutputQuality:
    """Output quality over an interval or since a reset.

    Attributes:
        rows: rows (predictions) measured; ``nonfinite`` of them had NaN/Inf logits and are left
            out of the means.
        confidence, margin, entropy, normalized_entropy: means over the finite rows (entropy in
            nats; normalized: divided by log(classes), 1.0 = uniform).
        abstention_rate: share of finite rows with confidence below ``abstain_below``.
        classes: the predicted-class :class:`IdStats`.
        labelled: rows with labels fed back (:meth:`Watch.record_labels`); ``accuracy`` and
            ``ece`` (expected calibration error) over them, NaN when none.
    """

    rows: int = 0
    sums: tuple[float, ...] = (0.0,) * len(_SUMS)
    classes: IdStats | None = None
    labelled: int = 0
    bins: np.ndarray | None = field(default=None, repr=False)  # [bins, 3]: count, sum confidence, correct

    def _mean(self, i: int) -> float:
        finite = self.rows - self.sums[6]
        return self.sums[i] / finite if finite > 0 else math.nan

    @property
    def nonfinite(self) -> int:
        return int(self.sums[6])

    @property
    def confidence(self) -> float:
        return self._mean(0)

    @property
    def margin(self) -> float:
        return self._mean(2)

    @property
    def entropy(self) -> float:
        return self._mean(3)

    @property
    def normalized_entropy(self) -> float:
        return self._mean(4)

    @property
    def abstention_rate(self) -> float:
        return self._mean(5)

    @property
    def accuracy(self) -> float:
        return float(self.bins[:, 2].sum() / self.labelled) if self.labelled else math.nan

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of (rows in bin / rows) x |accuracy - confidence|."""
        if not self.labelled:
            return math.nan
        b = self.bins
        return float(np.abs(b[:, 2] - b[:, 1]).sum() / self.labelled)

    def merge(self, other: OutputQuality) -> OutputQuality:
        classes = _merged(self.classes, other.classes, lambda a, b: a.merge(b))
        bins = _merged(self.bins, other.bins, lambda a, b: a + b)
        return OutputQuality(
            self.rows + other.rows, tuple(a + b for a, b in zip(self.sums, other.sums, strict=True)), classes,
            self.labelled + other.labelled, bins,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "nonfinite": self.nonfinite, "confidence": self.confidence, "margin": self.margin,
            "entropy": self.entropy, "normalized_entropy": self.normalized_entropy,
            "abstention_rate": self.abstention_rate, "classes": self.classes.to_dict() if self.classes else None,
            "labelled": self.labelled, "accuracy": self.accuracy, "ece": self.ece,
            "calibration_bins": self.bins.tolist() if self.labelled else None,  # [count, confidence sum, correct]
        }  # fmt: skip

    @staticmethod
    def summary_from_json(f: Fields) -> dict[str, Any]:
        """The :meth:`to_dict` summary read back from JSON, every field checked (FormatError)."""
        classes = f.obj("classes", optional=True)
        bins = f.list("calibration_bins") or None
        if bins is not None and not all(
            isinstance(b, list) and len(b) == 3 and all(type(v) in (int, float) for v in b) for b in bins
        ):
            raise FormatError(f"{f.where}: field 'calibration_bins' must hold [count, confidence sum, correct] items")
        out: dict[str, Any] = {"rows": f.count("rows"), "nonfinite": f.count("nonfinite")}
        out["labelled"] = f.count("labelled")
        for key in ("confidence", "margin", "entropy", "normalized_entropy", "abstention_rate", "accuracy", "ece"):
            value = f.float(key)
            out[key] = None if math.isnan(value) else value
        out["classes"] = IdStats.summary_from_json(classes) if classes is not None else None
        out["calibration_bins"] = bins
        return out


def _merged(a: Any, b: Any, merge: Callable[[Any, Any], Any]) -> Any:
    return b if a is None else a if b is None else merge(a, b)


class _OutputAccumulator:
    """Device-side sums of one watch's output quality, plus predictions kept for labels."""

    def __init__(self, config: OutputMonitor, *, path: str | None = None) -> None:
        self.config = config
        self.path = path  # see resolve_path
        self._lock = threading.Lock()
        self._sums: torch.Tensor | None = None
        self._rows = 0
        self._classes: _IdAccumulator | None = None
        self._traces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # insertion-ordered, bounded
        self._bins = np.zeros((config.calibration_bins, 3))
        self._labelled = 0
        self.unknown_traces = 0

    def observe(self, output: Any, trace_id: str | None) -> None:
        z = self.config.logits(output).float()
        if z.shape[0] == 0:
            return
        path = resolve_path(z.device, self.path)
        if path == "c":
            self._observe_c(z, trace_id)
            return
        if path == "numpy":
            sums, pred, conf = self._quality_numpy(z)
        else:
            sums, pred, conf = self._quality_torch(z)
        self._add(sums, pred, conf, z.shape[0], trace_id)

    def _observe_c(self, z: torch.Tensor, trace_id: str | None) -> None:
        """The CPU path of :meth:`_quality_torch`: one pass of the C extension, adding into the sums."""
        z = z if z.is_contiguous() else z.contiguous()
        rows, k = z.shape
        pred = torch.empty(rows, dtype=torch.int64)
        conf = torch.empty(rows, dtype=torch.float32) if trace_id is not None else None
        with self._lock:
            if self._sums is None or self._sums.device.type != "cpu":
                self._new_sums(torch.device("cpu"))
            _cstats.logit_quality(z.data_ptr(), rows, k, float(self.config.abstain_below), self._sums.data_ptr(),
                                  pred.data_ptr(), conf.data_ptr() if conf is not None else 0)  # fmt: skip
            self._rows += rows
            self._classes.add(pred)
            if trace_id is not None:
                self._keep(trace_id, pred, conf)

    def _new_sums(self, device: torch.device) -> None:  # caller holds the lock
        with _state_mode():
            self._sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        self._classes = _IdAccumulator(device, self.config.max_classes, 1024, path=self.path)

    def _keep(self, trace_id: str, pred: torch.Tensor, conf: torch.Tensor) -> None:  # caller holds the lock
        self._traces.pop(trace_id, None)
        self._traces[trace_id] = (pred, conf)
        if len(self._traces) > self.config.max_traces:
            del self._traces[next(iter(self._traces))]

    def _add(self, sums: torch.Tensor, pred: torch.Tensor, conf: torch.Tensor, rows: int, trace_id: str | None) -> None:
        with self._lock:
            if self._sums is None or self._sums.device != sums.device:
                self._new_sums(sums.device)
            self._sums += sums
            self._rows += rows
            self._classes.add(pred)
            if trace_id is not None:
                self._keep(trace_id, pred, conf)

    def _quality_numpy(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CPU path without the C extension: the same quantities in numpy (float32)."""
        z = z.numpy()
        finite = np.isfinite(z).all(axis=-1)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            shifted = z - z.max(axis=-1, keepdims=True)
            e = np.exp(shifted)
            total = e.sum(axis=-1, keepdims=True)
            p = e / total
            logp = shifted - np.log(total)
            top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[:, -2:]
            conf, second = top2.max(axis=-1), top2.min(axis=-1)
            entropy = -np.where(p > 0, p * logp, 0.0).sum(axis=-1)
        values = np.stack([conf, conf * conf, conf - second, entropy, entropy / math.log(z.shape[-1]),
                           (conf < self.config.abstain_below).astype(np.float32)])  # fmt: skip
        sums = np.append(np.where(finite, values, 0.0).sum(axis=1, dtype=np.float64), float((~finite).sum()))
        pred = torch.from_numpy(p.argmax(axis=-1))
        return torch.from_numpy(sums), pred, torch.from_numpy(np.where(finite, conf, np.nan))

    def _quality_torch(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-interval sums (confidence, its square, margin, entropy, normalised entropy,
        abstentions over finite rows; non-finite rows), predicted classes and confidences."""
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        top = p.topk(2, dim=-1)
        conf = top.values[:, 0]
        finite = torch.isfinite(z).all(dim=-1)
        entropy = torch.special.entr(p).sum(dim=-1)
        values = torch.stack([
            conf, conf * conf, conf - top.values[:, 1], entropy, entropy / math.log(z.shape[-1]),
            (conf < self.config.abstain_below).to(conf.dtype),
        ])  # fmt: skip
        sums = torch.cat([torch.where(finite, values, 0.0).sum(dim=1, dtype=torch.float64),
                          (~finite).sum().reshape(1).to(torch.float64)])  # fmt: skip
        return sums, top.indices[:, 0], torch.where(finite, conf, math.nan)

    def record_labels(self, trace_ids: list[str], labels: list[Any]) -> tuple[int, list[str]]:
        """Match labels to kept predictions (host side; may wait for the device). Checks every
        label before using any, so a bad call changes nothing."""
        with self._lock:
            kept = [self._traces.get(tid) for tid in trace_ids]
        unknown = [tid for tid, k in zip(trace_ids, kept, strict=True) if k is None]
        pairs = []
        for tid, k, label in zip(trace_ids, kept, labels, strict=True):
            if k is None:
                continue
            pred, conf = k
            y = torch.as_tensor(label).reshape(-1)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ConfigError(f"record_labels: labels must be integer class ids, got {y.dtype} for trace {tid!r}")
            if y.numel() != pred.numel():
                raise ConfigError(
                    f"record_labels: trace {tid!r} made {pred.numel()} prediction(s) but got {y.numel()} label(s); "
                    "pass one label per row of that call's logits"
                )
            pairs.append((pred, conf, y.to(torch.int64)))
        k = self.config.calibration_bins
        bins = np.zeros_like(self._bins)
        rows = 0
        for pred, conf, y in pairs:
            pred, conf, y = pred.cpu().numpy(), conf.cpu().double().numpy(), y.numpy()
            keep = (y >= 0) & np.isfinite(conf)  # negative labels (-100: ignore) and NaN rows left out
            pred, conf, y = pred[keep], conf[keep], y[keep]
            which = np.minimum((conf * k).astype(np.int64), k - 1)
            np.add.at(bins, (which, 0), 1.0)
            np.add.at(bins, (which, 1), conf)
            np.add.at(bins, (which, 2), (pred == y).astype(np.float64))
            rows += len(y)
        with self._lock:
            for tid, k in zip(trace_ids, kept, strict=True):
                if k is not None and self._traces.get(tid) is k:
                    del self._traces[tid]  # a trace's labels count once
            self._bins += bins
            self._labelled += rows
            self.unknown_traces += len(unknown)
        return rows, unknown

    def take(self, *, keep: bool = False) -> tuple[Any, ...] | None:
        with self._lock:
            if not (self._rows or self._labelled):
                return None
            sums = None if self._sums is None else _start_copy(self._sums)
            classes = None
            if self._classes is not None:
                classes = (self._classes.take(keep=keep), self._classes.exact, self._classes.hashed)
            out = (self._rows, sums, classes, self._labelled, self._bins.copy())
            if not keep:
                if self._sums is not None:
                    self._sums.zero_()
                self._rows = self._labelled = 0
                self._bins[:] = 0
            return out


def output_to_host(taken: tuple[Any, ...] | None) -> OutputQuality | None:
    if taken is None:
        return None
    rows, sums, classes, labelled, bins = taken
    ids = IdStats.from_state(_finish_copy(classes[0]).numpy(), classes[1], classes[2]) if classes is not None else None
    values = tuple(_finish_copy(sums).tolist()) if sums is not None else (0.0,) * len(_SUMS)
    return OutputQuality(rows, values, ids, labelled, bins)
