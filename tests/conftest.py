from __future__ import annotations

import os
import time
import warnings

import torch

if not torch.cuda.is_available():
    # The fused Triton kernel runs on CPU tensors in Triton's interpreter; this must be set
    # before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption(
        "--slow-worker", type=float, default=0.0, metavar="SECONDS",
        help="delay every job on torchwatch's worker thread by SECONDS, as on a loaded machine: the worker falls "
        "behind and merges records (a test must not assume one record per flush unless it waits for each)",
    )  # fmt: skip


def pytest_configure(config):
    delay = config.getoption("--slow-worker")
    if delay > 0:
        from torchwatch.engine import worker

        run_job = worker.Worker._run_job

        def slow_job(self, job):
            time.sleep(delay)
            return run_job(self, job)

        worker.Worker._run_job = slow_job


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def quiet():
    """Silence torchwatch's own warnings in tests that are not about them."""
    from torchwatch import TorchwatchWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TorchwatchWarning)
        yield
