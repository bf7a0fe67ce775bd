"""The hooks a watch puts on a model: which, when they go in, and taking them out again.

*Sampled* hooks (the monitors' per-module measurements) are installed only while a sampled root
call runs when ``every > 1`` with python sampling (refcounted across threads), so an unsampled
call runs no per-module Python at all; otherwise they stay installed. *Fixed* hooks (the root
pre- and post-hook, drift's every-call hooks) go in once. Every hook is wrapped in
:class:`~torchwatch._hooks.Hook`, so copies and pickles of the model carry no watch.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .._hooks import Hook

Handle = torch.utils.hooks.RemovableHandle


class HookSet:
    """The module hooks of one watch (see the module docstring)."""

    def __init__(self) -> None:
        self._sampled: list[tuple[weakref.ref[nn.Module], Hook, bool, bool]] = []
        self._pending: list[tuple[nn.Module, Hook, bool, bool]] = []  # fixed hooks not yet registered
        self._handles: list[Handle] = []  # sampled hooks while installed
        self._fixed: list[Handle] = []
        self._installed = 0  # sampled calls in flight that need the sampled hooks
        self._lock = threading.Lock()

    def add(self, module: nn.Module, hook: Callable[..., None], *, sampled: bool, pre: bool, prepend: bool) -> None:
        """Plan a hook (registered by :meth:`start`, or by :meth:`install` for sampled ones)."""
        if sampled:
            self._sampled.append((weakref.ref(module), Hook(hook), pre, prepend))
        else:
            self._pending.append((module, Hook(hook), pre, prepend))

    def start(
        self, model: nn.Module, enter: Callable[..., None], exit: Callable[..., None], *, sampled_always: bool
    ) -> None:
        """Register the root hooks (``enter`` first of all pre-hooks, ``exit`` always called),
        the fixed hooks, and with ``sampled_always`` the sampled ones for good."""
        self._fixed = [
            model.register_forward_pre_hook(Hook(enter), prepend=True, with_kwargs=True),
            model.register_forward_hook(Hook(exit), always_call=True),
        ]
        if sampled_always:
            self.install()
        for module, hook, pre, prepend in self._pending:
            self._fixed.append(_register(module, hook, pre, prepend))
        self._pending = []

    def install(self) -> None:
        """Register the sampled hooks (refcounted across concurrent sampled calls)."""
        with self._lock:
            self._installed += 1
            if self._installed == 1:
                for module_ref, hook, pre, prepend in self._sampled:
                    module = module_ref()
                    if module is not None:
                        self._handles.append(_register(module, hook, pre, prepend))

    def uninstall(self) -> None:
        with self._lock:
            self._installed -= 1
            if self._installed == 0:
                for handle in self._handles:
                    handle.remove()
                self._handles = []

    def remove(self) -> None:
        """Take out every hook (detach)."""
        for handle in self._fixed:
            handle.remove()
        with self._lock:
            for handle in self._handles:
                handle.remove()
            self._handles, self._fixed = [], []


def _register(module: nn.Module, hook: Hook, pre: bool, prepend: bool) -> Handle:
    if pre:
        return module.register_forward_pre_hook(hook, prepend=prepend)
    return module.register_forward_hook(hook, prepend=prepend)
