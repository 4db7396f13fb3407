r"""The batch-norm op for PyTorch, with any feature axis.

:func:`batch_norm` takes the same arguments and has the same semantics as
:func:`torch.nn.functional.batch_norm`, plus ``axis`` (the feature axis), and
returns the same numbers (float64 agrees to rounding). The arithmetic is
dispatched by :func:`batchnorm.kernels.plan`: our kernels run inside a
:class:`torch.autograd.Function` whose gradient is our own closed form
(derived in :mod:`batchnorm.reference`); where PyTorch's kernels are fastest
(small and feature-last inputs, eval mode), PyTorch's op runs and is
differentiated by PyTorch. Either way the op is twice differentiable.

Conventions (PyTorch's):

* ``momentum`` is the weight of the *new* batch,
  ``running = (1 - momentum) * running + momentum * batch``;
  ``momentum=None`` is a cumulative average, ``1 / num_batches_tracked``.
* The output is normalized with the *biased* batch variance; ``running_var``
  receives the *unbiased* one, ``var * m / (m - 1)``.

What this op adds to PyTorch's:

* a training batch whose statistics are NaN or infinite raises
  ``ValueError`` *before* any running statistic changes (``nonfinite="raise"``,
  the default), or leaves them untouched (``nonfinite="skip"``); PyTorch's op
  writes the NaN into the buffers;
* float16 and bfloat16 inputs accumulate in float32 and return their own
  dtype; the variance is always computed stably.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.kernels import native
from batchnorm._shapes import canonical_axis

__all__ = ["batch_norm", "NonfiniteBatchError", "NONFINITE_POLICIES"]

NonfinitePolicy = Literal["raise", "skip"]
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip")


class NonfiniteBatchError(ValueError):
    """A training batch produced NaN or infinite statistics; running statistics were left unchanged."""


class _InputDtypeError(ValueError, TypeError):
    """A non-floating input: a ``ValueError`` as documented, and a ``TypeError`` for callers expecting one."""


def _check_vector(name: str, value: Tensor | None, num_features: int, axis: int) -> None:
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise ValueError(f"expected {name} to be a tensor or None, got {type(value).__name__}")
    if value.dim() != 1 or value.numel() != num_features:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but the input has {num_features} features "
            f"along axis {axis}: expected shape ({num_features},)"
        )


def check_arguments(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    axis: int,
) -> int:
    """Validate the arguments of :func:`batch_norm`; return the canonical feature axis.

    Raises:
        ValueError: with a message naming what was expected and what was received.
    """
    if not isinstance(input, Tensor):
        raise ValueError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise _InputDtypeError(
            f"expected a floating-point input (float16, bfloat16, float32 or float64), got dtype {input.dtype}"
        )
    ndim = input.dim()
    # The common case inline (an int axis in range); canonical_axis words the errors.
    feature = axis % ndim if type(axis) is int and ndim >= 1 and -ndim <= axis < ndim else canonical_axis(ndim, axis)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"expected eps > 0, got {eps}")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"expected momentum in [0, 1] or None, got {momentum}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("expected running_mean and running_var to be both tensors or both None")
    num_features = input.shape[feature]
    # One expression for the common case; the loop below words the error.
    shape = (num_features,)
    if not (
        (running_mean is None or (isinstance(running_mean, Tensor) and running_mean.shape == shape))
        and (running_var is None or (isinstance(running_var, Tensor) and running_var.shape == shape))
        and (weight is None or (isinstance(weight, Tensor) and weight.shape == shape))
        and (bias is None or (isinstance(bias, Tensor) and bias.shape == shape))
    ):
        for name, value in (
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("weight", weight),
            ("bias", bias),
        ):
            _check_vector(name, value, num_features, feature)
    if training:
        values = input.numel() // max(num_features, 1)
        if values <= 1:
            raise ValueError(
                f"expected more than 1 value per feature when training, got input of shape "
                f"{tuple(input.shape)} (feature axis {feature}) with {values} value(s) per feature"
            )
    elif running_mean is None:
        raise ValueError("expected running_mean and running_var when training=False, got None")
    return feature


class _TrainingBatchNorm(torch.autograd.Function):
    """Training-mode BN on a ``(B, C, S)`` view: forward with batch statistics, closed-form backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        chosen: kernels.Plan,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, inv_std = kernels.train_forward(x, weight, bias, eps, chosen)
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.eps = eps
        ctx.plan = chosen
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_output: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, mean, inv_std = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: the statistics must be functions of x in the
            # graph for the second derivative, so recompute them differentiably
            # and use the composite backward, which autograd can differentiate.
            acc = kernels.accumulation_dtype(x.dtype)
            var, mean = torch.var_mean(x.to(acc), dim=(0, 2), correction=0)
            inv_std = torch.rsqrt(var + ctx.eps)
            grad_input, grad_weight, grad_bias = kernels.backward(grad_output, x, mean, inv_std, weight, need_input)
        else:
            grad_input, grad_weight, grad_bias = kernels.train_backward(
                grad_output, x, mean, inv_std, weight, ctx.eps, need_input, ctx.plan
            )
        return (
            grad_input,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None,
            None,
            None,
        )


