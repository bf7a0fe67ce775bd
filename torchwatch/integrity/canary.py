"""Known-answer tests: a reference batch and the outputs the validated model gave on it.

A canary catches what a weight manifest cannot: a model that loads the right bytes but computes
differently — another kernel, a changed default (TF32), a broken fused path, a preprocessing or
config change inside the model, a faulty device.

File format (safetensors, DESIGN §5): tensors ``input/<i>`` and ``expected/<i>`` and
``__metadata__`` with ``format`` (``torchwatch.canary/1``), ``input_kind`` (tensor, tuple or
dict) and ``input_keys``, ``output_names``, ``manifest_digest``, ``dtype``, ``device``,
``device_name``, ``cpu_capability``, ``threads``, ``tf32``, ``torch`` and ``tolerances``.

How outputs are compared (``mode="auto"`` picks from the metadata; any mode can be forced):

* ``"bitwise"`` — same device model, dtype, torch version, thread count and TF32 setting:
  re-running the same batch there is bitwise identical, so any difference is a finding.
* ``"tolerance"`` — same device type and dtype, something else differs: elementwise
  ``|got - expected| <= atol + rtol * |expected|`` with the defaults of ``torch.testing``
  (fp16 1e-3/1e-5, bf16 1.6e-2/1e-5, fp32 1.3e-6/1e-5, fp64 1e-7/1e-7).
* ``"summary"`` — another device type or dtype: relative L2 error, cosine similarity and, for
  logits, top-1 agreement, because elementwise tolerances fail on a few percent of values
  across devices even when the model is right (TF32, bf16, batch-dependent kernels).

Integer and bool outputs are compared exactly in every mode; NaN must be where it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import _safetensors, _validate, formats
from .._environment import device_name
from .._files import atomic_write, parse_json, shown
from .._pytree import call_batch, flatten_outputs, is_logits
from ..errors import CanaryError, ConfigError, FormatError
from ._hashing import tensor_bytes
from .manifest import Manifest

__all__ = ["Canary", "CanaryReport", "OutputCheck", "Tolerances", "output_digest"]

FORMAT = formats.CANARY
MODES = ("auto", "bitwise", "tolerance", "summary")

# torch.testing.assert_close defaults
TESTING_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
}
# summary mode, by the less precise of the two dtypes: (max relative L2 error, min cosine)
SUMMARY_LIMITS: dict[str, tuple[float, float]] = {
    "float64": (1e-3, 0.9999),
    "float32": (1e-2, 0.999),
    "float16": (2e-2, 0.999),
    "bfloat16": (5e-2, 0.995),
}
_PRECISION = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Tolerances:
    """Limits used by :meth:`Canary.verify`; None means the per-dtype default above.

    Attributes:
        rtol, atol: elementwise tolerances (``"tolerance"`` mode).
        max_rel_l2, min_cosine: summary limits (``"summary"`` mode).
        min_top1: least fraction of rows whose argmax agrees, for logits outputs (``"summary"``).
    """

    rtol: float | None = None
    atol: float | None = None
    max_rel_l2: float | None = None
    min_cosine: float | None = None
    min_top1: float = 0.99

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "max_rel_l2"):  # None: the per-dtype default
            _validate.optional(_validate.number, "Tolerances", name, getattr(self, name), low=0.0)
        _validate.optional(_validate.number, "Tolerances", "min_cosine", self.min_cosine, low=-1.0, high=1.0)
        _validate.number("Tolerances", "min_top1", self.min_top1, low=0.0, high=1.0)

    @classmethod
    def from_json(cls, text: str, where: str) -> Tolerances:
        """Tolerances stored in a canary's metadata; FormatError naming ``where`` if they are not."""
        doc = parse_json(text or "{}", f"{where}, metadata field 'tolerances'")
        if not isinstance(doc, dict) or not set(doc) <= {f.name for f in dataclasses.fields(cls)}:
            raise FormatError(f"{where}, metadata field 'tolerances': expected an object of {cls.__name__} fields")
        try:
            return cls(**doc)
        except ConfigError as exc:
            raise FormatError(f"{where}, metadata field 'tolerances': {exc}") from None


