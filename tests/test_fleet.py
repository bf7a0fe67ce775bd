"""Replicas compared with each other: identity in records, the canary re-checked while serving,
``compare_replicas`` over real gloo process groups, and the Prometheus queries against a real
Prometheus server scraping real replica processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _prometheus import prometheus, wait_until

import torchwatch as tw
from torchwatch.cli import main
from torchwatch.fleet.judge import judge
from torchwatch.fleet.probe import ModuleProbe, Probe, take
from torchwatch.fleet.promql import queries, query

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- identity ---------------------------------------------------------------------------------


def test_every_record_names_its_replica_and_logged_alerts_carry_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHWATCH_REPLICA", "pod-a")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    path = tmp_path / "log.jsonl"
    with tw.attach(model, sinks=[tw.JsonlSink(path)], on_nonfinite="ignore") as watch:
        model(torch.tensor([[float("nan"), 1.0, 2.0, 3.0]]))
        watch.publish(tw.Alert("queue", "", "depth", 1.0, 0.0, -1, time.time(), None, None, "deep"))
        watch.flush()
        assert watch.alerts[-1].replica is None  # in the process that raised it
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    record = next(r for r in lines if "identity" in r and r.get("alerts"))
    assert record["identity"]["replica"] == "pod-a"
    assert record["identity"]["pid"] == os.getpid()
    assert record["identity"]["torch"] == torch.__version__
    assert {a["replica"] for a in record["alerts"]} == {"pod-a"}
    back = tw.Record.from_json(record)
    assert back.identity == tw.Identity.of(torch.device("cpu"), replica="pod-a")
    assert all(a.replica == "pod-a" for a in back.alerts)


def test_attach_replica_overrides_the_environment_and_is_checked(monkeypatch):
    monkeypatch.setenv("TORCHWATCH_REPLICA", "from-env")
    with tw.attach(torch.nn.Linear(2, 2), replica="given") as watch:
        assert watch.snapshot().identity.replica == "given"
    with tw.attach(torch.nn.Linear(2, 2)) as watch:
        assert watch.snapshot().identity.replica == "from-env"
    for bad in ("", "  ", 3):
        with pytest.raises(tw.ConfigError, match="replica"):
            tw.attach(torch.nn.Linear(2, 2), replica=bad)


def test_the_report_says_which_replica_each_finding_came_from(tmp_path, capsys):
    for name, bad in (("replica-a", False), ("replica-b", True)):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        with tw.attach(model, sinks=[tw.JsonlSink(tmp_path / f"{name}.jsonl")], replica=name,
                       on_nonfinite=lambda alert: None) as watch:  # fmt: skip
            x = torch.ones(2, 4)
            if bad:
                x[0, 0] = float("inf")
            model(x)
            watch.flush()
    assert main(["report", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "2 replicas merged" in out
    assert "of replica replica-b" in out
    assert "[replica-b]" in out and "[replica-a]" not in out


# ---- the canary re-checked while serving -------------------------------------------------------


class _Guarded(torch.nn.Module):
    """Counts how many forwards run at once: a canary check must never overlap a request."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)
        self.active = 0
        self.overlaps = 0
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.active += 1
            self.overlaps += self.active > 1
        try:
            time.sleep(0.001)
            return self.lin(x).relu()
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.timeout(120)  # a gate that waits for itself hangs: fail, do not wait 10 minutes
def test_canary_checks_run_between_requests_and_are_not_counted():
    model = _Guarded()
    canary = tw.Canary.record(model, torch.randn(4, 32))
    sink = tw.MemorySink()
    stop = threading.Event()
    served = [0, 0]

    def serve(slot: int) -> None:
        x = torch.randn(2, 32)
        while not stop.is_set():
            model(x)
            served[slot] += 1

    with tw.attach(model, sinks=[sink], flush_every=10**6) as watch:
        checks = watch.verify_canary_every(3600, canary)
        threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        reports = [checks.check_now() for _ in range(20)]
        stop.set()
        for t in threads:
            t.join()
        snap = watch.snapshot()
        watch.flush()
    assert all(r.ok for r in reports)
    calls = sum(served)
    assert watch.calls == calls  # the canary's forwards are not root calls of the watch
    assert snap["lin"].count == calls * 2 * 32  # nor measured
    status = sink.records[-1].extra["canary"]
    assert status.checks == 20 and status.failed == 0
    assert status.digests == reports[-1].digests
    assert status.weights == tw.fingerprint(model).digest


