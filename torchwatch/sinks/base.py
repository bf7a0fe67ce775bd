"""The interface a sink implements; what it receives is a :class:`~torchwatch.Record`."""

from __future__ import annotations

from ..records import Record
from ..values import ROOT_LABEL as ROOT_LABEL  # how the watched model itself ("") is shown


class Sink:
    """Base class of sinks. Sinks run on torchwatch's writer thread, never the serving thread.

    Subclasses implement :meth:`write` and, where they hold resources, :meth:`flush` and
    :meth:`close`. An exception from any of them disables the sink (reported once); inference
    and the other sinks go on.

    Example:
        >>> import torch, torchwatch as tw
        >>> class PrintNaN(tw.Sink):
        ...     def write(self, record):
        ...         print(record.step, {name: s.nan for name, s in record.stats.items() if s.nan})
        >>> model = torch.nn.Sequential(torch.nn.ReLU())
        >>> with tw.attach(model, sinks=[PrintNaN()], on_nonfinite="ignore"):
        ...     _ = model(torch.tensor([float("nan"), 1.0]))
        1 {'<input>': 1, '0': 1}
    """

    def write(self, record: Record) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Push buffered output to its destination."""

    def close(self) -> None:
        """Release files, writers and ports; the sink is not used afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
