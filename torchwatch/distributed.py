"""Replicas of a ``torch.distributed`` job compared with each other (docs/fleet.md).

Every check that compares a replica with its own past (baselines, drift) or with a file (manifest,
canary) misses what a replica is born with or acquires without any change of its own statistics:
a device that silently computes wrong, weights loaded from another checkpoint, another library
version or precision setting. Replicas that should agree show it only when compared with each
other. :func:`compare_replicas` runs the same canary batch on every rank and exchanges what each
gives (canary output and per-module digests and summaries, weight fingerprint, settings) through
the process group's store, then names the ranks that differ and why.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

from torch import nn

from . import _validate
from .alerts import Alert
from .engine import registry
from .errors import ConfigError, FormatError
from .fleet.exchange import gather
from .fleet.judge import Finding, FleetReport, judge
from .fleet.probe import Probe, canary_of, take

__all__ = ["Finding", "FleetReport", "compare_replicas", "replica_alert"]

FORMAT = "torchwatch.fleet/1"


def compare_replicas(
    model: nn.Module,
    canary: Any,
    *,
    group: Any = None,
    shard: str | None = None,
    timeout: float = 60.0,
    threshold: float = 8.0,
    rel_floor: float = 1e-2,
    replica: str | None = None,
    store: Any = None,
) -> FleetReport:
    """Run ``canary`` on this rank's ``model``, exchange the result with every rank of ``group`` and
    name the ranks that differ from their peers. Every rank of the group calls it (like a collective).

    Replicas with the same software, settings and device model must agree bitwise: the majority's
    canary outputs are right, a minority is named, with the first module (in execution order)
    whose output differs. Replicas that cannot agree bitwise (other device models, settings)
    are compared by each module's mean, std and abs-max against the median of all ranks, in
    units of its median absolute deviation (``threshold``, with ``rel_floor`` tolerated). Each
    finding has a cause: ``unresponsive``, ``inputs``, ``weights``, ``configuration`` (software or
    settings differ) or ``hardware`` (all equal but the outputs: a suspected faulty device).

    A rank that died or hangs is reported after ``timeout`` seconds; the others finish. When the
    model is watched (:func:`torchwatch.attach`), the canary runs between requests (calls in
    flight finish first, new ones wait for it) and is not counted in its statistics, and the
    finding is published: a tripping ``"replica"`` alert on the rank found to differ (its
    :class:`~torchwatch.CircuitBreaker` opens), and one alert per finding, not tripping, on the lowest
    agreeing rank, so the fleet's logs name it even when the odd rank is silent.

    Args:
        model: this rank's model, as it serves (``eval()``).
        canary: a :class:`~torchwatch.Canary`, the path of a canary file, or a batch of inputs
            (the same on every rank: its digest is compared too).
        group: the process group to compare within (default: the whole job). With tensor or
            pipeline parallelism, pass a group of the ranks that hold the same shard, or
            ``shard``.
        shard: a name for what this rank holds (e.g. ``f"tp{tp_rank}"``); ranks compare with the
            ranks of the same ``shard`` only. None: all ranks hold the whole model.
        timeout: seconds to wait for the other ranks' results.
        threshold, rel_floor: the robust distance beyond which a module's summary differs.
        replica: this replica's name (default: the watch's, else from the environment).
        store: the ``torch.distributed.Store`` to exchange through (default: the process group's).

    Returns:
        A :class:`~torchwatch.fleet.judge.FleetReport`: ``ok``, ``findings``, ``mine``, ``summary()``.

    Raises:
        ConfigError: torch.distributed is not initialised, bad arguments, or the canary does not fit the model.
    """
    _validate.instance("compare_replicas", "model", model, nn.Module, "a torch.nn.Module")
    timeout = _validate.number("compare_replicas", "timeout", timeout, low=0.0)
    threshold = _validate.number("compare_replicas", "threshold", threshold, low=0.0)
    rel_floor = _validate.number("compare_replicas", "rel_floor", rel_floor, low=0.0)
    if shard is not None and not isinstance(shard, str):
        raise ConfigError(f"compare_replicas: shard must be a string naming what this rank holds, got {shard!r}")
    start = time.perf_counter()
    checked = canary_of(model, canary)
    watch = registry.watch_of(model)
    if replica is None and watch is not None:
        replica = watch.config.replica
    with _aside(watch, timeout):
        probe = take(model, checked, replica=replica)
    message = json.dumps({"format": FORMAT, "shard": shard, "probe": probe.to_dict()}, allow_nan=False).encode()
    rank, ranks, messages = gather(message, timeout=timeout, group=group, store=store)
    probes: dict[int, Probe | None] = {}
    peers = []
    for r in ranks:
        peer_shard, peer = _read(messages.get(r), r)
        if peer is None or peer_shard == shard:  # a silent rank may hold anything: reported with every shard
            peers.append(r)
            probes[r] = peer
    report = judge(peers, probes, threshold=threshold, rel_floor=rel_floor, rank=rank,
                   seconds=time.perf_counter() - start)  # fmt: skip
    if watch is not None:
        _publish(watch, report)
    return report


@contextlib.contextmanager
def _aside(watch: Any, timeout: float) -> Iterator[None]:
    if watch is None:
        yield
        return
    try:
        with watch.engine.exclusive(timeout):
            yield
    except TimeoutError as exc:
        raise ConfigError(f"compare_replicas: the model was never idle: {exc}; call it between requests") from None


def _read(message: bytes | None, rank: int) -> tuple[str | None, Probe | None]:
    """A peer's shard and probe (None, None: no message, or one this version cannot read)."""
    if message is None:
        return None, None
    try:
        doc = json.loads(message)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return None, None
        return doc.get("shard"), Probe.from_dict(doc.get("probe"), f"rank {rank}'s probe")
    except (ValueError, FormatError):
        return None, None


def replica_alert(finding: Finding) -> Alert:
    """The ``"replica"`` alert for a finding: the replica, what differs and the likely cause."""
    return Alert(
        rule="replica", module=finding.module or "", stat=finding.cause, value=float(finding.rank), expected=-1.0,
        call=-1, time=time.time(), cohort=None, trace_id=None,
        message=f"{finding.name} differs from its peers: {finding.cause}: {finding.what}",
    )  # fmt: skip


def _publish(watch: Any, report: FleetReport) -> None:
    mine = report.mine
    if mine is not None:
        watch.publish(replica_alert(mine), trip=True)
        return
    agreeing = [r for r in report.answered if report.finding(r) is None]
    if agreeing and report.rank == agreeing[0]:
        for finding in report.findings:
            watch.publish(replica_alert(finding))
