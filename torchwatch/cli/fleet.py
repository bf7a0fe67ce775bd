"""``torchwatch fleet --prometheus URL``: find the replica that computes differently, from the
metrics Prometheus scraped off every replica (:mod:`torchwatch.fleet.promql`).

Exit codes: 0 the replicas agree, 1 a replica differs, 2 bad usage or Prometheus unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import TorchwatchError
from ..fleet.promql import queries, run

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _fleet(args: argparse.Namespace) -> int:
    if args.queries:
        for name, promql in queries(args.threshold, args.rel_floor).items():
            print(f"# {name}\n{promql}\n")
        return EXIT_OK
    if not args.prometheus:
        print("torchwatch: error: fleet needs --prometheus URL (or --queries to print the PromQL)", file=sys.stderr)
        return EXIT_USAGE
    try:
        seen, findings = run(args.prometheus, threshold=args.threshold, rel_floor=args.rel_floor, model=args.model,
                             timeout=args.timeout)  # fmt: skip
    except TorchwatchError as exc:
        print(f"torchwatch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.model is not None:
        seen = {m: n for m, n in seen.items() if m == args.model}
    if args.json:
        print(json.dumps({"replicas": seen, "findings": [f.to_dict() for f in findings]}, indent=1))
    else:
        models = ", ".join(f"{m or '?'}: {n}" for m, n in sorted(seen.items())) or "none"
        print(f"replicas seen by {args.prometheus} (per model): {models}")
        if not seen:
            print("  no replica exports torchwatch_replica_info: is the PrometheusSink attached and scraped?")
        for f in findings:
            print(f"  {f.replica} (model {f.model}): {f.cause}")
            for why in f.why:
                print(f"    - {why}")
        if seen and not findings:
            print("  the replicas agree")
    return EXIT_FAILED if findings else EXIT_OK


def add_command(sub: Any) -> None:
    f = sub.add_parser(
        "fleet",
        help="find the replica that computes differently, from Prometheus",
        description="Query Prometheus (its HTTP API) for the replica whose canary output digest or weights "
        "fingerprint differs from the majority of its model's replicas, whose software or device differs, or whose "
        "module statistics sit outside the fleet's spread, and name the likely cause (weights, configuration, "
        "suspected hardware). Replicas export what it reads with a PrometheusSink and watch.verify_canary_every. "
        "Exit 0 the replicas agree, 1 a replica differs, 2 bad usage or Prometheus unreachable.",
    )
    f.add_argument("--prometheus", metavar="URL", help="Prometheus' base URL, e.g. http://prometheus:9090")
    f.add_argument("--model", help="only this model (the model label; default: every model)")
    f.add_argument("--threshold", type=float, default=8.0, help="statistics: scaled MADs from the median (8)")
    f.add_argument("--rel-floor", type=float, default=0.01, help="statistics: relative distance always tolerated")
    f.add_argument("--timeout", type=float, default=10.0, help="seconds per query (10)")
    f.add_argument("--queries", action="store_true", help="print the PromQL it runs, for dashboards and alerts")
    f.add_argument("--json", action="store_true", help="print the findings as JSON")
    f.set_defaults(handler=_fleet)
