"""Activation statistics: what each watched module's floating-point outputs hold.

Each selected module's forward hook measures the tensors it returned: CPU tensors through the C
kernel into host accumulators (:class:`~.window.StatsWindow`), others into the slots of a
:class:`~torchwatch._table.DeviceTable` on their device with the fused kernel (or its torch-ops
twin); small device outputs wait for one grouped launch per call (``grouping.py``). At the end
of a root call the NaN/Inf measurements of that call name where NaN/Inf
started (host: at once; device: at the next flush, or at once with ``on_nonfinite="raise"``).

Under ``torch.compile`` or CUDA-graph capture the hooks run once, at trace time, so they take a
*graph path*: device-side operations only. The root pre-hook advances a call counter on the
device and sets the sampling flag there; the statistics kernels read both.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..._casts import CastPlan, cast_plan, float_dtypes
from ..._pytree import tensors_in
from ..._table import C_NAN, C_NEGINF, CALLS, DeviceTable
from ..._tensors import model_device
from ..._testing import TRITON_IN_COMPILE
from ...alerts import call_nonfinite_alert
from ...kernels import PLAIN_TENSOR_TYPES, graph_op, host_stats, measurable, torch_ops
from ...kernels import cpu as cpu_kernel
from ..base import Binding, Call, Collect, Monitor, labels
from .grouping import Grouping, merge_for
from .window import StatsCut, StatsWindow

POSITIONS_NOT_MEASURED = "positions not measured"  # measurements of output positions beyond the capacity
_NO_PLAN = object()


def _import_dynamo() -> None:
    """Import ``torch._dynamo`` (``torch.compiler.assume_constant_result`` does, the first time)
    on a thread of its own. Its import leaves a reference cycle through the importing frames,
    which only the garbage collector frees, and ``attach()``'s frames hold the model: imported
    from here, a model dropped after its first attach would live until the next collection."""
    if "torch._dynamo" in sys.modules:
        return
    thread = threading.Thread(target=importlib.import_module, args=("torch._dynamo",), name="torchwatch-import")
    thread.start()
    thread.join()


class Activations(Monitor):
    """Per output position: ModuleStats (moments, range, NaN/Inf, zeros, subnormals, casts).

    It has no value of its own: its statistics and first NaN/Inf records go to the record's core
    fields (``record.stats``, ``record.nonfinite``, ``snapshot[...]``) through ``ctx.positions``.
    Its hooks are raw module hooks (``binding.module_hook``): they also run under graph tracing
    and capture (the graph path) and inline the common CPU case.

    Args:
        modules: how many modules it will watch (sizes the device tables).
        device_path: measure CPU tensors the way accelerator ones are (the CPU twin of the
            device path; tests and benchmarks set it through :func:`device_path`).
    """

    name = "stats"
    cohort_snapshot = True
    call_order = 2  # after the other monitors' after_call: NaN/Inf origin over every measurement

    def __init__(
        self, model: nn.Module, *, modules: int, cast_dtypes: tuple[str, ...], every: int, on_nonfinite: Any,
        device_path: bool = False,
    ) -> None:  # fmt: skip
        self.cast_dtypes = cast_dtypes
        self.modules: list[str] = []  # the watched modules' names, set at bind
        self._model = weakref.ref(model)
        self._raise = on_nonfinite == "raise"
        self._device_path = device_path
        self.capacity = 4 * modules + 64
        self.window = StatsWindow(cast_dtypes, self.capacity, every)
        self.every = every
        # Every plan up front: under torch.compile a hook may not run Python that touches tensors.
        self._plans: dict[torch.dtype, CastPlan | None] = {}
        self._cpu_kernel: dict[torch.dtype, tuple[int, object, bool]] = {}  # dtype -> C kernel arguments
        for name in float_dtypes():
            self._new_plan(getattr(torch, name))
        self._tables: dict[torch.device, DeviceTable] = {}
        self._seen: set[str] = set()
        self._completed = 0  # sampled calls completed (the check for modules that never ran waits for one)
        self._unseen_checked = False
        _import_dynamo()
        ref = weakref.ref(self)  # weak: the closure must not keep the monitor in a cycle

        def graph_slot(device: str, fqn: str, name: str) -> int:
            monitor = ref()
            return monitor._position(device, fqn, name) if monitor is not None else -1

        self._graph_slot = torch.compiler.assume_constant_result(graph_slot)

    def bind(self, binding: Binding) -> None:
        self._bus = binding.bus
        self._local = binding.local
        self._graph_mode = binding.graph_mode
        self._cohorts = binding.cohorts
        self._device_lock = binding.device_lock
        self._flush_lock = binding.flush_lock
        self._grouping = Grouping(binding.bus, binding.device_lock)
        self._new_table(model_device(self._model()))  # before any trace: tables cannot be made inside one
        root = self._model()
        self.modules = [name for name, _ in binding.modules]
        # The model's own hook must run before the engine closes the call: it goes first.
        for name, module in binding.modules:
            binding.module_hook(module, self._make_hook(name), prepend=module is root)

    # ---- calls -------------------------------------------------------------------------------

    def graph_call(self) -> None:
        for table in self._tables.values():
            table.tick(self.every)

    def before_call(self, call: Call, args: Any, kwargs: dict[str, Any]) -> None:
        if call.trace_id is not None and self._tables:
            self.window.remember_trace(call.index, call.trace_id)

    def after_call(self, call: Call, output: Any) -> None:
        self._finish_call(call)
        self._completed += 1

    def _make_hook(self, fqn: str) -> Callable[[nn.Module, Any, Any], None]:
        on_output = self._on_output
        # The common case, a dense CPU tensor in a sampled call, inlined with what it needs
        # bound here: inside a forward the interpreter's data is cold after each large op, and
        # each attribute, call and lock costs microseconds (benchmarks/hook_cost.py --cold).
        measure_host = self.window.measure
        kernels = self._cpu_kernel
        local = self._local
        graph_mode = self._graph_mode
        compiling = graph_op.compiling
        seen = self._seen
        k = len(self.cast_dtypes)
        plain = torch.Tensor if not self._device_path else None
        strided = torch.strided
        hook_failed = self._bus.hook_failed
        table_full = self._table_full

        def torchwatch_hook(module: nn.Module, args: Any, output: Any) -> None:
            call = getattr(local, "call", None)
            if type(output) is not plain or call is None or graph_mode.cuda or compiling():
                on_output(fqn, output)
                return
            if not call.sampled:
                return
            try:
                kernel = kernels.get(output.dtype)
                if kernel is None or not output.is_cpu or output.layout is not strided or not output.is_contiguous():
                    on_output(fqn, output)
                    return
                if fqn not in seen:
                    seen.add(fqn)
                seq = call.seq
                call.seq = seq + 1
                nonfinite = measure_host((call.cohort, fqn), k, output.data_ptr(), output.numel(), kernel, call.detail)
                if nonfinite:
                    call.events.append((seq, fqn, *nonfinite))
                elif nonfinite is False:
                    table_full(fqn)
            except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                hook_failed(fqn, exc)

        return torchwatch_hook

    def _on_output(self, fqn: str, output: Any) -> None:
        if self._graph_mode():
            self._graph_output(fqn, output)
            return
        local = self._local
        call = getattr(local, "call", None)
        if (call is None and getattr(local, "depth", 0)) or (call is not None and not call.sampled):
            return  # an unsampled root call in this thread; the hooks are up for another
        try:
            orphan = call is None
            if orphan:
                call = self._orphan_call(fqn)
            if fqn not in self._seen:
                self._seen.add(fqn)
            if type(output) is torch.Tensor:
                self.measure(call, fqn, output)
            else:
                for label, tensor in tensors_in(output):
                    self.measure(call, fqn + label, tensor)
            if orphan:
                self._finish_call(call)
        except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
            self._bus.hook_failed(fqn, exc)

    def _orphan_call(self, fqn: str) -> Call:
        """A call for a module that ran outside any root call (warned once)."""
        self._bus.warn_once(
            "orphan",
            f"{fqn!r} ran outside a call of the watched model (model.forward() called directly, a "
            "submodule called on its own, or another thread); its statistics are recorded with call "
            "index -1. Call the model itself, model(x), to get call indices and sampling.",
        )
        cohort, trace_id = labels.get()
        return Call(-1, self._cohorts.bound(cohort), trace_id)

    # ---- measuring ---------------------------------------------------------------------------

    def measure(self, call: Call, name: str, x: torch.Tensor) -> None:
        """Measure one tensor as position ``name`` of ``call`` (hooks of this and other monitors)."""
        # Cheapest checks first: in a real forward every tensor attribute is a cache-cold call.
        if type(x) not in PLAIN_TENSOR_TYPES:
            return
        plan = self._plans.get(x.dtype, _NO_PLAN)
        if plan is _NO_PLAN:
            plan = self._new_plan(x.dtype)
        if plan is None or x.layout is not torch.strided:
            return
        seq = call.seq
        call.seq = seq + 1
        host = x.is_cpu and not self._device_path
        if not host:
            if not measurable(x):
                return
            host = x.numel() == 0  # nothing to launch for
        if host:
            kernel = self._cpu_kernel.get(x.dtype)
            if kernel is not None and x.is_cpu and x.is_contiguous():
                nonfinite = self.window.measure(
                    (call.cohort, name), len(plan.names), x.data_ptr(), x.numel(), kernel, call.detail
                )
                if nonfinite is False:
                    self._table_full(name)
                elif nonfinite:
                    call.events.append((seq, name, *nonfinite))
                return
            raw = host_stats(x, plan)
            if call.detail is not None:
                call.detail.append((name, raw))
            if not self.window.add((call.cohort, name), len(plan.names), raw):
                self._table_full(name)
                return
            if raw[1] or raw[2] or raw[3]:
                call.events.append((seq, name, raw[1], raw[2], raw[3]))
            return
        table = self._tables.get(x.device) or self._new_table(x.device)
        slot = table.slot((call.cohort, name))
        if slot is None:
            self._table_full(name)
            return
        self.window.position(name)
        self._grouping.measure(call, table, slot, x.detach(), plan)
        call.device.append((seq, name, table, slot))

    def _graph_output(self, fqn: str, output: Any) -> None:
        """Graph path of a module's hook: device-side operations only, nothing to wait for."""
        items = (("", output),) if isinstance(output, torch.Tensor) else tensors_in(output)
        for label, x in items:
            if type(x) not in PLAIN_TENSOR_TYPES or not x.is_floating_point() or x.layout is not torch.strided:
                continue
            plan = self._plans.get(x.dtype)
            table = self._tables.get(x.device)
            if plan is None or table is None or x.numel() == 0:
                continue
            slot = self._graph_slot(str(x.device), fqn, fqn + label)
            if slot < 0:
                continue
            call = table.control[CALLS] - 1
            # Inside torch.compile the statistics are one opaque op per output (kernels/graph_op.py):
            # inductor neither traces their reductions (the compile-time blow-up) nor plans memory
            # around a hand-launched kernel (a compiled BERT-base that launched the Triton kernel
            # directly crashed with an illegal memory access on an H200; see RESULTS.md).
            merge = _compiled_merge if graph_op.compiling() and not TRITON_IN_COMPILE.on else merge_for(table, x)
            with torch.no_grad():
                merge(table, slot, x.detach(), plan, call, use_flag=True)

    def _position(self, device: str, fqn: str, name: str) -> int:
        """A graph-path position's slot (-1: the table is full), recording that it ran.

        Called through ``self._graph_slot``, a function marked ``torch.compiler.assume_constant_result``
        (in ``__init__``; a bound method cannot carry the mark): torch.compile runs
        it once per trace as plain Python and keeps the slot as a constant, so the bookkeeping
        here never becomes a guard (guards on these sets and dicts, which change on the first
        call, made every compiled model compile twice)."""
        slot = self._tables[torch.device(device)].slot((None, name))
        if slot is None:
            return -1
        self.window.position(name)
        self._seen.add(fqn)
        return slot

    def _new_plan(self, dtype: torch.dtype) -> CastPlan | None:
        """The cast plan of a dtype (None if not floating point), and its CPU kernel arguments."""
        plan = cast_plan(dtype, self.cast_dtypes) if dtype.is_floating_point else None
        if plan is not None and cpu_kernel.available and dtype in cpu_kernel.DTYPE_CODES:
            self._cpu_kernel[dtype] = (cpu_kernel.DTYPE_CODES[dtype], cpu_kernel.native_plan(plan), False)
        self._plans[dtype] = plan
        return plan

    def _new_table(self, device: torch.device) -> DeviceTable:
        with self._device_lock:
            table = self._tables.get(device)
            if table is None:
                table = DeviceTable(device, len(self.cast_dtypes), self.capacity)
                table.kernel = _triton_for(device)
                if table.kernel is not None:
                    table.scratch = table.kernel.Workspace(table, [p for p in self._plans.values() if p is not None])
                # small outputs wait for one launch per call where a grouped kernel saves launches
                # (and in the tests' device path, through the twin, to test the holding itself)
                table.grouped = table.kernel if table.kernel is not None else torch_ops if self._device_path else None
                self._tables = {**self._tables, device: table}
                if device.type == "cuda":
                    self._graph_mode.cuda = True  # graph capture is possible
        return table

    def _table_full(self, name: str) -> None:
        self._bus.count(POSITIONS_NOT_MEASURED)
        self._bus.warn_once(
            "table-full",
            f"more than {self.capacity} output positions (per device and cohort); {name!r} and later new "
            f"ones are not measured (counted in watch.errors[{POSITIONS_NOT_MEASURED!r}]). Watch fewer modules "
            "(attach(modules=...)), or return fewer distinct keys from a module.",
        )

    # ---- non-finite provenance ---------------------------------------------------------------

    def _finish_call(self, call: Call) -> None:
        """Resolve where NaN/Inf started on this call. Device measurements are resolved at the
        next flush, unless ``on_nonfinite="raise"`` needs them now (one wait for the device)."""
        self._grouping.finish(call)
        events = call.events
        if call.device and self._raise:
            events = sorted(events + self._device_events(call))
        if not events:
            return
        alert, names = call_nonfinite_alert(events, call=call.index, cohort=call.cohort, trace_id=call.trace_id)
        self.window.first_nonfinite(call, names, alert.module)
        if self._bus.publish(alert, trip=True) and self._raise:
            call.raise_alert = alert

    def _device_events(self, call: Call) -> list[tuple[int, str, int, int, int]]:
        """This call's device measurements that held NaN/Inf: one read per table (waits)."""
        found = []
        with self._flush_lock:
            columns = {}
            for table in {id(t): t for _, _, t, _ in call.device}.values():
                half = table.active
                columns[id(table)] = (
                    table.nfcalls[half, :, 1].tolist(),
                    table.counts[half, :, C_NAN : C_NEGINF + 1].tolist(),
                )
            for seq, name, table, slot in call.device:
                last, counts = columns[id(table)]
                if last[slot] == call.index:  # counts are the window's, a hint at the kind
                    found.append((seq, name, *(counts[slot] if any(counts[slot]) else (1, 0, 0))))
        return found

    # ---- windows -----------------------------------------------------------------------------

    def tables(self) -> list[DeviceTable]:
        """The device tables, one per device measured so far (benchmarks switch their kernel)."""
        return list(self._tables.values())

    def take(self, *, keep: bool) -> StatsCut | None:
        return self.window.take(list(self._tables.values()), keep=keep)

    def collect(self, taken: StatsCut | None, ctx: Collect) -> None:
        self.window.collect(taken, ctx)
        self._check_unseen()

    def reset(self) -> None:
        self.window.reset(list(self._tables.values()))

    def _check_unseen(self) -> None:
        """Warn once if selected modules never ran while sampled calls completed."""
        if self._unseen_checked or self._completed == 0:
            return
        self._unseen_checked = True
        unseen = [name for name in self.modules if name not in self._seen]
        if not unseen:
            return
        hint = ""
        model = self._model()
        if model is not None and any(
            isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention)) for m in model.modules()
        ):
            hint = (
                " nn.TransformerEncoderLayer/MultiheadAttention take a fused fast path in eval that "
                "skips their submodules' hooks: select the layers themselves, or call "
                "torch.backends.mha.set_fastpath_enabled(False)."
            )
        shown = ", ".join(repr(n) for n in unseen[:8]) + (" ..." if len(unseen) > 8 else "")
        self._bus.warn_once(
            "unseen",
            f"{len(unseen)} watched module(s) never ran in the calls measured so far: {shown}. They may "
            f"be unused, or bypass hooks (called via .forward(), or a fused fast path).{hint}",
        )


@functools.cache
def _triton_for(device: torch.device) -> Any:
    """The Triton kernel module for CUDA devices where Triton imports, else None."""
    if device.type != "cuda":
        return None
    try:
        from ...kernels import triton_stats
    except ImportError:
        return None
    return triton_stats


# torch < 2.4 has no custom ops: compiled graphs then trace the torch ops themselves.
_compiled_merge: Callable[..., None] = graph_op.merge_into if graph_op.available else torch_ops.merge_into
