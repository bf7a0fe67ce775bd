"""Which call in a GPU flush synchronises, if any (run by gpu_check.sh; prints a traceback)."""

from __future__ import annotations

import traceback

import torch

from torchwatch._casts import cast_plan
from torchwatch._table import DeviceTable
from torchwatch.kernels import triton_stats
from torchwatch.stats import DEFAULT_CAST_DTYPES

table = DeviceTable(torch.device("cuda"), len(DEFAULT_CAST_DTYPES), 8)
plan = cast_plan(torch.float16, DEFAULT_CAST_DTYPES)
table.scratch = triton_stats.Workspace(table, [plan])
table.slot("x")
x = torch.randn(1000, device="cuda", dtype=torch.float16)
for step in range(4):
    triton_stats.merge_into(table, 0, x, plan, step, use_flag=False)
    if step >= 1:
        torch.cuda.set_sync_debug_mode("error")
    try:
        _, handle = table.flip()
    except RuntimeError:
        traceback.print_exc()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    read = table.read(handle)
    print("flip", step, "ok; calls in window:", read.stats["x"][0])
