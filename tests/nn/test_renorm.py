"""``batchnorm.nn.renorm``: Batch Renorm against torch's batch_norm, float64 formulas and finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import batchnorm as bn
from batchnorm import kernels
from batchnorm.nn.renorm import BatchRenorm, batch_renorm

CASES = [  # shape, axis, channels_last
    ((16, 5), 1, False),
    ((4, 3, 5, 6), 1, False),
    ((4, 3, 5, 6), 1, True),
    ((4, 6, 3), -1, False),
    ((3, 4, 2, 3, 2), 1, False),
]
RMAX, DMAX = 1.2, 0.6  # with _input and _params: some features clipped, some not (checked below)


def _input(shape: tuple[int, ...], channels_last: bool = False, dtype: torch.dtype = torch.float64) -> Tensor:
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _params(c: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """weight, bias (requiring grad), running_mean, running_var: non-trivial."""
    weight = torch.empty(c, dtype=dtype).uniform_(0.5, 1.5).requires_grad_()
    bias = torch.empty(c, dtype=dtype).uniform_(-0.5, 0.5).requires_grad_()
    return weight, bias, torch.empty(c, dtype=dtype).uniform_(-1, 1), torch.empty(c, dtype=dtype).uniform_(0.5, 4)


def reference(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rmax: float,
    dmax: float,
    axis: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ioffe (2017), Algorithm 1, written out in float64 with r and d detached: (y, batch mean, unbiased var)."""
    moved = x.double().movedim(axis, 1)
    dims = [0, *range(2, moved.dim())]
    shape = [1, moved.shape[1]] + [1] * (moved.dim() - 2)
    mu = moved.mean(dims, keepdim=True)
    var = ((moved - mu) ** 2).mean(dims, keepdim=True)
    sigma_batch = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var.double().view(shape) + eps)
    r = (sigma_batch / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mu - running_mean.double().view(shape)) / sigma).clamp(-dmax, dmax).detach()
    y = (moved - mu) / sigma_batch * r + d
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    m = moved.numel() // moved.shape[1]
    return y.movedim(1, axis), mu.flatten().detach(), (var * m / (m - 1)).flatten().detach()


