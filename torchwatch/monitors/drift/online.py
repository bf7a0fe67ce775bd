"""Drift detection in the hooks: device-side window sums, host-side windows and detector.

In a hook, :meth:`OnlineDrift.observe` reduces a module's output to one vector per sample,
projects it (mean, PCA basis, whitening, random features, residual energy — all device tensors)
and adds each sample's row to the running sums of *its* window in a ring of window rows, with
the window index computed on the device from a device-side sample counter. Nothing is read back
and no sample is kept, so this runs inside compiled graphs and CUDA-graph replays.

At a flush the ring is copied (on a side stream on CUDA); the worker thread turns every window
completed since the previous flush into:

* the three per-window statistics and their calibrated p-values (:mod:`.reference`,
  :mod:`.statistics`), whose joint p-value feeds a CUSUM: gross shifts, within a window or two
  (and the window still being filled is tested once, at a small p-value bound: a gross shift
  need not wait for its window to fill);
* per module, the window's standardised PCA mean, random-feature mean and mean absolute PCA
  coordinates (a change of spread, or a rotation inside the basis), each fed to a multivariate
  EWMA (:mod:`.mewma`): small persistent shifts, whose evidence adds up across windows.

One false-alarm budget over all of them: each of the ``2 + 3·modules`` tests gets the target
ARL times their number (false-alarm rates add). An alarm opens a *drift episode* for the module
it points at: one alert, ``DriftStatus.alarm`` true, until every detector of that module is back
at its no-drift level (then one "drift ended" alert). The charted score is the largest
detector statistic as a fraction of its threshold: it does not restart during drift.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..._table import mark_static
from ..._transfer import HostCopy, copy_to_host
from ...alerts import Alert
from ...errors import ConfigError
from ..base import Binding, Collect, Monitor
from . import mewma
from .reference import STATISTICS, Reference
from .sequential import Cusum
from .statistics import has_residual
from .status import DriftStatus

RING = 1024  # windows kept on the device between flushes


@dataclass
class _Module:
    name: str
    params: tuple[torch.Tensor, ...]  # mean, basis, scale, omega, phase, residual floor (float32)
    sums: torch.Tensor  # [RING, 2 + 2k + m] float64: n, residual, z..., phi..., z^2...
    count: torch.Tensor  # [1] int64: samples observed
    detectors: tuple[mewma.Mewma, ...]  # accumulating: PCA mean, random-feature mean, PCA spread
    done: int = 0  # windows evaluated
    p_value: float = math.nan
    alarm: bool = False  # in a drift episode


@dataclass
class DriftRead:
    """A flush's copy of the rings: per module, the window sums and the sample count (being
    copied to the host; waited for off the serving thread)."""

    copies: dict[str, HostCopy]


class OnlineDrift:
    """The online side of a :class:`~torchwatch.Reference` for one watch."""

    def __init__(self, ref: Reference, device: torch.device, arl: float | None) -> None:
        self.ref = ref
        self.device = device
        self.arl = float(arl or ref.arl)
        # one budget: the CUSUM, the partial-window test and 3 accumulating detectors per module,
        # each at that many times the target ARL (false-alarm rates add)
        share = self.arl * ref.detectors()
        self.cusum = Cusum(ref.threshold(share), ref.delta)
        self.partial_alpha = 1.0 / share  # a window not yet complete: at most one test per window
        self._partial_checked = -1
        self.smoothing = ref.smoothing
        self.windows = 0
        self.lost = 0  # windows not evaluated because more than RING completed between flushes
        self._lock = threading.Lock()  # eager observers from several threads
        self._side: Any = None
        self.modules: dict[str, _Module] = {}
        with torch.inference_mode(False), torch.no_grad():
            for name, m in ref.modules.items():
                params = tuple(
                    torch.as_tensor(a, dtype=torch.float32, device=device)
                    for a in (m.mean, m.basis, m.scale, m.omega, m.phase, m.resid_floor)
                )
                sums = torch.zeros(RING, 2 + 2 * m.components + m.features, dtype=torch.float64, device=device)
                count = torch.zeros(1, dtype=torch.int64, device=device)
                if device.type == "cuda":
                    mark_static(*params, sums, count)
                detectors = tuple(
                    mewma.Mewma(d, ref.smoothing, m.detector_threshold(j, share, ref.smoothing))
                    for j, d in enumerate(m.detector_dims)
                )
                self.modules[name] = _Module(name, params, sums, count, detectors)

    # ---- hot path ------------------------------------------------------------------------

    def observe(self, name: str, output: Any, *, locked: bool = True) -> None:
        """Add this output's samples to their windows (device ops only; traceable).

        ``locked``: take the monitor's lock (eager calls from several threads); graph mode
        (tracing, capture) passes False.
        """
        mod = self.modules[name]
        mean = mod.params[0]
        e = self.ref.reduce(output)
        if e.dim() != 2 or e.shape[1] != mean.shape[0]:
            raise ConfigError(
                f"drift for {name!r}: the reference was fit on {mean.shape[0]}-dimensional embeddings, but this "
                f"output reduces to shape {tuple(e.shape)}; fit the reference on this model (or pass its reduce=)"
            )
        if e.device != self.device:
            raise ConfigError(
                f"drift for {name!r} was set up on {self.device} but its output is on {e.device}; "
                "attach after moving the model to its device"
            )
        if locked:
            with self._lock:
                self._add(mod, e)
        else:
            self._add(mod, e)

    def _add(self, mod: _Module, e: torch.Tensor) -> None:
        mean, basis, scale, omega, phase, floor = mod.params
        with torch.no_grad():
            c = e.detach().to(torch.float32) - mean
            p = c @ basis
            z = p * scale
            phi = torch.cos(z @ omega + phase) * math.sqrt(2.0 / omega.shape[1])
            if has_residual(basis):
                r = torch.log(((c * c).sum(1) - (p * p).sum(1)).clamp(min=0) + floor)
            else:  # no space outside the basis: no novelty statistic (as at fit time)
                r = torch.zeros_like(phi[:, 0])
            rows = torch.cat((torch.ones_like(r)[:, None], r[:, None], z, phi, z.abs()), dim=1).to(torch.float64)
            position = mod.count + torch.arange(rows.shape[0], device=self.device)
            index = torch.div(position, self.ref.window, rounding_mode="floor") % RING
            mod.sums.index_add_(0, index, rows)
            mod.count += rows.shape[0]

    # ---- flush ---------------------------------------------------------------------------

    def start_read(self) -> DriftRead:
        """Start copying the rings and counters to the host (on a side stream on CUDA)."""
        if self.device.type != "cuda":
            with self._lock:  # no observer between the count and the sums
                return DriftRead({n: copy_to_host([m.sums, m.count]) for n, m in self.modules.items()})
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_event(ready)
        return DriftRead({n: copy_to_host([m.sums, m.count], stream=self._side) for n, m in self.modules.items()})

    def process(self, read: DriftRead, step: int) -> tuple[dict[str, DriftStatus], list[Alert]]:
        """Evaluate every window completed in ``read`` (worker thread); returns statuses and alarms."""
        host = {n: copy.wait() for n, copy in read.copies.items()}
        rows = {n: sums.numpy() for n, (sums, _) in host.items()}
        counts = {n: int(count) for n, (_, count) in host.items()}
        complete = min(counts[n] // self.ref.window for n in self.modules)
        done = min(m.done for m in self.modules.values())
        start = max(done, complete - RING)
        self.lost += start - done  # overwritten in the ring before a flush read them
        alerts: list[Alert] = []
        for w in range(start, complete):
            window = {n: rows[n][w % RING] for n in self.modules}
            if any(row[0] != self.ref.window for row in window.values()):
                self.lost += 1  # a later window landed on the same row before this one was read
                continue
            alerts += self._evaluate(w, window, step)
        for m in self.modules.values():
            m.done = max(m.done, complete)
        self._clear_rows(start, complete)
        alerts += self._partial(complete, {n: rows[n][complete % RING] for n in self.modules}, step)
        return self.statuses(), alerts

    def _partial(self, w: int, rows: dict[str, np.ndarray], step: int) -> list[Alert]:
        """A gross shift need not wait for its window to fill: the window being filled, once it
        holds a quarter of its samples (at least 4), is tested once, at a p-value bound of one
        false alarm per ``partial_alpha⁻¹`` windows (its share of the budget). Its statistics
        are compared with the full-window null; a gross shift is beyond either."""
        n = min(float(row[0]) for row in rows.values())
        if w <= self._partial_checked or n < max(4.0, self.ref.window / 4) or n >= self.ref.window:
            return []
        self._partial_checked = w
        stats, per_stat, module_p, joint = self._score_window(rows)
        name = min(module_p, key=module_p.get)
        mod = self.modules[name]
        if joint > self.partial_alpha or mod.alarm:
            return []
        mod.alarm = True
        alert = self._opened(name, w, rows[name], stats[name], per_stat[name], [], step)
        note = f" (after {int(n)} of its {self.ref.window} samples)"
        return [dataclasses.replace(alert, message=alert.message + note)]

    def _score_window(self, rows: dict[str, np.ndarray]) -> tuple[dict, dict, dict[str, float], float]:
        """Per module a window's three statistics, their p-values and the module p-value; and
        the joint p-value over modules."""
        stats, per_stat, module_p = {}, {}, {}
        for name, row in rows.items():
            ref = self.ref.modules[name]
            s = ref.window_statistics(row[None, 0], row[None, 1:])
            stats[name] = s[0]
            per_stat[name] = ref.p_values(s)[0]
            module_p[name] = float(ref.module_p(s)[0])
        return stats, per_stat, module_p, float(self.ref.joint_p(np.array([list(module_p.values())]))[0])

    def _evaluate(self, w: int, rows: dict[str, np.ndarray], step: int) -> list[Alert]:
        stats, per_stat, module_p, joint = self._score_window(rows)
        accumulated = {}
        for name, row in rows.items():
            mod = self.modules[name]
            mod.p_value = module_p[name]
            means = self.ref.modules[name].standardised_means(row[0], row[1:], self.smoothing)
            accumulated[name] = [det.update(v) for det, v in zip(mod.detectors, means, strict=True)]
        self.windows += 1
        gross = self.cusum.update(joint)
        first = min(module_p, key=module_p.get)
        alerts = []
        for name, mod in self.modules.items():
            crossed = [j for j, det in enumerate(mod.detectors) if accumulated[name][j] >= det.threshold]
            if not mod.alarm and (crossed or (gross and name == first)):
                mod.alarm = True
                # the per-window statistics name what changed more precisely: they speak first
                crossed = [] if gross and name == first else crossed
                alerts.append(self._opened(name, w, rows[name], stats[name], per_stat[name], crossed, step))
            elif mod.alarm and self._calm(mod):
                mod.alarm = False
                alerts.append(
                    Alert(
                        rule="drift_ended", module=name, stat="score", value=self._score(mod), expected=1.0,
                        call=step, time=time.time(), cohort=None, trace_id=None,
                        message=f"drift in {name!r} ended in window {w}: every detector is back at its no-drift level",
                    )
                )  # fmt: skip
        return alerts

    def _opened(self, name: str, w: int, row: np.ndarray, stats: np.ndarray, per_stat: np.ndarray,
                crossed: list[int], step: int) -> Alert:  # fmt: skip
        """The alert that opens a drift episode in ``name``."""
        ref = self.ref.modules[name]
        n = max(row[0], 1.0)
        moved = row[1 : 1 + ref.components] / n * math.sqrt(n)  # standard normal per direction
        top = np.argsort(-np.abs(moved))[:3]
        directions = "PCA directions that moved most: " + ", ".join(f"#{i} ({moved[i]:+.1f} sd)" for i in top)
        if crossed:
            j = crossed[0]
            det = self.modules[name].detectors[j]
            stat = ("mean_shift", "mmd", "spread")[j]
            what = ("whitened PCA mean", "random-feature mean", "spread along the PCA directions")[j]
            message = (
                f"drift in {name!r}: the {what} has been away from the reference's over recent windows "
                f"(accumulated statistic {det.value:.3g} >= {det.threshold:.3g}, no-drift mean {det.state.size}) "
                f"by window {w}; {directions}"
            )
            value, expected = det.value, float(det.state.size)
        else:
            j = int(np.argmin(per_stat))
            nulls = (ref.null_mean_shift, ref.null_mmd, ref.null_novelty)
            stat, value, expected = STATISTICS[j], float(stats[j]), float(np.median(nulls[j]))
            message = (
                f"drift in {name!r}: {stat} = {value:.3g} (reference median {expected:.3g}, p = {per_stat[j]:.2g}) in "
                f"window {w}; {directions}"
            )
        return Alert(
            rule="drift", module=name, stat=stat, value=value, expected=expected, call=step, time=time.time(),
            cohort=None, trace_id=None, message=message,
        )  # fmt: skip

    def _calm(self, mod: _Module) -> bool:
        """Every detector of the module back at its no-drift level: the accumulated statistics
        at or below their mean under no drift (their dimension), the CUSUM at zero."""
        return self.cusum.value == 0.0 and all(det.value <= det.state.size for det in mod.detectors)

    def _score(self, mod: _Module) -> float:
        return max([self.cusum.value / self.cusum.threshold] + [det.value / det.threshold for det in mod.detectors])

    def _clear_rows(self, start: int, stop: int) -> None:
        """Zero the evaluated windows' rows so the ring can reuse them (ordered after the copy)."""
        if stop <= start:
            return
        rows = torch.arange(start, stop) % RING
        with torch.no_grad(), torch.inference_mode(False):
            for m in self.modules.values():
                if self._side is not None:
                    with torch.cuda.stream(self._side):
                        m.sums.index_fill_(0, rows.to(self.device, non_blocking=True), 0.0)
                else:
                    with self._lock:
                        m.sums.index_fill_(0, rows, 0.0)

    def statuses(self) -> dict[str, DriftStatus]:
        return {
            name: DriftStatus(self._score(m), m.p_value, m.alarm, self.windows, 1.0) for name, m in self.modules.items()
        }

    def reset(self) -> None:
        """Restart the detector, and drop the window being filled (waits for the device): after a
        reset no window mixes samples from before it with samples after it."""
        self.cusum.value = 0.0
        self.windows = 0
        window = self.ref.window
        with torch.no_grad(), torch.inference_mode(False), self._lock:
            if self._side is not None:
                self._side.synchronize()  # row clears still queued
            for m in self.modules.values():
                m.alarm = False
                m.p_value = math.nan
                for det in m.detectors:
                    det.reset()
                count = int(m.count)
                start = count - count % window
                if count != start:
                    m.sums[(start // window) % RING].zero_()
                    m.count.fill_(start)


DRIFT_WINDOWS_LOST = "drift windows lost"  # completed faster than flushes read the device ring


class Drift(Monitor):
    """Embedding drift of a reference's modules (``attach(drift=...)``), on every call whatever
    ``every`` is (windows count samples). Value: ``{module: DriftStatus}``; alarms are
    ``"drift"`` alerts (one warning per module)."""

    name = "drift"
    cohort_snapshot = True

    def __init__(self, reference: Reference, modules: list[tuple[str, Any]], device: torch.device,
                 arl: float | None) -> None:  # fmt: skip
        self.online = OnlineDrift(reference, device, arl)
        self._modules = modules
        self._fresh = False  # samples observed since the last flush read (eager calls)
        self._traced = False  # observed in a graph: replays add samples Python does not see

    def bind(self, binding: Binding) -> None:
        self._bus = binding.bus
        for name, module in self._modules:
            binding.module_hook(module, self._hook(name, binding.graph_mode, binding.local), sampled=False)
        del self._modules

    def _hook(self, fqn: str, graph_mode: Any, local: Any) -> Any:
        online, bus = self.online, self._bus

        def torchwatch_drift_hook(module: Any, args: Any, output: Any) -> None:
            if getattr(local, "aside", False):  # a check run aside (Engine.exclusive), not traffic
                return
            if graph_mode():
                self._traced = True
                online.observe(fqn, output, locked=False)
                return
            try:
                online.observe(fqn, output)
                self._fresh = True
            except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                bus.hook_failed(fqn, exc)

        return torchwatch_drift_hook

    def take(self, *, keep: bool) -> DriftRead | None:
        if not (keep or self._fresh or self._traced):
            return None
        self._fresh = False
        return self.online.start_read()

    def collect(self, taken: DriftRead | None, ctx: Collect) -> dict[str, DriftStatus]:
        """Evaluate the windows completed so far; alarms go out with the record (or, from a
        snapshot, with the next one)."""
        if taken is None:
            return self.online.statuses()
        statuses, alerts = self.online.process(taken, ctx.step)
        for alert in alerts:
            ctx.alert(alert)
        if self.online.lost:
            self._bus.warn_once(
                "drift-lost",
                f"{self.online.lost} drift windows completed faster than flushes read them and were skipped "
                f"(the device ring holds {RING}); flush more often (attach(flush_every=...)) or use a larger window",
            )
        return statuses

    def merge(self, earlier: dict[str, DriftStatus], later: dict[str, DriftStatus]) -> dict[str, DriftStatus]:
        return {**earlier, **later}

    def lost(self) -> dict[str, int]:
        return {DRIFT_WINDOWS_LOST: self.online.lost}

    def reset(self) -> None:
        self.online.reset()
