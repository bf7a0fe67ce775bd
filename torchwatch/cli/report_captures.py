"""The report's captured incidents: each bundle a capture directory indexes, with its replay verdict.

``torchwatch report`` finds capture indexes (``captures.jsonl``) under the log directory; each
line names a bundle. A bundle replayed with ``torchwatch replay`` has its verdict beside it
(``<bundle>.replay.json``): the report shows the culprit and links the HTML page to it.
"""

from __future__ import annotations

import html
import os
from typing import Any

from ..capture.bundle import indexed
from ..capture.incident import read_verdict
from ..errors import FormatError


def read(path: str, skipped: list[str]) -> list[dict[str, Any]]:
    """The bundles one ``captures.jsonl`` lists, each with ``"path"``, ``"exists"`` and ``"verdict"``."""
    out = []
    try:
        lines = indexed(path)
    except FormatError as exc:
        skipped.append(str(exc))
        return []
    for bundle, line in lines:
        exists = os.path.isfile(bundle)
        verdict = read_verdict(bundle) if exists else None
        if verdict is not None and not all(isinstance(verdict.get(k), str) for k in ("culprit", "reason")):
            skipped.append(f"{bundle}.replay.json: not a replay verdict (culprit and reason must be strings)")
            verdict = None
        keep = ("time", "call", "trace_id", "cohort", "exact", "bytes", "inputs")
        out.append({
            **{k: line.get(k) for k in keep}, "path": bundle, "exists": exists,
            **{k: str(line.get(k, "?")) for k in ("rule", "module", "message")},  # shown as text, whatever was written
            "verdict": {k: verdict.get(k) for k in ("culprit", "reason", "module", "tensor", "reproduced")}
            if verdict else None,
        })  # fmt: skip
    return out


def text_lines(captures: list[dict[str, Any]]) -> list[str]:
    """The text report's section."""
    if not captures:
        return []
    lines = [f"\nCaptured incidents ({len(captures)}; replay one with `torchwatch replay BUNDLE --model SPEC`):"]
    for c in captures[:20]:
        v = c["verdict"]
        said = f"replayed: {v['culprit'].upper()} at {v['module']!r}" if v else "not replayed yet"
        gone = "" if c["exists"] else " (file gone)"
        lines.append(f"  call {c['call']!s:>7}  {c['rule']:<12} {c['module']!r:<28} {said}{gone}")
        lines.append(f"      {c['path']}")
    if len(captures) > 20:
        lines.append(f"  ... and {len(captures) - 20} more (see --json)")
    return lines


def findings(captures: list[dict[str, Any]]) -> list[str]:
    """The HTML verdict's lines: each replayed incident's culprit."""
    return [
        f"call {c['call']}: replay says {c['verdict']['culprit']} at {c['verdict']['module']!r}"
        for c in captures
        if c["verdict"]
    ]


def table(captures: list[dict[str, Any]]) -> str:
    """The HTML page's table of captured incidents, each linked to its bundle and verdict."""
    if not captures:
        return ""
    rows = []
    for c in captures[:100]:
        v = c["verdict"]
        link = html.escape("file://" + os.path.abspath(c["path"]), quote=True)
        verdict = (
            f"<a href='{link}.replay.json'><b>{html.escape(str(v['culprit']))}</b></a> at "
            f"{html.escape(repr(v['module']))}: {html.escape(str(v['reason']))}"
            if v
            else "not replayed: <code>torchwatch replay " + html.escape(c["path"]) + " --model SPEC</code>"
        )
        rows.append(
            f"<tr><td>{html.escape(str(c['call']))}</td><td>{html.escape(str(c['rule']))}</td>"
            f"<td>{html.escape(repr(c['module']))}</td><td><a href='{link}'>{html.escape(os.path.basename(c['path']))}"
            f"</a></td><td>{verdict}</td></tr>"
        )
    return (
        "<h2>Captured incidents</h2><table class='captures'><tr><th>call</th><th>rule</th><th>module</th>"
        "<th>bundle</th><th>replay verdict</th></tr>" + "".join(rows) + "</table>"
    )
