"""``batchnorm.functional.batch_norm`` against ``torch.nn.functional.batch_norm`` and float64 arithmetic.

Conventions checked here (and stated in the op's docstring): momentum is the
weight of the new batch, ``momentum=None`` is a cumulative average, outputs
use the biased batch variance and ``running_var`` receives the unbiased one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import product

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import batchnorm as bn
from batchnorm.functional import batch_norm

TorchBatchNorm = Callable[..., torch.Tensor]  # the `torch_batch_norm` fixture of conftest.py

F64 = torch.float64
# float64 agrees with torch to rounding (largest difference seen: 1.4e-14); this leaves a wide margin.
FLOAT64_TOLERANCE = {"rtol": 1e-12, "atol": 1e-12}

SHAPES = {2: (8, 3), 3: (4, 3, 5), 4: (3, 3, 4, 2), 5: (2, 3, 2, 3, 2)}


def _leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A fresh copy that records gradients, so that ours and torch's never share a tensor."""
    return None if tensor is None else tensor.detach().clone().requires_grad_()


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def _grad(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.grad


def _case_id(rank: int, axis: int, training: bool, affine: bool, track: bool) -> str:
    mode = "train" if training else "eval"
    return f"rank{rank}-axis{axis}-{mode}-{'affine' if affine else 'noaffine'}-{'stats' if track else 'nostats'}"


# Eval mode needs running statistics, in torch's op as in ours.
TORCH_CASES = [
    pytest.param(rank, axis, training, affine, track, id=_case_id(rank, axis, training, affine, track))
    for rank, axis, training, affine, track in product(SHAPES, (1, -1), (True, False), (True, False), (True, False))
    if training or track
]


@pytest.mark.parametrize(("rank", "axis", "training", "affine", "track"), TORCH_CASES)
def test_matches_torch_float64(
    rank: int, axis: int, training: bool, affine: bool, track: bool, torch_batch_norm: TorchBatchNorm
) -> None:
    """Outputs, running statistics and gradients of input, weight and bias over several steps."""
    shape = SHAPES[rank]
    num_features = shape[axis]
    weight = torch.randn(num_features, dtype=F64) if affine else None
    bias = torch.randn(num_features, dtype=F64) if affine else None
    ours_mean = torch.randn(num_features, dtype=F64) if track else None
    ours_var = torch.rand(num_features, dtype=F64) + 0.5 if track else None
    torch_mean, torch_var = _copy(ours_mean), _copy(ours_var)

    for step in range(3):
        x = torch.randn(shape, dtype=F64) * (1.0 + step) + step
        grad_output = torch.randn(shape, dtype=F64)
        ours_inputs = [_leaf(x), _leaf(weight), _leaf(bias)]
        torch_inputs = [_leaf(x), _leaf(weight), _leaf(bias)]

        ours = batch_norm(ours_inputs[0], ours_mean, ours_var, *ours_inputs[1:], training, 0.1, 1e-5, axis)
        expected = torch_batch_norm(
            torch_inputs[0], torch_mean, torch_var, *torch_inputs[1:], training, 0.1, 1e-5, axis
        )
        ours.backward(grad_output)
        expected.backward(grad_output)

        torch.testing.assert_close(ours, expected, **FLOAT64_TOLERANCE)
        for ours_tensor, torch_tensor in zip(ours_inputs, torch_inputs):
            torch.testing.assert_close(_grad(ours_tensor), _grad(torch_tensor), **FLOAT64_TOLERANCE)
        if track:
            torch.testing.assert_close(ours_mean, torch_mean, **FLOAT64_TOLERANCE)
            torch.testing.assert_close(ours_var, torch_var, **FLOAT64_TOLERANCE)


@pytest.mark.parametrize(("rank", "axis"), [pytest.param(r, a, id=f"rank{r}-axis{a}") for r in SHAPES for a in (1, -1)])
def test_matches_torch_on_device(rank: int, axis: int, device: torch.device, torch_batch_norm: TorchBatchNorm) -> None:
    """A shorter version of the comparison above that also runs on CUDA when present."""
    shape = SHAPES[rank]
    num_features = shape[axis]
    weight, bias = (
        torch.randn(num_features, dtype=F64, device=device),
        torch.randn(num_features, dtype=F64, device=device),
    )
    ours_stats = [
        torch.zeros(num_features, dtype=F64, device=device),
        torch.ones(num_features, dtype=F64, device=device),
    ]
    torch_stats = [t.clone() for t in ours_stats]
    for training in (True, True, False):
        x = torch.randn(shape, dtype=F64, device=device) * 2 + 1
        ours_inputs, torch_inputs = [_leaf(x), _leaf(weight), _leaf(bias)], [_leaf(x), _leaf(weight), _leaf(bias)]
        ours = batch_norm(ours_inputs[0], *ours_stats, *ours_inputs[1:], training, 0.1, 1e-5, axis)
        expected = torch_batch_norm(torch_inputs[0], *torch_stats, *torch_inputs[1:], training, 0.1, 1e-5, axis)
        grad_output = torch.randn_like(x)
        ours.backward(grad_output)
        expected.backward(grad_output)
        torch.testing.assert_close(ours, expected, **FLOAT64_TOLERANCE)
        torch.testing.assert_close(
            [_grad(t) for t in ours_inputs], [_grad(t) for t in torch_inputs], **FLOAT64_TOLERANCE
        )
        torch.testing.assert_close(ours_stats, torch_stats, **FLOAT64_TOLERANCE)


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0], ids=lambda m: f"momentum={m}")
def test_momentum_is_the_weight_of_the_new_batch(momentum: float, torch_batch_norm: TorchBatchNorm) -> None:
    ours_mean, ours_var = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
    torch_mean, torch_var = ours_mean.clone(), ours_var.clone()
    for step in range(3):
        x = torch.randn(6, 4, 3, dtype=F64) + step
        batch_norm(x, ours_mean, ours_var, training=True, momentum=momentum)
        torch_batch_norm(x, torch_mean, torch_var, training=True, momentum=momentum)
    torch.testing.assert_close(ours_mean, torch_mean, **FLOAT64_TOLERANCE)
    torch.testing.assert_close(ours_var, torch_var, **FLOAT64_TOLERANCE)
    if momentum == 0.0:
        torch.testing.assert_close(ours_mean, torch.zeros(4, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("axis", [1, -1], ids=lambda a: f"axis{a}")
@pytest.mark.parametrize("momentum", [None, 0.1], ids=lambda m: f"momentum={m}")
def test_num_batches_tracked_and_cumulative_average_match_torch_module(axis: int, momentum: float | None) -> None:
    """``momentum=None`` averages all batches so far, driven by ``num_batches_tracked``, like torch's module."""
    torch_module = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=F64)
    running_mean, running_var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    tracked = torch.tensor(0)
    for step in range(5):
        x = torch.randn(4, 3, 2, 5, dtype=F64) * (step + 1) - step
        torch_module(x)
        ours_input = x if axis == 1 else x.movedim(1, -1).contiguous()
        batch_norm(
            ours_input, running_mean, running_var, None, None, True, momentum, axis=axis, num_batches_tracked=tracked
        )
        torch.testing.assert_close(running_mean, torch_module.running_mean, **FLOAT64_TOLERANCE)
        torch.testing.assert_close(running_var, torch_module.running_var, **FLOAT64_TOLERANCE)
        assert tracked.item() == torch_module.num_batches_tracked.item() == step + 1


def test_cumulative_average_is_the_mean_of_unbiased_batch_statistics() -> None:
    running_mean, running_var = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    tracked = torch.tensor(0)
    batches = [torch.randn(5, 2, dtype=F64) * (i + 1) + i for i in range(4)]
    for x in batches:
        batch_norm(x, running_mean, running_var, training=True, momentum=None, num_batches_tracked=tracked)
    expected_mean = torch.stack([x.mean(0) for x in batches]).mean(0)
    expected_var = torch.stack([x.var(0, correction=1) for x in batches]).mean(0)
    torch.testing.assert_close(running_mean, expected_mean, **FLOAT64_TOLERANCE)
    torch.testing.assert_close(running_var, expected_var, **FLOAT64_TOLERANCE)


# --- layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "memory_format",
    [torch.channels_last, torch.contiguous_format],
    ids=["channels_last", "contiguous"],
)
def test_memory_format_is_kept_and_values_match_torch(
    memory_format: torch.memory_format, training: bool, device: torch.device, torch_batch_norm: TorchBatchNorm
) -> None:
    x = torch.randn(3, 4, 5, 2, dtype=F64, device=device).to(memory_format=memory_format)
    weight, bias = torch.randn(4, dtype=F64, device=device), torch.randn(4, dtype=F64, device=device)
    ours_stats = [torch.randn(4, dtype=F64, device=device), torch.rand(4, dtype=F64, device=device) + 0.5]
    torch_stats = [t.clone() for t in ours_stats]
    ours_x, torch_x = _leaf(x), _leaf(x)

    ours = batch_norm(ours_x, *ours_stats, weight, bias, training)
    expected = torch_batch_norm(torch_x, *torch_stats, weight, bias, training)

    assert ours.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(ours, expected, **FLOAT64_TOLERANCE)
    grad_output = torch.randn_like(x)
    ours.backward(grad_output)
    expected.backward(grad_output)
    torch.testing.assert_close(ours_x.grad, torch_x.grad, **FLOAT64_TOLERANCE)
    torch.testing.assert_close(ours_stats, torch_stats, **FLOAT64_TOLERANCE)


