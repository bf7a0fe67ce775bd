"""The ``torchwatch`` command line: ``demo`` (:mod:`.demo`), ``report`` (:mod:`.report`),
``manifest``, ``verify``, ``canary``, ``keygen`` (:mod:`.integrity`), ``replay`` (:mod:`.replay`) and
``fleet`` (:mod:`.fleet`).

Exit codes: 0 ok, 1 a check failed (weights or canary outputs differ, or the demo did not
catch its failure), 2 bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .. import __version__
from .._dist import DISTRIBUTION
from .._files import atomic_write_text, shown
from ..errors import TorchwatchError
from . import report, report_html
from .demo import MIN_REQUESTS, run
from .fleet import add_command as add_fleet
from .integrity import add_commands
from .replay import add_command as add_replay

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _demo(args: argparse.Namespace) -> int:
    try:
        outcome = run(requests=args.requests, batch=args.batch, logdir=args.logdir, seed=args.seed)
    except TorchwatchError as exc:
        print(f"torchwatch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if outcome.caught else EXIT_FAILED


def _report(args: argparse.Namespace) -> int:
    try:
        target, runs = report.choose_run(args.logdir, all_runs=args.all_runs)
        data = report.load(target)
        summary = report.summarize(data, top=args.top)
        summary["runs"] = runs
        if args.html:
            atomic_write_text(args.html, report_html.html_page(summary, data))
    except TorchwatchError as exc:
        print(f"torchwatch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # --html into a missing directory, a full disk
        print(
            f"torchwatch: error: cannot write {shown(exc.filename or args.html)}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(json.dumps(summary, indent=1, default=str) if args.json else report.text(summary))
    return EXIT_FAILED if summary["problems"] else EXIT_OK


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchwatch",
        description="Catch the silent failures of PyTorch models at inference time.",
    )
    p.add_argument("--version", action="version", version=f"torchwatch {__version__} ({DISTRIBUTION})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="serve a small model through six silent failures, show what caught each",
        description="Train a small classifier, refuse a replica that loaded stale weights at startup, then serve "
        "traffic through five silent failures (a preprocessing bug, fp16 overflow, a corrupted weight, input drift, "
        "a candidate version in shadow whose label map is wrong) and show what torchwatch caught and when. Seeded: "
        "the same catches at the same requests on every run. Each run writes into its own subdirectory of "
        "--logdir. Exit 0 if every failure was caught, 1 if not, 2 bad usage.",
    )
    demo.add_argument("--requests", type=_positive, default=150,
                      help=f"requests per phase, at least {MIN_REQUESTS} (default: 150)")  # fmt: skip
    demo.add_argument("--batch", type=_positive, default=16, help="rows per request (default: 16)")
    demo.add_argument("--logdir", help="each run's logs go into a new subdirectory of it (default: a temporary one)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(handler=_demo)
    rep = sub.add_parser(
        "report",
        help="summarise a log directory: non-finite origins, worst casts, drift, alerts",
        description="Read the statistics JSONL, incident logs and TensorBoard events under LOGDIR and print "
        "what needs attention first. Exit 0 if the logs hold no NaN/Inf, drift alarm or alert, 1 if they do, "
        "2 if the directory holds no readable torchwatch log.",
    )
    rep.add_argument("logdir", help="the directory the sinks wrote to; of a directory of runs, the latest run")
    rep.add_argument("--all-runs", action="store_true", help="merge every run under LOGDIR instead of the latest")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with charts")
    rep.add_argument("--top", type=_positive, default=5, help="modules listed per cast dtype (default 5)")
    rep.set_defaults(handler=_report)
    add_commands(sub)
    add_replay(sub)
    add_fleet(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torchwatch`` and ``python -m torchwatch``; returns the exit code."""
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage and 0 on --help
        return int(exc.code or 0)
    if args.command is None:
        p.print_help(sys.stderr)
        return EXIT_USAGE
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
