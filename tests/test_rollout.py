"""Rollout verdicts: the sequential tests keep their error rates however often they are read, and a
candidate beside a primary is promoted or rolled back for the right reason.

Oracles: the error rates are counted over many simulated streams at the null's boundary (the
hardest case) and compared with the level plus three Monte Carlo standard errors; a fixed-sample
z-test read after every sample on the same streams shows the inflation the sequential test avoids.
Latencies come from a clock the test drives, so no assertion depends on this machine's timing.
"""

from __future__ import annotations

import copy
import math
import urllib.request

import numpy as np
import pytest
import torch
from torch import nn

import torchwatch as tw
from torchwatch.rollout.sequential import EmpiricalBernstein, MeanTest, QuantileBounds


def _mc_limit(alpha: float, runs: int) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def test_a_mean_test_read_after_every_sample_keeps_its_level_where_a_peeked_z_test_does_not():
    rng = np.random.default_rng(0)
    runs, steps, m, alpha = 4000, 400, 0.2, 0.05
    test = MeanTest(m, "above", alpha, width=runs)  # 4000 independent streams, side by side
    z_rejected = np.zeros(runs, dtype=bool)
    total = np.zeros(runs)
    for t in range(1, steps + 1):
        x = (rng.random(runs) < m).astype(np.float64)  # the null's boundary: mean exactly m
        test.update(x[None, :])
        total += x
        z = (total / t - m) / math.sqrt(m * (1 - m) / t)
        z_rejected |= z > 1.6449  # one-sided 5% z-test, looked at after every sample
    rate = float((test.rejected_at_each > 0).mean())
    assert rate <= _mc_limit(alpha, runs), rate
    assert z_rejected.mean() > 3 * alpha  # peeking inflates the fixed-sample test's error


def test_a_mean_test_rejects_a_false_null_and_counts_fit_the_values_it_is_given():
    rng = np.random.default_rng(1)
    test = MeanTest(0.01, "above", 0.01)
    while not test.rejected and test.n < 10_000:
        test.update((rng.random(16) < 0.05).astype(float))
    assert test.rejected and test.rejected_at < 2000
    by_values, by_counts = MeanTest(0.3, "below", 0.05, width=2), MeanTest(0.3, "below", 0.05, width=2)
    x = np.array([[1.0, 0.0], [0.0, 0.5], [0.5, 0.5]])
    by_values.update(x)
    by_counts.update_counts(np.array([1.0, 0.0, 0.5]), np.array([[1, 1, 1], [0, 1, 2]]))
    np.testing.assert_allclose(by_values.log_capital, by_counts.log_capital, rtol=1e-12)


def test_a_mean_test_rejects_at_the_first_sample_its_capital_reaches_one_over_alpha():
    # the oracle: the mixture's capital from its definition, the average over the bets of
    # prod(1 + lambda_k (x_i - m)), with the bets 1/2 of the largest allowed, halved 15 times
    rng = np.random.default_rng(4)
    m, alpha = 0.1, 0.01
    x = (rng.random(400) < 0.3).astype(np.float64)
    lambdas = 0.5 / m * 2.0 ** -np.arange(16)
    capital = np.cumprod(1 + np.outer(x - m, lambdas), axis=0).mean(axis=1)
    first = int(np.argmax(capital >= 1 / alpha)) + 1
    assert capital[first - 2] < 1 / alpha <= capital[first - 1]
    test = MeanTest(m, "above", alpha)
    for v in x:  # one sample per look: rejected exactly where the capital crosses
        test.update(np.array([v]))
    assert test.rejected_at == first


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_class_mix_decides_when_per_row_tests_of_each_class_would(shift):
    """The class-mix metric counts rows per class; the oracle feeds each class's test every row's
    difference (+1 the candidate alone predicts it, -1 the primary alone, 0 otherwise)."""
    from torchwatch.rollout.evidence import ClassMixMetric

    rng = np.random.default_rng(5)
    k, tol, a_r, a_p = 3, 0.05, 0.01, 0.05
    metric = ClassMixMetric(k, tol, alpha_rollback=a_r, alpha_promote=a_p)
    up, down = (1 + tol) / 2, (1 - tol) / 2
    oracle = {"rollback": [MeanTest(up, "above", a_r / (2 * k), width=k), MeanTest(down, "below", a_r / (2 * k), width=k)],
              "promote": [MeanTest(up, "below", a_p, width=k), MeanTest(down, "above", a_p, width=k)]}  # fmt: skip
    want = None
    for _ in range(400):
        p = rng.integers(0, k, 16)
        c = np.where(rng.random(16) < shift, 0, p)  # the candidate says class 0 on a share of rows
        metric.add(c, p)
        d = np.zeros((16, k))
        d[np.arange(16), c] += 1
        d[np.arange(16), p] -= 1
        for t in oracle["rollback"] + oracle["promote"]:
            t.update((d + 1) / 2)
        if want is None:
            if any(t.rejected_at_each.any() for t in oracle["rollback"]):
                want = ("rollback", metric.n)
            elif all(t.rejected for t in oracle["promote"]):
                want = ("promote", metric.n)
    got = metric.evidence()
    assert want is not None and (got.decision, got.decided_at) == want


