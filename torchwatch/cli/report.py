"""``torchwatch report LOGDIR``: what a person needs first, from the logs torchwatch wrote.

Reads, anywhere under the directory, the :class:`~torchwatch.JsonlSink` statistics files
(exact counts and where NaN/Inf started), :class:`~torchwatch.IncidentLog` files (every alert),
and, when there is no statistics JSONL, TensorBoard event files (per-interval scalars and the
alerts' text; see :mod:`.report_tensorboard`). Prints: modules that went non-finite and the origin, the worst
cast underflow/overflow, drift alarms, and the alerts timeline — as text, JSON, or a small
self-contained HTML page with inline SVG charts.
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections import defaultdict
from typing import Any

from .. import formats, values
from .._files import open_regular, parse_json, read_regular, shown
from ..errors import FormatError
from ..records import Record, Warmup
from ..shadow import Comparison
from ..sinks.incidents import IncidentLog
from . import report_captures, report_tensorboard
from .report_data import LogData, ModuleSeries

STATS_FORMAT = formats.STATS
INCIDENT_FORMAT = formats.INCIDENT
COMPARISON_FORMAT = formats.COMPARISON


def _walk(logdir: str, skipped: list[str]) -> tuple[list[str], list[str], list[str], list[str], list[str], list[str]]:
    """The log files under ``logdir`` by kind, and the run markers; what cannot be read (dangling
    links, FIFOs, devices, unreadable files) is listed in ``skipped`` and never opened for reading."""
    stats, incidents, events, comparisons, markers, captures = [], [], [], [], [], []
    for root, _, files in os.walk(logdir):
        for f in sorted(files):
            is_events = f.startswith("events.out.tfevents")
            if f == formats.RUN_MARKER:
                markers.append(os.path.join(root, f))
            if not (is_events or f.endswith(".jsonl")):
                continue
            path = os.path.join(root, f)
            try:
                mode = os.stat(path).st_mode  # follows links: a dangling one raises
            except OSError as exc:
                skipped.append(f"{shown(path)}: {exc.strerror or exc}")
                continue
            if not stat.S_ISREG(mode):
                skipped.append(f"{shown(path)}: not a regular file")
                continue
            if is_events:
                events.append(path)
                continue
            try:
                with open_regular(path, "log") as fh:
                    head = fh.readline(1 << 16)
            except (FormatError, OSError) as exc:
                skipped.append(f"{shown(path)}: {exc}")
                continue
            if STATS_FORMAT.encode() in head:
                stats.append(path)
            elif INCIDENT_FORMAT.encode() in head:
                incidents.append(path)
            elif COMPARISON_FORMAT.encode() in head:
                comparisons.append(path)
            elif formats.CAPTURE.encode() in head:
                captures.append(path)
    return stats, incidents, events, comparisons, markers, captures


RUN_MARKER = formats.RUN_MARKER  # written by each demo run into its own directory


def choose_run(logdir: str | os.PathLike[str], *, all_runs: bool = False) -> tuple[str, dict[str, Any] | None]:
    """What to read of ``logdir``: itself, or, when its subdirectories are runs (each holding a
    :data:`RUN_MARKER`), the latest of them unless ``all_runs``. Returns the directory and, for a
    directory of runs, ``{"count", "reading", "all"}`` for the report to say so."""
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir) or os.path.exists(os.path.join(logdir, RUN_MARKER)):
        return logdir, None
    runs = []
    for entry in sorted(os.scandir(logdir), key=lambda e: e.name):
        marker = os.path.join(entry.path, RUN_MARKER)
        if entry.is_dir() and os.path.isfile(marker):
            try:
                started = float(parse_json(read_regular(marker, "run marker", limit=1 << 16), marker)["started"])
            except (FormatError, KeyError, TypeError, ValueError):
                started = os.stat(marker).st_mtime
            runs.append((started, entry.name, entry.path))
    if not runs:
        return logdir, None
    latest = max(runs)[2]
    info = {"count": len(runs), "reading": logdir if all_runs else latest, "all": all_runs}
    return (logdir if all_runs else latest), info


def load(logdir: str | os.PathLike[str]) -> LogData:
    """Read every torchwatch log under ``logdir``.

    Raises:
        FormatError: the directory does not exist or holds no readable torchwatch log, or a
            log holds a line that is not a record of its kind (named by file, line and field).
    """
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        raise FormatError(f"log directory {shown(logdir)} does not exist")
    data = LogData(logdir)
    stats, incidents, events, comparisons, markers, captures = _walk(logdir, data.skipped)
    if not (stats or incidents or events or comparisons or captures):
        why = f"; skipped {'; '.join(data.skipped[:3])}" if data.skipped else ""
        raise FormatError(
            f"{shown(logdir)} holds no torchwatch log (statistics *.jsonl, incident *.jsonl, captures.jsonl or "
            f"TensorBoard events){why}"
        )
    for path in stats:
        _read_stats(path, data)
    if not stats:
        for path in events:
            report_tensorboard.read_events(path, data)
        if events and not (incidents or comparisons) and not data.modules and not data.drift and not data.steps:
            raise FormatError(
                f"{shown(logdir)} holds no readable torchwatch log: its TensorBoard event file(s) hold no torchwatch "
                f"scalars ({shown(events[0])}{' and more' if len(events) > 1 else ''} are empty or corrupt)"
            )
        report_tensorboard.origins_from_alerts(data)
    seen = {_alert_key(a) for a in data.alerts}
    for path in incidents:
        data.sources.append(path)
        for incident in IncidentLog.read(path):
            lead = {k: v for k, v in incident.items() if k not in ("related", "summary")}
            for a in [lead, *incident.get("related", ())]:
                key = _alert_key(a)
                if key not in seen and (*key[:-1], None) not in seen:  # logs that do not name the replica
                    seen.add(key)
                    data.alerts.append(a)
    data.alerts.sort(key=lambda a: (a.get("time") or 0, a.get("call") or 0))
    for path in comparisons:
        data.sources.append(path)
        c = Comparison.load(path)
        data.comparisons.append({"file": path, **c.to_dict()})
    for path in captures:
        data.sources.append(path)
        data.captures += report_captures.read(path, data.skipped)
    data.captures.sort(key=lambda c: c.get("time") or 0)
    for path in markers:
        data.phases += _phases(path, data.skipped)
    data.phases.sort(key=lambda p: (p["time"] or 0, p["call"] or 0))
    return data


def _alert_key(a: dict[str, Any]) -> tuple[Any, ...]:
    """One alert, however it was logged (a record, the incident log, TensorBoard's text, whose
    times are the record's and whose messages are on one line)."""
    return (a.get("rule"), a.get("module"), a.get("call"), str(a.get("message", "")).replace("\n", " "),
            a.get("replica"))  # fmt: skip


def _phases(path: str, skipped: list[str]) -> list[dict[str, Any]]:
    """The phases a run marker lists (:data:`formats.RUN_MARKER`); a marker that cannot be read,
    or a phase without a name or a place, is listed in ``skipped``, the logs still read."""
    try:
        doc = parse_json(read_regular(path, "run marker", limit=1 << 20), path)
    except (FormatError, OSError) as exc:
        skipped.append(f"{shown(path)}: {exc}")
        return []
    phases = doc.get("phases", []) if isinstance(doc, dict) else None
    if not isinstance(phases, list):
        skipped.append(f"{shown(path)}: 'phases' is not a list")
        return []
    out = []
    for i, p in enumerate(phases):
        p = p if isinstance(p, dict) else {}
        name, call, t = p.get("name"), p.get("call"), p.get("time")
        call = call if isinstance(call, int) and not isinstance(call, bool) and call >= 0 else None
        t = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) else None
        if not isinstance(name, str) or (call is None and t is None):
            skipped.append(f"{shown(path)}: phase {i} needs a name and a call or time")
            continue
        out.append({"name": name, "call": call, "time": t})
    return out