@pytest.mark.timeout(120)  # a gate that waits for itself hangs: fail, do not wait 10 minutes
def test_a_canary_check_never_overlaps_a_request():
    """One serving thread, so any overlap can only be the canary's forward with a request."""
    model = _Guarded()
    canary = tw.Canary.record(model, torch.randn(4, 32))
    stop = threading.Event()

    def serve() -> None:
        x = torch.randn(2, 32)
        while not stop.is_set():
            model(x)

    with tw.attach(model) as watch:
        checks = watch.verify_canary_every(3600, canary)
        thread = threading.Thread(target=serve)
        thread.start()
        for _ in range(30):
            assert checks.check_now().ok
        stop.set()
        thread.join()
    assert model.overlaps == 0


@pytest.mark.timeout(120)  # a gate that waits for itself hangs: fail, do not wait 10 minutes
def test_a_failed_canary_trips_once_and_prometheus_shows_the_current_digest_only():
    pytest.importorskip("prometheus_client")
    model = torch.nn.Linear(4, 3)
    canary = tw.Canary.record(model, torch.randn(5, 4))
    sink = tw.PrometheusSink(port=0, model_name="canary-test")
    with tw.attach(model, sinks=[sink], replica="r9") as watch:
        checks = watch.verify_canary_every(3600, canary)
        good = checks.check_now()
        watch.flush()
        first = _scrape(sink.port)
        with torch.no_grad():
            model.weight[0, 0] += 0.5
        with pytest.warns(tw.TorchwatchWarning, match="canary re-check failed"):
            bad = checks.check_now()
        checks.check_now()  # the same wrong answer: no second alert
        watch.flush()
        second = _scrape(sink.port)
    assert good.ok and not bad.ok
    assert [a.rule for a in watch.alerts].count("canary") == 1
    assert watch.trips == 1
    digest = good.digests["output"]
    assert f'digest="{digest}"' in first
    assert f'digest="{digest}"' not in second  # replaced, not kept beside the new one
    assert f'digest="{bad.digests["output"]}"' in second
    assert 'torchwatch_canary_checks_total{model="canary-test",result="fail"} 2.0' in second
    assert 'replica="r9"' in second


def test_verify_canary_every_rejects_bad_arguments(tmp_path):
    model = torch.nn.Linear(2, 2)
    canary = tw.Canary.record(model, torch.randn(1, 2))
    with tw.attach(model) as watch:
        for seconds in (0, -1, float("nan"), "5"):
            with pytest.raises(tw.ConfigError):
                watch.verify_canary_every(seconds, canary)
        with pytest.raises(tw.ConfigError, match="canary"):
            watch.verify_canary_every(10, torch.randn(1, 2))
        with pytest.raises(tw.FormatError):
            watch.verify_canary_every(10, tmp_path / "missing.safetensors")


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


# ---- the judgement, on probes made by hand ----------------------------------------------------------


def _probe(rank: int, *, outputs: str = "o", weights: str = "w", threads: int = 2, modules=None) -> Probe:
    ident = tw.Identity(f"r{rank}", "h", rank, rank, None, 4, "cpu", "CPU X", "", "CPU X", "2", "", "")
    rows = modules or [ModuleProbe("a", "da", 0.0, 1.0, 3.0), ModuleProbe("b", "db" + outputs, 0.5, 2.0, 5.0)]
    return Probe(ident, {"torch": "2", "dtype": "float32", "threads": threads}, "in", {"out": outputs}, rows,
                 weights, {"t.weight": weights})  # fmt: skip


