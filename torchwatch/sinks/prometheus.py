"""Prometheus metrics: where production monitoring already lives."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, ClassVar

from .. import _validate, values
from .._dist import install_hint
from ..errors import ConfigError
from ..records import Record, monitor_values
from .base import ROOT_LABEL, Sink

OTHER = "__other__"
BOUNDED_LABELS = ("module", "input")  # label values that grow with the model: bounded by max_modules
MAX_SERIES = 4096  # label sets per exported metric family (and model)


class PrometheusSink(Sink):
    """Exposes each flush as Prometheus metrics (needs ``pip install 'torchwatch-monitor[prometheus]'``).

    Metrics (labels ``model`` and ``module``; ``module`` values are bounded by ``max_modules``,
    later ones are counted under ``"__other__"``):

    * ``torchwatch_calls_total``, ``torchwatch_sampled_calls_total`` — root calls, measured calls;
    * ``torchwatch_elements_total`` — elements measured per module;
    * ``torchwatch_nonfinite_total{kind="nan"|"posinf"|"neginf"}``;
    * ``torchwatch_zeros_total``;
    * ``torchwatch_cast_overflow_total{dtype}``, ``torchwatch_cast_underflow_total{dtype}``;
    * ``torchwatch_absmax``, ``torchwatch_std`` — gauges, the latest interval;
    * ``torchwatch_drift_score``, ``torchwatch_drift_p_value`` — gauges per drift-monitored module;
    * ``torchwatch_alerts_total{rule}``;
    * ``torchwatch_latency_seconds{quantile="0.5"|"0.95"|"0.99"}`` — gauges, the latest interval's
      root-call latency quantiles (1% relative accuracy);
    * with ``attach(outputs=...)``: ``torchwatch_output_quality{stat="confidence"|"margin"|
      "normalized_entropy"|"abstention_rate"}`` (gauges, latest interval), ``torchwatch_predictions_total``,
      ``torchwatch_labelled_total``, ``torchwatch_labelled_correct_total`` (accuracy over any window in PromQL);
    * ``torchwatch_input_top1_fraction{input}`` — an integer input's most frequent value's share;
    * ``torchwatch_baseline_series{state="all"|"learning"}`` — the alert rules' baseline series and
      how many are still in warm-up (no baseline alert can come from those yet);
    * ``torchwatch_errors_total{kind}`` — failures caught and anything not recorded, by the kinds
      of ``watch.errors``; ``torchwatch_flushes_merged_total`` — automatic flushes merged into
      later records because the writer was behind (nothing lost);
    * ``torchwatch_last_flush_timestamp_seconds``;
    * ``torchwatch_replica_info{replica, host, pid, rank, local_rank, world_size, device, device_name,
      device_uuid, cpu, torch, cuda, cudnn}`` — who this replica is (value 1; the labels are the
      information, one label set per process: join on ``instance`` to name the replica of any series);
      with ``watch.verify_canary_every``: ``torchwatch_canary_info{replica, output, digest, weights}``,
      ``torchwatch_canary_checks_total{result}`` (docs/fleet.md). An info family keeps only the label
      sets of its latest value;
    * whatever a monitor's value exports (:mod:`torchwatch.values`): the drift, latency, output and
      input series above come that way, ``torchwatch_abs_histogram_total{module, le}`` from
      ``tw.monitors.Histograms()``, and ``torchwatch_extra{monitor, key}`` gauges for the numbers of a
      monitor that exports nothing of its own. Each such family keeps at most ``MAX_SERIES`` label
      sets per model; samples beyond are dropped and counted in ``torchwatch_series_dropped_total{metric}``.

    Several sinks may share a registry (one per watched model, each with its own
    ``model_name``); :meth:`close` (on detach) removes the model's series, and the last sink of
    a registry unregisters the metrics, so a sink can be created again after a model reload.

    Ratios are for PromQL, e.g. NaN per element over five minutes:
    ``rate(torchwatch_nonfinite_total{kind="nan"}[5m]) / rate(torchwatch_elements_total[5m])``.

    Args:
        port: serve ``/metrics`` on this port (0 to 65535) from a background thread (``0``: any free port, see
            :attr:`port`). None: do not serve; the metrics go to ``registry``.
        addr: the address to serve on (default loopback; ``"0.0.0.0"`` to expose it).
        registry: a ``prometheus_client.CollectorRegistry`` to register into (your application's);
            default: a private one when ``port`` is given, else prometheus_client's global registry.
        model_name: value of the ``model`` label (several watched models in one process; one
            live sink per name and registry).
        max_modules: distinct ``module`` label values.

    Raises:
        ConfigError: a bad argument, or another live sink already uses ``model_name`` in this
            registry.

    Multiprocess servers (gunicorn and the like): set ``PROMETHEUS_MULTIPROC_DIR`` before the
    workers start, give each worker a ``PrometheusSink()`` without ``port``, and serve the
    aggregate from one process with :func:`serve_multiprocess`; counters are summed across
    workers, gauges are kept per worker (``pid`` label).

    A port that is taken disables the sink (reported once, like any failing sink); inference goes on.

    Example:
        >>> import urllib.request, torch, torchwatch as tw
        >>> sink = tw.PrometheusSink(port=0, model_name="doc")
        >>> model = torch.nn.Linear(4, 2)
        >>> with tw.attach(model, sinks=[sink]) as watch:
        ...     _ = model(torch.randn(3, 4))
        ...     watch.flush()
        ...     body = urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics").read().decode()
        >>> 'torchwatch_elements_total{model="doc",module="<root>"} 6.0' in body
        True
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        addr: str = "127.0.0.1",
        registry: Any = None,
        model_name: str = "model",
        max_modules: int = 256,
    ) -> None:
        _validate.optional(_validate.integer, "PrometheusSink", "port", port, low=0, high=65535)
        if not isinstance(addr, str) or not addr:
            raise ConfigError(f"PrometheusSink: addr must be a host address string, got {addr!r}")
        if not isinstance(model_name, str) or not model_name:
            raise ConfigError(f"PrometheusSink: model_name must be a non-empty string, got {model_name!r}")
        _validate.integer("PrometheusSink", "max_modules", max_modules)
        if registry is not None and not (
            callable(getattr(registry, "register", None)) and hasattr(registry, "collect")
        ):
            raise ConfigError(
                f"PrometheusSink: registry must be a prometheus_client CollectorRegistry, got {registry!r}"
            )
        try:
            import prometheus_client as pc
        except ImportError:
            raise ImportError(f"PrometheusSink needs prometheus-client: {install_hint('prometheus')}") from None
        self.model_name, self.max_modules = model_name, max_modules
        self.port: int | None = None
        self._error: Exception | None = None
        self._server: Any = None
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if registry is None:
            registry = pc.CollectorRegistry() if port is not None and not multiprocess else pc.REGISTRY
        if multiprocess and port is None:
            registry = None  # values go to the multiprocess directory; serve_multiprocess() reads them
        self.registry = registry
        self._families = _Families.acquire(pc, registry, model_name, multiprocess)
        self._series: set[tuple[Any, tuple[str, ...]]] = set()  # (metric, labels) this sink wrote, removed on close
        self._errors_seen: dict[str, int] = {}
        self._modules: set[str] = set()
        self._per_family: dict[str, set[tuple[str, ...]]] = {}  # label sets written per exported family
        self._info: dict[str, set[tuple[str, ...]]] = {}  # per *_info family: the label sets of the last write
        self._closed = False
        if port is not None:
            try:
                self._server, _ = pc.start_http_server(port, addr=addr, registry=registry)
                self.port = self._server.server_address[1]
            except OSError as exc:  # reported at the first write, which disables the sink
                self._error = OSError(f"cannot serve Prometheus metrics on {addr}:{port}: {exc.strerror or exc}")

    def _labels(self, metric: Any, *labels: str) -> Any:
        values = (self.model_name, *labels)
        self._series.add((metric, values))
        return metric.labels(*values)

    def _module(self, name: str) -> str:
        label = name or ROOT_LABEL
        if label in self._modules:
            return label
        if len(self._modules) < self.max_modules:
            self._modules.add(label)
            return label
        return OTHER

    def _sample(self, series: values.Series, info: dict[str, set[tuple[str, ...]]] | None = None) -> None:
        """One exported sample: its family made on first use; ``module`` and ``input`` label values
        bounded by ``max_modules``, and at most ``MAX_SERIES`` label sets per family (beyond them
        the sample is dropped and counted in ``torchwatch_series_dropped_total{metric}``)."""
        metric = self._families.family(series)
        if metric is None:  # the name is taken with other labels or another type
            self._labels(self._families.dropped, series.name).inc()
            return
        labels = tuple(self._module(v) if k in BOUNDED_LABELS else v for k, v in series.labels)
        seen = self._per_family.setdefault(series.name, set())
        if labels not in seen:
            if len(seen) >= MAX_SERIES:
                self._labels(self._families.dropped, series.name).inc()
                return
            seen.add(labels)
        sample = self._labels(metric, *labels)
        if series.name.endswith("_info") and info is not None:
            info.setdefault(series.name, set()).add(labels)
        if series.kind == "counter":
            sample.inc(series.value)
        else:
            sample.set(series.value)

    def write(self, record: Record) -> None:
        if self._error is not None:
            raise self._error
        f, lab = self._families, self._labels
        lab(f.calls).inc(record.calls)
        lab(f.sampled).inc(record.sampled)
        if record.merged:
            lab(f.merged).inc(record.merged)
        for name, s in record.stats.items():
            module = self._module(name)
            lab(f.elements, module).inc(s.count)
            for kind, n in (("nan", s.nan), ("posinf", s.posinf), ("neginf", s.neginf)):
                if n:
                    lab(f.nonfinite, module, kind).inc(n)
            lab(f.zeros, module).inc(s.zeros)
            for dtype, n in s.overflow.items():
                lab(f.overflow, module, dtype).inc(n)
            for dtype, n in s.underflow.items():
                lab(f.underflow, module, dtype).inc(n)
            if s.absmax == s.absmax:  # not NaN
                lab(f.absmax, module).set(s.absmax)
            if s.std == s.std:
                lab(f.std, module).set(s.std)
        for alert in record.alerts:
            lab(f.alerts, alert.rule).inc()
        for kind, total in record.errors.items():  # cumulative in each record: count what is new
            new = total - self._errors_seen.get(kind, 0)
            if new > 0:
                lab(f.errors, str(kind)).inc(new)
                self._errors_seen[kind] = total
        info: dict[str, set[tuple[str, ...]]] = {}
        for name, value in monitor_values(record).items():  # what each monitor's value exports
            for item in values.exports(name, value, record):
                if isinstance(item, values.Series):
                    self._sample(item, info)
        self._replace_info(info)
        if record.baselines is not None:
            lab(f.baselines, "all").set(record.baselines.series)
            lab(f.baselines, "learning").set(record.baselines.learning)
        lab(f.last_flush).set(record.time)

    def _replace_info(self, written: dict[str, set[tuple[str, ...]]]) -> None:
        """An info family shows what is true now (a replica's rank, a canary's output digest): the
        label sets it had before and were not written again this time are removed."""
        for name, now in written.items():
            metric = self._families.family_named(name)
            for labels in self._info.get(name, set()) - now:
                with contextlib.suppress(KeyError):
                    metric.remove(self.model_name, *labels)
                self._series.discard((metric, (self.model_name, *labels)))
                self._per_family.get(name, set()).discard(labels)
            self._info[name] = now

    def close(self) -> None:
        """Stop serving, remove this model's series and release the metric families (the last
        sink of a registry unregisters them, so a new sink can be created after a reload)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._closed:
            return
        self._closed = True
        for metric, labels in self._series:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
        self._series.clear()
        self._families.release(self.model_name)

    def __repr__(self) -> str:
        where = f"port={self.port}" if self.port is not None else "registry"
        return f"PrometheusSink({self.model_name!r}, {where})"


class _Families:
    """The metric families of one registry, shared by every PrometheusSink writing to it.

    prometheus_client refuses a second metric of the same name in a registry, so sinks for
    several models (different ``model`` labels) share one set; the last one released
    unregisters them. One live sink per ``model_name`` and registry: two would add their counts
    into the same series.
    """

    _by_registry: ClassVar[dict[int, _Families]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, pc: Any, registry: Any, multiprocess: bool) -> None:
        self.registry = registry
        self.models: set[str] = set()
        gauge_kw = {"multiprocess_mode": "liveall"} if multiprocess else {}
        self.collectors: list[Any] = []
        self._pc, self._gauge_kw = pc, gauge_kw
        self._exported: dict[str, tuple[str, tuple[str, ...], Any]] = {}  # name -> (kind, labels, metric or None)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            metric = pc.Counter(name, doc, ("model", *labels), registry=registry)
            self.collectors.append(metric)
            return metric

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            metric = pc.Gauge(name, doc, ("model", *labels), registry=registry, **gauge_kw)
            self.collectors.append(metric)
            return metric

        m = ("module",)
        self.calls = counter("torchwatch_calls", "Root calls of the watched model.")
        self.sampled = counter("torchwatch_sampled_calls", "Root calls that were measured.")
        self.merged = counter("torchwatch_flushes_merged", "Automatic flushes merged into later records.")
        self.elements = counter("torchwatch_elements", "Elements measured.", m)
        self.nonfinite = counter("torchwatch_nonfinite", "NaN/+Inf/-Inf elements.", ("module", "kind"))
        self.zeros = counter("torchwatch_zeros", "Elements equal to zero.", m)
        self.overflow = counter("torchwatch_cast_overflow", "Elements a cast would overflow.", ("module", "dtype"))
        self.underflow = counter(
            "torchwatch_cast_underflow", "Nonzero elements a cast would make 0.", ("module", "dtype")
        )
        self.absmax = gauge("torchwatch_absmax", "Largest finite |x| in the latest interval.", m)
        self.std = gauge("torchwatch_std", "Standard deviation of finite elements, latest interval.", m)
        self.alerts = counter("torchwatch_alerts", "Alerts raised.", ("rule",))
        self.errors = counter("torchwatch_errors", "Failures caught, data not recorded (watch.errors).", ("kind",))
        self.last_flush = gauge("torchwatch_last_flush_timestamp_seconds", "Unix time of the latest flush.")
        self.dropped = counter("torchwatch_series_dropped", "Exported samples dropped (label sets beyond the bound).",
                               ("metric",))  # fmt: skip
        self.baselines = gauge("torchwatch_baseline_series", "Alert baseline series, all and in warm-up.", ("state",))

    def family(self, series: values.Series) -> Any:
        """The metric family of an exported series, registered on first use; None when its name
        is already used with another kind or other label names (that series is not exported)."""
        names = tuple(k for k, _ in series.labels)
        with self._lock:
            known = self._exported.get(series.name)
            if known is None:
                make = self._pc.Counter if series.kind == "counter" else self._pc.Gauge
                kw = self._gauge_kw if series.kind == "gauge" else {}
                try:
                    metric = make(series.name, series.help, ("model", *names), registry=self.registry, **kw)
                    self.collectors.append(metric)
                except ValueError:  # taken in the registry by a metric that is not this one
                    metric = None
                known = self._exported[series.name] = (series.kind, names, metric)
        kind, label_names, metric = known
        return metric if (kind, label_names) == (series.kind, names) else None

    def family_named(self, name: str) -> Any:
        """The exported family registered under ``name`` (None if it could not be)."""
        with self._lock:
            return self._exported[name][2]

    @classmethod
    def acquire(cls, pc: Any, registry: Any, model: str, multiprocess: bool) -> _Families:
        with cls._lock:
            families = cls._by_registry.get(id(registry))
            if families is None or families.registry is not registry:
                try:
                    families = cls(pc, registry, multiprocess)
                except ValueError as exc:  # names taken by metrics that are not torchwatch's
                    raise ConfigError(
                        f"PrometheusSink cannot register its metrics: {exc}; pass registry= a registry of its own"
                    ) from None
                cls._by_registry[id(registry)] = families
            if model in families.models:
                raise ConfigError(
                    f"a PrometheusSink with model_name={model!r} is already writing to this registry; give each "
                    "watched model its own model_name, or detach the old watch (closing its sink) first"
                )
            families.models.add(model)
            return families

    def release(self, model: str) -> None:
        with self._lock:
            self.models.discard(model)
            if self.models or self._by_registry.get(id(self.registry)) is not self:
                return
            del self._by_registry[id(self.registry)]
            if self.registry is not None:
                for metric in self.collectors:
                    with contextlib.suppress(KeyError):
                        self.registry.unregister(metric)


def serve_multiprocess(port: int, addr: str = "127.0.0.1") -> Any:
    """Serve the metrics of every process writing to ``PROMETHEUS_MULTIPROC_DIR`` (one exporter).

    Returns the HTTP server (``server.server_address[1]`` is the port; ``shutdown()`` stops it).
    """
    import prometheus_client as pc
    from prometheus_client import multiprocess

    registry = pc.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    server, _ = pc.start_http_server(port, addr=addr, registry=registry)
    return server
