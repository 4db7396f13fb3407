"""``batchnorm.nn.ghost``: Ghost BN against torch's batch_norm applied to each chunk, and float64 running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import batchnorm as bn
from batchnorm import kernels
from batchnorm.nn.ghost import GhostBatchNorm, ghost_batch_norm

CASES = [  # shape, axis, virtual batch size, channels_last
    ((64, 5), 1, 16, False),  # even
    ((70, 5), 1, 16, False),  # remainder of 6 samples
    ((10, 3, 4, 4), 1, 4, False),
    ((10, 3, 4, 4), 1, 4, True),
    ((9, 6, 3), -1, 4, False),  # a last chunk of 1 sample with 6 values per feature
    ((7, 2, 3, 2, 2), 1, 3, False),
]


def per_chunk(x: Tensor, weight: Tensor | None, bias: Tensor | None, size: int, axis: int, eps: float = 1e-5) -> Tensor:
    """torch's training-mode batch_norm on each chunk of ``size`` samples, feature axis moved to 1."""
    outputs = [
        nn.functional.batch_norm(chunk.movedim(axis, 1), None, None, weight, bias, True, 0.1, eps).movedim(1, axis)
        for chunk in torch.split(x, size)
    ]
    return torch.cat(outputs)


def pooled(x: Tensor, size: int, axis: int) -> tuple[Tensor, Tensor]:
    """Float64: the batch mean and sum over chunks of sum((x - chunk mean)^2), divided by (m - G)."""
    moved = x.detach().double().movedim(axis, 1)
    dims = [0, *range(2, moved.dim())]
    chunks = torch.split(moved, size)
    m2 = sum(((c - c.mean(dims, keepdim=True)) ** 2).sum(dims) for c in chunks)
    m = moved.numel() // moved.shape[1]
    return moved.mean(dims), m2 / (m - len(chunks))


def _setup(shape: tuple[int, ...], axis: int, channels_last: bool) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(shape, dtype=torch.float64) * 2 + torch.linspace(-1, 1, shape[0], dtype=torch.float64).view(
        -1, *[1] * (len(shape) - 1)
    )  # chunk means differ, so pooled within-chunk and whole-batch variances differ
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[axis]
    weight = torch.empty(c, dtype=torch.float64).uniform_(0.5, 1.5).requires_grad_()
    bias = torch.empty(c, dtype=torch.float64).uniform_(-0.5, 0.5).requires_grad_()
    return x.requires_grad_(), weight, bias


@pytest.mark.parametrize(("shape", "axis", "size", "channels_last"), CASES)
@pytest.mark.parametrize("kernel", ["auto", "torch", "exact"])
def test_outputs_and_gradients_equal_torch_per_chunk(
    shape: tuple[int, ...], axis: int, size: int, channels_last: bool, kernel: str
) -> None:
    x, weight, bias = _setup(shape, axis, channels_last)
    with kernels.use_kernel(kernel):
        y = ghost_batch_norm(x, None, None, weight, bias, True, axis=axis, virtual_batch_size=size)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, weight, bias), dy)
    expected = per_chunk(x, weight, bias, size, axis)
    torch.testing.assert_close(y, expected)
    for ours, theirs in zip(grads, torch.autograd.grad(expected, (x, weight, bias), dy)):
        torch.testing.assert_close(ours, theirs)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("shape", "axis", "size", "channels_last"), CASES)
def test_running_statistics_are_the_batch_mean_and_pooled_within_chunk_variance(
    shape: tuple[int, ...], axis: int, size: int, channels_last: bool
) -> None:
    x, _, _ = _setup(shape, axis, channels_last)
    module = GhostBatchNorm(shape[axis], size, momentum=0.2, axis=axis).double()
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
    before_mean, before_var = module.running_mean.clone(), module.running_var.clone()
    module(x)
    mean, var = pooled(x, size, axis)
    torch.testing.assert_close(module.running_mean, 0.8 * before_mean + 0.2 * mean)
    torch.testing.assert_close(module.running_var, 0.8 * before_var + 0.2 * var)
    assert int(module.num_batches_tracked) == 1  # one update per call


def test_cumulative_average_with_momentum_none() -> None:
    module = GhostBatchNorm(4, 5, momentum=None).double()
    batches = [torch.randn(12, 4, dtype=torch.float64) * (k + 1) + k for k in range(3)]
    for batch in batches:
        module(batch)
    stats = [pooled(batch, 5, 1) for batch in batches]
    torch.testing.assert_close(module.running_mean, sum(s[0] for s in stats) / 3)
    torch.testing.assert_close(module.running_var, sum(s[1] for s in stats) / 3)
    assert int(module.num_batches_tracked) == 3


