"""Capture the call behind an alert as an incident bundle, and replay it in a sandbox.

* :mod:`.options` — ``tw.Capture``: what triggers a capture, where bundles go, their bounds;
* :mod:`.monitor` — the serving side: which call faulted, copies of what it was given;
* :mod:`.writer` — bundles written off the serving thread, within the bounds;
* :mod:`.bundle` — the file format (safetensors, no pickle) and its checked reader;
* :mod:`.incident` — ``tw.Incident``: a bundle read back, and :meth:`~.incident.Incident.replay`;
* :mod:`.verdict` — the replay's controlled re-runs and its culprit (``torchwatch replay``).

Only the options are imported here: the replay runs a watch of its own, and :mod:`torchwatch.watch`
imports the monitor, so ``tw.Incident`` is imported by the top-level package after the watch.
"""

from __future__ import annotations

from .options import Capture

__all__ = ["Capture"]
