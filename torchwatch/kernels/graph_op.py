"""The statistics as one opaque op inside compiled graphs: ``torch.ops.torchwatch.merge_stats``.

Traced as plain torch ops, each watched output added ~40 small reductions to the graph, and
inductor spent most of a compile scheduling them (a 2-layer BERT compiled 4.6-9x slower with
torchwatch attached). As a custom op the graph holds one node per output: inductor neither
traces nor fuses the statistics, and it knows exactly which tensors the op writes (the device
table's counts, moments, non-finite call range and control row), so it plans no memory around
them. At run time the op measures with the fused Triton kernel where the table has one and the
tensor suits it, else with the torch-ops twin; the sampling flag and call counter stay on the
device, so replays of a captured graph keep counting.

Needs ``torch.library.custom_op`` (torch 2.4+); on older torch :data:`available` is False and
compiled graphs trace the torch ops as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._casts import CastPlan
from .._table import CALLS
from . import torch_ops

available = hasattr(torch.library, "custom_op")
# True while torch.compile traces (torch.compiler.is_compiling on torch >= 2.3.1)
compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


class _Table:
    """The tensors of a device table, as ``merge_into`` reads them."""

    __slots__ = ("control", "counts", "k", "kernel", "moments", "nfcalls", "scratch")

    def __init__(self, counts: torch.Tensor, moments: torch.Tensor, nfcalls: torch.Tensor, control: torch.Tensor,
                 k: int) -> None:  # fmt: skip
        self.counts, self.moments, self.nfcalls, self.control, self.k = counts, moments, nfcalls, control, k
        self.kernel = self.scratch = None


def _merge_stats(
    counts: torch.Tensor, moments: torch.Tensor, nfcalls: torch.Tensor, control: torch.Tensor, x: torch.Tensor,
    slot: int, tiny: float, under: list[float], over: list[float], use_flag: bool,
) -> None:  # fmt: skip
    """Measure ``x`` into ``slot`` of the table (active half; only when the sampling flag is set,
    with ``use_flag``): one more call, counts added, moments merged, the NaN/Inf call range widened."""
    plan = CastPlan(names=tuple(str(i) for i in range(len(under))), tiny=tiny, under=tuple(under), over=tuple(over))
    table = _Table(counts, moments, nfcalls, control, len(under))
    torch_ops.merge_into(table, slot, x, plan, control[CALLS] - 1, use_flag=use_flag)


if available:
    merge_stats: Any = torch.library.custom_op(
        "torchwatch::merge_stats", mutates_args=("counts", "moments", "nfcalls", "control")
    )(_merge_stats)

    @merge_stats.register_fake
    def _merge_stats_fake(
        counts: torch.Tensor, moments: torch.Tensor, nfcalls: torch.Tensor, control: torch.Tensor, x: torch.Tensor,
        slot: int, tiny: float, under: list[float], over: list[float], use_flag: bool,
    ) -> None:  # fmt: skip
        return None
else:  # pragma: no cover - torch < 2.4
    merge_stats = None


def merge_into(table: Any, slot: int, x: torch.Tensor, plan: CastPlan, call: Any, *, use_flag: bool) -> None:
    """Same arguments and effect as :func:`torch_ops.merge_into` (``call`` is read from the
    table's device counter), as one node of the graph being compiled."""
    merge_stats(
        table.counts, table.moments, table.nfcalls, table.control, x, slot, plan.tiny, list(plan.under),
        list(plan.over), use_flag,
    )  # fmt: skip
