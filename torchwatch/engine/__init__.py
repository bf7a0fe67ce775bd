"""The engine under every watch: root calls and hooks (:mod:`.core`), the alert bus (:mod:`.bus`),
intervals on their way to records (:mod:`.window`), the sink worker (:mod:`.worker`) and which
model has which watch (:mod:`.registry`). The options of ``attach()`` and the built-in monitors
they turn on are one level up (:mod:`torchwatch.config`): the engine knows no concrete monitor.

Monitors (:mod:`torchwatch.monitors`) plug into it through :class:`~torchwatch.monitors.Monitor`;
tools built on torchwatch (``tw.shadow``) use :func:`watch_of` and :meth:`torchwatch.Watch.publish`.
"""

from .bus import AlertBus
from .registry import watch_of

__all__ = ["AlertBus", "watch_of"]
