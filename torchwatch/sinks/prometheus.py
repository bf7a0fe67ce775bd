"""Prometheus metrics: where production monitoring already lives."""

from __future__ import annotations

import os
from typing import Any

from .base import ROOT_LABEL, Record, Sink

OTHER = "__other__"


class PrometheusSink(Sink):
    """Exposes each flush as Prometheus metrics (needs ``pip install 'torchwatch[prometheus]'``).

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
    * ``torchwatch_last_flush_timestamp_seconds``.

    Ratios are for PromQL, e.g. NaN per element over five minutes:
    ``rate(torchwatch_nonfinite_total{kind="nan"}[5m]) / rate(torchwatch_elements_total[5m])``.

    Args:
        port: serve ``/metrics`` on this port from a background thread (``0``: any free port, see
            :attr:`port`). None: do not serve; the metrics go to ``registry``.
        addr: the address to serve on (default loopback; ``"0.0.0.0"`` to expose it).
        registry: a ``prometheus_client.CollectorRegistry`` to register into (your application's);
            default: a private one when ``port`` is given, else prometheus_client's global registry.
        model_name: value of the ``model`` label (several watched models in one process).
        max_modules: distinct ``module`` label values.

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
        try:
            import prometheus_client as pc
        except ImportError:
            raise ImportError("PrometheusSink needs prometheus-client: pip install 'torchwatch[prometheus]'") from None
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
        gauge = {"multiprocess_mode": "liveall"} if multiprocess else {}

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return pc.Counter(name, doc, ("model", *labels), registry=registry)

        def g(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return pc.Gauge(name, doc, ("model", *labels), registry=registry, **gauge)

        m = ("module",)
        self.calls = counter("torchwatch_calls", "Root calls of the watched model.")
        self.sampled = counter("torchwatch_sampled_calls", "Root calls that were measured.")
        self.elements = counter("torchwatch_elements", "Elements measured.", m)
        self.nonfinite = counter("torchwatch_nonfinite", "NaN/+Inf/-Inf elements.", ("module", "kind"))
        self.zeros = counter("torchwatch_zeros", "Elements equal to zero.", m)
        self.overflow = counter("torchwatch_cast_overflow", "Elements a cast would overflow.", ("module", "dtype"))
        self.underflow = counter(
            "torchwatch_cast_underflow", "Nonzero elements a cast would make 0.", ("module", "dtype")
        )
        self.absmax = g("torchwatch_absmax", "Largest finite |x| in the latest interval.", m)
        self.std = g("torchwatch_std", "Standard deviation of finite elements, latest interval.", m)
        self.drift_score = g("torchwatch_drift_score", "Drift score of the latest window.", m)
        self.drift_p = g("torchwatch_drift_p_value", "Drift p-value of the latest window.", m)
        self.alerts = counter("torchwatch_alerts", "Alerts raised.", ("rule",))
        self.last_flush = g("torchwatch_last_flush_timestamp_seconds", "Unix time of the latest flush.")
        self.latency = g("torchwatch_latency_seconds", "Root-call latency quantiles, latest interval.", ("quantile",))
        self.output = g("torchwatch_output_quality", "Output quality of the latest interval.", ("stat",))
        self.predictions = counter("torchwatch_predictions", "Prediction rows measured.")
        self.labelled = counter("torchwatch_labelled", "Prediction rows with labels fed back.")
        self.correct = counter("torchwatch_labelled_correct", "Labelled rows predicted right.")
        self.top1 = g("torchwatch_input_top1_fraction", "Share of an integer input's most frequent value.", ("input",))
        self._modules: set[str] = set()
        if port is not None:
            try:
                self._server, _ = pc.start_http_server(port, addr=addr, registry=registry)
                self.port = self._server.server_address[1]
            except OSError as exc:  # reported at the first write, which disables the sink
                self._error = OSError(f"cannot serve Prometheus metrics on {addr}:{port}: {exc.strerror or exc}")

    def _module(self, name: str) -> str:
        label = name or ROOT_LABEL
        if label in self._modules:
            return label
        if len(self._modules) < self.max_modules:
            self._modules.add(label)
            return label
        return OTHER

    def write(self, record: Record) -> None:
        if self._error is not None:
            raise self._error
        model = self.model_name
        self.calls.labels(model).inc(record.calls)
        self.sampled.labels(model).inc(record.sampled)
        for name, s in record.stats.items():
            module = self._module(name)
            self.elements.labels(model, module).inc(s.count)
            for kind, n in (("nan", s.nan), ("posinf", s.posinf), ("neginf", s.neginf)):
                if n:
                    self.nonfinite.labels(model, module, kind).inc(n)
            self.zeros.labels(model, module).inc(s.zeros)
            for dtype, n in s.overflow.items():
                self.overflow.labels(model, module, dtype).inc(n)
            for dtype, n in s.underflow.items():
                self.underflow.labels(model, module, dtype).inc(n)
            if s.absmax == s.absmax:  # not NaN
                self.absmax.labels(model, module).set(s.absmax)
            if s.std == s.std:
                self.std.labels(model, module).set(s.std)
        for name, status in record.drift.items():
            module = self._module(name)
            self.drift_score.labels(model, module).set(status.score)
            self.drift_p.labels(model, module).set(status.p_value)
        for alert in record.alerts:
            self.alerts.labels(model, alert.rule).inc()
        lat = record.latency
        if lat is not None and lat.count:
            for q, value in (("0.5", lat.p50_ms), ("0.95", lat.p95_ms), ("0.99", lat.p99_ms)):
                self.latency.labels(model, q).set(value / 1e3)
        q = record.outputs
        if q is not None:
            self.predictions.labels(model).inc(q.rows)
            for stat in ("confidence", "margin", "normalized_entropy", "abstention_rate") if q.rows else ():
                self.output.labels(model, stat).set(getattr(q, stat))
            if q.labelled:
                self.labelled.labels(model).inc(q.labelled)
                self.correct.labels(model).inc(round(q.accuracy * q.labelled))
        for name, i in record.inputs.items():
            if i.ids is not None:
                self.top1.labels(model, self._module(name)).set(i.ids.top1_fraction)
        self.last_flush.labels(model).set(record.time)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __repr__(self) -> str:
        where = f"port={self.port}" if self.port is not None else "registry"
        return f"PrometheusSink({self.model_name!r}, {where})"


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
