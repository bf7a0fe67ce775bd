"""``torchwatch demo``: a model serving traffic through silent failures, and what caught each.

The model is built and trained here in about a second (no download): a feature-standardising
input layer and an MLP classifier over 16 features. At release its weights get a manifest and a
reference batch a canary; at startup the self-test refuses a replica that loaded stale weights and
admits the right one. Then traffic runs through phases, each breaking the model without an
exception:

1. clean — baselines are learned;
2. a preprocessing bug — raw, unscaled inputs (x 255);
3. fp16 overflow — one feature arrives in the wrong unit (x 10^5): values no fp16 cast survives;
4. a corrupted weight — one bit of one weight flips in memory;
5. input drift — the traffic's class centres move;
6. candidate v2 — a new version, run in shadow on half of the clean traffic, was exported with
   a label map that swaps two classes: it disagrees with the serving version on those classes.

Labels are fed back after each request (``watch.record_labels``) for accuracy and calibration.
torchwatch's rules, fingerprint monitor, drift detector and shadow comparison report each; a circuit breaker answers
from a fallback while the model is unhealthy; everything goes to TensorBoard, a JSONL log and an
incident log, and ``torchwatch report`` summarises them.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import nn

from .. import __version__, formats
from .._files import atomic_write_text
from ..alerts import Alert
from ..containment import CircuitBreaker
from ..errors import ConfigError, IntegrityError, TorchwatchWarning
from ..integrity import Canary, Manifest, selftest
from ..monitors.drift import Reference
from ..shadow import shadow
from ..sinks import IncidentLog, JsonlSink, TensorBoardSink
from ..watch import attach

FEATURES, CLASSES, HIDDEN = 16, 4, 64
FLUSH_EVERY = 4  # requests between the demo's flushes
# the clean phase must cover the default rules' warm-up (30 intervals) so that their baselines are
# learned from clean traffic before the first fault; fewer requests per phase cannot catch it
MIN_REQUESTS = 30 * FLUSH_EVERY
NEVER = 2**62  # flush_every that never comes: the demo flushes itself
PHASES = ("clean", "preprocessing bug", "fp16 overflow", "corrupted weight", "input drift", "candidate v2")
# what each phase must be caught by: (rule, module or None for any)
EXPECTED = {
    "preprocessing bug": ("baseline_absmax", None),
    "fp16 overflow": ("cast_overflow", None),
    "corrupted weight": ("fingerprint", "4"),
    "input drift": ("drift", "4"),
    "candidate v2": ("shadow", None),
}


class Standardize(nn.Module):
    """``(x - mean) / scale`` with statistics loaded from the training set."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def build_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A trained classifier and the class centres its data comes from."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=g) * 3 + 10
    x, y = sample(centres, 2048, g)
    model = nn.Sequential(
        Standardize(x.mean(0), x.std(0)),
        nn.Linear(FEATURES, HIDDEN),
        nn.LayerNorm(HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), centres


def sample(centres: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, FEATURES, generator=g), y


@dataclass
class Caught:
    """The first alert of a kind in a phase."""

    phase: str
    request: int  # requests served since the phase began when it was raised
    alert: Alert


@dataclass
class Outcome:
    """What the demo observed; ``caught`` is what the exit code reports."""

    requests: int
    startup_refused: bool = False
    startup_passed: bool = False
    timeline: list[Caught] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    shadow: Any = None  # the candidate's final Comparison
    fallback_answers: dict[str, int] = field(default_factory=dict)
    logdir: str = ""

    def first(self, phase: str, rule: str, module: str | None = None) -> Caught | None:
        return next(
            (
                c
                for c in self.timeline
                if c.phase == phase and c.alert.rule == rule and module in (None, c.alert.module)
            ),
            None,
        )

    @property
    def caught(self) -> bool:
        return (
            self.startup_refused
            and self.startup_passed
            and all(self.first(phase, rule, module) for phase, (rule, module) in EXPECTED.items())
        )


def run(
    *, requests: int = 150, batch: int = 16, logdir: str | None = None, seed: int = 0, out: TextIO = sys.stdout
) -> Outcome:
    """Serve ``requests`` batches per phase through the six phases, and report. Returns the outcome.

    The alerts are printed as a timeline at the end, so torchwatch's own warnings are silenced here.
    Each run writes into a new subdirectory of ``logdir`` (``run-<UTC time>-<suffix>``, marked by
    :data:`~torchwatch.cli.report.RUN_MARKER`), so re-runs never mix; ``torchwatch report logdir``
    reads the latest. Everything is seeded: the same catches at the same requests on every run.

    Raises:
        ConfigError: ``requests`` below :data:`MIN_REQUESTS` (the baselines' warm-up).
    """
    if requests < MIN_REQUESTS:
        raise ConfigError(
            f"the demo needs at least {MIN_REQUESTS} requests per phase, got {requests}: the default rules learn "
            f"their baselines over {MIN_REQUESTS // FLUSH_EVERY} intervals of {FLUSH_EVERY} clean requests first"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TorchwatchWarning)
        return _run(requests, batch, logdir, seed, out)


def _run(requests: int, batch: int, logdir: str | None, seed: int, out: TextIO) -> Outcome:
    torch.manual_seed(seed)
    logdir, marker = _run_directory(logdir, requests=requests, batch=batch, seed=seed)
    say = out.write
    outcome = Outcome(requests=requests, logdir=logdir)
    say("torchwatch demo: a classifier serving traffic through six silent failures. Nothing raises.\n\n")
    started = time.perf_counter()
    model, centres = build_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    say(f"  release   trained a {_describe(model)} in {time.perf_counter() - started:.1f}s; ")
    manifest_path, canary_path = (
        os.path.join(logdir, "model.manifest.json"),
        os.path.join(logdir, "model.canary.safetensors"),
    )
    manifest = Manifest.from_model(model)
    manifest.save(manifest_path)
    Canary.record(model, sample(centres, 64, g)[0], manifest=manifest).save(canary_path)
    say("wrote its manifest and canary\n")

    stale, _ = build_model(seed + 7)  # a replica that loaded last week's checkpoint
    try:
        selftest(stale, manifest=manifest_path, canary=canary_path)
    except IntegrityError as exc:
        outcome.startup_refused = True
        say(f"  startup   replica B refused: {exc.report.weights.summary().splitlines()[1].strip()}\n")
    served = copy.deepcopy(model)
    report = selftest(served, manifest=manifest_path, canary=canary_path)
    outcome.startup_passed = report.ok
    say(f"  startup   replica A passed the self-test in {report.seconds:.2f}s (weights, canary bitwise, fingerprint)\n")

    reference = Reference.fit(
        served, (sample(centres, 256, g)[0] for _ in range(16)), modules=["4"], window=32, arl=20_000
    )
    sinks = [
        TensorBoardSink(os.path.join(logdir, "tensorboard")),
        JsonlSink(os.path.join(logdir, "stats.jsonl")),
        IncidentLog(os.path.join(logdir, "incidents.jsonl")),
    ]
    # The demo flushes itself every FLUSH_EVERY requests and waits for each flush, so that what is
    # caught, and when, is the same on every run and machine (a server would let flush_every
    # flush in the background).
    watch = attach(served, sinks=sinks, flush_every=NEVER, drift=reference, on_nonfinite="ignore", outputs=True)
    monitor = watch.verify_fingerprint_every(3600, baseline=report.fingerprint)  # checked each tick below
    fallback = {"n": 0}
    served_requests = {"n": 0}

    def answer_from_fallback(x: torch.Tensor) -> torch.Tensor:  # e.g. a cached or simpler model
        fallback["n"] += 1
        return torch.zeros(len(x), CLASSES)

    # cool-down counted in requests, not seconds: a loaded machine must not change the answers
    breaker = CircuitBreaker(watch, fallback=answer_from_fallback, cooldown=2, clock=lambda: served_requests["n"])
    say(f"  serving   {len(PHASES)} phases x {requests} requests of {batch} rows\n")
    seen = 0
    pristine = served[4].weight.detach().clone()
    total = len(PHASES) * requests
    candidate = copy.deepcopy(model)  # v2: exported with classes 0 and 1 swapped in its label map
    with torch.no_grad():
        for t in (candidate[-1].weight, candidate[-1].bias):
            t[[0, 1]] = t[[1, 0]].clone()
    shadowing = None
    with torch.inference_mode():
        for p, phase in enumerate(PHASES):
            correct, fallback["n"] = [0, 0], 0
            _begin_phase(logdir, marker, phase, watch.calls)
            if phase == "corrupted weight":
                served[4].weight.view(-1).view(torch.int32)[77] ^= 1 << 29  # one exponent bit
            if phase == "candidate v2":
                watch.reset()  # the shadow phase starts from fresh statistics and re-armed detectors
                shadowing = shadow(served, candidate, sample=0.5, seed=seed, min_calls=8,
                                   path=os.path.join(logdir, "shadow.jsonl"))  # fmt: skip
            for i in range(requests):
                x, y = sample(centres, batch, g)
                if phase == "preprocessing bug":
                    x = x * 255.0
                elif phase == "fp16 overflow":
                    x[:, 5] *= 1e5
                elif phase == "input drift":
                    shift = min(1.0, i / (requests / 3))
                    x = x + shift * 2.5 * torch.linspace(-1, 1, FEATURES)
                trace, served_by_fallback = f"{phase[:4]}-{i:04d}", fallback["n"]
                with watch.context(trace_id=trace):
                    pred = breaker(x).argmax(-1)
                served_requests["n"] += 1
                if shadowing is not None:
                    shadowing.wait()  # the candidate's comparison of this request, before its alerts are read
                if fallback["n"] == served_by_fallback:  # the model answered: its labels arrive later
                    watch.record_labels(trace, y)
                correct[0] += int((pred == y).sum())
                correct[1] += batch
                if i % FLUSH_EVERY == FLUSH_EVERY - 1:
                    if i % (2 * FLUSH_EVERY) == 2 * FLUSH_EVERY - 1:
                        monitor.check_now()
                    watch.flush()
                for alert in watch.alerts[seen:]:
                    if not any(c.phase == phase and c.alert.rule == alert.rule for c in outcome.timeline):
                        outcome.timeline.append(Caught(phase, i, alert))
                seen = len(watch.alerts)
                _progress(p * requests + i + 1, total, phase, out)
            if shadowing is not None:
                outcome.shadow = shadowing.close()
            watch.flush()
            for alert in watch.alerts[seen:]:
                if not any(c.phase == phase and c.alert.rule == alert.rule for c in outcome.timeline):
                    outcome.timeline.append(Caught(phase, requests, alert))
            seen = len(watch.alerts)
            outcome.accuracy[phase] = correct[0] / max(correct[1], 1)
            outcome.fallback_answers[phase] = fallback["n"]
            if phase == "corrupted weight":  # the operator reloads the validated weights ...
                served[4].weight.copy_(pristine)
                watch.reset()  # ... and re-arms the detectors: the drift episode of the faults so far is over
            watch.mark_healthy()
    watch.detach()
    _report(outcome, out)
    return outcome


def _run_directory(parent: str | None, **settings: Any) -> tuple[str, dict[str, Any]]:
    """A new directory for this run's logs (under ``parent``, else a temporary one), marked as a
    run; returns it and the marker (:data:`formats.RUN_MARKER`), which each phase adds to."""
    if parent is None:
        run_dir = tempfile.mkdtemp(prefix="torchwatch-demo-")
    else:
        os.makedirs(parent, exist_ok=True)
        run_dir = tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime()), dir=parent)
    marker = {"started": time.time(), "command": "demo", "torchwatch": __version__, **settings, "phases": []}
    atomic_write_text(os.path.join(run_dir, formats.RUN_MARKER), json.dumps(marker))
    return run_dir, marker