_OFFSET_PLAN = kernels.Plan("eager", "torch", "feature-last", "offset data: our forward, PyTorch's backward")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _training(
    input: Tensor, feature: int, weight: Tensor | None, bias: Tensor | None, eps: float, chosen: kernels.Plan
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Training forward on any layout: ``(y, mean, var, values per statistic)``, with the kernels ``chosen``.

    Where the plan is PyTorch's kernels both ways, PyTorch's differentiable op
    runs directly (its backward and double backward are C++, with no Python
    in between); otherwise :class:`_TrainingBatchNorm` runs our kernels.
    """
    if chosen.forward == "torch" and chosen.backward == "torch":
        result = kernels.torch_training(input, feature, weight, bias, eps, check_offset=not chosen.forced)
        if result is not None:
            return (*result, input.numel() // input.shape[feature])
        chosen = kernels.Plan("eager", "torch", chosen.layout, _OFFSET_PLAN.reason)
    view = kernels.canonical_view(input, feature)
    y, mean, var = _TrainingBatchNorm.apply(view.tensor, weight, bias, eps, chosen)  # type: ignore[no-untyped-call]
    return view.restore(y), mean, var, view.values_per_statistic


_NONFINITE_MESSAGE = (
    "the training batch contains NaN or Inf (its mean or variance is not finite); running "
    "statistics were left unchanged. Pass nonfinite='skip' to ignore such batches."
)


def _finite_statistics(mean: Tensor, var: Tensor) -> bool:
    """Whether every entry of ``mean`` and ``var`` (per-feature vectors) is finite, with one host sync.

    ``dot(mean, var)`` is NaN or infinite whenever an entry is (``inf * 0`` is
    NaN, ``inf - inf`` too), so a finite dot product settles it in one kernel;
    only a non-finite one (an infinity, or an overflow of finite values) needs
    the exact test, ``v - v`` (0 for every finite ``v``, NaN otherwise).
    """
    if (
        mean.dtype == var.dtype
        and mean.dtype in (torch.float32, torch.float64)
        and mean.dim() == var.dim() == 1
        and math.isfinite(float(torch.dot(mean, var)))
    ):
        return True
    return not math.isnan(float((mean - mean).add_(var - var).sum()))


_ONE = torch.tensor(1)


def _increment(counter: Tensor) -> None:
    """``counter += 1`` in place; adding a cached 0-d tensor skips wrapping the Python 1 in a new one."""
    counter.add_(_ONE if counter.dtype == torch.int64 else 1)


def _update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    values_per_statistic: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
) -> bool:
    """In-place moving-average update; return False when a non-finite batch was skipped."""
    if not _finite_statistics(mean, var):
        if nonfinite == "skip":
            return False
        raise NonfiniteBatchError(_NONFINITE_MESSAGE)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None")
        factor = 1.0 / (int(num_batches_tracked.item()) + 1)
    else:
        factor = float(momentum)
    m = values_per_statistic
    unbiased = var * (m / (m - 1))
    torch._foreach_lerp_(
        [running_mean, running_var], [mean.to(running_mean.dtype), unbiased.to(running_var.dtype)], factor
    )
    if num_batches_tracked is not None:
        _increment(num_batches_tracked)
    return True


def _native_update_applies(
    input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None
) -> bool:
    """Whether PyTorch's op can update (copies of) these buffers itself: one parameter dtype it accepts."""
    dtype = running_mean.dtype
    if running_var.dtype != dtype or running_mean.requires_grad or running_var.requires_grad:
        return False
    if (weight is not None and weight.dtype != dtype) or (bias is not None and bias.dtype != dtype):
        return False
    return dtype == input.dtype or (dtype == torch.float32 and input.dtype in _HALF_DTYPES)


def _torch_training_tracked(
    input: Tensor,
    feature: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
    check_offset: bool,
) -> tuple[Tensor, bool] | None:
    """Training with PyTorch's op, whose kernel also returns the unbiased variance.

    See :func:`kernels.torch_training_tracked`.

    One host sync decides everything: ``mean * inv_std + (var - var)`` is NaN
    or infinite wherever a batch statistic is (``var - var`` is NaN for an
    infinite or NaN variance, whose ``inv_std`` is 0 or NaN), and otherwise
    is the offset measure of :func:`kernels.torch_training`; one ``aminmax``
    reads both. Only then are the buffers blended (one ``lerp`` for both)
    and the counter incremented. Returns ``None`` for offset data
    (``check_offset``), with nothing written, for the caller to take our forward.
    """
    y, mean, inv_std, batch_mean, unbiased_var = kernels.torch_training_tracked(
        input, feature, weight, bias, eps, running_mean
    )
    low, high = torch.aminmax(torch.addcmul(unbiased_var - unbiased_var, mean, inv_std))
    offset = max(float(high), -float(low))  # NaN in either one means NaN in both (aminmax propagates it)
    return _torch_training_step(
        running_mean,
        running_var,
        momentum,
        num_batches_tracked,
        nonfinite,
        y,
        batch_mean,
        unbiased_var,
        offset,
        check_offset,
    )


def _torch_training_step(
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
    y: Tensor,
    batch_mean: Tensor,
    unbiased_var: Tensor,
    offset: float,
    check_offset: bool,
) -> tuple[Tensor, bool] | None:
    """The decision after :func:`kernels.torch_training_tracked`, given ``offset = max |mean * inv_std + (var - var)|``.

    Non-finite (a NaN or infinite statistic, or an overflow of ``mean * inv_std``):
    the exact test tells them apart; a non-finite batch raises or is skipped
    with nothing written. Above the offset tolerance (with ``check_offset``):
    ``None``, nothing written. Otherwise the buffers are blended and the
    counter incremented.
    """
    if not math.isfinite(offset):
        if not _finite_statistics(batch_mean, unbiased_var):
            batch_mean.zero_()  # the scratch tensors must stay finite
            unbiased_var.zero_()
            if nonfinite == "skip":
                return y, False
            raise NonfiniteBatchError(_NONFINITE_MESSAGE)
        offset = math.inf
    if check_offset and offset > kernels._OFFSET_TOLERANCE:
        return None
    torch._foreach_lerp_((running_mean, running_var), (batch_mean, unbiased_var), momentum)
    if num_batches_tracked is not None:
        _increment(num_batches_tracked)
    return y, True


def _offset_fallback(
    input: Tensor,
    feature: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
) -> tuple[Tensor, bool]:
    """Offset data (``max |mean| / std > 16``): our forward and statistics, PyTorch's backward, then the update."""
    layout = "feature-last" if kernels._is_feature_last(input, feature) else "channels-first"
    chosen = kernels.Plan("eager", "torch", layout, _OFFSET_PLAN.reason)
    y, mean, var, values_per_statistic = _training(input, feature, weight, bias, eps, chosen)
    with torch.no_grad():
        updated = _update_running_stats(
            running_mean, running_var, mean, var, values_per_statistic, momentum, num_batches_tracked, nonfinite
        )
    return y, updated


def _fast_arguments(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    axis: int,
    nonfinite: str,
) -> int | None:
    """The canonical feature axis when the arguments are plainly valid (buffers given); ``None`` for anything else.

    Cheap inline conditions for the fast paths; ``None`` sends the call to
    :func:`check_arguments`, which validates everything and words the errors.
    """
    if not (
        isinstance(input, Tensor)
        and type(axis) is int
        and type(momentum) is float
        and 0.0 <= momentum <= 1.0
        and type(eps) is float
        and eps > 0
        and (nonfinite == "raise" or nonfinite == "skip")
        and input.is_floating_point()
    ):
        return None
    ndim = input.dim()
    if not -ndim <= axis < ndim:
        return None
    feature = axis % ndim
    shape = (input.shape[feature],)
    if not (
        isinstance(running_mean, Tensor)
        and running_mean.shape == shape
        and isinstance(running_var, Tensor)
        and running_var.shape == shape
        and (weight is None or (isinstance(weight, Tensor) and weight.shape == shape))
        and (bias is None or (isinstance(bias, Tensor) and bias.shape == shape))
    ):
        return None
    return feature


def _fast_training(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    axis: int,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
) -> tuple[Tensor, bool] | None:
    """The common training call (valid arguments, PyTorch's op, tracked statistics) with the least Python.

    Every condition is cheap and inline; when one fails (an unusual or an
    invalid argument, another kernel) this returns ``None`` without doing
    anything, and :func:`batch_norm_with_status` takes the general path,
    which validates and words the errors (:func:`check_arguments`). What it
    runs is :func:`_torch_training_tracked`, inline.
    """
    feature = _fast_arguments(input, running_mean, running_var, weight, bias, momentum, eps, axis, nonfinite)
    if (
        feature is None
        or input.numel() // input.shape[feature] <= 1
        or not kernels.torch_training_applies(input, feature)
    ):
        return None
    assert momentum is not None  # _fast_arguments checked it is a float
    # _native_update_applies, inline
    dtype = running_mean.dtype
    if not (
        running_var.dtype == dtype
        and not running_mean.requires_grad
        and not running_var.requires_grad
        and (weight is None or weight.dtype == dtype)
        and (bias is None or bias.dtype == dtype)
        and (dtype == input.dtype or (dtype == torch.float32 and input.dtype in _HALF_DTYPES))
    ):
        return None
    y, mean, inv_std, batch_mean, unbiased_var = kernels.torch_training_tracked(
        input, feature, weight, bias, eps, running_mean
    )
    low, high = torch.aminmax(torch.addcmul(unbiased_var - unbiased_var, mean, inv_std))
    offset = max(float(high), -float(low))
    if offset <= kernels._OFFSET_TOLERANCE:  # False for NaN
        torch._foreach_lerp_((running_mean, running_var), (batch_mean, unbiased_var), momentum)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(_ONE if num_batches_tracked.dtype == torch.int64 else 1)
        return y, True
    # Rare: a non-finite batch, offset data, or both: the general step sorts them out.
    result = _torch_training_step(
        running_mean, running_var, momentum, num_batches_tracked, nonfinite, y, batch_mean, unbiased_var, offset, True
    )
    if result is None:
        return _offset_fallback(
            input, feature, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked, nonfinite
        )
    return result


def _native_applies(input: Tensor, axis: int, eps: float) -> bool:
    """The Python side of the native fast paths' precondition: plain argument types, a CPU input of a dtype the
    library has, ``auto`` in force with debug logging off, no ``torch.compile`` tracing. The operators check the rest.
    """
    return (
        type(axis) is int
        and type(eps) is float
        and isinstance(input, Tensor)
        and input.is_cpu
        and native.code(input.dtype) is not None
        and kernels._auto_unlogged()
        and not torch.compiler.is_compiling()
    )


def _native_training(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    axis: int,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
) -> tuple[Tensor, bool] | None:
    """The common training call on the native operator: one call forward (update included), a C++ backward.

    The operator checks the tensors itself (in C++, see :func:`batchnorm.kernels.native.train`)
    and declines what its kernels do not take as it is; then, and for
    anything unusual here (another kernel setting, debug logging, argument
    types), this returns ``None`` having done nothing, for the general path,
    which validates everything and words the errors.
    """
    if not (
        (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0))
        and (nonfinite == "raise" or nonfinite == "skip")
        and _native_applies(input, axis, eps)
    ):
        return None
    try:
        y, status = native.train(
            input, weight, bias, running_mean, running_var, num_batches_tracked, axis, momentum, eps
        )
    except TypeError:  # an argument of a type the operator's schema refuses
        return None
    if y is None:
        return None
    if status == 1 and nonfinite == "raise":
        raise NonfiniteBatchError(_NONFINITE_MESSAGE)
    return y, status == 0 and running_mean is not None


