"""Replicas judged against each other: which one differs, in what, and the likely cause.

Replicas that run the same weights with the same software and settings on the same device model
give bitwise identical canary outputs, so among them the majority is right and a minority output
is a finding. Where that cannot be decided (different device models or settings, no majority),
each module's summary is compared with the fleet's median, in units of its spread (median
absolute deviation), with a relative floor for the rounding that different kernels bring.

Causes, in the order they are decided for a replica:

* ``unresponsive`` — it did not answer within the timeout (dead, hung or partitioned);
* ``inputs`` — it ran another canary batch (the comparison says nothing about it);
* ``weights`` — its weights' fingerprint differs from the majority's at the same dtype;
* ``configuration`` — its software or settings differ from the majority's (versions, device
  model, dtype, threads, TF32, determinism) and its outputs differ;
* ``hardware`` — weights, software and settings equal the majority's, outputs differ: a device
  that computes wrong (silent data corruption) is suspected.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .probe import Probe

__all__ = ["CAUSES", "Finding", "FleetReport", "judge"]

CAUSES = ("unresponsive", "inputs", "weights", "configuration", "hardware")
STATS = ("mean", "std", "absmax")
SILENT = (
    "did not answer within the timeout: the process died, hangs or cannot reach the others; look at its logs "
    "and restart it"
)
MAD_SCALE = 1.4826  # the MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class Finding:
    """One replica that differs from its peers.

    Attributes:
        rank: its rank in the comparison's group; replica: its name ("" when it did not answer).
        cause: one of ``CAUSES`` (see the module docstring).
        what: one sentence for a person: what differs and what to do.
        module: the first module (execution order) whose output differs, when known.
        differs: the settings, tensors or outputs that differ, ``{name: [this replica's, majority's]}``.
    """

    rank: int
    replica: str
    cause: str
    what: str
    module: str | None = None
    differs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``"replica <name> (rank <r>)"``, or ``"rank <r>"`` when its name is unknown."""
        return f"replica {self.replica} (rank {self.rank})" if self.replica else f"rank {self.rank}"

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "replica": self.replica, "cause": self.cause, "what": self.what,
                "module": self.module, "differs": self.differs}  # fmt: skip


@dataclass
class FleetReport:
    """What comparing the replicas found (:func:`torchwatch.distributed.compare_replicas`).

    Attributes:
        ok: every replica answered and none differs.
        ranks: the ranks compared (the group's); answered: those whose probe arrived in time.
        findings: one :class:`Finding` per replica that differs.
        probes: each answering rank's :class:`~torchwatch.fleet.probe.Probe`.
        rank: this process's rank; seconds: how long the comparison took here.
    """

    ok: bool
    ranks: list[int]
    answered: list[int]
    findings: list[Finding]
    probes: dict[int, Probe]
    rank: int = -1
    seconds: float = 0.0

    def finding(self, rank: int) -> Finding | None:
        """The finding about ``rank``, or None."""
        return next((f for f in self.findings if f.rank == rank), None)

    @property
    def mine(self) -> Finding | None:
        """The finding about this process's rank, or None."""
        return self.finding(self.rank)

    def summary(self) -> str:
        head = (f"replicas {'agree' if self.ok else 'DIFFER'}: {len(self.answered)} of {len(self.ranks)} ranks "
                f"answered, {len(self.findings)} differ")  # fmt: skip
        return "\n".join([head, *(f"  {f.name}: {f.cause}: {f.what}" for f in self.findings)])

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "ranks": self.ranks, "answered": self.answered, "rank": self.rank,
                "seconds": self.seconds, "findings": [f.to_dict() for f in self.findings],
                "replicas": {r: p.identity.to_dict() for r, p in self.probes.items()}}  # fmt: skip


def _majority(values: Mapping[int, Hashable]) -> Hashable | None:
    """The value more than half of ``values`` hold (None: no strict majority, or fewer than 3 voters
    where 2 disagreeing cannot say which one is right)."""
    if not values:
        return None
    value, n = Counter(values.values()).most_common(1)[0]
    if n * 2 > len(values) and (len(values) >= 3 or n == len(values)):
        return value
    return None


def _settings_key(p: Probe) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in p.settings.items()))


def _outputs_key(p: Probe) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(p.outputs.items()))