def test_the_majority_decides_and_each_cause_is_named():
    probes = {0: _probe(0), 1: _probe(1, outputs="x"), 2: _probe(2, weights="v", outputs="y"), 3: _probe(3),
              4: _probe(4, threads=1, outputs="z"), 5: _probe(5), 6: None}  # fmt: skip
    report = judge(list(range(7)), probes)
    causes = {f.rank: f.cause for f in report.findings}
    assert causes == {1: "hardware", 2: "weights", 4: "configuration", 6: "unresponsive"}
    assert report.finding(1).module == "b"  # the first module whose output differs
    assert report.finding(2).differs["tensors"] == ["t.weight"]
    assert report.finding(4).differs["threads"] == [1, 2]
    assert not report.ok and report.answered == [0, 1, 2, 3, 4, 5]


def test_no_majority_names_no_one_bitwise_but_a_far_module_still_shows():
    same = [ModuleProbe("a", f"d{r}", 0.0, 1.0 + r * 1e-4, 3.0) for r in range(4)]
    far = ModuleProbe("a", "dx", 0.0, 1.0, 30.0)
    probes = {r: _probe(r, outputs=f"o{r}", modules=[same[r]]) for r in range(4)}
    assert judge(list(range(4)), probes).ok  # all differ a little: rounding, nobody to blame
    probes[3] = _probe(3, outputs="o3", modules=[far])
    report = judge(list(range(4)), probes)
    assert [(f.rank, f.cause, f.module) for f in report.findings] == [(3, "hardware", "a")]


def test_a_module_is_named_past_threshold_scales_from_the_fleet_median_and_not_before():
    # five replicas with no bitwise majority; absmax 3.0 on four of them: MAD 0, so the scale is
    # rel_floor * |median| = 0.03 and the default threshold of 8 scales is 0.24 from the median
    def fleet(absmax: float) -> dict:
        rows = {r: [ModuleProbe("a", f"d{r}", 0.0, 1.0, 3.0)] for r in range(4)}
        rows[4] = [ModuleProbe("a", "d4", 0.0, 1.0, absmax)]
        return {r: _probe(r, outputs=f"o{r}", modules=rows[r]) for r in range(5)}

    assert judge(list(range(5)), fleet(3.0 + 0.18)).ok  # 6 scales: within the fleet's spread
    report = judge(list(range(5)), fleet(3.0 + 0.36))  # 12 scales
    assert [(f.rank, f.cause, f.module) for f in report.findings] == [(4, "hardware", "a")]


def test_a_two_two_split_is_no_majority():
    probes = {0: _probe(0), 1: _probe(1), 2: _probe(2, outputs="x"), 3: _probe(3, outputs="x")}
    assert judge(list(range(4)), probes).ok


def test_two_replicas_that_disagree_name_neither():
    report = judge([0, 1], {0: _probe(0), 1: _probe(1, outputs="x")})
    assert report.ok


def test_a_probe_survives_json_and_hostile_messages_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
    probe = take(model, tw.Canary.record(model, torch.randn(2, 3)))
    back = Probe.from_dict(json.loads(json.dumps(probe.to_dict())))
    assert back.outputs == probe.outputs and back.weights == probe.weights
    assert [m.name for m in back.modules] == ["0", "1"]
    assert back.modules[1].absmax == probe.modules[1].absmax
    for bad in (None, [], {"identity": {}}, {**probe.to_dict(), "modules": [["a"]]}):
        with pytest.raises(tw.FormatError):
            Probe.from_dict(bad)


def test_module_summaries_match_a_float64_oracle():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    x = torch.randn(5, 8)
    probe = take(model, tw.Canary.record(model, x))
    with torch.no_grad():
        h = model[0](x).double()
    row = probe.modules[0]
    assert row.name == "0"
    assert row.mean == pytest.approx(float(h.mean()), rel=1e-12)
    assert row.std == pytest.approx(float(h.std(unbiased=False)), rel=1e-12)
    assert row.absmax == float(h.abs().max())


