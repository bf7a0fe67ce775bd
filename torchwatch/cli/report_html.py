"""``torchwatch report --html``: one self-contained page (inline SVG, no network) a person reads
top-down: a verdict, a module x time heat strip where the fault starts, then charts that share one
time axis (steps, with wall time under them) and mark every alert."""

from __future__ import annotations

import bisect
import html
import math
import time
from collections.abc import Sequence
from typing import Any

from . import report_captures
from .report import LogData, text

WIDTH = 1100  # px: fits a 1280 px window with the page margins
LEFT, RIGHT = 70, 20
ROOT = "<root>"


class Axis:
    """The shared x axis: steps ``lo..hi`` onto pixels, with wall times where the logs have them.
    Tick labels and alert positions are worked out once and drawn on every chart."""

    def __init__(self, data: LogData, alerts: list[dict[str, Any]], phases: Sequence[dict[str, Any]] = ()) -> None:
        steps = [s for m in data.modules.values() for s in m.steps] + [s for s, *_ in _all_series(data)]
        self.lo, self.hi = (min(steps), max(steps)) if steps else (0, 1)
        by_step = sorted(data.times.items())
        by_time = sorted((t, s) for s, t in by_step)
        self._labels = []
        for i in range(6):
            step = self.lo + (self.hi - self.lo) * i / 5
            t = _nearest(by_step, step)
            self._labels.append(
                (step, f"{step:,.0f}" + (f" · {time.strftime('%H:%M:%S', time.localtime(t))}" if t else ""))
            )
        self._alerts = []  # (x, colour, tooltip) per alert that can be placed
        for a in alerts:
            step = a.get("call")
            if step is None or step < 0:  # raised between calls (a background check): placed by its time
                step = _nearest(by_time, a["time"]) if a.get("time") else None
            if step is not None:
                tip = f"{a.get('rule')} in {a.get('module') or ROOT} at call {a.get('call')}: {a.get('message')}"
                x = self.x(min(max(step, self.lo), self.hi))
                self._alerts.append((x, _colour(a.get("rule")), html.escape(tip)))
        self._phases = []  # (x, name) per phase that begins on the axis: by its call, else its time
        for p in phases:
            step = p.get("call") if p.get("call") is not None else _nearest(by_time, p["time"])
            if step is not None and step <= self.hi:  # one begun before the first record: at the left edge
                self._phases.append((self.x(max(step, self.lo)), str(p["name"])))

    def x(self, step: float) -> float:
        return LEFT + (step - self.lo) * (WIDTH - LEFT - RIGHT) / max(self.hi - self.lo, 1)

    def ticks(self, y: float) -> str:
        out = []
        for i, (step, label) in enumerate(self._labels):
            anchor = "start" if i == 0 else "end" if i == 5 else "middle"
            out.append(f'<text x="{self.x(step):.1f}" y="{y}" font-size="10" text-anchor="{anchor}">{label}</text>')
        return "".join(out)

    def markers(self, top: float, bottom: float) -> str:
        """A thin vertical line at every alert, coloured by rule, with its text on hover; a dashed
        grey one where each phase begins."""
        phases = "".join(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#555" stroke-width="1" '
            f'stroke-dasharray="4 3"><title>phase: {html.escape(name)}</title></line>'
            for x, name in self._phases
        )
        return phases + "".join(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="{colour}" stroke-width="1" '
            f'opacity="0.55"><title>{tip}</title></line>'
            for x, colour, tip in self._alerts
        )

    def phase_names(self, y: float) -> str:
        """Each phase's name after its line, cut to the room before the next phase."""
        out: list[str] = []
        ends = [x for x, _ in self._phases[1:]] + [WIDTH - RIGHT] if self._phases else []
        for (x, name), end in zip(self._phases, ends, strict=True):
            room = int((end - x - 4) / 5.5)  # characters of 10 px sans-serif
            if room >= 3:
                shown = name if len(name) <= room else name[: room - 1] + "…"
                out.append(f'<text x="{x + 3:.1f}" y="{y}" font-size="10" fill="#444">{html.escape(shown)}</text>')
        return "".join(out)

    @property
    def has_phases(self) -> bool:
        return bool(self._phases)


def _nearest(pairs: list[tuple[float, float]], key: float) -> float | None:
    """The second item of the pair whose first item (``pairs`` sorted by it) is nearest ``key``."""
    if not pairs:
        return None
    i = bisect.bisect_left(pairs, (key, -math.inf))
    near = [pairs[j] for j in (i - 1, i) if 0 <= j < len(pairs)]
    return min(near, key=lambda p: abs(p[0] - key))[1]


def _all_series(data: LogData) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = [(s, v) for series in data.drift.values() for s, v, _ in series]
    return out + [(s, o) for s, o in data.outputs] + [(s, v) for s, v in data.latency]


_RULE_COLOURS = ("#c0392b", "#8e44ad", "#2471a3", "#d68910", "#148f77", "#7b7d7d", "#a04000", "#1e8449")


