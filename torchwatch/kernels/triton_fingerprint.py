"""The weight fingerprint as one Triton launch over every chunk of every tensor on a device.

The launch reads a table with one row per chunk — ``(address, words, first position)`` — so a
model of hundreds of tensors costs one launch, not hundreds. Each program sums its chunk's mixed
words (arithmetic in ``fingerprint_ops``, whose torch twin must agree bit for bit) and writes one
int64. Tested on CPU tensors with ``TRITON_INTERPRET=1``; compiled for sm_80/sm_90 in CI.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fingerprint_ops import M1, M2, G

BLOCK = 2048
NUM_WARPS = 8
# A @triton.jit function may read only globals that are tl.constexpr.
_G = tl.constexpr(G)
_M1 = tl.constexpr(M1)
_M2 = tl.constexpr(M2)


@triton.jit
def _fingerprint_kernel(table_ptr, out_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    address = tl.load(table_ptr + 3 * c)
    n = tl.load(table_ptr + 3 * c + 1)
    p0 = tl.load(table_ptr + 3 * c + 2).to(tl.uint64, bitcast=True)
    base = address.to(tl.pointer_type(tl.int64))
    lanes = tl.arange(0, BLOCK)
    # key of word i is (p0 + i + 1) * G: per-lane part once, one scalar product per tile
    lane_keys = (lanes.to(tl.uint64) + 1) * _G
    acc = tl.zeros([BLOCK], dtype=tl.uint64)
    for start in range(0, CHUNK, BLOCK):
        offs = start + lanes
        live = offs < n
        w = tl.load(base + offs, mask=live, other=0).to(tl.uint64, bitcast=True)
        x = (w ^ (lane_keys + (p0 + start) * _G)) * _M1
        x = x ^ (x >> 31)
        x = x * _M2
        x = x ^ (x >> 29)
        acc += tl.where(live, x, 0)
    tl.store(out_ptr + c, tl.sum(acc, axis=0).to(tl.int64, bitcast=True))


def chunk_sums(
    table: torch.Tensor, out: torch.Tensor, chunk_words: int, *, block: int = BLOCK, num_warps: int = NUM_WARPS
) -> None:
    """Fill ``out[c]`` with the sum of chunk ``c`` described by ``table[c]`` (both int64, on device)."""
    if table.shape[0] == 0:
        return
    _fingerprint_kernel[(table.shape[0],)](table, out, CHUNK=chunk_words, BLOCK=block, num_warps=num_warps)
