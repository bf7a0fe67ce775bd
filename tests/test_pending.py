"""Small accelerator outputs wait for one grouped launch per root call (monitors/activations/pending.py).

Run on CPU through the device path (``device_watch(...)``, tests/_device.py): the twin ``torch_ops.merge_group``
stands in for the grouped kernel, so what is held, when it is launched and what it leaves in
the table are checked on every push; the Triton grouped kernel itself runs under the
interpreter at the end (and its launch arithmetic in test_triton_kernel.py).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from _device import device_watch
from _oracle import assert_matches, oracle
from torch import nn

from torchwatch._casts import cast_plan
from torchwatch.kernels import descriptors, torch_ops
from torchwatch.monitors.activations import grouping
from torchwatch.monitors.activations import pending as pending_module
from torchwatch.monitors.activations.pending import Pending


class Launches:
    """Counts grouped launches and one-tensor launches of the torch-ops twin."""

    def __init__(self, monkeypatch) -> None:
        self.grouped: list[list[str]] = []  # positions per grouped launch
        self.single = 0  # one-tensor launches outside a grouped one
        self.inside = False
        group, single = torch_ops.merge_group, torch_ops.merge_into

        def merge_group(table, items, plan, call):
            self.grouped.append([table.keys[slot][1] for _, slot in items])
            self.inside = True
            try:
                group(table, items, plan, call)
            finally:
                self.inside = False

        def merge_into(*args, **kwargs):
            self.single += not self.inside
            single(*args, **kwargs)

        monkeypatch.setattr(torch_ops, "merge_group", merge_group)
        monkeypatch.setattr(torch_ops, "merge_into", merge_into)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _run(model: nn.Module, xs: list[torch.Tensor], mode: str):
    """Watch ``model`` on the device path over ``xs`` under ``mode``: its snapshot."""
    with device_watch(model, device_path=True) as watch, MODES[mode]():
        for x in xs:
            model(x)
        assert watch.errors == {}
        return watch.snapshot()


@pytest.mark.parametrize("mode", MODES)
def test_a_calls_small_outputs_are_measured_by_one_grouped_launch(monkeypatch, mode):
    """The first call measures each output at once (a probe: is it changed in place later? by
    its version counter, or under inference_mode a copy); from the second on, one grouped launch
    per call."""
    launches = Launches(monkeypatch)
    model = _mlp()
    snap = _run(model, xs := [torch.randn(3, 16) for _ in range(4)], mode)
    assert launches.single == 6  # the first call: the input and 5 outputs, each probed
    assert launches.grouped == [["<input>", "0", "1", "2", "3", "4"]] * 3
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](x)) for x in xs])
    assert snap["1"].calls == 4
    assert_matches(snap["1"], oracle(hidden))


def test_an_output_over_the_grouped_size_keeps_its_own_launch(monkeypatch):
    launches = Launches(monkeypatch)
    monkeypatch.setattr(descriptors, "GROUPED_BYTES", 3 * 32 * 4 - 1)  # a [3, 32] float32 output is too big
    monkeypatch.setattr(torch_ops, "GROUPED_BYTES", descriptors.GROUPED_BYTES)
    model = _mlp()
    with device_watch(model, device_path=True) as watch, torch.no_grad():
        model(torch.randn(3, 16))
        model(torch.randn(3, 16))
        snap = watch.snapshot()
    assert launches.single == 6 + 4  # the probing call, then the four [3, 32] outputs
    assert launches.grouped == [["<input>", "4"]]  # the [3, 16] input and the [3, 4] output
    assert all(snap[name].calls == 2 for name in ("0", "1", "2", "3", "4"))


class Twice(nn.Module):
    """One layer run twice in a forward: the same position, so the same slot, twice in a call."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def forward(self, x):
        return self.layer(torch.relu(self.layer(x)))


