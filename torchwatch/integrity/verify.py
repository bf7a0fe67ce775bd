"""Checking a model in memory, or a checkpoint on disk, against a weight manifest.

What is compared (see :mod:`torchwatch.integrity.manifest` for what a manifest holds): every
manifest tensor must be present with the same dtype, shape and sha256, and nothing else may be
there — except names the caller or the model's own loader leave out:

* ``ignore=``: a regex or a list of names, left out on both sides;
* a transformers model's ``_keys_to_ignore_on_load_unexpected`` (checkpoint keys its loader
  drops) and ``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_save`` (model keys a
  checkpoint need not hold).

A manifest tensor the model holds as a *non-persistent* buffer (``embeddings.position_ids`` in
older BERT checkpoints) is compared with that buffer. Tied names must still share storage in a
model; in a checkpoint file, a tensor stored under an alias name must have the bytes of the
tensor it aliases (``load_state_dict`` would otherwise load it over the real one).
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _validate
from .._safetensors import checkpoint_files, entry_files
from ..errors import ConfigError, IntegrityError
from . import _hashing
from .manifest import Key, Manifest, PathLike, dtype_name, model_state

__all__ = ["WeightReport", "verify_weights"]

# what ``WeightReport.ignored`` says about a name
BY_CALLER = "ignore="
BY_LOADER_UNEXPECTED = "the model's _keys_to_ignore_on_load_unexpected"
BY_LOADER_MISSING = "the model's _keys_to_ignore_on_load_missing/_on_save"


@dataclass
class WeightReport:
    """What :func:`verify_weights` found.

    Attributes:
        ok: every manifest tensor is present with the same dtype, shape and bytes, nothing is
            unexpected, and the manifest itself passed its digest pin and signature.
        mismatched: tensors whose bytes differ (a tied name whose tie was broken counts too).
        missing: manifest tensors the model/checkpoint lacks.
        unexpected: tensors the model/checkpoint has that the manifest does not list.
        shape_changed, dtype_changed: ``{name: (expected, got)}``.
        aliased: ``{name: canonical}`` tied names covered by their canonical tensor.
        manifest_error: why the manifest itself was rejected (digest pin or signature), or None.
        checked, bytes: tensors and bytes hashed.
        manifest_digest: the manifest's digest.
        seconds: wall time.
        ignored: ``{name: why}`` for names left out (``ignore=`` or the model's loader lists).
        buffers: manifest tensors compared with non-persistent buffers of the model.
    """

    ok: bool
    mismatched: list[str]
    missing: list[str]
    unexpected: list[str]
    shape_changed: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    dtype_changed: dict[str, tuple[str, str]]
    aliased: dict[str, str]
    manifest_error: str | None
    checked: int
    bytes: int
    manifest_digest: str
    seconds: float
    ignored: dict[str, str] = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for a person: what failed, by name, and what to do about each kind."""
        if self.ok:
            extra = f", {len(self.ignored)} left out ({_names(self.ignored)})" if self.ignored else ""
            return (
                f"weights OK: {self.checked} tensors ({self.bytes / 1e6:.1f} MB) match manifest "
                f"{self.manifest_digest[:12]}… in {self.seconds:.2f} s{extra}"
            )
        lines = [f"weights do NOT match manifest {self.manifest_digest[:12]}…:"]
        if self.manifest_error:
            lines.append(f"  manifest rejected: {self.manifest_error}")
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} with different bytes: {_names(self.mismatched)}")
            lines.append(
                "    fix: these are not the weights the manifest was made from; load that checkpoint, or make a new "
                "manifest with `torchwatch manifest` if the change is intended"
            )
        if self.missing:
            lines.append(f"  {len(self.missing)} missing: {_names(self.missing)}")
            lines.append(
                "    fix: the manifest lists tensors this model does not hold: another architecture or config, or a "
                "manifest of another model; if your loader drops them on purpose, pass ignore= (--ignore)"
            )
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} not in the manifest: {_names(self.unexpected)}")
            lines.append(
                "    fix: this model holds tensors the manifest does not list: another config (extra layers or "
                "heads), or a manifest made from fewer tensors; pass ignore= (--ignore) for ones not to check"
            )
        for name, (a, b) in list(self.shape_changed.items())[:8]:
            lines.append(f"  {name!r}: shape {list(a)} expected, got {list(b)}")
        for name, (a, b) in list(self.dtype_changed.items())[:8]:
            lines.append(f"  {name!r}: dtype {a} expected, got {b}")
        if self.shape_changed:
            lines.append("    fix: a config with other sizes built this model; build it from the manifest's config")
        if self.dtype_changed:
            lines.append(
                "    fix: the model was loaded or cast to another dtype; verify before casting, or make the "
                "manifest from the model in the dtype it serves in"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "mismatched": self.mismatched, "missing": self.missing, "unexpected": self.unexpected,
            "shape_changed": {n: [list(a), list(b)] for n, (a, b) in self.shape_changed.items()},
            "dtype_changed": {n: list(v) for n, v in self.dtype_changed.items()},
            "aliased": self.aliased, "manifest_error": self.manifest_error, "checked": self.checked,
            "bytes": self.bytes, "manifest_digest": self.manifest_digest, "seconds": self.seconds,
            "ignored": self.ignored, "buffers": self.buffers,
        }  # fmt: skip

    def raise_for_failure(self) -> None:
        """Raise :class:`torchwatch.IntegrityError` (carrying this report) unless ``ok``."""
        if not self.ok:
            raise IntegrityError(self.summary(), report=self)


