"""Two versions of a model side by side on the same inputs: :func:`compare` and :class:`Comparison`.

Per output: how often the versions agree on the top-1 class, the relative L2 distance and cosine
similarity of their outputs, the largest absolute difference; per module, how far the
candidate's activation statistics moved from the primary's.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _validate, formats
from .._files import atomic_write_text, parse_json, read_regular, shown
from .._pytree import call_batch, flatten_outputs, is_logits
from .._schema import Fields
from ..engine import watch_of
from ..errors import ConfigError, FormatError
from ..watch import attach

__all__ = ["Comparison", "ModuleDiff", "OutputAgreement", "compare"]

FORMAT = formats.COMPARISON


MODULE_STATS = ("mean", "std", "absmax", "zero_fraction", "nonfinite_fraction")


@dataclass(frozen=True)
class OutputAgreement:
    """How two versions' outputs agree, over every compared call.

    Attributes:
        name: the output's dotted name (``"logits"``, ``"output"`` for a bare tensor).
        rows: rows compared (``numel / last dim``); ``calls``: calls compared.
        top1: share of rows whose argmax agrees (logits-like outputs only, else None).
        rel_l2: ``||b - a|| / ||a||`` over all finite values; ``cosine``: cosine similarity of
            the two outputs as flat vectors; ``max_abs``: the largest ``|b - a|``.
        mismatched_shapes: calls whose output shapes differed (not compared).
    """

    name: str
    calls: int
    rows: int
    top1: float | None
    rel_l2: float
    cosine: float
    max_abs: float
    mismatched_shapes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class ModuleDiff:
    """One module statistic of the two versions. ``score``: ``|b - a|`` in units that compare across
    statistics: the primary's std for ``mean``, ``|a|`` for ``std`` and ``absmax`` (relative), as is
    for the fractions."""

    name: str
    stat: str
    a: float
    b: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare` or :meth:`Shadow.report`.

    Attributes:
        kind: ``"compare"`` or ``"shadow"``.
        calls: calls compared; for a shadow also ``seen`` (primary calls), ``sampled``, ``dropped``
            (queue full) and ``errors`` (candidate calls that raised).
        outputs: per output, an :class:`OutputAgreement`.
        modules: per module statistic, a :class:`ModuleDiff`, largest ``score`` first.
        notes: why something was not compared.
        min_top1, max_rel_l2: the limits :attr:`ok` applies.
    """

    kind: str
    calls: int
    outputs: tuple[OutputAgreement, ...]
    modules: tuple[ModuleDiff, ...] = ()
    seen: int = 0
    sampled: int = 0
    dropped: int = 0
    errors: int = 0
    notes: tuple[str, ...] = ()
    min_top1: float = 0.99
    max_rel_l2: float = 0.05
    time: float = field(default_factory=time.time)

    @property
    def failures(self) -> list[str]:
        """Why :attr:`ok` is False (empty when it is True)."""
        out = []
        for o in self.outputs:
            if o.top1 is not None and o.top1 < self.min_top1:
                out.append(f"{o.name}: top-1 agreement {o.top1:.2%} < {self.min_top1:.2%}")
            if o.top1 is None and not o.rel_l2 <= self.max_rel_l2:
                out.append(f"{o.name}: relative L2 distance {o.rel_l2:.3g} > {self.max_rel_l2:g}")
            if o.mismatched_shapes:
                out.append(f"{o.name}: shapes differ on {o.mismatched_shapes} call(s)")
        if self.errors:
            out.append(f"the candidate raised on {self.errors} call(s)")
        return out

    @property
    def ok(self) -> bool:
        """Compared something, and every output within the limits (top-1 for logits, rel-L2 else)."""
        return self.calls > 0 and not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "kind": self.kind, "time": self.time, "calls": self.calls, "seen": self.seen,
            "sampled": self.sampled, "dropped": self.dropped, "errors": self.errors, "ok": self.ok,
            "min_top1": self.min_top1, "max_rel_l2": self.max_rel_l2, "notes": list(self.notes),
            "failures": self.failures, "outputs": [o.to_dict() for o in self.outputs],
            "modules": [m.to_dict() for m in self.modules],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "comparison") -> Comparison:
        """Inverse of :meth:`to_dict`; FormatError naming ``where`` and any bad field."""
        f = Fields(d, where)
        if d.get("format") != FORMAT:
            found = d.get("format")
            raise FormatError(f"{where} is not a torchwatch comparison (format {found!r}, expected {FORMAT!r})")
        notes = f.list("notes")
        if not all(isinstance(n, str) for n in notes):
            raise FormatError(f"{where}: field 'notes' must be a list of strings")

        def items(key: str) -> list[Fields]:
            return [Fields(item, f"{where}, {key}[{i}]") for i, item in enumerate(f.list(key))]

        outputs = tuple(
            OutputAgreement(
                name=o.str("name"), calls=o.count("calls"), rows=o.count("rows"),
                top1=None if o.doc.get("top1") is None else o.float("top1"), rel_l2=o.float("rel_l2"),
                cosine=o.float("cosine"), max_abs=o.float("max_abs"), mismatched_shapes=o.count("mismatched_shapes"),
            )
            for o in items("outputs")
        )  # fmt: skip
        modules = tuple(
            ModuleDiff(name=m.str("name"), stat=m.str("stat"), a=m.float("a"), b=m.float("b"), score=m.float("score"))
            for m in items("modules")
        )
        return cls(
            kind=f.str("kind"), calls=f.count("calls"), seen=f.count("seen"), sampled=f.count("sampled"),
            dropped=f.count("dropped"), errors=f.count("errors"), notes=tuple(notes), min_top1=f.float("min_top1"),
            max_rel_l2=f.float("max_rel_l2"), time=f.float("time"), outputs=outputs, modules=modules,
        )  # fmt: skip

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as one JSON line (atomically); ``torchwatch report`` shows files of these."""
        atomic_write_text(path, formats.json_line(self.to_dict()).decode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Comparison:
        """The last comparison in a file written by :meth:`save` or a shadow's ``path``.

        Raises:
            FormatError: the file is missing, not a regular file, holds no comparison, or a
                line that is not one (a torn last line of a killed writer is skipped).
        """
        data = read_regular(path, "comparison")
        lines = [line for line in data.split(b"\n") if line.strip()]
        if lines and not data.endswith(b"\n"):
            lines.pop()  # the last line of a writer killed mid-write
        if not lines:
            raise FormatError(f"{shown(path)} holds no comparison")
        where = f"comparison {shown(path)} line {len(lines)}"
        return cls.from_dict(parse_json(lines[-1], where), where)

    def summary(self) -> str:
        """A few lines for a terminal."""
        head = f"{self.kind}: {self.calls} call(s) compared"
        if self.kind == "shadow":
            head += f" of {self.sampled} sampled ({self.seen} seen, {self.dropped} dropped, {self.errors} errors)"
        lines = [head + (" - OK" if self.ok else " - DIFFERENT")]
        for o in self.outputs:
            top1 = f"top-1 {o.top1:.2%}, " if o.top1 is not None else ""
            lines.append(f"  {o.name}: {top1}rel L2 {o.rel_l2:.3g}, cosine {o.cosine:.5f}, max |diff| {o.max_abs:.3g}")
        for m in self.modules[:5]:
            lines.append(f"  module {m.name or '<root>'} {m.stat}: {m.a:.4g} -> {m.b:.4g} (score {m.score:.3g})")
        lines += [f"  ! {f}" for f in self.failures] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Agreement:
    """Running sums for one output's agreement."""

    __slots__ = ("calls", "dot", "matches", "max_abs", "mismatched", "rows", "sq_a", "sq_b", "sq_d", "top1")

    def __init__(self) -> None:
        self.calls = self.rows = self.matches = self.mismatched = 0
        self.sq_a = self.sq_b = self.sq_d = self.dot = self.max_abs = 0.0
        self.top1: bool | None = None

    def add(self, a: torch.Tensor, b: torch.Tensor, logits: bool) -> None:
        if a.shape != b.shape:
            self.mismatched += 1
            return
        self.calls += 1
        a, b = a.detach().double(), b.detach().double()
        rows = a.numel() // a.shape[-1] if a.dim() and a.shape[-1] else a.numel()
        self.rows += rows
        finite = torch.isfinite(a) & torch.isfinite(b)
        fa, fb = a[finite], b[finite]
        d = fb - fa
        sums = torch.stack([(fa * fa).sum(), (fb * fb).sum(), (d * d).sum(), (fa * fb).sum(),
                            d.abs().max() if d.numel() else d.new_zeros(())]).tolist()  # fmt: skip
        self.sq_a += sums[0]
        self.sq_b += sums[1]
        self.sq_d += sums[2]
        self.dot += sums[3]
        self.max_abs = max(self.max_abs, sums[4])
        if logits:
            self.top1 = True
            self.matches += int((a.argmax(-1) == b.argmax(-1)).sum())

    def result(self, name: str) -> OutputAgreement:
        rel = math.sqrt(self.sq_d / self.sq_a) if self.sq_a > 0 else (0.0 if self.sq_d == 0 else math.inf)
        norm = math.sqrt(self.sq_a * self.sq_b)
        cosine = self.dot / norm if norm > 0 else (1.0 if self.sq_a == self.sq_b else 0.0)
        top1 = self.matches / self.rows if self.top1 and self.rows else None
        return OutputAgreement(name, self.calls, self.rows, top1, rel, cosine, self.max_abs, self.mismatched)


