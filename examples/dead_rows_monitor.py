"""A monitor of your own, in one file: rows of exact zeros in each watched module's output.

A row (the last dimension of an output: one token's hidden state, one sample's features) that is
exactly zero everywhere is a dead unit group, a masked position gone wrong, or a layer whose
weights were zeroed on load. torchwatch's activation statistics count zeros per element; this
monitor counts whole zero rows, per module, on the output's own device (no host sync in the
hook), and reports them in every record and snapshot under ``extra["dead_rows"]``.

Registration is one line::

    watch = tw.attach(model, monitors=[DeadRows()])

Run it: ``python examples/dead_rows_monitor.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

import torchwatch as tw
from torchwatch.monitors import Binding, Call, Monitor


class DeadRows(Monitor):
    """Per watched module: ``{"rows": n, "zero": z}`` rows seen and rows that were all zero.

    Args:
        modules: names of the modules to watch (default: every module the watch measures).
    """

    name = "dead_rows"

    def __init__(self, modules: list[str] | None = None) -> None:
        self.modules = modules
        self._lock = threading.Lock()
        self._counts: dict[str, torch.Tensor] = {}  # module -> [rows, zero rows] (int64, on its device)

    def bind(self, binding: Binding) -> None:
        watched = dict(binding.modules)
        wanted = self.modules if self.modules is not None else list(watched)
        named = watched if self.modules is None else dict(binding.model.named_modules())
        for fqn in wanted:
            # sampled eager calls only, like the statistics; a failure is counted, never raised
            binding.on_output(fqn, named[fqn], self._measure(fqn), error_key=self.name)

    def _measure(self, fqn: str) -> Any:
        def measure(call: Call, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() == 0:
                return
            if not output.shape[-1]:
                return
            with torch.no_grad():
                rows = output.detach().reshape(-1, output.shape[-1])
                zero = (rows == 0).all(dim=1).sum()
                with self._lock:
                    acc = self._counts.get(fqn)
                    if acc is None:
                        with torch.inference_mode(False):
                            acc = self._counts[fqn] = torch.zeros(2, dtype=torch.int64, device=rows.device)
                    acc[0] += rows.shape[0]
                    acc[1] += zero

        return measure

    def take(self, *, keep: bool) -> dict[str, torch.Tensor] | None:
        with self._lock:
            taken = {fqn: acc.clone() for fqn, acc in self._counts.items()}
            if not keep:
                for acc in self._counts.values():
                    acc.zero_()
        return taken or None

    def collect(self, taken: dict[str, torch.Tensor] | None, ctx: Any) -> dict[str, dict[str, int]] | None:
        # the window's counts; the watch keeps the totals since the reset with merge()
        if taken is None:
            return None
        return {fqn: dict(zip(("rows", "zero"), t.tolist(), strict=True)) for fqn, t in taken.items()}

    def merge(self, earlier: dict[str, dict[str, int]], later: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        out = {fqn: dict(c) for fqn, c in earlier.items()}
        for fqn, c in later.items():
            mine = out.setdefault(fqn, {"rows": 0, "zero": 0})
            mine["rows"] += c["rows"]
            mine["zero"] += c["zero"]
        return out

    def reset(self) -> None:
        self.take(keep=False)


if __name__ == "__main__":
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU row dies
    with tw.attach(model, monitors=[DeadRows()]) as watch:
        for _ in range(3):
            model(torch.randn(16, 8))
        print(watch.snapshot().extra["dead_rows"])
