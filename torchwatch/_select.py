"""Which modules of a model are watched."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, Union

from torch import nn

from .errors import ConfigError

# Modules whose output is their input in eval: measuring them again only costs time.
IDENTITY_LIKE: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (
        getattr(nn, name, None)
        for name in (
            "Identity",
            "Dropout",
            "Dropout1d",
            "Dropout2d",
            "Dropout3d",
            "AlphaDropout",
            "FeatureAlphaDropout",
        )
    )
    if cls is not None
)

# Padding layers' outputs are their inputs with constant borders: not watched by default either.
PADDING: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (getattr(nn.modules.padding, name, None) for name in ("_ConstantPadNd", "_ReflectionPadNd",
                                                                    "_ReplicationPadNd", "CircularPad1d"))
    if cls is not None
)  # fmt: skip

# torch.nn's own computing layers. A subclass of one that holds helper modules (a padding layer,
# as "same"-padding convolutions of TF-ported models do; weight parametrizations) is still one
# layer: it is watched whole by default, its helpers are not.
LAYERS: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                nn.GroupNorm, nn.Embedding, nn.EmbeddingBag, getattr(nn, "RMSNorm", None))
    if cls is not None
)  # fmt: skip

Selector = Union[None, str, re.Pattern, list, tuple, set, frozenset, Callable[[str, nn.Module], bool]]


def _is_leaf(module: nn.Module) -> bool:
    return next(iter(module.children()), None) is None


def _default(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Leaves and torch.nn layers with helpers inside, less pass-throughs and those helpers."""
    layers = [n for n, m in named if isinstance(m, LAYERS) and not _is_leaf(m)]
    inside = tuple(f"{n}." if n else "" for n in layers)

    def chosen(name: str, module: nn.Module) -> bool:
        if isinstance(module, IDENTITY_LIKE + PADDING) or (inside and name.startswith(inside)):
            return False
        return _is_leaf(module) or isinstance(module, LAYERS)

    return [(n, m) for n, m in named if chosen(n, m)]


def select_modules(model: nn.Module, spec: Any) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` pairs chosen by ``spec``, in ``named_modules()`` order.

    ``spec`` is ``None`` (every leaf module except identity-like and padding ones, with torch.nn
    layers that hold helper modules counted as leaves and their helpers left out), a regex that must
    match the whole fully-qualified name, a collection of exact names, a tuple of module
    types, or a callable ``(fqn, module) -> bool``. The model itself has the name ``""``.

    Raises:
        ConfigError: the selector is malformed, names a module that does not exist, or
            selects nothing.
    """
    named = list(model.named_modules())
    if spec is None:
        chosen = _default(named)
        what = "modules=None (leaf modules)"
    elif isinstance(spec, (str, re.Pattern)):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ConfigError(f"modules={spec!r} is not a valid regular expression: {exc}") from None
        chosen = [(n, m) for n, m in named if pattern.fullmatch(n)]
        what = f"modules={pattern.pattern!r} (a regex matched against the whole name)"
    elif isinstance(spec, tuple) and spec and all(isinstance(t, type) and issubclass(t, nn.Module) for t in spec):
        chosen = [(n, m) for n, m in named if isinstance(m, spec)]
        what = f"modules={tuple(t.__name__ for t in spec)} (module types)"
    elif isinstance(spec, (list, tuple, set, frozenset)) and spec and all(isinstance(s, str) for s in spec):
        chosen = _by_names(named, spec)
        what = "modules=[...] (names)"
    elif callable(spec) and not isinstance(spec, type):
        chosen = _by_callable(named, spec)
        what = f"modules={getattr(spec, '__name__', spec)!r} (a callable)"
    else:
        raise ConfigError(
            f"modules={spec!r} is not a selector: pass None, a regex string, a list of module "
            "names, a tuple of nn.Module types, or a callable (fqn, module) -> bool"
        )
    if not chosen:
        sample = ", ".join(repr(n) for n, _ in named[1:9])
        raise ConfigError(
            f"{what} selected no module of {type(model).__name__}; its modules include {sample} "
            f"({len(named)} in all, see model.named_modules())"
        )
    return chosen


def _by_names(named: list[tuple[str, nn.Module]], names: Any) -> list[tuple[str, nn.Module]]:
    index = dict(named)
    unknown = [n for n in names if n not in index]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, list(index), n=1)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"modules names no such module: {', '.join(hints)}")
    wanted = set(names)
    return [(n, m) for n, m in named if n in wanted]


def _by_callable(
    named: list[tuple[str, nn.Module]], fn: Callable[[str, nn.Module], bool]
) -> list[tuple[str, nn.Module]]:
    chosen = []
    for n, m in named:
        try:
            keep = fn(n, m)
        except Exception as exc:
            raise ConfigError(f"the modules callable raised {exc!r} on module {n!r}") from exc
        if keep:
            chosen.append((n, m))
    return chosen
