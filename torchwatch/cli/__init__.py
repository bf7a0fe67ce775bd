"""The ``torchwatch`` command line: ``demo`` (:mod:`.demo`), ``report`` (:mod:`.report`), and
``manifest``, ``verify``, ``canary``, ``keygen`` (:mod:`.integrity`).

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
from .._files import atomic_write, shown
from ..errors import TorchwatchError
from . import report
from .demo import run
from .integrity import add_commands

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _demo(args: argparse.Namespace) -> int:
    outcome = run(requests=args.requests, batch=args.batch, logdir=args.logdir, seed=args.seed)
    return EXIT_OK if outcome.caught else EXIT_FAILED


def _report(args: argparse.Namespace) -> int:
    try:
        data = report.load(args.logdir)
        summary = report.summarize(data, top=args.top)
        if args.html:
            page = report.html_page(summary, data)

            def write(tmp: str) -> None:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(page)

            atomic_write(args.html, write)
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
        description="Train a small classifier, self-test it at startup, serve traffic through six silent "
        "failures (preprocessing bug, fp16 overflow, corrupted weight, input drift, a candidate version in "
        "shadow that disagrees) and show what torchwatch caught and when. Exit 0 if every failure was caught, "
        "1 if not.",
    )
    demo.add_argument("--requests", type=_positive, default=150, help="requests per phase (default: 150)")
    demo.add_argument("--batch", type=_positive, default=16, help="rows per request (default: 16)")
    demo.add_argument("--logdir", help="where TensorBoard and JSONL logs go (default: a new temporary directory)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(handler=_demo)
    rep = sub.add_parser(
        "report",
        help="summarise a log directory: non-finite origins, worst casts, drift, alerts",
        description="Read the statistics JSONL, incident logs and TensorBoard events under LOGDIR and print "
        "what needs attention first. Exit 0 if the logs hold no NaN/Inf, drift alarm or alert, 1 if they do, "
        "2 if the directory holds no readable torchwatch log.",
    )
    rep.add_argument("logdir", help="the directory the sinks wrote to")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with charts")
    rep.add_argument("--top", type=_positive, default=5, help="modules listed per cast dtype (default 5)")
    rep.set_defaults(handler=_report)
    add_commands(sub)
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
