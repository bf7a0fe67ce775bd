"""CUDA: the hot path never synchronises, and GPU statistics equal the CPU ones.

Skipped without a GPU; every code path here has a CPU twin in test_watch.py
(``_device_path=True`` runs the same torch-ops measurement and device accumulators on CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from _models import Inject, mlp
from conftest import cuda

import torchwatch as tw

pytestmark = cuda


def test_an_instrumented_forward_never_synchronises():
    model = mlp(inject=Inject(at=(1,))).cuda()
    x = torch.randn(8, 16, device="cuda")
    with tw.attach(model, on_nonfinite="warn", flush_every=10**9) as watch:
        model(x)  # first call allocates accumulators and learns cast plans
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with pytest.warns(tw.TorchwatchWarning, match="NaN first appeared in '1' on call 1"):
            snap = watch.snapshot()  # reading happens here, off the hot path
    assert snap["0"].calls == 4
    assert snap.nonfinite["6"].origin == "1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_statistics_equal_cpu_statistics(dtype):
    x = (torch.randn(4097, 33) * 300).to(dtype)
    x[0, 0] = math.nan
    x[1, 1] = math.inf
    cpu, gpu = tw.tensor_stats(x), tw.tensor_stats(x.cuda())
    a, b = cpu.to_dict(), gpu.to_dict()
    for key in ("mean", "std"):
        assert math.isclose(a.pop(key), b.pop(key), rel_tol=1e-6)
    assert a == b


def test_raise_policy_on_gpu():
    model = mlp(inject=Inject(at=(0,))).cuda()
    with tw.attach(model, on_nonfinite="raise"), pytest.raises(tw.NonFiniteError, match="in '1' on call 0"):
        model(torch.randn(2, 16, device="cuda"))
