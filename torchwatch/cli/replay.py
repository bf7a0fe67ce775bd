"""``torchwatch replay BUNDLE --model SPEC``: run a captured incident again and name its culprit.

Exit codes: 0 nothing found (the call was healthy and the replay is too), 1 a cause was named
(data, weights, precision, model or suspected hardware), 2 bad usage or an unreadable bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from ..capture.bundle import save_verdict
from ..capture.incident import Incident
from ..errors import ConfigError, TorchwatchError
from .integrity import IGNORE_HELP, load_model

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _replay(args: argparse.Namespace) -> int:
    try:
        incident = Incident.load(args.bundle)
        model = load_model(args.model, args.weights, args.ignore)
        model = _placed(model, incident, args.device)
        report = incident.replay(model, manifest=args.manifest)
    except TorchwatchError as exc:
        print(f"torchwatch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    doc = report.to_dict()
    if not args.no_save:
        try:
            doc["saved"] = save_verdict(incident.path, doc)
        except OSError as exc:  # a read-only incident directory: the verdict is still printed
            print(f"torchwatch: note: verdict not saved beside the bundle ({exc.strerror or exc})", file=sys.stderr)
    print(json.dumps(doc, indent=1, default=str) if args.json else report.summary())
    return EXIT_FAILED if report.found else EXIT_OK


def _placed(model: torch.nn.Module, incident: Incident, device: str | None) -> torch.nn.Module:
    """The fresh model on the replay's device and in the captured dtype."""
    captured = incident.environment.get("device")
    if device is None:
        device = "cuda" if captured == "cuda" and torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    dtype = getattr(torch, str(incident.meta.get("dtype")), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        model = model.to(dtype)
    return model.to(target)


def add_command(sub: Any) -> None:
    r = sub.add_parser(
        "replay",
        help="run a captured incident bundle again in a sandbox and name its culprit",
        description="Load an incident bundle written by attach(capture=tw.Capture(...)), run its inputs through a "
        "freshly built model with every module watched, under the captured settings, and say whether the fault "
        "reproduces, where it starts and whether the data, the precision, the weights or (suspected) the machine "
        "caused it. The verdict is saved beside the bundle (BUNDLE.replay.json) for `torchwatch report`. Exit 0 "
        "nothing found, 1 a cause named, 2 bad usage or an unreadable bundle.",
    )
    r.add_argument("bundle", help="the incident bundle (.safetensors) from a capture directory")
    r.add_argument("--model", required=True, metavar="SPEC", help="package.module:factory building the model")
    r.add_argument("--weights", nargs="+", metavar="PATH", help="safetensors weights to load (strict)")
    r.add_argument("--ignore", metavar="REGEX", help=IGNORE_HELP)
    r.add_argument("--manifest", help="the validated manifest: the sandbox's weights are checked against it")
    r.add_argument("--device", help="where to replay (default: the captured device if this machine has it, else cpu)")
    r.add_argument("--json", action="store_true", help="print the verdict as JSON")
    r.add_argument("--no-save", action="store_true", help="do not write BUNDLE.replay.json")
    r.set_defaults(handler=_replay)