def _read_stats(path: str, data: LogData) -> None:
    """Every record of a statistics JSONL, through the schema its writer uses (:meth:`Record.from_json`)."""
    data.sources.append(path)
    for where, doc in formats.read_jsonl(path, "statistics log", "statistics record", STATS_FORMAT):
        r = Record.from_json(doc, where)
        step, t = r.step, r.time
        data.calls += r.calls
        data.steps = max(data.steps, step)
        if not math.isnan(t):
            data.times[step] = t
            data.first_time = t if data.first_time is None else min(data.first_time, t)
            data.last_time = t if data.last_time is None else max(data.last_time, t)
        for name, s in r.stats.items():
            m = data.modules.setdefault(name, ModuleSeries())
            bad = s.nonfinite
            m.steps.append(step)
            m.nonfinite.append(bad)
            m.absmax.append(s.absmax)
            m.count += s.count
            m.nan += s.nan
            m.posinf += s.posinf
            m.neginf += s.neginf
            if bad and m.first_nonfinite_step is None:
                m.first_nonfinite_step = step
            for dtype, n in s.underflow.items():
                m.under[dtype].append(n / s.count if s.count else 0.0)
                m.under_total[dtype] += n
            for dtype, n in s.overflow.items():
                m.over[dtype].append(n / s.count if s.count else 0.0)
                m.over_total[dtype] += n
        replica = r.identity.replica if r.identity is not None else None
        if r.identity is not None:
            data.replicas.setdefault(replica, r.identity.to_dict())
        for name, first in r.nonfinite.items():
            data.origins.setdefault(name, {**first.to_dict(), "replica": replica})
        for name, d in r.drift.items():
            score = d.score if not math.isnan(d.score) else 0.0
            data.drift.setdefault(name, []).append((step, score, d.p_value if not math.isnan(d.p_value) else 1.0))
        data.alerts += [a.to_dict() | {"replica": a.replica or replica} for a in r.alerts]
        data.errors.update(r.errors)
        if r.outputs is not None:
            data.outputs.append((step, dict(r.outputs)))
        if r.latency is not None and r.latency.count:
            data.latency.append((step, r.latency.to_dict()))
        for name, i in r.inputs.items():
            data.inputs.setdefault(name, []).append((step, dict(i)))
        if r.baselines is not None and step >= data.baselines_step:
            data.baselines, data.baselines_step = r.baselines.to_dict(), step
        _read_histograms(r, data, where)


