"""Alerts, and the record of where NaN/Inf first appeared."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ._schema import Fields


@dataclass(frozen=True)
class Alert:
    """Something a person should look at.

    Attributes:
        rule: which rule fired (``"nonfinite"`` for NaN/Inf).
        module: fully-qualified name of the module (for ``"nonfinite"``: the origin, i.e. the
            first module in execution order whose output was not finite on that call).
        stat: the statistic (``"nan"``, ``"posinf"``, ``"neginf"``, ...).
        value: what was measured.
        expected: what was expected.
        call: index of the root call of the watched model (0-based; -1 outside any root call).
        time: Unix time when it was detected.
        cohort, trace_id: labels from :meth:`torchwatch.Watch.context` active on that call.
        message: one sentence for a person.
        replica: the replica that raised it (:class:`~torchwatch.Identity`), as written to logs;
            None on alerts still in the process that raised them.

    Example:
        >>> import torch, torchwatch as tw
        >>> model, seen = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()), []
        >>> with tw.attach(model, on_nonfinite=seen.append) as watch:
        ...     _ = model(torch.tensor([1.0, float("inf")]))
        >>> seen[0].rule, seen[0].module, seen[0].stat, seen[0].call
        ('nonfinite', '<input>', 'posinf', 0)
    """

    rule: str
    module: str
    stat: str
    value: float
    expected: float
    call: int
    time: float
    cohort: str | None
    trace_id: str | None
    message: str
    replica: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "alert") -> Alert:
        """Inverse of :meth:`to_dict` (null numbers read as NaN); FormatError naming a bad field."""
        f = Fields(data, where)
        return cls(
            rule=f.str("rule"), module=f.str("module"), stat=f.str("stat", ""), value=f.float("value"),
            expected=f.float("expected"), call=f.int("call", -1), time=f.float("time"), cohort=f.str("cohort", None),
            trace_id=f.str("trace_id", None), message=f.str("message", ""), replica=f.str("replica", None),
        )  # fmt: skip


@dataclass(frozen=True)
class FirstNonFinite:
    """Where a module's output first stopped being finite (since the last reset).

    Attributes:
        module: the module (output position) this record is about.
        call: root-call index of the first call on which it produced NaN/Inf.
        trace_id, cohort: labels of that call.
        origin: the first module, in execution order, to produce NaN/Inf on that call; where
            the failure started, as opposed to the layers it spread to.

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with tw.attach(model, on_nonfinite="ignore") as watch:
        ...     with watch.context(trace_id="req-7"):
        ...         _ = model(torch.tensor([[float("nan"), 1.0]]))
        ...     first = watch.snapshot().nonfinite["1"]
        >>> first.origin, first.call, first.trace_id
        ('<input>', 0, 'req-7')
    """

    module: str
    call: int
    trace_id: str | None
    cohort: str | None
    origin: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "non-finite record") -> FirstNonFinite:
        """Inverse of :meth:`to_dict`; FormatError naming a bad field."""
        f = Fields(data, where)
        return cls(
            module=f.str("module"), call=f.int("call"), trace_id=f.str("trace_id", None),
            cohort=f.str("cohort", None), origin=f.str("origin"),
        )  # fmt: skip


def nonfinite_alert(
    origin: str, counts: tuple[int, int, int], *, spread: int, call: int, cohort: str | None, trace_id: str | None
) -> Alert:
    """The ``"nonfinite"`` alert for one call.

    Args:
        origin: the first output position, in execution order, that held NaN/Inf on the call.
        counts: its (nan, +inf, -inf) counts; the alert's ``stat`` is the first nonzero one.
        spread: how many later output positions were non-finite too.
        call, cohort, trace_id: the call's index and labels.
    """
    stat, value = next((s, v) for s, v in zip(("nan", "posinf", "neginf"), counts, strict=True) if v)
    where = f"call {call}" if call >= 0 else "a call outside the watched model"
    trace = f" (trace {trace_id!r})" if trace_id is not None else ""
    kind = {"nan": "NaN", "posinf": "+Inf", "neginf": "-Inf"}[stat]
    if origin.startswith("<input>"):  # see torchwatch.monitors.inputs: the root call's own arguments
        message = f"{kind} arrived with the model's input {origin!r} on {where}{trace} (a data or preprocessing fault)"
    else:
        message = f"{kind} first appeared in {origin!r} on {where}{trace}"
    if spread:
        message += f" and spread to {spread} later module output(s)"
    return Alert(
        rule="nonfinite", module=origin, stat=stat, value=float(value), expected=0.0, call=call,
        time=time.time(), cohort=cohort, trace_id=trace_id, message=message,
    )  # fmt: skip


def call_nonfinite_alert(
    events: Sequence[tuple[int, str, int, int, int]], *, call: int, cohort: str | None, trace_id: str | None
) -> tuple[Alert, list[str]]:
    """The ``"nonfinite"`` alert of one call from its NaN/Inf measurements ``(seq, position, nan,
    +inf, -inf)`` in execution order (the first is the origin), and the positions that held any."""
    _, origin, nan, posinf, neginf = events[0]
    names = list(dict.fromkeys(name for _, name, *_ in events))
    alert = nonfinite_alert(origin, (nan, posinf, neginf), spread=len(names) - 1, call=call, cohort=cohort,
                            trace_id=trace_id)  # fmt: skip
    return alert, names