@dataclass(frozen=True)
class OutputCheck:
    """How one output compared.

    Attributes:
        name: the output's name (``"logits"``, ``"0"``, ``"hidden_states.3"``, ``"output"`` for a
            plain tensor).
        passed: whether it met the mode's criteria.
        max_abs: largest absolute difference (finite positions), rel_l2: ||got - expected|| /
            ||expected||, cosine: cosine similarity, top1_agree: fraction of rows (last dimension)
            with the same argmax, or None where that means nothing; mismatched: elements outside
            the elementwise tolerance (``"tolerance"`` mode) or differing (``"bitwise"``).
        reason: why it failed, for a person; "" when it passed.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    passed: bool
    max_abs: float = float("nan")
    rel_l2: float = float("nan")
    cosine: float = float("nan")
    top1_agree: float | None = None
    mismatched: int = 0
    reason: str = ""


@dataclass
class CanaryReport:
    """What :meth:`Canary.verify` found.

    Attributes:
        ok: every recorded output is present and passed.
        mode: the comparison used; mode_reason: why that one was chosen.
        outputs: one :class:`OutputCheck` per recorded output.
        unexpected_outputs: outputs the model gives now that were not recorded.
        seconds: wall time (the forward included).
        digests: per output the model gave now, its :func:`output_digest` (sha256 of dtype, shape
            and bytes): replicas that should be bitwise equal compare these.
    """

    ok: bool
    mode: str
    mode_reason: str
    outputs: list[OutputCheck]
    unexpected_outputs: list[str]
    seconds: float
    digests: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def failed(self) -> list[OutputCheck]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        head = f"canary {'OK' if self.ok else 'FAILED'} ({self.mode}: {self.mode_reason}), {len(self.outputs)} outputs"
        lines = [head]
        for o in self.failed[:10]:
            lines.append(f"  {o.name!r}: {o.reason}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more failed outputs")
        if not self.ok:
            lines.append(
                "  fix: check the weights (torchwatch verify), the device/dtype/TF32 settings and the preprocessing; "
                "if the model changed on purpose, record a new canary"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "mode": self.mode, "mode_reason": self.mode_reason,
            "outputs": [_jsonable(dataclasses.asdict(o)) for o in self.outputs],
            "unexpected_outputs": self.unexpected_outputs, "seconds": self.seconds, "digests": self.digests,
        }  # fmt: skip

    def raise_for_failure(self) -> None:
        """Raise :class:`torchwatch.CanaryError` (carrying this report) unless ``ok``."""
        if not self.ok:
            raise CanaryError(self.summary(), report=self)


def output_digest(t: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes (copied to the host): equal exactly when the
    tensors are bitwise equal."""
    t = t.detach()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}\t{','.join(map(str, t.shape))}\n".encode())
    h.update(tensor_bytes(t.cpu()))
    return h.hexdigest()


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ---- environment ----------------------------------------------------------------------------


def _environment(device: torch.device) -> dict[str, str]:
    name = device_name(device)
    if device.type == "cuda":
        tf32 = f"{torch.backends.cuda.matmul.allow_tf32},{torch.backends.cudnn.allow_tf32}"
    else:
        tf32 = "n/a"
    return {
        "device": device.type,
        "device_name": name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()) if device.type == "cpu" else "n/a",
        "tf32": tf32,
        "torch": torch.__version__,
    }


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype | None]:
    device, dtype = torch.device("cpu"), None
    for t in list(model.parameters()) + list(model.buffers()):
        device = t.device
        if t.is_floating_point():
            return device, t.dtype
    return device, dtype


# ---- inputs and outputs ---------------------------------------------------------------------