def test_a_position_measured_twice_in_one_call_launches_what_is_held_first(monkeypatch):
    launches = Launches(monkeypatch)
    torch.manual_seed(1)
    model = Twice()
    x = torch.randn(5, 8)
    with device_watch(model, device_path=True) as watch, torch.no_grad():
        model(x)
        model(x)
        snap = watch.snapshot()
    assert launches.grouped == [["<input>", "layer"], ["layer"]]  # the second output waits for the first's launch
    with torch.no_grad():
        first = model.layer(x)
        second = model.layer(torch.relu(first))
    assert snap["layer"].calls == 4
    assert_matches(snap["layer"], oracle(torch.cat([first, second, first, second])))


def test_held_bytes_are_bounded(monkeypatch):
    launches = Launches(monkeypatch)
    model = _mlp()
    with device_watch(model, device_path=True) as watch, torch.no_grad():
        model(torch.randn(3, 16))  # probes
        monkeypatch.setattr(pending_module, "HELD_BYTES", 2 * 3 * 32 * 4)  # two [3, 32] float32 outputs
        model(torch.randn(3, 16))
        snap = watch.snapshot()
    # 192 + 384 + 384 bytes reach the bound: launched; then 384 + 384; the last 48 at the call's end
    assert launches.grouped == [["<input>", "0", "1"], ["2", "3"], ["4"]]
    assert all(snap[name].calls == 2 for name in ("0", "1", "2", "3", "4"))


class Residual(nn.Module):
    """Outputs changed in place after their hook: ``out += x`` and ``nn.ReLU(inplace=True)``."""

    def __init__(self, change_on: int = 0) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.relu = nn.ReLU(inplace=True)
        self.calls = 0
        self.change_on = change_on  # from this call on, b's output is changed in place too

    def forward(self, x):
        self.calls += 1
        out = self.a(x)
        out += x  # a's output, changed after a's hook
        y = self.b(self.relu(out))  # relu changes `out` again, in place
        if self.calls >= self.change_on:
            y.mul_(2)
        return y


@pytest.mark.parametrize("mode", MODES)
def test_outputs_changed_in_place_are_measured_before_the_change(monkeypatch, mode):
    launches = Launches(monkeypatch)
    torch.manual_seed(2)
    xs = [torch.randn(4, 8) for _ in range(3)]
    results = []
    for device_path in (False, True):
        torch.manual_seed(3)
        model = Residual(change_on=10**9)
        with device_watch(model, device_path=device_path) as watch, MODES[mode]():
            for x in xs:
                model(x)
            results.append(watch.snapshot())
            assert watch.errors == {}
    host, device = results
    for name in ("a", "b", "relu"):
        assert device[name].calls == 3
        a, b = host[name].to_dict(), device[name].to_dict()
        for key in ("mean", "std"):
            assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-6, abs=1e-9), (name, key)  # C kernel vs torch ops
        assert a == b, name
    with torch.no_grad():  # the oracle: what `a` returned, before `out += x` changed it
        a_out = torch.cat([model.a(x) for x in xs])
    assert_matches(device["a"], oracle(a_out))
    # "a" is changed in place after its hook: measured at once on every call; the rest grouped
    assert launches.grouped == [["<input>", "relu", "b"]] * 2


def test_a_held_output_changed_in_place_later_is_counted_and_measured_at_once_from_then_on(monkeypatch):
    launches = Launches(monkeypatch)
    torch.manual_seed(4)
    model = Residual(change_on=3)
    with device_watch(model, device_path=True) as watch, torch.no_grad(), pytest.warns(UserWarning, match="in place"):
        for _ in range(4):
            model(torch.randn(4, 8))
        snap = watch.snapshot()
        assert watch.errors == {pending_module.MODIFIED_IN_PLACE: 1}
    assert snap["b"].calls == 3  # call 3's value of b was changed before its launch: not measured
    assert launches.grouped[-1] == ["<input>", "relu"]  # b is measured at once on call 4