def test_channels_last_3d_is_kept(torch_batch_norm: TorchBatchNorm) -> None:
    x = torch.randn(2, 3, 2, 3, 4, dtype=F64).to(memory_format=torch.channels_last_3d)
    ours = batch_norm(x, None, None, training=True)
    assert ours.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(ours, torch_batch_norm(x, None, None, training=True), **FLOAT64_TOLERANCE)


@pytest.mark.parametrize(
    "make_view",
    [
        pytest.param(lambda x: x[:, :, ::2], id="strided"),
        pytest.param(lambda x: x.transpose(0, 2), id="transposed"),
        pytest.param(lambda x: x[:1].expand(4, -1, -1), id="broadcast"),
    ],
)
def test_non_contiguous_inputs(
    make_view: Callable[[torch.Tensor], torch.Tensor], torch_batch_norm: TorchBatchNorm
) -> None:
    x = make_view(torch.randn(5, 3, 6, dtype=F64))
    assert not x.is_contiguous()
    ours_x, torch_x = x.detach().requires_grad_(), x.detach().clone().requires_grad_()
    ours = batch_norm(ours_x, None, None, training=True)
    expected = torch_batch_norm(torch_x, None, None, training=True)
    torch.testing.assert_close(ours, expected, **FLOAT64_TOLERANCE)
    grad_output = torch.randn_like(expected)
    ours.backward(grad_output)
    expected.backward(grad_output)
    torch.testing.assert_close(ours_x.grad, torch_x.grad, **FLOAT64_TOLERANCE)