def _names(items: Collection[str]) -> str:
    shown = ", ".join(repr(n) for n in list(items)[:8])
    return shown + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def ignore_matcher(ignore: object) -> re.Pattern[str] | frozenset[str] | None:
    """Check an ``ignore=`` argument: None, a regular expression, or a collection of names."""
    if ignore is None:
        return None
    if isinstance(ignore, str):
        try:
            return re.compile(ignore)
        except re.error as exc:
            raise ConfigError(f"ignore={ignore!r} is not a valid regular expression: {exc}") from None
    if isinstance(ignore, Iterable) and not isinstance(ignore, (bytes, dict)):
        names = list(ignore)
        if all(isinstance(n, str) for n in names):
            return frozenset(names)
    raise ConfigError(f"ignore= takes a regular expression or a list of tensor names, got {ignore!r}")


def matches(matcher: re.Pattern[str] | frozenset[str] | None, name: str) -> bool:
    if matcher is None:
        return False
    return bool(matcher.search(name)) if isinstance(matcher, re.Pattern) else name in matcher


def loader_patterns(model: torch.nn.Module, *attributes: str) -> list[re.Pattern[str]]:
    """The regular expressions a transformers model declares for keys its loader tolerates."""
    out = []
    for attribute in attributes:
        value = getattr(model, attribute, None)
        for pattern in value if isinstance(value, (list, tuple, set, frozenset)) else ():
            if isinstance(pattern, str):
                try:
                    out.append(re.compile(pattern))
                except re.error:
                    continue  # the model's own pattern is broken: it tolerates nothing
    return out


def _check_arguments(manifest: object, threads: object) -> Manifest:
    _validate.optional(_validate.integer, "verify_weights()", "threads", threads, high=4096)
    if isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, (str, bytes)) or hasattr(manifest, "__fspath__"):
        return Manifest.load(manifest)  # type: ignore[arg-type]
    raise ConfigError(f"manifest must be a torchwatch.Manifest or the path of one, got {type(manifest).__name__}")


