"""Drift detection, side by side: torchwatch against alibi-detect's online MMD and LSDD detectors.

Data: scikit-learn's bundled digits (8x8 images, no download). A small MLP is trained on 40% of
them here (seconds); its penultimate layer (64 units) is monitored. 45% of the images are the
reference set, the other 15% the pool that test streams are drawn from (with replacement).
Every detector gets the same streams, the same window (samples per test window) and the same
target expected run time (ERT, samples between false alarms): torchwatch's ARL in windows is
ERT / window.

Reported per detector:
* no drift: mean run length to a (false) alarm, in samples, against the ERT (streams capped at
  5 × ERT; a capped stream counts as its cap, so the mean is a lower bound);
* per shift (pixel noise at three strengths, 30° rotation, class knock-out, unnormalised input):
  mean detection delay in samples and the fraction of streams detected before the cap;
* per-sample update cost (torchwatch: through the forward hooks, batches of ``window``,
  including window evaluation; alibi-detect: one ``predict`` per sample);
* detector state in bytes against the reference size.

A synthetic suite in d=384 (mean shift, covariance rotation, a new 5% cluster) gives torchwatch's
detection rate within 20 windows as the shift grows (power curves).

Needs ``alibi-detect[torch]`` and scikit-learn (``make bench-drift`` sets up ``.venv-bench``).
Usage: python benchmarks/drift.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import torchwatch as tw
from torchwatch.monitors.drift.online import OnlineDrift

torch.set_num_threads(max(1, os.cpu_count() or 1))


# ---- data and model ---------------------------------------------------------------------------


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target


def train_mlp(x: np.ndarray, y: np.ndarray) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(150):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    from scipy.ndimage import rotate as nd_rotate

    imgs = images.reshape(-1, 8, 8)
    out = np.stack([nd_rotate(im, degrees, reshape=False, order=1, mode="constant") for im in imgs])
    return out.reshape(-1, 64).astype(np.float32)


def shifts(pool_x: np.ndarray, pool_y: np.ndarray) -> dict[str, Callable[[np.random.Generator, int], np.ndarray]]:
    """Each shift draws ``n`` input rows from the pool and alters them."""

    def draw(rng: np.random.Generator, n: int, keep: np.ndarray | None = None) -> np.ndarray:
        idx = np.flatnonzero(keep) if keep is not None else np.arange(len(pool_x))
        return pool_x[rng.choice(idx, n)]

    def noise(sigma: float):
        return lambda rng, n: np.clip(draw(rng, n) + rng.normal(0, sigma, (n, 64)), 0, 1).astype(np.float32)

    return {
        "none": lambda rng, n: draw(rng, n),
        "noise 0.1": noise(0.1),
        "noise 0.2": noise(0.2),
        "noise 0.4": noise(0.4),
        "rotation 30°": lambda rng, n: rotate(draw(rng, n), 30),
        "knock-out: one class (3) missing": lambda rng, n: draw(rng, n, pool_y != 3),
        "knock-out: classes 5-9 missing": lambda rng, n: draw(rng, n, pool_y < 5),
        "unnormalised input (0-16)": lambda rng, n: draw(rng, n) * 16.0,
    }


# ---- detectors ------------------------------------------------------------------------------------


class Torchwatch:
    """torchwatch's online path: OnlineDrift.observe per batch of ``window``, evaluate per window."""

    name = "torchwatch"

    def __init__(self, ref: tw.Reference, window: int, arl: float) -> None:
        self.ref, self.window, self.arl = ref, window, arl
        self.reset()

    def reset(self) -> None:
        self.monitor = OnlineDrift(self.ref, torch.device("cpu"), self.arl)

    def run(self, emb: np.ndarray) -> int | None:
        """Samples consumed until the first alarm, or None."""
        t = torch.from_numpy(emb)
        for w, batch in enumerate(t.split(self.window)):
            if batch.shape[0] < self.window:
                return None
            self.monitor.observe("3", batch)
            _, alerts = self.monitor.process(self.monitor.start_read(), w)
            if alerts:
                return (w + 1) * self.window
        return None


