"""CUDA: no host sync in the hot path, graphs keep counting, GPU statistics equal the CPU ones.

Skipped without a GPU. Each path here has a CPU twin that CI runs: the torch-ops device path
(test_watch.py, ``device_watch(...)``), the fused kernel in Triton's interpreter
(test_triton_kernel.py) and compiled graphs (test_compile.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading

import pytest
import torch
from _models import Inject, mlp
from _oracle import assert_matches, oracle
from conftest import cuda

import torchwatch as tw

pytestmark = cuda


@contextlib.contextmanager
def no_sync():
    """Any host synchronisation inside the block raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_an_instrumented_forward_never_synchronises():
    model = mlp(inject=Inject(at=(1,))).cuda()
    x = torch.randn(8, 16, device="cuda")
    with tw.attach(model, on_nonfinite="warn", flush_every=10**9) as watch:
        model(x)  # the first call learns the output positions
        with no_sync():
            for _ in range(3):
                model(x)
        snap = watch.snapshot()  # reading happens here, off the hot path
    assert snap["0"].calls == 4
    assert snap.nonfinite["6"].origin == "1"
    assert watch.errors == {}


def test_a_flush_does_not_synchronise_the_serving_thread():
    model = mlp().cuda()
    x = torch.randn(8, 16, device="cuda")
    sink = tw.MemorySink()
    with tw.attach(model, sinks=[sink], flush_every=2) as watch:
        model(x)
        model(x)  # flushes: the copy runs on a side stream, the worker thread waits for it
        with no_sync():
            for _ in range(4):
                model(x)  # two more flushes
        watch.flush()
    assert [r.calls for r in sink.records] == [2, 2, 2]
    assert all(r.stats["0"].calls == 2 for r in sink.records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_statistics_match_the_oracle(dtype):
    x = (torch.randn(4097, 33) * 300).to(dtype)
    x[0, 0] = math.nan
    x[1, 1] = math.inf
    x[2, :5] = 1e-30
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ReLU()).cuda()
    with tw.attach(model, modules=["1"], on_nonfinite="ignore") as watch:
        model(x.cuda())
        got = watch.snapshot()["1"]
    assert_matches(got, oracle(torch.relu(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_and_own_launches_on_gpu_match_the_oracle_without_a_sync(dtype, monkeypatch):
    """Small outputs held for one grouped launch per call, a large one launched alone, NaN/Inf
    in some: equal to the oracle, no host sync, one grouped launch per call, nothing held after."""
    from torchwatch.kernels import triton_stats

    grouped = []
    merge_group = triton_stats.merge_group
    monkeypatch.setattr(triton_stats, "merge_group", lambda *a: (grouped.append(len(a[1])), merge_group(*a)))
    torch.manual_seed(0)
    big = triton_stats.GROUPED_BYTES // torch.finfo(dtype).bits * 8 + 1000
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, big)).cuda().to(dtype)
    xs = [torch.randn(1, 16, device="cuda", dtype=dtype) for _ in range(3)]
    xs[1][0, 3] = math.nan
    with tw.attach(model, on_nonfinite="ignore", flush_every=10**9) as watch:
        model(xs[0])  # learns the positions, measures each at once (a probe for in-place changes)
        with no_sync():
            for x in xs[1:]:
                model(x)
        snap = watch.snapshot()
    assert grouped == [3, 3]  # input, "0" and "1" in one launch per call after the first; "2" (big) alone
    with torch.no_grad():
        for name, upto in (("0", 1), ("1", 2), ("2", 3)):
            want = torch.cat([model[:upto](x) for x in xs]).float().cpu()
            assert_matches(snap[name], oracle(want.to(dtype)))


def test_inference_mode_outputs_are_grouped_after_a_probe_read_without_a_wait(monkeypatch):
    """Under inference_mode a probe compares a copy on the device; its answer is read once the
    device has finished (an event, never a wait), then the positions are held and grouped."""
    from torchwatch.kernels import triton_stats

    grouped = []
    merge_group = triton_stats.merge_group
    monkeypatch.setattr(triton_stats, "merge_group", lambda *a: (grouped.append(len(a[1])), merge_group(*a)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
    xs = [torch.randn(2, 16, device="cuda") for _ in range(5)]
    with tw.attach(model, flush_every=10**9) as watch, torch.inference_mode():
        model(xs[0])  # measured at once, probed: copies compared on the device
        torch.cuda.synchronize()
        with no_sync():
            for x in xs[1:]:
                model(x)  # call 2 reads the answers at its end; calls 3 to 5 are grouped
        snap = watch.snapshot()
        assert watch.errors == {}
    assert grouped == [4, 4, 4]  # the input and three outputs
    with torch.no_grad():
        want = torch.cat([model(x) for x in xs]).cpu()
    assert_matches(snap["2"], oracle(want))


def test_cuda_graph_replays_keep_counting_with_device_sampling():
    model = mlp().cuda()
    static_x = torch.randn(8, 16, device="cuda")
    with tw.attach(model, every=2, sampling="device") as watch:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static_x)  # eager warm-up: slots exist before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_x)
        for _ in range(6):
            graph.replay()
        snap = watch.snapshot()
    assert snap["0"].calls == 1 + 3  # the eager call, then replays 0, 2 and 4
    assert snap.calls == 1 + 6


def test_reduce_overhead_compile_counts_every_replay():
    torch._dynamo.reset()
    model = mlp().cuda()
    x = torch.randn(8, 16, device="cuda")
    with tw.attach(model) as watch:
        compiled = torch.compile(model, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(8):
                compiled(x)
        snap = watch.snapshot()
    assert snap["0"].calls == 8 and snap.calls == 8
    assert_matches(snap["5"], oracle(torch.cat([model(x).detach().reshape(-1)] * 8)))


def test_raise_policy_on_gpu():
    model = mlp(inject=Inject(at=(0,))).cuda()
    with tw.attach(model, on_nonfinite="raise"), pytest.raises(tw.NonFiniteError, match="in '1' on call 0"):
        model(torch.randn(2, 16, device="cuda"))


def test_drift_monitoring_never_synchronises():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
    ref = tw.Reference.fit(model, [torch.randn(64, 16) for _ in range(40)], modules=["1"], window=8,
                           components=4, features=16, resamples=500)  # fmt: skip
    model.cuda()
    x = torch.randn(8, 16, device="cuda")
    with tw.attach(model, drift=ref, flush_every=2) as watch:
        model(x)
        model(x)  # a flush: the drift rings are copied on the side stream
        with no_sync():
            for _ in range(4):
                model(x)
        snap = watch.snapshot()
    assert snap.drift["1"].windows == 6
    assert watch.errors == {}


# ---- integrity on the GPU (CPU twins: test_fingerprint.py, test_manifest.py, test_canary.py) ----


def _weights_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(300, 1000), torch.nn.LayerNorm(1000), torch.nn.Linear(1000, 77))
    model.register_buffer("odd", torch.arange(13, dtype=torch.int16))  # 26 bytes: a padded copy
    return model.eval()


def test_fingerprint_on_cuda_equals_the_cpu_fingerprint_of_the_same_bytes():
    model = _weights_model()
    on_cpu = tw.fingerprint(model, chunk_bytes=1 << 14)
    model.cuda()
    triton_fp = tw.fingerprint(model, chunk_bytes=1 << 14)
    twin_fp = tw.fingerprint(model, chunk_bytes=1 << 14, backend="torch")
    assert triton_fp == twin_fp == on_cpu
    assert {p.device for p in triton_fp.tensors.values()} == {"cuda:0"}


def test_fingerprint_and_manifest_see_writes_still_queued_on_the_serving_stream():
    model = _weights_model().cuda()
    before = tw.fingerprint(model)
    manifest = tw.Manifest.from_model(model)
    torch.cuda._sleep(200_000_000)  # keep the default stream busy, then queue a write behind it
    with torch.no_grad():
        model[2].bias.add_(1.0)
    changes = before.diff(tw.fingerprint(model))
    assert [(c.tensor, c.chunk) for c in changes] == [("2.bias", 0)]
    torch.cuda._sleep(200_000_000)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    assert tw.verify_weights(model, manifest).mismatched == ["0.weight", "2.bias"]


def test_manifest_from_a_cuda_model_equals_the_cpu_one_and_the_file():
    model = _weights_model()
    cpu_manifest = tw.Manifest.from_model(model)
    model.cuda().half()
    from_gpu = tw.Manifest.from_model(model)
    assert from_gpu.tensors["odd"] == cpu_manifest.tensors["odd"]
    assert from_gpu.tensors["0.weight"].dtype == "float16"
    assert from_gpu == tw.Manifest.from_model(model.cpu())


def test_canary_across_devices_uses_summary_metrics_and_same_device_is_bitwise():
    torch.manual_seed(0)
    model = mlp(64)
    x = torch.randn(256, 64)
    canary = tw.Canary.record(model, x)
    report = canary.verify(model.cuda())
    assert report.mode == "summary" and report.ok, report.summary()
    on_gpu = tw.Canary.record(model, x)
    again = on_gpu.verify(model)
    assert again.mode == "bitwise" and again.ok, again.summary()
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    assert not on_gpu.verify(model).ok


def test_latency_on_cuda_uses_events_without_a_host_sync():
    model = mlp(64).cuda()
    x = torch.randn(32, 64, device="cuda")
    with tw.attach(model, flush_every=10**6, rules=[]) as watch:
        model(x)
        with no_sync():
            for _ in range(20):
                model(x)
        torch.cuda.synchronize()
        snap = watch.snapshot()
    assert watch.engine.monitor("latency").timer.cuda and snap.latency.count == 21
    assert 0 < snap.latency.p50_ms < 1000 and watch.errors == {}


def test_input_and_output_monitors_never_synchronise_and_equal_the_cpu_figures():
    torch.manual_seed(0)
    cpu_model = torch.nn.Sequential(torch.nn.Embedding(3000, 8), torch.nn.Flatten(), torch.nn.Linear(64, 5))
    gpu_model = copy.deepcopy(cpu_model).cuda()
    ids = torch.randint(0, 2500, (16, 8))
    results = []
    for model, x in ((cpu_model, ids), (gpu_model, ids.cuda())):
        with tw.attach(model, outputs=True, timing=True, flush_every=2) as watch:
            with watch.context(trace_id="t0"), torch.no_grad():
                model(x)  # the first call makes the accumulators
            if x.is_cuda:
                with no_sync():
                    for _ in range(3):  # includes a flush: device-side copies only
                        model(x)
            else:
                for _ in range(3):
                    model(x)
            snap = watch.snapshot()
            results.append((snap.inputs["<input>"].ids, snap.outputs))
            assert watch.record_labels("t0", torch.zeros(16, dtype=torch.long)) == 16
    (cpu_ids, cpu_q), (gpu_ids, gpu_q) = results
    assert (gpu_ids.count, gpu_ids.min, gpu_ids.max) == (cpu_ids.count, cpu_ids.min, cpu_ids.max)
    assert (gpu_ids.counts == cpu_ids.counts).all()
    assert gpu_q.rows == cpu_q.rows == 64
    assert gpu_q.confidence == pytest.approx(cpu_q.confidence, rel=1e-4)
    assert gpu_q.normalized_entropy == pytest.approx(cpu_q.normalized_entropy, rel=1e-4)


def test_shadow_on_cuda_agrees_for_a_copy_and_leaves_the_primary_alone():
    primary = mlp().cuda().eval()
    release = threading.Event()

    class Held(torch.nn.Module):  # the sync-debug mode is process-wide: the shadow thread waits it out
        def __init__(self) -> None:
            super().__init__()
            self.inner = copy.deepcopy(primary)

        def forward(self, x):
            release.wait(60)
            return self.inner(x)

    x = torch.randn(8, 16, device="cuda")
    with torch.no_grad():
        expected = primary(x)
    with tw.shadow(primary, Held(), sample=1.0, max_pending=64) as sh:
        with torch.no_grad(), no_sync():
            outs = [primary(x) for _ in range(10)]
        release.set()
        assert sh.wait()
        result = sh.report()
    assert all(torch.equal(o, expected) for o in outs)
    assert result.calls == 10 and result.outputs[0].rel_l2 == 0.0


def test_capture_keeps_recent_calls_on_the_device_without_a_sync_and_writes_the_faulting_one(tmp_path):
    model = mlp().cuda()
    capture = tw.Capture(tmp_path / "inc", inputs=True)  # keep=None: 4 calls kept for CUDA tensors
    xs = [torch.randn(8, 16, device="cuda") for _ in range(3)]
    xs[1][0, 0] = math.nan
    with tw.attach(model, capture=capture, on_nonfinite="ignore", flush_every=10**9) as watch:
        with no_sync():
            for i, x in enumerate(xs):
                with torch.no_grad(), watch.context(trace_id=f"req-{i}"):
                    model(x)
        watch.flush()  # the device's NaN is found here, and its call taken from the ring
        watch.engine.monitor("capture").close(60)
    (path,) = tw.Incident.list(capture.directory)
    incident = tw.Incident.load(path)
    assert (incident.call, incident.trace_id, incident.meta["exact"]) == (1, "req-1", True)
    assert incident.environment["device"] == "cuda" and incident.meta["stats_scope"] == "interval"
    assert torch.equal(incident.args[0].nan_to_num(), xs[1].cpu().nan_to_num())
    report = incident.replay(model)  # on the GPU, as captured
    assert report.culprit == "data" and report.bitwise is True


def test_a_canary_call_through_a_rollout_never_synchronises_the_serving_thread():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda().eval()
    x = torch.randn(8, 16, device="cuda")
    ro = tw.rollout(model, copy.deepcopy(model), share=0.5, seed=0, metrics=["confidence"])
    with torch.inference_mode():
        ro(x)  # first calls outside: allocator, kernels
        ro.wait()
        ro._stop.set()  # the evidence thread reads results to the host: the serving thread alone here
        ro._thread.join(5)
        with no_sync():
            for _ in range(20):
                ro(x)
    assert sum(ro.calls.values()) == 21 and ro.dropped == 0


def test_rollouts_decide_on_the_gpu_as_on_the_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda().eval()
    swapped = copy.deepcopy(model)
    with torch.no_grad():  # classes 0 and 1 swapped for every input: a bad export
        swapped[2].weight[[0, 1]] = swapped[2].weight[[1, 0]].clone()
        swapped[2].bias[[0, 1]] = swapped[2].bias[[1, 0]].clone()
    for candidate, mode, want in ((copy.deepcopy(model), "canary", "promote"), (swapped, "shadow", "rollback")):
        metrics = ["confidence", "entropy", "errors"] if mode == "canary" else ["agreement", "confidence"]
        with tw.rollout(model, candidate, mode=mode, share=0.5, seed=0, metrics=metrics) as ro:
            with torch.inference_mode():
                for i in range(3000):
                    ro(torch.randn(16, 8, device="cuda"))
                    if i % 50 == 49:
                        ro.wait()
                        if ro.verdict().decision != "continue":
                            break
            assert ro.verdict().decision == want, ro.verdict().reason
