"""Attach/detach cycles leave nothing behind; dropping the model frees it."""

from __future__ import annotations

import copy
import gc
import pickle
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref

import pytest
import torch
from _device import device_watch
from _models import mlp
from torch import nn

import torchwatch as tw
from torchwatch.engine import registry


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_ten_thousand_attach_detach_cycles_leave_no_hook_and_no_growth():
    model = mlp()
    x = torch.randn(2, 16)
    baseline_hooks = _hooks(model)

    def cycles(n: int) -> None:
        for i in range(n):
            watch = tw.attach(model, every=1 + i % 3)
            if i % 100 == 0:
                model(x)
            watch.detach()

    cycles(200)  # warm caches (cast plans, kernel plans)
    gc.collect()
    tracemalloc.start()
    cycles(2_000)  # anything allocated once (interpreter caches) settles here
    gc.collect()
    before = tracemalloc.take_snapshot()
    cycles(10_000)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    diffs = after.compare_to(before, "filename")
    growth = sum(s.size_diff for s in diffs)
    assert _hooks(model) == baseline_hooks
    assert registry.live() == [] and all(registry.watch_of(m) is None for m in [model])
    # a leak of 7 bytes per cycle would show; the top files say where
    assert growth < 64 * 1024, f"{growth} bytes retained after 10,000 cycles: {diffs[:5]}"


def test_dropped_model_is_freed_with_or_without_detach():
    for detach in (True, False):
        model = mlp()
        watch = tw.attach(model, sinks=[tw.MemorySink()], flush_every=1)
        model(torch.randn(1, 16))
        if detach:
            watch.detach()
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is None
        assert watch.model is None


def _drift_reference(model: nn.Module) -> tw.Reference:
    g = torch.Generator().manual_seed(0)
    return tw.Reference.fit(model, [torch.randn(64, 16, generator=g) for _ in range(8)], modules=["4"])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"timing": True, "outputs": True, "every": 2},
        {"modules": (nn.Linear,), "sinks": "memory", "flush_every": 1},
        {"drift": "reference"},
        {"rules": "defaults", "inputs": False},
    ],
    ids=["defaults", "timing-outputs", "types-memory-sink", "drift", "rules"],
)
def test_a_dropped_model_is_freed_at_once_while_its_watch_lives(options):
    """With the garbage collector off, so that a reference cycle cannot hide a strong reference:
    dropping the model (and its last output) frees every module, parameter and activation while
    the watch, its config and its records live on; the watch then reports no model and still
    snapshots and detaches. The first attach of the process imports torch._dynamo, whose import
    leaves a cycle through the calling frames: it must not be attach()'s frames."""
    model = mlp()
    options = dict(options)
    if options.get("drift") == "reference":
        options["drift"] = _drift_reference(model)
    if options.get("sinks") == "memory":
        options["sinks"] = [tw.MemorySink()]
    if options.get("rules") == "defaults":
        options["rules"] = [*tw.rules.defaults(), lambda snapshot: []]
    gc.collect()
    gc.disable()
    try:
        watch = tw.attach(model, **options)
        for _ in range(3):
            out = model(torch.randn(8, 16))
        watch.flush()
        refs = [weakref.ref(x) for x in [model, out, *model.modules(), *model.parameters()]]
        del model, out
        alive = [r() for r in refs if r() is not None]
        assert not alive, [type(x).__name__ for x in alive]
        assert watch.model is None
        watch.snapshot()
        watch.detach()
    finally:
        gc.enable()


def test_a_shadow_holds_neither_the_primary_nor_after_close_the_candidate():
    """The server owns the primary: a shadow sampling it must not keep it alive. The shadow runs
    the candidate until close(); a closed shadow kept for its report lets the candidate go."""
    primary = mlp()
    candidate = copy.deepcopy(primary)
    gc.collect()
    gc.disable()
    try:
        watch = tw.attach(primary)
        shadow = tw.shadow(primary, candidate, sample=1.0)
        for _ in range(3):
            primary(torch.randn(2, 16))
        assert shadow.wait()
        refs = [weakref.ref(primary), weakref.ref(candidate)]
        del primary
        assert refs[0]() is None
        shadow.close()
        del candidate
        assert refs[1]() is None
        assert shadow.report().calls == 3
        assert watch.model is None
    finally:
        gc.enable()


