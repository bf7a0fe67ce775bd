"""Weight manifests: the sha256 of every tensor of a checkpoint, and checking a model against one.

What a manifest covers: the model's ``state_dict()`` — parameters and persistent buffers —
which is exactly what a checkpoint holds. Non-persistent buffers (HF ``position_ids``, say) are
not in checkpoints and are not covered; :func:`torchwatch.fingerprint` covers them in memory.

Tied weights: names that share one tensor (an LM head tied to the embedding) are hashed once,
under the name a checkpoint writer keeps (the first in ``state_dict()`` order that is not a
tied key of a transformers model); the others are recorded as ``aliases``. So a manifest made
from a model and one made from the ``save_pretrained`` file of that model have the same digest.
When a model is verified, an alias must still share storage with the tensor it names.

File format (JSON, DESIGN §5)::

    {"format": "torchwatch.manifest/1", "algorithm": "sha256",
     "tensors": {name: {"dtype": "float32", "shape": [768, 768], "sha256": "<hex>"}},
     "aliases": {alias: name}, "digest": "<hex>",
     "signature": {"algorithm": "hmac-sha256", "value": "<hex>"}}   # optional

``digest`` is the sha256 of one line ``name\\tdtype\\tshape\\tsha256\\n`` per tensor, sorted by
name: renaming, swapping or re-shaping tensors changes it, not only editing their bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._files import atomic_write, shown
from ..errors import ConfigError, FormatError, IntegrityError
from . import _hashing
from ._safetensors import DTYPES, checkpoint_files, entry_files

__all__ = ["Manifest", "TensorEntry", "WeightReport", "verify_weights"]

FORMAT = "torchwatch.manifest/1"
SIGNATURE = "hmac-sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DTYPE_NAMES = {name for name, _ in DTYPES.values()}

PathLike = str | os.PathLike[str]
Key = bytes | PathLike


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a manifest."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str

    @property
    def nbytes(self) -> int:
        size = 1
        for d in self.shape:
            size *= d
        return size * getattr(torch, self.dtype).itemsize


def _digest(tensors: dict[str, TensorEntry]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        e = tensors[name]
        h.update(f"{name}\t{e.dtype}\t{','.join(map(str, e.shape))}\t{e.sha256}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The sha256 of every tensor of a model or checkpoint.

    Attributes:
        tensors: ``{name: TensorEntry(dtype, shape, sha256)}``.
        aliases: ``{name: canonical name}`` for tied weights (see the module docstring).
        digest: sha256 over the sorted entries; pin it to detect an edited manifest.
        source: what it was made from (file names or the model class), for people.
        signature: HMAC-SHA256 of the manifest when it was saved with a key, else None.

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Linear(4, 2)
        >>> m = tw.Manifest.from_model(model)
        >>> sorted(m.tensors), len(m.digest)
        (['bias', 'weight'], 64)
        >>> tw.verify_weights(model, m).ok
        True
    """

    tensors: dict[str, TensorEntry]
    aliases: dict[str, str] = field(default_factory=dict)
    source: str = ""
    signature: str | None = None
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", _digest(self.tensors))

    # ---- making ------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, threads: int | None = None) -> Manifest:
        """Hash a model's ``state_dict()`` in memory (GPU tensors through a small pinned buffer).

        Raises:
            ConfigError: a tensor is on the meta device or is not a plain strided tensor.
        """
        named, aliases = _model_tensors(model)
        hashes = _hashing.hash_tensors(list(named.items()), threads=threads, label="hashing model")
        tensors = {n: TensorEntry(_dtype_name(t.dtype), tuple(t.shape), hashes[n]) for n, t in named.items()}
        return cls(tensors, aliases, source=f"model {type(model).__name__}")

    @classmethod
    def from_safetensors(cls, source: PathLike | Sequence[PathLike], *, threads: int | None = None) -> Manifest:
        """Hash a safetensors checkpoint from its bytes, without loading it into torch.

        Args:
            source: a ``.safetensors`` file, a directory of them, a ``*.index.json`` of a sharded
                checkpoint, or a list of files.
            threads: hashing threads (default: the CPUs this process may use).

        Raises:
            FormatError: a file is missing, truncated or corrupt (the message names it).
        """
        files = checkpoint_files(source)
        entries = entry_files(files)
        items = [(name, path, e) for name, (path, e) in entries.items()]
        hashes = _hashing.hash_entries(items, threads=threads, label="hashing checkpoint")
        tensors = {name: TensorEntry(e.dtype, e.shape, hashes[name]) for name, (_, e) in entries.items()}
        return cls(tensors, {}, source=", ".join(os.path.basename(f) for f in files))

    # ---- files -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "algorithm": "sha256",
            "tensors": {
                n: {"dtype": e.dtype, "shape": list(e.shape), "sha256": e.sha256}
                for n, e in sorted(self.tensors.items())
            },
            "aliases": dict(sorted(self.aliases.items())),
            "digest": self.digest,
            "source": self.source,
        }
        if self.signature is not None:
            doc["signature"] = {"algorithm": SIGNATURE, "value": self.signature}
        return doc

    def signed(self, key: Key) -> Manifest:
        """This manifest with an HMAC-SHA256 signature made with ``key`` (bytes or a key file)."""
        return Manifest(self.tensors, self.aliases, self.source, _sign(self.to_dict(), _key_bytes(key)), self.digest)

    def save(self, path: PathLike, *, key: Key | None = None) -> None:
        """Write the manifest as JSON (atomically), signed when ``key`` is given."""
        manifest = self.signed(key) if key is not None else self
        text = json.dumps(manifest.to_dict(), indent=1, ensure_ascii=True) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(text)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: PathLike, *, key: Key | None = None, expected_digest: str | None = None) -> Manifest:
        """Read a manifest file, checking its structure, digest and (with ``key``) its signature.

        Raises:
            FormatError: missing, unreadable or malformed file, unknown format version, or a digest
                that does not match the entries (the file was edited or damaged).
            IntegrityError: ``key`` given and the signature is missing or wrong, or
                ``expected_digest`` given and different.
        """
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise FormatError(f"manifest {shown(path)} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"manifest {shown(path)} is not readable JSON: {exc}") from None
        manifest = cls.from_dict(doc, where=f"manifest {shown(path)}")
        manifest.check(key=key, expected_digest=expected_digest, where=f"manifest {shown(path)}")
        return manifest

    @classmethod
    def from_dict(cls, doc: object, *, where: str = "manifest") -> Manifest:
        """Build a manifest from its JSON document; raises FormatError naming what is wrong."""
        if not isinstance(doc, dict):
            raise FormatError(f"{where} is not a JSON object")
        if doc.get("format") != FORMAT:
            raise FormatError(
                f"{where} has format {doc.get('format')!r}; this torchwatch reads {FORMAT!r} "
                "(make a new one with `torchwatch manifest`)"
            )
        if doc.get("algorithm") != "sha256":
            raise FormatError(f"{where} uses algorithm {doc.get('algorithm')!r}; only 'sha256' is supported")
        raw = doc.get("tensors")
        if not isinstance(raw, dict):
            raise FormatError(f"{where}: 'tensors' must be an object of name -> entry")
        tensors = {name: _entry_from(where, name, e) for name, e in raw.items()}
        aliases = doc.get("aliases", {})
        if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors for v in aliases.values()):
            raise FormatError(f"{where}: 'aliases' must map names to names listed in 'tensors'")
        digest = doc.get("digest")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise FormatError(f"{where}: 'digest' must be 64 lowercase hex digits")
        actual = _digest(tensors)
        if digest != actual:
            raise FormatError(
                f"{where} was edited or damaged: its digest {digest[:12]}… does not match its entries "
                f"({actual[:12]}…); make it again with `torchwatch manifest`"
            )
        sig = doc.get("signature")
        signature = None
        if sig is not None:
            if not (isinstance(sig, dict) and sig.get("algorithm") == SIGNATURE and isinstance(sig.get("value"), str)):
                raise FormatError(f"{where}: 'signature' must be {{'algorithm': {SIGNATURE!r}, 'value': hex}}")
            signature = sig["value"]
        source = doc.get("source", "")
        return cls(tensors, dict(aliases), str(source), signature, digest)

    def check(self, *, key: Key | None = None, expected_digest: str | None = None, where: str = "manifest") -> None:
        """Raise IntegrityError unless the digest is ``expected_digest`` and the signature verifies."""
        if expected_digest is not None and expected_digest.strip().lower() != self.digest:
            raise IntegrityError(
                f"{where} has digest {self.digest}, expected {expected_digest.strip().lower()}: it is not the "
                "manifest that was pinned; use the pinned manifest, or pin the new digest if the change is intended"
            )
        if key is not None:
            if self.signature is None:
                raise IntegrityError(
                    f"{where} is not signed but a key was given; sign it with `torchwatch manifest --key`"
                )
            doc = self.to_dict()
            doc.pop("signature")
            if not hmac.compare_digest(_sign(doc, _key_bytes(key)), self.signature):
                raise IntegrityError(
                    f"{where} failed signature verification: it was edited after signing or signed with another key"
                )

    def __repr__(self) -> str:
        size = sum(e.nbytes for e in self.tensors.values())
        return f"Manifest({len(self.tensors)} tensors, {size / 1e6:.1f} MB, digest {self.digest[:12]}…)"


