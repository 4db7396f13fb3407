"""The NumPy reference against torch's op, central finite differences and hand-written float64 formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference

# One small shape per rank; the feature axis has a size no other axis shares
# so that a mix-up of axes changes shapes and fails loudly.
SHAPES = {2: (6, 3), 3: (4, 3, 5), 4: (3, 3, 2, 4), 5: (2, 3, 2, 2, 3)}
# Smaller shapes for the finite-difference checks (two forward passes per element).
SMALL_SHAPES = {2: (5, 3), 3: (3, 2, 4), 4: (2, 3, 2, 2), 5: (2, 2, 2, 1, 3)}
AXES = [0, 1, -1]

RANK_AXIS = [pytest.param(rank, axis, id=f"rank{rank}-axis{axis}") for rank in SHAPES for axis in AXES]


def _random(shape: tuple[int, ...], seed: int = 0, loc: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


def _torch_forward(
    x: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float, axis: int
) -> torch.Tensor:
    """torch's training-mode op on ``x`` with the feature axis moved to 1 (float64)."""
    moved = torch.from_numpy(x).movedim(axis, 1)
    weight = None if gamma is None else torch.from_numpy(gamma)
    bias = None if beta is None else torch.from_numpy(beta)
    return torch.nn.functional.batch_norm(moved, None, None, weight, bias, training=True, eps=eps).movedim(1, axis)


def _per_feature_values(x: np.ndarray, axis: int) -> list[np.ndarray]:
    """The values that feed each feature's statistic, one flat array per feature."""
    return [np.take(x, c, axis=axis).ravel() for c in range(x.shape[axis])]


# --- forward (Algorithm 1) -------------------------------------------------------------


