"""What decides a model's numerics besides its weights and inputs: versions, device, precision flags.

Recorded with a canary (its metadata) and with every captured incident, so a replay can run under
the same settings and a difference between two machines can be named.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import torch


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def numerics(device: torch.device) -> dict[str, Any]:
    """The settings that decide the numbers a forward on ``device`` gives, as JSON values.

    Read on the thread that ran the forward (thread count and autocast are per thread); what
    cannot change in a process is read once."""
    autocast = torch.is_autocast_enabled(device.type) if _autocast_takes_device() else torch.is_autocast_enabled()
    dtype = torch.get_autocast_dtype(device.type) if autocast and hasattr(torch, "get_autocast_dtype") else None
    return {
        **_fixed(device),
        "threads": torch.get_num_threads(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "autocast": str(dtype).removeprefix("torch.") if autocast else None,
        "grad_enabled": torch.is_grad_enabled(),
        "pid": os.getpid(),  # not cached: a forked worker has its own
    }


@functools.cache
def _fixed(device: torch.device) -> dict[str, Any]:
    """Versions and names: the same for every forward of the process on ``device``."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "host": platform.node(),
    }


@functools.cache
def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return False
    return True
