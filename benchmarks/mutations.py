"""Deliberate bugs in the core, each of which some test must catch.

Copies the committed tree to a temporary directory, builds the C kernel there, and for each
mutation below: applies it (one exact text replacement), rebuilds the kernel if it touched it,
runs the tests named beside it, and expects them to FAIL. A mutation the tests survive is a hole
in the suite. Run before resolving an issue that touches the core (not in CI's time budget:
about ten minutes on 2 cores):

    .venv/bin/python benchmarks/mutations.py            # all
    .venv/bin/python benchmarks/mutations.py -k verify  # those whose name contains "verify"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


KERNEL = "torchwatch/kernels/_cstats.c"
CAPTURE_TESTS = "tests/test_capture.py"
REPLAY_TESTS = "tests/test_replay.py"
FLEET_TESTS = "tests/test_fleet.py"
ROLLOUT_TESTS = "tests/test_rollout.py"
BENCH_STATS = "benchmarks/interleaved.py"
BENCH_TESTS = "tests/test_bench_interleaved.py"
MUTATIONS = (
    Mutation("kernel does not compile", KERNEL, "#define TW_BLOCK 4096", "#define TW_BLOCK 4096 +",
             ("tests/test_install.py::test_the_c_kernel_is_built_wherever_a_c_compiler_is",)),
    Mutation("kernel: a chunk skipped", KERNEL, "    for (int c = lo; c < hi && claim(j, c); c++) run_chunk(j, c);",
             "    for (int c = lo; c < hi - (hi - lo > 2) && claim(j, c); c++) run_chunk(j, c);",
             ("tests/test_kernels.py",)),
    Mutation("kernel: a share no thread started is never taken", KERNEL, "    for (int t = 1; t < j->shares; t++) {",
             "    for (int t = 1; t < 1; t++) {", ("tests/test_kernels.py",)),
    Mutation("kernel: the samples cover half the block", KERNEL,
             "    for (int i = stride / 2; i < n; i += stride) {",
             "    for (int i = stride / 2; i < n / 2; i += stride) {", ("tests/test_kernels.py",)),
    Mutation("kernel: zeros counted inline off by one", KERNEL,
             "    r->nzero = ZEROS ? i - (uint32_t)_mm512_reduce_add_epi32(nz) : 0;",
             "    r->nzero = ZEROS ? i + 1 - (uint32_t)_mm512_reduce_add_epi32(nz) : 0;", ("tests/test_kernels.py",)),
    Mutation("kernel: zeros off by one", KERNEL, "    acc->zeros += nzero;", "    acc->zeros += nzero + (nzero > 0);",
             ("tests/test_kernels.py", "tests/test_stats.py")),
    Mutation("kernel: channel sums drop a row's last value", KERNEL,
             "    for (; i < n; i++) s += (double)x[i];\n    return s;\n}\n#endif",
             "    for (; i < n - 1; i++) s += (double)x[i];\n    return s;\n}\n#endif", ("tests/test_inputs.py",)),
    Mutation("kernel: channel sums skip the rows after the last full group", KERNEL,
             "        for (; o < outer; o++) add_span(", "        for (; o < outer - 1; o++) add_span(",
             ("tests/test_inputs.py",)),
    Mutation("kernel: channel sums fold one partial set too few", KERNEL,
             "            for (int k = 0; k < TW_CHANNEL_SETS; k++)",
             "            for (int k = 1; k < TW_CHANNEL_SETS; k++)",
             ("tests/test_inputs.py",)),
    Mutation("kernel: portable channel sums drop the tail", KERNEL,
             "    double s = (p[0] + p[1]) + (p[2] + p[3]);\n    for (; i < n; i++)",
             "    double s = (p[0] + p[1]) + (p[2] + p[3]);\n    for (; i < n - 1; i++)", ("tests/test_inputs.py",)),
    Mutation("kernel: a ReLU block holding a negative value is not read again", KERNEL,
             "    if (!relu || a.mn < 0) {", "    if (!relu) {", ("tests/test_kernels.py",)),
    Mutation("kernel: the samples' stride is even (same features of every row)", KERNEL,
             "(n / TW_SAMPLES) | 1 : 1;", "(n / TW_SAMPLES) : 1;", ("tests/test_kernels.py",)),
    Mutation("kernel: a zero among the samples does not turn the pass's zero count on", KERNEL,
             "    const int zeros = g->zeros || sample_zero;", "    const int zeros = g->zeros;",
             ("tests/test_kernels.py",)),
    Mutation("kernel: a negative sample does not keep a block off the ReLU route", KERNEL,
             "        ng |= v < 0;", "        ng |= v < -1e30;", ("tests/test_kernels.py",)),
    Mutation("kernel: a chunk's first block never takes the ReLU route", KERNEL,
             "(!g->set || g->nonneg);", "(g->set && g->nonneg);", ("tests/test_kernels.py",)),
    Mutation("kernel: -0.0 counted as nonzero where x is taken as |x| (AVX2)", KERNEL,
             "NONNEG ? _mm256_castps_si256(_mm256_cmp_ps(v, fzero, _CMP_EQ_OQ)) : _mm256_cmpeq_epi32(av, izero);",
             "_mm256_cmpeq_epi32(av, izero);", ("tests/test_kernels.py",)),
    Mutation("kernel: a ReLU block's negative values do not win its integer min (AVX-512)", KERNEL,
             "amin = NONNEG ? _mm512_mask_min_epi32(amin, fw, amin, aw)",
             "amin = NONNEG ? _mm512_mask_min_epu32(amin, fw, amin, aw)", ("tests/test_kernels.py",)),
    Mutation("kernel: bfloat16's odd elements read as the even ones (AVX-512)", KERNEL,
             "*w = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32((int)0xffff0000u)));",
             "*w = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));", ("tests/test_kernel_inputs.py",)),
    Mutation("kernel: bfloat16's odd elements read as the even ones (AVX2)", KERNEL,
             "*w = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xffff0000u)));",
             "*w = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));", ("tests/test_kernel_inputs.py",)),
    Mutation("kernel: a bfloat16 block's subnormals counted in its raw bits", KERNEL,
             "acc->subnormal += count_small(f32(b), n, p->tinyf, 1);",
             "acc->subnormal += count_small((const float *)x, n, p->tinyf, 1);", ("tests/test_kernel_inputs.py",)),
    Mutation("kernel: read with the caller's denormal flushing", KERNEL,
             "    if (mode & TW_DAZ_FTZ) _mm_setcsr(mode & ~TW_DAZ_FTZ);\n", "", ("tests/test_kernel_inputs.py",)),
    Mutation("kernel: float16 exponent rebased one too few", KERNEL, "    f *= 0x1p112f;", "    f *= 0x1p111f;",
             ("tests/test_kernel_inputs.py",)),
    Mutation("kernel: float16 sign dropped", KERNEL, "    bits |= sign;", "    bits |= 0;",
             ("tests/test_kernel_inputs.py",)),
    Mutation("kernel: a plan parsed in the caller's denormal mode", KERNEL,
             "    const unsigned mode = exact_fp_begin();     /* a subnormal threshold must not become 0 */",
             "    const unsigned mode = 0;", ("tests/test_kernel_inputs.py",)),
    Mutation("torch ops: zeros compared as floats", "torchwatch/kernels/torch_ops.py", "        (~nonzero).sum(),",
             "        (v == 0).sum(),", ("tests/test_kernel_inputs.py",)),
    Mutation("casts: a cast's zero read through a float64 conversion", "torchwatch/_casts.py",
             "    return int(out.to(torch.float32).view(torch.int32)) & 0x7FFFFFFF == 0",
             "    return float(out.to(torch.float64)) == 0.0", ("tests/test_casts.py",)),
    Mutation("casts: float32 subnormal patterns off by a factor of two", "torchwatch/_casts.py",
             "int(math.ldexp(a, 149))", "int(math.ldexp(a, 148))", ("tests/test_casts.py",)),
    Mutation("kernel: a poor shift is never corrected", KERNEL,
             "if (abs(e - e_used) > TW_SCALE_SLACK || sd * sd / dn > TW_SHIFT_SLACK * (sq - sd * sd / dn)) {",
             "if (abs(e - e_used) > TW_SCALE_SLACK) {", ("tests/test_kernels.py",)),
    Mutation("kernel: the inline underflow count drops zeros twice", KERNEL,
             "        if (k == inl) acc->under[k] += nsmall - nzero;", "        if (k == inl) acc->under[k] += nsmall;",
             ("tests/test_kernels.py", "tests/test_stats.py")),
    Mutation("verify: a file's first tensor is never compared", "torchwatch/integrity/verify.py",
             "    bad = {n for n in to_hash if got[n] != expected[n].sha256}",
             "    bad = {n for n in to_hash[1:] if got[n] != expected[n].sha256}", ("tests/test_verify.py",)),
    Mutation("verify: a model's last tensor is never compared", "torchwatch/integrity/verify.py",
             "{n for n in to_hash if got[n] != expected[n].sha256})",
             "{n for n in to_hash[:-1] if got[n] != expected[n].sha256})",
             ("tests/test_verify.py",)),
    Mutation("drift: the CUSUM threshold doubled", "torchwatch/monitors/drift/online.py",
             "        self.cusum = Cusum(ref.threshold(share), ref.delta)",
             "        self.cusum = Cusum(2 * ref.threshold(share), ref.delta)", ("tests/test_drift.py",)),
    Mutation("drift guarantee: the centre's offset left out of the accumulating guard",
             "torchwatch/monitors/drift/guarantee.py",
             "mean = float(np.trace(sigma)) + amplify * float(offset @ offset)",
             "mean = float(np.trace(sigma))", ("tests/test_drift_guarantee.py",)),
    Mutation("drift guarantee: the CUSUM's guard ignored", "torchwatch/monitors/drift/reference.py",
             "return self.null_guard * _sequential.threshold_for(", "return 1.0 * _sequential.threshold_for(",
             ("tests/test_drift_guarantee.py",)),
    Mutation("drift guarantee: the stated probability not split over the detectors",
             "torchwatch/monitors/drift/reference.py",
             "else _guarantee.per_detector(guarantee, detectors_for(len(embeddings)))",
             "else float(guarantee)", ("tests/test_drift_guarantee.py",)),
    Mutation("charts: a threshold set for ARL/10", "torchwatch/rules/charts.py",
             "self.budget.series_arl() if self.arl is None else self.arl, self.k)",
             "self.budget.series_arl() if self.arl is None else self.arl / 10, self.k)", ("tests/test_rules.py",)),
    Mutation("charts: a chart never restarts after a signal", "torchwatch/rules/charts.py",
             "        self.hi = self.lo = 0.0\n        return z, direction", "        return z, direction",
             ("tests/test_alert_budget.py",)),
    Mutation("charts: every series gets the model's whole budget", "torchwatch/rules/charts.py",
             "        return self.arl * max(self.series, 1)", "        return self.arl",
             ("tests/test_alert_budget.py",)),
    Mutation("charts: one interval's step not clipped", "torchwatch/rules/charts.py",
             "        clip = threshold / 2 + k", "        clip = math.inf", ("tests/test_alert_budget.py",)),
    Mutation("charts: abs-max charted both ways", "torchwatch/rules/charts.py",
             "        self.lo = 0.0 if upward else max(0.0, self.lo - zc - k)",
             "        self.lo = max(0.0, self.lo - zc - k)", ("tests/test_alert_budget.py",)),
    Mutation("charts: spread from the MAD alone", "torchwatch/rules/charts.py",
             "    return max(inflate * max(mad, float(q95 - q05) / 3.29), min_sigma)",
             "    return max(inflate * mad, min_sigma)", ("tests/test_alert_budget.py",)),
    Mutation("charts: warm-up intervals left off by one", "torchwatch/rules/charts.py",
             "        learning = [self.warmup - len(s.warm) for",
             "        learning = [self.warmup - len(s.warm) + 1 for",
             ("tests/test_alert_budget.py",)),
    Mutation("incidents: led by the last module, not the first", "torchwatch/incidents.py",
             "        out.append(Incident(items[0][2], tuple(a for _, _, a in items[1:])))",
             "        out.append(Incident(items[-1][2], tuple(a for _, _, a in items[:-1])))",
             ("tests/test_incidents.py",)),
    Mutation("alerts: each alert of an incident uses a place in the budget", "torchwatch/rules/policy.py",
             "        self._recent.append(now)\n", "        self._recent += [now] * len(alerts)\n",
             ("tests/test_rules.py",)),
    Mutation("tensorboard: flagged runs to the first alerted, not the most severe", "torchwatch/sinks/_flagged.py",
             "            (SEVERITY.get(a.rule, OTHER), index.get", "            (OTHER, index.get",
             ("tests/test_sinks.py",)),
    Mutation("outputs: abstention below 0.5 whatever the classes", "torchwatch/monitors/outputs.py",
             "        return 1.0 / math.sqrt(classes) if self.abstain_below",
             "        return 0.5 if self.abstain_below",
             ("tests/test_outputs.py",)),
    Mutation("alerts: tripping alerts wait behind the budget", "torchwatch/rules/policy.py",
             "            if alert in tripping:", "            if False:", ("tests/test_rules.py",)),
    Mutation("lifecycle: the watch holds the model strongly", "torchwatch/watch.py",
             "        self._model = weakref.ref(model)", "        self._model = (lambda m: lambda: m)(model)",
             ("tests/test_lifecycle.py",)),
    Mutation("drift: 4-D feature maps not averaged", "torchwatch/monitors/drift/reference.py",
             "        return t.mean(dim=tuple(range(2, t.dim())))", "        return t.flatten(1)",
             ("tests/test_drift.py",)),
    Mutation("engine: totals keep only the latest interval", "torchwatch/engine/totals.py",
             "self._values[name] = value if name not in self._values else monitors[name].merge(known, value)",
             "self._values[name] = value", ("tests/test_monitors.py", "tests/test_inputs.py")),
    Mutation("engine: a position's totals skip an interval", "torchwatch/engine/totals.py",
             "                self._positions[key] = s if total is None else total.merge(s)",
             "                self._positions[key] = s", ("tests/test_watch.py",)),
    Mutation("engine: graph replays not counted", "torchwatch/monitors/base.py",
             "        self.calls += calls\n", "        self.calls += 0\n", ("tests/test_compile.py",)),
    Mutation("on_output runs on unsampled calls", "torchwatch/monitors/base.py",
             "            if call is None or not call.sampled or graph_mode():",
             "            if call is None or graph_mode():", ("tests/test_monitors.py", "tests/test_histograms.py")),
    Mutation("histograms: a bucket bound off by one power", "torchwatch/monitors/histograms.py",
             "BOUNDS = (0.0, *(2.0**e for e in range(-24, 17, 2)))",
             "BOUNDS = (0.0, *(2.0**e for e in range(-23, 18, 2)))", ("tests/test_histograms.py",)),
    Mutation("histograms: NaN counted as the largest bucket", "torchwatch/monitors/histograms.py",
             ".masked_fill_(flat.isnan(), BUCKETS)", ".masked_fill_(flat.isnan(), BUCKETS - 1)",
             ("tests/test_histograms.py",)),
    Mutation("prometheus: histogram buckets not cumulative", "torchwatch/monitors/histograms.py",
             "                running += n\n", "                running = n\n", ("tests/test_histograms.py",)),
    Mutation("records: a registered value read back as plain data", "torchwatch/values.py",
             "    if kind is None or kind.decode is None:", "    if True:",
             ("tests/test_histograms.py", "tests/test_sinks.py")),
    Mutation("capture: a position's first measurement of a window left out of the call's statistics",
             "torchwatch/monitors/activations/window.py",
             "            if detail is not None:\n                detail.append((key[1], raw))", "            pass",
             (CAPTURE_TESTS,)),
    Mutation("capture: the call's inputs referenced, not copied", "torchwatch/capture/monitor.py",
             "job.args, job.kwargs, job.outputs = copied(tuple(args)), copied(dict(kwargs)), copied(output)",
             "job.args, job.kwargs, job.outputs = tuple(args), dict(kwargs), output", (CAPTURE_TESTS,)),
    Mutation("capture: a per-call cast limit doubled", "torchwatch/capture/monitor.py",
             "if n and raw[field][i] > limit * n:", "if n and raw[field][i] > 2 * limit * n:", (CAPTURE_TESTS,)),
    Mutation("capture: one bundle more than max_per_hour", "torchwatch/capture/writer.py",
             "if len(self._written) >= options.max_per_hour:", "if len(self._written) > options.max_per_hour:",
             (CAPTURE_TESTS,)),
    Mutation("capture: a flush-time alert takes the oldest kept call", "torchwatch/capture/monitor.py",
             "        return found[-1] if found else None", "        return found[0] if found else None",
             (CAPTURE_TESTS,)),
    Mutation("capture: a written bundle is not announced", "torchwatch/capture/writer.py",
             "                self._publish(written_alert(job, path))", "                pass", (CAPTURE_TESTS,)),
    Mutation("capture: redact skipped", "torchwatch/capture/writer.py",
             "tree, outputs = options.redact(tree), options.redact(outputs) if outputs is not None else None",
             "tree, outputs = tree, outputs", (CAPTURE_TESTS,)),
    Mutation("bundle: a tensor the story does not name is accepted", "torchwatch/capture/bundle.py",
             "    if set(tensors) != referenced:", "    if set(tensors) < referenced:", (REPLAY_TESTS,)),
    Mutation("replay: the weights are never compared", "torchwatch/capture/verdict.py",
             'changes = weight_changes(weights.get("fingerprint") if isinstance(weights, dict) else None, model)',
             "changes = []", (REPLAY_TESTS,)),
    Mutation("replay: the control run keeps the low precision", "torchwatch/capture/verdict.py",
             "fp32, _ = run(full_precision_copy(model),", "fp32, _ = run(copy.deepcopy(model),", (REPLAY_TESTS,)),
    Mutation("replay: an input range from too few healthy calls is trusted", "torchwatch/capture/reference.py",
             "calls < MIN_CALLS", "calls < 0", (REPLAY_TESTS,)),
    Mutation("replay: outputs always bitwise equal", "torchwatch/capture/verdict.py",
             "        if a.dtype != b.dtype or a.shape != b.shape:\n            return False", "        return True",
             (REPLAY_TESTS,)),
    # issue 29: the fleet comparison
    Mutation("fleet: a tie counts as a majority", "torchwatch/fleet/judge.py",
             "if n * 2 > len(values) and", "if n * 2 >= len(values) and",
             (FLEET_TESTS + "::test_two_replicas_that_disagree_name_neither",
              FLEET_TESTS + "::test_a_two_two_split_is_no_majority")),
    Mutation("fleet: weights never compared", "torchwatch/fleet/judge.py",
             "and p.weights != reference.weights:", "and False:",
             (FLEET_TESTS + "::test_the_majority_decides_and_each_cause_is_named",)),
    Mutation("fleet: a silent rank not reported", "torchwatch/fleet/judge.py",
             'findings[r] = Finding(r, "", "unresponsive", SILENT)', "pass",
             (FLEET_TESTS + "::test_the_majority_decides_and_each_cause_is_named",)),
    Mutation("fleet: robust distance threshold doubled", "torchwatch/fleet/judge.py",
             "abs(v - med) > threshold * scale", "abs(v - med) > 2 * threshold * scale",
             (FLEET_TESTS + "::test_no_majority_names_no_one_bitwise_but_a_far_module_still_shows",
              FLEET_TESTS + "::test_a_module_is_named_past_threshold_scales_from_the_fleet_median_and_not_before")),
    Mutation("fleet: the gate lets requests in during a check", "torchwatch/engine/core.py",
             "                while self._paused:  # a check has", "                while False:  # a check has",
             (FLEET_TESTS + "::test_a_canary_check_never_overlaps_a_request",)),
    Mutation("fleet: canary forwards counted as traffic", "torchwatch/engine/core.py",
             "tls.depth, tls.call, tls.aside = 1, None, True", "tls.depth, tls.call, tls.aside = 0, None, True",
             (FLEET_TESTS + "::test_canary_checks_run_between_requests_and_are_not_counted",)),
    Mutation("fleet: stale canary digest kept in Prometheus", "torchwatch/sinks/prometheus.py",
             "            for labels in self._info.get(name, set()) - now:", "            for labels in ():",
             (FLEET_TESTS + "::test_a_failed_canary_trips_once_and_prometheus_shows_the_current_digest_only",)),
    Mutation("fleet: module summary std off by ddof", "torchwatch/fleet/probe.py",
             "float(finite.std(unbiased=False))", "float(finite.std(unbiased=True))",
             (FLEET_TESTS + "::test_module_summaries_match_a_float64_oracle",)),
    # issue 30: rollout verdicts
    Mutation("rollout: the betting threshold halved", "torchwatch/rollout/sequential.py",
             "self._threshold = math.log(1.0 / alpha)", "self._threshold = math.log(0.5 / alpha)",
             (ROLLOUT_TESTS + "::test_a_mean_test_rejects_at_the_first_sample_its_capital_reaches_one_over_alpha",)),
    Mutation("rollout: the interval is not intersected over time", "torchwatch/rollout/sequential.py",
             "self.lower = max(self.lower, centre - half)", "self.lower = centre - half",
             (ROLLOUT_TESTS + "::test_the_empirical_bernstein_interval_covers_the_mean_and_narrows",)),
    Mutation("rollout: the latency tolerance ignored", "torchwatch/rollout/evidence.py",
             "if cl > k * pu:", "if cl > pu:",
             (ROLLOUT_TESTS + "::test_a_slower_candidate_is_rolled_back_on_p99_latency_and_an_equal_one_is_not",)),
    Mutation("rollout: the quantile's lower bound searched from the wrong side", "torchwatch/rollout/sequential.py",
             "lo, hi = self._lower_edge + 1, len(self.edges)", "lo, hi = self._lower_edge + 1, self._lower_edge + 1",
             (ROLLOUT_TESTS + "::test_quantile_bounds_cover_the_true_quantile_whenever_read",)),
    Mutation("rollout: confidence compared the wrong way round", "torchwatch/rollout/ledger.py",
             'self._add("confidence", pc - cc)', 'self._add("confidence", cc - pc)',
             (ROLLOUT_TESTS
              + "::test_a_less_confident_candidate_is_rolled_back_on_confidence_and_a_more_confident_one_is_not",)),
    Mutation("rollout: one metric's promotion promotes", "torchwatch/rollout/ledger.py",
             'if not missing and evidence and all(e.decision == "promote" for e in evidence):',
             'if not missing and evidence and any(e.decision == "promote" for e in evidence):',
             (ROLLOUT_TESTS + "::test_the_verdict_promotes_only_once_every_metric_has",)),
    Mutation("rollout: accuracy compared the wrong way round", "torchwatch/rollout/ledger.py",
             'self._add("accuracy", pc - cc)', 'self._add("accuracy", cc - pc)',
             (ROLLOUT_TESTS + "::test_with_labels_a_better_candidate_is_promoted_and_a_worse_one_rolled_back",)),
    Mutation("rollout: the canary keeps routing to a rolled-back candidate", "torchwatch/rollout/router.py",
             'use_candidate = self._final is None or self._final.decision != "rollback"', "use_candidate = True",
             (ROLLOUT_TESTS
              + "::test_a_candidate_that_raises_never_breaks_a_request_and_is_rolled_back_then_gets_no_traffic",)),
    Mutation("rollout: class shares counted twice where both versions agree", "torchwatch/rollout/evidence.py",
             "plus, minus = plus - same, minus - same", "pass",
             (ROLLOUT_TESTS + "::test_class_mix_decides_when_per_row_tests_of_each_class_would",)),
    Mutation("bench intervals: processes never resampled", BENCH_STATS,
             "drawn = rng.choices(groups, k=len(groups)) if len(groups) > 1 else groups", "drawn = groups",
             (BENCH_TESTS,)),
    Mutation("bench intervals: a 50% interval called 95%", BENCH_STATS,
             "values[int(0.025 * BOOTSTRAPS)], values[int(0.975 * BOOTSTRAPS) - 1]",
             "values[int(0.25 * BOOTSTRAPS)], values[int(0.75 * BOOTSTRAPS) - 1]", (BENCH_TESTS,)),
    Mutation("bench intervals: a vanished floor gives a bound", BENCH_STATS,
             'return float("inf") if value != value else value', "return value", (BENCH_TESTS,)),
    Mutation("bench x floor: a zero floor divides", BENCH_STATS,
             "return median_overhead(plain, watched) / f if f > 0",
             "return median_overhead(plain, watched) / f if f >= 0", (BENCH_TESTS,)),
)  # fmt: skip


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _build(root: Path) -> bool:
    # setuptools copies the last good build from build/ when an optional extension fails to
    # compile: a stale kernel would hide the very mutation that breaks the build
    shutil.rmtree(root / "build", ignore_errors=True)
    for so in (root / "torchwatch" / "kernels").glob("_cstats*.so"):
        so.unlink()
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=root,
                          capture_output=True, text=True)  # fmt: skip
    return done.returncode == 0 and any((root / "torchwatch" / "kernels").glob("_cstats*.so"))


def _tests_fail(root: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider",
           "-n", "2", *tests]  # fmt: skip
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    return done.returncode != 0, (done.stdout.strip().splitlines() or [""])[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", default="", help="only mutations whose name contains this")
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if args.k in m.name]
    survived = []
    with tempfile.TemporaryDirectory(prefix="tw-mutations-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        if not _build(root):
            sys.exit("the unmutated kernel does not build in the copy")
        check = subprocess.run([sys.executable, "-c", "import torchwatch; print(torchwatch.__file__)"], cwd=root,
                               env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)  # fmt: skip
        if not check.stdout.startswith(str(root)):
            sys.exit(f"the copy's torchwatch is not the one imported: {check.stdout or check.stderr}")
        for m in chosen:
            path = root / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                sys.exit(f"{m.name}: the text to mutate is not in {m.path} exactly once (update this list)")
            start = time.monotonic()
            path.write_text(original.replace(m.old, m.new))
            try:
                if m.path.endswith(".c"):
                    _build(root)  # a kernel that does not build is itself the mutation to catch
                caught, last = _tests_fail(root, m.tests)
            finally:
                path.write_text(original)
                if m.path.endswith(".c"):
                    _build(root)
            verdict = "caught" if caught else "SURVIVED"
            print(f"{verdict:<9} {m.name:<55} {time.monotonic() - start:6.0f} s  {last}", flush=True)
            if not caught:
                survived.append(m.name)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