def test_quantile_bounds_cover_the_true_quantile_whenever_read():
    rng = np.random.default_rng(2)
    p, alpha, runs = 0.9, 0.1, 300
    truth = math.exp(1.2815515655446004 * 0.5)  # the 0.9-quantile of lognormal(0, 0.5)
    missed = 0
    for _ in range(runs):
        q = QuantileBounds(p, alpha_lower=alpha / 2, alpha_upper=alpha / 2, ratio=1.02)
        miss = False
        for _ in range(15):
            q.add(rng.lognormal(0, 0.5, 40))
            lo, hi = q.bounds()
            miss |= not lo <= truth <= hi
        missed += miss
    assert missed / runs <= _mc_limit(alpha, runs)
    lo, hi = q.bounds()
    assert lo < truth < hi and hi / lo < 1.5  # 600 samples narrow it


def test_the_empirical_bernstein_interval_covers_the_mean_and_narrows():
    rng = np.random.default_rng(3)
    misses = 0
    for _ in range(300):
        e = EmpiricalBernstein(0.1)
        miss = False
        previous = (0.0, 1.0)
        for _ in range(25):
            e.update(rng.beta(2, 8, 20))
            lo, hi = e.bounds()
            miss |= not lo <= 0.2 <= hi
            assert previous[0] <= lo <= hi <= previous[1]  # a running intersection never widens
            previous = (lo, hi)
        misses += miss
    assert misses / 300 <= _mc_limit(0.1, 300)
    assert e.bounds()[1] - e.bounds()[0] < 0.08


# ---- a candidate beside a primary ----------------------------------------------------------------


def _classifier(seed: int = 0, sharpness: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():  # sharpness scales the logits: a confident classifier
        model[2].weight.mul_(sharpness)
        model[2].bias.mul_(sharpness)
    return model


class SwapOnSome(nn.Module):
    """A label map that swaps classes 0 and 1 on the rows whose first feature falls in a ``share``
    of its buckets (a deterministic 5% of inputs, the way a bad export would)."""

    def __init__(self, model: nn.Module, share: float) -> None:
        super().__init__()
        self.model, self.share = model, share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x).clone()
        hit = (x[:, 0] * 1000).floor().remainder(100) < self.share * 100
        y[hit] = y[hit][:, [1, 0, 2, 3]]
        return y