def judge(
    ranks: Sequence[int], probes: Mapping[int, Probe | None], *, threshold: float = 8.0, rel_floor: float = 1e-2,
    rank: int = -1, seconds: float = 0.0,
) -> FleetReport:  # fmt: skip
    """Compare the probes of ``ranks`` (None or absent: the rank did not answer).

    Args:
        threshold: robust z-score (distance from the median in MADs) beyond which a module's
            summary is an outlier, where outputs cannot be compared bitwise.
        rel_floor: relative difference from the median always tolerated (rounding of other kernels).
    """
    present = {r: p for r in ranks if (p := probes.get(r)) is not None}
    findings: dict[int, Finding] = {}
    for r in ranks:
        if r not in present:
            findings[r] = Finding(r, "", "unresponsive", SILENT)

    def add(f: Finding) -> None:
        findings.setdefault(f.rank, f)

    inputs = _majority({r: p.inputs for r, p in present.items()})
    if inputs is not None:
        for r, p in present.items():
            if p.inputs != inputs:
                add(Finding(r, p.identity.replica, "inputs", "ran another canary batch than its peers: give every "
                            "replica the same canary file", differs={"inputs": [p.inputs, inputs]}))  # fmt: skip
    judged = {r: p for r, p in present.items() if r not in findings}
    settings = _majority({r: _settings_key(p) for r, p in judged.items()})
    usual = dict(next(p for p in judged.values() if _settings_key(p) == settings).settings) if settings else {}
    weights = _majority({r: (p.settings.get("dtype"), p.weights) for r, p in judged.items()})
    reference = next((p for p in judged.values() if (p.settings.get("dtype"), p.weights) == weights), None)
    for r, p in judged.items():
        if reference is not None and p.settings.get("dtype") == reference.settings.get("dtype") \
                and p.weights != reference.weights:  # fmt: skip
            tensors = sorted(n for n in set(p.tensors) | set(reference.tensors)
                             if p.tensors.get(n) != reference.tensors.get(n))  # fmt: skip
            more = f" and {len(tensors) - 3} more" if len(tensors) > 3 else ""
            add(Finding(r, p.identity.replica, "weights", f"its weights differ from the majority's in {len(tensors)} "
                        f"tensor(s): {', '.join(tensors[:3])}{more}; reload them and run tw.selftest",
                        module=tensors[0].rpartition(".")[0] if tensors else None,
                        differs={"tensors": tensors[:64]}))  # fmt: skip
    # bitwise, within each class of replicas with equal settings
    classes: dict[Any, dict[int, Probe]] = {}
    for r, p in judged.items():
        classes.setdefault(_settings_key(p), {})[r] = p
    for members in classes.values():
        agreed = _majority({r: _outputs_key(p) for r, p in members.items()})
        if agreed is None:
            continue
        model = next(p for p in members.values() if _outputs_key(p) == agreed)
        for r, p in members.items():
            if _outputs_key(p) != agreed:
                add(_differs(r, p, model, usual, bitwise=True))
    # across classes: a replica with other settings whose outputs are not the fleet majority's
    overall = _majority({r: _outputs_key(p) for r, p in judged.items() if r not in findings})
    if overall is not None and settings is not None:
        model = next(p for p in judged.values() if _outputs_key(p) == overall)
        for r, p in judged.items():
            if _outputs_key(p) != overall and _settings_key(p) != settings:
                add(_differs(r, p, model, usual, bitwise=True))
    # close, across every replica: a module summary far outside the fleet's spread
    for r, module in _outliers(judged, threshold, rel_floor).items():
        p = judged[r]
        add(_differs(r, p, None, usual, bitwise=False, module=module))
    ordered = [findings[r] for r in sorted(findings)]
    return FleetReport(ok=not ordered, ranks=list(ranks), answered=sorted(present), findings=ordered,
                       probes=present, rank=rank, seconds=seconds)  # fmt: skip


def _differs(r: int, p: Probe, model: Probe | None, usual: Mapping[str, Any], *, bitwise: bool,
             module: str | None = None) -> Finding:  # fmt: skip
    """The finding for a replica whose outputs differ: configuration when its settings are not the
    majority's, else suspected hardware."""
    if model is not None:
        module = next((m.name for m, o in zip(p.modules, model.modules, strict=False)
                       if m.digest != o.digest or m.name != o.name), None)  # fmt: skip
        outputs = sorted(n for n in p.outputs if p.outputs.get(n) != model.outputs.get(n))
    else:
        outputs = []
    where = f" from module {module!r} on" if module else ""
    how = "bitwise" if bitwise else "beyond the fleet's spread"
    settings = {k: [v, usual.get(k)] for k, v in p.settings.items() if usual and usual.get(k) != v}
    if settings:
        named = ", ".join(f"{k} {v[0]!r} (others {v[1]!r})" for k, v in list(settings.items())[:4])
        return Finding(r, p.identity.replica, "configuration", f"its outputs differ {how}{where} and its settings "
                       f"differ: {named}; align its software and settings with the fleet", module=module,
                       differs={**settings, **({"outputs": outputs} if outputs else {})})  # fmt: skip
    return Finding(r, p.identity.replica, "hardware", f"its outputs differ {how}{where} while its weights, software "
                   f"and settings equal its peers': suspected faulty device ({p.identity.device_name}"
                   f"{' ' + p.identity.device_uuid if p.identity.device_uuid else ''}); drain it and run a "
                   "device check", module=module, differs={"outputs": outputs} if outputs else {})  # fmt: skip


def _outliers(probes: Mapping[int, Probe], threshold: float, rel_floor: float) -> dict[int, str]:
    """For each replica with a module summary beyond ``threshold`` robust z from the median of the
    replicas (at least 3 of them), the first such module in execution order."""
    if len(probes) < 3:
        return {}
    names = [m.name for m in next(iter(probes.values())).modules]
    tables = {r: {m.name: m for m in p.modules} for r, p in probes.items()}
    out: dict[int, str] = {}
    for name in names:
        for stat in STATS:
            values = {r: t[name].stat(stat) for r, t in tables.items() if name in t}
            finite = [v for v in values.values() if math.isfinite(v)]
            if len(finite) < 3:
                continue
            med = statistics.median(finite)
            mad = statistics.median(abs(v - med) for v in finite)
            scale = MAD_SCALE * mad + rel_floor * abs(med) + 1e-30
            for r, v in values.items():
                if r not in out and (not math.isfinite(v) or abs(v - med) > threshold * scale):
                    out[r] = name
    return out