def _native_inference(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor | None:
    """Eval on the native operator when nothing needs a gradient and it takes the arguments; else ``None``."""
    if not _native_applies(input, axis, eps):
        return None
    try:
        return native.inference(input, running_mean, running_var, weight, bias, axis, eps)
    except TypeError:
        return None


def batch_norm_with_status(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    num_batches_tracked: Tensor | None = None,
    nonfinite: NonfinitePolicy = "raise",
) -> tuple[Tensor, bool]:
    """:func:`batch_norm`, also returning whether running statistics were updated."""
    if training:
        result = _native_training(
            input, running_mean, running_var, weight, bias, momentum, eps, axis, num_batches_tracked, nonfinite
        )
        if result is not None:
            return result
    if training and running_mean is not None and running_var is not None:
        result = _fast_training(
            input, running_mean, running_var, weight, bias, momentum, eps, axis, num_batches_tracked, nonfinite
        )
        if result is not None:
            return result
    elif not training and running_mean is not None and running_var is not None:
        output = _native_inference(input, running_mean, running_var, weight, bias, eps, axis)
        if output is not None:
            return output, False
        feature = _fast_arguments(input, running_mean, running_var, weight, bias, momentum, eps, axis, nonfinite)
        if feature is not None and kernels.torch_inference_applies(input, feature):
            return torch.native_batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps)[0], False
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"expected nonfinite to be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    feature = check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    if not training:
        assert running_mean is not None
        assert running_var is not None
        return _inference(input, feature, running_mean, running_var, weight, bias, eps), False
    chosen = kernels.plan(input, "train", feature)
    if running_mean is None or running_var is None:
        return _training(input, feature, weight, bias, eps, chosen)[0], False
    if (
        chosen.forward == "torch"
        and chosen.backward == "torch"
        and (momentum is not None or num_batches_tracked is not None)
        and _native_update_applies(input, running_mean, running_var, weight, bias)
    ):
        # PyTorch's op computes the new running statistics in its own kernel: the fast path.
        factor = float(momentum) if momentum is not None else 1.0 / (int(num_batches_tracked.item()) + 1)  # type: ignore[union-attr]
        result = _torch_training_tracked(
            input,
            feature,
            running_mean,
            running_var,
            weight,
            bias,
            factor,
            eps,
            num_batches_tracked,
            nonfinite,
            check_offset=not chosen.forced,
        )
        if result is not None:
            return result
        return _offset_fallback(
            input, feature, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked, nonfinite
        )
    y, mean, var, values_per_statistic = _training(input, feature, weight, bias, eps, chosen)
    with torch.no_grad():
        updated = _update_running_stats(
            running_mean,
            running_var,
            mean,
            var,
            values_per_statistic,
            momentum,
            num_batches_tracked,
            nonfinite,
        )
    return y, updated