def verify_weights(
    model_or_path: torch.nn.Module | PathLike | Sequence[PathLike],
    manifest: Manifest | PathLike,
    *,
    expected_digest: str | None = None,
    key: Key | None = None,
    ignore: str | Collection[str] | None = None,
    threads: int | None = None,
    raise_on_failure: bool = False,
) -> WeightReport:
    """Check a model (in memory) or a safetensors checkpoint (on disk) against a manifest.

    Args:
        model_or_path: an ``nn.Module``, or what :meth:`Manifest.from_safetensors` accepts.
        manifest: a :class:`Manifest` or the path of one.
        expected_digest: the manifest digest you pinned (in a deployment config, say); a
            manifest with another digest fails.
        key: HMAC key (bytes or key file) the manifest was signed with; an unsigned manifest or
            one edited after signing fails.
        ignore: tensor names to leave out on both sides: a regex (searched in each name) or a
            list of names. The model's own loader lists are applied too (module docstring).
        threads: hashing threads (default: the CPUs this process may use).
        raise_on_failure: raise :class:`torchwatch.IntegrityError` with the same facts instead
            of returning a failed report.

    Returns:
        A :class:`WeightReport` naming every mismatched, missing, unexpected, re-shaped and
        re-typed tensor, and every name left out and why.

    Raises:
        FormatError: the manifest or checkpoint file is unreadable or malformed.
        ConfigError: bad arguments (a model with meta tensors, a bad ``ignore`` regex, a pinned
            digest that is not 64 hex digits).
        IntegrityError: only with ``raise_on_failure=True``.

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Linear(4, 2)
        >>> m = tw.Manifest.from_model(model)
        >>> with torch.no_grad():
        ...     model.bias[0] += 1
        >>> tw.verify_weights(model, m).mismatched
        ['bias']
    """
    start = time.perf_counter()
    manifest = _check_arguments(manifest, threads)
    matcher = ignore_matcher(ignore)
    manifest_error = None
    try:
        manifest.check(key=key, expected_digest=expected_digest)
    except IntegrityError as exc:
        manifest_error = str(exc)
    if isinstance(model_or_path, torch.nn.Module):
        found = _compare_model(model_or_path, manifest, matcher, threads)
    else:
        found = _compare_file(model_or_path, manifest, matcher, threads)
    ok = not (
        found.mismatched or found.missing or found.unexpected or found.shape_changed or found.dtype_changed
        or manifest_error
    )  # fmt: skip
    report = WeightReport(
        ok=ok, mismatched=found.mismatched, missing=found.missing, unexpected=found.unexpected,
        shape_changed=found.shape_changed, dtype_changed=found.dtype_changed, aliased=found.aliased,
        manifest_error=manifest_error, checked=found.checked, bytes=found.bytes, manifest_digest=manifest.digest,
        seconds=time.perf_counter() - start, ignored=found.ignored, buffers=found.buffers,
    )  # fmt: skip
    if raise_on_failure:
        report.raise_for_failure()
    return report


