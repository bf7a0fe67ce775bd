"""The hooks torchwatch puts on a user's modules, and what copies of those modules get instead.

A watched model is still copied and saved the usual ways: ``copy.deepcopy(model)`` (EMA copies,
a replica per worker), ``torch.save(model)`` and ``pickle``. The copy carries **no watch**: each
hook copies as an inert stand-in that removes itself from the copy's module the first time the
copy runs, so the copy never reports into the original's watch, never holds its locks or
threads, and costs nothing after its first call. Attach a new watch to the copy if it is served.
(A pickle names the stand-in's class, so loading one needs torchwatch importable; detach before
``torch.save(model)`` to leave no trace.)
"""

from __future__ import annotations

import functools
from typing import Any

# every dict of a Module keyed by hook id
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class Hook(functools.partial):
    """``Hook(fn)`` calls ``fn`` like the function itself (``functools.partial``: the call stays in C).

    Copied or pickled, it becomes a :class:`RemovedHook`.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemovedHook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> RemovedHook:
        return RemovedHook()

    def __copy__(self) -> Hook:
        return self  # a shallow copy of a module shares its hook dicts anyway


class RemovedHook:
    """What a copied module holds where the original had a torchwatch hook: does nothing, and
    takes itself out of the module's hook dicts on its first call."""

    __slots__ = ()

    def __call__(self, module: Any, *args: Any, **kwargs: Any) -> None:
        dicts = [getattr(module, name, None) for name in _HOOK_DICTS]
        ids = [key for d in dicts if isinstance(d, dict) for key, value in list(d.items()) if value is self]
        for d in dicts:
            if isinstance(d, dict):
                for key in ids:
                    d.pop(key, None)
        return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemovedHook, ())
