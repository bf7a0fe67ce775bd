"""The name torchwatch is installed under, and the install hints that name it.

The import name is ``torchwatch``; the distribution is ``torchwatch-monitor``, because the package
index already holds an unrelated project called ``torchwatch``: an install hint with that name
would install someone else's code.
"""

from __future__ import annotations

DISTRIBUTION = "torchwatch-monitor"


def install_hint(extra: str) -> str:
    """The pip command that adds an optional extra, e.g. ``pip install 'torchwatch-monitor[tensorboard]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"
