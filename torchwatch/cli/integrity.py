"""``torchwatch manifest``, ``torchwatch verify``, ``torchwatch canary record|verify`` and ``torchwatch keygen``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

import torch

from .. import _safetensors
from .._files import shown
from ..errors import ConfigError, FormatError, IntegrityError, TorchwatchError
from ..integrity.canary import MODES, Canary
from ..integrity.keys import KEY_BYTES, write_key
from ..integrity.manifest import Manifest
from ..integrity.verify import ignore_matcher, loader_patterns, matches, verify_weights

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ---- loading what the command line names ------------------------------------------------------


def resolve(spec: str, what: str) -> Any:
    """``package.module:attr.path`` -> the object (imported with the working directory on sys.path)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {spec!r} must look like 'package.module:factory'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a bad spec
        raise ConfigError(f"cannot import {module_name!r} for {what} {spec!r}: {exc!r}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{module_name!r} has no attribute {attr!r} (from {what} {spec!r})") from None
    return obj


def load_model(spec: str, weights: list[str] | None, ignore: str | None = None) -> torch.nn.Module:
    """Build the model from its factory (in eval mode) and load safetensors weights into it strictly."""
    factory = resolve(spec, "model spec")
    try:
        model = factory if isinstance(factory, torch.nn.Module) else factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise ConfigError(f"the model factory {spec!r} raised {exc!r}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"the model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    if weights:
        load_weights(model, weights, ignore)
    return model


def load_weights(model: torch.nn.Module, weights: list[str], ignore: str | None = None) -> None:
    """Strict load of a (sharded) safetensors checkpoint, tolerating what a loader tolerates by design.

    Checkpoint keys the model holds as non-persistent buffers (``position_ids`` of older BERT
    saves) or that its ``_keys_to_ignore_on_load_unexpected`` names are not loaded; model keys a
    checkpoint does not hold because they are tied, or named by ``_keys_to_ignore_on_load_missing``,
    are not required; ``ignore`` (a regex) exempts more on both sides. Anything else missing or
    unexpected is an error.
    """
    matcher = ignore_matcher(ignore)
    state: dict[str, torch.Tensor] = {}
    for path in _safetensors.checkpoint_files(weights if len(weights) > 1 else weights[0]):
        state.update(_safetensors.load(path)[0])
    buffers = {name for name, _ in model.named_buffers()}
    own = model.state_dict()  # views of the parameters: load_state_dict copies into them in place
    tolerated_in_file = loader_patterns(model, "_keys_to_ignore_on_load_unexpected")
    skipped = {
        k for k in state
        if k not in own and (k in buffers or any(p.search(k) for p in tolerated_in_file) or matches(matcher, k))
    }  # fmt: skip
    try:
        result = model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"the weights do not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    ptrs = {own[k].untyped_storage().data_ptr() for k in state if k in own}
    tolerated_in_model = loader_patterns(model, "_keys_to_ignore_on_load_missing")
    missing = [
        k for k in result.missing_keys
        if own[k].untyped_storage().data_ptr() not in ptrs and not any(p.search(k) for p in tolerated_in_model)
        and not matches(matcher, k)
    ]  # fmt: skip
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"the weights do not fit the model: {len(missing)} missing ({', '.join(missing[:5])}), "
            f"{len(result.unexpected_keys)} unexpected ({', '.join(result.unexpected_keys[:5])}); "
            "pass --ignore REGEX for keys your loader leaves out on purpose"
        )


def load_inputs(source: str) -> Any:
    """Inputs from a safetensors file (one tensor, ``0..n-1`` as a tuple, else a dict) or a spec."""
    if source.endswith(".safetensors") or os.path.exists(source):
        tensors, _ = _safetensors.load(source)
        if not tensors:
            raise FormatError(f"{shown(source)} holds no tensor")
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        if set(tensors) == {str(i) for i in range(len(tensors))}:
            return tuple(tensors[str(i)] for i in range(len(tensors)))
        return tensors
    obj = resolve(source, "inputs spec")
    return obj() if callable(obj) else obj


