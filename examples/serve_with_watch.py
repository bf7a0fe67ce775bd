"""A minimal serving loop with torchwatch: statistics to TensorBoard, NaN provenance per request.

python examples/serve_with_watch.py && tensorboard --logdir runs/example
"""

from __future__ import annotations

import torch
from torch import nn

import torchwatch as tw


def main() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 10)).eval()
    alerts: list[tw.Alert] = []
    with tw.attach(
        model, sinks=[tw.TensorBoardSink("runs/example")], flush_every=50, on_nonfinite=alerts.append
    ) as watch:
        for i in range(500):
            batch = torch.randn(16, 32)
            if i == 321:
                batch[3, 7] = float("inf")  # one bad request
            with torch.inference_mode(), watch.context(trace_id=f"req-{i}"):
                model(batch)
        snap = watch.snapshot()
    print(f"{snap.calls} calls; first NaN/Inf: {alerts[0].message if alerts else 'none'}")
    worst = max(snap, key=lambda name: snap[name].underflow["float8_e4m3fn"] / max(snap[name].count, 1))
    print(f"most fp8 (e4m3fn) underflow: {worst!r}, {snap[worst].underflow['float8_e4m3fn'] / snap[worst].count:.2%}")


if __name__ == "__main__":
    main()
