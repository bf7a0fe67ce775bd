"""Per-reference false-alarm guarantees (torchwatch/monitors/drift/guarantee.py): thresholds set so
that a detector fit on *this* reference keeps to its false-alarm share with a stated probability
over the draw of the reference, checked against simulation of the detector on the population."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

import torchwatch as tw
from torchwatch.errors import ConfigError, FormatError
from torchwatch.monitors.drift import guarantee, mewma, sequential
from torchwatch.monitors.drift.online import OnlineDrift
from torchwatch.monitors.drift.statistics import inverse_sqrt

D, WINDOW, LAM = 4, 8, 0.1


def _simulated_arl(offset: np.ndarray, chol: np.ndarray, h: float, streams: int, rng: np.random.Generator) -> float:
    """Mean run length of ``streams`` MEWMAs fed ``v ~ N(offset, chol chol^T)`` until ``T >= h``,
    censored at 10,000 windows (far beyond any target here: a censored mean is only shorter)."""
    e = np.zeros((streams, offset.size))
    runs = np.zeros(streams)
    alive = np.ones(streams, dtype=bool)
    t = 0
    while alive.any() and t < 10_000:
        t += 1
        v = offset + rng.standard_normal((streams, offset.size)) @ chol.T
        e = (1 - LAM) * e + LAM * v
        hit = alive & ((2 - LAM) / LAM * (e * e).sum(1) >= h)
        runs[hit] = t
        alive &= ~hit
    runs[alive] = t
    return float(runs.mean())


def test_a_guarded_accumulating_detector_keeps_its_arl_for_most_references():
    """The oracle is the detector itself, simulated on the population each reference was drawn
    from (Gaussian, known): for each of 30 references of 400 samples, the centre and whitening
    are fit as the library fits them, the live statistic's true distribution follows from the
    population, and its run length is simulated (600 streams: the mean's standard error is about
    ARL/sqrt(600), 4%). Guarded at 0.9, at most 10% of references may fall short of the target;
    with 30 references, 8 or more short ones has probability 0.008 (binomial), so the test allows
    7, counting as short a reference more than 12% below the target (three standard errors). The
    guard must also not be absurd: its 10%-quantile reference runs within 4x the target (the
    approximations it rests on, steady state and a scaled chi-square, are conservative)."""
    rng = np.random.default_rng(0)
    pop_cov = np.diag(np.linspace(0.5, 2.0, D))
    pop_chol = np.linalg.cholesky(pop_cov)
    n_cal, target = 400, 40.0
    kappa = WINDOW / n_cal * (2 - LAM) / LAM
    scale = math.sqrt(WINDOW / (1 + kappa))  # what standardised_means multiplies a window's mean difference by
    arls = []
    for _ in range(30):
        rows = rng.standard_normal((n_cal, D)) @ pop_chol.T
        centre, white = rows.mean(0), inverse_sqrt(rows)
        # the live statistic on clean data: v = scale W (window mean - centre), window mean ~ N(0, Σ/n)
        offset = scale * white @ (0.0 - centre)
        chol = np.linalg.cholesky(white @ pop_cov @ white * scale * scale / WINDOW)
        c, nu = guarantee.mewma_guard(
            rows, 0, lambda pick, rows=rows: inverse_sqrt(rows[pick]), window=WINDOW, scale=scale, lam=LAM,
            level=0.9, rng=rng, refits=100,
        )  # fmt: skip
        arls.append(_simulated_arl(offset, chol, c * mewma.threshold_for(target, nu, LAM), 600, rng))
    arls = np.array(arls)
    assert (arls < 0.88 * target).sum() <= 7, np.sort(arls)
    assert np.quantile(arls, 0.1) < 4 * target, np.sort(arls)


def test_the_guard_covers_the_threshold_each_reference_truly_needs_at_its_level():
    """For 120 references of 150 samples from a known Gaussian population, the statistic's true
    steady moments follow exactly from the population (mean ``tr Σ_v + A|b|²``, variance
    ``2 tr Σ_v² + 4A bᵀΣ_v b``, as the guard models them); the threshold they need (in the guard's
    ranking units, ``c·χ²_ν`` quantile) must lie within the guard for at least 90% of references.
    At level 0.9, 19 or more of 120 short has probability 0.03 (binomial): at most 18. A guard
    blind to the centre's error (or to the whitening's) fails about half of them. And the guard
    must be a quantile, not merely large: at level 0.5 it falls short for half the references
    (41 to 79 of 120: 3.5 binomial standard deviations); a guard that overstates the error passes
    the first check and fails this one."""
    rng = np.random.default_rng(7)
    d, n_cal, amplify = 6, 150, (2 - LAM) / LAM
    pop_cov = np.diag(np.linspace(0.5, 2.0, d))
    pop_chol = np.linalg.cholesky(pop_cov)
    kappa = WINDOW / n_cal * amplify
    scale = math.sqrt(WINDOW / (1 + kappa))
    short, short_median = 0, 0
    for _ in range(120):
        rows = rng.standard_normal((n_cal, d)) @ pop_chol.T
        white = inverse_sqrt(rows)
        b = scale * white @ (0.0 - rows.mean(0))
        sigma = white @ pop_cov @ white * scale * scale / WINDOW
        mean = np.trace(sigma) + amplify * b @ b
        var = 2 * (sigma * sigma).sum() + 4 * amplify * b @ sigma @ b
        c_true, nu_true = guarantee.patnaik(mean, var)
        c, nu = guarantee.mewma_guard(
            rows, 0, lambda pick, rows=rows: inverse_sqrt(rows[pick]), window=WINDOW, scale=scale, lam=LAM,
            level=0.9, rng=rng, refits=100,
        )  # fmt: skip
        need = c_true * guarantee.chi2_quantile(nu_true)
        short += need > c * guarantee.chi2_quantile(nu)
        c, nu = guarantee.mewma_guard(
            rows, 0, lambda pick, rows=rows: inverse_sqrt(rows[pick]), window=WINDOW, scale=scale, lam=LAM,
            level=0.5, rng=rng, refits=100,
        )  # fmt: skip
        short_median += need > c * guarantee.chi2_quantile(nu)
    assert short <= 18, short
    assert 41 <= short_median <= 79, short_median


def test_the_levels_split_over_detectors_and_the_quantile_follows_the_normal_one():
    assert guarantee.per_detector(0.9, 5) == pytest.approx(0.98)
    draws = np.random.default_rng(1).standard_normal(200_000)
    # symmetric: Cornish-Fisher is the normal quantile (1.2816 at 0.9), within sampling error
    assert guarantee.upper_quantile(draws, 0.9) == pytest.approx(1.2816, abs=0.02)
    # skewed (exponential: its 0.98 quantile is -log(0.02) = 3.91): the skew term moves it up, towards it
    expo = np.random.default_rng(2).exponential(size=200_000)
    assert 3.4 < guarantee.upper_quantile(expo, 0.98) < 4.3
    assert guarantee.upper_quantile(np.full(10, 3.0), 0.99) == 3.0


def test_the_cusum_guard_raises_the_threshold_only_for_calibration_sets_that_run_eager():
    """Refits whose p-values are uniform need no guard; when half the resamples see p-values
    distributed as ``x^0.7`` (more small ones), the guard raises the threshold until even those
    keep the target: checked on the chain's ARL for ``x^0.7`` p-values (the oracle: a p-value
    ``u^(1/0.7)`` with ``u`` uniform), at the level's quantile (the eager half's ARLs sit well
    below the uniform ones', so the 0.98 quantile is among them)."""
    rng = np.random.default_rng(3)
    delta, share = 1.5, 500.0
    nominal = sequential.threshold_for(share, sequential.uniform_cdf(delta))

    def uniform(windows: np.ndarray) -> np.ndarray:
        return rng.random(len(windows))

    factor = guarantee.cusum_guard(uniform, 2000, 8, share=share, delta=delta, nominal=nominal, level=0.9,
                                   rng=rng, refits=20, windows=4000)  # fmt: skip
    assert factor < 1.15

    def eager(windows: np.ndarray) -> np.ndarray:
        return rng.random(len(windows)) ** (1 / 0.7 if windows[0, 0] % 2 else 1.0)

    factor = guarantee.cusum_guard(eager, 2000, 8, share=share, delta=delta, nominal=nominal, level=0.98,
                                   rng=rng, refits=40, windows=4000)  # fmt: skip
    tilted = sequential.empirical_cdf(rng.random(400_000) ** (1 / 0.7), delta)
    assert sequential.arl(factor * nominal, tilted) >= 0.9 * share
    assert sequential.arl(nominal, tilted) < 0.5 * share  # the unguarded threshold would not have held


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) * torch.linspace(0.5, 2.0, 6)