def test_a_batch_within_one_virtual_batch_is_torch_batch_norm() -> None:
    ours = GhostBatchNorm(3, virtual_batch_size=8).double()
    theirs = nn.BatchNorm2d(3).double()
    for step in range(3):
        x = torch.randn(8 - step, 3, 2, 2, dtype=torch.float64) + step
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_a_last_virtual_batch_with_one_value_per_feature_raises_and_changes_nothing() -> None:
    module = GhostBatchNorm(3, virtual_batch_size=4)
    with pytest.raises(bn.BatchNormArgumentError, match=r"batch of 9 samples .* last virtual batch of 1 sample"):
        module(torch.randn(9, 3))
    assert int(module.num_batches_tracked) == 0
    torch.testing.assert_close(module.running_var, torch.ones(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what torch does with such a chunk
        nn.functional.batch_norm(torch.randn(1, 3), None, None, training=True)


def test_eval_is_batch_norm_with_the_running_statistics(torch_batch_norm) -> None:
    module = GhostBatchNorm(5, 4, axis=-1).double()
    for _ in range(3):
        module(torch.randn(10, 6, 5, dtype=torch.float64) * 2 + 1)
    module.eval()
    x = torch.randn(10, 6, 5, dtype=torch.float64)
    expected = torch_batch_norm(
        x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.1, 1e-5, -1
    )
    torch.testing.assert_close(module(x), expected)


def test_without_running_statistics_both_modes_use_the_chunks() -> None:
    module = GhostBatchNorm(4, 3, track_running_stats=False, affine=False).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    expected = per_chunk(x, None, None, 3, 1)
    torch.testing.assert_close(module(x), expected)
    module.eval()
    torch.testing.assert_close(module(x), expected)


def test_gradcheck_and_torch_func() -> None:
    x = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def function(x: Tensor, weight: Tensor) -> Tensor:
        return ghost_batch_norm(x, None, None, weight, None, True, virtual_batch_size=3)

    assert torch.autograd.gradcheck(function, (x, weight))
    assert torch.autograd.gradgradcheck(function, (x, weight))
    dy = torch.randn(7, 3, 2, dtype=torch.float64)
    grads = torch.func.grad(lambda x, w: (function(x, w) * dy).sum(), argnums=(0, 1))(x.detach(), weight.detach())
    expected = torch.autograd.grad(per_chunk(x, weight, None, 3, 1), (x, weight), dy)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs)


def test_state_dicts_move_to_and_from_torch_batch_norm() -> None:
    theirs = nn.BatchNorm1d(4).double()
    theirs(torch.randn(16, 4, dtype=torch.float64) + 2)
    ours = GhostBatchNorm(4, 4).double()
    ours.load_state_dict(theirs.state_dict())
    ours(torch.randn(16, 4, dtype=torch.float64))
    back = nn.BatchNorm1d(4).double()
    back.load_state_dict(ours.state_dict())
    ours.eval()
    back.eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), back(x))
    assert int(back.num_batches_tracked) == 2


def test_argument_errors() -> None:
    for size in (0, -2, 1.5, True):
        with pytest.raises(bn.BatchNormArgumentError, match="virtual_batch_size"):
            GhostBatchNorm(3, size)  # type: ignore[arg-type]
    with pytest.raises(bn.BatchNormArgumentError, match="axis cannot be 0"):
        GhostBatchNorm(3, 4, axis=0)
    with pytest.raises(bn.BatchNormArgumentError, match="feature axis cannot be 0"):
        ghost_batch_norm(torch.randn(3, 8), None, None, training=True, axis=-2, virtual_batch_size=2)
    with pytest.raises(bn.BatchNormArgumentError, match="feature axis cannot be 0"):
        ghost_batch_norm(torch.randn(3, 8), None, None, training=True, axis=0, virtual_batch_size=32)
    with pytest.raises(bn.BatchNormArgumentError, match="expected shape"):
        ghost_batch_norm(torch.randn(8, 3), torch.zeros(4), torch.ones(4), training=True, virtual_batch_size=2)
    with pytest.raises(bn.BatchNormArgumentError, match="nonfinite"):
        ghost_batch_norm(torch.randn(8, 3), None, None, training=True, virtual_batch_size=2, nonfinite="x")  # type: ignore[arg-type]
    assert "virtual_batch_size=4" in repr(GhostBatchNorm(3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype: torch.dtype) -> None:
    x = (torch.randn(10, 4, 3, 3) * 2 + 1).to(dtype)
    y = GhostBatchNorm(4, 4).to(dtype)(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), per_chunk(x.double(), None, None, 4, 1), rtol=2e-2, atol=2e-2)


def test_an_empty_batch_is_counted_as_by_torch() -> None:
    module, theirs = GhostBatchNorm(3, 2), nn.BatchNorm1d(3)
    x = torch.randn(0, 3, 2)
    assert module(x).shape == theirs(x).shape == (0, 3, 2)
    assert int(module.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
