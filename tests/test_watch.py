"""attach(): selection, lifecycle, sampling, snapshots, labels, provenance and on_nonfinite."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
from _device import device_watch
from _models import Inject, Wrapper, mlp
from _oracle import assert_matches, oracle
from torch import nn

import torchwatch as tw
from torchwatch.monitors.activations import monitor as activations_module


def _hook_counts(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


class HookProbe(nn.Module):
    """Records how many forward hooks it had while running (to see sampling from inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(len(self._forward_hooks))
        return x * 1.0


def test_default_selection_is_leaves_without_dropout_or_identity():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Identity(), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    with tw.attach(model) as watch:
        assert watch.modules == ["0", "3.0", "3.1"]


def test_stats_of_every_watched_output_match_the_oracle():
    model = mlp()
    x = torch.randn(5, 16)
    outputs = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o.detach().clone()))
               for n, m in model.named_modules() if n]  # fmt: skip
    with tw.attach(model) as watch:
        model(x)
        snap = watch.snapshot()
    for h in handles:
        h.remove()
    assert list(snap) == ["<input>", "0", "1", "3", "4", "5"]  # execution order, Dropout skipped
    outputs["<input>"] = x
    for name in snap:
        assert_matches(snap[name], oracle(outputs[name]))


def test_detach_removes_exactly_its_own_hooks_and_is_idempotent():
    model = mlp()
    model[0].register_forward_hook(lambda *a: None)
    model.register_forward_pre_hook(lambda *a: None)
    before = _hook_counts(model)
    watch = tw.attach(model)
    assert _hook_counts(model) != before
    watch.detach()
    assert _hook_counts(model) == before
    watch.detach()
    assert _hook_counts(model) == before and not watch.attached


def test_context_manager_detaches():
    model = mlp()
    with tw.attach(model) as watch:
        assert watch.attached
    assert not watch.attached
    assert _hook_counts(model) == _hook_counts(mlp())


def test_attaching_twice_is_an_error_until_detached():
    model = mlp()
    watch = tw.attach(model)
    with pytest.raises(tw.ConfigError, match=r"this Sequential is already watched by Watch\(Sequential, 5 modules"):
        tw.attach(model)
    watch.detach()
    tw.attach(model).detach()


def test_watch_holds_the_model_weakly():
    model = mlp()
    watch = tw.attach(model)
    model(torch.randn(2, 16))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert watch.model is None
    assert watch.snapshot()["0"].calls == 1  # the statistics outlive the model
    watch.detach()


def test_every_n_measures_one_call_in_n_and_skips_hooks_entirely_otherwise():
    probe = HookProbe()
    model = nn.Sequential(nn.Linear(3, 3), probe)
    with tw.attach(model, every=4) as watch:
        for _ in range(10):
            model(torch.randn(1, 3))
        snap = watch.snapshot()
    assert snap.calls == 10 and snap.sampled == 3  # calls 0, 4, 8
    assert snap["1"].calls == 3
    assert probe.seen == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0]  # unsampled calls ran with no hook at all


def test_every_one_keeps_hooks_installed_between_calls():
    model = mlp()
    with tw.attach(model, every=1):
        assert len(model[0]._forward_hooks) == 1


def test_snapshot_reset_and_call_counts():
    model = mlp()
    with tw.attach(model, flush_every=2) as watch:
        for _ in range(3):
            model(torch.randn(2, 16))
        assert watch.snapshot()["0"].calls == 3  # spans a flush: totals + current window
        watch.reset()
        assert len(watch.snapshot()) == 0 and watch.snapshot().calls == 0
        model(torch.randn(7, 16))
        assert watch.snapshot()["0"].count == 7 * 16
        assert watch.calls == 4


def test_snapshot_of_an_unknown_name_says_what_exists():
    model = mlp()
    with tw.attach(model) as watch:
        model(torch.randn(1, 16))
        with pytest.raises(
            KeyError, match="'nope' has no statistics in this snapshot; measured positions: \\['<input>', '0', '1'"
        ):
            watch.snapshot()["nope"]