def test_sequence_with_last_axis_equals_torch_on_transposed_input() -> None:
    """``(N, L, C)`` with ``axis=-1``: ``N*L`` values per channel, as ``BatchNorm1d`` on ``(N, C, L)``."""
    x = torch.randn(4, 7, 5, dtype=F64)
    ours = batch_norm(x, None, None, training=True, axis=-1)
    expected = torch.nn.functional.batch_norm(x.transpose(1, 2), None, None, training=True).transpose(1, 2)
    torch.testing.assert_close(ours, expected, **FLOAT64_TOLERANCE)


# --- gradcheck ------------------------------------------------------------------------


GRADCHECK_CASES = [
    pytest.param(
        shape, axis, with_weight, id=f"{'x'.join(map(str, shape))}-axis{axis}-{'weight' if with_weight else 'noweight'}"
    )
    for shape, axis, with_weight in product([(4, 3), (3, 2, 4)], (1, -1), (True, False))
]


def _gradcheck_inputs(shape: tuple[int, ...], axis: int, with_weight: bool) -> tuple[torch.Tensor, ...]:
    num_features = shape[axis]
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    if not with_weight:
        return (x,)
    weight = torch.randn(num_features, dtype=F64, requires_grad=True)
    bias = torch.randn(num_features, dtype=F64, requires_grad=True)
    return x, weight, bias


