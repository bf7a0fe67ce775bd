"""Compile every variant of the fused stats kernel and the fingerprint kernel for sm_80 and
sm_90 without a GPU.

Run by test_triton_kernel.py in a process where ``TRITON_INTERPRET`` is unset; prints
``compiled N`` (stats variants) and ``fingerprint N``, and exits 0, or raises Triton's compilation error.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torchwatch.kernels import triton_fingerprint, triton_stats


def main() -> None:
    done = 0
    for capability in (80, 90):
        for _, source in triton_stats.variants():
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