def test_cohort_and_trace_labels():
    model = mlp(inject=Inject(at=(1,)))
    with tw.attach(model, on_nonfinite="ignore") as watch:
        with watch.context(cohort="eu", trace_id="req-0"):
            model(torch.randn(2, 16))
        with watch.context(cohort="us"), watch.context(trace_id="req-1"):
            model(torch.randn(3, 16))
        model(torch.randn(4, 16))
        assert watch.snapshot(cohort="eu")["0"].count == 2 * 16
        assert watch.snapshot(cohort="us")["0"].count == 3 * 16
        assert watch.snapshot()["0"].count == 9 * 16
        first = watch.snapshot().nonfinite["1"]
        assert (first.call, first.trace_id, first.cohort) == (1, "req-1", "us")
        assert watch.snapshot(cohort="eu").nonfinite == {}


def test_too_many_cohorts_fold_into_other():
    model = mlp()
    with tw.attach(model, max_cohorts=2) as watch:
        with pytest.warns(tw.TorchwatchWarning, match="more than 2 cohorts; cohort 'c' and later new ones are merged into '__other__'"):  # fmt: skip
            for c in "abcd":
                with watch.context(cohort=c):
                    model(torch.randn(1, 16))
        assert watch.snapshot(cohort="__other__")["0"].calls == 2


def test_first_nonfinite_names_the_origin_not_the_layers_it_spread_to():
    model = mlp(inject=Inject(at=(2, 3)))
    with tw.attach(model, on_nonfinite="ignore") as watch:
        for i in range(5):
            with watch.context(trace_id=f"t{i}"):
                model(torch.randn(2, 16))
        first = watch.snapshot().nonfinite
    assert set(first) == {"1", "2", "4", "5", "6"}  # everything from the injector on
    for name, rec in first.items():
        assert (rec.module, rec.call, rec.trace_id, rec.origin) == (name, 2, "t2", "1")
    assert "0" not in first


