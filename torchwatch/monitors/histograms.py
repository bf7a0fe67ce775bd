"""Magnitude histograms: per watched module, how many output values fall in each power-of-4 band of |x|.

The activation statistics say how far a module's values reach (abs-max) and how many a cast
would lose; a histogram shows the whole spread, the picture to look at when fp8/fp16 scales are
chosen or when a module's magnitudes creep. Fixed buckets, so intervals, replicas and model
versions compare bucket by bucket:

* bucket 0: ``|x| == 0``;
* buckets 1..21: ``(BOUNDS[i - 1], BOUNDS[i]]`` with ``BOUNDS = (0, 2^-24, 2^-22, ..., 2^16)``
  (2^-24 is fp16's smallest subnormal, 2^16 just above its largest finite value);
* bucket 22: ``|x| > 2^16`` (±Inf included). NaN is not counted here (the statistics count it).

Every floating-point tensor of a watched module's output is a position, named as the statistics
name them (``fqn``, ``fqn[1]``, ``fqn.key``). Measured in sampled eager calls, on the output's own
device (``bucketize`` and ``index_add_`` into a small int64 table: no host sync in the hook);
not under ``torch.compile`` or CUDA-graph capture. Not cheap: a binary search and an int64 index
per element (freed at once), about 20 ns per element on one Zen 1 core, which tripled a CPU
convnet's forward (``benchmarks/histograms_cost.py``): an opt-in for diagnosis on a few modules.

Use it with ``tw.attach(model, monitors=[tw.monitors.Histograms()])``. The value,
``record.extra["histograms"]`` (:class:`MagnitudeHistograms`), shows in TensorBoard as real
histograms of log2|x| (``histograms/<fqn>/log2_abs``), in Prometheus as cumulative counters
``torchwatch_abs_histogram_total{module, le}``, in JSON logs, and in ``torchwatch report``.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .. import values
from .._pytree import tensors_in
from .._schema import Fields
from .._transfer import HostCopy, copy_to_host, state_mode
from ..errors import ConfigError, FormatError
from ..kernels import PLAIN_TENSOR_TYPES
from ..values import Export, Histogram, Scalar, Series, module_label
from .base import Binding, Call, Collect, Monitor

BOUNDS = (0.0, *(2.0**e for e in range(-24, 17, 2)))  # bucketize boundaries: 22, so 23 buckets
BUCKETS = len(BOUNDS) + 1
# log2 edges of the nonzero buckets for TensorBoard: (0, 2^-24] shown as (-26, -24], > 2^16 as (16, 18]
LOG2_EDGES = (-26.0, *(float(e) for e in range(-24, 19, 2)))
POSITIONS_NOT_HISTOGRAMMED = "histogram positions not measured"


@dataclasses.dataclass(frozen=True)
class MagnitudeHistograms:
    """Per output position, counts of |x| in the fixed buckets (see :mod:`torchwatch.monitors.histograms`).

    Attributes:
        counts: position -> ``BUCKETS`` counts (zeros first, ``> 2^16`` last).
        bounds: the bucket boundaries (``BOUNDS``).
    """

    counts: Mapping[str, tuple[int, ...]]
    bounds: tuple[float, ...] = BOUNDS

    def merge(self, other: MagnitudeHistograms) -> MagnitudeHistograms:
        out = dict(self.counts)
        for name, c in other.counts.items():
            out[name] = tuple(a + b for a, b in zip(out[name], c, strict=True)) if name in out else c
        return MagnitudeHistograms(out)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": {name: list(c) for name, c in self.counts.items()}}

    @classmethod
    def from_dict(cls, doc: Any, where: str = "histograms") -> MagnitudeHistograms:
        """Inverse of :meth:`to_dict`; FormatError naming ``where`` and the bad field."""
        f = Fields(doc, where)
        bounds = f.numbers("bounds")
        if bounds is None or tuple(bounds) != BOUNDS:
            raise FormatError(f"{where}: field 'bounds' must be the {len(BOUNDS)} bucket bounds 0, 2^-24, ..., 2^16")
        counts = f.get("counts")
        if not isinstance(counts, Mapping):
            raise FormatError(f"{where}: field 'counts' must be an object of position -> counts")
        for name, c in counts.items():
            if not (isinstance(c, list) and len(c) == BUCKETS and all(type(v) is int and v >= 0 for v in c)):
                raise FormatError(f"{where}: counts of {name!r} must be {BUCKETS} non-negative integers")
        return cls({name: tuple(c) for name, c in counts.items()})

    def export(self, record: Any) -> Iterator[Export]:
        """TensorBoard: a histogram of log2|x| over the nonzero values and the zero fraction, per
        position; Prometheus: cumulative bucket counters (``le`` in |x|, ``"+Inf"`` last)."""
        for name, c in self.counts.items():
            label = module_label(name)
            total = sum(c)
            yield Histogram(f"histograms/{label}/log2_abs", LOG2_EDGES, tuple(float(v) for v in c[1:]))
            yield Scalar(f"histograms/{label}/zero_fraction", c[0] / total if total else math.nan)
            running = 0
            for bound, n in zip((*BOUNDS, math.inf), c, strict=True):
                running += n
                le = "+Inf" if bound == math.inf else f"{bound:g}"
                yield Series("torchwatch_abs_histogram", "counter", "Output values by |x| bucket (cumulative).",
                             running, (("module", label), ("le", le)))  # fmt: skip


class Histograms(Monitor):
    """The magnitude-histogram monitor (see the module docstring).

    Args:
        modules: names of the modules to histogram (default: every module the watch measures).
        max_positions: output positions kept (beyond: counted in
            ``watch.errors["histogram positions not measured"]``, warned once).
    """

    name = "histograms"

    def __init__(self, modules: list[str] | None = None, *, max_positions: int = 1024) -> None:
        self.modules = list(modules) if modules is not None else None
        self.max_positions = max_positions
        self._lock = threading.Lock()
        self._counts: dict[str, torch.Tensor] = {}  # position -> int64 [BUCKETS + 1] on its device (last: NaN)
        self._bounds: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._lost = 0
        self._fresh = False  # measured since the window was last cut

    def bind(self, binding: Binding) -> None:
        self._bus = binding.bus
        watched = dict(binding.modules)
        named = watched if self.modules is None else dict(binding.model.named_modules())
        missing = [n for n in (self.modules or ()) if n not in named]
        if missing:
            raise ConfigError(f"Histograms: the model has no modules {missing}; its modules include {list(named)[:6]}")
        for fqn in self.modules if self.modules is not None else list(watched):
            binding.on_output(fqn, named[fqn], self._measure(fqn), error_key=self.name)

    def _measure(self, fqn: str) -> Any:
        def measure(call: Call, output: Any) -> None:
            found = (("", output),) if type(output) is torch.Tensor else tensors_in(output)
            for label, x in found:
                if type(x) in PLAIN_TENSOR_TYPES and x.is_floating_point() and x.layout is torch.strided and x.numel():
                    self._add(fqn + label, x.detach())

        return measure

    def _add(self, name: str, x: torch.Tensor) -> None:
        with torch.no_grad():
            a = x.abs() if x.dtype in (torch.float32, torch.float64) else x.float().abs()
            bounds = self._bounds.get((a.device, a.dtype))
            if bounds is None:
                with state_mode():
                    bounds = self._bounds[(a.device, a.dtype)] = torch.tensor(BOUNDS, dtype=a.dtype, device=a.device)
            flat = a.reshape(-1)
            index = torch.bucketize(flat, bounds).masked_fill_(flat.isnan(), BUCKETS)
            with self._lock:
                counts = self._counts.get(name)
                if counts is None:
                    if len(self._counts) >= self.max_positions:
                        self._lost += 1
                        self._bus.warn_once(
                            "histogram-positions",
                            f"more than {self.max_positions} histogram positions; {name!r} and later new ones are "
                            f"not measured (watch.errors[{POSITIONS_NOT_HISTOGRAMMED!r}]). Pass "
                            "Histograms(modules=[...]) or a larger max_positions.",
                        )
                        return
                    with state_mode():
                        counts = self._counts[name] = torch.zeros(BUCKETS + 1, dtype=torch.int64, device=a.device)
                counts.index_add_(0, index, torch.ones((), dtype=torch.int64, device=a.device).expand(index.numel()))
                self._fresh = True

    def take(self, *, keep: bool) -> tuple[list[str], HostCopy] | None:
        with self._lock:
            if not self._counts or not (keep or self._fresh):
                return None
            self._fresh = self._fresh and keep
            names = list(self._counts)
            copy = copy_to_host(list(self._counts.values()))  # ordered before the zeroing on the device
            if not keep:
                with torch.no_grad():
                    for c in self._counts.values():
                        c.zero_()
        return names, copy

    def collect(self, taken: tuple[list[str], HostCopy] | None, ctx: Collect) -> MagnitudeHistograms | None:
        if taken is None:
            return None
        names, copy = taken
        return MagnitudeHistograms({n: tuple(t[:BUCKETS].tolist()) for n, t in zip(names, copy.wait(), strict=True)})

    def merge(self, earlier: MagnitudeHistograms, later: MagnitudeHistograms) -> MagnitudeHistograms:
        return earlier.merge(later)

    def active(self, value: MagnitudeHistograms | None) -> bool:
        return bool(value is not None and value.counts)

    def lost(self) -> dict[str, int]:
        return {POSITIONS_NOT_HISTOGRAMMED: self._lost}

    def reset(self) -> None:
        self.take(keep=False)


def _decode(doc: Any, where: str) -> MagnitudeHistograms:
    return MagnitudeHistograms.from_dict(doc, where)


def _export(value: MagnitudeHistograms, record: Any) -> Iterator[Export]:
    return value.export(record)


values.register(Histograms.name, decode=_decode, export=_export)
