"""What one replica gives on the canary batch and holds in its weights, in a form replicas can
exchange and compare: digests (bitwise) and per-module summaries (close).

A probe runs the canary once with a forward hook on every module: each floating-point output's
digest (sha256 of its bytes) and its float64 mean, standard deviation and largest magnitude, in
execution order, so the first module where a replica parts from its peers can be named.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._environment import numerics
from .._pytree import tensors_in
from .._schema import Fields
from .._tensors import model_device, model_dtype
from ..errors import ConfigError
from ..integrity.canary import Canary, CanaryReport, output_digest
from ..integrity.fingerprinting import Fingerprint, fingerprint
from .identity import Identity, identity

__all__ = ["ModuleProbe", "Probe", "canary_of", "take"]

# the settings that decide a forward's numbers on each device type (numerics() has more: who ran it)
SETTINGS = ("torch", "cuda", "cudnn", "device", "device_name", "dtype", "threads", "cpu_capability", "tf32_matmul",
            "tf32_cudnn", "float32_matmul_precision", "deterministic", "autocast")  # fmt: skip
CPU_ONLY = ("threads", "cpu_capability")
MAX_MODULES = 4096  # module outputs a probe describes (their digests and summaries travel to every peer)


@dataclass(frozen=True)
class ModuleProbe:
    """One module output on the canary batch: ``name`` (output position), ``digest`` of its bytes,
    and float64 ``mean``, ``std`` and ``absmax`` of its finite values."""

    name: str
    digest: str
    mean: float
    std: float
    absmax: float

    def stat(self, key: str) -> float:
        return {"mean": self.mean, "std": self.std, "absmax": self.absmax}[key]


@dataclass(frozen=True)
class Probe:
    """One replica, as its peers compare it.

    Attributes:
        identity: who it is (:class:`~torchwatch.Identity`).
        settings: what decides its numbers (versions, device model, dtype, threads, TF32, ...).
        inputs: digest of the canary inputs it ran (peers must have run the same batch).
        outputs: each canary output's digest, by name.
        modules: each module output's :class:`ModuleProbe`, in execution order.
        weights: the weights' fingerprint digest; tensors: a short digest per weight tensor.
        canary: the canary's own verdict on this replica (None when it holds no recorded outputs).
        seconds: how long the probe took.
    """

    identity: Identity
    settings: dict[str, Any]
    inputs: str
    outputs: dict[str, str]
    modules: list[ModuleProbe]
    weights: str
    tensors: dict[str, str]
    canary: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity.to_dict(), "settings": self.settings, "inputs": self.inputs,
            "outputs": self.outputs, "modules": [[m.name, m.digest, _num(m.mean), _num(m.std), _num(m.absmax)]
                                                 for m in self.modules],
            "weights": self.weights, "tensors": self.tensors, "canary": self.canary, "seconds": self.seconds,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, doc: object, where: str = "probe") -> Probe:
        """Inverse of :meth:`to_dict`; FormatError naming a bad field (a peer's message is input)."""
        f = Fields(doc, where)
        ident = f.obj("identity")
        settings = f.obj("settings")
        outputs, tensors = f.obj("outputs"), f.obj("tensors")
        modules = []
        for i, row in enumerate(f.list("modules")):
            m = Fields(dict(zip(("name", "digest", "mean", "std", "absmax"), row, strict=False))
                       if isinstance(row, list) else row, f"{where}, modules[{i}]")  # fmt: skip
            modules.append(ModuleProbe(m.str("name"), m.str("digest"), m.float("mean"), m.float("std"),
                                       m.float("absmax")))  # fmt: skip
        return cls(
            identity=Identity.from_dict(ident.doc, ident.where), settings=dict(settings.doc), inputs=f.str("inputs"),
            outputs={k: outputs.str(k) for k in outputs.doc}, modules=modules, weights=f.str("weights"),
            tensors={k: tensors.str(k) for k in tensors.doc}, canary=f.get("canary"), seconds=f.float("seconds", 0.0),
        )  # fmt: skip


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def canary_of(model: nn.Module, canary: Any) -> Canary:
    """A :class:`~torchwatch.Canary` from a canary, a canary file's path, or the inputs of one
    (a tensor, tuple/list or dict: recorded on ``model`` now, so only replicas' agreement counts)."""
    if isinstance(canary, Canary):
        return canary
    if isinstance(canary, (str, os.PathLike)):
        return Canary.load(canary)
    if canary is None:
        raise ConfigError("a canary is needed: a tw.Canary, the path of a canary file, or a batch of inputs")
    return Canary.record(model, canary)


def settings_of(device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """The settings that decide the model's numbers on ``device`` (read on this thread)."""
    now = numerics(device)
    now["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
    return {k: now.get(k) for k in SETTINGS if device.type == "cpu" or k not in CPU_ONLY}


def inputs_digest(canary: Canary) -> str:
    h = hashlib.sha256(f"{canary.input_kind}\t{','.join(canary.input_keys)}\n".encode())
    for t in canary.inputs:
        h.update(output_digest(t).encode())
    return h.hexdigest()


def tensor_digests(prints: Fingerprint) -> dict[str, str]:
    """A short digest per weight tensor (of its fingerprint's chunk sums): names what differs."""
    return {name: hashlib.sha256(struct.pack(f"<{len(p.chunks)}Q", *p.chunks)).hexdigest()[:16]
            for name, p in prints.tensors.items()}  # fmt: skip


def _modules_probed(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):  # leaves: where a computation happens
            yield name, module


def take(model: nn.Module, canary: Canary, *, replica: str | None = None, modules: bool = True) -> Probe:
    """Run the canary on ``model`` (in inference mode, on this thread) and describe the replica.

    Args:
        model: the model, as it serves.
        canary: the canary batch (its recorded outputs, if any, are checked too).
        replica: the replica's name (default from the environment, :class:`~torchwatch.Identity`).
        modules: also describe every leaf module's output (digest and summary).
    """
    start = time.perf_counter()
    device, dtype = model_device(model), model_dtype(model)
    rows: list[ModuleProbe] = []
    handles = []
    if modules:
        for name, module in _modules_probed(model):
            handles.append(module.register_forward_hook(_recorder(name, rows)))
    try:
        outputs = canary.run(model)
    finally:
        for h in handles:
            h.remove()
    report: CanaryReport | None = canary.compare(outputs, model) if canary.expected else None
    prints = fingerprint(model)
    return Probe(
        identity=identity(device, replica), settings=settings_of(device, dtype), inputs=inputs_digest(canary),
        outputs=report.digests if report is not None else {n: output_digest(t) for n, t in outputs.items()},
        modules=rows, weights=prints.digest, tensors=tensor_digests(prints),
        canary=report.to_dict() if report is not None else None, seconds=time.perf_counter() - start,
    )  # fmt: skip


def _recorder(name: str, rows: list[ModuleProbe]) -> Any:
    calls: dict[str, int] = {}

    def torchwatch_probe(module: nn.Module, args: Any, output: Any) -> None:
        if len(rows) >= MAX_MODULES:
            return
        seen = calls[name] = calls.get(name, -1) + 1  # a module called twice in one forward: name#1
        base = name if not seen else f"{name}#{seen}"
        for label, t in tensors_in(output):
            rows.append(_describe(base + label, t))

    return torchwatch_probe


def _describe(name: str, t: torch.Tensor) -> ModuleProbe:
    if t.layout is not torch.strided or t.is_meta or t.is_quantized:
        return ModuleProbe(name, "", math.nan, math.nan, math.nan)  # nothing to compare by value
    if not t.is_floating_point():
        return ModuleProbe(name, output_digest(t), math.nan, math.nan, math.nan)
    x = t.detach().double()
    finite = x[torch.isfinite(x)]
    if finite.numel():
        mean, std, absmax = float(finite.mean()), float(finite.std(unbiased=False)), float(finite.abs().max())
    else:
        mean = std = absmax = math.nan
    return ModuleProbe(name, output_digest(t), mean, std, absmax)
