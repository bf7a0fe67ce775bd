"""Compile every variant of the fused stats kernel and the fingerprint kernel for sm_80 and
sm_90 without a GPU.

Run by test_triton_kernel.py in a process where ``TRITON_INTERPRET`` is unset; prints
``compiled N`` (stats variants) and ``fingerprint N``, and exits 0, or raises Triton's compilation error.
"""

from __future__ import annotations

import inspect
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torchwatch.kernels import triton_fingerprint, triton_stats

POINTERS = {"part_ptr": "*fp64", "ticket_ptr": "*i32", "counts_ptr": "*i64", "moments_ptr": "*fp64",
            "nfcalls_ptr": "*i64", "control_ptr": "*i64", "under_ptr": "*i32", "over_ptr": "*i32"}  # fmt: skip


def main() -> None:
    names = list(inspect.signature(triton_stats._stats_kernel.fn).parameters)
    assert {n for n in names if n.endswith("_ptr")} == {"x_ptr", *POINTERS}, names
    done = 0
    variants = itertools.product(
        (80, 90), (("*fp32", False), ("*fp16", False), ("*i16", True)), (False, True), (False, True)
    )
    for capability, (x_type, bf16), use_flag, from_device in variants:
        consts = {"K": 4, "UNDER_LIVE": 0b1011, "OVER_LIVE": 0b0111, "IS_BF16": bf16, "USE_FLAG": use_flag, "CALL_FROM_DEVICE": from_device,
                  "BLOCK": triton_stats.BLOCK, "P_POW2": triton_stats.MAX_PROGRAMS}  # fmt: skip
        signature = {
            n: "constexpr" if n in consts else (x_type if n == "x_ptr" else POINTERS.get(n, "i32")) for n in names
        }
        source = ASTSource(
            fn=triton_stats._stats_kernel,
            signature=signature,
            constexprs={(names.index(n),): v for n, v in consts.items()},
        )
        target = GPUTarget("cuda", capability, 32)
        compiled = triton.compile(source, target=target, options={"num_warps": triton_stats.NUM_WARPS})
        assert compiled.asm["cubin"]
        done += 1
    print("compiled", done)
    done = 0
    for capability in (80, 90):
        source = ASTSource(
            fn=triton_fingerprint._fingerprint_kernel,
            signature={"table_ptr": "*i64", "out_ptr": "*i64", "CHUNK": "constexpr", "BLOCK": "constexpr"},
            constexprs={(2,): 1 << 17, (3,): triton_fingerprint.BLOCK},
        )
        compiled = triton.compile(
            source, target=GPUTarget("cuda", capability, 32), options={"num_warps": triton_fingerprint.NUM_WARPS}
        )
        assert compiled.asm["cubin"]
        done += 1
    print("fingerprint", done)


if __name__ == "__main__":
    main()
