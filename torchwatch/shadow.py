"""Two versions of a model side by side: offline (:func:`compare`) and on live traffic (:func:`shadow`).

The evidence for a canary deployment or a rollback: per output, how often the versions agree on
the top-1 class, the relative L2 distance and cosine similarity of their outputs, the largest
absolute difference; per module, how far the candidate's activation statistics moved from the
primary's.

:func:`shadow` runs the candidate on a random sample of the primary's live calls on a background
thread: the serving thread only decides whether a call is sampled (two Python hooks, about a
microsecond) and, for a sampled call, copies its inputs and outputs (device-side copies on GPU,
no host sync). The candidate runs off the serving path; a full queue drops samples (counted)
rather than making the primary wait.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import random
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from . import _validate
from ._files import atomic_write, open_log, parse_json, read_regular, shown
from ._hooks import Hook
from ._schema import Fields
from .alerts import Alert
from .drift import call_batch
from .errors import ConfigError, FormatError, TorchwatchWarning
from .integrity.canary import _is_logits, flatten_outputs
from .sinks.base import _json_safe

__all__ = ["Comparison", "ModuleDiff", "OutputAgreement", "Shadow", "compare", "shadow"]

FORMAT = "torchwatch.comparison/1"
MODULE_STATS = ("mean", "std", "absmax", "zero_fraction", "nonfinite_fraction")
SHADOW_STATS = ("mean", "std", "zero_fraction", "nonfinite_fraction")


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
        line = json.dumps(_json_safe(self.to_dict())) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(line)

        atomic_write(path, write)

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


class _Comparer:
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
                agreement.add(ta, tb.to(ta.device), _is_logits(name, ta, len(a)))

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
    from .watch import _watches, attach

    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise ConfigError("compare() needs two torch.nn.Module models")
    if model_a is model_b:
        raise ConfigError("compare() needs two different models; deep-copy one to compare a model with itself")
    if (inputs is None) == (batches is None):
        raise ConfigError("compare() takes one batch as inputs= or an iterable as batches=, not both or neither")
    _limits("compare()", min_top1, max_rel_l2)
    notes = []
    watches = []
    for label, model in (("a", model_a), ("b", model_b)):
        other = _watches.get(model)
        if other is not None and other.attached:
            notes.append(f"model_{label} is already watched: module statistics not compared (detach its watch first)")
    if not notes:
        watches = [
            attach(m, modules=modules, rules=[], on_nonfinite="ignore", inputs=False) for m in (model_a, model_b)
        ]
    comparer = _Comparer()
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


def _copy(obj: Any) -> Any:
    """Own copies of the tensors in a call's arguments or output (the caller may reuse buffers)."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), obj)


