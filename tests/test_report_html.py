"""``torchwatch report --html`` against the logs of a real watched model with a known fault: the
verdict names it, the heat strip puts the faulty module on top, every chart shares one time axis,
series spanning decades get a log scale, and the page is self-contained and fits 1280 px."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

import torchwatch as tw
from torchwatch.cli import report, report_html


def _logs(tmp_path, *, fault_from: int | None, flush_each_call: bool = False) -> str:
    """80 calls of a small model, with module "2" faulty from ``fault_from`` on. The writer merges records
    when its worker falls behind (a loaded machine), so which steps are logged varies, unless
    ``flush_each_call``: then every call is flushed (and waited for) by the test, one record per call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    calls = {"n": 0}

    def blow_up(module, args, output):  # from call fault_from on, module "2" outputs a million times too much
        return output * 1e6 if fault_from is not None and calls["n"] >= fault_from else output

    model[2].register_forward_hook(blow_up)
    with tw.attach(model, flush_every=2, sinks=[tw.JsonlSink(tmp_path / "stats.jsonl")]) as watch, torch.no_grad():
        for _ in range(80):
            model(torch.randn(16, 4))
            calls["n"] += 1
            if flush_each_call:
                watch.flush()
        watch.flush()
    return str(tmp_path)


def _page(logdir: str) -> tuple[dict, str]:
    data = report.load(logdir)
    summary = report.summarize(data)
    return summary, report_html.html_page(summary, data)


def test_the_page_leads_with_the_fault_and_the_module_it_started_in(tmp_path):
    summary, page = _page(_logs(tmp_path, fault_from=70))
    assert summary["problems"] and "finding(s) need attention" in page
    verdict = page[page.index('class="verdict"') : page.index("</div>")]
    assert "overflow in float16: worst &#x27;2&#x27;" in verdict  # the module the fault is in
    strip = page[page.index("Where it started") :]
    strip = strip[: strip.index("</svg>")]
    rows = re.findall(r'text-anchor="end">([^<]+)</text>', strip)
    assert rows[0] == "2"  # left its range first (at call 70): on top; "3" and "4" follow it there
    # abs-max of "2" spans six decades: a log scale, whose labels are the real values
    assert "<figcaption>abs-max: 2 (log scale)" in page


def test_every_chart_shares_one_time_axis_and_marks_the_alerts(tmp_path):
    summary, page = _page(_logs(tmp_path, fault_from=70))
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) >= 4
    first_ticks = {tuple(re.findall(r'text-anchor="(?:start|end)">([^<]+)<', s)[-2:]) for s in svgs}
    assert len(first_ticks) == 1  # the same first and last tick (step and wall time) on every chart
    (lo, hi) = next(iter(first_ticks))
    # the first and last logged steps, each with its wall time (which steps: the writer merges records
    # when it falls behind, so on a loaded machine the first record can come later than step 2)
    steps = sorted(report.load(str(tmp_path)).times)
    assert lo.startswith(f"{steps[0]} · ") and hi.startswith(f"{steps[-1]} · ") and steps[-1] == 80
    markers = re.findall(r"<line [^>]*><title>([^<]+)</title>", svgs[1])
    assert len(markers) == len(summary["alerts"]) > 0  # one line per alert, its message on hover
    assert all(" at call " in m for m in markers)


def test_clean_logs_say_nothing_needs_attention_and_the_page_is_self_contained(tmp_path):
    summary, page = _page(_logs(tmp_path, fault_from=None))
    assert not summary["problems"] and "Nothing needs attention" in page
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)  # no network: no external resource
    widths = [int(w) for w in re.findall(r'<svg viewBox="0 0 \d+ \d+" width="(\d+)"', page)]
    # fits a 1280 px window: the widest chart plus the page's margins (1.5em of 16px each side)
    assert widths and max(widths) + 2 * 24 <= 1280 and "white-space:pre-wrap" in page


def test_phases_in_the_run_marker_are_dashed_lines_on_every_chart_and_named_once(tmp_path):
    # one record per call, so the first is at step 1 and "bad batch" (call 40) lies inside the axis
    logdir = _logs(tmp_path, fault_from=40, flush_each_call=True)
    phases = [
        {"name": "warm-up", "call": 0, "time": 1.0},  # before the first record: drawn at the left edge
        {"name": "bad batch", "call": 40, "time": 2.0},
        {"name": "no place"},  # neither call nor time: skipped, and said so
        {"call": 60},  # no name
        {"name": "after the logs", "call": 500, "time": 3.0},  # past the last record: not drawn
    ]
    (tmp_path / tw.formats.RUN_MARKER).write_text(json.dumps({"started": 0.0, "phases": phases}))
    data = report.load(logdir)
    assert [p["name"] for p in data.phases] == ["warm-up", "bad batch", "after the logs"]
    assert sum("needs a name and a call or time" in s for s in data.skipped) == 2
    summary = report.summarize(data)
    page = report_html.html_page(summary, data)
    axis = report_html.Axis(data, summary["alerts"], summary["phases"])
    assert axis.lo == 1
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    for svg in svgs:
        dashed = re.findall(r'<line x1="([\d.]+)"[^>]*stroke-dasharray="4 3"><title>phase: ([^<]+)</title>', svg)
        assert dashed == [(f"{axis.x(axis.lo):.1f}", "warm-up"), (f"{axis.x(40):.1f}", "bad batch")]
    names = re.findall(r'fill="#444">([^<]+)</text>', page)
    assert names == ["warm-up", "bad batch"]  # once, over the heat strip


def test_a_corrupt_run_marker_is_skipped_and_the_logs_still_read(tmp_path):
    logdir = _logs(tmp_path, fault_from=None)
    (tmp_path / tw.formats.RUN_MARKER).write_text('{"phases": 3')
    data = report.load(logdir)
    assert data.phases == [] and any(tw.formats.RUN_MARKER in s for s in data.skipped) and data.modules


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MEASURE = """<script>
const root = document.documentElement, out = {scroll: root.scrollWidth, client: root.clientWidth, cut: []};
for (const svg of document.querySelectorAll("svg")) {
  const box = svg.getBoundingClientRect();
  for (const t of svg.querySelectorAll("text")) {
    const r = t.getBoundingClientRect();
    if (r.left < box.left - 0.5 || r.right > box.right + 0.5 || r.top < box.top - 0.5 || r.bottom > box.bottom + 0.5)
      out.cut.push(t.textContent);
  }
}
document.body.setAttribute("data-measure", JSON.stringify(out));
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_in_a_real_browser_at_1280_px_nothing_is_cut_off(tmp_path):
    logdir = _logs(tmp_path, fault_from=40)
    # the last phase begins near the right edge: its long name must be cut to the room left
    marker = {"phases": [{"name": "clean", "call": 0}, {"name": "fault", "call": 40},
                         {"name": "a phase whose name is much longer than the room", "call": 78}]}  # fmt: skip
    (tmp_path / tw.formats.RUN_MARKER).write_text(json.dumps(marker))
    _, page = _page(logdir)
    path = tmp_path / "measured.html"
    path.write_text(page.replace("</body>", MEASURE))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000", "--dump-dom",
         path.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    measured = json.loads(html.unescape(re.search(r'data-measure="([^"]*)"', dom).group(1)))
    assert measured["scroll"] <= measured["client"] <= 1280  # no horizontal scrolling at 1280 px
    assert measured["cut"] == []  # every label (ticks, values, module and phase names) inside its chart