@pytest.fixture(scope="module")
def refs() -> dict[str, tw.Reference]:
    model = nn.Sequential(nn.Identity())
    data = _data(4000, 0).split(500)
    kw = {"modules": ["0"], "window": 16, "components": 4, "features": 16, "arl": 200, "resamples": 1000}
    return {
        "guarded": tw.Reference.fit(model, data, **kw),
        "plain": tw.Reference.fit(model, data, guarantee=None, **kw),
    }


def test_guarantee_none_keeps_the_average_calibration_and_the_rest_of_the_fit(refs):
    g, p = refs["guarded"], refs["plain"]
    assert g.guarantee == 0.9 and p.guarantee == 0.0
    assert p.null_guard == 1.0 and np.array_equal(p.modules["0"].guard, [[1, 4], [1, 16], [1, 4]])
    # the guards draw from their own random stream: everything else is the same fit
    assert np.array_equal(g.joint_null, p.joint_null) and np.array_equal(g.modules["0"].omega, p.modules["0"].omega)
    assert g.null_guard > 1.0 and g.threshold(500) > p.threshold(500)
    mon_g, mon_p = OnlineDrift(g, torch.device("cpu"), None), OnlineDrift(p, torch.device("cpu"), None)
    for a, b in zip(mon_g.modules["0"].detectors, mon_p.modules["0"].detectors, strict=True):
        assert a.threshold > b.threshold


