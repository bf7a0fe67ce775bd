"""Watches on the device path's CPU twin: CPU tensors measured the way accelerator ones are."""

from __future__ import annotations

from typing import Any

import torch

import torchwatch as tw
from torchwatch import _testing


def device_watch(model: torch.nn.Module, *, device_path: bool = True, **options: Any) -> tw.Watch:
    """``tw.Watch(model, **options)``, attached on the device path when ``device_path``."""
    with _testing.device_path(device_path):
        return tw.Watch(model, **options)