class Alibi:
    def __init__(self, cls: type, x_ref: np.ndarray, window: int, ert: float, bootstraps: int) -> None:
        self.name = cls.__name__
        start = time.perf_counter()
        self.det = cls(x_ref, ert=ert, window_size=window, backend="pytorch", n_bootstraps=bootstraps, verbose=False)
        self.setup_s = time.perf_counter() - start

    def reset(self) -> None:
        self.det.reset_state()

    def run(self, emb: np.ndarray) -> int | None:
        for i, row in enumerate(emb):
            if self.det.predict(row)["data"]["is_drift"]:
                return i + 1
        return None


def run_lengths(det, make: Callable[[np.random.Generator, int], np.ndarray], embed, streams: int, cap: int, seed: int):
    """Samples to the first alarm per stream (cap when none), and how many streams alarmed."""
    out, hits = [], 0
    for s in range(streams):
        rng = np.random.default_rng(seed + s)
        det.reset()
        got = det.run(embed(make(rng, cap)))
        hits += got is not None
        out.append(got if got is not None else cap)
    return out, hits


def state_bytes(obj, seen=None, depth=0) -> int:
    """Bytes of the numpy arrays and torch tensors reachable from ``obj`` (its retained state)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(state_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(state_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def torchwatch_update_cost(model: nn.Module, ref: tw.Reference, pool: np.ndarray, window: int, rounds: int) -> dict:
    """Per-sample cost of drift monitoring in the forward pass: instrumented minus plain forward,
    interleaved, batches of ``window``, plus the per-window evaluation, per sample."""
    x = torch.from_numpy(pool[: window * 8]).split(window)
    plain, watched = [], []
    for _ in range(rounds):
        with torch.inference_mode():
            t0 = time.perf_counter()
            for b in x:
                model(b)
            plain.append(time.perf_counter() - t0)
        w = tw.attach(model, modules=["4"], drift=ref, flush_every=10**9, cast_dtypes=())
        with torch.inference_mode():
            t0 = time.perf_counter()
            for b in x:
                model(b)
            t1 = time.perf_counter()
        w.detach()
        watched.append(t1 - t0)
    monitor = OnlineDrift(ref, torch.device("cpu"), None)
    monitor.observe("3", model[:4](torch.from_numpy(pool[: window * 64])).detach())
    t0 = time.perf_counter()
    monitor.process(monitor.start_read(), 0)
    evaluate = (time.perf_counter() - t0) / 64  # per window
    n = window * 8
    hook = max(statistics.median(watched) - statistics.median(plain), 0.0) / n
    return {"hook_us_per_sample": 1e6 * hook, "evaluate_us_per_sample": 1e6 * evaluate / window,
            "total_us_per_sample": 1e6 * (hook + evaluate / window)}  # fmt: skip


# ---- the synthetic suite ----------------------------------------------------------------------------


def synthetic(quick: bool) -> dict:
    """d=384 Gaussian reference with a decaying spectrum; detection within 20 windows vs shift size."""
    d, window, arl = 384, 32, 500
    rng = np.random.default_rng(7)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    spectrum = 1.0 / np.sqrt(1 + np.arange(d))
    mix = basis * spectrum

    def sample(n: int, r: np.random.Generator) -> np.ndarray:
        return (r.normal(size=(n, d)) @ mix.T).astype(np.float32)

    model = nn.Sequential(nn.Identity())
    ref = tw.Reference.fit(model, torch.from_numpy(sample(20_000, rng)).split(1000), modules=["0"], window=window,
                           arl=arl, resamples=4000)  # fmt: skip
    top = basis[:, 0] * spectrum[0]
    strengths = {
        "mean shift (sd of the top direction)": [0.1, 0.2, 0.3, 0.5],
        "covariance rotation (degrees, top two directions)": [5, 10, 20, 40],
        "new 5% cluster (distance, sd of direction 6)": [1, 2, 4, 6],
    }
    streams = 20 if quick else 60
    out: dict = {"window": window, "arl_windows": arl, "streams": streams, "curves": {}}
    # no drift, fresh samples from the reference distribution: run lengths in windows vs the ARL
    runs = []
    for s in range(40 if quick else 150):
        r = np.random.default_rng(50_000 + s)
        det = OnlineDrift(ref, torch.device("cpu"), None)
        for wdx in range(10 * arl):
            det.observe("0", torch.from_numpy(sample(window, r)))
            if det.process(det.start_read(), wdx)[1]:
                break
        runs.append(wdx + 1)
    out["no_drift_mean_run_length_windows"] = float(np.mean(runs))
    print(f"synthetic no drift: mean run length {np.mean(runs):.0f} windows (target {arl})", flush=True)
    for kind, values in strengths.items():
        curve = {}
        for v in values:
            detected = 0
            for s in range(streams):
                r = np.random.default_rng(1000 + s)
                x = sample(window * 20, r)
                if kind.startswith("mean"):
                    x = x + (v * top).astype(np.float32)
                elif kind.startswith("covariance"):
                    a = math.radians(v)
                    u, w = basis[:, 0], basis[:, 1]
                    pu, pw = x @ u, x @ w
                    x = (
                        x
                        + np.outer(pu * (math.cos(a) - 1) - pw * math.sin(a), u)
                        + np.outer(pu * math.sin(a) + pw * (math.cos(a) - 1), w)
                    )
                    x = x.astype(np.float32)
                else:
                    k = x.shape[0] // 20
                    x[:k] += (v * basis[:, 5] * spectrum[5]).astype(np.float32)
                    x = x[r.permutation(x.shape[0])]
                det = OnlineDrift(ref, torch.device("cpu"), None)
                for wdx, batch in enumerate(torch.from_numpy(x).split(window)):
                    det.observe("0", batch)
                    if det.process(det.start_read(), wdx)[1]:
                        detected += 1
                        break
            curve[str(v)] = detected / streams
        out["curves"][kind] = curve
        print(f"synthetic {kind}: {curve}", flush=True)
    return out


# ---- main -------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer streams and bootstraps (a smoke run)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-alibi", action="store_true", help="torchwatch only")
    p.add_argument("--components", type=int, default=16, help="torchwatch PCA directions")
    p.add_argument("--features", type=int, default=64, help="torchwatch random Fourier features")
    args = p.parse_args()
    window, ert = 32, 1000
    arl = ert / window
    streams_null = 60 if args.quick else 200
    streams_alibi_null = 10 if args.quick else 40
    streams_shift = 10 if args.quick else 25
    bootstraps = 1000 if args.quick else 4000
    cap = 5 * ert

    x, y = digits()
    order = np.random.default_rng(0).permutation(len(x))
    n_train, n_ref = int(0.4 * len(x)), int(0.45 * len(x))
    train, refi, pool = order[:n_train], order[n_train : n_train + n_ref], order[n_train + n_ref :]
    model = train_mlp(x[train], y[train])
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x[pool])).argmax(1).numpy() == y[pool]).mean())
    penultimate = model[:4]

    def embed(inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return penultimate(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))).numpy()

    x_ref = embed(x[refi])
    start = time.perf_counter()
    ref = tw.Reference.fit(model, torch.from_numpy(x[refi]).split(128), modules=["3"], window=window, arl=arl,
                           components=args.components, features=args.features, resamples=10_000)  # fmt: skip
    fit_s = time.perf_counter() - start
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "torch": torch.__version__, "window": window, "ert_samples": ert, "torchwatch_arl_windows": arl,
        "reference_samples": len(refi), "mlp_test_accuracy": round(acc, 4), "detectors": {},
        "torchwatch_components": args.components, "torchwatch_features": args.features,
    }  # fmt: skip
    calib = ref.calibration_check(simulated_arl=arl)
    results["torchwatch_calibration_check"] = {"expected_arl": calib.expected_arl,
                                               "interval": calib.expected_arl_interval,
                                               "holdout_windows": calib.holdout_windows}  # fmt: skip
    detectors = [Torchwatch(ref, window, arl)]
    if not args.no_alibi:
        from alibi_detect.cd import LSDDDriftOnline, MMDDriftOnline

        for cls in (MMDDriftOnline, LSDDDriftOnline):
            detectors.append(Alibi(cls, x_ref, window, ert, bootstraps))
    make = shifts(x[pool], y[pool])
    for det in detectors:
        row: dict = {"setup_s": round(getattr(det, "setup_s", fit_s), 2)}
        n_null = streams_null if det.name == "torchwatch" else streams_alibi_null
        runs, hits = run_lengths(det, make["none"], embed, n_null, cap, seed=10_000)
        row["no_drift"] = {"mean_run_length": round(statistics.mean(runs), 1), "ert": ert, "streams": n_null,
                           "alarmed": hits, "median": statistics.median(runs)}  # fmt: skip
        print(f"{det.name} no drift: {row['no_drift']}", flush=True)
        row["shifts"] = {}
        for name, fn in make.items():
            if name == "none":
                continue
            delays, hits = run_lengths(det, fn, embed, streams_shift, cap, seed=20_000)
            row["shifts"][name] = {"mean_delay": round(statistics.mean(delays), 1), "detected": hits / streams_shift}
            print(f"{det.name} {name}: {row['shifts'][name]}", flush=True)
        if det.name == "torchwatch":
            row["update_cost"] = torchwatch_update_cost(model, ref, x[pool], window, rounds=20)
            with tempfile.TemporaryDirectory() as tmp:
                ref.save(os.path.join(tmp, "ref.safetensors"))
                row["state_bytes"] = os.path.getsize(os.path.join(tmp, "ref.safetensors"))
        else:
            det.reset()
            sample = embed(x[pool][:200])
            t0 = time.perf_counter()
            for r in sample:
                det.det.predict(r)
            row["update_cost"] = {"total_us_per_sample": 1e6 * (time.perf_counter() - t0) / len(sample)}
            row["state_bytes"] = state_bytes(det.det)
        print(f"{det.name} cost: {row['update_cost']}, state {row['state_bytes']} bytes", flush=True)
        results["detectors"][det.name] = row
    results["state_vs_reference_size"] = state_scaling(x_ref, window, ert, bootstraps, skip_alibi=args.no_alibi)
    results["synthetic"] = synthetic(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    print(json.dumps(results, indent=1, default=float))


def state_scaling(x_ref: np.ndarray, window: int, ert: float, bootstraps: int, skip_alibi: bool) -> dict:
    """Detector state for growing reference sets (the digits embeddings, tiled with small noise)."""
    rng = np.random.default_rng(3)
    out: dict = {}
    for n in (800, 1600, 3200):
        xr = x_ref[rng.choice(len(x_ref), n)] + rng.normal(0, 0.01, (n, x_ref.shape[1])).astype(np.float32)
        model = nn.Sequential(nn.Identity())
        r = tw.Reference.fit(model, torch.from_numpy(xr).split(200), modules=["0"], window=window, arl=ert / window,
                             components=16, features=64, resamples=10_000, max_samples=100_000)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            r.save(os.path.join(tmp, "r.safetensors"))
            row = {"torchwatch": os.path.getsize(os.path.join(tmp, "r.safetensors"))}
        if not skip_alibi:
            from alibi_detect.cd import LSDDDriftOnline, MMDDriftOnline

            for cls in (MMDDriftOnline, LSDDDriftOnline):
                # the state is the reference and its kernel matrices; a short ERT keeps the setup quick
                det = cls(xr, ert=50, window_size=window, backend="pytorch", n_bootstraps=1000, verbose=False)
                row[cls.__name__] = state_bytes(det)
        out[str(n)] = row
        print(f"state bytes, reference {n}: {row}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
