"""Alert rules: turn each flush interval's statistics into alerts a person can trust.

Rules run on the flush worker thread, never in a forward. Each receives one :class:`Interval` per
cohort (the statistics of the root calls since the previous flush) and returns alerts. Built in:

* ``"nonfinite"`` — any NaN/Inf, with the module where it started (always on; see
  :class:`torchwatch.Alert`), and ``"drift"`` alarms when ``attach(drift=...)`` is used.
* :class:`CastRange` — the fraction of values that would overflow (become inf, or saturate for
  fp8) or underflow (become 0) if cast to a dtype is above a fixed limit.
* :class:`ControlChart` — a statistic leaving its own baseline: abs-max (upward), std or the
  fraction of zeros (dead units) of every module, each on its own CUSUM chart. The baseline (median
  and a robust spread of the transformed statistic) is learned during a warm-up of ``warmup``
  intervals per series — one series per (cohort, module, statistic), so cohorts get baselines of
  their own — and the chart's threshold is computed for a target in-control average run length
  under a Gaussian model of the standardised values (Siegmund's approximation of the CUSUM's ARL:
  instant, so rules never hold up a flush; within 3% of Brook & Evans' Markov chain).

False alarms, stated per model: the default charts share one :class:`Budget` of ``arl`` intervals
between false alarms of all their series together (each series gets ``arl x series``, a union
bound). Interval statistics are not Gaussian (a batch's abs-max depends on which inputs an
interval held), so a chart step is clipped at half the threshold (one outlying interval never
signals alone) and the learned spread covers a minority of far warm-up intervals;
``tests/test_rules.py`` and ``tests/test_alert_budget.py`` measure the rate on clean traffic and
``docs/concepts.md`` gives the figures.

Custom rules are objects with ``evaluate(interval) -> iterable of Alert`` (and a ``name``), or
plain callables with that signature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .. import _validate
from ..errors import ConfigError
from ..records import Warmup
from .charts import DEFAULT_MODEL_ARL, Budget, ControlChart, EdgeChart
from .charts import cusum_threshold as cusum_threshold
from .interval import Interval, Rule
from .interval import rule_name as rule_name
from .interval import trips as trips
from .limits import CastRange, LatencySLO
from .policy import AlertPolicy
from .runner import run_rules as run_rules

__all__ = [
    "AlertPolicy",
    "Budget",
    "CastRange",
    "ControlChart",
    "EdgeChart",
    "Interval",
    "LatencySLO",
    "Rule",
    "Warmup",
    "defaults",
]


def defaults(
    cast_dtypes: Sequence[str] = ("float16", "bfloat16", "float8_e4m3fn"), *, arl: float = DEFAULT_MODEL_ARL
) -> list[Rule]:
    """The rules ``attach()`` uses when given none.

    * overflow on a cast to fp16/bf16: any value (``trips``: marks the watch unhealthy);
      to fp8: more than 0.1% of values (fp8's range is small: saturation is routine at a low rate);
    * underflow to 0 on a cast to fp16/bf16: more than 1% of nonzero-able values;
    * abs-max, std and zero fraction leaving their baselines (warm-up 30 intervals, intervals of
      at least 4096 elements per module), inputs' abs-max and std included; an interval is a
      flush, so at ``flush_every=100`` none can alert before 3,000 calls;
    * input channel means, integer-input frequencies and output quality leaving their baselines
      (:class:`EdgeChart`);
    * all these charts share one :class:`Budget`: ``arl`` clean intervals between false alarms of
      the whole model (100,000 by default: at one flush a second, about one a day), however many
      series a model has.
    """
    out: list[Rule] = []
    for name in _validate.strings("rules.defaults()", "cast_dtypes", cast_dtypes, allow_empty=True):
        if name in ("float16", "bfloat16"):
            out.append(CastRange(name, "overflow", 0.0, trips=True))
            out.append(CastRange(name, "underflow", 0.01))
        elif name.startswith("float8"):
            out.append(CastRange(name, "overflow", 1e-3))
    budget = Budget(arl)
    out += [ControlChart(stat, budget=budget) for stat in ("absmax", "std", "zero_fraction")]
    out.append(EdgeChart(budget=budget))
    return out


def warmup(rules: Iterable[Any]) -> Warmup | None:
    """How far the baselines of ``rules`` are learned (rules with a ``warmup_state()`` method, as
    the charts have); None when none has one."""
    states = [r.warmup_state() for r in rules if callable(getattr(r, "warmup_state", None))]
    if not states:
        return None
    return Warmup(sum(s[0] for s in states), sum(s[1] for s in states), max(s[2] for s in states))


def normalize(rules: Iterable[Any] | None, cast_dtypes: Sequence[str]) -> list[Any]:
    """Check a ``rules=`` argument: None means :func:`defaults`; items need ``evaluate`` or a call."""
    if rules is None:
        return defaults(cast_dtypes)
    single = callable(rules) or hasattr(rules, "evaluate")
    if single or isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise ConfigError(f"rules must be a list of rules (tw.rules.* objects or callables), got {rules!r}")
    out = list(rules)
    for r in out:
        if not (isinstance(r, Rule) or callable(r)):
            raise ConfigError(
                f"rules must be Rule objects (with evaluate(interval)) or callables, got {type(r).__name__}"
            )
    return out
