"""Rolling out a new version of a transformers classifier, decided by evidence.

python examples/rollout_classifier.py [--json out.json]

A BERT sentiment-style classifier (built from a config: no download) serves requests. Four
candidates are rolled out beside it, each until the verdict is final:

1. an identical copy (A/A), in shadow: must be promoted, never rolled back;
2. a bad export whose label map swaps the two classes on 5% of inputs, as a canary that answers
   requests: rolled back on agreement... which a canary cannot see without labels, so it runs in
   shadow, and ``on_verdict`` switches the server back to the primary automatically;
3. a build that is 20% slower, as a canary: rolled back on p99 latency;
4. a fixed version that is right where the primary is wrong on 10% of inputs, as a canary with
   labels fed back: promoted on accuracy.

Each prints the verdict, the metric that decided and the requests it took. Exit status 0 when all
four verdicts are the expected ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
import transformers
from torch import nn

import torchwatch as tw

SEQ, BATCH, VOCAB = 16, 8, 1000


class Classifier(nn.Module):
    """Token ids in, two logits out (what a serving handler calls)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).logits


class SwapSome(nn.Module):
    """A label map that swaps the two classes on the inputs whose ids sum to a multiple of ``every``."""

    def __init__(self, model: nn.Module, every: int) -> None:
        super().__init__()
        self.model, self.every = model, every

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids).clone()
        hit = ids.sum(-1) % self.every == 0
        logits[hit] = logits[hit].flip(-1)
        return logits


class Slower(nn.Module):
    """The same answers, 20% more time: the extra time is spent spinning, as a slower kernel would."""

    def __init__(self, model: nn.Module, extra: float) -> None:
        super().__init__()
        self.model, self.extra = model, extra

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(ids)
        until = time.perf_counter() + self.extra * (time.perf_counter() - start)
        while time.perf_counter() < until:
            pass
        return out


class Server:
    """What serves requests: ``handle`` calls whichever model the server points at."""

    def __init__(self, model: nn.Module | tw.Rollout) -> None:
        self.model = model

    def handle(self, ids: torch.Tensor, trace_id: str) -> torch.Tensor:
        with torch.inference_mode():
            if isinstance(self.model, tw.Rollout):
                return self.model(ids, trace_id=trace_id)
            return self.model(ids)


def build() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, num_labels=2, max_position_embeddings=64)  # fmt: skip
    model = Classifier(transformers.BertForSequenceClassification(config)).eval()
    with torch.no_grad():  # a confident classifier: its logits scaled up
        model.bert.classifier.weight.mul_(30.0)
    return model


def serve(server: Server, rollout: tw.Rollout, requests: int, seed: int, labels=None, batch: int = BATCH) -> int:
    """Serve up to ``requests`` until the verdict is final; returns the requests served."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(requests):
        ids = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
        server.handle(ids, f"req-{seed}-{i}")
        if labels is not None:
            rollout.record_labels(f"req-{seed}-{i}", labels(ids))
        if i % 25 == 24:
            rollout.wait()
            if rollout.verdict().decision != "continue":
                return i + 1
    rollout.wait()
    return requests


def run() -> dict:
    torch.set_num_threads(1)
    primary = build()
    results = {}

    def report(name: str, verdict: tw.Verdict, requests: int, served_by: str) -> None:
        results[name] = {"decision": verdict.decision, "metric": verdict.metric, "estimate": verdict.estimate,
                         "lower": verdict.lower, "upper": verdict.upper, "requests": requests,
                         "served_by_after": served_by}  # fmt: skip
        print(f"{name}: {verdict.decision} on {verdict.metric} after {requests} requests "
              f"({verdict.reason}); the server now calls the {served_by}")  # fmt: skip

    # 1. A/A in shadow: the candidate sees every request's input, off the serving path
    server = Server(primary)
    with tw.rollout(primary, copy.deepcopy(primary), mode="shadow", share=1.0, seed=1) as ro:
        server.model = ro
        n = serve(server, ro, 4000, seed=1)
        report("identical copy", ro.verdict(), n, "rollout")

    # 2. the bad export: on rollback the server goes back to the primary, with no one awake
    server = Server(primary)

    def act(verdict: tw.Verdict) -> None:
        server.model = primary if verdict.decision == "rollback" else server.model

    with tw.rollout(primary, SwapSome(copy.deepcopy(primary), 20), mode="shadow", share=1.0, seed=2,
                    on_verdict=act) as ro:  # fmt: skip
        server.model = ro
        n = serve(server, ro, 4000, seed=2)
        ro.wait()
        report("classes swapped on 5% of inputs", ro.verdict(), n, "primary" if server.model is primary else "rollout")

    # 3. 20% slower, as a canary answering half the requests
    server = Server(primary)
    with tw.rollout(primary, Slower(copy.deepcopy(primary), 0.2), share=0.5, seed=3, metrics=["latency_p99"],
                    on_verdict=act) as ro:  # fmt: skip
        server.model = ro
        n = serve(server, ro, 40_000, seed=3, batch=1)  # one row per request: latency needs many requests
        report("20% slower", ro.verdict(), n, "primary" if server.model is primary else "rollout")

    # 4. a fix: the primary is the version that swaps classes on 10% of inputs, the candidate does not
    buggy = SwapSome(copy.deepcopy(primary), 10)
    server = Server(buggy)

    def truth(ids: torch.Tensor) -> torch.Tensor:  # labels fed back later, e.g. from user feedback
        with torch.inference_mode():
            return primary(ids).argmax(-1)

    with tw.rollout(buggy, copy.deepcopy(primary), share=0.5, seed=4, labels=True,
                    metrics=["accuracy", "calibration", "errors"]) as ro:  # fmt: skip
        server.model = ro
        n = serve(server, ro, 4000, seed=4, labels=truth)
        report("fixed version, labels fed back", ro.verdict(), n, "rollout")
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    args = p.parse_args()
    results = run()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    want = {"identical copy": ("promote", None), "classes swapped on 5% of inputs": ("rollback", "agreement"),
            "20% slower": ("rollback", "latency_p99"), "fixed version, labels fed back": ("promote", None)}  # fmt: skip
    ok = all(results[k]["decision"] == d and (m is None or results[k]["metric"] == m) for k, (d, m) in want.items())
    ok = ok and results["classes swapped on 5% of inputs"]["served_by_after"] == "primary"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