def _read_histograms(r: Record, data: LogData, where: str) -> None:
    """Sum the histograms the monitors' values in ``extra`` export (any monitor, through the value
    registry); a value its own export cannot read is noted in ``skipped``, not fatal."""
    for name, value in r.extra.items():
        try:
            found = [h for h in values.exports(name, value, r) if isinstance(h, values.Histogram)]
        except Exception as exc:  # noqa: BLE001 - a plug-in monitor's export must not stop the report
            data.skipped.append(f"{where}: the value of monitor {name!r} could not be summarised ({exc!r})")
            continue
        for h in found:
            known = data.histograms.get(h.tag)
            if known is None or known[0] != h.edges:
                data.histograms[h.tag] = (h.edges, list(h.counts))
            else:
                known[1][:] = [a + b for a, b in zip(known[1], h.counts, strict=True)]


def summarize(data: LogData, *, top: int = 5) -> dict[str, Any]:
    """The report as plain data (what ``--json`` prints)."""
    nonfinite = []
    for name, m in data.modules.items():
        if m.nan or m.posinf or m.neginf:
            origin = data.origins.get(name, {})
            nonfinite.append({
                "module": name, "nan": m.nan, "posinf": m.posinf, "neginf": m.neginf,
                "first_step": m.first_nonfinite_step, "origin": origin.get("origin"),
                "first_call": origin.get("call"), "first_trace": origin.get("trace_id"),
                "first_replica": origin.get("replica"),
            })  # fmt: skip
    nonfinite.sort(key=lambda x: x["first_call"] if x["first_call"] is not None else x["first_step"] or 0)
    casts: dict[str, dict[str, list[dict[str, Any]]]] = {"overflow": {}, "underflow": {}}
    for kind in ("overflow", "underflow"):
        per_dtype: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for name, m in data.modules.items():
            series = m.over if kind == "overflow" else m.under
            totals = m.over_total if kind == "overflow" else m.under_total
            for dtype, fractions in series.items():
                if data.exact:
                    fraction = totals[dtype] / m.count if m.count else 0.0
                else:
                    fraction = sum(fractions) / len(fractions) if fractions else 0.0
                if fraction > 0:
                    per_dtype[dtype].append({"module": name, "fraction": fraction, "worst_interval": max(fractions)})
        for dtype, rows in per_dtype.items():
            casts[kind][dtype] = sorted(rows, key=lambda r: -r["fraction"])[:top]
    drift = []
    for name, series in data.drift.items():
        alarms = [a for a in data.alerts if a.get("rule") == "drift" and a.get("module") == name]
        drift.append({
            "module": name, "windows_logged": len(series), "alarms": len(alarms),
            "first_alarm_call": alarms[0].get("call") if alarms else None,
            "last_score": series[-1][1] if series else None, "last_p_value": series[-1][2] if series else None,
        })  # fmt: skip
    comparisons = list(data.comparisons)
    problems = bool(
        nonfinite
        or any(d["alarms"] for d in drift)
        or data.alerts
        or any(not c["ok"] for c in comparisons)
        or data.captures
    )
    return {
        "outputs": _output_summary(data.outputs), "latency": _latency_summary(data.latency),
        "inputs": _input_summary(data.inputs), "comparisons": comparisons,
        "logdir": data.logdir, "sources": data.sources, "skipped": data.skipped, "exact_counts": data.exact,
        "calls": data.calls, "steps": data.steps, "first_time": data.first_time, "last_time": data.last_time,
        "nonfinite": nonfinite, "casts": casts, "drift": drift, "alerts": data.alerts, "errors": data.errors,
        "phases": data.phases, "charted_only": data.charted_only, "problems": problems,
        "baselines": data.baselines, "captures": data.captures, "replicas": data.replicas,
        "histograms": [{"tag": tag, "edges": list(edges), "counts": counts, "total": sum(counts)}
                       for tag, (edges, counts) in data.histograms.items()],
    }  # fmt: skip


