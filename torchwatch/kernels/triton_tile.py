"""The pieces of the fused statistics kernels (``triton_stats``): one program's share of a tensor.

``measure_share`` is the whole of what a program does — a fast pass, the gate and the full
re-read, the masked tail, its partial row, and, for the last program of a tensor to finish, the
fold of every partial into the tensor's slot. The one-tensor kernel calls it with its program
id; the grouped kernel with a program id and program count read from a descriptor row, so a
whole root call's small outputs share one launch and one code path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._table import ACTIVE, CALL_NONFINITE, N_FIXED

# partial row: n, mean, m2, min, max, nan, posinf, neginf, zeros, subnormal, under[K], over[K]
N_PART_FIXED = 10
# A @triton.jit function may read only globals that are tl.constexpr (the interpreter does not check).
_N_PART = tl.constexpr(N_PART_FIXED)
_N_FIXED = tl.constexpr(N_FIXED)
_ACTIVE = tl.constexpr(ACTIVE)
_CALL_NONFINITE = tl.constexpr(CALL_NONFINITE)


@triton.jit
def chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def load_tile(ptrs, inside, IS_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One tile as float32 (bfloat16 widened by hand: exact for subnormals on every backend)."""
    if IS_BF16:
        if MASKED:  # noqa: SIM108 - constexpr branches, resolved at compile time
            raw = tl.load(ptrs, mask=inside, other=0)
        else:
            raw = tl.load(ptrs)
        v = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        if MASKED:  # noqa: SIM108
            v = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
        else:
            v = tl.load(ptrs).to(tl.float32)
    return v


@triton.jit
def at_most(acc, ab, t1, J: tl.constexpr, LIVE: tl.constexpr):
    """Subtract from ``acc`` this tile's lanes with |x| < t1 (as bits), if column J is counted.

    ``(ab - t1) >> 31`` is -1 exactly where ab < t1 (no overflow: both lie in [0, 2**31)): one
    subtraction and one shift-add per lane, where a compare-and-increment costs three.
    """
    if (LIVE >> J) & 1:
        acc += (ab - t1) >> 31
    return acc


@triton.jit
def above(acc, fin, ab, t, J: tl.constexpr, LIVE: tl.constexpr):
    """Add this tile's finite lanes with |x| > t (as bits) to ``acc``, if column J is counted at all."""
    if (LIVE >> J) & 1:
        acc += (fin & (ab > t)).to(tl.int32)
    return acc


@triton.jit
def under_total(u, zeros, J: tl.constexpr, LIVE: tl.constexpr):
    """Column J's underflow count: lanes with |x| <= its threshold, less the zeros (0 if not counted)."""
    total = 0.0
    if (LIVE >> J) & 1:
        total = (-tl.sum(u, axis=0) - zeros).to(tl.float64)
    return total


@triton.jit
def threshold(t_ptr, J: tl.constexpr, LIVE: tl.constexpr, PLUS: tl.constexpr):
    """Threshold J as int32 bits plus PLUS, loaded once before the loops (0 where not counted)."""
    if (LIVE >> J) & 1:  # noqa: SIM108 - a constexpr branch
        t = tl.load(t_ptr + J) + PLUS
    else:
        t = 0
    return t