def _inputs_to_tensors(inputs: Any) -> tuple[str, list[str], list[torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return "tensor", [], [inputs]
    if isinstance(inputs, (tuple, list)):
        kind, keys, values = "tuple", [], list(inputs)
    elif isinstance(inputs, Mapping):
        kind, keys, values = "dict", [str(k) for k in inputs], list(inputs.values())
    else:
        raise ConfigError(
            f"canary inputs must be a tensor, a tuple/list or a dict of tensors, got {type(inputs).__name__}"
        )
    bad = [keys[i] if keys else str(i) for i, v in enumerate(values) if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"canary inputs must all be tensors; not tensors: {', '.join(bad)}")
    return kind, keys, values


def _call(model: torch.nn.Module, kind: str, keys: list[str], values: list[torch.Tensor]) -> Any:
    """Run the model on the canary inputs, rebuilt as the batch they were recorded from."""
    batch = (
        values[0] if kind == "tensor" else tuple(values) if kind == "tuple" else dict(zip(keys, values, strict=True))
    )
    return call_batch(model, batch)


# ---- comparison -----------------------------------------------------------------------------


def _less_precise(a: str, b: str) -> str:
    ranks = [_PRECISION.index(d) if d in _PRECISION else 0 for d in (a, b)]
    return _PRECISION[max(ranks)]


def _compare(name: str, got: torch.Tensor, exp: torch.Tensor, mode: str, tol: Tolerances, logits: bool) -> OutputCheck:
    shape, dtype = tuple(exp.shape), str(exp.dtype).removeprefix("torch.")
    got_dtype = str(got.dtype).removeprefix("torch.")
    if tuple(got.shape) != shape:
        return OutputCheck(name, shape, dtype, False, reason=f"shape {list(got.shape)}, expected {list(shape)}")
    got = got.detach().cpu()
    if not exp.is_floating_point() or not got.is_floating_point():
        if got_dtype != dtype or not torch.equal(got, exp):
            diff = int((got.to(exp.dtype) != exp).sum()) if got.shape == exp.shape else -1
            why = f"{diff} of {exp.numel()} values differ ({got_dtype} vs {dtype}, compared exactly)"
            return OutputCheck(name, shape, dtype, False, mismatched=diff, reason=why)
        return OutputCheck(name, shape, dtype, True)
    g, e = got.double(), exp.double()
    nan_g, nan_e = torch.isnan(g), torch.isnan(e)
    finite = torch.isfinite(g) & torch.isfinite(e)
    d = (g - e)[finite]
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    norm_e = float(e[finite].norm())
    rel_l2 = float(d.norm()) / norm_e if norm_e > 0 else (0.0 if float(d.norm()) == 0 else math.inf)
    norm_g = float(g[finite].norm())
    cosine = (
        float((g[finite] * e[finite]).sum()) / (norm_g * norm_e)
        if norm_g > 0 and norm_e > 0
        else (1.0 if norm_g == norm_e else 0.0)
    )
    top1 = None
    if logits:
        top1 = float((g.argmax(-1) == e.argmax(-1)).double().mean()) if g.numel() else 1.0
    same_specials = bool(torch.equal(nan_g, nan_e) and torch.equal(g[~finite & ~nan_g], e[~finite & ~nan_e]))
    stats = {"max_abs": max_abs, "rel_l2": rel_l2, "cosine": cosine, "top1_agree": top1}

    if mode == "bitwise":
        if got_dtype != dtype:
            return OutputCheck(name, shape, dtype, False, **stats,
                               reason=f"dtype {got_dtype}, recorded {dtype}: the output dtype changed, so it cannot "
                                      f"match bitwise (max |diff| {max_abs:.3g}, rel L2 {rel_l2:.3g})")  # fmt: skip
        same = torch.equal(got.reshape(-1).view(torch.uint8), exp.reshape(-1).view(torch.uint8))
        if same:
            return OutputCheck(name, shape, dtype, True, **stats)
        differ = int((g != e).sum() - (nan_g & nan_e).sum())
        return OutputCheck(name, shape, dtype, False, mismatched=differ, **stats,
                           reason=f"{differ} of {exp.numel()} values differ bitwise (max |diff| {max_abs:.3g}, "
                                  f"rel L2 {rel_l2:.3g})")  # fmt: skip
    if not same_specials:
        why = f"NaN/Inf in different places ({int(nan_g.sum())} NaN now, {int(nan_e.sum())} recorded)"
        return OutputCheck(name, shape, dtype, False, **stats, reason=why)
    if mode == "tolerance":
        rtol_d, atol_d = TESTING_TOLERANCES.get(_less_precise(dtype, got_dtype), (1.3e-6, 1e-5))
        rtol = tol.rtol if tol.rtol is not None else rtol_d
        atol = tol.atol if tol.atol is not None else atol_d
        bad = int((~torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)).sum())
        if bad == 0:
            return OutputCheck(name, shape, dtype, True, **stats)
        return OutputCheck(name, shape, dtype, False, mismatched=bad, **stats,
                           reason=f"{bad} of {exp.numel()} values outside rtol={rtol:g}, atol={atol:g} "
                                  f"(max |diff| {max_abs:.3g})")  # fmt: skip
    max_l2_d, min_cos_d = SUMMARY_LIMITS.get(_less_precise(dtype, got_dtype), (1e-2, 0.999))
    max_l2 = tol.max_rel_l2 if tol.max_rel_l2 is not None else max_l2_d
    min_cos = tol.min_cosine if tol.min_cosine is not None else min_cos_d
    reasons = []
    if not rel_l2 <= max_l2:
        reasons.append(f"rel L2 {rel_l2:.3g} > {max_l2:g}")
    if not cosine >= min_cos:
        reasons.append(f"cosine {cosine:.6f} < {min_cos:g}")
    if top1 is not None and top1 < tol.min_top1:
        reasons.append(f"top-1 agreement {top1:.3f} < {tol.min_top1:g}")
    return OutputCheck(name, shape, dtype, not reasons, **stats, reason="; ".join(reasons))


# ---- the canary -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    """A reference batch, the outputs the validated model gave on it, and where it ran.

    Create with :meth:`record`, keep with :meth:`save`/:meth:`load`, check with :meth:`verify`.

    Example:
        >>> import torch, torchwatch as tw
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Softmax(-1))
        >>> canary = tw.Canary.record(model, torch.randn(16, 8))
        >>> canary.verify(model).ok
        True
        >>> with torch.no_grad():
        ...     model[0].weight[0, 0] += 1e-3
        >>> report = canary.verify(model)
        >>> report.ok, report.mode, report.failed[0].name
        (False, 'bitwise', 'output')
    """

    inputs: tuple[torch.Tensor, ...]
    input_kind: str
    input_keys: tuple[str, ...]
    expected: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @classmethod
    def record(
        cls, model: torch.nn.Module, inputs: Any, *, manifest: Any = None, tolerances: Tolerances | None = None
    ) -> Canary:
        """Run ``model`` on ``inputs`` (in inference mode) and keep inputs, outputs and environment.

        Args:
            model: the validated model, in the mode it serves in (``eval()``).
            inputs: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``).
            manifest: the :class:`torchwatch.Manifest` of the weights (of the checkpoint or of
                the model: either works), so a self-test can check that canary and manifest
                belong to the same weights; the canary keeps the digest of the manifest as this
                model sees it (:meth:`Manifest.for_model`). A digest string is kept as it is.
            tolerances: limits to store with the canary (used unless verify() is given others).

        Raises:
            ConfigError: inputs are not tensors, or the model fails or returns no tensor.
        """
        _validate.instance("Canary.record", "model", model, torch.nn.Module, "a torch.nn.Module")
        _validate.instance(
            "Canary.record", "tolerances", tolerances, Tolerances, "a torchwatch.Tolerances", optional=True
        )
        kind, keys, values = _inputs_to_tensors(inputs)
        device, dtype = _model_device_dtype(model)
        try:
            with torch.inference_mode():
                out = _call(model, kind, keys, [v.to(device) for v in values])
        except Exception as exc:  # noqa: BLE001 - reported as the user's configuration problem
            raise ConfigError(f"the model failed on the canary inputs ({_describe(keys, values)}): {exc!r}") from None
        expected = {n: t.detach().cpu().contiguous().clone() for n, t in flatten_outputs(out).items()}
        if not expected:
            raise ConfigError(f"the model returned no tensor on the canary inputs (got {type(out).__name__})")
        if manifest is not None and not isinstance(manifest, (Manifest, str)):
            raise ConfigError(f"manifest= takes a torchwatch.Manifest or its digest, got {type(manifest).__name__}")
        digest = manifest.digest if isinstance(manifest, Manifest) else manifest
        view = manifest.for_model(model) if isinstance(manifest, Manifest) else None
        metadata = {
            "format": FORMAT,
            **_environment(device),
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "none",
            "manifest_digest": str(digest) if digest else "",
            "weights_digest": view.digest if view is not None else "",
            "input_kind": kind,
            "input_keys": json.dumps(keys),
            "output_names": json.dumps(list(expected)),
            "tolerances": json.dumps(dataclasses.asdict(tolerances) if tolerances else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        inputs_cpu = tuple(v.detach().cpu().contiguous().clone() for v in values)
        return cls(inputs_cpu, kind, tuple(keys), expected, metadata)

    @property
    def manifest_digest(self) -> str | None:
        """The digest of the manifest given at record time, or None."""
        return self.metadata.get("manifest_digest") or None

    @property
    def weights_digest(self) -> str | None:
        """What the canary is bound to: the digest of that manifest as the recorded model saw it
        (:meth:`torchwatch.Manifest.for_model`), the same for a checkpoint's manifest and the
        model's; None for canaries recorded without a manifest object."""
        return self.metadata.get("weights_digest") or None

    def belongs_to(self, manifest: Any, model: torch.nn.Module) -> bool:
        """Whether this canary was recorded for the weights ``manifest`` describes, as ``model``
        holds them (True when it was recorded without a manifest: nothing to check)."""
        bound = {d for d in (self.weights_digest, self.manifest_digest) if d}
        if not bound:
            return True
        view = manifest.for_model(model)
        return bool(bound & {manifest.digest, view.digest if view is not None else None})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the canary as one safetensors file (atomically)."""
        from safetensors.torch import save_file

        tensors = {f"input/{i}": t for i, t in enumerate(self.inputs)}
        tensors.update({f"expected/{i}": t for i, t in enumerate(self.expected.values())})
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=self.metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Canary:
        """Read a canary file.

        Raises:
            FormatError: missing, truncated or corrupt file, not a canary, an unknown format version,
                or tensors that do not match its metadata.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"Canary.load needs a path, got {type(path).__name__}")
        where = f"canary {shown(path)}"
        tensors, meta = _safetensors.load(path, "canary")
        if meta.get("format") != FORMAT:
            raise FormatError(f"{where} has format {meta.get('format')!r}; this torchwatch reads {FORMAT!r}")
        missing = [k for k in ("input_kind", "input_keys", "output_names") if k not in meta]
        if missing:
            raise FormatError(f"{where} lacks metadata field {missing[0]!r}; it is truncated or not a canary")
        kind = meta["input_kind"]
        keys = parse_json(meta["input_keys"], f"{where}, metadata field 'input_keys'")
        names = parse_json(meta["output_names"], f"{where}, metadata field 'output_names'")
        Tolerances.from_json(meta.get("tolerances", "{}"), where)
        n_in = sum(1 for k in tensors if k.startswith("input/"))
        if kind not in ("tensor", "tuple", "dict"):
            raise FormatError(f"{where}, metadata field 'input_kind': {kind!r} is not tensor, tuple or dict")
        for field_name, value in (("input_keys", keys), ("output_names", names)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise FormatError(f"{where}, metadata field {field_name!r}: expected a list of strings")
        if (kind == "dict" and len(keys) != n_in) or (kind == "tensor" and n_in != 1):
            raise FormatError(f"{where}: {n_in} input tensors do not fit input_kind={kind!r} with keys {keys}")
        try:
            inputs = tuple(tensors[f"input/{i}"] for i in range(n_in))
            expected = {str(name): tensors[f"expected/{i}"] for i, name in enumerate(names)}
        except KeyError as exc:
            raise FormatError(f"{where} lacks tensor {exc.args[0]!r}; it is truncated or not a canary") from None
        return cls(inputs, kind, tuple(keys), expected, dict(meta))

    def choose_mode(self, model: torch.nn.Module) -> tuple[str, str]:
        """The comparison ``mode="auto"`` uses for this model, and why."""
        device, dtype = _model_device_dtype(model)
        now = _environment(device)
        now["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else "none"
        m = self.metadata
        if m.get("device") != now["device"]:
            return "summary", f"recorded on {m.get('device')}, running on {now['device']}"
        if m.get("dtype") != now["dtype"]:
            return "summary", f"recorded in {m.get('dtype')}, running in {now['dtype']}"
        differ = [k for k in ("device_name", "cpu_capability", "threads", "tf32", "torch") if m.get(k) != now[k]]
        if differ:
            k = differ[0]
            return "tolerance", f"{k} differs: recorded {m.get(k)!r}, now {now[k]!r}"
        return "bitwise", "same device, dtype, torch, threads and TF32 setting"

    def verify(
        self,
        model: torch.nn.Module,
        *,
        mode: str = "auto",
        tolerances: Tolerances | None = None,
        raise_on_failure: bool = False,
    ) -> CanaryReport:
        """Run ``model`` on the stored inputs and compare with the stored outputs.

        Inputs go to the model's device; floating inputs are cast to the model's dtype when it
        differs from the recorded one.

        Args:
            model: the model to check.
            mode: ``"auto"`` (from the metadata; see the module docstring), ``"bitwise"``,
                ``"tolerance"`` or ``"summary"``.
            tolerances: limits (default: the ones stored at record time, else per-dtype defaults).
            raise_on_failure: raise :class:`torchwatch.CanaryError` instead of returning a failed report.

        Raises:
            ConfigError: a bad mode, or the model fails on the stored inputs (wrong input shapes
                for this model, say); the message gives the inputs' shapes.
            CanaryError: only with ``raise_on_failure=True``.
        """
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not valid: use one of {', '.join(MODES)}")
        start = time.perf_counter()
        report = self.compare(self.run(model), model, mode=mode, tolerances=tolerances)
        report.seconds = time.perf_counter() - start
        if raise_on_failure:
            report.raise_for_failure()
        return report

    def run(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's outputs on the stored inputs, by name (in inference mode; inputs moved to the
        model's device, floating ones cast to its dtype when it differs from the recorded one).

        Raises:
            ConfigError: the model fails on the stored inputs; the message gives their shapes.
        """
        device, dtype = _model_device_dtype(model)
        recorded = self.metadata.get("dtype")
        values = []
        for v in self.inputs:
            v = v.to(device)
            if v.is_floating_point() and dtype is not None and recorded != str(dtype).removeprefix("torch."):
                v = v.to(dtype)
            values.append(v)
        try:
            with torch.inference_mode():
                out = _call(model, self.input_kind, list(self.input_keys), values)
        except Exception as exc:  # noqa: BLE001 - the canary does not fit this model
            raise ConfigError(
                f"the model failed on the canary inputs ({_describe(list(self.input_keys), values)}): {exc!r}; "
                "is this the model the canary was recorded for?"
            ) from None
        return flatten_outputs(out)

    def compare(
        self, got: Mapping[str, torch.Tensor], model: torch.nn.Module, *, mode: str = "auto",
        tolerances: Tolerances | None = None,
    ) -> CanaryReport:  # fmt: skip
        """Compare outputs :meth:`run` gave on ``model`` with the recorded ones (what :meth:`verify`
        does after running); ``report.digests`` holds each output's :func:`output_digest`."""
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not valid: use one of {', '.join(MODES)}")
        start = time.perf_counter()
        if mode == "auto":
            mode, why = self.choose_mode(model)
        else:
            why = "chosen by the caller"
        if tolerances is None:
            tolerances = Tolerances.from_json(self.metadata.get("tolerances", "{}"), "canary")
        else:
            _validate.instance("Canary.verify", "tolerances", tolerances, Tolerances, "a torchwatch.Tolerances")
        checks = []
        n_out = len(self.expected)
        for name, exp in self.expected.items():
            if name not in got:
                checks.append(OutputCheck(name, tuple(exp.shape), str(exp.dtype).removeprefix("torch."), False,
                                          reason="the model no longer returns this output"))  # fmt: skip
                continue
            checks.append(_compare(name, got[name], exp, mode, tolerances, is_logits(name, exp, n_out)))
        unexpected = [n for n in got if n not in self.expected]
        return CanaryReport(
            ok=all(c.passed for c in checks), mode=mode, mode_reason=why, outputs=checks,
            unexpected_outputs=unexpected, seconds=time.perf_counter() - start,
            digests={name: output_digest(t) for name, t in got.items()},
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Canary({len(self.inputs)} inputs, outputs {list(self.expected)[:4]}"
            f"{'…' if len(self.expected) > 4 else ''}, recorded on {self.metadata.get('device_name')})"
        )


def _describe(keys: list[str], values: list[torch.Tensor]) -> str:
    names = keys or [str(i) for i in range(len(values))]
    return ", ".join(
        f"{n}: {str(v.dtype).removeprefix('torch.')}{list(v.shape)}" for n, v in zip(names, values, strict=False)
    )