def _output_summary(series: list[tuple[int, dict[str, Any]]]) -> dict[str, Any] | None:
    """Output quality over the log: row-weighted means, the worst interval, labelled accuracy and ECE."""
    rows = [(step, o) for step, o in series if o.get("rows")]
    if not rows and not any(o.get("labelled") for _, o in series):
        return None
    total = sum(o["rows"] - (o.get("nonfinite") or 0) for _, o in rows)

    def mean(key: str) -> float | None:
        vals = [(o[key], o["rows"] - (o.get("nonfinite") or 0)) for _, o in rows if o.get(key) is not None]
        return sum(v * n for v, n in vals) / sum(n for _, n in vals) if vals and total else None

    labelled = [(o["labelled"], o.get("accuracy"), o.get("ece")) for _, o in series if o.get("labelled")]
    n = sum(x[0] for x in labelled)
    bins = [o["calibration_bins"] for _, o in series if o.get("labelled") and o.get("calibration_bins")]
    ece = None
    if n and len(bins) == len(labelled):  # pooled exactly: ECE does not average over intervals
        pooled = [[sum(col) for col in zip(*rows, strict=True)] for rows in zip(*bins, strict=True)]
        ece = sum(abs(correct - conf) for _, conf, correct in pooled) / n
    lowest = min(rows, key=lambda r: r[1].get("confidence") or math.inf) if rows else None
    return {
        "rows": sum(o["rows"] for _, o in rows), "confidence": mean("confidence"), "margin": mean("margin"),
        "normalized_entropy": mean("normalized_entropy"), "abstention_rate": mean("abstention_rate"),
        "lowest_confidence": lowest[1].get("confidence") if lowest else None,
        "lowest_confidence_step": lowest[0] if lowest else None, "labelled": n,
        "accuracy": sum(k * (a or 0) for k, a, _ in labelled) / n if n else None,
        "ece": ece,
    }  # fmt: skip


def _latency_summary(series: list[tuple[int, dict[str, Any]]]) -> dict[str, Any] | None:
    if not series:
        return None
    worst = max(series, key=lambda s: s[1].get("p99_ms") or 0)
    return {
        "intervals": len(series), "calls": sum(s["count"] for _, s in series),
        "last_p50_ms": series[-1][1].get("p50_ms"), "last_p99_ms": series[-1][1].get("p99_ms"),
        "worst_p99_ms": worst[1].get("p99_ms"), "worst_p99_step": worst[0],
        "max_ms": max(s.get("max_ms") or 0 for _, s in series),
    }  # fmt: skip


