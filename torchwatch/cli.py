"""The ``torchwatch`` command line.

Exit codes: 0 ok, 1 a check failed (weights or canary outputs differ, or the demo did not
catch its failure), 2 bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    outcome = run(requests=args.requests, batch=args.batch, logdir=args.logdir, seed=args.seed)
    return EXIT_OK if outcome.caught else EXIT_FAILED


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
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="serve a small model, inject a silent failure, show what was caught",
        description="Train a small classifier, serve traffic, break it silently halfway and show what "
        "torchwatch caught. Exit 0 if the failure was caught, 1 if not.",
    )
    demo.add_argument("--requests", type=_positive, default=400, help="requests to serve (default: 400)")
    demo.add_argument("--batch", type=_positive, default=8, help="rows per request (default: 8)")
    demo.add_argument("--logdir", help="where TensorBoard and JSONL logs go (default: a new temporary directory)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(handler=_demo)
    from .integrity._cli import add_commands

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
