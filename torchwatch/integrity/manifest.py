"""Weight manifests: the sha256 of every tensor of a checkpoint, and checking a model against one.

What a manifest made from a model covers: its ``state_dict()`` — parameters and persistent
buffers. A checkpoint may hold more: older saves of BERT-family models carry
``embeddings.position_ids``, which current models keep as a *non-persistent* buffer. When a
manifest lists a tensor the model holds as a non-persistent buffer, the buffer is compared too.
Checkpoint keys a loader ignores by design — a transformers model's
``_keys_to_ignore_on_load_unexpected`` (in the checkpoint, not in the model) and
``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_save`` (in the model, not in the
checkpoint) — are left out of the comparison and listed in ``WeightReport.ignored``, as are
names matched by ``ignore=``.

Tied weights: names that share one tensor (an LM head tied to the embedding) are hashed once,
under the name a checkpoint writer keeps (the first in ``state_dict()`` order that is not a
tied key of a transformers model); the others are recorded as ``aliases``. So a manifest made
from a model and one made from the ``save_pretrained`` file of that model have the same digest.
When a model is verified, an alias must still share storage with the tensor it names; when a
checkpoint file is verified, a tensor it stores under an alias name must have the same bytes
as the tensor the alias names (``load_state_dict`` would load it last, over the real one).

File format (JSON, DESIGN §5)::

    {"format": "torchwatch.manifest/1", "algorithm": "sha256",
     "tensors": {name: {"dtype": "float32", "shape": [768, 768], "sha256": "<hex>"}},
     "aliases": {alias: name}, "digest": "<hex>",
     "signature": {"algorithm": "hmac-sha256", "value": "<hex>"}}   # optional

``digest`` is the sha256 of one line ``name\\tdtype\\tshape\\tsha256\\n`` per tensor, sorted by
name, followed by one line ``@alias\\talias\\tname\\n`` per alias, sorted: renaming, swapping or
re-shaping tensors changes it, and so does adding, removing or redirecting an alias. Every
field that changes a verdict is under the digest and the signature (``source`` is a note for
people). A manifest without aliases has the same digest as in torchwatch 0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _validate, formats
from .._files import atomic_write_text, parse_json, read_regular, shown
from .._safetensors import DTYPES, checkpoint_files, entry_files
from .._tensors import require_plain
from ..errors import ConfigError, FormatError, IntegrityError
from . import _hashing

__all__ = ["Manifest", "TensorEntry"]

FORMAT = formats.MANIFEST
MAX_MANIFEST_BYTES = 1 << 30  # a manifest of a million tensors is ~200 MB of JSON
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


def _digest(tensors: dict[str, TensorEntry], aliases: dict[str, str] | None = None) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        e = tensors[name]
        h.update(f"{name}\t{e.dtype}\t{','.join(map(str, e.shape))}\t{e.sha256}\n".encode())
    for alias in sorted(aliases or {}):
        h.update(f"@alias\t{alias}\t{aliases[alias]}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The sha256 of every tensor of a model or checkpoint.

    Attributes:
        tensors: ``{name: TensorEntry(dtype, shape, sha256)}``.
        aliases: ``{name: canonical name}`` for tied weights (see the module docstring).
        digest: sha256 over the sorted entries and aliases; pin it to detect an edited manifest.
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
            object.__setattr__(self, "digest", _digest(self.tensors, self.aliases))

    # ---- making ------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, threads: int | None = None) -> Manifest:
        """Hash a model's ``state_dict()`` in memory (GPU tensors through a small pinned buffer).

        Raises:
            ConfigError: a tensor is on the meta device or is not a plain strided tensor.
        """
        _validate.optional(_validate.integer, "Manifest.from_model", "threads", threads, high=4096)
        named, aliases = model_state(model)
        hashes = _hashing.hash_tensors(list(named.items()), threads=threads, label="hashing model")
        tensors = {n: TensorEntry(dtype_name(t.dtype), tuple(t.shape), hashes[n]) for n, t in named.items()}
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
        _validate.optional(_validate.integer, "Manifest.from_safetensors", "threads", threads, high=4096)
        files = checkpoint_files(source)
        entries = entry_files(files)
        items = [(name, path, e) for name, (path, e) in entries.items()]
        hashes = _hashing.hash_entries(items, threads=threads, label="hashing checkpoint")
        tensors = {name: TensorEntry(e.dtype, e.shape, hashes[name]) for name, (_, e) in entries.items()}
        return cls(tensors, {}, source=", ".join(os.path.basename(f) for f in files))

    def for_model(self, model: torch.nn.Module) -> Manifest | None:
        """This manifest as :meth:`from_model` would make it for ``model``, if the model holds
        the weights it describes: its entries for exactly the model's ``state_dict()`` under
        the model's names and ties, nothing hashed. None when it lacks one of them.

        A manifest of a checkpoint file and one of the model loaded from it give the same
        result (the file's extra keys, such as ``position_ids``, and its choice among tied
        names drop out), which is what a :class:`~torchwatch.Canary` binds to.

        Example:
            >>> import torch, torchwatch as tw
            >>> model = torch.nn.Linear(4, 2)
            >>> m = tw.Manifest.from_model(model)
            >>> m.for_model(model).digest == m.digest
            True
        """
        named, aliases = model_state(model)
        ties: dict[str, list[str]] = {}
        for alias, canonical in aliases.items():
            ties.setdefault(canonical, []).append(alias)
        tensors = {}
        for name in named:
            for candidate in (name, *ties.get(name, ()), self.aliases.get(name)):
                if candidate is not None and candidate in self.tensors:
                    tensors[name] = self.tensors[candidate]
                    break
            else:
                return None
        return Manifest(tensors, aliases, source=f"{self.source} (as model {type(model).__name__})")

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
        atomic_write_text(path, text, encoding="ascii")

    @classmethod
    def load(cls, path: PathLike, *, key: Key | None = None, expected_digest: str | None = None) -> Manifest:
        """Read a manifest file, checking its structure, digest and (with ``key``) its signature.

        Raises:
            FormatError: missing, unreadable or malformed file, unknown format version, or a digest
                that does not match the entries (the file was edited or damaged).
            IntegrityError: ``key`` given and the signature is missing or wrong, or
                ``expected_digest`` given and different.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"Manifest.load needs a path, got {type(path).__name__}")
        path = os.fspath(path)
        doc = parse_json(read_regular(path, "manifest", limit=MAX_MANIFEST_BYTES), f"manifest {shown(path)}")
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
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and k not in tensors and isinstance(v, str) and v in tensors for k, v in aliases.items()
        ):
            raise FormatError(
                f"{where}: 'aliases' must map names that are not in 'tensors' to names listed in 'tensors'"
            )
        digest = doc.get("digest")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise FormatError(f"{where}: 'digest' must be 64 lowercase hex digits")
        actual = _digest(tensors, aliases)
        if digest != actual:
            if aliases and digest == _digest(tensors):
                raise FormatError(
                    f"{where}: its digest does not cover its 'aliases': they were added after it was made, or it "
                    "was made by an older torchwatch whose digest left aliases out; make it again with "
                    "`torchwatch manifest`"
                )
            raise FormatError(
                f"{where} was edited or damaged: its digest {digest[:12]}… does not match its entries "
                f"({actual[:12]}…); make it again with `torchwatch manifest`"
            )
        sig = doc.get("signature")
        signature = None
        if sig is not None:
            value = sig.get("value") if isinstance(sig, dict) else None
            if not (isinstance(value, str) and _HEX64.fullmatch(value) and sig.get("algorithm") == SIGNATURE):
                raise FormatError(
                    f"{where}: 'signature' must be {{'algorithm': {SIGNATURE!r}, 'value': 64 lowercase hex digits}}"
                )
            signature = sig["value"]
        source = doc.get("source", "")
        if not isinstance(source, str):
            raise FormatError(f"{where}: 'source' must be a string")
        return cls(tensors, dict(aliases), source, signature, digest)

    def check(self, *, key: Key | None = None, expected_digest: str | None = None, where: str = "manifest") -> None:
        """Raise IntegrityError unless the digest is ``expected_digest`` and the signature verifies.

        Raises:
            ConfigError: ``expected_digest`` is not 64 hex digits, or ``key`` is not bytes or a key file.
        """
        pinned = _pinned_digest(expected_digest)
        secret = _key_bytes(key) if key is not None else None
        if pinned is not None and pinned != self.digest:
            raise IntegrityError(
                f"{where} has digest {self.digest}, expected {pinned}: it is not the "
                "manifest that was pinned; use the pinned manifest, or pin the new digest if the change is intended"
            )
        if secret is not None:
            if self.signature is None:
                raise IntegrityError(
                    f"{where} is not signed but a key was given; sign it with `torchwatch manifest --key`"
                )
            doc = self.to_dict()
            doc.pop("signature")
            if not (_HEX64.fullmatch(self.signature) and hmac.compare_digest(_sign(doc, secret), self.signature)):
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


