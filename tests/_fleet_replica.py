"""One serving replica for the fleet tests: a small classifier behind a PrometheusSink, a canary
re-check, and an optional fault. Prints the metrics port, then serves until stdin closes.

Usage: python _fleet_replica.py NAME FAULT CANARY_PATH   (FAULT: none, weights, sdc)
"""

from __future__ import annotations

import sys

import torch

import torchwatch as tw


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()


def corrupt(model: torch.nn.Module, fault: str) -> None:
    if fault == "weights":  # one flipped bit in a weight
        with torch.no_grad():
            model[0].weight.view(-1).view(torch.int32)[7] ^= 1 << 22
    elif fault == "sdc":  # a device that computes one activation wrong, weights intact

        def wrong(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output.view(-1)[3] += 50.0
            return output

        model[1].register_forward_hook(wrong)


def main() -> None:
    name, fault, canary_path = sys.argv[1:4]
    torch.set_num_threads(1)
    model = build()
    corrupt(model, fault)
    sink = tw.PrometheusSink(port=0, model_name="clf")
    watch = tw.attach(model, sinks=[sink], replica=name, rules=[])
    traffic = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(16, 16, generator=traffic))
    checks = watch.verify_canary_every(3600, canary_path)
    checks.check_now()
    watch.flush()
    print(sink.port, flush=True)
    sys.stdin.read()  # serve until the test closes our stdin
    watch.detach()


if __name__ == "__main__":
    main()