def test_the_first_attach_of_a_process_does_not_keep_its_model():
    """attach() imports torch._dynamo the first time (for compiled models); that import leaves a
    reference cycle through the importing frames, and attach()'s frames hold the model. In a
    fresh process (the suite's own has imported it long before), with the collector off."""
    code = (
        "import gc, sys, weakref, torch, torchwatch as tw\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "gc.disable()\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4)); w = tw.attach(m); m(torch.randn(1, 4))\n"
        "r = weakref.ref(m); del m\n"
        "print('freed' if r() is None else 'alive')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "freed", out.stderr[-2000:]


def test_no_activation_outlives_its_hook():
    model = mlp()
    x = torch.randn(4, 16)
    tracked: list[weakref.ref] = []
    model.register_forward_hook(lambda m, a, o: tracked.append(weakref.ref(o)))
    for layer in model:
        layer.register_forward_hook(lambda m, a, o: tracked.append(weakref.ref(o)))
    with tw.attach(model, on_nonfinite="ignore"):
        model(x)
        gc.collect()
        assert all(r() is None for r in tracked)
    with device_watch(model, on_nonfinite="ignore", device_path=True):
        tracked.clear()
        model(x)
        gc.collect()
        assert all(r() is None for r in tracked)


def _workers() -> int:
    return sum(t.name == "torchwatch-worker" and t.is_alive() for t in threading.enumerate())


def test_hot_swapping_models_without_detach_leaves_no_thread_behind():
    """A server that replaces its model (and the watch with it) without detach(): once the old
    ones are garbage, their writer threads end. The worker holds nothing between jobs."""
    before = _workers()
    for _ in range(20):
        model = mlp()
        watch = tw.attach(model, sinks=[tw.MemorySink()], flush_every=1)
        model(torch.randn(1, 16))  # its flush is the worker's last job
        del model, watch
    deadline = time.monotonic() + 30  # a watch is freed by the cycle collector, then its thread ends
    while _workers() > before and time.monotonic() < deadline:
        gc.collect()  # a server's allocations trigger it; a worker mid-job held one more reference
        time.sleep(0.01)
    assert _workers() == before


def _watch_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("copy_with", ["deepcopy", "torch.save", "pickle"])
def test_a_watched_model_can_be_copied_and_saved_and_the_copy_carries_no_watch(tmp_path, copy_with):
    model = mlp()
    x = torch.randn(2, 16)
    ref = tw.Reference.fit(model, [torch.randn(64, 16) for _ in range(12)], modules=["4"], window=8, components=4,
                           resamples=200)  # fmt: skip
    with tw.attach(model, drift=ref, timing=True, outputs=True) as watch:
        model(x)
        if copy_with == "deepcopy":
            clone = copy.deepcopy(model)
        elif copy_with == "torch.save":
            torch.save(model, tmp_path / "m.pt")
            clone = torch.load(tmp_path / "m.pt", weights_only=False)
        else:
            clone = pickle.loads(pickle.dumps(model))  # noqa: S301 - our own bytes
        assert _watch_hook_count(clone) > 0  # inert stand-ins until the copy first runs
        assert torch.equal(clone(x), model(x))
        assert _watch_hook_count(clone) == 0  # they removed themselves
        clone(x)
        assert watch.snapshot().calls == 2  # the copy's calls never reached the original's watch
        with tw.attach(clone) as other:  # the copy can be watched on its own
            clone(x)
            assert other.snapshot().calls == 1
    assert watch.errors == {}


def test_a_detached_watch_is_freed_at_once_without_the_garbage_collector():
    """No reference cycle between the watch, its engine and its monitors: a detached watch goes
    when its last reference does (a cycle would keep every one until the collector ran, and
    10,000 attach/detach cycles would pile up watches between collections)."""

    def once():
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        watch = tw.attach(model, sinks=[tw.MemorySink()], flush_every=2, every=2, timing=True, outputs=True)
        for _ in range(5):
            model(torch.randn(3, 4))
        watch.snapshot()
        watch.detach()
        monitors = [watch.engine.monitor(name) for name in ("stats", "latency", "timing", "inputs", "outputs")]
        return [weakref.ref(o) for o in (watch, watch.engine, *monitors)]

    once()  # first use imports and caches what a process keeps anyway
    gc.disable()
    try:
        refs = once()
        assert [r() for r in refs if r() is not None] == []
    finally:
        gc.enable()