def test_a_held_inference_output_changed_later_is_found_by_the_periodic_probe(monkeypatch):
    """No version counter to check every call: every REPROBE_EVERY-th call probes held positions
    again; the change is counted and warned, and the position is measured at once after it."""
    launches = Launches(monkeypatch)
    monkeypatch.setattr(grouping, "REPROBE_EVERY", 4)
    torch.manual_seed(4)
    model = Residual(change_on=3)
    with device_watch(model, device_path=True) as watch, torch.inference_mode():
        for _ in range(3):
            model(torch.randn(4, 8))
        assert watch.errors == {}  # call 3 changed b after its hook: unseen until the reprobe
        with pytest.warns(UserWarning, match="periodic probe"):
            model(torch.randn(4, 8))  # the 4th call: held positions probed again
        assert watch.errors == {pending_module.MODIFIED_IN_PLACE: 1}
        model(torch.randn(4, 8))
        assert watch.snapshot()["b"].calls == 5
    # calls 2 and 3 grouped; call 4 probes every held position (one launch each); call 5 groups
    # all but b (and a, changed on every call)
    assert launches.grouped == [["<input>", "relu", "b"]] * 2 + [["<input>", "relu"]]


def test_probes_beyond_the_held_bound_wait_for_a_later_call(monkeypatch):
    """Probes keep at most HELD_BYTES per call (an inference probe twice its output: the output
    and its copy); the positions beyond are measured at once and probed on later calls."""
    launches = Launches(monkeypatch)
    monkeypatch.setattr(pending_module, "HELD_BYTES", 2 * 3 * 32 * 4)  # one [3, 32] float32 output and its copy
    model = _mlp()
    snap = _run(model, xs := [torch.randn(3, 16) for _ in range(6)], "inference_mode")
    # call 1 probes the input and "4" (with their copies 480 bytes; "0" would make 1248), call 2
    # probes "0", call 3 "1", ...; what is held launches at 768 bytes too (three outputs)
    assert launches.grouped == [
        ["<input>", "4"],  # call 2
        ["<input>", "0", "4"],  # call 3
        ["<input>", "0", "1"], ["4"],  # call 4
        ["<input>", "0", "1"], ["2", "4"],  # call 5
        ["<input>", "0", "1"], ["2", "3"], ["4"],  # call 6: every position held
    ]  # fmt: skip
    with torch.no_grad():
        out = torch.cat([model[:3](x) for x in xs])
    assert snap["2"].calls == 6
    assert_matches(snap["2"], oracle(out))


def test_nothing_is_held_after_the_call_and_a_failing_forward_still_measures_what_ran(monkeypatch):
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.fail = False
            self.kept: list = []

        def forward(self, x):
            y = self.first(x)
            self.kept.append(weakref.ref(y))
            if self.fail:
                raise RuntimeError("boom")
            return y * 2

    launches = Launches(monkeypatch)
    model = Fails()
    with device_watch(model, device_path=True) as watch, torch.no_grad():
        model(torch.randn(2, 4))  # probes
        model.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(2, 4))  # holds "first", then fails: the exit hook still launches
        gc.collect()
        assert all(ref() is None for ref in model.kept)  # no output outlives its call
        assert watch.snapshot()["first"].calls == 2
    assert launches.grouped == [["<input>", "first"]]


def test_pending_launches_first_on_a_repeated_slot_or_a_new_stream():
    table_a, table_b = object(), object()
    plan = cast_plan(torch.float32, ("float16",))
    p = Pending()
    assert not p.blocks(table_a, 0, "s1")  # nothing held: nothing to launch
    assert not p.add(table_a, 0, torch.zeros(4), plan, "s1")
    assert not p.blocks(table_a, 1, "s1")
    assert not p.blocks(table_b, 0, "s1")  # another table's slot 0 is another slot
    assert p.blocks(table_a, 0, "s1")
    assert p.blocks(table_a, 1, "s2")
    taken = p.take(final=True)
    assert taken.stream == "s1" and len(taken.groups) == 1 and taken.groups[0][2][0][1] == 0
    assert taken.seen == [((id(table_a), 0), True)] and taken.dropped == 0 and taken.copies == []
    assert (p.held, p.groups, p.slots) == (0, {}, set())


