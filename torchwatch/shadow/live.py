"""A candidate model version on a sample of the primary's live traffic: :func:`shadow`.

:func:`shadow` runs the candidate on a random sample of the primary's live calls on a background
thread: the serving thread only decides whether a call is sampled (two Python hooks, about a
microsecond) and, for a sampled call, copies its inputs and outputs (device-side copies on GPU,
no host sync). The candidate runs off the serving path; a full queue drops samples (counted)
rather than making the primary wait.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .. import _validate, formats
from .._files import shown
from .._hooks import Hook
from .._pytree import flatten_outputs
from ..alerts import Alert
from ..engine import AlertBus, watch_of
from ..errors import ConfigError
from .compare import Comparer, Comparison, check_limits

LIVE_MODULES_NOTE = (
    "module statistics are not compared live (the primary's cover all its calls, a candidate's only the sampled "
    "ones); tw.compare(primary, candidate, batches=...) compares them on the same inputs"
)

__all__ = ["Shadow", "shadow"]


def _copy(obj: Any) -> Any:
    """Own copies of the tensors in a call's arguments or output (the caller may reuse buffers)."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), obj)


class Shadow:
    """A candidate model run on a sample of a primary's live calls; see :func:`shadow`.

    Attributes:
        seen, sampled, dropped, errors: primary calls seen, sampled, dropped because the queue was
            full, and candidate calls that raised.
        alerts: ``"shadow"`` alerts raised (agreement below the limits), oldest first.
    """

    def __init__(
        self, primary: nn.Module, candidate: nn.Module, *, sample: float, seed: int | None, max_pending: int,
        path: str | os.PathLike[str] | None, write_every: int, min_top1: float, max_rel_l2: float,
        min_calls: int, on_compare: Callable[[Any, Any, Any, BaseException | None], object] | None = None,
        tag: Callable[[], Any] | None = None,
    ) -> None:  # fmt: skip
        # The primary is the server's: only its hooks refer to it (dropping it frees it). The
        # candidate is the shadow's to run until close(), which lets it go.
        self._candidate: nn.Module | None = candidate
        self.sample = sample
        self.min_top1, self.max_rel_l2, self.min_calls = min_top1, max_rel_l2, min_calls
        self._rng = random.Random(seed)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._comparer = Comparer()
        self._tls = threading.local()
        self._lock = threading.Lock()
        self.seen = self.sampled = self.dropped = self.errors = 0
        self.alerts: list[Alert] = []
        self._alerted: set[str] = set()  # outputs alerted on
        self._warnings = AlertBus("warn")  # its warn-once (a shadow has no watch of its own to report to)
        self._path = os.fspath(path) if path is not None else None
        self._write_every = write_every
        # Module statistics are not compared live: the primary's watch measures all its traffic
        # and a candidate's would measure the sampled calls only, so their differences showed
        # shifts for identical layers. tw.compare runs both models on the same inputs for that.
        self._notes: list[str] = [LIVE_MODULES_NOTE]
        self._on_compare, self._tag = on_compare, tag
        self._primary_watch = watch_of(primary)
        self._closed = False
        self._stream: Any = None  # the candidate's CUDA stream, made on first use (shadow thread)
        # The thread holds the shadow weakly between samples, so a shadow dropped without close()
        # (with its models) is freed, and its finalizer ends the thread.
        self._thread = threading.Thread(
            target=_serve, args=(weakref.ref(self), self._queue), name="torchwatch-shadow", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._queue.put, None)
        self._handles = [
            primary.register_forward_pre_hook(Hook(self._before), with_kwargs=True),
            primary.register_forward_hook(Hook(self._after), always_call=True),
        ]

    # ---- serving thread ----------------------------------------------------------------------

    def _before(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        tls = self._tls
        depth = getattr(tls, "depth", 0)
        tls.depth = depth + 1
        if depth:
            return
        tls.inputs = None
        self.seen += 1
        if self._rng.random() >= self.sample:
            return
        try:
            tls.tag = self._tag() if self._tag is not None else None
            tls.inputs = (_copy(args), _copy(kwargs))
        except Exception:  # noqa: BLE001 - the primary's call must go on
            self.errors += 1

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        tls = self._tls
        depth = getattr(tls, "depth", 0)
        if depth == 0:
            return
        tls.depth = depth - 1
        inputs, tls.inputs = getattr(tls, "inputs", None), None
        if depth > 1 or inputs is None:
            return
        try:
            expected = _copy(output)
            event = None
            if torch.cuda.is_available() and any(
                t.is_cuda for t in flatten_outputs(expected).values()
            ):  # the copies are queued on this stream: the worker waits for this event, not the host
                event = torch.cuda.Event()
                event.record()
            self._queue.put_nowait((inputs, expected, event, getattr(tls, "tag", None)))
            self.sampled += 1
        except queue.Full:
            self.dropped += 1
        except Exception:  # noqa: BLE001 - the primary's call must go on
            self.errors += 1

    # ---- shadow thread -----------------------------------------------------------------------

    def _compare_one(self, item: tuple[Any, Any, Any, Any]) -> None:
        (args, kwargs), expected, event, tag = item
        got = error = None
        try:
            if event is not None:
                self._stream = self._stream or torch.cuda.Stream()
                self._stream.wait_event(event)
            stream_context = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
            candidate = self._candidate
            if candidate is None:  # closed meanwhile
                return
            with torch.no_grad(), stream_context:
                got = candidate(*args, **kwargs)
                self._comparer.add(expected, got)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is the finding, not a crash
            error = exc
            with self._lock:
                self.errors += 1
            self._warn_once("error", f"the shadow candidate raised {exc!r}; counted in shadow.errors")
        finally:
            try:
                if self._on_compare is not None and (got is not None or error is not None):
                    self._on_compare(expected, got, tag, error)
            except Exception as exc:  # noqa: BLE001 - the observer's failure is counted, not the thread's end
                with self._lock:
                    self.errors += 1
                self._warn_once("observer", f"the shadow's on_compare raised {exc!r}; counted in shadow.errors")
            self._queue.task_done()
        calls = self._comparer.calls
        try:  # the thread must outlive anything a sink or a warnings filter raises, or samples pile up
            if calls >= self.min_calls:
                self._check()
            if self._path is not None and calls and calls % self._write_every == 0:
                self._write()
        except Exception:  # noqa: BLE001 - counted; the comparisons go on
            with self._lock:
                self.errors += 1

    def _check(self) -> None:
        for o in self._comparer.results():
            bad = (o.top1 is not None and o.top1 < self.min_top1) or (o.top1 is None and o.rel_l2 > self.max_rel_l2)
            if not bad or o.name in self._alerted:
                continue
            self._alerted.add(o.name)
            if o.top1 is not None:
                stat, value, limit = "top1", o.top1, self.min_top1
            else:
                stat, value, limit = "rel_l2", o.rel_l2, self.max_rel_l2
            watch = self._primary_watch
            call = watch.calls - 1 if watch is not None else self.seen - 1  # the primary's call count
            alert = Alert(
                rule="shadow", module=o.name, stat=stat, value=float(value), expected=float(limit), call=call,
                time=time.time(), cohort=None, trace_id=None,
                message=f"shadow candidate disagrees with the primary on {o.name!r}: {stat} {value:.4g} over "
                f"{o.calls} calls (limit {limit:g})",
            )  # fmt: skip
            self.alerts.append(alert)
            watch = self._primary_watch
            if watch is not None and watch.attached:
                watch.publish(alert)  # into the primary's sinks and incident log
            else:
                self._warn_once(f"alert:{o.name}", alert.message)

    def _write(self) -> None:
        try:  # a torn last line is cut; a FIFO without a reader fails, never blocks
            formats.append_once(self._path, formats.json_line(self.report().to_dict()))
        except OSError as exc:
            self._warn_once("write", f"cannot write the shadow report to {shown(self._path)}: {exc}")

    def _warn_once(self, key: str, message: str) -> None:
        self._warnings.warn_once(key, message)

    # ---- public ------------------------------------------------------------------------------

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait until every queued sample was compared; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def report(self) -> Comparison:
        """Agreement of the outputs so far (module statistics: :func:`torchwatch.compare`, on the same inputs)."""
        return Comparison(
            "shadow", self._comparer.calls, self._comparer.results(), (), seen=self.seen, sampled=self.sampled,
            dropped=self.dropped, errors=self.errors, notes=tuple(self._notes), min_top1=self.min_top1,
            max_rel_l2=self.max_rel_l2,
        )  # fmt: skip

    def close(self, timeout: float = 60.0) -> Comparison:
        """Stop sampling, finish the queued comparisons, write the final report; returns it."""
        if not self._closed:
            self._closed = True
            for h in self._handles:
                h.remove()
            self.wait(timeout)
            self._queue.put(None)
            self._thread.join(timeout)
            self._candidate = None  # a closed shadow keeps its report, not the candidate's weights
        result = self.report()
        if self._path is not None and result.calls:
            self._write()
        return result

    def __enter__(self) -> Shadow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(ref: weakref.ref[Shadow], samples: queue.Queue[Any]) -> None:
    """The shadow thread: compare each queued sample, holding the shadow only while it does."""
    while True:
        item = samples.get()
        shadow = ref() if item is not None else None
        if shadow is None:
            return
        shadow._compare_one(item)
        del shadow, item


def shadow(
    primary: nn.Module,
    candidate: nn.Module,
    *,
    sample: float = 0.01,
    seed: int | None = None,
    max_pending: int = 8,
    path: str | os.PathLike[str] | None = None,
    write_every: int = 100,
    min_top1: float = 0.99,
    max_rel_l2: float = 0.05,
    min_calls: int = 20,
    on_compare: Callable[[Any, Any, Any, BaseException | None], object] | None = None,
    tag: Callable[[], Any] | None = None,
) -> Shadow:
    """Run ``candidate`` on a random ``sample`` of ``primary``'s calls, off the serving path.

    The primary's answers are what callers get; the candidate's are only compared with them.
    Sampled calls' inputs and outputs are copied (the caller may reuse its buffers) and queued to a
    background thread that runs the candidate under ``torch.no_grad`` (on its own CUDA stream,
    after the copies) and accumulates per-output agreement. Module statistics are not compared
    live (the primary's watch covers all its calls, the candidate would be measured on the sampled
    ones only): :func:`torchwatch.compare` compares them on the same inputs. Disagreement beyond the
    limits raises one ``"shadow"`` :class:`Alert` per output, delivered to the primary's watch
    (sinks, incident log) when it is watched, or warned. The shadow holds the candidate until
    :meth:`Shadow.close` and never the primary (dropping the primary frees it).

    Args:
        primary, candidate: the serving model and the version under evaluation.
        sample: share of primary calls run on the candidate (0 < sample <= 1).
        seed: seed of the sampling decisions.
        max_pending: sampled calls waiting for the candidate; more are dropped (``dropped``).
        path: append the report as a JSON line here every ``write_every`` comparisons and at
            :meth:`Shadow.close` (``torchwatch report`` shows it).
        min_top1, max_rel_l2: agreement limits (top-1 for logits-like outputs, rel-L2 for others).
        min_calls: comparisons before the limits are applied.
        on_compare: called on the shadow thread after each sampled call as
            ``on_compare(primary_output, candidate_output, tag, error)`` (``error``: the exception
            the candidate raised, its output then None); what it raises is counted in ``errors``.
        tag: called on the serving thread for each sampled call; its value is handed to
            ``on_compare`` (a request's trace id, say).

    Returns:
        A :class:`Shadow` (context manager; ``close()`` returns the final :class:`Comparison`).

    Example:
        >>> import copy, torch, torchwatch as tw
        >>> primary = torch.nn.Linear(8, 4)
        >>> candidate = copy.deepcopy(primary)
        >>> with tw.shadow(primary, candidate, sample=1.0) as sh:
        ...     for _ in range(5):
        ...         _ = primary(torch.randn(16, 8))
        ...     sh.wait()
        ...     report = sh.report()
        True
        >>> report.calls, report.outputs[0].top1
        (5, 1.0)
    """
    if not isinstance(primary, nn.Module) or not isinstance(candidate, nn.Module):
        raise ConfigError("shadow() needs two torch.nn.Module models")
    if primary is candidate:
        raise ConfigError("shadow() needs two different models: the candidate is the primary")
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 < sample <= 1:
        raise ConfigError(f"shadow sample must be in (0, 1], got {sample!r}")
    for name, value in (("max_pending", max_pending), ("write_every", write_every), ("min_calls", min_calls)):
        _validate.integer("shadow()", name, value)
    check_limits("shadow()", min_top1, max_rel_l2)
    _validate.seed("shadow()", "seed", seed)
    if path is not None:
        _validate.path("shadow()", "path", path)
    return Shadow(
        primary, candidate, sample=float(sample), seed=seed, max_pending=max_pending, path=path,
        write_every=write_every, min_top1=min_top1, max_rel_l2=max_rel_l2, min_calls=min_calls,
        on_compare=on_compare, tag=tag,
    )  # fmt: skip