def _inference(
    input: Tensor,
    feature: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Algorithm 2, ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, via :func:`kernels.plan`."""
    chosen = kernels.plan(input, "eval", feature)
    return kernels.inference(input, feature, running_mean, running_var, weight, bias, eps, chosen)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    num_batches_tracked: Tensor | None = None,
    nonfinite: NonfinitePolicy = "raise",
) -> Tensor:
    r"""Batch normalization over every axis except ``axis``.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training (``training=True``) the mean and biased variance come from the
    batch, pooled over every axis except ``axis``; if running statistics are
    given they are updated in place,
    ``running = (1 - momentum) * running + momentum * batch`` (with the
    unbiased variance). Otherwise the running statistics are used and the op
    is the fixed affine map of Algorithm 2.

    Args:
        input: floating tensor of rank >= 1.
        running_mean, running_var: per-feature buffers, or both None (then
            training must be True).
        weight, bias: optional per-feature ``gamma`` and ``beta``.
        training: use (and update) batch statistics.
        momentum: weight of the new batch in ``[0, 1]``, or None for a
            cumulative average (needs ``num_batches_tracked``).
        eps: added to the variance, > 0.
        axis: the feature axis; ``1`` matches torch's op, ``-1`` suits
            channels-last and ``(N, L, C)`` sequences.
        num_batches_tracked: optional 0-d integer counter, incremented in
            place whenever running statistics are updated.
        nonfinite: ``"raise"`` (default) raises :class:`NonfiniteBatchError`
            when a training batch has NaN/Inf statistics, before any buffer
            changes; ``"skip"`` leaves the buffers (and counter) unchanged.

    Returns:
        a tensor of the input's shape, dtype and memory layout.

    Shape:
        - input: ``(*, C, *)`` with ``C`` features at ``axis``, e.g. ``(N, C)``,
          ``(N, C, L)``, ``(N, C, H, W)``, or ``(N, L, C)`` with ``axis=-1``.
        - running_mean, running_var, weight, bias: ``(C,)``.
        - output: same as input.

    Raises:
        ValueError: bad axis, shape, dtype, ``eps`` or ``momentum``; a single
            value per feature in training; a non-finite training batch.
    """
    output, _ = batch_norm_with_status(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        axis,
        num_batches_tracked=num_batches_tracked,
        nonfinite=nonfinite,
    )
    return output