class Comparer:
    """Output agreement accumulated over calls (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outputs: dict[str, _Agreement] = {}
        self.calls = 0

    def add(self, out_a: Any, out_b: Any) -> None:
        a, b = flatten_outputs(out_a), flatten_outputs(out_b)
        with self._lock:
            self.calls += 1
            for name, ta in a.items():
                agreement = self._outputs.setdefault(name, _Agreement())
                tb = b.get(name)
                if tb is None:
                    agreement.mismatched += 1
                    continue
                agreement.add(ta, tb.to(ta.device), is_logits(name, ta, len(a)))

    def results(self) -> tuple[OutputAgreement, ...]:
        with self._lock:
            return tuple(acc.result(name) for name, acc in self._outputs.items())


def module_diffs(
    stats_a: Mapping[str, Any], stats_b: Mapping[str, Any], stats: tuple[str, ...] = MODULE_STATS
) -> tuple[ModuleDiff, ...]:
    """Statistic differences of the positions both snapshots measured, largest score first."""
    out = []
    for name, a in stats_a.items():
        b = stats_b.get(name)
        if b is None or not a.count or not b.count:
            continue
        values = {
            "mean": (a.mean, b.mean, abs(b.mean - a.mean) / a.std if a.std > 0 else math.inf * (b.mean != a.mean)),
            "std": (a.std, b.std, _rel(a.std, b.std)),
            "absmax": (a.absmax, b.absmax, _rel(a.absmax, b.absmax)),
            "zero_fraction": (a.zeros / a.count, b.zeros / b.count, abs(b.zeros / b.count - a.zeros / a.count)),
            "nonfinite_fraction": (a.nonfinite / a.count, b.nonfinite / b.count,
                                   abs(b.nonfinite / b.count - a.nonfinite / a.count)),
        }  # fmt: skip
        for stat, (va, vb, score) in values.items():
            if stat not in stats:
                continue
            out.append(ModuleDiff(name, stat, float(va), float(vb), float(score) if not math.isnan(score) else 0.0))
    out.sort(key=lambda m: -m.score)
    return tuple(out)


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(b - a) / abs(a) if a != 0 and math.isfinite(a) else math.inf


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Any = None,
    *,
    batches: Iterable[Any] | None = None,
    modules: Any = None,
    min_top1: float = 0.99,
    max_rel_l2: float = 0.05,
) -> Comparison:
    """Run two versions of a model on the same inputs and compare outputs and module statistics.

    Args:
        model_a: the reference (the version in production).
        model_b: the candidate.
        inputs: one batch: a tensor (``model(x)``), a tuple or list (``model(*x)``) or a dict
            (``model(**x)``).
        batches: or an iterable of such batches.
        modules: which modules' statistics to compare (``attach(modules=...)`` selectors; default
            every leaf module). Skipped, with a note, for a model that is already watched.
        min_top1, max_rel_l2: the limits of :attr:`Comparison.ok`.

    Returns:
        A :class:`Comparison`; ``.summary()`` prints it, ``.save(path)`` writes it for ``torchwatch report``.

    Raises:
        ConfigError: neither or both of ``inputs``/``batches``, or not modules.

    Example:
        >>> import torch, torchwatch as tw
        >>> a = torch.nn.Linear(8, 4)
        >>> b = torch.nn.Linear(8, 4); _ = b.load_state_dict(a.state_dict())
        >>> result = tw.compare(a, b, torch.randn(32, 8))
        >>> result.ok, result.outputs[0].top1, result.outputs[0].rel_l2
        (True, 1.0, 0.0)
    """
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise ConfigError("compare() needs two torch.nn.Module models")
    if model_a is model_b:
        raise ConfigError("compare() needs two different models; deep-copy one to compare a model with itself")
    if (inputs is None) == (batches is None):
        raise ConfigError("compare() takes one batch as inputs= or an iterable as batches=, not both or neither")
    check_limits("compare()", min_top1, max_rel_l2)
    notes = []
    watches = []
    for label, model in (("a", model_a), ("b", model_b)):
        if watch_of(model) is not None:
            notes.append(f"model_{label} is already watched: module statistics not compared (detach its watch first)")
    if not notes:
        watches = [
            attach(m, modules=modules, rules=[], on_nonfinite="ignore", inputs=False) for m in (model_a, model_b)
        ]
    comparer = Comparer()
    try:
        with torch.no_grad():
            for batch in [inputs] if batches is None else batches:
                comparer.add(call_batch(model_a, batch), call_batch(model_b, batch))
        diffs = module_diffs(watches[0].snapshot(), watches[1].snapshot()) if watches else ()
    finally:
        for w in watches:
            w.detach()
    return Comparison("compare", comparer.calls, comparer.results(), diffs, notes=tuple(notes), min_top1=min_top1,
                      max_rel_l2=max_rel_l2)  # fmt: skip


def check_limits(owner: str, min_top1: object, max_rel_l2: object) -> None:
    _validate.number(owner, "min_top1", min_top1, low=0.0, high=1.0)
    _validate.number(owner, "max_rel_l2", max_rel_l2, low=0.0)
