"""What a watch measures, one capability per module, each a :class:`Monitor`.

* :mod:`.activations` — per-module output statistics and where NaN/Inf started;
* :mod:`.inputs` (with :mod:`.ids`) — the root call's inputs; :mod:`.outputs` — output quality;
* :mod:`.latency` — root-call latency and per-module timing;
* :mod:`.drift` — embedding drift against a reference;
* :mod:`.fingerprint` — the weights re-checked in memory;
* :mod:`.histograms` — per-module magnitude histograms (opt-in: ``monitors=[Histograms()]``).

A monitor of your own subclasses :class:`Monitor` and is passed to
``tw.attach(model, monitors=[...])``; see :mod:`.base`.
"""

from .base import Binding, Call, Collect, Monitor
from .histograms import Histograms, MagnitudeHistograms

__all__ = ["Binding", "Call", "Collect", "Histograms", "MagnitudeHistograms", "Monitor"]