@pytest.mark.parametrize(("shape", "axis", "with_weight"), GRADCHECK_CASES)
def test_gradcheck_and_gradgradcheck_training(shape: tuple[int, ...], axis: int, with_weight: bool) -> None:
    inputs = _gradcheck_inputs(shape, axis, with_weight)

    def op(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        return batch_norm(x, None, None, weight, bias, training=True, eps=1e-3, axis=axis)

    assert torch.autograd.gradcheck(op, inputs)
    assert torch.autograd.gradgradcheck(op, inputs)


@pytest.mark.parametrize(("shape", "axis", "with_weight"), GRADCHECK_CASES)
def test_gradcheck_and_gradgradcheck_eval(shape: tuple[int, ...], axis: int, with_weight: bool) -> None:
    inputs = _gradcheck_inputs(shape, axis, with_weight)
    running_mean = torch.randn(shape[axis], dtype=F64)
    running_var = torch.rand(shape[axis], dtype=F64) + 0.5

    def op(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        return batch_norm(x, running_mean, running_var, weight, bias, training=False, axis=axis)

    assert torch.autograd.gradcheck(op, inputs)
    assert torch.autograd.gradgradcheck(op, inputs)


def test_gradcheck_with_running_stats_being_updated() -> None:
    """Updating buffers in place during training must not disturb the gradient."""
    x = torch.randn(5, 3, 2, dtype=F64, requires_grad=True)
    weight = torch.randn(3, dtype=F64, requires_grad=True)
    running_mean, running_var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)

    def op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return batch_norm(x, running_mean, running_var, weight, None, training=True)

    assert torch.autograd.gradcheck(op, (x, weight))


def test_only_parameter_gradients_when_input_needs_none(torch_batch_norm: TorchBatchNorm) -> None:
    x = torch.randn(6, 3, 2, dtype=F64)
    ours_weight, torch_weight = _leaf(torch.randn(3, dtype=F64)), _leaf(torch.randn(3, dtype=F64))
    torch_weight.data.copy_(ours_weight.data)
    batch_norm(x, None, None, ours_weight, None, training=True).pow(2).sum().backward()
    torch_batch_norm(x, None, None, torch_weight, None, training=True).pow(2).sum().backward()
    torch.testing.assert_close(ours_weight.grad, torch_weight.grad, **FLOAT64_TOLERANCE)


# --- hypothesis properties ------------------------------------------------------------


@st.composite
def batches_and_axis(draw: st.DrawFn, max_rank: int = 4) -> tuple[np.ndarray, int]:
    """A float64 batch of rank 2..``max_rank`` (sides 1..4) and a feature axis with >= 2 values per feature."""
    rank = draw(st.integers(2, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    assume(math.prod(shape) // shape[axis] >= 2)
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    return draw(arrays(np.float64, shape, elements=elements)), axis


def _per_feature(values: torch.Tensor, axis: int) -> torch.Tensor:
    """``(C, m)``: the ``m`` values of each feature's statistic."""
    return values.movedim(axis, 0).reshape(values.shape[axis], -1)


def _well_spread(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Features whose variance is large against their magnitude (eps and rounding then do not matter)."""
    values = _per_feature(x, axis)
    variance = values.var(dim=1, correction=0)
    magnitude = values.abs().amax(dim=1).clamp(min=1.0)
    return variance > 1e-4 * magnitude**2


# Properties are cheap (tiny tensors): more examples than the profile's default.
PROPERTY_SETTINGS = settings(max_examples=100)


@PROPERTY_SETTINGS
@given(batches_and_axis(), st.booleans())
def test_property_shape_and_dtype_are_kept(batch: tuple[np.ndarray, int], training: bool) -> None:
    array, axis = batch
    x = torch.from_numpy(array)
    num_features = x.shape[axis]
    stats = [torch.zeros(num_features, dtype=F64), torch.ones(num_features, dtype=F64)]
    y = batch_norm(x, *stats, training=training, axis=axis)
    assert y.shape == x.shape
    assert y.dtype == x.dtype


@PROPERTY_SETTINGS
@given(batches_and_axis())
def test_property_training_output_has_mean_zero_and_variance_one(batch: tuple[np.ndarray, int]) -> None:
    """Without affine parameters, each well-spread feature is standardized; near-constant ones stay finite."""
    array, axis = batch
    x = torch.from_numpy(array)
    y = batch_norm(x, None, None, training=True, eps=1e-12, axis=axis)
    assert torch.isfinite(y).all()
    spread = _well_spread(x, axis)
    if not spread.any():
        return
    values = _per_feature(y, axis)[spread]
    torch.testing.assert_close(values.mean(dim=1), torch.zeros(len(values), dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(values.var(dim=1, correction=0), torch.ones(len(values), dtype=F64), rtol=0, atol=1e-6)


@PROPERTY_SETTINGS
@given(
    batches_and_axis(),
    st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4),
    st.lists(st.floats(-100.0, 100.0), min_size=4, max_size=4),
)
def test_property_invariant_to_per_feature_shift_and_positive_scale(
    batch: tuple[np.ndarray, int], scales: list[float], shifts: list[float]
) -> None:
    array, axis = batch
    x = torch.from_numpy(array)
    num_features = x.shape[axis]
    view_shape = [1] * x.dim()
    view_shape[axis] = num_features
    scale = torch.tensor(scales[:num_features], dtype=F64).view(view_shape)
    shift = torch.tensor(shifts[:num_features], dtype=F64).view(view_shape)
    weight = torch.linspace(-2.0, 2.0, num_features, dtype=F64)
    bias = torch.linspace(1.0, -1.0, num_features, dtype=F64)

    # Invariance is exact only as eps -> 0 (eps/var enters to first order), so eps is negligible here.
    y = batch_norm(x, None, None, weight, bias, training=True, eps=1e-200, axis=axis)
    y_moved = batch_norm(x * scale + shift, None, None, weight, bias, training=True, eps=1e-200, axis=axis)

    spread = _well_spread(x, axis)
    torch.testing.assert_close(_per_feature(y_moved, axis)[spread], _per_feature(y, axis)[spread], rtol=0, atol=1e-6)


@PROPERTY_SETTINGS
@given(batches_and_axis())
def test_property_eval_mode_is_affine_in_x(batch: tuple[np.ndarray, int]) -> None:
    """In eval mode ``y = f(0) + x * (f(1) - f(0))`` per feature, whatever else is in the batch."""
    array, axis = batch
    x = torch.from_numpy(array)
    num_features = x.shape[axis]
    generator = torch.Generator().manual_seed(num_features)
    stats = [
        torch.randn(num_features, dtype=F64, generator=generator),
        torch.rand(num_features, dtype=F64, generator=generator) + 0.1,
    ]
    weight = torch.randn(num_features, dtype=F64, generator=generator)
    bias = torch.randn(num_features, dtype=F64, generator=generator)

    def f(values: torch.Tensor) -> torch.Tensor:
        return batch_norm(values, *stats, weight, bias, training=False, axis=axis)

    at_zero = f(torch.zeros_like(x))
    slope = f(torch.ones_like(x)) - at_zero
    torch.testing.assert_close(f(x), at_zero + x * slope, rtol=1e-12, atol=1e-9)
    # The output of one example does not depend on the rest of the batch.
    if axis % x.dim() != 0:
        torch.testing.assert_close(f(x.narrow(0, 0, 1)), f(x).narrow(0, 0, 1), rtol=1e-12, atol=1e-12)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        pytest.param((1, 3), 1, id="dense-one-example"),
        pytest.param((1, 3, 1, 1), 1, id="image-one-pixel"),
        pytest.param((1, 1, 3), -1, id="sequence-one-step"),
    ],
)
def test_one_value_per_feature_in_training_is_rejected(shape: tuple[int, ...], axis: int) -> None:
    x = torch.randn(shape)
    with pytest.raises(
        ValueError, match=r"expected more than 1 value per feature when training, got input of shape .* 1 value"
    ):
        batch_norm(x, None, None, training=True, axis=axis)
    # Eval mode uses the running statistics and is fine with a single example.
    assert batch_norm(x, torch.zeros(3), torch.ones(3), training=False, axis=axis).shape == shape


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_feature_size_mismatch_names_both_sizes(name: str) -> None:
    arguments: dict[str, torch.Tensor | None] = {
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
    }
    arguments[name] = torch.ones(5)
    with pytest.raises(ValueError, match=rf"{name} has shape \(5,\) but the input has 3 features along axis 1"):
        batch_norm(torch.randn(4, 3, 2), training=True, **arguments)


@pytest.mark.parametrize("axis", [4, -5, 10])
def test_axis_out_of_range(axis: int) -> None:
    with pytest.raises(ValueError, match=rf"feature axis {axis} is out of range for a 4-D input \(expected an axis"):
        batch_norm(torch.randn(2, 3, 2, 2), None, None, training=True, axis=axis)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_eps_must_be_positive(eps: float) -> None:
    with pytest.raises(ValueError, match=r"expected eps > 0, got"):
        batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_momentum_must_be_in_unit_interval(momentum: float) -> None:
    with pytest.raises(ValueError, match=r"expected momentum in \[0, 1\] or None, got"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=momentum)


@pytest.mark.parametrize(
    "x",
    [
        pytest.param(torch.arange(12).view(4, 3), id="int64"),
        pytest.param(torch.arange(12, dtype=torch.int32).view(4, 3), id="int32"),
        pytest.param(torch.ones(4, 3, dtype=torch.bool), id="bool"),
    ],
)
def test_integer_and_bool_inputs_are_rejected(x: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=rf"expected a floating-point input .*got dtype {x.dtype}"):
        batch_norm(x, None, None, training=True)


def test_other_argument_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"expected running_mean and running_var when training=False, got None"):
        batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"both tensors or both None"):
        batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match=r"momentum=None .* needs num_batches_tracked"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)
    with pytest.raises(ValueError, match=r"expected nonfinite to be one of \('raise', 'skip'\), got 'ignore'"):
        batch_norm(x, None, None, training=True, nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected input to be a torch.Tensor, got ndarray"):
        batch_norm(np.ones((4, 3)), None, None, training=True)  # type: ignore[arg-type]


# --- non-finite batches ---------------------------------------------------------------


def _poisoned_batch(bad_value: float) -> torch.Tensor:
    x = torch.randn(6, 3, 4)
    x[2, 1, 3] = bad_value  # only feature 1 is affected
    return x


BAD_VALUES = [
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("inf"), id="inf"),
    pytest.param(-float("inf"), id="-inf"),
]


@pytest.mark.parametrize("bad_value", BAD_VALUES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
def test_nonfinite_batch_raises_and_leaves_buffers_bit_identical(
    bad_value: float, momentum: float | None, device: torch.device
) -> None:
    running_mean, running_var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    tracked = torch.tensor(7, device=device)
    before = [running_mean.clone(), running_var.clone(), tracked.clone()]
    with pytest.raises(ValueError, match=r"training batch contains NaN or Inf.*left unchanged"):
        batch_norm(
            _poisoned_batch(bad_value).to(device),
            running_mean,
            running_var,
            None,
            None,
            True,
            momentum,
            num_batches_tracked=tracked,
        )
    for after, original in zip([running_mean, running_var, tracked], before):
        assert torch.equal(after, original)


@pytest.mark.parametrize("bad_value", BAD_VALUES)
def test_nonfinite_batch_is_skipped_on_request(bad_value: float, torch_batch_norm: TorchBatchNorm) -> None:
    running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
    tracked = torch.tensor(7)
    before = [running_mean.clone(), running_var.clone(), tracked.clone()]
    x = _poisoned_batch(bad_value)

    y = batch_norm(x, running_mean, running_var, None, None, True, num_batches_tracked=tracked, nonfinite="skip")

    for after, original in zip([running_mean, running_var, tracked], before):
        assert torch.equal(after, original)
    assert y.shape == x.shape
    # The clean features are normalized as usual.
    expected = torch_batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y[:, [0, 2]], expected[:, [0, 2]])
    # A clean batch afterwards updates the buffers and the counter again.
    batch_norm(torch.randn(6, 3, 4), running_mean, running_var, None, None, True, num_batches_tracked=tracked)
    assert tracked.item() == 8
    assert not torch.equal(running_mean, before[0])


# --- half precision -------------------------------------------------------------------

HALF_DTYPES = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_is_correctly_rounded(
    dtype: torch.dtype, training: bool, device: torch.device, torch_batch_norm: TorchBatchNorm
) -> None:
    """Output in the input dtype, within one rounding of a float64 computation on the same (rounded) values.

    Tolerance: half a unit in the last place of the output dtype (``finfo.eps / 2``,
    relative) plus 1e-5 for the float32 accumulation before the final rounding.
    """
    x = (torch.randn(16, 4, 3, 3, device=device) * 3 + 2).to(dtype)
    weight, bias = torch.randn(4, device=device), torch.randn(4, device=device)
    running_mean, running_var = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    grad_output = torch.randn(x.shape, device=device).to(dtype)
    x_half = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    stats64 = [running_mean.double(), running_var.double()]

    y = batch_norm(x_half, running_mean, running_var, weight, bias, training)
    y.backward(grad_output)

    expected = torch_batch_norm(x64, *stats64, weight.double(), bias.double(), training)
    expected.backward(grad_output.double())

    assert y.dtype == dtype
    assert x_half.grad is not None
    assert x_half.grad.dtype == dtype
    unit_roundoff = torch.finfo(dtype).eps / 2
    error = (y.double() - expected).abs()
    assert (error <= (unit_roundoff + 1e-5) * expected.abs() + 1e-5).all(), error.max().item()
    grad_error = (x_half.grad.double() - x64.grad).abs()
    grad_scale = x64.grad.abs().max()
    assert (grad_error <= unit_roundoff * x64.grad.abs() + 1e-4 * grad_scale).all(), grad_error.max().item()
    if training:
        # Running statistics stay in their own (float32) dtype.
        assert running_mean.dtype == running_var.dtype == torch.float32
        torch.testing.assert_close(running_mean.double(), stats64[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(running_var.double(), stats64[1], rtol=1e-5, atol=1e-6)


# --- numerical stability --------------------------------------------------------------


def test_offset_data_is_at_least_as_accurate_as_torch() -> None:
    """float32 data with mean 1e4 and std 0.05: ``E[x^2] - E[x]^2`` loses everything, a stable variance does not.

    The error is measured on the normalized output against float64 arithmetic on
    the same float32 values. Rounding the float32 mean alone costs up to
    ``ulp(1e4) / 2 / 0.05 ~ 0.01``; torch's op is at about 0.015 here.
    """
    generator = torch.Generator().manual_seed(1234)
    x = 1e4 + 0.05 * torch.randn(64, 16, 8, 8, generator=generator)
    exact = torch.nn.functional.batch_norm(x.double(), None, None, training=True)

    ours_error = (batch_norm(x, None, None, training=True).double() - exact).abs().max().item()
    torch_error = (torch.nn.functional.batch_norm(x, None, None, training=True).double() - exact).abs().max().item()

    dims = (0, 2, 3)
    naive_mean = x.mean(dim=dims, keepdim=True)
    naive_var = ((x * x).mean(dim=dims, keepdim=True) - naive_mean * naive_mean).clamp(min=0)  # in float32
    naive = (x - naive_mean) / torch.sqrt(naive_var + 1e-5)
    naive_error = (naive.double() - exact).abs().max().item()

    assert ours_error <= torch_error
    assert ours_error < 0.02
    assert naive_error > 100 * ours_error  # the check above can fail: the naive formula does


@pytest.mark.parametrize("offset", [0.0, 0.1, 1e4], ids=lambda o: f"offset={o}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_constant_feature_gives_zeros_and_finite_gradients(offset: float, dtype: torch.dtype) -> None:
    x = torch.randn(8, 3, 5, dtype=dtype)
    x[:, 1] = offset
    weight = torch.randn(3, dtype=dtype, requires_grad=True)
    x.requires_grad_()
    y = batch_norm(x, torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype), weight, None, training=True)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1], torch.zeros_like(y[:, 1]), rtol=0, atol=1e-6)
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(weight.grad).all()


def test_package_exports_the_error_type() -> None:
    assert issubclass(bn.NonfiniteBatchError, ValueError)


# --- the training fast path (PyTorch's op computing the running-statistics update) ----------


def _clean_batches(count: int, shape: tuple[int, ...] = (16, 4)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=generator) * 2 + 0.5 for _ in range(count)]


@pytest.mark.parametrize("bad_value", BAD_VALUES)
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_module_fast_path_nonfinite_batch_then_clean_batches_match_torch(bad_value: float, nonfinite: str) -> None:
    """A poisoned batch between clean ones changes nothing; the clean ones update exactly as torch's layer does."""
    ours, theirs = bn.BatchNorm1d(4, nonfinite=nonfinite), torch.nn.BatchNorm1d(4)
    first, second = _clean_batches(2)
    ours(first)
    theirs(first)
    before = [ours.running_mean.clone(), ours.running_var.clone(), ours.num_batches_tracked.clone()]
    poisoned = second.clone()
    poisoned[3, 2] = bad_value
    if nonfinite == "raise":
        with pytest.raises(bn.NonfiniteBatchError, match=r"NaN or Inf.*left unchanged"):
            ours(poisoned)
    else:
        y = ours(poisoned)
        torch.testing.assert_close(y[:, [0, 1, 3]], theirs(second.clone())[:, [0, 1, 3]].detach())
        theirs.running_mean.copy_(before[0])  # undo torch's update of that extra call
        theirs.running_var.copy_(before[1])
        theirs.num_batches_tracked.copy_(before[2])
    for after, original in zip([ours.running_mean, ours.running_var, ours.num_batches_tracked], before):
        assert torch.equal(after, original)
    # The next clean batch (same feature count: the same scratch statistics) updates normally.
    torch.testing.assert_close(ours(second), theirs(second))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-7)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 2


def test_an_overflowing_variance_is_a_nonfinite_batch() -> None:
    """Finite float32 values whose variance overflows (inv_std is 0, the mean is finite) are caught too."""
    x = torch.randn(8, 3)
    x[:, 1] = torch.tensor([1e20, -1e20] * 4)
    module = bn.BatchNorm1d(3)
    before = [t.clone() for t in module.buffers()]
    with pytest.raises(bn.NonfiniteBatchError):
        module(x)
    for after, original in zip(module.buffers(), before):
        assert torch.equal(after, original)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, running_mean, running_var, None, None, True, nonfinite="skip")
    assert torch.equal(running_mean, torch.zeros(3))
    assert torch.equal(running_var, torch.ones(3))
    assert torch.isfinite(y[:, [0, 2]]).all()


@pytest.mark.parametrize(
    ("module", "x", "message"),
    [
        pytest.param(lambda: bn.BatchNorm1d(4), torch.randn(8, 5), r"has shape \(4,\) but the input has 5", id="size"),
        pytest.param(lambda: bn.BatchNorm1d(4), torch.randn(8, 4, 2, 2), r"expected 2D or 3D input", id="rank"),
        pytest.param(lambda: bn.BatchNorm(4, axis=-1), torch.randn(8, 4, 3), r"input has 3 features", id="axis"),
        pytest.param(lambda: bn.BatchNorm1d(4), torch.randn(1, 4), r"more than 1 value per feature", id="one-value"),
        pytest.param(lambda: bn.BatchNorm1d(4), torch.ones(8, 4, dtype=torch.long), r"floating-point", id="dtype"),
    ],
)
def test_module_fast_path_keeps_the_argument_errors(
    module: Callable[[], torch.nn.Module], x: torch.Tensor, message: str
) -> None:
    layer = module()
    before = [t.clone() for t in layer.buffers()]
    with pytest.raises(ValueError, match=message):
        layer(x)
    for after, original in zip(layer.buffers(), before):
        assert torch.equal(after, original)


def test_offset_data_with_running_statistics_takes_our_formula() -> None:
    """The fast path checks ``max |mean| / std`` too: dense float32 data at 1e4 with std 0.05, buffers given."""
    generator = torch.Generator().manual_seed(99)
    x = 1e4 + 0.05 * torch.randn(256, 16, generator=generator)
    exact = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    running_mean, running_var = torch.zeros(16), torch.ones(16)
    ours = batch_norm(x, running_mean, running_var, None, None, True, 0.5)
    theirs = torch.nn.functional.batch_norm(x, torch.zeros(16), torch.ones(16), None, None, True, 0.5)
    assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()
    torch.testing.assert_close(running_mean.double(), 0.5 * x.double().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(running_var.double(), 0.5 + 0.5 * x.double().var(0), rtol=1e-3, atol=0)


def test_layers_of_one_width_share_scratch_statistics_safely() -> None:
    """Several layers (and calls) of one width before one backward: outputs, gradients, buffers as torch's."""
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(12, 5, generator=generator) * (i + 1) + i for i in range(3)]
    results = []
    for make in (torch.nn.BatchNorm1d, bn.BatchNorm1d):
        first, second = make(5), make(5)
        leaves = [x.clone().requires_grad_() for x in inputs]
        outputs = [first(leaves[0]), second(leaves[1]), first(leaves[2])]
        sum((y**3).sum() for y in outputs).backward()  # type: ignore[union-attr]
        results.append([*outputs, *(x.grad for x in leaves), first.running_mean, first.running_var])
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_batch_skipped_without_a_host_check_is_reported_by_check_nonfinite() -> None:
    """Without host checks (CUDA, torch.func) a NaN batch leaves the buffers as they were and is counted on the
    device; check_nonfinite() reads the count once, raises, and resets it. Here on the CPU through torch.func.grad,
    whose plan has no host checks, as a CUDA plan has none."""
    from batchnorm.functional import NonfiniteBatchError, check_nonfinite

    check_nonfinite()  # nothing pending
    layer = bn.BatchNorm1d(3)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    params = {name: p.detach() for name, p in layer.named_parameters()}
    buffers = dict(layer.named_buffers())

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, (params, buffers), (x,)).sum()

    torch.func.grad(loss)(params, x)
    assert torch.equal(layer.running_mean, before[0])
    assert torch.equal(layer.running_var, before[1])
    assert layer.num_batches_tracked.item() == 0
    with pytest.raises(NonfiniteBatchError, match="1 on cpu"):
        check_nonfinite()
    check_nonfinite()  # reset: nothing to report any more
    # a finite batch under a transform is not counted; nonfinite="skip" is not counted either
    torch.func.grad(loss)(params, torch.randn(8, 3))
    skipping = bn.BatchNorm1d(3, nonfinite="skip")
    torch.func.grad(lambda p, x: torch.func.functional_call(skipping, (p, dict(skipping.named_buffers())), (x,)).sum())(
        {n: p.detach() for n, p in skipping.named_parameters()}, x
    )
    check_nonfinite()