class Shadow:
    """A candidate model run on a sample of a primary's live calls; see :func:`shadow`.

    Attributes:
        seen, sampled, dropped, errors: primary calls seen, sampled, dropped because the queue was
            full, and candidate calls that raised.
        alerts: ``"shadow"`` alerts raised (agreement below the limits), oldest first.
    """

    def __init__(
        self, primary: nn.Module, candidate: nn.Module, *, sample: float, seed: int | None, max_pending: int,
        modules: Any, path: str | os.PathLike[str] | None, write_every: int, min_top1: float, max_rel_l2: float,
        min_calls: int,
    ) -> None:  # fmt: skip
        from .watch import _watches, attach

        self._primary = primary
        self._candidate = candidate
        self.sample = sample
        self.min_top1, self.max_rel_l2, self.min_calls = min_top1, max_rel_l2, min_calls
        self._rng = random.Random(seed)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._comparer = _Comparer()
        self._tls = threading.local()
        self._lock = threading.Lock()
        self.seen = self.sampled = self.dropped = self.errors = 0
        self.alerts: list[Alert] = []
        self._alerted: set[str] = set()  # outputs alerted on
        self._warned: set[str] = set()
        self._path = os.fspath(path) if path is not None else None
        self._write_every = write_every
        self._notes: list[str] = []
        self._primary_watch = _watches.get(primary)
        self._watch = None
        other = _watches.get(candidate)
        if self._primary_watch is None or not self._primary_watch.attached:
            self._notes.append("the primary is not watched (tw.attach): module statistics not compared")
        elif other is not None and other.attached:
            self._notes.append("the candidate is already watched: module statistics not compared")
        else:
            try:
                self._watch = attach(candidate, modules=modules, rules=[], on_nonfinite="ignore", inputs=False)
            except ConfigError as exc:  # e.g. a selector that matches none of the candidate's modules
                self._notes.append(f"module statistics not compared: {exc}")
        self._closed = False
        self._stream: Any = None  # the candidate's CUDA stream, made on first use (shadow thread)
        # The thread holds the shadow weakly between samples, so a shadow dropped without close()
        # (with its models) is freed, and its finalizer ends the thread.
        self._thread = threading.Thread(
            target=_serve, args=(weakref.ref(self), self._queue), name="torchwatch-shadow", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._queue.put, None)
        self._handles = [
            primary.register_forward_pre_hook(Hook(self._before), with_kwargs=True),
            primary.register_forward_hook(Hook(self._after), always_call=True),
        ]

    # ---- serving thread ----------------------------------------------------------------------

    def _before(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        tls = self._tls
        depth = getattr(tls, "depth", 0)
        tls.depth = depth + 1
        if depth:
            return
        tls.inputs = None
        self.seen += 1
        if self._rng.random() >= self.sample:
            return
        try:
            tls.inputs = (_copy(args), _copy(kwargs))
        except Exception:  # noqa: BLE001 - the primary's call must go on
            self.errors += 1

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        tls = self._tls
        depth = getattr(tls, "depth", 0)
        if depth == 0:
            return
        tls.depth = depth - 1
        inputs, tls.inputs = getattr(tls, "inputs", None), None
        if depth > 1 or inputs is None:
            return
        try:
            expected = _copy(output)
            event = None
            if torch.cuda.is_available() and any(
                t.is_cuda for t in flatten_outputs(expected).values()
            ):  # the copies are queued on this stream: the worker waits for this event, not the host
                event = torch.cuda.Event()
                event.record()
            self._queue.put_nowait((inputs, expected, event))
            self.sampled += 1
        except queue.Full:
            self.dropped += 1
        except Exception:  # noqa: BLE001 - the primary's call must go on
            self.errors += 1

    # ---- shadow thread -----------------------------------------------------------------------

    def _compare_one(self, item: tuple[Any, Any, Any]) -> None:
        (args, kwargs), expected, event = item
        try:
            if event is not None:
                self._stream = self._stream or torch.cuda.Stream()
                self._stream.wait_event(event)
            stream_context = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
            with torch.no_grad(), stream_context:
                got = self._candidate(*args, **kwargs)
                self._comparer.add(expected, got)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is the finding, not a crash
            with self._lock:
                self.errors += 1
            self._warn_once("error", f"the shadow candidate raised {exc!r}; counted in shadow.errors")
        finally:
            self._queue.task_done()
        calls = self._comparer.calls
        if calls >= self.min_calls:
            self._check()
        if self._path is not None and calls and calls % self._write_every == 0:
            self._write()

    def _check(self) -> None:
        for o in self._comparer.results():
            bad = (o.top1 is not None and o.top1 < self.min_top1) or (o.top1 is None and o.rel_l2 > self.max_rel_l2)
            if not bad or o.name in self._alerted:
                continue
            self._alerted.add(o.name)
            if o.top1 is not None:
                stat, value, limit = "top1", o.top1, self.min_top1
            else:
                stat, value, limit = "rel_l2", o.rel_l2, self.max_rel_l2
            watch = self._primary_watch
            call = watch.calls - 1 if watch is not None else self.seen - 1  # the primary's call count
            alert = Alert(
                rule="shadow", module=o.name, stat=stat, value=float(value), expected=float(limit), call=call,
                time=time.time(), cohort=None, trace_id=None,
                message=f"shadow candidate disagrees with the primary on {o.name!r}: {stat} {value:.4g} over "
                f"{o.calls} calls (limit {limit:g})",
            )  # fmt: skip
            self.alerts.append(alert)
            watch = self._primary_watch
            if watch is not None and watch.attached:
                watch._deliver_monitor(alert, window=True)  # into the primary's sinks and incident log
            else:
                self._warn_once(f"alert:{o.name}", alert.message)

    def _write(self) -> None:
        try:
            line = (json.dumps(_json_safe(self.report().to_dict())) + "\n").encode()
            fd = open_log(self._path)  # a torn last line is cut; a FIFO without a reader fails, never blocks
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            self._warn_once("write", f"cannot write the shadow report to {shown(self._path)}: {exc}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"torchwatch: {message}", TorchwatchWarning, stacklevel=2)

    # ---- public ------------------------------------------------------------------------------

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait until every queued sample was compared; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def report(self) -> Comparison:
        """Agreement so far, and module statistic differences (candidate vs the primary's watch)."""
        diffs: tuple[ModuleDiff, ...] = ()
        pw = self._primary_watch
        if self._watch is not None and pw is not None and pw.attached:
            # a maximum grows with the number of calls seen: not comparable between sample and whole
            diffs = module_diffs(pw.snapshot(), self._watch.snapshot(), SHADOW_STATS)
        return Comparison(
            "shadow", self._comparer.calls, self._comparer.results(), diffs, seen=self.seen, sampled=self.sampled,
            dropped=self.dropped, errors=self.errors, notes=tuple(self._notes), min_top1=self.min_top1,
            max_rel_l2=self.max_rel_l2,
        )  # fmt: skip

    def close(self, timeout: float = 60.0) -> Comparison:
        """Stop sampling, finish the queued comparisons, write the final report; returns it."""
        if not self._closed:
            self._closed = True
            for h in self._handles:
                h.remove()
            self.wait(timeout)
            self._queue.put(None)
            self._thread.join(timeout)
        result = self.report()
        if self._watch is not None:
            self._watch.detach()
        if self._path is not None and result.calls:
            self._write()
        return result

    def __enter__(self) -> Shadow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(ref: weakref.ref[Shadow], samples: queue.Queue[Any]) -> None:
    """The shadow thread: compare each queued sample, holding the shadow only while it does."""
    while True:
        item = samples.get()
        shadow = ref() if item is not None else None
        if shadow is None:
            return
        shadow._compare_one(item)
        del shadow, item


def _limits(owner: str, min_top1: object, max_rel_l2: object) -> None:
    _validate.number(owner, "min_top1", min_top1, low=0.0, high=1.0)
    _validate.number(owner, "max_rel_l2", max_rel_l2, low=0.0)


def shadow(
    primary: nn.Module,
    candidate: nn.Module,
    *,
    sample: float = 0.01,
    seed: int | None = None,
    max_pending: int = 8,
    modules: Any = None,
    path: str | os.PathLike[str] | None = None,
    write_every: int = 100,
    min_top1: float = 0.99,
    max_rel_l2: float = 0.05,
    min_calls: int = 20,
) -> Shadow:
    """Run ``candidate`` on a random ``sample`` of ``primary``'s calls, off the serving path.

    The primary's answers are what callers get; the candidate's are only compared with them.
    Sampled calls' inputs and outputs are copied (the caller may reuse its buffers) and queued to a
    background thread that runs the candidate under ``torch.no_grad`` (on its own CUDA stream,
    after the copies) and accumulates per-output agreement. When the primary is watched
    (:func:`torchwatch.attach`), the candidate gets a watch of its own and :meth:`Shadow.report`
    also compares module statistics (the candidate's on the sampled calls with the primary
    watch's since its last reset: means, spreads and fractions compare; a maximum over more calls
    is larger); disagreement beyond the limits raises one ``"shadow"`` :class:`Alert` per output,
    delivered to the primary's watch (sinks, incident log) or warned.

    Args:
        primary, candidate: the serving model and the version under evaluation.
        sample: share of primary calls run on the candidate (0 < sample <= 1).
        seed: seed of the sampling decisions.
        max_pending: sampled calls waiting for the candidate; more are dropped (``dropped``).
        modules: the candidate watch's modules (``attach(modules=...)``).
        path: append the report as a JSON line here every ``write_every`` comparisons and at
            :meth:`Shadow.close` (``torchwatch report`` shows it).
        min_top1, max_rel_l2: agreement limits (top-1 for logits-like outputs, rel-L2 for others).
        min_calls: comparisons before the limits are applied.

    Returns:
        A :class:`Shadow` (context manager; ``close()`` returns the final :class:`Comparison`).

    Example:
        >>> import copy, torch, torchwatch as tw
        >>> primary = torch.nn.Linear(8, 4)
        >>> candidate = copy.deepcopy(primary)
        >>> with tw.shadow(primary, candidate, sample=1.0) as sh:
        ...     for _ in range(5):
        ...         _ = primary(torch.randn(16, 8))
        ...     sh.wait()
        ...     report = sh.report()
        True
        >>> report.calls, report.outputs[0].top1
        (5, 1.0)
    """
    if not isinstance(primary, nn.Module) or not isinstance(candidate, nn.Module):
        raise ConfigError("shadow() needs two torch.nn.Module models")
    if primary is candidate:
        raise ConfigError("shadow() needs two different models: the candidate is the primary")
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 < sample <= 1:
        raise ConfigError(f"shadow sample must be in (0, 1], got {sample!r}")
    for name, value in (("max_pending", max_pending), ("write_every", write_every), ("min_calls", min_calls)):
        _validate.integer("shadow()", name, value)
    _limits("shadow()", min_top1, max_rel_l2)
    _validate.seed("shadow()", "seed", seed)
    if path is not None:
        _validate.path("shadow()", "path", path)
    return Shadow(
        primary, candidate, sample=float(sample), seed=seed, max_pending=max_pending, modules=modules, path=path,
        write_every=write_every, min_top1=min_top1, max_rel_l2=max_rel_l2, min_calls=min_calls,
    )  # fmt: skip
