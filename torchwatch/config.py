"""``attach()``'s options, validated once into a frozen :class:`WatchConfig`, and the monitors
they turn on (the one place the built-in monitors are registered)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from . import _testing, _validate
from . import rules as _rules
from ._casts import normalize_cast_dtypes
from ._select import select_modules
from ._tensors import model_device
from .alerts import Alert
from .capture.monitor import CaptureMonitor
from .capture.options import Capture
from .errors import ConfigError
from .monitors.activations import Activations
from .monitors.base import Monitor
from .monitors.drift import Drift, Reference
from .monitors.fingerprint import FingerprintMonitor
from .monitors.identity import IdentityMonitor
from .monitors.inputs import InputMonitor, Inputs
from .monitors.latency import Latency, Timing
from .monitors.outputs import OutputMonitor, Outputs
from .records import MONITOR_FIELDS
from .sinks.base import Sink
from .stats import DEFAULT_CAST_DTYPES

NONFINITE_POLICIES = ("ignore", "warn", "raise")
SAMPLING_MODES = ("python", "device")
# monitor names taken by the built-in monitors (attach(monitors=...) may not reuse them): the
# record's monitor fields, and the monitors without one
_RESERVED = frozenset({*MONITOR_FIELDS, Activations.name, FingerprintMonitor.name, CaptureMonitor.name, "canary"})


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """Everything :func:`torchwatch.attach` was asked for, checked (see its docstring)."""

    # names, not modules: a config (kept by the watch, its records' readers, a user) must not keep
    # the model's weights alive; :meth:`modules` finds them in the model
    selected: tuple[str, ...]
    every: int
    sampling: str
    sinks: tuple[Sink, ...]
    flush_every: int
    cast_dtypes: tuple[str, ...]
    on_nonfinite: str | Callable[[Alert], object]
    max_cohorts: int
    rules: tuple[Any, ...]
    alert_policy: _rules.AlertPolicy
    inputs: InputMonitor | None
    outputs: OutputMonitor | None
    timing: bool
    drift: Reference | None
    drift_modules: tuple[str, ...]
    drift_arl: float | None
    monitors: tuple[Monitor, ...]
    capture: Capture | None
    replica: str | None
    device_path: bool  # measure CPU tensors the way accelerator ones are (_testing.device_path(), in tests)

    @classmethod
    def of(
        cls, model: nn.Module, *, modules: Any = None, every: Any = 1, sampling: Any = "python", sinks: Any = (),
        flush_every: Any = 100, cast_dtypes: Any = DEFAULT_CAST_DTYPES, on_nonfinite: Any = "warn",
        max_cohorts: Any = 16, drift: Any = None, drift_arl: Any = None, rules: Any = None, alert_policy: Any = None,
        inputs: Any = True, outputs: Any = None, timing: Any = False, monitors: Any = (), capture: Any = None,
        replica: Any = None,
    ) -> WatchConfig:  # fmt: skip
        """Check every option (defaults: those of :func:`torchwatch.attach`); raises
        :class:`~torchwatch.ConfigError` naming the first bad one."""
        if not isinstance(model, nn.Module):
            raise ConfigError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        if sampling not in SAMPLING_MODES:
            raise ConfigError(f"sampling={sampling!r} is not valid: use 'python' (eager) or 'device' (graphs)")
        if not isinstance(timing, bool):
            raise ConfigError(f"timing must be True or False, got {timing!r}")
        cast = normalize_cast_dtypes(cast_dtypes)
        policy = alert_policy if alert_policy is not None else _rules.AlertPolicy()
        if not isinstance(policy, _rules.AlertPolicy):
            raise ConfigError(f"alert_policy must be a tw.rules.AlertPolicy, got {type(alert_policy).__name__}")
        reference, drift_modules = _drift(model, drift, drift_arl)
        if replica is not None and (not isinstance(replica, str) or not replica.strip()):
            raise ConfigError(f"attach(): replica must be a non-empty name (a string), got {replica!r}")
        return cls(
            selected=tuple(name for name, _ in select_modules(model, modules)),
            every=_validate.integer("attach()", "every", every),
            sampling=sampling,
            sinks=tuple(_sink_list(sinks)),
            flush_every=_validate.integer("attach()", "flush_every", flush_every),
            cast_dtypes=cast,
            on_nonfinite=_nonfinite_policy(on_nonfinite),
            max_cohorts=_validate.integer("attach()", "max_cohorts", max_cohorts),
            rules=tuple(_rules.normalize(rules, cast)),
            alert_policy=policy,
            inputs=_input_monitor(inputs),
            outputs=_output_monitor(outputs),
            timing=timing,
            drift=reference,
            drift_modules=tuple(drift_modules),
            drift_arl=drift_arl,
            monitors=_monitor_list(monitors),
            capture=_validate.instance("attach()", "capture", capture, Capture, "a tw.Capture", optional=True),
            replica=replica,
            device_path=_testing.DEVICE_PATH.get(),
        )

    def modules(self, model: nn.Module, names: tuple[str, ...] | None = None) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the selected modules (or of ``names``) in ``model``."""
        return [(name, model.get_submodule(name)) for name in (self.selected if names is None else names)]

    def build_monitors(self, model: nn.Module) -> list[Monitor]:
        """The monitors these options turn on: the activation statistics first (their graph
        replays advance the step the others collect at; the input monitor shares their
        ``measure``), then the others, then ``attach(monitors=...)``'s."""
        device = model_device(model)
        cuda = device.type == "cuda"
        path = "torch" if self.device_path else None  # CPU tensors through the device path's torch ops (tests)
        stats = Activations(model, modules=len(self.selected), cast_dtypes=self.cast_dtypes, every=self.every,
                            on_nonfinite=self.on_nonfinite, device_path=self.device_path)  # fmt: skip
        out: list[Monitor] = [stats, Latency(cuda=cuda), IdentityMonitor(device, self.replica)]
        if self.timing:
            out.append(Timing(cuda=cuda))
        if self.inputs is not None:
            out.append(Inputs(self.inputs, stats.measure, path=path))
        if self.outputs is not None:
            out.append(Outputs(self.outputs, path=path))
        if self.drift is not None:
            out.append(Drift(self.drift, self.modules(model, self.drift_modules), device, self.drift_arl))
        if self.capture is not None:
            out.append(CaptureMonitor(self.capture, rules=list(self.rules), cast_dtypes=self.cast_dtypes))
        return out + list(self.monitors)