def test_calibration_check_states_the_guarantee(refs):
    text = refs["guarded"].calibration_check(arl=200, simulated_arl=50).summary()
    assert "guarantee: with probability 90%" in text
    plain = refs["plain"].calibration_check(arl=200, simulated_arl=50)
    assert plain.guarantee == 0 and "guarantee: none" in plain.summary()
    assert plain.allowance["0"] == (1.0, 1.0, 1.0)


def test_guards_survive_save_and_load_and_a_file_without_them_loads_unguarded(refs, tmp_path):
    ref = refs["guarded"]
    path = tmp_path / "ref.safetensors"
    ref.save(path)
    back = tw.Reference.load(path)
    assert back.guarantee == ref.guarantee and back.null_guard == ref.null_guard
    assert np.array_equal(back.modules["0"].guard, ref.modules["0"].guard)
    assert back.threshold(300) == ref.threshold(300)
    # as an older torchwatch wrote it: no guards, no guarantee
    from safetensors import safe_open

    with safe_open(os.fspath(path), "np") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(os.fspath(path)).items() if k not in ("null_guard", "m0.guard")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, os.fspath(old), metadata={k: v for k, v in meta.items() if k != "guarantee"})
    legacy = tw.Reference.load(old)
    assert legacy.guarantee == 0.0 and legacy.null_guard == 1.0
    assert np.array_equal(legacy.modules["0"].guard, [[1, 4], [1, 16], [1, 4]])
    # a guard that cannot be one is refused, naming the file
    bad = dict(load_file(os.fspath(path)))
    bad["m0.guard"] = -bad["m0.guard"]
    broken = tmp_path / "broken.safetensors"
    save_file(bad, os.fspath(broken), metadata=meta)
    with pytest.raises(FormatError, match="guard"):
        tw.Reference.load(broken)
    bad = dict(load_file(os.fspath(path)))
    bad["null_guard"] = np.array([0.5])
    save_file(bad, os.fspath(broken), metadata=meta)
    with pytest.raises(FormatError, match="null_guard"):
        tw.Reference.load(broken)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, float("nan"), "0.9", True])
def test_a_guarantee_that_is_not_a_probability_is_refused(value):
    with pytest.raises(ConfigError, match="guarantee"):
        tw.Reference.fit(nn.Sequential(nn.Identity()), [_data(400, 1)], modules=["0"], window=8, guarantee=value)


def test_the_stated_guarantee_is_split_over_every_detector_of_every_module(monkeypatch):
    """Two modules make 2 + 3·2 = 8 detectors: each accumulating guard and the CUSUM's are asked
    for 1 - 0.1/8 so that all of them hold together with probability 0.9 (Bonferroni)."""
    asked: list[float] = []
    for name in ("mewma_guard", "cusum_guard"):
        real = getattr(guarantee, name)

        def spy(*args, real=real, **kwargs):
            asked.append(kwargs["level"])
            return real(*args, **kwargs)

        monkeypatch.setattr(guarantee, name, spy)
    model = nn.Sequential(nn.Identity(), nn.Tanh())
    tw.Reference.fit(model, [_data(1200, 4)], modules=["0", "1"], window=8, components=3, features=8,
                     resamples=200, guarantee=0.9)  # fmt: skip
    assert len(asked) == 3 * 2 + 1
    assert asked == pytest.approx([1 - 0.1 / 8] * 7)