def _begin_phase(run_dir: str, marker: dict[str, Any], name: str, calls: int) -> None:
    """Record a phase's start in the run marker, for the report's phase markers."""
    marker["phases"].append({"name": name, "call": calls, "time": time.time()})
    atomic_write_text(os.path.join(run_dir, formats.RUN_MARKER), json.dumps(marker))


def _describe(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{len(model)}-layer classifier ({params:,} parameters)"


def _progress(done: int, total: int, phase: str, out: TextIO) -> None:
    if not out.isatty():
        return
    width = 30
    filled = width * done // total
    out.write(f"\r  serving   [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {phase:<20}")
    if done == total:
        out.write("\n")
    out.flush()


def _report(o: Outcome, out: TextIO) -> None:
    say = out.write
    say("\nWhat happened, phase by phase (accuracy of the answers served; fallback answers while unhealthy):\n")
    for phase in PHASES:
        accuracy, fallbacks = o.accuracy.get(phase, 0), o.fallback_answers.get(phase, 0)
        say(f"  {phase:<18} accuracy {accuracy:6.1%}   fallback answers {fallbacks:>4}\n")
    say("\nTimeline of what torchwatch caught (first alert of each kind per phase):\n")
    for c in o.timeline:
        say(f"  {c.phase:<18} request {c.request:>4}  {c.alert.rule:<16} {c.alert.message}\n")
    if o.shadow is not None:
        say("\nCandidate v2 in shadow:\n  " + o.shadow.summary().replace("\n", "\n  ") + "\n")
    missed = [phase for phase, (rule, module) in EXPECTED.items() if not o.first(phase, rule, module)]
    if missed:
        say(f"\nNOT caught as expected: {', '.join(missed)}\n")
    else:
        say("\nEvery failure was caught; the stale replica never served.\n")
    say(f"\nLogs: {o.logdir}\n")
    tensorboard = os.path.join(o.logdir, "tensorboard")
    say(f"  tensorboard --logdir {tensorboard}   (Custom Scalars: what changed first; Text: each alert)\n")
    say(f"  torchwatch report {o.logdir}                 (summary; --html report.html for charts)\n")
