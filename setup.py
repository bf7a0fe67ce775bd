"""Builds the optional single-pass CPU statistics kernel; metadata lives in pyproject.toml.

The extension is plain C against the CPython API (no torch headers), so one build serves every
torch version. If it cannot be compiled, installation still succeeds and torchwatch uses its
torch-ops implementation instead (same results, slower) -- unless TORCHWATCH_REQUIRE_KERNEL=1 is
set (CI sets it): then a kernel that does not compile fails the installation.
"""

import os
import sys

from setuptools import Extension, setup

flags = ["/O2"] if sys.platform == "win32" else ["-O3", "-std=c11"]

setup(
    ext_modules=[
        Extension(
            "torchwatch.kernels._cstats",
            sources=["torchwatch/kernels/_cstats.c"],
            extra_compile_args=flags,
            optional=os.environ.get("TORCHWATCH_REQUIRE_KERNEL") != "1",
        )
    ]
)