@dataclass
class _Found:
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_changed: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    dtype_changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    aliased: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)
    checked: int = 0
    bytes: int = 0

    def compare_layouts(self, expected: dict[str, Any], have: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
        """Missing, re-shaped and re-typed names; returns the names whose bytes are to be hashed."""
        self.missing = sorted(n for n in expected if n not in have)
        for n, e in expected.items():
            if n in have and have[n][1] != e.shape:
                self.shape_changed[n] = (e.shape, have[n][1])
            if n in have and have[n][0] != e.dtype:
                self.dtype_changed[n] = (e.dtype, have[n][0])
        return [n for n in expected if n in have and have[n] == (expected[n].dtype, expected[n].shape)]


def _compare_model(model: torch.nn.Module, manifest: Manifest, matcher: Any, threads: int | None) -> _Found:
    found = _Found()
    named, model_aliases = model_state(model)
    state = named.keys() | model_aliases.keys()  # every state_dict name
    for name in sorted(manifest.tensors.keys() | manifest.aliases.keys() | state):
        if matches(matcher, name):
            found.ignored[name] = BY_CALLER
    expected = {n: e for n, e in manifest.tensors.items() if n not in found.ignored}
    # manifest tensors the model keeps out of its state_dict (non-persistent buffers)
    for name, buffer in model.named_buffers():
        if name in expected and name not in state and isinstance(buffer, torch.Tensor) and not buffer.is_meta:
            named[name] = buffer
            found.buffers.append(name)
    have = {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in named.items()}
    for alias, canonical in model_aliases.items():
        if alias in found.ignored:
            continue
        if alias in expected and canonical not in expected:  # the file kept the other name of a tied pair
            named[alias] = named.pop(canonical)
            have[alias] = have.pop(canonical)
            found.aliased[canonical] = alias
        elif canonical in expected or canonical in found.ignored:
            found.aliased[alias] = canonical
    for alias in manifest.aliases:
        if alias in state and alias not in found.aliased and alias not in found.ignored:
            found.mismatched.append(alias)  # tied in the manifest but not in this model: the tie was broken
    tolerated_in_file = loader_patterns(model, "_keys_to_ignore_on_load_unexpected")
    tolerated_in_model = loader_patterns(model, "_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_save")
    for name in [n for n in expected if n not in have]:
        if any(p.search(name) for p in tolerated_in_file):
            found.ignored[name] = BY_LOADER_UNEXPECTED
            del expected[name]
    for name in [n for n in have if n not in expected and n not in found.aliased]:
        if name in found.ignored or name in found.mismatched:
            continue
        if any(p.search(name) for p in tolerated_in_model):
            found.ignored[name] = BY_LOADER_MISSING
        else:
            found.unexpected.append(name)
    found.unexpected.sort()
    to_hash = found.compare_layouts(expected, have)
    got = _hashing.hash_tensors([(n, named[n]) for n in to_hash], threads=threads, label="verifying model")
    found.mismatched = sorted(set(found.mismatched) | {n for n in to_hash if got[n] != expected[n].sha256})
    found.checked, found.bytes = len(to_hash), sum(expected[n].nbytes for n in to_hash)
    return found


def _compare_file(source: Any, manifest: Manifest, matcher: Any, threads: int | None) -> _Found:
    found = _Found()
    entries = entry_files(checkpoint_files(source))
    for name in sorted(manifest.tensors.keys() | manifest.aliases.keys() | entries.keys()):
        if matches(matcher, name):
            found.ignored[name] = BY_CALLER
    expected = {n: e for n, e in manifest.tensors.items() if n not in found.ignored}
    have = {n: (e.dtype, e.shape) for n, (_, e) in entries.items() if n not in found.ignored}
    # a tensor stored under an alias name must be the very tensor it aliases: hash it against that one
    as_alias = {n: manifest.aliases[n] for n in have if n in manifest.aliases and manifest.aliases[n] in expected}
    for name, canonical in as_alias.items():
        if canonical not in have:  # the file kept the alias name only: it stands for the canonical tensor
            found.aliased[canonical] = name
    found.unexpected = sorted(n for n in have if n not in expected and n not in as_alias)
    stands_for = found.aliased  # canonical -> the alias name the file stores it under
    to_hash = found.compare_layouts(expected, {**have, **{c: have[a] for c, a in stands_for.items()}})
    beside = [n for n, c in as_alias.items() if c not in stands_for]  # stored beside their canonical tensor
    found.mismatched += [n for n in beside if have[n] != (expected[as_alias[n]].dtype, expected[as_alias[n]].shape)]
    extra = [n for n in beside if n not in found.mismatched]
    items = [(n, *entries[stands_for.get(n, n)]) for n in to_hash] + [(n, *entries[n]) for n in extra]
    got = _hashing.hash_entries(items, threads=threads, label="verifying checkpoint")
    bad = {n for n in to_hash if got[n] != expected[n].sha256}
    bad |= {n for n in extra if got[n] != expected[as_alias[n]].sha256}
    found.mismatched = sorted(set(found.mismatched) | bad)
    found.checked = len(items)
    found.bytes = sum(expected[n].nbytes for n in to_hash) + sum(expected[as_alias[n]].nbytes for n in extra)
    return found