def _grads(y: Tensor, dy: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize(("shape", "axis", "channels_last"), CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_rmax_1_dmax_0_is_torch_batch_norm(
    shape: tuple[int, ...], axis: int, channels_last: bool, momentum: float | None, torch_batch_norm
) -> None:
    x = _input(shape, channels_last)
    c = shape[axis]
    weight, bias, running_mean, running_var = _params(c)
    ours_mean, ours_var, counter = running_mean.clone(), running_var.clone(), torch.tensor(3)
    y = batch_renorm(
        x,
        ours_mean,
        ours_var,
        weight,
        bias,
        True,
        momentum,
        1e-5,
        axis,
        rmax=1.0,
        dmax=0.0,
        num_batches_tracked=counter,
    )
    theirs_mean, theirs_var = running_mean.clone(), running_var.clone()
    factor = 0.25 if momentum is None else momentum  # cumulative average: 1 / (3 + 1)
    expected = torch_batch_norm(x, theirs_mean, theirs_var, weight, bias, True, factor, 1e-5, axis)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    for ours, theirs in zip(_grads(y, dy, x, weight, bias), _grads(expected, dy, x, weight, bias)):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_mean, theirs_mean)
    torch.testing.assert_close(ours_var, theirs_var)
    assert int(counter) == 4


def test_module_warm_up_starts_as_torch_batch_norm_and_with_no_limits_stays_it() -> None:
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    theirs = nn.BatchNorm2d(3).double()
    plain = BatchRenorm(3, rmax=1.0, dmax=0.0, warmup_steps=0).double()
    warming = BatchRenorm(3, warmup_steps=10).double()  # step 0 of the warm-up: r = 1, d = 0
    torch.testing.assert_close(warming(x), theirs(x))
    for step in range(4):
        batch = x * (step + 1) + step
        torch.testing.assert_close(plain(batch), nn.functional.batch_norm(batch, None, None, training=True))
    theirs = nn.BatchNorm2d(3).double()
    for step in range(4):
        theirs(x * (step + 1) + step)
    torch.testing.assert_close(plain.running_mean, theirs.running_mean)
    torch.testing.assert_close(plain.running_var, theirs.running_var)
    plain.eval()
    theirs.eval()
    torch.testing.assert_close(plain(x), theirs(x))


@pytest.mark.parametrize(("shape", "axis", "channels_last"), CASES)
@pytest.mark.parametrize("kernel", ["auto", "torch", "exact"])
def test_forward_backward_and_running_stats_match_the_stop_gradient_reference(
    shape: tuple[int, ...], axis: int, channels_last: bool, kernel: str
) -> None:
    x = _input(shape, channels_last)
    c = shape[axis]
    weight, bias, running_mean, running_var = _params(c)
    rmax, dmax = RMAX, DMAX
    expected, mu, unbiased = reference(x, running_mean, running_var, weight, bias, 1e-5, rmax, dmax, axis)
    ours_mean, ours_var = running_mean.clone(), running_var.clone()
    with kernels.use_kernel(kernel):
        y = batch_renorm(x, ours_mean, ours_var, weight, bias, True, 0.1, 1e-5, axis, rmax=rmax, dmax=dmax)
        dy = torch.randn_like(y)
        grads = _grads(y, dy, x, weight, bias)
    torch.testing.assert_close(y, expected)
    for ours, theirs in zip(grads, _grads(expected, dy, x, weight, bias)):
        torch.testing.assert_close(ours, theirs)
    # r and d were computed from the running statistics before this batch updated them.
    torch.testing.assert_close(ours_mean, 0.9 * running_mean + 0.1 * mu)
    torch.testing.assert_close(ours_var, 0.9 * running_var + 0.1 * unbiased)


def test_the_reference_case_exercises_clipped_and_free_corrections() -> None:
    """The setting above has features with r and d inside and at their limits (so both paths are compared)."""
    x = _input((16, 5))
    _, _, running_mean, running_var = _params(5)
    moved_var = x.detach().var(0, unbiased=False)
    r = torch.sqrt(moved_var + 1e-5) / torch.sqrt(running_var + 1e-5)
    d = (x.detach().mean(0) - running_mean) / torch.sqrt(running_var + 1e-5)
    assert ((r > 1 / RMAX) & (r < RMAX)).any()
    assert ((r <= 1 / RMAX) | (r >= RMAX)).any()
    assert (d.abs() < DMAX).any()
    assert (d.abs() >= DMAX).any()


def test_without_affine_and_without_bias() -> None:
    x = _input((10, 4, 3))
    weight, _, running_mean, running_var = _params(4)
    for w, b in ((None, None), (weight, None)):
        y = batch_renorm(x, running_mean.clone(), running_var.clone(), w, b, True, 0.1, 1e-3, 1, rmax=1.5, dmax=0.5)
        expected, _, _ = reference(x, running_mean, running_var, w, b, 1e-3, 1.5, 0.5)
        torch.testing.assert_close(y, expected)
        dy = torch.randn_like(y)
        inputs = (x,) if w is None else (x, weight)
        for ours, theirs in zip(_grads(y, dy, *inputs), _grads(expected, dy, *inputs)):
            torch.testing.assert_close(ours, theirs)


def test_gradcheck_where_r_and_d_are_clipped() -> None:
    """With r and d at their limits they are locally constant, so the true derivative is the stop-gradient one."""
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    weight, bias, _, _ = _params(3)
    running_mean = torch.full((3,), 10.0, dtype=torch.float64)  # d clipped at -dmax
    running_var = torch.full((3,), 100.0, dtype=torch.float64)  # r clipped at 1/rmax

    def function(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        # momentum 0: the running statistics (and so r, d) stay the same across gradcheck's calls
        return batch_renorm(x, running_mean, running_var, weight, bias, True, 0.0, 1e-5, 1, rmax=2.0, dmax=0.5)

    assert torch.autograd.gradcheck(function, (x, weight, bias))
    assert torch.autograd.gradgradcheck(function, (x, weight, bias))


def test_double_backward_matches_the_reference() -> None:
    x = _input((8, 3, 4))
    weight, bias, running_mean, running_var = _params(3)
    y = batch_renorm(x, running_mean.clone(), running_var.clone(), weight, bias, True, 0.1, 1e-5, rmax=1.3, dmax=0.2)
    expected, _, _ = reference(x, running_mean, running_var, weight, bias, 1e-5, 1.3, 0.2)
    dy = torch.randn_like(y)
    results = []
    for out in (y, expected):
        dx, dw = torch.autograd.grad(out, (x, weight), dy, create_graph=True)
        results.append(torch.autograd.grad((dx**2).sum() + (dw**3).sum(), (x, weight, bias), allow_unused=True))
    for ours, theirs in zip(*results):
        if theirs is None:
            assert ours is None or torch.count_nonzero(ours) == 0
        else:
            torch.testing.assert_close(ours, theirs)


def test_torch_func_grad_takes_the_composite_route() -> None:
    x = torch.randn(8, 3, dtype=torch.float64)
    weight, bias, running_mean, running_var = _params(3)
    weight, bias = weight.detach(), bias.detach()
    dy = torch.randn(8, 3, dtype=torch.float64)

    def loss(x: Tensor, w: Tensor) -> Tensor:
        y = batch_renorm(x, running_mean.clone(), running_var.clone(), w, bias, True, 0.1, rmax=1.3, dmax=0.2)
        return (y * dy).sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(x, weight)
    x_ref, w_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
    expected, _, _ = reference(x_ref, running_mean, running_var, w_ref, bias, 1e-5, 1.3, 0.2)
    for ours, theirs in zip(grads, _grads(expected, dy, x_ref, w_ref)):
        torch.testing.assert_close(ours, theirs)


def test_warm_up_relaxes_linearly_over_num_batches_tracked() -> None:
    module = BatchRenorm(4, momentum=0.3, rmax=3.0, dmax=5.0, warmup_steps=4).double()
    assert module.limits() == (1.0, 0.0)
    for step in range(7):
        fraction = min(1.0, step / 4)
        rmax, dmax = 1 + 2 * fraction, 5 * fraction
        assert module.limits() == pytest.approx((rmax, dmax))
        x = torch.randn(6, 4, dtype=torch.float64) * (0.2 + step) + 3 * step  # far from the running stats
        before_mean, before_var = module.running_mean.clone(), module.running_var.clone()
        expected, mu, unbiased = reference(x, before_mean, before_var, None, None, 1e-5, rmax, dmax)
        torch.testing.assert_close(module(x), expected)
        torch.testing.assert_close(module.running_mean, 0.7 * before_mean + 0.3 * mu)
        torch.testing.assert_close(module.running_var, 0.7 * before_var + 0.3 * unbiased)
        assert int(module.num_batches_tracked) == step + 1


def test_eval_uses_the_running_statistics(torch_batch_norm) -> None:
    module = BatchRenorm(5, axis=-1, warmup_steps=0).double()
    for _ in range(3):
        module(torch.randn(4, 7, 5, dtype=torch.float64) * 3 + 1)
    module.eval()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    expected = torch_batch_norm(
        x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.1, 1e-5, -1
    )
    torch.testing.assert_close(module(x), expected)


def test_state_dicts_move_to_and_from_torch_batch_norm() -> None:
    theirs = nn.BatchNorm2d(3).double()
    for _ in range(3):
        theirs(torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1)
    ours = BatchRenorm(3).double()
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.train()
    ours(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    back = nn.BatchNorm2d(3).double()
    back.load_state_dict(ours.state_dict())
    ours.eval()
    back.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), back(x))
    assert int(back.num_batches_tracked) == 4
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert bn.is_batch_norm(ours)


def test_float32_close_to_the_float64_reference() -> None:
    x = _input((32, 8, 6, 6), dtype=torch.float32)
    weight, bias, running_mean, running_var = _params(8, torch.float32)
    y = batch_renorm(x, running_mean.clone(), running_var.clone(), weight, bias, True, rmax=1.2, dmax=0.3)
    expected, _, _ = reference(x, running_mean, running_var, weight, bias, 1e-5, 1.2, 0.3)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_argument_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(bn.BatchNormArgumentError, match="rmax >= 1"):
        BatchRenorm(3, rmax=0.5)
    with pytest.raises(bn.BatchNormArgumentError, match="dmax >= 0"):
        BatchRenorm(3, dmax=-1.0)
    with pytest.raises(bn.BatchNormArgumentError, match="warmup_steps"):
        BatchRenorm(3, warmup_steps=-1)
    with pytest.raises(bn.BatchNormArgumentError, match="rmax"):
        batch_renorm(x, None, None, training=True, rmax=True)  # type: ignore[arg-type]
    with pytest.raises(bn.BatchNormArgumentError, match="needs running_mean and running_var"):
        batch_renorm(x, None, None, training=True)
    with pytest.raises(bn.BatchNormArgumentError, match="more than 1 value per feature"):
        batch_renorm(x[:1], torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises(bn.BatchNormArgumentError, match="expected shape"):
        batch_renorm(x, torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(bn.BatchNormArgumentError, match="nonfinite"):
        batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, nonfinite="ignore")  # type: ignore[arg-type]


def test_a_nonfinite_batch_leaves_the_running_statistics() -> None:
    module = BatchRenorm(3)
    x = torch.randn(4, 3)
    x[0, 1] = float("nan")
    with pytest.raises(bn.NonfiniteBatchError):
        module(x)
    torch.testing.assert_close(module.running_mean, torch.zeros(3))
    assert int(module.num_batches_tracked) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype: torch.dtype) -> None:
    x = (torch.randn(16, 4, 3, 3) * 2 + 1).to(dtype)
    module = BatchRenorm(4, rmax=1.2, dmax=0.6, warmup_steps=0).to(dtype)
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 4)
    expected, _, _ = reference(x, module.running_mean, module.running_var, None, None, 1e-5, 1.2, 0.6)
    y = module(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


def test_an_empty_batch_is_counted_as_by_torch() -> None:
    module, theirs = BatchRenorm(3), nn.BatchNorm1d(3)
    x = torch.randn(0, 3, 2)
    assert module(x).shape == theirs(x).shape == (0, 3, 2)
    assert int(module.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    torch.testing.assert_close(module.running_var, theirs.running_var)
