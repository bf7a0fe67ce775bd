from __future__ import annotations

import os
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
