"""A multivariate EWMA of window means: evidence that adds up across windows.

A small shift that persists (a quarter of the traffic from another source) moves every window's
whitened mean a little in the *same* direction. Tested one window at a time it hides in the
noise; averaged over many windows it does not. With ``v_t`` a window's standardised mean vector
(``d`` dimensions, ``N(0, I)`` when nothing drifted) the detector keeps

    e_t = (1 - λ) e_{t-1} + λ v_t,        T_t = (2 - λ) / λ · |e_t|²

and alarms while ``T_t >= h`` (Lowry et al., 1992). ``T`` is ``χ²_d`` in the steady state under
no drift, and its noncentrality under a persistent shift ``δ`` per window is ``(2 - λ)/λ · |δ|²``:
about ``2/λ`` windows' worth of evidence. It never restarts: during drift it stays high, so it is
the score a chart should show, and an episode lasts while it does.

**The ARL is computed, not simulated.** Driven by isotropic Gaussian ``v``, ``|e_t|²`` is itself a
Markov chain (rotational symmetry): given ``s = |e|²``, the next value is ``λ²`` times a noncentral
``χ²_d`` with noncentrality ``((1 - λ)/λ)² s`` (Runger & Prabhu, 1996). Discretised into cells,
the expected time to ``T >= h`` from ``e = 0`` solves one linear system, as for the CUSUM in
:mod:`.sequential`; any target ARL works, and the tests check the chain against simulation.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .sequential import solve_threshold

DEFAULT_LAMBDA = 0.1
_CELLS = 300
MAX_ARL = 1e12


def _chi2_cdf_table(d: int, x: np.ndarray, terms: int) -> np.ndarray:
    """``P(χ²_{d + 2j} <= x)`` for ``j < terms`` (rows) and each ``x`` (columns)."""
    a = torch.as_tensor(d / 2.0 + np.arange(terms, dtype=np.float64))[:, None]
    half = torch.as_tensor(np.maximum(x, 0.0) / 2.0, dtype=torch.float64)[None, :]
    return torch.special.gammainc(a.expand(-1, half.shape[1]), half.expand(terms, -1)).numpy()


def _poisson(mean: np.ndarray, terms: int) -> np.ndarray:
    """Poisson pmf for each mean (rows) at ``0 .. terms - 1`` (columns)."""
    j = np.arange(terms, dtype=np.float64)[None, :]
    mu = np.asarray(mean, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.where(mu > 0, j * np.log(mu), np.where(j == 0, 0.0, -np.inf))
    return np.exp(log - mu - torch.special.gammaln(torch.as_tensor(j + 1.0)).numpy())


def arl(h: float, d: float, lam: float, cells: int = _CELLS) -> float:
    """Expected windows until ``T >= h`` from ``e = 0``, for ``v ~ N(0, I_d)`` i.i.d."""
    if h <= 0:
        return 1.0
    top = h * lam / (2.0 - lam)  # the threshold on s = |e|^2
    w = top / cells
    # state 0: s = 0 (the start); state i >= 1: s in ((i-1)w, iw], represented by its midpoint
    starts = np.concatenate(([0.0], (np.arange(1, cells + 1) - 0.5) * w))
    edges = np.arange(cells + 1) * w
    nc_half = ((1.0 - lam) / lam) ** 2 * starts / 2.0  # Poisson mean of the noncentral mixture
    terms = int(nc_half.max() + 10.0 * math.sqrt(nc_half.max() + 1.0) + 40)
    table = _chi2_cdf_table(d, edges / lam**2, terms)  # [terms, edges]
    upper = _poisson(nc_half, terms) @ table  # P(s' <= edges[j] | state i)
    trans = np.empty((cells + 1, cells + 1))
    trans[:, 0] = 0.0  # s' = 0 has probability 0 once v is continuous
    trans[:, 1:] = np.diff(upper, axis=1)
    trans[:, 1] += upper[:, 0]  # (edges[0] = 0: nothing below it)
    try:
        times = np.linalg.solve(np.eye(cells + 1) - trans, np.ones(cells + 1))
    except np.linalg.LinAlgError:
        return math.inf
    value = float(times[0])
    if not math.isfinite(value) or value < 1 or value > MAX_ARL:
        return math.inf
    return value


@functools.lru_cache(maxsize=256)  # attach asks for the same few (a linear solve each)
def threshold_for(target_arl: float, d: float, lam: float) -> float:
    """The smallest ``h`` whose in-control ARL reaches ``target_arl`` (``d`` may be fractional:
    the chain only reads ``d/2`` as a gamma shape, which is how :mod:`.guarantee` uses it)."""
    if target_arl <= 1:
        return 0.0
    lo, hi = float(d), float(d) + 10.0
    while arl(hi, d, lam) < target_arl:
        lo, hi = hi, hi + 2.0 * (hi - lo + 10.0)
        if hi > 1e5:
            raise ValueError(f"no MEWMA threshold reaches an ARL of {target_arl:g} windows")
    if arl(lo, d, lam) >= target_arl:
        lo = 0.0
    return solve_threshold(lambda h: arl(h, d, lam), target_arl, lo, hi)


class Mewma:
    """One detector's state: feed it standardised window means.

    A window's vector is capped at a length whose square ``χ²_d`` exceeds with probability below
    ``1e-12`` (``d + 12·sqrt(2d) + 30``): so rarely that the computed ARL is unchanged, while a gross window
    (a ×255 preprocessing bug; the per-window CUSUM's business) no longer keeps the average — and
    the drift episode — up for a hundred windows after the stream is back.
    """

    def __init__(self, d: int, lam: float, threshold: float) -> None:
        self.lam = lam
        self.threshold = threshold
        self.state = np.zeros(d)
        self.cap = math.sqrt(d + 12.0 * math.sqrt(2.0 * d) + 30.0)

    @property
    def value(self) -> float:
        return (2.0 - self.lam) / self.lam * float(self.state @ self.state)

    def update(self, v: np.ndarray) -> float:
        """Add one window's standardised mean; returns ``T``."""
        v = np.asarray(v, dtype=np.float64)
        norm = float(np.sqrt(v @ v))
        if norm > self.cap:
            v = v * (self.cap / norm)
        self.state = (1.0 - self.lam) * self.state + self.lam * v
        return self.value

    def reset(self) -> None:
        self.state = np.zeros_like(self.state)
