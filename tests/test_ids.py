"""The integer frequency sketch (token ids, categorical inputs, predicted classes) against a
plain Python oracle, on each of its paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _oracle import id_counts
from hypothesis import given, settings
from hypothesis import strategies as st

import torchwatch as tw
from torchwatch.monitors.ids import RING, IdAccumulator


def _sketch(values: np.ndarray, exact: int = 64, hashed: int = 32, path: str | None = None) -> tw.IdStats:
    acc = IdAccumulator(torch.device("cpu"), exact, hashed, path=path)
    acc.add(torch.from_numpy(values))
    return tw.IdStats.from_state(acc.take().wait()[0].numpy(), exact, hashed)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(-3, 80), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=300))
def test_id_sketch_counts_match_a_python_oracle(values):
    """Both paths: the C pass and torch ops (the device path, and the CPU path without the extension)."""
    v = np.array(values, dtype=np.int64)
    for path in ("c", "torch"):
        s = _sketch(v, path=path)
        assert s.count == len(v) and s.min == v.min() and s.max == v.max()
        np.testing.assert_array_equal(s.counts, id_counts(v, 64, 32))
        assert s.top1_fraction == pytest.approx(id_counts(v, 64, 32).max() / len(v))


def test_id_sketch_top_values_distinct_estimate_and_merge():
    rng = np.random.default_rng(0)
    v = np.concatenate([np.zeros(500, dtype=np.int64), rng.integers(100, 30000, 1500), np.full(300, 5000)])
    s = _sketch(rng.permutation(v), exact=1024, hashed=1024)
    top = s.top(3)
    assert top[0] == (0, 500, True)  # padding id, counted exactly
    assert top[1][0] in (5000, None) and top[1][1] >= 300 and top[1][2] is False  # hashed: an upper bound
    true_distinct = len(np.unique(v))
    assert abs(s.distinct - true_distinct) / true_distinct < 0.1
    a, b = _sketch(v[:900], 1024, 1024), _sketch(v[900:], 1024, 1024)
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.counts, _sketch(v, 1024, 1024).counts)
    assert merged.count == len(v) and merged.min == v.min() and merged.max == v.max()


@pytest.mark.parametrize("path", ["c", "torch"])
def test_id_sketch_ring_names_recent_values(path):
    acc = IdAccumulator(torch.device("cpu"), 4, 8, path=path)
    for i in range(40):
        acc.add(torch.full((3,), 1000 + i))
    s = tw.IdStats.from_state(acc.take().wait()[0].numpy(), 4, 8)
    assert len(s.recent) == min(40 * 3, RING) and set(s.recent) == set(range(1000, 1040))


# ---- input monitors through a watch -------------------------------------------------------------