class Clock:
    """Seconds that advance only when a model says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Timed(nn.Module):
    def __init__(self, model: nn.Module, clock: Clock, seconds: float, rng: np.random.Generator) -> None:
        super().__init__()
        self.model, self.clock, self.seconds, self.rng = model, clock, seconds, rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.seconds * float(self.rng.lognormal(0, 0.1))
        return self.model(x)


def _serve(ro: tw.Rollout, calls: int, *, rows: int = 16, seed: int = 0, labels=None) -> int:
    """Serve until the verdict is final or ``calls`` ran; returns the calls served."""
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for i in range(calls):
            x = torch.randn(rows, 8, generator=gen)
            out = ro(x, trace_id=f"req-{i}")
            assert out.shape == (rows, 4)
            if labels is not None:
                ro.record_labels(f"req-{i}", labels(x))
            if i % 50 == 49:
                ro.wait()
                if ro.verdict().decision != "continue":
                    return i + 1
    ro.wait()
    return calls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_identical_candidate_is_promoted_and_never_rolled_back(seed):
    primary = _classifier(seed)
    with tw.rollout(primary, copy.deepcopy(primary), share=0.5, seed=seed,
                    metrics=["confidence", "entropy", "class_mix", "errors"]) as ro:  # fmt: skip
        _serve(ro, 4000, seed=seed)
        verdict = ro.verdict()
    assert verdict.decision == "promote", verdict.reason
    assert all(m.decision == "promote" for m in verdict.metrics)
    assert ro.calls["primary"] + ro.calls["candidate"] <= 4000


def test_a_shadow_candidate_that_swaps_two_classes_on_5_percent_of_inputs_is_rolled_back_on_agreement():
    primary = _classifier(3)
    seen = []
    with tw.rollout(primary, SwapOnSome(copy.deepcopy(primary), 0.05), mode="shadow", share=0.5, seed=0,
                    on_verdict=seen.append) as ro:  # fmt: skip
        calls = _serve(ro, 2000)
        verdict = ro.verdict()
    assert verdict.decision == "rollback" and verdict.metric == "agreement", verdict.reason
    # the disagreements seen so far put the share above the tolerance, and the interval shows it
    assert verdict.estimate > 0.01 and verdict.lower >= 0.01 and verdict.upper > verdict.estimate
    assert calls < 2000 and seen == [verdict]  # decided early, handed over once
    assert ro.calls["primary"] == calls  # the primary answered every request


def test_an_identical_shadow_candidate_is_promoted():
    primary = _classifier(4)
    with tw.rollout(primary, copy.deepcopy(primary), mode="shadow", share=1.0, seed=0) as ro:
        _serve(ro, 3000)
        verdict = ro.verdict()
    assert verdict.decision == "promote", verdict.reason
    assert {m.name.split("[")[0] for m in verdict.metrics} == {"confidence", "entropy", "class_mix", "errors",
                                                                 "agreement"}  # fmt: skip


def test_a_slower_candidate_is_rolled_back_on_p99_latency_and_an_equal_one_is_not():
    rng = np.random.default_rng(5)
    clock = Clock()
    base = _classifier(5)
    primary = Timed(base, clock, 0.010, rng)
    slow = Timed(copy.deepcopy(base), clock, 0.012, rng)  # 20% slower
    with tw.rollout(primary, slow, share=0.5, seed=0, metrics=["latency_p99"], clock=clock) as ro:
        calls = _serve(ro, 30_000, rows=1)
        verdict = ro.verdict()
    assert verdict.decision == "rollback" and verdict.metric == "latency_p99", verdict.reason
    assert 0.15 < verdict.estimate < 0.25 and verdict.lower > 0.1
    assert calls < 30_000
    same = Timed(copy.deepcopy(base), clock, 0.010, rng)
    with tw.rollout(primary, same, share=0.5, seed=1, metrics=["latency_p99"], clock=clock) as ro:
        _serve(ro, 30_000, rows=1)
        assert ro.verdict().decision == "promote"
    within = Timed(copy.deepcopy(base), clock, 0.0105, rng)  # 5% slower: inside the 10% tolerance
    with tw.rollout(primary, within, share=0.5, seed=2, metrics=["latency_p99"], clock=clock) as ro:
        _serve(ro, 20_000, rows=1)
        assert ro.verdict().decision != "rollback"


class Scaled(nn.Module):
    """The same answers with logits times ``k``: less confident for k < 1; ``shift`` favours class 0."""

    def __init__(self, model: nn.Module, k: float, shift: float = 0.0) -> None:
        super().__init__()
        self.model, self.k, self.shift = model, k, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x) * self.k
        y[:, 0] += self.shift
        return y


def test_a_less_confident_candidate_is_rolled_back_on_confidence_and_a_more_confident_one_is_not():
    primary = _classifier(10, sharpness=3.0)
    with tw.rollout(primary, Scaled(copy.deepcopy(primary), 0.3), mode="shadow", share=1.0, seed=0,
                    metrics=["agreement", "confidence"]) as ro:  # fmt: skip
        _serve(ro, 1000)
        verdict = ro.verdict()
    assert verdict.decision == "rollback" and verdict.metric == "confidence"
    assert verdict.estimate > 0.05  # the primary's confidence minus the candidate's
    with tw.rollout(primary, Scaled(copy.deepcopy(primary), 3.0), mode="shadow", share=1.0, seed=0,
                    metrics=["agreement", "confidence"]) as ro:  # fmt: skip
        _serve(ro, 1000)
        assert ro.verdict().decision == "promote"


def test_a_candidate_that_favours_one_class_is_rolled_back_on_class_mix():
    primary = _classifier(11, sharpness=3.0)
    with tw.rollout(primary, Scaled(copy.deepcopy(primary), 1.0, shift=2.0), share=0.5, seed=0,
                    metrics=["class_mix"]) as ro:  # fmt: skip
        _serve(ro, 2000)
        verdict = ro.verdict()
    assert verdict.decision == "rollback" and verdict.metric == "class_mix[0]" and verdict.estimate > 0.05


def test_the_verdict_promotes_only_once_every_metric_has():
    """Agreement and confidence are shown within tolerance after a few hundred rows; errors (per
    call) needs about a thousand calls: until then the verdict is continue."""
    from torchwatch.rollout.ledger import Ledger

    ledger = Ledger("v2", "shadow", ("agreement", "confidence", "errors"), {}, alpha_rollback=0.01,
                    alpha_promote=0.05, abstain_below=None, max_traces=16, warn=lambda key, message: None)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):  # 4800 identical rows
        logits = torch.randn(16, 4, generator=gen)
        ledger.shadow_pair(None, logits, logits.clone())
    v = ledger.verdict({"primary": 300, "candidate": 300}, 0, 0)
    decided = {m.name: m.decision for m in v.metrics}
    assert decided == {"agreement": "promote", "confidence": "promote", "errors": "continue"}
    assert v.decision == "continue" and v.metric is None
    for _ in range(1000):
        logits = torch.randn(16, 4, generator=gen)
        ledger.shadow_pair(None, logits, logits.clone())
    v = ledger.verdict({"primary": 1300, "candidate": 1300}, 0, 0)
    assert v.decision == "promote" and v.metric == "errors"


def test_with_labels_a_better_candidate_is_promoted_and_a_worse_one_rolled_back():
    truth = _classifier(6, sharpness=20.0)  # confident: calibration rewards being right, not hedging

    def labels(x: torch.Tensor) -> torch.Tensor:
        return truth(x).argmax(-1)

    worse = SwapOnSome(copy.deepcopy(truth), 0.10)
    with tw.rollout(worse, copy.deepcopy(truth), share=0.5, seed=0, labels=True,
                    metrics=["accuracy", "calibration"]) as ro:  # fmt: skip
        _serve(ro, 3000, labels=labels)
        better = ro.verdict()
    assert better.decision == "promote", better.reason
    acc = next(m for m in better.metrics if m.name == "accuracy")
    assert acc.estimate < -0.02  # the candidate is more accurate: "worse by" is negative
    with tw.rollout(truth, SwapOnSome(copy.deepcopy(truth), 0.10), share=0.5, seed=0, labels=True,
                    metrics=["accuracy"]) as ro:  # fmt: skip
        _serve(ro, 3000, labels=labels)
        assert ro.verdict().decision == "rollback" and ro.verdict().metric == "accuracy"


class Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("candidate broke")


def test_a_candidate_that_raises_never_breaks_a_request_and_is_rolled_back_then_gets_no_traffic():
    primary = _classifier(7)
    with pytest.warns(tw.TorchwatchWarning, match="candidate raised"):
        with tw.rollout(primary, Raises(), share=0.5, seed=0, metrics=["errors"]) as ro:
            _serve(ro, 500)
            verdict = ro.verdict()
            errors = ro.errors
            _serve(ro, 200)  # after the rollback: the candidate is not called again
    assert verdict.decision == "rollback" and verdict.metric == "errors"
    assert ro.errors == errors > 0


def test_bad_input_gets_clear_answers():
    primary = _classifier(8)
    ro = tw.rollout(primary, copy.deepcopy(primary), seed=0)
    v = ro.verdict()
    assert v.decision == "continue" and v.reason == "no samples yet" and v.samples == 0
    with pytest.raises(tw.ConfigError, match="labels=True"):
        ro.record_labels("req-1", [1])
    ro.close()
    for kwargs, match in (({"share": 1.5}, "share"), ({"mode": "blue-green"}, "mode"),
                          ({"metrics": ["agreement"]}, "agreement is shadow-only"), ({"metrics": ["speed"]}, "unknown"),
                          ({"tolerances": {"errors": 2.0}}, "tolerance"), ({"alpha_rollback": 0.0}, "alpha_rollback"),
                          ({"metrics": []}, "empty")):  # fmt: skip
        with pytest.raises(tw.ConfigError, match=match):
            tw.rollout(primary, copy.deepcopy(primary), **kwargs)
    with pytest.raises(tw.ConfigError, match="different"):
        tw.rollout(primary, primary)
    with tw.rollout(primary, copy.deepcopy(primary), seed=0, labels=True, metrics=["accuracy"], max_traces=4) as ro:
        with pytest.raises(tw.ConfigError, match="integer"):
            ro.record_labels("req-0", [0.5])
        for i in range(10):  # labels for requests never served: held a while, then counted
            ro.record_labels(f"never-{i}", [1])
        ro.wait()
        assert ro.labels_unmatched == 6


def test_the_verdict_reaches_prometheus_through_the_primarys_watch(quiet):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    primary = _classifier(9)
    sink = tw.PrometheusSink(port=0, model_name="clf")
    with tw.attach(primary, sinks=[sink], flush_every=50) as watch:
        with tw.rollout(primary, SwapOnSome(copy.deepcopy(primary), 0.05), mode="shadow", share=1.0, seed=0,
                        name="v2") as ro:  # fmt: skip
            _serve(ro, 1500)
            verdict = ro.verdict()
            watch.flush()
        body = urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics", timeout=10).read().decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(body) for s in f.samples}  # fmt: skip
    assert verdict.decision == "rollback"
    assert got[("torchwatch_rollout_verdict", (("model", "clf"), ("rollout", "v2")))] == -1.0
    key = (("metric", "agreement"), ("model", "clf"), ("rollout", "v2"))
    assert got[("torchwatch_rollout_metric_verdict", key)] == -1.0
    assert got[("torchwatch_rollout_estimate", key)] == pytest.approx(verdict.estimate)
    assert got[("torchwatch_rollout_tolerance", key)] == 0.01


def test_threads_serving_one_rollout_lose_no_call_and_get_their_own_answers():
    import threading

    primary = _classifier(12)
    candidate = copy.deepcopy(primary)
    errors = []
    with tw.rollout(primary, candidate, share=0.5, seed=0, metrics=["confidence", "errors"], max_pending=1024) as ro:

        def serve(seed: int) -> None:
            gen = torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                for _ in range(200):
                    x = torch.randn(4, 8, generator=gen)
                    if not torch.equal(ro(x), primary(x)):  # identical versions: the same answer
                        errors.append(seed)

        threads = [threading.Thread(target=serve, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ro.wait()
        assert ro.calls["primary"] + ro.calls["candidate"] == 800 and ro.dropped == 0
        assert not errors
        assert ro.verdict().decision != "rollback"


def test_the_newest_rollout_of_a_watched_model_is_in_its_records_and_survives_json():
    import json

    primary = _classifier(13)
    sink = tw.MemorySink()
    with tw.attach(primary, sinks=[sink], flush_every=10**6) as watch:
        first = tw.rollout(primary, copy.deepcopy(primary), share=0.5, seed=0, name="v2", metrics=["confidence"])
        first.close()
        with tw.rollout(primary, copy.deepcopy(primary), share=0.5, seed=0, name="v3", metrics=["confidence"]) as ro:
            _serve(ro, 200)
        watch.flush()
    status = sink.records[-1].extra["rollout"]
    assert status.name == "v3" and status.decision == ro.verdict().decision == "promote"
    back = tw.Record.from_json(json.loads(json.dumps(sink.records[-1].to_json()))).extra["rollout"]
    assert back == status


def test_calls_taken_in_one_batch_give_the_evidence_of_calls_taken_one_by_one():
    from torchwatch.rollout.ledger import Ledger

    def ledger() -> Ledger:
        return Ledger("v2", "canary", ("confidence", "entropy", "class_mix", "errors"), {}, alpha_rollback=0.01,
                      alpha_promote=0.05, abstain_below=None, max_traces=16, warn=lambda key, message: None)  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    versions = ["candidate" if v < 0.3 else "primary" for v in torch.rand(400, generator=gen).tolist()]
    calls = [(v, None, torch.randn(int(r), 5, generator=gen) * (1.5 if v == "candidate" else 1.0), 0.01)
             for v, r in zip(versions, torch.randint(1, 20, (400,), generator=gen), strict=True)]  # fmt: skip
    calls[7][2][0, 0] = float("nan")  # a bad call among them
    together, alone = ledger(), ledger()
    together.canary_calls(calls)
    for call in calls:
        alone.canary_calls([call])
    a = together.verdict({}, 0, 0).metrics
    b = alone.verdict({}, 0, 0).metrics
    assert [(m.name, m.samples, m.decision) for m in a] == [(m.name, m.samples, m.decision) for m in b]
    np.testing.assert_allclose([m.estimate for m in a], [m.estimate for m in b], rtol=1e-12)


def test_a_canary_counts_every_class_the_logits_have_not_only_those_predicted_first():
    from torchwatch.rollout.ledger import Ledger

    ledger = Ledger("v2", "canary", ("class_mix",), {}, alpha_rollback=0.01, alpha_promote=0.05,
                    abstain_below=None, max_traces=16, warn=lambda key, message: None)  # fmt: skip
    first = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])  # only classes 0 and 1 at first
    ledger.canary_calls([("primary", None, first, 0.01), ("candidate", None, first.clone(), 0.01)])
    to_three = torch.tensor([[0.0, 0.0, 0.0, 5.0]] * 16)  # later the candidate says class 3 where the primary says 2
    to_two = torch.tensor([[0.0, 0.0, 5.0, 0.0]] * 16)
    for _ in range(20):
        ledger.canary_calls([("primary", None, to_two, 0.01), ("candidate", None, to_three, 0.01)])
    v = ledger.verdict({}, 0, 0)
    assert v.decision == "rollback" and v.metric in ("class_mix[2]", "class_mix[3]")
    (mix,) = v.metrics
    assert mix.estimate == pytest.approx(320 / 322)  # class 3's share moved on all but the first rows


def test_verdicts_read_while_serving_lose_no_evidence():
    import threading

    primary = _classifier(14)
    stop = threading.Event()
    # errors (one sample per call) cannot promote within 300 calls: the verdict stays open, so it
    # shows every sample taken (a final verdict is kept as it was)
    with tw.rollout(primary, copy.deepcopy(primary), mode="shadow", share=1.0, seed=0,
                    metrics=["agreement", "confidence", "errors"], max_pending=1 << 14) as ro:  # fmt: skip

        def read() -> None:
            while not stop.is_set():
                ro.verdict()

        reader = threading.Thread(target=read)
        reader.start()
        with torch.inference_mode():
            for _ in range(300):
                ro(torch.randn(16, 8))
        ro.wait()
        stop.set()
        reader.join()
        samples = {m.name: m.samples for m in ro.verdict().metrics}
    assert samples == {"agreement": 300 * 16, "confidence": 300 * 16, "errors": 300}
