"""``torchwatch report`` on TensorBoard logs alone (no statistics JSONL): the per-interval scalars,
the alerts (the JSON records :class:`~torchwatch.TensorBoardSink` writes beside the *Text* tab's
lines) and, from the ``nonfinite`` alerts, where NaN/Inf started."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

from .._dist import install_hint
from .._files import parse_json, shown
from ..alerts import Alert
from ..errors import FormatError
from ..sinks.tensorboard import ALERT_RECORDS_TAG
from .report_data import LogData, ModuleSeries


def read_events(path: str, data: LogData) -> None:
    """Add one TensorBoard event file's scalars and alerts to ``data`` (an alerted module's own
    run is skipped: it copies the main run's numbers); a file TensorBoard cannot read is listed
    in ``data.skipped``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise FormatError(f"reading TensorBoard logs needs tensorboard: {install_hint('tensorboard')}") from None
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    try:
        acc.Reload()
    except Exception as exc:  # noqa: BLE001 - TensorBoard's reader raises its own types for corrupt files
        data.skipped.append(f"{shown(path)}: not a readable TensorBoard event file ({type(exc).__name__})")
        return
    scalars = acc.Tags().get("scalars", [])
    if all(_FLAGGED_TAG.fullmatch(tag) for tag in scalars) and scalars:
        return  # an alerted module's own run (TensorBoardSink): copies of the main run's numbers
    data.sources.append(path)
    data.exact = False
    alerts = _read_alerts(acc, scalars, path, data.skipped)
    data.alerts += alerts
    by_module: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    for tag in scalars:
        module, _, stat = tag.rpartition("/")
        events = acc.Scalars(tag)
        by_module[module][stat] = [(e.step, e.value) for e in events]
        if stat == "absmax":  # every module's is written at every flush: the records' steps and times
            for e in events:
                data.times[e.step] = e.wall_time
                data.first_time = min(data.first_time or e.wall_time, e.wall_time)
                data.last_time = max(data.last_time or e.wall_time, e.wall_time)
        parts = ["", "", *tag.split("/")]  # counted from the end: past a prefix such as "r0/"
        kind = (
            "inputs" if parts[-3] == "inputs"
            else "output quality" if parts[-2] == "outputs"
            else "latency" if parts[-2] == "torchwatch" and stat.startswith("latency_")
            else None
        )  # fmt: skip
        if kind and kind not in data.charted_only:
            data.charted_only.append(kind)
    for module, tags in by_module.items():
        if module == "torchwatch":
            data.steps = max([data.steps] + [step for step, _ in tags.get("alerts", [])])
            continue
        if module.startswith("drift/"):
            name = module.removeprefix("drift/")
            scores, ps = dict(tags.get("score", [])), dict(tags.get("p_value", []))
            data.drift[name] = [(s, scores[s], ps.get(s, 1.0)) for s in sorted(scores)]
            for s, alarms in tags.get("alarms", []) if not alerts else ():  # logs without alerts per rule
                for _ in range(_count(alarms)):
                    data.alerts.append(
                        {"rule": "drift", "module": name, "call": s, "time": None, "message": "drift alarm"}
                    )
            continue
        if "absmax" not in tags:  # not a module's statistics: inputs/, outputs, timing/, alert counts, flagged/
            continue
        m = data.modules.setdefault(module, ModuleSeries())
        nan, pos, neg = (dict(tags.get(k, [])) for k in ("nan", "posinf", "neginf"))
        for step, v in tags.get("absmax", []):
            bad = int(nan.get(step, 0) + pos.get(step, 0) + neg.get(step, 0))
            m.steps.append(step)
            m.absmax.append(v)
            m.nonfinite.append(bad)
            m.nan += int(nan.get(step, 0))
            m.posinf += int(pos.get(step, 0))
            m.neginf += int(neg.get(step, 0))
            if bad and m.first_nonfinite_step is None:
                m.first_nonfinite_step = step
            data.steps = max(data.steps, step)
        for stat, values in tags.items():
            for kind, target in (("underflow_frac_", m.under), ("overflow_frac_", m.over)):
                if stat.startswith(kind):
                    target[stat.removeprefix(kind)] = [v for _, v in values]


_FLAGGED_TAG = re.compile(r"(.*/)?flagged/[^/]+")
_ALERT_COUNT_TAG = re.compile(r"(?P<prefix>.*?)torchwatch/alerts/(?P<rule>.+)")
_ALERT_RECORDS_TAG = re.compile(rf"(?P<prefix>.*?){re.escape(ALERT_RECORDS_TAG)}")
MAX_ALERTS_PER_INTERVAL = 100_000  # a count read from a scalar: a corrupt or hostile value stays bounded


def _count(value: float) -> int:
    """An alert count written as a float scalar; not a count (NaN, negative): 0."""
    return min(int(value), MAX_ALERTS_PER_INTERVAL) if math.isfinite(value) and value >= 0 else 0


def _read_alerts(acc: Any, scalars: list[str], path: str, skipped: list[str]) -> list[dict[str, Any]]:
    """The alerts of a TensorBoard log, each interval's from its JSON record
    (``torchwatch/alert_records``); an interval whose record is missing or unreadable (listed in
    ``skipped``) still counts its alerts, from the per-rule scalars, without their details."""
    out: list[dict[str, Any]] = []
    read: set[tuple[str, int]] = set()
    for tag in acc.Tags().get("tensors", []):
        found = _ALERT_RECORDS_TAG.fullmatch(tag)
        for event in acc.Tensors(tag) if found else ():
            where = f"{shown(path)} step {event.step} alerts"
            try:
                docs = parse_json(b"".join(event.tensor_proto.string_val), where)
                if not isinstance(docs, list):
                    raise FormatError(f"{where}: expected a JSON list")
                out += [Alert.from_dict(d, f"{where}[{i}]").to_dict() for i, d in enumerate(docs)]
                read.add((found["prefix"], event.step))
            except FormatError as exc:
                skipped.append(str(exc))
    for tag in scalars:
        found = _ALERT_COUNT_TAG.fullmatch(tag)
        for e in acc.Scalars(tag) if found else ():
            if (found["prefix"], e.step) not in read:
                unread = {"rule": found["rule"], "module": "", "call": e.step - 1, "time": e.wall_time,
                          "trace_id": None, "message": "(alert details not in the log)"}  # fmt: skip
                out += [dict(unread) for _ in range(_count(e.value))]
    return out


def _is_call(call: object) -> bool:
    return isinstance(call, int) and not isinstance(call, bool) and call >= 0


def origins_from_alerts(data: LogData) -> None:
    """Where NaN/Inf started, for logs without records (TensorBoard): for each module whose output
    was not finite, the first ``nonfinite`` alert raised by a call of its first such interval."""
    found = [(a["call"], a) for a in data.alerts if a.get("rule") == "nonfinite" and _is_call(a.get("call"))]
    found.sort(key=lambda ca: ca[0])
    for name, m in data.modules.items():
        if m.first_nonfinite_step is None or name in data.origins:
            continue
        i = m.steps.index(m.first_nonfinite_step)
        since = m.steps[i - 1] if i else 0  # the interval's calls: since .. first_nonfinite_step - 1
        a = next((a for call, a in found if since <= call < m.first_nonfinite_step), None)
        if a is not None:
            data.origins[name] = {"origin": a["module"], "call": a["call"], "trace_id": a.get("trace_id")}
