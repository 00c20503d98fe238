"""Shared test fixtures: devices, hypothesis profiles."""

import os

import pytest
import torch
import transformers
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

HAS_CUDA = torch.cuda.is_available()


def pytest_report_header(config) -> str:
    """The versions this run tests (CI runs the newest and the oldest transformers allowed)."""
    return f"msd dependencies: torch {torch.__version__}, transformers {transformers.__version__}"


# Every op test runs on the CPU, and on CUDA wherever a GPU exists (reported as skipped
# otherwise, never dropped silently).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
