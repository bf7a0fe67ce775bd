"""Replaying a captured incident in a sandbox, and naming its culprit.

:meth:`Incident.replay` runs the captured arguments through a freshly loaded model with every
module watched, under the settings the serving call ran with (threads, TF32, autocast), and
answers three questions:

1. **reproduced?** — the trigger happens again (NaN/Inf from the same origin, the same cast limit
   broken by the same module), and whether the outputs are bitwise those the call returned;
2. **where** — the first module, in execution order, whose output went non-finite (or broke the
   limit), with the capture's per-module statistics beside the replay's;
3. **which culprit**, from controlled re-runs and checks, in this order:

   * ``data``: a floating-point argument holds NaN/Inf, or lies far outside the range of the recent
     healthy calls' inputs (:mod:`.reference`), or the trigger was on an input position;
   * ``weights``: the sandbox does not reproduce it and the weights the serving process held
     (their fingerprint, in the bundle) differ from the sandbox's: the differing tensor is named;
   * ``precision``: reproduced, and clean again with the model and inputs in float32, autocast
     and TF32 off (or, for a float32 model, a cast limit of a lower precision broken): the first
     module that goes non-finite in the low precision is named;
   * ``model``: reproduced at full precision on clean inputs with the same weights: the model
     itself (its code, or weights that were validated as they are) produces it;
   * ``hardware``: not reproduced on a healthy model with the same weights and settings although
     the capture saw it: a suspected hardware or nondeterminism fault (compare replicas to confirm);
   * ``none``: nothing to explain (a capture asked for by hand of a healthy call).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from .. import formats
from .._tensors import model_device, model_dtype
from ..alerts import Alert
from ..errors import ConfigError, TorchwatchWarning
from ..integrity.fingerprinting import Fingerprint, FingerprintChange, fingerprint
from ..integrity.verify import verify_weights
from ..monitors.inputs import INPUT
from ..stats import ModuleStats
from ..watch import attach
from .bundle import Opaque
from .monitor import MANUAL
from .reference import out_of_range
from .trees import map_tensors, tensors_of

LOW = (torch.float16, torch.bfloat16)
AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}
CULPRITS = ("data", "weights", "precision", "model", "hardware", "none")


@dataclasses.dataclass(frozen=True)
class Run:
    """One sandbox run: its statistics per position (execution order), its NaN/Inf origin, outputs."""

    stats: dict[str, ModuleStats]
    origin: str | None
    outputs: Any


@dataclasses.dataclass(frozen=True)
class ReplayReport:
    """What a replay found (:meth:`Incident.replay`).

    Attributes:
        culprit: one of ``"data"``, ``"weights"``, ``"precision"``, ``"model"``, ``"hardware"``, ``"none"``.
        reason: one sentence saying why.
        module: where: the first module that went wrong (replay, or live when not reproduced).
        tensor: for ``"weights"``, the weight tensor that differs (and its chunk in ``reason``).
        reproduced: whether the trigger happened again under the captured settings (None for a
            trigger a single call cannot show, such as drift).
        bitwise: whether the outputs are bitwise the captured ones (None without captured outputs).
        live_origin, replay_origin: where NaN/Inf started in the capture and in the replay.
        rows: ``(position, live statistics or None, replay statistics)`` in execution order.
        notes: other findings (sandbox weights against the manifest, settings that could not be set).

    Example:
        >>> import tempfile, torch, torchwatch as tw
        >>> model = torch.nn.Linear(2, 2)
        >>> capture = tw.Capture(tempfile.mkdtemp(), inputs=True)
        >>> with tw.attach(model, capture=capture) as watch:
        ...     _ = watch.capture("req-1")
        ...     with watch.context(trace_id="req-1"):
        ...         _ = model(torch.ones(1, 2))
        >>> report = tw.Incident.load(tw.Incident.list(capture.directory)[0]).replay(model)
        >>> report.culprit, report.bitwise, report.found
        ('none', True, False)
    """

    culprit: str
    reason: str
    module: str | None
    tensor: str | None
    reproduced: bool | None
    bitwise: bool | None
    live_origin: str | None
    replay_origin: str | None
    trigger: Alert
    rows: list[tuple[str, ModuleStats | None, ModuleStats]]
    notes: list[str]

    @property
    def found(self) -> bool:
        """Whether a cause was named (``torchwatch replay`` exits 1 then, 0 otherwise)."""
        return self.culprit != "none"

    def summary(self, rows: int = 12) -> str:
        """One screen: the verdict, then the per-module picture around where it went wrong."""
        t = self.trigger
        lines = [
            f"incident: {t.rule} on {t.module!r} (call {t.call}, trace id {t.trace_id})",
            f"reproduced: {_yes(self.reproduced)}   outputs bitwise equal: {_yes(self.bitwise)}",
            f"where: {self.module or '-'}   (capture origin: {self.live_origin or '-'}, "
            f"replay origin: {self.replay_origin or '-'})",
            f"CULPRIT: {self.culprit.upper()} - {self.reason}",
            *(f"note: {n}" for n in self.notes),
            "",
            f"{'position':<44} {'capture absmax':>15} {'nan/inf':>9} {'replay absmax':>15} {'nan/inf':>9}",
        ]
        names = [name for name, _, _ in self.rows]
        at = names.index(self.module) if self.module in names else 0
        for name, live, replay in self.rows[max(0, at - rows // 2) : max(0, at - rows // 2) + rows]:
            mark = ">" if name == self.module else " "
            name = name or "(model output)"
            lines.append(
                f"{mark}{name[-43:]:<43} {_absmax(live):>15} {_bad(live):>9} {_absmax(replay):>15} {_bad(replay):>9}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": formats.REPLAY,
            "culprit": self.culprit,
            "reason": self.reason,
            "module": self.module,
            "tensor": self.tensor,
            "reproduced": self.reproduced,
            "bitwise": self.bitwise,
            "live_origin": self.live_origin,
            "replay_origin": self.replay_origin,
            "trigger": self.trigger.to_dict(),
            "notes": self.notes,
            "rows": [[n, live.to_dict() if live else None, r.to_dict()] for n, live, r in self.rows],
        }


@contextlib.contextmanager
def settings(environment: dict[str, Any], device: torch.device, *, full_precision: bool = False) -> Iterator[list[str]]:
    """The captured numerics settings for a block (``full_precision``: TF32 and autocast off);
    yields notes about settings that could not be reproduced here."""
    notes: list[str] = []
    threads = torch.get_num_threads()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        want = environment.get("threads")
        if device.type == "cpu" and isinstance(want, int) and 0 < want <= 4096 and want != threads:
            torch.set_num_threads(want)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(environment.get("tf32_matmul")) and not full_precision
            torch.backends.cudnn.allow_tf32 = bool(environment.get("tf32_cudnn", True)) and not full_precision
        captured = environment.get("device")
        if isinstance(captured, str) and captured != device.type:
            notes.append(f"captured on {captured}, replayed on {device.type}: bitwise equality is not expected")
        autocast = AUTOCAST.get(environment.get("autocast"))  # type: ignore[arg-type]
        if environment.get("autocast") and autocast is None:
            notes.append(f"the captured autocast dtype {environment.get('autocast')!r} is not one this replay sets")
        if autocast is not None and not full_precision:
            with torch.autocast(device.type, dtype=autocast):
                yield notes
        else:
            yield notes
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def to_device(tree: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """The argument tree on ``device`` (floating-point tensors cast to ``dtype`` if given)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return map_tensors(tree, move)