@pytest.mark.parametrize(("rank", "axis"), RANK_AXIS)
def test_forward_matches_torch(rank: int, axis: int) -> None:
    x = _random(SHAPES[rank], seed=1, loc=3.0, scale=2.0)
    num_features = x.shape[axis]
    gamma = _random((num_features,), seed=2)
    beta = _random((num_features,), seed=3)

    y, cache = reference.batch_norm_forward(x, gamma, beta, eps=1e-3, axis=axis)

    expected = _torch_forward(x, gamma, beta, 1e-3, axis).numpy()
    assert y.shape == x.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    # The cache holds the per-feature mean and *biased* variance.
    moved = torch.from_numpy(x).movedim(axis, 1)
    dims = [d for d in range(rank) if d != 1]
    var, mean = torch.var_mean(moved, dim=dims, correction=0)
    np.testing.assert_allclose(cache.mean, mean.numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(cache.var, var.numpy(), rtol=1e-13, atol=1e-13)
    assert cache.values_per_statistic == x.size // num_features


def test_forward_defaults_are_no_affine() -> None:
    x = _random((7, 4), seed=4)
    y, _ = reference.batch_norm_forward(x)
    expected = _torch_forward(x, None, None, 1e-5, 1).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_forward_stats_by_hand() -> None:
    """Mean and biased variance of one feature written out as sums over its ``N*H*W`` values."""
    x = _random((3, 2, 4, 5), seed=5, loc=-1.0, scale=0.5)
    _, cache = reference.batch_norm_forward(x, axis=1)
    for c, values in enumerate(_per_feature_values(x, 1)):
        m = values.size
        assert m == 3 * 4 * 5
        mean = sum(values) / m
        var = sum((v - mean) ** 2 for v in values) / m
        assert cache.mean[c] == pytest.approx(mean, rel=1e-13)
        assert cache.var[c] == pytest.approx(var, rel=1e-12)


# --- backward -------------------------------------------------------------------------


def _central_differences(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dy: np.ndarray, axis: int, step: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` by central differences, one element at a time."""

    def loss(x_: np.ndarray, gamma_: np.ndarray, beta_: np.ndarray) -> float:
        y, _ = reference.batch_norm_forward(x_, gamma_, beta_, eps=1e-3, axis=axis)
        return float(np.sum(dy * y))

    grads = []
    arguments = [x, gamma, beta]
    for index, argument in enumerate(arguments):
        grad = np.zeros_like(argument)
        for position in np.ndindex(argument.shape):
            plus = [a.copy() for a in arguments]
            minus = [a.copy() for a in arguments]
            plus[index][position] += step
            minus[index][position] -= step
            grad[position] = (loss(*plus) - loss(*minus)) / (2 * step)
        grads.append(grad)
    return grads[0], grads[1], grads[2]


@pytest.mark.parametrize(
    ("rank", "axis"), [pytest.param(rank, axis, id=f"rank{rank}-axis{axis}") for rank in SMALL_SHAPES for axis in AXES]
)
def test_backward_matches_central_differences(rank: int, axis: int) -> None:
    x = _random(SMALL_SHAPES[rank], seed=6, loc=1.0, scale=1.5)
    num_features = x.shape[axis]
    gamma = _random((num_features,), seed=7)
    beta = _random((num_features,), seed=8)
    dy = _random(x.shape, seed=9)

    _, cache = reference.batch_norm_forward(x, gamma, beta, eps=1e-3, axis=axis)
    dx, dgamma, dbeta = reference.batch_norm_backward(dy, cache)

    numeric_dx, numeric_dgamma, numeric_dbeta = _central_differences(x, gamma, beta, dy, axis)
    np.testing.assert_allclose(dx, numeric_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, numeric_dgamma, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbeta, numeric_dbeta, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("rank", "axis"), RANK_AXIS)
def test_backward_closed_form_matches_stepwise(rank: int, axis: int) -> None:
    """The closed form against the paper's chain of intermediate derivatives."""
    x = _random(SHAPES[rank], seed=10, loc=-2.0, scale=3.0)
    gamma = _random((x.shape[axis],), seed=11)
    dy = _random(x.shape, seed=12)
    _, cache = reference.batch_norm_forward(x, gamma, None, axis=axis)

    closed = reference.batch_norm_backward(dy, cache)
    stepwise = reference.batch_norm_backward_stepwise(dy, cache)

    for closed_grad, stepwise_grad in zip(closed, stepwise):
        assert closed_grad.shape == stepwise_grad.shape
        np.testing.assert_allclose(closed_grad, stepwise_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("rank", "axis"), RANK_AXIS)
def test_backward_matches_torch_autograd(rank: int, axis: int) -> None:
    x = _random(SHAPES[rank], seed=13, loc=0.5)
    gamma = _random((x.shape[axis],), seed=14)
    beta = _random((x.shape[axis],), seed=15)
    dy = _random(x.shape, seed=16)
    _, cache = reference.batch_norm_forward(x, gamma, beta, eps=1e-5, axis=axis)
    dx, dgamma, dbeta = reference.batch_norm_backward(dy, cache)

    x_t = torch.from_numpy(x).requires_grad_()
    gamma_t = torch.from_numpy(gamma).requires_grad_()
    beta_t = torch.from_numpy(beta).requires_grad_()
    y_t = torch.nn.functional.batch_norm(x_t.movedim(axis, 1), None, None, gamma_t, beta_t, training=True)
    y_t.movedim(1, axis).backward(torch.from_numpy(dy))

    np.testing.assert_allclose(dx, x_t.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, gamma_t.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, beta_t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_backward_gradient_is_orthogonal_to_shift_and_scale() -> None:
    """``dx`` sums to 0 per feature and is orthogonal to ``x_hat`` (the docstring's claim).

    Orthogonality to ``x_hat`` is exact only as ``eps -> 0`` (with ``eps > 0``,
    ``sum(x_hat**2) = m * var / (var + eps)``), hence the tiny eps.
    """
    x = _random((9, 4, 3), seed=17, loc=5.0)
    dy = _random(x.shape, seed=18)
    _, cache = reference.batch_norm_forward(x, _random((4,), seed=19), axis=1, eps=1e-14)
    dx, _, _ = reference.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(dx.sum(axis=(0, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose((dx * cache.x_hat).sum(axis=(0, 2)), 0.0, atol=1e-12)


# --- inference (Algorithm 2) ----------------------------------------------------------


@pytest.mark.parametrize(("rank", "axis"), RANK_AXIS)
def test_inference_is_the_affine_map_and_matches_torch_eval(rank: int, axis: int) -> None:
    x = _random(SHAPES[rank], seed=19, scale=2.0)
    num_features = x.shape[axis]
    gamma = _random((num_features,), seed=20)
    beta = _random((num_features,), seed=21)
    mean = _random((num_features,), seed=22)
    var = np.abs(_random((num_features,), seed=23)) + 0.1
    eps = 1e-3

    y = reference.batch_norm_inference(x, gamma, beta, mean, var, eps=eps, axis=axis)

    shape = [1] * rank
    shape[axis] = num_features
    scale = gamma / np.sqrt(var + eps)
    affine = x * scale.reshape(shape) + (beta - scale * mean).reshape(shape)
    np.testing.assert_allclose(y, affine, rtol=1e-13, atol=1e-13)

    torch_eval = torch.nn.functional.batch_norm(
        torch.from_numpy(x).movedim(axis, 1),
        torch.from_numpy(mean),
        torch.from_numpy(var),
        torch.from_numpy(gamma),
        torch.from_numpy(beta),
        training=False,
        eps=eps,
    ).movedim(1, axis)
    np.testing.assert_allclose(y, torch_eval.numpy(), rtol=1e-12, atol=1e-12)


def test_inference_with_batch_statistics_equals_training_forward() -> None:
    x = _random((5, 3, 4), seed=24, loc=2.0)
    gamma = _random((3,), seed=25)
    beta = _random((3,), seed=26)
    y_train, cache = reference.batch_norm_forward(x, gamma, beta, axis=1)
    y_infer = reference.batch_norm_inference(x, gamma, beta, cache.mean, cache.var, axis=1)
    np.testing.assert_allclose(y_infer, y_train, rtol=1e-12, atol=1e-12)


def test_inference_affine_by_hand() -> None:
    scale, shift = reference.inference_affine([2.0, -1.0], [0.5, 0.0], [1.0, 3.0], [3.0, 0.0], eps=1.0)
    np.testing.assert_allclose(scale, [2.0 / 2.0, -1.0 / 1.0])
    np.testing.assert_allclose(shift, [0.5 - 1.0 * 1.0, 0.0 - (-1.0) * 3.0])


def test_inference_defaults_gamma_one_beta_zero() -> None:
    x = _random((4, 2), seed=27)
    y = reference.batch_norm_inference(x, None, None, [1.0, -1.0], [4.0, 0.25], eps=1e-12)
    np.testing.assert_allclose(y, (x - [1.0, -1.0]) / np.sqrt([4.0, 0.25]), rtol=1e-10)


# --- running statistics ---------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.0, 1.0, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize(
    ("torch_class", "shape"),
    [
        pytest.param(torch.nn.BatchNorm1d, (8, 3), id="dense"),
        pytest.param(torch.nn.BatchNorm1d, (4, 3, 5), id="sequence"),
        pytest.param(torch.nn.BatchNorm2d, (2, 3, 3, 2), id="image"),
    ],
)
def test_update_running_stats_matches_torch_module(
    torch_class: type[torch.nn.Module], shape: tuple[int, ...], momentum: float | None
) -> None:
    torch_module = torch_class(shape[1], momentum=momentum, dtype=torch.float64)
    running_mean = np.zeros(shape[1])
    running_var = np.ones(shape[1])
    tracked = 0
    for step in range(4):
        x = _random(shape, seed=100 + step, loc=step - 1.0, scale=1.0 + step)
        torch_module(torch.from_numpy(x))
        axes = tuple(d for d in range(len(shape)) if d != 1)
        running_mean, running_var, tracked = reference.update_running_stats(
            running_mean,
            running_var,
            x.mean(axis=axes),
            x.var(axis=axes),
            x.size // shape[1],
            momentum=momentum,
            num_batches_tracked=tracked,
        )
        np.testing.assert_allclose(running_mean, torch_module.running_mean.numpy(), rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(running_var, torch_module.running_var.numpy(), rtol=1e-13, atol=1e-14)
        assert tracked == int(torch_module.num_batches_tracked) == step + 1


def test_update_running_stats_by_hand() -> None:
    """One step written out: new = 0.9 * old + 0.1 * batch, with the unbiased variance ``var * m/(m-1)``."""
    mean, var, count = reference.update_running_stats([1.0], [2.0], [3.0], [4.0], values_per_statistic=5)
    assert mean[0] == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    assert var[0] == pytest.approx(0.9 * 2.0 + 0.1 * 4.0 * 5 / 4)
    assert count == 1
    # momentum=None after 3 batches: the 4th enters with weight 1/4.
    mean, _, count = reference.update_running_stats([2.0], [1.0], [6.0], [1.0], 5, momentum=None, num_batches_tracked=3)
    assert mean[0] == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)
    assert count == 4


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        pytest.param((6, 3), 1, id="dense"),
        pytest.param((2, 3, 4, 2), 1, id="image"),
        pytest.param((3, 5, 2), -1, id="sequence-axis-1"),
        pytest.param((4, 2, 3), 0, id="axis0"),
    ],
)
def test_population_statistics_by_hand(shape: tuple[int, ...], axis: int) -> None:
    """E[x] = mean of batch means; Var[x] = m/(m-1) * mean of biased batch variances (Algorithm 2, step 10)."""
    batches = [_random(shape, seed=200 + i, loc=i, scale=1.0 + 0.5 * i) for i in range(5)]
    mean, var = reference.population_statistics(batches, axis=axis)

    num_features = shape[axis]
    m = int(np.prod(shape)) // num_features
    expected_mean = np.zeros(num_features)
    expected_var = np.zeros(num_features)
    for c in range(num_features):
        batch_means, batch_vars = [], []
        for batch in batches:
            values = _per_feature_values(batch, axis)[c]
            batch_mean = sum(values) / m
            batch_means.append(batch_mean)
            batch_vars.append(sum((v - batch_mean) ** 2 for v in values) / m)
        expected_mean[c] = sum(batch_means) / len(batches)
        expected_var[c] = m / (m - 1) * sum(batch_vars) / len(batches)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, expected_var, rtol=1e-12)


# --- bad input ------------------------------------------------------------------------


def test_reference_rejects_bad_input() -> None:
    x = _random((4, 3), seed=300)
    with pytest.raises(ValueError, match=r"expected eps > 0, got 0"):
        reference.batch_norm_forward(x, eps=0.0)
    with pytest.raises(ValueError, match=r"expected more than 1 value per feature when training.*\(1, 3\)"):
        reference.batch_norm_forward(x[:1])
    with pytest.raises(ValueError, match=r"feature axis 2 is out of range for a 2-D input"):
        reference.batch_norm_forward(x, axis=2)
    with pytest.raises(ValueError, match=r"expected gamma of shape \(3,\), got shape \(4,\)"):
        reference.batch_norm_forward(x, gamma=np.ones(4))
    with pytest.raises(ValueError, match=r"floating-point array for x, got dtype int64"):
        reference.batch_norm_forward(np.arange(12, dtype=np.int64).reshape(4, 3))
    with pytest.raises(ValueError, match=r"expected dy of shape \(4, 3\), got shape \(3, 4\)"):
        reference.batch_norm_backward(np.ones((3, 4)), reference.batch_norm_forward(x)[1])
    with pytest.raises(ValueError, match=r"expected momentum in \[0, 1\] or None, got 1.5"):
        reference.update_running_stats([0.0], [1.0], [0.0], [1.0], 4, momentum=1.5)
    with pytest.raises(ValueError, match=r"expected every batch to have 8 values per statistic, got one with 4"):
        reference.population_statistics([np.ones((8, 2)), np.ones((4, 2))])
    with pytest.raises(ValueError, match=r"expected at least one batch"):
        reference.population_statistics([])