def test_an_inference_probe_keeps_a_copy_until_the_call_ends_and_counts_both():
    table = object()
    p = Pending()
    with torch.inference_mode():
        x = torch.arange(4.0)
        assert p.probe(table, 3, x, None)
        x.add_(1)  # changed after its hook: the copy keeps what the hook saw
        assert not p.probe(table, 4, torch.zeros(pending_module.HELD_BYTES // 8), None)  # over the bound
    assert p.probed == 2 * x.nbytes and p.waiting
    assert p.take(final=False).copies == [] and p.waiting  # a launch before the call's end
    [(position, tensor, copy, stream)] = p.take(final=True).copies
    assert position == (id(table), 3) and tensor is x and copy.tolist() == [0.0, 1.0, 2.0, 3.0] and stream is None
    assert not p.waiting and p.copies == []


def test_a_refused_descriptor_buffer_falls_back_to_one_launch_each():
    """Every buffer still in flight: the ring refuses (counted), nothing waits."""

    class InFlight:
        def query(self) -> bool:
            return False

    ring = descriptors.DescriptorRing(torch.device("cpu"), 4, 2, limit=2)
    seen = []
    assert ring.launch([1, 2, 3, 4], seen.append)
    assert seen[-1].tolist() == [[1, 2], [3, 4]]
    for buffer in ring._buffers:
        buffer[2] = InFlight()
    assert ring.launch([5, 6], seen.append)  # a second buffer, up to the limit
    ring._buffers[-1][2] = InFlight()
    assert not ring.launch([7, 8], seen.append) and ring.refused == 1 and len(seen) == 2
    with pytest.raises(ValueError, match="rows"):
        ring.launch([1, 2, 3], seen.append)


@pytest.mark.parametrize("mode", ["grad", "inference_mode"])
def test_the_grouped_triton_kernel_through_the_watch(monkeypatch, mode):
    """The real grouped kernel (Triton's interpreter on CPU tensors) behind the watch's holding,
    on a model that changes outputs in place after their hooks: each measured as returned."""
    triton_stats = pytest.importorskip("torchwatch.kernels.triton_stats")
    grouped = []
    merge_group = triton_stats.merge_group
    monkeypatch.setattr(triton_stats, "merge_group", lambda *a: (grouped.append(len(a[1])), merge_group(*a)))
    torch.manual_seed(5)
    model = Residual(change_on=10**9)
    xs = [torch.randn(4, 8) for _ in range(3)]
    with device_watch(model, device_path=True) as watch, torch.inference_mode(mode == "inference_mode"):
        for table in watch.engine.monitor("stats").tables():
            plans = [cast_plan(d, watch.config.cast_dtypes) for d in triton_stats.DTYPES]
            table.scratch = triton_stats.Workspace(table, plans)
            table.kernel = table.grouped = triton_stats
        for x in xs:
            model(x)
        snap = watch.snapshot()
        assert watch.errors == {}
    assert grouped == [3, 3]  # the input, relu and b on calls 2 and 3; a (changed in place) alone
    with torch.no_grad():
        a = [model.a(x) for x in xs]
        relu = [torch.relu(y + x) for y, x in zip(a, xs, strict=True)]
        want = {"a": a, "relu": relu, "b": [model.b(r) for r in relu]}
    for name, outs in want.items():
        assert snap[name].calls == 3
        assert_matches(snap[name], oracle(torch.cat(outs), watch.config.cast_dtypes))


def test_a_failing_grouped_launch_falls_back_to_one_launch_each_and_turns_grouping_off(monkeypatch):
    def broken(table, items, plan, call):
        raise RuntimeError("no kernel image for this device")

    model = _mlp()
    xs = [torch.randn(3, 16) for _ in range(3)]
    with device_watch(model, device_path=True) as watch, torch.no_grad(), pytest.warns(UserWarning, match="grouped"):
        monkeypatch.setattr(torch_ops, "merge_group", broken)
        for x in xs:
            model(x)
        snap = watch.snapshot()
        assert watch.errors == {"grouped launches failed": 1}  # once: grouping is off afterwards
        assert all(t.grouped is None for t in watch.engine.monitor("stats").tables())
    with torch.no_grad():
        out = torch.cat([model(x) for x in xs])
    assert snap["4"].calls == 3
    assert_matches(snap["4"], oracle(out))
