"""Rolling out a new model version: output quality with labels fed back, and the candidate in shadow.

python examples/shadow_rollout.py [LOGDIR] && torchwatch report LOGDIR   (default LOGDIR: runs/rollout)

The serving version answers every request; a quarter of the requests are also run, off the serving
path, on the candidate, whose export swapped two classes in its label map. Labels arrive after each
answer (as from a feedback queue). Exit status 0 when the shadow comparison flagged the candidate.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

import torchwatch as tw


def main(logdir: str = "runs/rollout") -> int:
    torch.manual_seed(0)
    centres = torch.randn(4, 8) * 3
    primary = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():  # a classifier that separates the four centres well enough for the example
        primary[0].weight.copy_(torch.cat([centres, -centres] * 4)[:32] / 3)
        primary[2].weight.copy_(torch.eye(4).repeat(1, 8) - 0.25)
    candidate = copy.deepcopy(primary)
    with torch.no_grad():  # v2: classes 0 and 1 swapped at export
        for t in (candidate[2].weight, candidate[2].bias):
            t[[0, 1]] = t[[1, 0]].clone()

    os.makedirs(logdir, exist_ok=True)
    sinks = [tw.JsonlSink(os.path.join(logdir, "stats.jsonl"))]
    with tw.attach(primary, sinks=sinks, outputs=True, flush_every=20) as watch:
        shadow = tw.shadow(primary, candidate, sample=0.25, seed=0, path=os.path.join(logdir, "shadow.jsonl"))
        for i in range(400):
            labels = torch.randint(0, 4, (16,))
            x = centres[labels] + torch.randn(16, 8)
            with torch.inference_mode(), watch.context(trace_id=f"req-{i}"):
                primary(x)
            watch.record_labels(f"req-{i}", labels)  # the true classes, once known
        result = shadow.close()
        quality = watch.snapshot().outputs
    print(f"served {quality.rows} predictions: accuracy {quality.accuracy:.1%}, ECE {quality.ece:.3f}, "
          f"confidence {quality.confidence:.3f}")  # fmt: skip
    print(result.summary())
    return 0 if not result.ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