def full_precision_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of ``model`` (the sandbox's control run)."""
    return copy.deepcopy(model).float()


def low_precision(model: torch.nn.Module, environment: dict[str, Any], args: Any) -> bool:
    """Whether the captured call ran in a precision below float32 (weights, inputs, autocast, TF32)."""
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    inputs = [t.dtype for t in tensors_of(args) if t.is_floating_point()]
    tf32 = environment.get("device") == "cuda" and bool(environment.get("tf32_matmul"))
    return any(d in LOW for d in floats + inputs) or bool(environment.get("autocast")) or tf32


def weight_changes(live: Any, model: torch.nn.Module) -> list[FingerprintChange]:
    """Where the serving process's weights (the bundle's fingerprint, None when it has none)
    differ from ``model``'s.

    Raises:
        FormatError: the bundle's fingerprint is malformed.
    """
    if not isinstance(live, dict) or "tensors" not in live:  # none, or {"error": ...} from the writer
        return []
    baseline = Fingerprint.from_dict(live, "the bundle's weight fingerprint")
    return baseline.diff(fingerprint(model, chunk_bytes=baseline.chunk_bytes))


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "no"


def _absmax(s: ModuleStats | None) -> str:
    return "-" if s is None else f"{s.absmax:.4g}"


def _bad(s: ModuleStats | None) -> str:
    return "-" if s is None else str(s.nonfinite)


# ---- the verdict ----------------------------------------------------------------------------


def run(
    model: torch.nn.Module, args: Any, kwargs: Any, environment: dict[str, Any], *, full_precision: bool = False
) -> tuple[Run, list[str]]:
    """One sandbox run with every module watched: statistics per position, NaN/Inf origin, outputs."""
    device = model_device(model)
    dtype = torch.float32 if full_precision else None
    a, k = to_device(args, device, dtype), to_device(kwargs, device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TorchwatchWarning)  # the replay reports what it finds itself
        watch = attach(model, modules=_every_module, rules=[], on_nonfinite="ignore", flush_every=1 << 30)
        try:
            try:
                with settings(environment, device, full_precision=full_precision) as notes, torch.inference_mode():
                    outputs = model(*a, **k)
            except Exception as exc:  # noqa: BLE001 - a model that does not fit the bundle is bad input
                raise ConfigError(
                    f"the model raised {exc!r} on the captured inputs; is it the model that served the call "
                    "(same code, same input format)?"
                ) from None
            snap = watch.snapshot()
        finally:
            watch.detach()
    origin = next(iter(snap.nonfinite.values())).origin if snap.nonfinite else None
    return Run({name: snap[name] for name in snap}, origin, outputs), notes


def judge(incident: Any, model: torch.nn.Module, manifest: Any) -> ReplayReport:
    """The verdict of :meth:`~torchwatch.Incident.replay` (see the module docstring)."""
    trigger, env, live = incident.trigger, incident.environment, incident.stats or {}
    notes: list[str] = []
    if manifest is not None:
        report = verify_weights(model, manifest)
        if not report.ok:
            notes.append(
                f"the sandbox's weights do not match the manifest ({report.mismatched[:3]} differ): "
                "load the validated weights for a clean replay"
            )
    same, run_notes = run(model, incident.args, incident.kwargs, env)
    notes += run_notes
    live_origin = trigger.module if trigger.rule == "nonfinite" else _first(live, _nonfinite)
    reproduced = _reproduced(trigger, same, live_origin)
    bitwise = _bitwise(incident.outputs, same.outputs) if incident.outputs is not None else None
    rows = [(name, live.get(name), s) for name, s in same.stats.items()]
    where = _where(trigger, same) if reproduced else (live_origin or trigger.module or None)

    def verdict(culprit: str, reason: str, module: str | None = where, tensor: str | None = None) -> ReplayReport:
        return ReplayReport(
            culprit, reason, module, tensor, reproduced, bitwise, live_origin, same.origin, trigger, rows, notes
        )

    inputs = [(name, s) for name, s in same.stats.items() if name.startswith(INPUT)]
    for name, s in inputs:  # NaN/Inf in the data first: the plainest evidence
        if s.nonfinite:
            return verdict(
                "data",
                f"input {name!r} arrived holding {s.nan} NaN, {s.posinf} +Inf, {s.neginf} -Inf: a data "
                "or preprocessing fault upstream of the model",
                name,
            )
    for name, s in inputs:
        why = out_of_range(name, s.absmax, incident.meta.get("input_reference"))
        if why is not None:
            return verdict("data", why, name)
    if trigger.module.startswith(INPUT):
        return verdict(
            "data",
            f"the alert was on input {trigger.module!r} ({trigger.message}): the data changed before the model",
            trigger.module,
        )
    weights = incident.meta.get("weights")
    changes = weight_changes(weights.get("fingerprint") if isinstance(weights, dict) else None, model)
    if changes and not reproduced:
        more = f"; {len(changes) - 1} more change(s)" if len(changes) > 1 else ""
        return verdict(
            "weights",
            f"the serving process's weights differed from the sandbox's: {changes[0]}{more}, and the sandbox's "
            "weights do not reproduce the fault",
            where,
            changes[0].tensor,
        )
    if changes:
        notes.append(f"the serving process's weights also differed from the sandbox's: {changes[0]}")
    if reproduced:
        if low_precision(model, env, incident.args):
            fp32, _ = run(full_precision_copy(model), incident.args, incident.kwargs, env, full_precision=True)
            if fp32.origin is None and not _reproduced(trigger, fp32, live_origin):
                return verdict(
                    "precision",
                    f"clean in float32 (autocast and TF32 off): {where!r} is the first "
                    "module that overflows in the low precision",
                )
        elif trigger.stat.startswith("overflow."):
            dtype = trigger.stat.split(".", 1)[1]
            return verdict(
                "precision",
                f"the values of {where!r} exceed {dtype}'s range on this input: the model is "
                f"fine in {str(model_dtype(model) or torch.float32).removeprefix('torch.')} but cannot run in {dtype}",
            )
        return verdict(
            "model",
            f"reproduced at full precision on clean inputs with the same weights: {where!r} "
            "produces it from what it is given (the model's code, or weights validated as they are)",
        )
    if reproduced is None:
        return verdict(
            "none",
            "this trigger is not a property of one call; the replay ran clean"
            if same.origin is None
            else f"the replay went non-finite at {same.origin!r}",
            same.origin,
        )
    if trigger.rule == MANUAL and live_origin is None:
        return verdict("none", "the captured call was healthy and the replay is too")
    return verdict(
        "hardware",
        "not reproduced on a healthy model with the same weights, inputs and settings: a "
        "suspected hardware or nondeterminism fault (compare this replica with others to confirm)",
    )


def _every_module(fqn: str, module: torch.nn.Module) -> bool:
    return True


def _nonfinite(s: ModuleStats) -> bool:
    return s.nonfinite > 0


def _first(stats: dict[str, ModuleStats], test: Any) -> str | None:
    return next((name for name, s in stats.items() if test(s)), None)


def _reproduced(trigger: Alert, run_: Run, live_origin: str | None) -> bool | None:
    if trigger.rule == "nonfinite" or (trigger.rule == MANUAL and live_origin is not None):
        return run_.origin is not None and (
            live_origin is None or live_origin == run_.origin or _nonfinite_at(run_, live_origin)
        )
    if trigger.stat.startswith("overflow."):
        dtype = trigger.stat.split(".", 1)[1]
        s = run_.stats.get(trigger.module)
        return s is not None and s.overflow.get(dtype, 0) > 0
    if trigger.rule == MANUAL:
        return run_.origin is not None
    return None


def _where(trigger: Alert, run_: Run) -> str | None:
    if run_.origin is not None:
        return run_.origin
    if trigger.stat.startswith("overflow."):
        dtype = trigger.stat.split(".", 1)[1]
        return _first(run_.stats, lambda s: s.overflow.get(dtype, 0) > 0) or trigger.module
    return trigger.module or None


def _bitwise(a: Any, b: Any) -> bool:
    if isinstance(a, Opaque):  # what the capture could not store (a KV-cache object) is not compared
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        b = b.detach().to("cpu")
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return (
            bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))) if a.numel() else True
        )
    if isinstance(a, dict) or hasattr(b, "keys"):
        b = dict(b.items()) if hasattr(b, "items") else b
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_bitwise(a[k], b[k]) for k in a)
        )
    if isinstance(a, (tuple, list)):
        return (
            isinstance(b, (tuple, list)) and len(a) == len(b) and all(_bitwise(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _nonfinite_at(run_: Run, name: str) -> bool:
    s = run_.stats.get(name)
    return s is not None and s.nonfinite > 0
