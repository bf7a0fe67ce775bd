"""Stop serving bad answers: a circuit breaker driven by torchwatch's tripping alerts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from . import _validate
from .errors import CircuitOpenError, ConfigError

__all__ = ["CircuitBreaker"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Route calls to a fallback while the watched model is unhealthy; try it again after a cool-down.

    ``breaker(*args, **kwargs)`` calls the watched model. A tripping alert (see
    :attr:`torchwatch.Watch.healthy`) opens the breaker: if it arrived during the call — on CPU,
    NaN/Inf trips at the end of the call that produced it — that call's output is discarded and the
    fallback answers instead, so the bad answer is never returned. While open, calls go straight to
    the fallback. After ``cooldown`` seconds the breaker half-opens: the next call runs the model,
    and closes the breaker if no new trip came with it, or reopens it.

    The breaker holds the model (the watch alone holds it weakly), so a server may keep just the
    breaker.

    Cost per call while closed: a few attribute reads and comparisons in Python, +4.4 µs per call on
    a 2-core EPYC VM (``benchmarks/containment.py``; reading ``watch.healthy`` alone: 0.18 µs).

    Args:
        watch: the :class:`torchwatch.Watch` of the model to protect.
        fallback: called with the same arguments while open (a cached answer, a simpler model);
            None raises :class:`torchwatch.CircuitOpenError` for the caller to handle.
        cooldown: seconds open before a trial call.
        on_change: called with ``(old_state, new_state, alert)`` on every transition (logging).
        clock: the time source ``cooldown`` is measured in (default :func:`time.monotonic`); a
            counter of requests makes the breaker's decisions reproducible (replays, tests).

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> watch = tw.attach(model, on_nonfinite="ignore")
        >>> breaker = tw.CircuitBreaker(watch, fallback=lambda x: torch.zeros(len(x), 2), cooldown=60)
        >>> breaker(torch.tensor([[float("nan"), 1.0]])).tolist()  # the NaN answer is replaced
        [[0.0, 0.0]]
        >>> breaker.state, breaker(torch.ones(1, 2)).tolist()
        ('open', [[0.0, 0.0]])
        >>> watch.detach()
    """

    def __init__(
        self,
        watch: Any,
        *,
        fallback: Callable[..., Any] | None = None,
        cooldown: float = 30.0,
        on_change: Callable[[str, str, Any], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not hasattr(watch, "trips"):
            raise ConfigError(f"CircuitBreaker needs a torchwatch Watch, got {type(watch).__name__}")
        if fallback is not None and not callable(fallback):
            raise ConfigError("fallback must be callable (or None to raise CircuitOpenError)")
        _validate.number("CircuitBreaker", "cooldown", cooldown, low=0.0)
        _validate.function("CircuitBreaker", "on_change", on_change, optional=True)
        _validate.function("CircuitBreaker", "clock", clock)
        model = watch.model
        if model is None:
            raise ConfigError("CircuitBreaker: the watched model was garbage-collected; attach to a live model")
        # held, not weakly like the watch holds it: the breaker exists to call the model, and a
        # server that keeps only the breaker (a common shape) must not lose the model under it
        self.model = model
        self.watch, self.fallback, self.cooldown, self.on_change = watch, fallback, float(cooldown), on_change
        self._clock = clock
        self.state = CLOSED
        self.opened_at = 0.0
        self.reason: Any = None
        self.fallback_calls = 0
        self._seen = watch.trips
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.watch.trips != self._seen or self.state != CLOSED:
            trial = self._before_call()
            if not trial:
                return self._fallback(args, kwargs)
        before = self.watch.trips
        out = self.model(*args, **kwargs)
        after = self.watch.trips
        if after != before:  # this call (or a flush during it) tripped: do not return its answer
            self._open(after)
            return self._fallback(args, kwargs)
        if self.state == HALF_OPEN:
            self._set(CLOSED, None)
        return out

    def _before_call(self) -> bool:
        """Update the state; True when the model may run (closed, or the half-open trial)."""
        with self._lock:
            trips = self.watch.trips
            if trips != self._seen:
                self._open_locked(trips)
                return False
            if self.state == OPEN and self._clock() - self.opened_at >= self.cooldown:
                self._set_locked(HALF_OPEN, self.reason)
                return True
            return self.state == CLOSED

    def _open(self, trips: int) -> None:
        with self._lock:
            self._open_locked(trips)

    def _open_locked(self, trips: int) -> None:
        self._seen = trips
        self.opened_at = self._clock()
        self._set_locked(OPEN, self.watch.last_trip)

    def _set(self, state: str, reason: Any) -> None:
        with self._lock:
            self._set_locked(state, reason)

    def _set_locked(self, state: str, reason: Any) -> None:
        old, self.state, self.reason = self.state, state, reason
        if old != state and self.on_change is not None:
            try:
                self.on_change(old, state, reason)
            except Exception:  # noqa: BLE001, S110 - a logging callback must not break serving
                pass

    def _fallback(self, args: tuple, kwargs: dict) -> Any:
        self.fallback_calls += 1
        if self.fallback is None:
            why = getattr(self.reason, "message", "the model is unhealthy")
            raise CircuitOpenError(f"circuit open: {why}; retrying the model after {self.cooldown:g} s")
        return self.fallback(*args, **kwargs)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.state}, cooldown={self.cooldown:g}s, fallback_calls={self.fallback_calls})"