def _input_summary(inputs: dict[str, list[tuple[int, dict[str, Any]]]]) -> list[dict[str, Any]]:
    out = []
    for name, series in inputs.items():
        ids = [i["ids"] for _, i in series if i.get("ids")]
        row: dict[str, Any] = {"input": name, "kind": series[-1][1].get("kind"), "intervals": len(series)}
        if ids:
            row["min"], row["max"] = min(i["min"] for i in ids), max(i["max"] for i in ids)
            row["top1_fraction_max"] = max(i["top1_fraction"] for i in ids)
            row["last_top"] = ids[-1].get("top", [])[:3]
        means = [i["channel_means"] for _, i in series if i.get("channel_means")]
        if means:
            row["last_channel_means"] = means[-1][:8]
        out.append(row)
    return out


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def text(summary: dict[str, Any]) -> str:
    """The report for a terminal."""
    lines = [f"torchwatch report: {summary['logdir']}"]
    runs = summary.get("runs")
    if runs and runs["all"]:
        lines.append(f"  {runs['count']} runs merged (--all-runs)")
    elif runs:
        lines.append(f"  the latest of {runs['count']} runs in this directory (--all-runs merges them; pass a run's "
                     "directory to read another)")  # fmt: skip
    span = f", {_when(summary['first_time'])} to {_when(summary['last_time'])}" if summary["first_time"] else ""
    calls = f"{summary['calls']:,} calls" if summary["exact_counts"] else f"up to step {summary['steps']:,}"
    lines.append(f"  {calls}{span}; read {len(summary['sources'])} file(s)")
    replicas = summary.get("replicas") or {}
    several = len(replicas) > 1
    if several:
        lines.append(f"  {len(replicas)} replicas merged: " + ", ".join(
            f"{name} ({r.get('host')}, {r.get('device_name')})" for name, r in sorted(replicas.items())))  # fmt: skip
    if summary.get("baselines"):
        lines.append(f"  {Warmup(**summary['baselines'])}")
    for why in summary.get("skipped", [])[:10]:
        lines.append(f"  skipped {why}")
    if summary.get("charted_only"):
        lines.append(f"  {', '.join(summary['charted_only'])}: charted in TensorBoard, not summarised from its logs "
                     "(a JsonlSink log adds them here)")  # fmt: skip
    lines.append("")
    if summary["nonfinite"]:
        lines.append("NaN/Inf:")
        first = summary["nonfinite"][0]
        if first["origin"] is not None:
            trace = f", request {first['first_trace']!r}" if first["first_trace"] else ""
            where = f" of replica {first['first_replica']}" if several and first.get("first_replica") else ""
            lines.append(f"  started in {first['origin']!r} on call {first['first_call']}{where}{trace}")
        else:
            lines.append("  (these logs do not say where it started: no nonfinite alert names an origin)")
        for row in summary["nonfinite"][:10]:
            lines.append(
                f"  {row['module'] or '<root>':<40} nan {row['nan']:>10,}  +inf {row['posinf']:>8,}  "
                f"-inf {row['neginf']:>8,}  first at step {row['first_step']}"
            )
        more = len(summary["nonfinite"]) - 10
        if more > 0:
            lines.append(f"  ... and {more} more modules")
    else:
        lines.append("NaN/Inf: none")
    for kind in ("overflow", "underflow"):
        rows = summary["casts"][kind]
        if not rows:
            continue
        lines.append(f"\nWorst cast {kind}:")
        for dtype, items in rows.items():
            for r in items:
                lines.append(
                    f"  {dtype:<14} {r['module'] or '<root>':<40} {r['fraction']:.3%} overall, "
                    f"{r['worst_interval']:.3%} worst interval"
                )
    if summary["drift"]:
        lines.append("\nDrift:")
        for d in summary["drift"]:
            alarm = f"{d['alarms']} alarm(s), first at call {d['first_alarm_call']}" if d["alarms"] else "no alarm"
            lines.append(f"  {d['module'] or '<root>':<40} {alarm}; last p-value {d['last_p_value']:.3g}")
    if summary["outputs"]:
        o = summary["outputs"]
        lines.append("\nOutput quality:")
        lines.append(
            f"  {o['rows']:,} predictions: confidence {_f(o['confidence'], '.3f')} (lowest interval "
            f"{_f(o['lowest_confidence'], '.3f')} at step {o['lowest_confidence_step']}), "
            f"margin {_f(o['margin'], '.3f')}, normalised entropy {_f(o['normalized_entropy'], '.3f')}, "
            f"abstained {_f(o['abstention_rate'], '.2%')}"
        )
        if o["labelled"]:
            lines.append(
                f"  {o['labelled']:,} labelled: accuracy {_f(o['accuracy'], '.2%')}, ECE {_f(o['ece'], '.3f')}"
            )
    if summary["latency"]:
        lat = summary["latency"]
        lines.append(
            f"\nLatency: {lat['calls']:,} calls; last interval p50 {_f(lat['last_p50_ms'], '.2f')} ms, p99 "
            f"{_f(lat['last_p99_ms'], '.2f')} ms; worst p99 {_f(lat['worst_p99_ms'], '.2f')} ms at step "
            f"{lat['worst_p99_step']}; max {_f(lat['max_ms'], '.2f')} ms"
        )
    if summary["inputs"]:
        lines.append("\nInputs:")
        for i in summary["inputs"]:
            if "top1_fraction_max" in i:
                top = ", ".join(f"{v if v is not None else '?'} x{c:,}" for v, c, _ in i["last_top"])
                lines.append(f"  {i['input']:<28} ids {i['min']}..{i['max']}, most frequent value up to "
                             f"{i['top1_fraction_max']:.1%} of an interval; last top: {top}")  # fmt: skip
            elif "last_channel_means" in i:
                means = ", ".join(f"{m:.3g}" for m in i["last_channel_means"])
                lines.append(f"  {i['input']:<28} channel means (last interval): {means}")
    if summary.get("histograms"):
        lines.append("\nHistograms (summed over the log; one bar per bucket, lowest first):")
        for h in summary["histograms"][:40]:
            span = f"({h['edges'][0]:g} .. {h['edges'][-1]:g}]"
            lines.append(f"  {h['tag']:<40} {span} {_bars(h['counts'])}  {h['total']:,.0f} values" + _peak(h))
    for c in summary["comparisons"]:
        lines.append(f"\nComparison ({c['kind']}, {os.path.basename(c['file'])}): {c['calls']:,} calls compared, "
                     + ("OK" if c["ok"] else "DIFFERENT"))  # fmt: skip
        if c["kind"] == "shadow":
            lines.append(f"  {c['seen']:,} primary calls seen, {c['sampled']:,} sampled, {c['dropped']:,} dropped, "
                         f"{c['errors']:,} candidate errors")  # fmt: skip
        for o in c["outputs"]:
            top1 = f"top-1 agreement {o['top1']:.2%}, " if o.get("top1") is not None else ""
            lines.append(f"  {o['name']:<20} {top1}rel L2 {_f(o['rel_l2'], '.3g')}, cosine {_f(o['cosine'], '.5f')}, "
                         f"max |diff| {_f(o['max_abs'], '.3g')}")  # fmt: skip
        for m in c["modules"][:5]:
            lines.append(f"  module {m['name'] or '<root>'} {m['stat']}: {_f(m['a'], '.4g')} -> {_f(m['b'], '.4g')}")
        lines += [f"  ! {f}" for f in c["failures"]]
    lines += report_captures.text_lines(summary.get("captures", []))
    lines.append(f"\nAlerts ({len(summary['alerts'])}):" if summary["alerts"] else "\nAlerts: none")
    for a in summary["alerts"][:40]:
        who = f"[{a.get('replica')}] " if several and a.get("replica") else ""
        lines.append(
            f"  {_when(a.get('time'))}  call {a.get('call')!s:>7}  {a.get('rule', '?'):<18} {who}{a.get('message', '')}"
        )
    if len(summary["alerts"]) > 40:
        lines.append(f"  ... and {len(summary['alerts']) - 40} more (see --json)")
    if summary["errors"]:
        lines.append(
            "\nErrors caught (inference went on): " + ", ".join(f"{k}: {v}" for k, v in summary["errors"].items())
        )
    return "\n".join(lines)


def _bars(counts: list[float]) -> str:
    """One character per bucket, its height the bucket's share of the largest."""
    top = max(counts, default=0) or 1
    return "".join("▁▂▃▄▅▆▇█"[max(round(8 * c / top) - 1, 0)] if c else "·" for c in counts)


def _peak(h: dict[str, Any]) -> str:
    if not h["total"]:
        return ""
    i = max(range(len(h["counts"])), key=h["counts"].__getitem__)
    return f"; most in ({h['edges'][i]:g}, {h['edges'][i + 1]:g}]: {h['counts'][i] / h['total']:.0%}"


def _f(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "n/a"