def _drift(model: nn.Module, drift: Any, arl: Any) -> tuple[Reference | None, list[str]]:
    """The reference of ``attach(drift=..., drift_arl=...)`` and the modules it hooks."""
    if drift is None:
        if arl is not None:
            raise ConfigError("drift_arl needs drift=: pass a torchwatch.Reference to monitor")
        return None, []
    if not isinstance(drift, Reference):
        raise ConfigError(f"drift= takes a torchwatch.Reference (Reference.fit or .load), got {type(drift).__name__}")
    if arl is not None and (isinstance(arl, bool) or not isinstance(arl, (int, float)) or not arl > 1):
        raise ConfigError(f"drift_arl must be a number of windows > 1, got {arl!r}")
    names = dict(model.named_modules())
    missing = [n for n in drift.modules if n not in names]
    if missing:
        raise ConfigError(
            f"the drift reference monitors modules this model does not have: {missing}; "
            f"fit the reference on this model (its modules include {list(names)[1:6]})"
        )
    return drift, list(drift.modules)


def _input_monitor(inputs: Any) -> InputMonitor | None:
    if inputs is True:
        return InputMonitor()
    if inputs is False or inputs is None:
        return None
    if isinstance(inputs, InputMonitor):
        return inputs
    raise ConfigError(f"inputs= takes True, False or a tw.InputMonitor, got {inputs!r}")


def _output_monitor(outputs: Any) -> OutputMonitor | None:
    if outputs is None or outputs is False:
        return None
    if outputs is True:
        return OutputMonitor(select="auto")
    if isinstance(outputs, OutputMonitor):
        return outputs
    if isinstance(outputs, (str, int)) or callable(outputs):
        return OutputMonitor(select=outputs)
    raise ConfigError(
        f"outputs= takes 'auto' (or True: a tensor output, a 'logits' key/attribute, a tuple's first tensor), a "
        f"key, an index, a callable output -> logits or a tw.OutputMonitor, got {outputs!r}"
    )


def _nonfinite_policy(policy: object) -> str | Callable[[Alert], object]:
    if callable(policy) or policy in NONFINITE_POLICIES:
        return policy  # type: ignore[return-value]
    raise ConfigError(
        f"on_nonfinite={policy!r} is not valid: use one of {', '.join(map(repr, NONFINITE_POLICIES))} "
        "or a callable taking a torchwatch.Alert"
    )


def _sink_list(sinks: Iterable[Sink]) -> list[Sink]:
    if isinstance(sinks, Sink):
        raise ConfigError(f"sinks must be a list of sinks, got a single {sinks!r}; write sinks=[{sinks!r}]")
    try:
        items = list(sinks)
    except TypeError:
        raise ConfigError(f"sinks must be a list of sinks, got {sinks!r}") from None
    bad = [s for s in items if not callable(getattr(s, "write", None))]
    if bad:
        raise ConfigError(
            f"sinks: {bad[0]!r} is not a sink (it has no write(record) method); use tw.TensorBoardSink, "
            "tw.JsonlSink, tw.MemorySink or a subclass of tw.Sink"
        )
    return items


def _monitor_list(monitors: Iterable[Monitor]) -> tuple[Monitor, ...]:
    try:
        items = tuple(monitors)
    except TypeError:
        raise ConfigError(f"monitors must be a list of tw.monitors.Monitor, got {monitors!r}") from None
    for m in items:
        if not isinstance(m, Monitor):
            raise ConfigError(
                f"monitors: {m!r} is not a monitor; subclass torchwatch.monitors.Monitor (see its docstring)"
            )
        if not isinstance(m.name, str) or not m.name or m.name in _RESERVED:
            raise ConfigError(
                f"monitors: {type(m).__name__}.name must be a non-empty string other than the built-in names "
                f"{sorted(_RESERVED)}, got {m.name!r}"
            )
        if callable(getattr(m, "publish", None)):
            raise ConfigError(
                f"monitors: {type(m).__name__} defines publish(value), the name of an earlier Monitor protocol: "
                "rename it view(value); and let collect() return the window's value only (the watch now keeps "
                "the totals since the reset with merge())"
            )
    names = [m.name for m in items]
    if len(set(names)) != len(names):
        raise ConfigError(f"monitors: two monitors share a name ({names}); each needs its own")
    return items