# ---- output ---------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=1, ensure_ascii=True))
    else:
        print(text)


# ---- commands -------------------------------------------------------------------------------------


def _manifest(args: argparse.Namespace) -> int:
    if bool(args.paths) == bool(args.model):
        raise ConfigError("give safetensors PATHs or --model SPEC (not both)")
    if args.model:
        manifest = Manifest.from_model(load_model(args.model, args.weights, args.ignore), threads=args.threads)
    else:
        manifest = Manifest.from_safetensors(args.paths if len(args.paths) > 1 else args.paths[0], threads=args.threads)
    manifest.save(args.output, key=args.key)
    size = sum(e.nbytes for e in manifest.tensors.values())
    _emit(
        args,
        {
            "output": os.fsdecode(args.output),
            "digest": manifest.digest,
            "tensors": len(manifest.tensors),
            "bytes": size,
            "signed": args.key is not None,
        },
        f"wrote {shown(args.output)}: {len(manifest.tensors)} tensors, {size / 1e6:.1f} MB, digest {manifest.digest}"
        + (" (signed)" if args.key else ""),
    )
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    if bool(args.paths) == bool(args.model):
        raise ConfigError("give safetensors PATHs or --model SPEC (not both)")
    target: Any = (
        load_model(args.model, args.weights, args.ignore)
        if args.model
        else (args.paths if len(args.paths) > 1 else args.paths[0])
    )
    report = verify_weights(
        target, args.manifest, expected_digest=args.expected_digest, key=args.key, ignore=args.ignore,
        threads=args.threads,
    )  # fmt: skip
    _emit(args, report.to_dict(), report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def _canary_record(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.weights, args.ignore)
    manifest = Manifest.load(args.manifest) if args.manifest else None
    canary = Canary.record(model, load_inputs(args.inputs), manifest=manifest)
    canary.save(args.output)
    _emit(
        args,
        {"output": os.fsdecode(args.output), "outputs": list(canary.expected), "metadata": canary.metadata},
        f"wrote {shown(args.output)}: {len(canary.inputs)} inputs, {len(canary.expected)} outputs "
        f"({', '.join(list(canary.expected)[:6])}), recorded on {canary.metadata['device_name']}",
    )
    return EXIT_OK


def _canary_verify(args: argparse.Namespace) -> int:
    canary = Canary.load(args.canary)
    model = load_model(args.model, args.weights, args.ignore)
    report = canary.verify(model, mode=args.mode)
    _emit(args, report.to_dict(), report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


IGNORE_HELP = (
    "regex of tensor names to leave out (of loading --weights, and of the comparison); keys a transformers "
    "model's loader ignores, and non-persistent buffers, are left out without it"
)


def _paths(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH", help="safetensors file(s), a directory, or a *.index.json")
    p.add_argument("--model", metavar="SPEC", help="build the model with package.module:factory instead")
    p.add_argument("--weights", nargs="+", metavar="PATH", help="with --model: safetensors weights to load (strict)")
    p.add_argument("--ignore", metavar="REGEX", help=IGNORE_HELP)


def add_commands(sub: Any) -> None:
    m = sub.add_parser(
        "manifest", help="write the sha256 manifest of a checkpoint or model",
        description="Hash every tensor of a safetensors checkpoint (or a model from a factory) and write a "
        "manifest. Exit 0 written, 2 bad input.",
    )  # fmt: skip
    _paths(m)
    m.add_argument("-o", "--output", required=True, help="manifest file to write (JSON)")
    m.add_argument("--key", metavar="KEYFILE", help="sign the manifest with this HMAC-SHA256 key file")
    m.add_argument("--threads", type=_positive, help="hashing threads (default: all CPUs)")
    m.add_argument("--json", action="store_true", help="print a JSON result")
    m.set_defaults(handler=_guarded(_manifest))

    v = sub.add_parser(
        "verify", help="check a checkpoint or model against a manifest",
        description="Check a safetensors checkpoint (or a model from a factory) against a manifest, tensor by "
        "tensor. Exit 0 if every tensor matches, 1 if any does not (each is named), 2 on bad input.",
    )  # fmt: skip
    _paths(v)
    v.add_argument("--manifest", required=True, help="the manifest to check against")
    v.add_argument("--expected-digest", help="fail unless the manifest has this digest (pinning)")
    v.add_argument("--key", metavar="KEYFILE", help="fail unless the manifest is signed with this key")
    v.add_argument("--threads", type=_positive, help="hashing threads (default: all CPUs)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(handler=_guarded(_verify))

    c = sub.add_parser(
        "canary", help="record or verify a reference batch and its outputs",
        description="Record a reference batch and the model's outputs on it at release time (record); at startup, "
        "run the model on it again and compare (verify).",
    )  # fmt: skip
    csub = c.add_subparsers(dest="canary_command", metavar="ACTION", required=True)
    rec = csub.add_parser(
        "record", help="run the model on inputs and save inputs and outputs",
        description="Run the model on a reference batch and save the batch and every output in one safetensors "
        "file. Exit 0 written, 2 bad input (the model fails on the inputs, unreadable files).",
    )  # fmt: skip
    rec.add_argument("--model", required=True, metavar="SPEC", help="package.module:factory building the model")
    rec.add_argument("--weights", nargs="+", metavar="PATH", help="safetensors weights to load (strict)")
    rec.add_argument("--ignore", metavar="REGEX", help=IGNORE_HELP)
    rec.add_argument(
        "--inputs", required=True,
        help="a safetensors file of inputs (one tensor; tensors '0'..'n-1' as positional; else keyword) "
        "or package.module:function returning them",
    )  # fmt: skip
    rec.add_argument("--manifest", help="the weights' manifest, so canary and manifest are tied together")
    rec.add_argument("-o", "--output", required=True, help="canary file to write (safetensors)")
    rec.add_argument("--json", action="store_true", help="print a JSON result")
    rec.set_defaults(handler=_guarded(_canary_record))
    ver = csub.add_parser(
        "verify", help="run the model on the canary inputs and compare outputs",
        description="Run the model on a canary's inputs and compare its outputs with the recorded ones. Exit 0 "
        "if every output matches, 1 if any does not (each is named), 2 on bad input.",
    )  # fmt: skip
    ver.add_argument("canary", help="the canary file")
    ver.add_argument("--model", required=True, metavar="SPEC", help="package.module:factory building the model")
    ver.add_argument("--weights", nargs="+", metavar="PATH", help="safetensors weights to load (strict)")
    ver.add_argument("--ignore", metavar="REGEX", help=IGNORE_HELP)
    ver.add_argument("--mode", choices=MODES, default="auto", help="comparison (default: auto, from the metadata)")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    ver.set_defaults(handler=_guarded(_canary_verify))

    k = sub.add_parser(
        "keygen", help="create a random key file for signing manifests (mode 0600)",
        description=f"Write {KEY_BYTES} random bytes to a new file only its owner can read, for `manifest --key` "
        "and `verify --key`. An existing file is never replaced. Exit 0 written, 2 the file exists or cannot "
        "be written.",
    )  # fmt: skip
    k.add_argument("-o", "--output", required=True, help="key file to create")
    k.set_defaults(handler=_guarded(_keygen))


def _keygen(args: argparse.Namespace) -> int:
    write_key(args.output)
    print(f"wrote a {KEY_BYTES}-byte signing key to {args.output} (mode 0600); keep it out of the model's repository")
    return EXIT_OK


def _guarded(command: Any) -> Any:
    def handler(args: argparse.Namespace) -> int:
        return _run(command, args)

    return handler


def _run(command: Any, args: argparse.Namespace) -> int:
    """Run an integrity command; map torchwatch errors to exit codes with a one-line message."""
    try:
        return command(args)
    except (ConfigError, FormatError) as exc:
        print(f"torchwatch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # writing the output: a missing directory, a full disk
        where = f" {shown(exc.filename)}" if exc.filename else ""
        print(f"torchwatch: error: cannot write{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except IntegrityError as exc:
        print(f"torchwatch: check failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except TorchwatchError as exc:
        print(f"torchwatch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