# ---- compare_replicas: 4 gloo ranks, real processes -----------------------------------------------


@pytest.mark.xdist_group("heavy")
def test_four_gloo_ranks_name_the_odd_rank_and_why(tmp_path):
    pytest.importorskip("transformers")
    import _fleet_ranks

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_fleet_ranks.run, args=(r, 4, port, str(tmp_path / "canary.safetensors"), results))
             for r in range(4)]  # fmt: skip
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=600) for _ in range(4))
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()

    def causes(rank: int, name: str) -> dict[int, tuple[str, str | None]]:
        return {f["rank"]: (f["cause"], f["module"]) for f in got[rank][name]["findings"]}

    for rank in range(4):
        assert got[rank]["agree"]["ok"], got[rank]["agree"]
        assert causes(rank, "bit") == {2: ("weights", "encoder.layer.5.attention.self.query")}
        assert causes(rank, "sdc") == {1: ("hardware", _fleet_ranks.SDC_MODULE)}
        assert causes(rank, "dtype") == {3: ("configuration", "embeddings.word_embeddings")}
        threads = causes(rank, "threads").get(3)
        assert threads is None or threads[0] == "configuration"  # other threads may or may not change the bits
    dtype = next(f for f in got[0]["dtype"]["findings"] if f["rank"] == 3)
    assert dtype["differs"]["dtype"] == ["bfloat16", "float32"]
    for rank in range(3):  # the survivors report the dead rank within the timeout and finish
        assert causes(rank, "dead") == {3: ("unresponsive", None)}
        assert got[rank]["dead"]["seconds"] < 10.0 + 20.0
        assert got[rank]["dead"]["answered"] == [0, 1, 2]
    assert not got[2]["healthy"] and not got[1]["healthy"]  # the odd ranks' own watches tripped
    assert got[0]["healthy"] and any("replica-1 (rank 1)" in m and "hardware" in m for m in got[0]["alerts"])
    assert all(got[r]["calls"] == 0 for r in range(4))  # the canary runs are not counted as traffic


# ---- the same from Prometheus: real replica processes scraped by a real server ---------------------


@pytest.mark.xdist_group("heavy")
def test_prometheus_finds_the_odd_replicas_with_the_documented_queries(tmp_path):
    import _fleet_replica

    canary = tmp_path / "canary.safetensors"
    model = _fleet_replica.build()
    tw.Canary.record(model, torch.randn(4, 16, generator=torch.Generator().manual_seed(2))).save(canary)
    faults = {"pod-0": "none", "pod-1": "none", "pod-2": "weights", "pod-3": "none", "pod-4": "sdc"}
    replicas = {
        name: subprocess.Popen([sys.executable, str(HERE / "_fleet_replica.py"), name, fault, str(canary)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name, fault in faults.items()
    }  # fmt: skip
    try:
        ports = [int(p.stdout.readline()) for p in replicas.values()]
        with prometheus(tmp_path, ports) as url:
            wait_until(lambda: len(query(url, "torchwatch_canary_info")) == 5 and len(query(url, "torchwatch_std")) >= 15,
                       "Prometheus did not scrape the five replicas")  # fmt: skip
            code, out = _fleet_cli(url)
            assert code == 1
            found = {f["replica"]: f for f in out["findings"]}
            assert set(found) == {"pod-2", "pod-4"}
            assert found["pod-2"]["cause"] == "weights"
            assert found["pod-4"]["cause"] == "hardware"
            assert "1" in found["pod-4"]["modules"]  # the module computing wrong, from its statistics
            assert out["replicas"] == {"clf": 5}
            # the documented canary query alone names both odd replicas
            names = {s["metric"]["replica"] for s in query(url, queries()["canary"])}
            assert names == {"pod-2", "pod-4"}
    finally:
        for p in replicas.values():
            p.stdin.close()
            p.wait(30)


def _fleet_cli(url: str) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, "-m", "torchwatch", "fleet", "--prometheus", url, "--json"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.stdout.startswith("{"), result.stderr
    return result.returncode, json.loads(result.stdout)