def _colour(rule: object) -> str:
    return _RULE_COLOURS[sum(map(ord, str(rule))) % len(_RULE_COLOURS)]


def chart(title: str, xs: list[int], ys: list[float | None], axis: Axis, *, height: int = 120) -> str:
    """One line chart on the shared axis; a log scale when the positive values span over 100x."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None and math.isfinite(y)]
    if not pts:
        return ""
    positive = [y for _, y in pts if y > 0]
    log = bool(positive) and max(positive) / min(positive) > 100
    if log:
        floor = min(positive) / 2
        pts = [(x, math.log10(max(y, floor))) for x, y in pts]
    y0, y1 = min(y for _, y in pts), max(y for _, y in pts)
    top, bottom = 8, height - 22
    sy = (bottom - top) / (y1 - y0) if y1 > y0 else 0.0

    def yv(v: float) -> float:
        return bottom - (v - y0) * sy if sy else (top + bottom) / 2

    def label(v: float) -> str:
        return f"{10**v:.3g}" if log else f"{v:.3g}"

    path = " ".join(f"{axis.x(x):.1f},{yv(y):.1f}" for x, y in pts)
    scale = " (log scale)" if log else ""
    return (
        f'<figure><figcaption>{html.escape(title)}{scale}</figcaption><svg viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        f'<rect x="{LEFT}" y="{top}" width="{WIDTH - LEFT - RIGHT}" height="{bottom - top}" fill="#fafafa"/>'
        f"{axis.markers(top, bottom)}"
        f'<polyline fill="none" stroke="#1a5276" stroke-width="1.5" points="{path}"/>'
        f'<text x="{LEFT - 4}" y="{top + 9}" font-size="10" text-anchor="end">{label(y1)}</text>'
        f'<text x="{LEFT - 4}" y="{bottom}" font-size="10" text-anchor="end">{label(y0)}</text>'
        f"{axis.ticks(height - 6)}</svg></figure>"
    )


def heat_strip(data: LogData, axis: Axis, *, rows: int = 16) -> str:
    """Modules x time: how far each interval's abs-max is from the module's own median (in decades),
    NaN/Inf in black; modules ordered by when they first left their range, so the origin is on top."""
    cells: dict[str, list[tuple[int, float]]] = {}
    for name, m in data.modules.items():
        logs = [math.log10(v) for v in m.absmax if v is not None and math.isfinite(v) and v > 0]
        if not logs:
            continue
        median = sorted(logs)[len(logs) // 2]
        row = []
        for step, v, bad in zip(m.steps, m.absmax, m.nonfinite, strict=False):
            if bad:
                row.append((step, math.inf))
            elif v is not None and math.isfinite(v) and v > 0:
                row.append((step, abs(math.log10(v) - median)))
        cells[name] = row
    if not cells:
        return ""

    # the model's order, as the logs list it, with the model's inputs before every module
    position = {name: (not name.startswith("<input>"), i) for i, name in enumerate(data.modules)}

    def first_out(name: str) -> tuple[float, tuple[bool, int]]:
        # modules a fault reaches in the same interval: the first in the model's order is where it
        # entered (those after it inherit it), as NaN/Inf provenance reads it
        hot = [s for s, v in cells[name] if v >= 1]
        return (hot[0] if hot else math.inf, position[name])

    order = sorted(cells, key=first_out)[:rows]
    h, top = 14, 18 if axis.has_phases else 4
    height = top + h * len(order) + 24
    steps = sorted({s for n in order for s, _ in cells[n]})
    width_of = {s: max(axis.x(b) - axis.x(s), 2.0) for s, b in zip(steps, [*steps[1:], steps[-1] + 1], strict=True)}
    out = []
    for i, name in enumerate(order):
        y = top + i * h
        out.append(
            f'<text x="{LEFT - 4}" y="{y + 11}" font-size="10" text-anchor="end">{html.escape(name or ROOT)}</text>'
        )
        for step, v in cells[name]:
            shade = "#000" if math.isinf(v) else _heat(v)
            tip = "NaN/Inf" if math.isinf(v) else f"abs-max {v:.2f} decades from its median"
            out.append(
                f'<rect x="{axis.x(step):.1f}" y="{y}" width="{width_of[step]:.1f}" height="{h - 2}" fill="{shade}">'
                f"<title>{html.escape(name or ROOT)} at step {step}: {tip}</title></rect>"
            )
    return (
        "<figure><figcaption>Where it started: each module's abs-max, decades away from its own median "
        "(white 0, red 2 or more; black NaN/Inf); modules that left their range first on top (at the same "
        "interval, the first in the model's order: those after it inherit the fault)</figcaption>"
        f'<svg viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="module by time heat strip">{axis.phase_names(12)}{"".join(out)}'
        f"{axis.markers(top, top + h * len(order))}"
        f"{axis.ticks(height - 6)}</svg></figure>"
    )


def _heat(decades: float) -> str:
    f = min(decades / 2.0, 1.0)
    g = round(255 * (1 - 0.85 * f))
    return f"rgb(255,{g},{g})"


def verdict(summary: dict[str, Any]) -> str:
    """One line and a few findings, in the order a person should read them."""
    findings = []
    if summary["nonfinite"]:
        first = summary["nonfinite"][0]
        where = first["origin"] or first["module"] or ROOT
        findings.append(f"NaN/Inf started in {where!r} (call {first['first_call']})")
    for kind in ("overflow", "underflow"):
        for dtype, rows in summary["casts"][kind].items():
            if rows and (kind == "overflow" or rows[0]["fraction"] > 0.01):
                findings.append(f"{kind} in {dtype}: worst {rows[0]['module'] or ROOT!r} ({rows[0]['fraction']:.2%})")
    for d in summary["drift"]:
        if d["alarms"]:
            findings.append(f"drift in {d['module']!r}: {d['alarms']} alarm(s), first at call {d['first_alarm_call']}")
    rules: dict[str, int] = {}
    for a in summary["alerts"]:
        rules[a.get("rule")] = rules.get(a.get("rule"), 0) + 1
    if rules:
        findings.append(
            "alerts: " + ", ".join(f"{rule} {n}" for rule, n in sorted(rules.items(), key=lambda kv: -kv[1]))
        )
    findings += report_captures.findings(summary.get("captures", []))
    for c in summary["comparisons"]:
        if not c["ok"]:
            findings.append(f"comparison {c.get('kind', '')} failed: " + "; ".join(c.get("failures", [])[:2]))
    ok = not summary["problems"]
    head = "Nothing needs attention" if ok else f"{len(findings)} finding(s) need attention"
    items = "".join(f"<li>{html.escape(f)}</li>" for f in findings)
    colour = "#1e8449" if ok else "#c0392b"
    return f'<div class="verdict" style="border-left:6px solid {colour}"><h2>{head}</h2><ul>{items}</ul></div>'


def html_page(summary: dict[str, Any], data: LogData) -> str:
    """The page: verdict, heat strip, charts on one time axis with alert markers, the full text report."""
    axis = Axis(data, summary["alerts"], summary.get("phases", []))
    charts = [heat_strip(data, axis)]
    for row in summary["nonfinite"][:4]:
        m = data.modules[row["module"]]
        charts.append(chart(f"NaN/Inf per interval: {row['module'] or ROOT}", m.steps, m.nonfinite, axis))
    for kind in ("overflow", "underflow"):
        for dtype, rows in summary["casts"][kind].items():
            for r in rows[:2]:
                m = data.modules[r["module"]]
                series = (m.over if kind == "overflow" else m.under)[dtype]
                charts.append(chart(f"{kind} fraction to {dtype}: {r['module'] or ROOT}", m.steps, series, axis))
    for name, series in list(data.drift.items())[:4]:
        charts.append(chart(f"drift score: {name or ROOT}", [s for s, _, _ in series], [v for _, v, _ in series], axis))
    rows = [(step, o) for step, o in data.outputs if o.get("rows")]
    for key in ("confidence", "abstention_rate") if rows else ():
        charts.append(chart(f"output {key}", [st for st, _ in rows], [o.get(key) for _, o in rows], axis))
    if data.latency:
        ms = [v.get("p99_ms") for _, v in data.latency]
        charts.append(chart("latency p99 (ms)", [st for st, _ in data.latency], ms, axis))
    worst = sorted(data.modules.items(), key=lambda kv: -max((v for v in kv[1].absmax if math.isfinite(v)), default=0))
    for name, m in worst[:3]:
        charts.append(chart(f"abs-max: {name or ROOT}", m.steps, m.absmax, axis))
    legend = "".join(
        f'<span style="color:{_colour(rule)}">&#9474; {html.escape(str(rule))}</span> '
        for rule in dict.fromkeys(a.get("rule") for a in summary["alerts"])
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>torchwatch report</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:1160px;color:#222}"
        ".verdict{background:#fbfbfb;padding:.2em 1em;margin-bottom:1em}.verdict h2{margin:.4em 0}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap;overflow-wrap:anywhere}"
        "figure{margin:.8em 0}figcaption{font-size:13px;color:#333}svg{max-width:100%;height:auto}"
        ".legend{font-size:12px}.captures td,.captures th{padding:2px 8px;text-align:left;font-size:13px}"
        "</style></head><body>"
        f"<h1>torchwatch report</h1>{verdict(summary)}"
        f"<p class='legend'>Vertical lines are alerts (hover for the message): {legend or 'none'}"
        f"{'; dashed grey lines: where each phase began (named over the heat strip)' if axis.has_phases else ''}. "
        "Every chart shares the time axis: steps (root calls), wall time after the dot.</p>"
        + report_captures.table(summary.get("captures", []))
        + "".join(c for c in charts if c)
        + f"<h2>Full report</h2><pre>{html.escape(text(summary))}</pre></body></html>\n"
    )
