"""Writing incident bundles off the serving thread, within the bounds of a :class:`Capture`.

Jobs come from the serving thread (a call known to have faulted when it ended) and from the
watch's worker (alerts decided at a flush). One writer thread, started when there is work and
gone after a short idle time, applies ``redact``, takes the weights' fingerprint, writes the
bundle and its index line. Whatever is not written — over a bound, the queue full, a failing
``redact``, a full disk or a read-only directory — is counted and warned about once; no request
ever waits for it or sees its errors.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import math
import os
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .. import formats
from .._tensors import model_dtype
from ..alerts import Alert
from ..integrity.fingerprinting import fingerprint
from ..stats import ModuleStats
from . import bundle
from .options import Capture

NOT_WRITTEN = "captures not written"  # redact failed, the disk is full, the directory is read-only, queue full
OVER_LIMIT = "captures over limit"  # bundles per hour, bytes on disk, or a call's tensors over max_bundle_bytes
CAPTURED = "captured"  # the rule of the alert that says where a bundle was written
MISSED = "captures missed"  # a trigger whose call's inputs were not kept (see Capture.keep)
QUEUE = 8  # bundles waiting for the writer at most
IDLE_S = 2.0  # the writer thread ends after this long without work
HOUR_S = 3600.0


@dataclasses.dataclass
class Pending:
    """One call to write: what the serving side gathered (trees already copied)."""

    trigger: Alert
    alerts: list[Alert]
    call: int
    trace_id: str | None
    cohort: str | None
    time: float
    exact: bool  # the trigger is known to come from this very call
    environment: dict[str, Any]
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] | None = None
    outputs: Any = None
    stats: dict[str, ModuleStats] | None = None
    stats_scope: str | None = None
    nonfinite: list[tuple[int, str, int, int, int]] = dataclasses.field(default_factory=list)
    dropped: str | None = None  # why the tensors are not in the bundle
    reference: dict[str, Any] | None = None  # recent healthy calls' input range (capture/reference.py)


class Writer:
    """The bundles of one watch's capture; thread-safe, never raises into its callers.

    Args:
        options: the :class:`Capture`.
        model: weak reference to the watched model (its fingerprint goes into each bundle).
        modules: the watched modules' names.
        count, warn_once: the watch's alert bus methods.
    """

    def __init__(self, options: Capture, model: Callable[[], torch.nn.Module | None], modules: list[str],
                 count: Callable[[str, int], None], warn_once: Callable[[str, str], None],
                 publish: Callable[[Alert], object] | None = None) -> None:  # fmt: skip
        self.options = options
        self.directory = str(options.directory)
        self._model = model
        self._modules = modules
        self._count = count
        self._warn_once = warn_once
        self._publish = publish
        self._queue: queue.Queue[Pending] = queue.Queue(QUEUE)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._written: collections.deque[float] = collections.deque()  # times of the last hour's bundles
        self._disk: int | None = None  # bytes of bundles in the directory (scanned on the first write)
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        _WRITERS.add(self)

    # ---- any thread --------------------------------------------------------------------------

    def submit(self, job: Pending) -> None:
        """Queue a bundle for writing (counted, never waited for, if the queue is full)."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.lost(NOT_WRITTEN, f"more than {QUEUE} bundles were waiting for the writer; call {job.call} "
                      "was not captured")  # fmt: skip
            return
        with self._lock:
            self._busy += 1
            if self._thread is None or not self._thread.is_alive():
                # a daemon that exit waits for while it has work (_drain), not while it idles
                self._thread = threading.Thread(
                    target=_run, args=(weakref.ref(self),), name="torchwatch-capture", daemon=True
                )
                self._thread.start()

    def lost(self, key: str, why: str) -> None:
        self._count(key, 1)
        self._warn_once(f"capture:{key}:{why[:40]}", f"capture: {why}; counted in watch.errors[{key!r}]")

    def wait(self, timeout: float) -> bool:
        """Wait until every queued bundle is written (at most ``timeout`` s); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # ---- writer thread -----------------------------------------------------------------------

    def _next(self) -> Pending | None:
        try:
            return self._queue.get(timeout=IDLE_S)
        except queue.Empty:
            return None

    def _done(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def write(self, job: Pending) -> str | None:
        """Write one bundle now (the writer thread; tests call it directly); its path, or None."""
        options = self.options
        now = time.time()
        self._written = collections.deque(t for t in self._written if now - t < HOUR_S)
        if len(self._written) >= options.max_per_hour:
            self.lost(OVER_LIMIT, f"more than max_per_hour={options.max_per_hour} bundles this hour")
            return None
        try:
            tensors, meta = self._contents(job)
        except Exception as exc:  # noqa: BLE001 - a user's redact, or an argument that cannot be stored
            self.lost(
                NOT_WRITTEN, f"preparing the bundle of call {job.call} failed with {exc!r}; nothing of it was written"
            )
            return None
        size = sum(t.numel() * t.element_size() for t in tensors.values()) + len(str(meta)) + 4096
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if self._disk is None:
                self._disk = _bundle_bytes(self.directory)
            if self._disk + size > options.max_total_bytes:
                self.lost(OVER_LIMIT, f"the bundles in {self.directory!r} would pass max_total_bytes="
                          f"{options.max_total_bytes:,}")  # fmt: skip
                return None
            path = self._new_path(job)
            written = bundle.write(path, meta, tensors)
            # opened per bundle (a few an hour): a watch holds no file open for its capture
            index = os.path.join(self.directory, bundle.INDEX)
            formats.append_once(index, formats.json_line(_index_line(path, job, written, bool(tensors))), fsync=True)
        except OSError as exc:
            self.lost(NOT_WRITTEN, f"writing into {self.directory!r} failed ({exc.strerror or exc}); serving goes on")
            return None
        self._disk += written
        self._written.append(now)
        if self._publish is not None:  # where it is: in TensorBoard's alert text, the incident log, watch.alerts
            # the alert is kept before its warning is issued: a warnings filter set to "error" costs the warning only
            with contextlib.suppress(Exception):
                self._publish(written_alert(job, path))
        return path

    def _contents(self, job: Pending) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        options = self.options
        tensors: dict[str, torch.Tensor] = {}
        inputs_spec = outputs_spec = None
        if job.args is not None:
            tree: Any = {"args": job.args, "kwargs": job.kwargs or {}}
            outputs = job.outputs
            if options.redact is not None:
                tree, outputs = options.redact(tree), options.redact(outputs) if outputs is not None else None
            inputs_spec = bundle.encode(_as_inputs(tree), "input", tensors)
            if outputs is not None:
                outputs_spec = bundle.encode(outputs, "output", tensors)
        model = self._model()
        try:
            prints = fingerprint(model).to_dict() if model is not None else None
        except Exception as exc:  # noqa: BLE001 - a model whose weights cannot be read now
            prints = {"error": repr(exc)}
        meta = {
            "format": bundle.FORMAT, "call": job.call, "time": job.time, "trace_id": job.trace_id,
            "cohort": job.cohort, "exact": job.exact, "trigger": job.trigger.to_dict(),
            "alerts": [a.to_dict() for a in job.alerts], "inputs": inputs_spec, "outputs": outputs_spec,
            "redacted": options.redact is not None and job.args is not None, "dropped": job.dropped,
            "stats": {k: s.to_dict() for k, s in job.stats.items()} if job.stats is not None else None,
            "stats_scope": job.stats_scope, "nonfinite": [list(e) for e in job.nonfinite],
            "model": type(model).__name__ if model is not None else None, "dtype": _dtype_name(model),
            "modules": self._modules,
            "weights": {"fingerprint": prints, "manifest_digest": options.manifest},
            "environment": job.environment, "input_reference": job.reference,
        }  # fmt: skip
        return tensors, meta

    def _new_path(self, job: Pending) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(job.time))
        rule = re.sub(r"[^A-Za-z0-9_.-]", "_", job.trigger.rule)[:40]
        base = os.path.join(self.directory, f"{stamp}-call{job.call}-{rule}")
        path, n = f"{base}.safetensors", 1
        while os.path.exists(path):
            n += 1
            path = f"{base}-{n}.safetensors"
        return path


_WRITERS: weakref.WeakSet[Writer] = weakref.WeakSet()
EXIT_WAIT_S = 30.0  # at interpreter exit, how long queued bundles are waited for


@atexit.register
def _drain() -> None:
    """At exit, after the watches' final flushes (registered before them, so it runs after),
    write what is queued."""
    for writer in list(_WRITERS):
        writer.wait(EXIT_WAIT_S)


def _run(ref: weakref.ref[Writer]) -> None:
    """The writer thread: write queued bundles until idle (holds the writer only while working)."""
    while True:
        writer = ref()
        if writer is None:
            return
        job = writer._next()
        if job is None:
            with writer._lock:
                if writer._queue.empty():
                    writer._thread = None
                    return
            continue
        try:
            writer.write(job)
        except Exception as exc:  # noqa: BLE001 - the writer never dies with bundles queued
            writer.lost(NOT_WRITTEN, f"writing the bundle of call {job.call} failed with {exc!r}")
        finally:
            writer._done()
        del writer, job


def written_alert(job: Pending, path: str) -> Alert:
    """The alert that says a bundle was written, where, and the command that replays it. It names no
    module (so it stands alone in the incident log) and does not trip."""
    t = job.trigger
    return Alert(
        CAPTURED,
        "",
        t.rule,
        float(job.call),
        math.nan,
        job.call,
        time.time(),
        job.cohort,
        job.trace_id,
        f"incident bundle written for call {job.call} ({t.rule} on {t.module!r}): {path}; replay it with "
        f"`torchwatch replay {path} --model SPEC --weights CKPT`",
    )


def _as_inputs(tree: Any) -> dict[str, Any]:
    """The (redacted) ``{"args", "kwargs"}`` tree with args as a tuple, as a replay needs it."""
    if not isinstance(tree, dict) or set(tree) != {"args", "kwargs"}:
        raise TypeError("redact() must return the {'args': ..., 'kwargs': ...} dict it was given")
    return {"args": tuple(tree["args"]), "kwargs": dict(tree["kwargs"])}


def _dtype_name(model: torch.nn.Module | None) -> str | None:
    dtype = model_dtype(model) if model is not None else None
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _bundle_bytes(directory: str) -> int:
    total = 0
    with os.scandir(directory) as entries:
        for e in entries:
            if e.name.endswith(".safetensors") and e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
    return total


def _index_line(path: str, job: Pending, size: int, tensors: bool) -> dict[str, Any]:
    t = job.trigger
    return {
        "format": formats.CAPTURE, "file": os.path.basename(path), "time": job.time, "call": job.call,
        "trace_id": job.trace_id, "cohort": job.cohort, "rule": t.rule, "module": t.module, "message": t.message,
        "exact": job.exact, "bytes": size, "inputs": tensors,
    }  # fmt: skip
