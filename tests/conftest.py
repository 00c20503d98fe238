"""Shared test fixtures: devices, setups of the engine tests, hypothesis profiles."""

import copy
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


# The engine tests run on the CPU in float32 and, where a GPU exists, on CUDA in float32 and
# bfloat16. A module using ``targets`` defines a module-scoped ``saved_targets`` fixture (a
# dict of tiny targets on the CPU in float32).
SETUPS = {"cpu": ("cpu", torch.float32), "cuda-fp32": ("cuda", torch.float32),
          "cuda-bf16": ("cuda", torch.bfloat16)}
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda-fp32", marks=needs_cuda),
                        pytest.param("cuda-bf16", marks=needs_cuda)])
def setup(request) -> tuple[str, torch.dtype]:
    """(device, dtype) the target, the draft and the inputs live on."""
    return SETUPS[request.param]


@pytest.fixture(scope="module")
def placed_targets():
    """Copies of the module's targets moved to a setup, made once per module."""
    return {}


@pytest.fixture
def targets(saved_targets, placed_targets, setup):
    """The module's targets on this test's device, in its dtype."""
    if setup == SETUPS["cpu"]:
        return saved_targets
    for name, target in saved_targets.items():
        if (name, setup) not in placed_targets:
            device, dtype = setup
            placed_targets[name, setup] = copy.deepcopy(target).to(device=device, dtype=dtype)
    return {name: placed_targets[name, setup] for name in saved_targets}
