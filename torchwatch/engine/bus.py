"""The alert bus: the one way alerts, trips, warnings and counted failures leave a watch.

Every alert of a watch — NaN/Inf from the hooks or the device, drift alarms, fingerprint
changes, rule alerts, a shadow candidate's disagreement, a custom monitor's — goes through
:meth:`AlertBus.publish`: it is kept (``watch.alerts``), sent with the next record unless it is
already part of the record being made, warned about once per key, and, if it ``trip``\\ s, makes
the watch unhealthy. NaN/Inf alerts follow ``attach(on_nonfinite=...)``. Failures torchwatch
catches instead of breaking inference are counted here (``watch.errors``).
"""

from __future__ import annotations

import collections
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping

from ..alerts import Alert
from ..errors import TorchwatchWarning

MAX_ALERTS = 1000  # alerts kept in watch.alerts (oldest dropped first)


class AlertBus:
    """Alerts, trips, warn-once and error counts of one watch; safe from any thread.

    Args:
        on_nonfinite: ``"ignore" | "warn" | "raise"`` or a callable, for ``"nonfinite"`` alerts.
    """

    def __init__(self, on_nonfinite: str | Callable[[Alert], object]) -> None:
        self.on_nonfinite = on_nonfinite
        self._lock = threading.Lock()
        self._alerts: collections.deque[Alert] = collections.deque(maxlen=MAX_ALERTS)
        self._window: list[Alert] = []
        self._errors: collections.Counter[str] = collections.Counter()
        self._warned: set[str] = set()
        self.trips = 0  # tripping alerts so far; healthy while it equals trips_cleared
        self.trips_cleared = 0
        self.last_trip: Alert | None = None
        self._tripping: set[Alert] = set()  # tripping alerts not yet in a record: no policy holds them back
        self._listeners: tuple[Callable[[Alert, bool], None], ...] = ()

    def listen(self, listener: Callable[[Alert, bool], None]) -> None:
        """Call ``listener(alert, trip)`` for every alert published from now on (on the publishing
        thread, before it is kept or notified; ``"nonfinite"`` ones under ``on_nonfinite="ignore"``
        too). It must be quick and must not publish; its exceptions are counted, never raised."""
        self._listeners = (*self._listeners, listener)

    # ---- alerts ------------------------------------------------------------------------------

    def publish(self, alert: Alert, *, window: bool = True, trip: bool = False, warn: str = "module") -> bool:
        """Keep ``alert`` and act on it.

        Args:
            window: also send it with the next flush's record (False: it is part of the record
                being made).
            trip: it makes the watch unhealthy (:attr:`torchwatch.Watch.healthy`).
            warn: warn once per ``"module"`` (rule and module) or per ``"rule"``. ``"nonfinite"``
                alerts follow ``on_nonfinite`` instead (``"ignore"``: not kept, only tripped).

        Returns:
            Whether the alert was kept.
        """
        if trip:
            self.trip(alert)
        for listener in self._listeners:
            try:
                listener(alert, trip)
            except Exception as exc:  # noqa: BLE001 - a listener never stops an alert
                self.count("alert listener")
                self.warn_once("listener", f"an alert listener raised {exc!r}; counted in watch.errors")
        nonfinite = alert.rule == "nonfinite"
        if nonfinite and self.on_nonfinite == "ignore":
            return False
        with self._lock:
            self._alerts.append(alert)
            if window:
                self._window.append(alert)
        if not nonfinite:
            key = f"rule-alert:{alert.rule}" if warn == "rule" else f"{alert.rule}:{alert.module}"
            self.warn_once(key, f"{alert.message}; see watch.alerts (warned once per {warn})")
        elif self.on_nonfinite == "warn":
            self.warn_once(
                f"nonfinite:{alert.module}", f"{alert.message}; see watch.alerts (warned once per origin module)"
            )
        elif callable(self.on_nonfinite):
            try:
                self.on_nonfinite(alert)
            except Exception as exc:  # noqa: BLE001 - only "raise" may raise into serving code
                self.count("on_nonfinite")
                self.warn_once("callback", f"the on_nonfinite callable raised {exc!r}; it was ignored")
        return True

    def trip(self, alert: Alert) -> None:
        """Make the watch unhealthy (health follows NaN/Inf whatever the notification policy)."""
        with self._lock:
            self.last_trip = alert
            self.trips += 1
            if len(self._tripping) < 10_000:  # a flush takes them; bounded if none ever comes
                self._tripping.add(alert)

    def take_tripping(self, alerts: Iterable[Alert]) -> set[Alert]:
        """Those of ``alerts`` that trip (the flush admits them whatever the alert policy)."""
        with self._lock:
            found = self._tripping.intersection(alerts)
            self._tripping -= found
        return found

    def take_window(self) -> list[Alert]:
        """The alerts waiting for the next record (a flush cuts them)."""
        with self._lock:
            alerts, self._window = self._window, []
        return alerts

    @property
    def alerts(self) -> list[Alert]:
        with self._lock:
            return list(self._alerts)

    # ---- failures ----------------------------------------------------------------------------

    def count(self, kind: str, n: int = 1) -> None:
        """Count ``n`` failures or losses of ``kind`` (a key of ``watch.errors``)."""
        with self._lock:
            self._errors[kind] += n

    def errors(self, lost: Mapping[str, int] = {}) -> dict[str, int]:
        """The counted failures, plus ``lost`` (what the monitors could not record; zeros left out)."""
        with self._lock:
            out = dict(self._errors)
        for kind, n in lost.items():
            if n:
                out[kind] = out.get(kind, 0) + n
        return out

    def hook_failed(self, where: str, exc: BaseException) -> None:
        """A hook's own exception, caught so inference goes on: counted under ``where``, warned once."""
        self.count(where)
        self.warn_once(
            f"hook:{type(exc).__name__}",
            f"the torchwatch hook of {where!r} failed with {exc!r}; inference was not affected. "
            "Failures are counted per module in watch.errors (warned once per kind of error).",
        )

    def warn_once(self, key: str, message: str) -> None:
        """One :class:`~torchwatch.TorchwatchWarning` per ``key`` for the life of the watch."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(f"torchwatch: {message}", TorchwatchWarning, stacklevel=3)