def _pinned_digest(expected: object) -> str | None:
    if expected is None:
        return None
    if not isinstance(expected, str) or not _HEX64.fullmatch(expected.strip().lower()):
        raise ConfigError(
            f"expected_digest must be the 64 hex digits of a manifest digest (as `torchwatch manifest` prints), "
            f"got {expected!r}"
        )
    return expected.strip().lower()


def _key_bytes(key: Key) -> bytes:
    if isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
    elif not isinstance(key, (str, os.PathLike)):
        raise ConfigError(f"key must be bytes or the path of a key file, got {type(key).__name__}")
    else:
        try:
            data = read_regular(key, "key file", limit=1 << 20)
        except FormatError as exc:
            raise ConfigError(str(exc)) from None
    if len(data) < 16:
        raise ConfigError(
            f"the signing key has {len(data)} bytes; use at least 16 random bytes "
            "(make one with `torchwatch keygen -o manifest.key` or tw.write_key)"
        )
    return data


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def model_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state_dict()`` with tied names folded: ``({canonical: tensor}, {alias: canonical})``."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    state = model.state_dict()
    tied = getattr(model, "_tied_weights_keys", None)
    tied_names = set(tied) if isinstance(tied, dict) else set()
    require_plain(
        state,
        "cannot hash {n} state_dict entries that hold no plain tensor data (meta, sparse or not a tensor)",
        "; load real weights first (e.g. model.to_empty() + load_state_dict)",
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
