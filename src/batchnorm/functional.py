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
    feature = canonical_axis(input.dim(), axis)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"expected eps > 0, got {eps}")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"expected momentum in [0, 1] or None, got {momentum}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("expected running_mean and running_var to be both tensors or both None")
    num_features = input.shape[feature]
    for name, value in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_vector(name, value, num_features, feature)
    if not training and running_mean is None:
        raise ValueError("expected running_mean and running_var when training=False, got None")
    if training:
        values = input.numel() // max(num_features, 1)
        if values <= 1:
            raise ValueError(
                f"expected more than 1 value per feature when training, got input of shape "
                f"{tuple(input.shape)} (feature axis {feature}) with {values} value(s) per feature"
            )
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
            grad_bias.to(grad_output.dtype if weight is None else weight.dtype) if need_bias else None,
            None,
            None,
        )


def _training(
    input: Tensor, feature: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Training forward on any layout: ``(y, mean, var, values per statistic)``, dispatched by :func:`kernels.plan`.

    Where the plan is PyTorch's kernels both ways, PyTorch's differentiable op
    runs directly (its backward and double backward are C++, with no Python
    in between); otherwise :class:`_TrainingBatchNorm` runs our kernels.
    """
    chosen = kernels.plan(input, "train", feature)
    if chosen.forward == "torch" and chosen.backward == "torch":
        result = kernels.torch_training(input, feature, weight, bias, eps, check_offset=not chosen.forced)
        if result is not None:
            return (*result, input.numel() // input.shape[feature])
        chosen = kernels.Plan("eager", "torch", chosen.layout, "offset data: our forward, PyTorch's backward")
    view = kernels.canonical_view(input, feature)
    y, mean, var = _TrainingBatchNorm.apply(view.tensor, weight, bias, eps, chosen)  # type: ignore[no-untyped-call]
    return view.restore(y), mean, var, view.values_per_statistic


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
    # v - v is 0 for every finite v and NaN for an infinity or a NaN, so one
    # sum checks both vectors exactly, with fewer kernels than isfinite().all().
    if math.isnan(float((mean - mean).add_(var).sub_(var).sum())):
        if nonfinite == "skip":
            return False
        raise NonfiniteBatchError(
            "the training batch contains NaN or Inf (its mean or variance is not finite); running "
            "statistics were left unchanged. Pass nonfinite='skip' to ignore such batches."
        )
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, got None")
        factor = 1.0 / (int(num_batches_tracked.item()) + 1)
    else:
        factor = float(momentum)
    m = values_per_statistic
    unbiased = var * (m / (m - 1))
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.to(running_var.dtype), factor)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return True


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
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"expected nonfinite to be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    feature = check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    if training:
        y, mean, var, values_per_statistic = _training(input, feature, weight, bias, eps)
        updated = False
        if running_mean is not None and running_var is not None:
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
    assert running_mean is not None
    assert running_var is not None
    return _inference(input, feature, running_mean, running_var, weight, bias, eps), False


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