@triton.jit
def fresh(BLOCK: tl.constexpr):
    """Empty accumulators for common: zeros, small, under x4 (negated counts), lo, hi, s1, s2."""
    zero = tl.zeros((BLOCK,), tl.int32)
    lo = tl.full((BLOCK,), float("inf"), tl.float32)
    hi = tl.full((BLOCK,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float64)
    return zero, zero, zero, zero, zero, zero, lo, hi, s, s


@triton.jit
def common(v, ab, keep, shift, tiny_bits, c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2,
            t_u0, t_u1, t_u2, t_u3, UNDER_LIVE: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """What every tile adds: minus the zeros, minus the lanes with |x| < tiny and with |x| <=
    each under-threshold (zeros included there; the totals are negated and the zeros subtracted
    once at the end), min/max and the shifted moments over the lanes kept."""
    if MASKED:
        ab = tl.where(keep, ab, 0x7FFFFFFF)  # a lane not kept is below no threshold
        lo = tl.minimum(lo, tl.where(keep, v, float("inf")))
        hi = tl.maximum(hi, tl.where(keep, v, -float("inf")))
        d = tl.where(keep, v.to(tl.float64) - shift, 0.0)
    else:
        lo = tl.minimum(lo, v)
        hi = tl.maximum(hi, v)
        d = v.to(tl.float64) - shift
    c_zero += (ab - 1) >> 31
    c_small += (ab - tiny_bits) >> 31
    u0 = at_most(u0, ab, t_u0, 0, UNDER_LIVE)
    u1 = at_most(u1, ab, t_u1, 1, UNDER_LIVE)
    u2 = at_most(u2, ab, t_u2, 2, UNDER_LIVE)
    u3 = at_most(u3, ab, t_u3, 3, UNDER_LIVE)
    s1 += d
    s2 += d * d
    return c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2


@triton.jit
def rare(v, ab, inside, c_nan, c_pinf, c_ninf, o0, o1, o2, o3, t_o0, t_o1, t_o2, t_o3, OVER_LIVE: tl.constexpr):
    """The counts a finite tile below every over-threshold never moves: NaN, +Inf, -Inf, overflow."""
    bits = v.to(tl.int32, bitcast=True)
    fin = ab < 0x7F800000
    c_nan += (inside & (ab > 0x7F800000)).to(tl.int32)
    c_pinf += (inside & (bits == 0x7F800000)).to(tl.int32)
    c_ninf += (inside & (bits == -8388608)).to(tl.int32)  # 0xFF800000 as int32
    fin = fin & inside
    o0 = above(o0, fin, ab, t_o0, 0, OVER_LIVE)
    o1 = above(o1, fin, ab, t_o1, 1, OVER_LIVE)
    o2 = above(o2, fin, ab, t_o2, 2, OVER_LIVE)
    o3 = above(o3, fin, ab, t_o3, 3, OVER_LIVE)
    return fin, c_nan, c_pinf, c_ninf, o0, o1, o2, o3


@triton.jit
def measure_share(
    x_ptr, n_elements, pid, nprog,
    part_ptr, ticket_ptr,
    counts_ptr, moments_ptr, nfcalls_ptr, control_ptr,
    slot, capacity, call,
    under_ptr, over_ptr, tiny_bits, gate,
    K: tl.constexpr, UNDER_LIVE: tl.constexpr, OVER_LIVE: tl.constexpr, IS_BF16: tl.constexpr,
    CALL_FROM_DEVICE: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr, P_POW2: tl.constexpr,
):  # fmt: skip
    """Program ``pid`` of ``nprog`` measuring one tensor: its share, then (last to finish) the slot.

    ``part_ptr``/``ticket_ptr``: the slot's partial rows (P_POW2 of them) and ticket counter.
    """
    npart = _N_PART + 2 * K
    inf = float("inf")
    lanes = tl.arange(0, BLOCK)
    group = BLOCK * UNROLL
    full = n_elements // group  # groups of UNROLL whole tiles; the rest is the tail
    mine = tl.maximum(full - pid + nprog - 1, 0) // nprog  # groups pid, pid + nprog, ...
    t_u0 = threshold(under_ptr, 0, UNDER_LIVE, 1)
    t_u1 = threshold(under_ptr, 1, UNDER_LIVE, 1)
    t_u2 = threshold(under_ptr, 2, UNDER_LIVE, 1)
    t_u3 = threshold(under_ptr, 3, UNDER_LIVE, 1)
    t_o0 = threshold(over_ptr, 0, OVER_LIVE, 0)
    t_o1 = threshold(over_ptr, 1, OVER_LIVE, 0)
    t_o2 = threshold(over_ptr, 2, OVER_LIVE, 0)
    t_o3 = threshold(over_ptr, 3, OVER_LIVE, 0)
    # Moments are taken of x - shift, shift the finite mean of this program's first tile, so
    # the variance does not cancel however large the mean is.
    first = pid.to(tl.int64) * group + lanes
    v0 = load_tile(x_ptr + first, first < n_elements, IS_BF16, True)
    fin0 = (first < n_elements) & ((v0.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000)
    shift = tl.sum(tl.where(fin0, v0.to(tl.float64), 0.0), axis=0) / tl.maximum(
        tl.sum(fin0.to(tl.float64), axis=0), 1.0
    )
    c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = fresh(BLOCK)
    # The fast pass: whole tiles, no masks, and only the counts a finite value below every
    # over-threshold can move. NaN reaches s1, an infinity hi/lo or s1, a value over a
    # threshold hi/lo: so the gate below sees every tile the fast pass could get wrong.
    ptrs = x_ptr + pid.to(tl.int64) * group + lanes
    step = nprog.to(tl.int64) * group
    for _g in range(0, mine):
        for u in tl.static_range(UNROLL):
            v = load_tile(ptrs + u * BLOCK, lanes < BLOCK, IS_BF16, False)
            ab = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = common(
                v, ab, ab == ab, shift, tiny_bits, c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2,
                t_u0, t_u1, t_u2, t_u3, UNDER_LIVE, False,
            )  # fmt: skip
        ptrs += step
    zero = tl.zeros((BLOCK,), tl.int32)
    c_nan, c_pinf, c_ninf, o0, o1, o2, o3 = zero, zero, zero, zero, zero, zero, zero
    total = tl.sum(s1, axis=0) + tl.sum(s2, axis=0)
    widest = tl.maximum(tl.max(hi, axis=0), -tl.min(lo, axis=0))
    if (total != total) | (widest > gate):  # rare: read this program's share again, in full
        c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = fresh(BLOCK)
        ptrs = x_ptr + pid.to(tl.int64) * group + lanes
        for i in range(0, mine * UNROLL):
            v = load_tile(ptrs, lanes < BLOCK, IS_BF16, False)
            ab = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            fin, c_nan, c_pinf, c_ninf, o0, o1, o2, o3 = rare(
                v, ab, lanes < BLOCK, c_nan, c_pinf, c_ninf, o0, o1, o2, o3, t_o0, t_o1, t_o2, t_o3, OVER_LIVE
            )
            c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = common(
                v, ab, fin, shift, tiny_bits, c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2,
                t_u0, t_u1, t_u2, t_u3, UNDER_LIVE, True,
            )  # fmt: skip
            # the next tile of this program's share: UNROLL tiles in a group, then the next group
            ptrs += tl.where((i + 1) % UNROLL == 0, step - (UNROLL - 1) * BLOCK, BLOCK)
    # The tail (fewer than UNROLL whole tiles, then a partial one) belongs to the program that
    # would have taken the next group; it is read in full, with masks.
    if pid == full % nprog:
        for u in range(0, UNROLL):
            offs = full.to(tl.int64) * group + u * BLOCK + lanes
            inside = offs < n_elements
            v = load_tile(x_ptr + offs, inside, IS_BF16, True)
            ab = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            fin, c_nan, c_pinf, c_ninf, o0, o1, o2, o3 = rare(
                v, ab, inside, c_nan, c_pinf, c_ninf, o0, o1, o2, o3, t_o0, t_o1, t_o2, t_o3, OVER_LIVE
            )
            c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = common(
                v, ab, fin, shift, tiny_bits, c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2,
                t_u0, t_u1, t_u2, t_u3, UNDER_LIVE, True,
            )  # fmt: skip
        n_in = mine * group + tl.minimum(n_elements - full * group, group)
    else:
        n_in = mine * group

    zeros = -tl.sum(c_zero, axis=0)
    c_nonfinite = tl.sum(c_nan + c_pinf + c_ninf, axis=0)
    n = (n_in - c_nonfinite).to(tl.float64)
    sd = tl.sum(s1, axis=0)
    mean = shift + sd / tl.maximum(n, 1.0)
    m2 = tl.maximum(tl.sum(s2, axis=0) - sd * sd / tl.maximum(n, 1.0), 0.0)
    row = part_ptr + pid * npart
    tl.store(row + 0, n)
    tl.store(row + 1, tl.where(n > 0, mean, 0.0))
    tl.store(row + 2, m2)
    tl.store(row + 3, tl.min(lo, axis=0).to(tl.float64))
    tl.store(row + 4, tl.max(hi, axis=0).to(tl.float64))
    tl.store(row + 5, tl.sum(c_nan, axis=0).to(tl.float64))
    tl.store(row + 6, tl.sum(c_pinf, axis=0).to(tl.float64))
    tl.store(row + 7, tl.sum(c_ninf, axis=0).to(tl.float64))
    tl.store(row + 8, zeros.to(tl.float64))
    tl.store(row + 9, (-tl.sum(c_small, axis=0) - zeros).to(tl.float64))
    under = row + _N_PART
    over = row + _N_PART + K
    tl.store(under + 0, under_total(u0, zeros, 0, UNDER_LIVE))
    tl.store(over + 0, tl.sum(o0, axis=0).to(tl.float64))
    if K > 1:
        tl.store(under + 1, under_total(u1, zeros, 1, UNDER_LIVE))
        tl.store(over + 1, tl.sum(o1, axis=0).to(tl.float64))
    if K > 2:
        tl.store(under + 2, under_total(u2, zeros, 2, UNDER_LIVE))
        tl.store(over + 2, tl.sum(o2, axis=0).to(tl.float64))
    if K > 3:
        tl.store(under + 3, under_total(u3, zeros, 3, UNDER_LIVE))
        tl.store(over + 3, tl.sum(o3, axis=0).to(tl.float64))

    # the last program to finish folds every partial into the slot
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == nprog - 1:
        rows = tl.arange(0, P_POW2)
        live = rows < nprog
        base = part_ptr + rows * npart
        p_n = tl.load(base + 0, mask=live, other=0.0)
        p_mean = tl.load(base + 1, mask=live, other=0.0)
        p_m2 = tl.load(base + 2, mask=live, other=0.0)
        n_b, mean_b, m2_b = tl.reduce((p_n, p_mean, p_m2), 0, chan)
        lo_b = tl.min(tl.load(base + 3, mask=live, other=inf), axis=0)
        hi_b = tl.max(tl.load(base + 4, mask=live, other=-inf), axis=0)

        active = tl.load(control_ptr + _ACTIVE)
        crow = counts_ptr + (active * capacity + slot) * (_N_FIXED + 2 * K)
        mrow = moments_ptr + (active * capacity + slot) * 4
        frow = nfcalls_ptr + (active * capacity + slot) * 2
        nonfinite = tl.zeros((), tl.int64)
        tl.store(crow + 0, tl.load(crow + 0) + 1)  # calls
        n_a = tl.load(crow + 1).to(tl.float64)
        tl.store(crow + 1, tl.load(crow + 1) + n_b.to(tl.int64))
        for j in tl.static_range(5):  # nan, posinf, neginf, zeros, subnormal
            c = tl.sum(tl.load(base + 5 + j, mask=live, other=0.0), axis=0).to(tl.int64)
            tl.store(crow + 2 + j, tl.load(crow + 2 + j) + c)
            if j < 3:
                nonfinite += c
        for k in tl.static_range(2 * K):
            c = tl.sum(tl.load(base + _N_PART + k, mask=live, other=0.0), axis=0).to(tl.int64)
            tl.store(crow + _N_FIXED + k, tl.load(crow + _N_FIXED + k) + c)
        mean_a = tl.load(mrow + 0)
        m2_a = tl.load(mrow + 1)
        _, mean_n, m2_n = chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
        tl.store(mrow + 0, mean_n)
        tl.store(mrow + 1, m2_n)
        tl.store(mrow + 2, tl.minimum(tl.load(mrow + 2), lo_b))
        tl.store(mrow + 3, tl.maximum(tl.load(mrow + 3), hi_b))
        if nonfinite > 0:
            if CALL_FROM_DEVICE:  # noqa: SIM108 - a constexpr branch, resolved at compile time
                call_index = tl.load(control_ptr + 0) - 1
            else:
                call_index = call
            tl.store(frow + 0, tl.minimum(tl.load(frow + 0), call_index))
            tl.store(frow + 1, tl.maximum(tl.load(frow + 1), call_index))
            tl.atomic_add(control_ptr + _CALL_NONFINITE, nonfinite)
        tl.atomic_xchg(ticket_ptr, 0)
