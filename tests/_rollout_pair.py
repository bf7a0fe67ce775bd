"""A primary and a candidate serving side by side for the rollout-template tests: a classifier
watched with a PrometheusSink, tw.rollout in shadow, served until the verdict is final. Prints
the metrics port, then keeps exporting until stdin closes.

Usage: python _rollout_pair.py NAME CANDIDATE   (CANDIDATE: same, swap)
"""

from __future__ import annotations

import copy
import sys

import torch

import torchwatch as tw


def main() -> None:
    name, kind = sys.argv[1:3]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    primary = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)).eval()
    candidate = copy.deepcopy(primary)
    if kind == "swap":  # a label map that swaps the two classes on a tenth of the inputs

        def swap(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            hit = (args[0][:, 0] * 1000).floor().remainder(10) == 0
            out = out.clone()
            out[hit] = out[hit].flip(-1)
            return out

        candidate[2].register_forward_hook(swap)
    sink = tw.PrometheusSink(port=0, model_name="clf")
    traffic = torch.Generator().manual_seed(1)
    with tw.attach(primary, sinks=[sink], rules=[], flush_every=100) as watch:
        rollout = tw.rollout(primary, candidate, mode="shadow", share=1.0, seed=0, name=name)
        with torch.inference_mode():
            for i in range(5000):
                rollout(torch.randn(16, 8, generator=traffic))
                if i % 50 == 49:
                    rollout.wait()
                    if rollout.verdict().decision != "continue":
                        break
        watch.flush()
        print(sink.port, flush=True)
        sys.stdin.read()  # export until the test closes our stdin
        rollout.close()


if __name__ == "__main__":
    main()
