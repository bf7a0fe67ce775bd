"""Statistics of interleaved benchmark rounds: median overheads and their 95% bootstrap intervals.

A *round* times the plain model and each configuration once, back to back (``overhead.py``); a
configuration's overhead in a round is its time over that round's plain time, minus 1, and the
reported overhead is the median over rounds. Two configurations timed in the same rounds (the
one-read floor and torchwatch) share each round's plain forward, so a round is resampled whole:
``(plain, floor, watched)`` seconds.

Rounds from several processes are pooled with a two-level bootstrap (processes drawn with
replacement, then rounds within each drawn process), so that what differs between processes
(where the allocator put each model copy, the machine's state when the process ran) widens the
interval instead of hiding in it. With one process it is the plain bootstrap over rounds.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence

BOOTSTRAPS = 2000  # resamples: the 2.5% and 97.5% points are the 50th and 1950th
MIN_ROUNDS = 20  # fewer rounds than this: no interval (a bootstrap of a handful says little)

Round = tuple[float, float, float]  # plain, floor, watched (seconds or any one unit)


def median_overhead(plain: Sequence[float], instrumented: Sequence[float]) -> float:
    """Median over rounds of ``instrumented / plain``, minus 1."""
    return statistics.median(c / p for p, c in zip(plain, instrumented, strict=True)) - 1


def x_floor(rounds: Sequence[Round]) -> float:
    """torchwatch's median overhead over the floor's (``nan`` if the floor's is not positive)."""
    plain, floor, watched = zip(*rounds, strict=True)
    f = median_overhead(plain, floor)
    return median_overhead(plain, watched) / f if f > 0 else float("nan")


def overhead_interval(groups: Sequence[Sequence[tuple[float, float]]]) -> tuple[float, float] | None:
    """95% interval of the median overhead of ``(plain, instrumented)`` rounds, one sequence per
    process; None with fewer than :data:`MIN_ROUNDS` rounds in all."""
    if sum(map(len, groups)) < MIN_ROUNDS:
        return None
    return _interval(groups, lambda pairs: median_overhead(*zip(*pairs, strict=True)))


def x_floor_interval(groups: Sequence[Sequence[Round]]) -> tuple[float, float] | None:
    """95% interval of :func:`x_floor`, rounds resampled whole (see the module docstring). A
    resample whose floor overhead is not positive counts as an unbounded ratio (``inf``)."""
    if sum(map(len, groups)) < MIN_ROUNDS:
        return None

    def ratio(rounds: list[Round]) -> float:
        value = x_floor(rounds)
        return float("inf") if value != value else value

    return _interval(groups, ratio)


def _interval(groups: Sequence[Sequence], statistic: Callable[[list], float]) -> tuple[float, float]:
    groups = [group for group in groups if group]
    rng = random.Random(0)  # the same data gives the same interval
    values = []
    for _ in range(BOOTSTRAPS):
        drawn = rng.choices(groups, k=len(groups)) if len(groups) > 1 else groups
        sample = [item for group in drawn for item in rng.choices(group, k=len(group))]
        values.append(statistic(sample))
    values.sort()
    return values[int(0.025 * BOOTSTRAPS)], values[int(0.975 * BOOTSTRAPS) - 1]