def _entry_from(where: str, name: object, e: object) -> TensorEntry:
    if not isinstance(name, str) or not isinstance(e, dict):
        raise FormatError(f"{where}: entry {name!r} must be an object")
    dtype, shape, sha = e.get("dtype"), e.get("shape"), e.get("sha256")
    if dtype not in _DTYPE_NAMES:
        raise FormatError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}: tensor {name!r} has a bad shape {shape!r}")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise FormatError(f"{where}: tensor {name!r} has a bad sha256 {sha!r}")
    return TensorEntry(dtype, tuple(shape), sha)


def _sign(doc: dict[str, Any], key: bytes) -> str:
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _key_bytes(key: Key) -> bytes:
    if isinstance(key, bytes):
        data = key
    else:
        try:
            with open(key, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read key file {shown(key)}: {exc.strerror or exc}") from None
    if len(data) < 16:
        raise ConfigError(
            f"the signing key has {len(data)} bytes; use at least 16 random bytes "
            "(e.g. `head -c 32 /dev/urandom > manifest.key`)"
        )
    return data


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state_dict()`` with tied names folded: ``({canonical: tensor}, {alias: canonical})``."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    state = model.state_dict()
    tied = getattr(model, "_tied_weights_keys", None)
    tied_names = set(tied) if isinstance(tied, dict) else set()
    bad = [n for n, t in state.items() if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided]
    if bad:
        raise ConfigError(
            f"cannot hash {len(bad)} state_dict entries that hold no plain tensor data (meta, sparse or not a tensor): "
            f"{', '.join(repr(n) for n in bad[:5])}; load real weights first (e.g. model.to_empty() + load_state_dict)"
        )
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in state.items():  # empty tensors have no storage to share
        groups.setdefault(_storage_key(t) if t.numel() else ("empty", name), []).append(name)
    named: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for names in groups.values():
        canonical = next((n for n in names if n not in tied_names), names[0])
        named[canonical] = state[canonical]
        aliases.update({n: canonical for n in names if n != canonical})
    return {n: named[n] for n in state if n in named}, aliases


@dataclass
class WeightReport:
    """What :func:`verify_weights` found.

    Attributes:
        ok: every manifest tensor is present with the same dtype, shape and bytes, nothing is
            unexpected, and the manifest itself passed its digest pin and signature.
        mismatched: tensors whose bytes differ.
        missing: manifest tensors the model/checkpoint lacks.
        unexpected: tensors the model/checkpoint has that the manifest does not list.
        shape_changed, dtype_changed: ``{name: (expected, got)}``.
        aliased: ``{name: canonical}`` tied names covered by their canonical tensor.
        manifest_error: why the manifest itself was rejected (digest pin or signature), or None.
        checked, bytes: tensors and bytes hashed.
        manifest_digest: the manifest's digest.
        seconds: wall time.
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

    def summary(self) -> str:
        """A few lines for a person: what failed, by name, and what to do."""
        if self.ok:
            return (
                f"weights OK: {self.checked} tensors ({self.bytes / 1e6:.1f} MB) match manifest "
                f"{self.manifest_digest[:12]}… in {self.seconds:.2f} s"
            )
        lines = [f"weights do NOT match manifest {self.manifest_digest[:12]}…:"]
        if self.manifest_error:
            lines.append(f"  manifest rejected: {self.manifest_error}")

        def names(items: Collection[str]) -> str:
            shown_ = ", ".join(repr(n) for n in list(items)[:8])
            return shown_ + (f" and {len(items) - 8} more" if len(items) > 8 else "")

        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} with different bytes: {names(self.mismatched)}")
        if self.missing:
            lines.append(f"  {len(self.missing)} missing: {names(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} not in the manifest: {names(self.unexpected)}")
        for name, (a, b) in list(self.shape_changed.items())[:8]:
            lines.append(f"  {name!r}: shape {list(a)} expected, got {list(b)}")
        for name, (a, b) in list(self.dtype_changed.items())[:8]:
            lines.append(f"  {name!r}: dtype {a} expected, got {b}")
        lines.append(
            "  fix: load the checkpoint the manifest was made from (strict=True), or make a new manifest with "
            "`torchwatch manifest` if the change is intended"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "mismatched": self.mismatched, "missing": self.missing, "unexpected": self.unexpected,
            "shape_changed": {n: [list(a), list(b)] for n, (a, b) in self.shape_changed.items()},
            "dtype_changed": {n: list(v) for n, v in self.dtype_changed.items()},
            "aliased": self.aliased, "manifest_error": self.manifest_error, "checked": self.checked,
            "bytes": self.bytes, "manifest_digest": self.manifest_digest, "seconds": self.seconds,
        }  # fmt: skip

    def raise_for_failure(self) -> None:
        """Raise :class:`torchwatch.IntegrityError` (carrying this report) unless ``ok``."""
        if not self.ok:
            raise IntegrityError(self.summary(), report=self)


def _select(names: Collection[str], ignore: str | Collection[str] | None) -> set[str]:
    if ignore is None:
        return set()
    if isinstance(ignore, str):
        try:
            pattern = re.compile(ignore)
        except re.error as exc:
            raise ConfigError(f"ignore={ignore!r} is not a valid regular expression: {exc}") from None
        return {n for n in names if pattern.search(n)}
    return set(ignore) & set(names)


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
        ignore: tensor names to leave out on both sides: a regex or a collection of names.
        threads: hashing threads (default: the CPUs this process may use).
        raise_on_failure: raise :class:`torchwatch.IntegrityError` with the same facts instead
            of returning a failed report.

    Returns:
        A :class:`WeightReport` naming every mismatched, missing, unexpected, re-shaped and
        re-typed tensor.

    Raises:
        FormatError: the manifest or checkpoint file is unreadable or malformed.
        ConfigError: bad arguments (a model with meta tensors, a bad ``ignore`` regex).
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
    if not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest)
    manifest_error = None
    try:
        manifest.check(key=key, expected_digest=expected_digest)
    except IntegrityError as exc:
        manifest_error = str(exc)

    skip = _select(manifest.tensors.keys() | manifest.aliases.keys(), ignore)
    expected = {n: e for n, e in manifest.tensors.items() if n not in skip}
    aliased: dict[str, str] = {}
    mismatched: list[str] = []
    if isinstance(model_or_path, torch.nn.Module):
        named, model_aliases = _model_tensors(model_or_path)
        state = named.keys() | model_aliases.keys()  # every state_dict name
        skip |= _select(state, ignore)
        have: dict[str, tuple[str, tuple[int, ...]]] = {
            n: (_dtype_name(t.dtype), tuple(t.shape)) for n, t in named.items()
        }
        for alias, canonical in model_aliases.items():
            if alias in skip:
                continue
            if alias in expected and canonical not in expected:  # the file kept the other name of a tied pair
                named[alias] = named.pop(canonical)
                have[alias] = have.pop(canonical)
                aliased[canonical] = alias
            elif canonical in expected or canonical in skip:
                aliased[alias] = canonical
        for alias in manifest.aliases:
            if alias in state and alias not in aliased and alias not in skip:
                # tied in the manifest but not in this model: the tie was broken after loading
                mismatched.append(alias)
        unexpected = sorted(
            n for n in have if n not in expected and n not in skip and n not in aliased and n not in mismatched
        )
        to_hash = {n: named[n] for n in expected if n in have and have[n] == (expected[n].dtype, expected[n].shape)}

        def hashes() -> dict[str, str]:
            return _hashing.hash_tensors(list(to_hash.items()), threads=threads, label="verifying model")
    else:
        entries = entry_files(checkpoint_files(model_or_path))
        have = {n: (e.dtype, e.shape) for n, (_, e) in entries.items() if n not in skip}
        unexpected = sorted(n for n in have if n not in expected and n not in manifest.aliases)
        items = [
            (n, path, e) for n, (path, e) in entries.items()
            if n in expected and have[n] == (expected[n].dtype, expected[n].shape)
        ]  # fmt: skip
        to_hash = {n: None for n, _, _ in items}

        def hashes() -> dict[str, str]:
            return _hashing.hash_entries(items, threads=threads, label="verifying checkpoint")

    missing = sorted(n for n in expected if n not in have)
    shape_changed = {
        n: (expected[n].shape, have[n][1]) for n in expected if n in have and have[n][1] != expected[n].shape
    }
    dtype_changed = {
        n: (expected[n].dtype, have[n][0]) for n in expected if n in have and have[n][0] != expected[n].dtype
    }
    got = hashes()
    mismatched = sorted(set(mismatched) | {n for n in to_hash if got[n] != expected[n].sha256})
    ok = not (mismatched or missing or unexpected or shape_changed or dtype_changed or manifest_error)
    report = WeightReport(
        ok=ok, mismatched=mismatched, missing=missing, unexpected=unexpected, shape_changed=shape_changed,
        dtype_changed=dtype_changed, aliased=aliased, manifest_error=manifest_error, checked=len(to_hash),
        bytes=sum(expected[n].nbytes for n in to_hash), manifest_digest=manifest.digest,
        seconds=time.perf_counter() - start,
    )  # fmt: skip
    if raise_on_failure:
        report.raise_for_failure()
    return report