class _SharedActivation(nn.Module):
    """One ReLU6 module called after both BatchNorms (a common way to write a conv block)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("broken", ["bn1", "bn2"])
def test_a_reused_module_does_not_move_the_nan_origin(broken):
    """The shared ReLU6 ran before bn2 too (its first call), but its output became NaN only on
    its second call: the origin is the BatchNorm whose weights hold NaN, in execution order."""
    model = _SharedActivation().eval()
    with torch.no_grad():
        getattr(model, broken).weight[0] = math.nan
    seen: list[tw.Alert] = []
    with tw.attach(model, on_nonfinite=seen.append) as watch:
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8))
        first = watch.snapshot().nonfinite
    (alert,) = seen
    assert alert.module == broken and all(r.origin == broken for r in first.values())
    assert {"act", "bn2"} <= set(first) and "conv1" not in first and ("bn1" in first) == (broken == "bn1")


def test_warn_policy_warns_once_per_origin_and_records_every_alert():
    model = mlp(inject=Inject(at=(0, 1, 2)))
    with tw.attach(model) as watch:
        with pytest.warns(tw.TorchwatchWarning, match="NaN first appeared in '1' on call 0 and spread to 4 later"):
            model(torch.randn(2, 16))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.randn(2, 16))
            model(torch.randn(2, 16))
        alerts = watch.alerts
    assert [a.call for a in alerts] == [0, 1, 2]
    a = alerts[0]
    assert (a.rule, a.module, a.stat, a.value, a.expected) == ("nonfinite", "1", "nan", 2.0, 0.0)


def test_inf_is_reported_with_its_sign():
    model = mlp(inject=Inject(value=-math.inf, at=(0,)))
    with tw.attach(model, on_nonfinite="ignore", modules=["1"]) as watch:
        model(torch.randn(3, 16))
        assert watch.snapshot()["1"].neginf == 3
    model[1].at = {1}
    with tw.attach(model, modules=["1"]), pytest.warns(tw.TorchwatchWarning, match="-Inf first appeared in '1'"):
        model(torch.randn(3, 16))


def test_raise_policy_raises_after_the_forward_completed():
    model = mlp(inject=Inject(at=(1,)))
    with tw.attach(model, on_nonfinite="raise") as watch:
        model(torch.randn(2, 16))
        with watch.context(trace_id="req-9"), pytest.raises(tw.NonFiniteError) as info:
            model(torch.randn(2, 16))
        assert watch.snapshot()["6"].calls == 2  # the last layer ran on the failing call
    message = str(info.value)
    assert "NaN first appeared in '1' on call 1 (trace 'req-9') and spread to 4 later module output(s)" in message
    assert 'pass on_nonfinite="warn" to keep serving' in message
    assert info.value.alert.module == "1"


def test_callable_policy_gets_alerts_and_its_errors_never_reach_the_caller():
    seen = []
    model = mlp(inject=Inject(at=(0,)))
    with tw.attach(model, on_nonfinite=seen.append) as watch:
        model(torch.randn(2, 16))
    assert [a.module for a in seen] == ["1"]

    def broken(alert):
        raise RuntimeError("pager down")

    model = mlp(inject=Inject(at=(0,)))
    with tw.attach(model, on_nonfinite=broken) as watch:
        with pytest.warns(
            tw.TorchwatchWarning, match="the on_nonfinite callable raised RuntimeError\\('pager down'\\)"
        ):
            out = model(torch.randn(2, 16))
        assert out.shape == (2, 4)
        assert watch.errors == {"on_nonfinite": 1}


def test_ignore_policy_records_without_alerts_or_warnings():
    model = mlp(inject=Inject(at=(0,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tw.attach(model, on_nonfinite="ignore") as watch:
            model(torch.randn(2, 16))
            assert watch.alerts == [] and watch.snapshot()["1"].nan == 2


def test_a_failing_hook_never_changes_the_output_and_is_counted_and_warned_once(monkeypatch):
    model = mlp()
    x = torch.randn(3, 16)
    expected = model(x)

    def explode(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(activations_module, "host_stats", explode)
    monkeypatch.setattr(activations_module.cpu_kernel, "tensor_stats", explode)
    monkeypatch.setattr(activations_module.StatsWindow, "measure", explode)  # the hooks' CPU path
    with tw.attach(model) as watch:
        with pytest.warns(tw.TorchwatchWarning) as record:
            out1 = model(x)
            out2 = model(x)
        assert torch.equal(out1, expected) and torch.equal(out2, expected)
        assert watch.errors == {"<input>": 2, "0": 2, "1": 2, "3": 2, "4": 2, "5": 2}
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert (
        "the torchwatch hook of '<input>' failed with MemoryError('no room'); inference was not affected" in messages[0]
    )


@pytest.mark.parametrize("mode", ["plain", "no_grad", "inference_mode", "train"])
def test_statistics_are_the_same_under_every_autograd_mode(mode):
    model = mlp()
    x = torch.randn(4, 16)
    with tw.attach(model) as watch:
        if mode == "no_grad":
            with torch.no_grad():
                model(x)
        elif mode == "inference_mode":
            with torch.inference_mode():
                model(x)
        elif mode == "train":
            model.train()
            model[2].p = 0.0  # keep the dropout deterministic
            model(x).sum().backward()
        else:
            model(x)
        got = watch.snapshot()["5"]
    with torch.no_grad():
        want = oracle(model(x))
    assert_matches(got, want)


def test_inference_mode_then_normal_mode_share_accumulators():
    # accumulators created inside inference_mode must still take updates outside it
    model = mlp()
    with device_watch(model, device_path=True) as watch:
        with torch.inference_mode():
            model(torch.randn(2, 16))
        model(torch.randn(2, 16))
        assert watch.snapshot()["0"].calls == 2


def test_device_path_twin_gives_the_host_path_numbers():
    """The accelerator code path (torch ops, device accumulators) run on CPU tensors."""
    model = mlp(inject=Inject(at=(1,)))
    xs = [torch.randn(3, 16) * s for s in (1.0, 100.0, 1e-3)]
    results = []
    for device_path in (False, True):
        model[1].calls = 0
        watch = device_watch(model, on_nonfinite="ignore", device_path=device_path)
        for x in xs:
            model(x)
        results.append(watch.snapshot())
        watch.detach()
    host, device = results
    assert list(host) == list(device)
    for name in host:
        a, b = host[name].to_dict(), device[name].to_dict()
        for key in ("mean", "std", "min", "max", "absmax"):
            assert math.isclose(a.pop(key), b.pop(key), rel_tol=1e-6, abs_tol=1e-12), (name, key)
        assert a == b
    assert host.nonfinite == device.nonfinite  # resolved from the device ledger at flush


def test_device_path_raise_policy_waits_for_the_device_once_per_call():
    model = mlp(inject=Inject(at=(0,)))
    with device_watch(model, on_nonfinite="raise", device_path=True) as watch, pytest.raises(tw.NonFiniteError, match="in '1' on call 0"):  # fmt: skip
        model(torch.randn(2, 16))
    assert watch.alerts[0].module == "1"


def test_root_leaf_module_is_named_empty_string():
    model = nn.Linear(3, 2)
    with tw.attach(model) as watch:
        model(torch.randn(4, 3))
        assert list(watch.snapshot()) == ["<input>", ""]
        assert watch.snapshot()[""].count == 8


def test_submodule_called_outside_the_model_is_recorded_and_warned_once():
    model = mlp()
    with tw.attach(model) as watch:
        with pytest.warns(tw.TorchwatchWarning, match="'0' ran outside a call of the watched model"):
            model[0](torch.randn(2, 16))
            model[0](torch.randn(2, 16))
        assert watch.snapshot()["0"].calls == 2
        assert watch.calls == 0


def test_model_calling_itself_counts_one_root_call():
    class Recursive(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, depth=2):
            return self.lin(x) if depth == 0 else self(x, depth - 1)

    model = Recursive()
    with tw.attach(model) as watch:
        model(torch.randn(1, 2))
        assert watch.calls == 1 and watch.snapshot()["lin"].calls == 1


def test_a_forward_that_raises_leaves_the_watch_consistent():
    class Fails(nn.Module):
        def forward(self, x):
            raise ValueError("bad input")

    model = nn.Sequential(nn.Linear(2, 2), Fails())
    with tw.attach(model, modules=["0"]) as watch:
        with pytest.raises(ValueError, match="bad input"):
            model(torch.randn(1, 2))
        with pytest.raises(ValueError, match="bad input"):
            model(torch.randn(1, 2))
        assert watch.calls == 2 and watch.snapshot()["0"].calls == 2


def test_fused_fast_path_that_skips_hooks_is_detected():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    with tw.attach(model) as watch, torch.inference_mode():
        model(torch.randn(2, 5, 8))
        with pytest.warns(tw.TorchwatchWarning, match="fused fast path in eval that skips their submodules' hooks"):
            watch.snapshot()


def test_attaching_to_a_compiled_module_warns():
    model = mlp()
    with pytest.warns(tw.TorchwatchWarning, match="attach\\(\\) was given a torch.compile'd module"):
        tw.attach(torch.compile(model)).detach()


def test_output_of_a_wrapper_root_is_measured_and_nested_modules_too():
    model = Wrapper(mlp())
    with tw.attach(model, modules=lambda fqn, m: fqn in ("", "inner.0")) as watch:
        model(torch.randn(2, 16))
        assert list(watch.snapshot()) == ["<input>", "inner.0", ""]
        assert watch.snapshot()[""].count == 1


def test_repr_says_what_is_watched():
    model = mlp()
    watch = tw.attach(model, every=2)
    assert repr(watch) == "Watch(Sequential, 5 modules, every=2, calls=0, attached)"
    watch.detach()
    assert repr(watch).endswith("detached)")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "every must be a positive integer, got 0"),
        ({"every": True}, "every must be a positive integer, got True"),
        ({"flush_every": "10"}, "flush_every must be a positive integer, got '10'"),
        ({"max_cohorts": -1}, "max_cohorts must be a positive integer, got -1"),
        ({"on_nonfinite": "explode"}, "on_nonfinite='explode' is not valid: use one of 'ignore', 'warn', 'raise' or a callable"),
        ({"sinks": tw.MemorySink()}, "sinks must be a list of sinks, got a single MemorySink\\(\\); write sinks=\\[MemorySink\\(\\)\\]"),
        ({"sinks": 3}, "sinks must be a list of sinks, got 3"),
        ({"sinks": [object()]}, "is not a sink \\(it has no write\\(record\\) method\\)"),
        ({"cast_dtypes": ["int8"]}, "cast_dtypes: 'int8' is not a floating-point torch dtype"),
    ],
)  # fmt: skip
def test_bad_arguments_are_config_errors_that_change_nothing(kwargs, message):
    model = mlp()
    before = _hook_counts(model)
    with pytest.raises(tw.ConfigError, match=message):
        tw.attach(model, **kwargs)
    assert _hook_counts(model) == before
    tw.attach(model).detach()  # and the model is not left marked as watched


def test_attach_needs_a_module():
    with pytest.raises(tw.ConfigError, match="attach\\(\\) needs a torch.nn.Module, got function"):
        tw.attach(lambda x: x)


def test_failures_in_the_root_bookkeeping_never_reach_the_caller(monkeypatch):
    model = mlp()
    x = torch.randn(2, 16)
    want = model(x)
    with tw.attach(model, flush_every=1) as watch:

        def broken_flush(**kwargs):
            raise RuntimeError("flush exploded")

        monkeypatch.setattr(watch.engine, "flush", broken_flush)
        with pytest.warns(
            tw.TorchwatchWarning,
            match="the torchwatch hook of '\\(root call\\)' failed with RuntimeError\\('flush exploded'\\)",
        ):
            assert torch.equal(model(x), want)
        assert watch.errors == {"(root call)": 1}
        monkeypatch.undo()


def test_attaching_while_a_call_is_running_does_not_break_it():
    class AttachesMidway(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.watch = None

        def forward(self, x):
            if self.watch is None:
                self.watch = tw.attach(self)  # the exit hook of this call has no matching entry
            return self.lin(x)

    model = AttachesMidway()
    with pytest.warns(tw.TorchwatchWarning, match="'lin' ran outside a call"):
        model(torch.randn(1, 2))
    model(torch.randn(1, 2))
    assert model.watch.calls == 1 and model.watch.snapshot()["lin"].calls == 2
    model.watch.detach()


def test_device_path_flushes_finish_on_the_worker_thread():
    """The CPU twin of the GPU flush: flip the table, copy the finished half, fold it in later."""
    model = mlp(inject=Inject(at=(3,)))
    sink = tw.MemorySink()
    seen = []
    with device_watch(model, sinks=[sink], flush_every=2, on_nonfinite=seen.append, device_path=True) as watch:
        for i in range(5):
            with watch.context(trace_id=f"t{i}"):
                model(torch.randn(2, 16))
        watch.flush()
        snap = watch.snapshot()
    assert [(r.step, r.calls) for r in sink.records] == [(2, 2), (4, 2), (5, 1)]
    assert [r.stats["0"].calls for r in sink.records] == [2, 2, 1]
    assert snap["0"].calls == 5
    assert [(a.module, a.call, a.trace_id) for a in seen] == [("1", 3, "t3")]  # one alert per origin per window
    assert sink.records[1].nonfinite["6"].origin == "1"


def test_bad_sampling_mode_is_a_config_error():
    with pytest.raises(
        tw.ConfigError, match="sampling='gpu' is not valid: use 'python' \\(eager\\) or 'device' \\(graphs\\)"
    ):
        tw.attach(mlp(), sampling="gpu")


def test_device_sampling_keeps_hooks_installed_and_counts_in_python_when_eager():
    probe = HookProbe()
    model = nn.Sequential(nn.Linear(3, 3), probe)
    with tw.attach(model, every=3, sampling="device") as watch:
        for _ in range(7):
            model(torch.randn(1, 3))
        snap = watch.snapshot()
    assert probe.seen == [1] * 7  # hooks entered on every call ...
    assert snap["1"].calls == 3 and snap.sampled == 3  # ... but only calls 0, 3 and 6 are measured
