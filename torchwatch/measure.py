"""Measuring one tensor outside any watch: :func:`tensor_stats`, the computation the hooks run."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._accumulators import to_module_stats
from ._casts import cast_plan, normalize_cast_dtypes
from .errors import ConfigError
from .kernels import host_stats, measurable
from .kernels.cpu import new_host_accumulator
from .stats import DEFAULT_CAST_DTYPES, ModuleStats


def tensor_stats(x: torch.Tensor, *, cast_dtypes: Iterable[object] = DEFAULT_CAST_DTYPES) -> ModuleStats:
    """The :class:`ModuleStats` of one floating-point tensor, on any device.

    This is the same computation the hooks run; it waits for the result (a device sync on GPU).

    Args:
        x: a dense floating-point tensor (any shape, including 0-d and empty).
        cast_dtypes: dtypes to count would-underflow/overflow against.

    Returns:
        ModuleStats with ``calls == 1``.

    Raises:
        ConfigError: ``x`` is not a dense floating-point tensor, or a cast dtype is unknown.

    Example:
        >>> import torch, torchwatch as tw
        >>> tw.tensor_stats(torch.tensor([70000.0, 1.0]), cast_dtypes=["float16"]).overflow
        {'float16': 1}
    """
    names = normalize_cast_dtypes(cast_dtypes)
    if not isinstance(x, torch.Tensor) or not measurable(x):
        raise ConfigError(
            f"tensor_stats needs a dense floating-point tensor, got {_describe(x)}; "
            "convert it with .float() or .to_dense() first"
        )
    acc = new_host_accumulator(len(names))
    acc.add(host_stats(x.detach(), cast_plan(x.dtype, names)))
    return to_module_stats(acc, names)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.layout} tensor of dtype {x.dtype} on {x.device}"
    return f"a {type(x).__name__}"
