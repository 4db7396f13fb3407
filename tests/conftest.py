"""Shared test settings: one CPU thread, seeded randomness, CUDA skips, hypothesis profile.

The reference every numeric test compares against is *independent* of the
code under test: ``torch.nn.functional.batch_norm`` (with the feature axis
moved to 1), float64 arithmetic written out by hand, or central finite
differences. Never the package's own output.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings

# The project machine has 2 shared cores; OpenMP spin-waiting across two
# threads is slower than one thread for the tiny tensors used here.
torch.set_num_threads(1)

settings.register_profile(
    "batchnorm",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("batchnorm")

CUDA_AVAILABLE = torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    # When a hypothesis test fails, its pytest plugin writes a patch with
    # libcst, whose import emits a DeprecationWarning (mypy_extensions.TypedDict).
    # With warnings as errors that turns the report into an INTERNALERROR that
    # hides the falsifying example.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:libcst.*")
    # Build (or load) the native kernels before the first test, so that no test's timing or
    # subprocess includes the one-time compilation (make install has normally built them).
    from batchnorm.kernels import native

    native.available()


requires_cuda = pytest.mark.skipif(
    not CUDA_AVAILABLE, reason="needs a CUDA device (torch.cuda.is_available() is False)"
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch random state."""
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=requires_cuda)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Run a test on the CPU and, when one is present, on a CUDA device (skipped cleanly otherwise)."""
    return torch.device(request.param)


@pytest.fixture
def cuda_device() -> torch.device:
    """A CUDA device, or skip the test when there is none."""
    if not CUDA_AVAILABLE:
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda")


TorchBatchNorm = Callable[..., torch.Tensor]


def torch_batch_norm_on_axis(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` with the feature axis moved to 1 and back: the trusted reference."""
    moved = x.movedim(axis, 1)
    y = torch.nn.functional.batch_norm(moved, running_mean, running_var, weight, bias, training, momentum, eps)
    return y.movedim(1, axis)


@pytest.fixture
def torch_batch_norm() -> TorchBatchNorm:
    """:func:`torch_batch_norm_on_axis`, as a fixture so that every test module shares one definition."""
    return torch_batch_norm_on_axis
