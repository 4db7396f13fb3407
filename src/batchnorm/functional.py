r"""The batch-norm op for PyTorch, with any feature axis.

:func:`batch_norm` takes the same arguments and has the same semantics as
:func:`torch.nn.functional.batch_norm`, plus ``axis`` (the feature axis), and
returns the same numbers (float64 agrees to rounding). Every call is
decided once by :func:`batchnorm.kernels.plan` and executed here on one of
three routes, all built from the four primitives of :mod:`batchnorm.kernels`
(``stats``, ``normalize``, ``grad_sums``, ``grad_input``) with one derivation
of the gradient (:mod:`batchnorm.reference`):

* ``fused``: the native CPU operator, forward and running-statistics update
  in one call, backward in one (a C++ autograd node);
* ``function``: one Python autograd node, :class:`BatchNormFunction`, over
  the primitives of the chosen backend;
* ``composite``: the ``torch_ops`` primitives differentiated by PyTorch,
  which is what ``torch.func``, forward-mode AD, ``torch.compile``,
  ``torch.export`` and ``torch.jit.trace`` see.

Every route is twice differentiable and gives the same results and errors
for the same call.

Conventions (PyTorch's):

* ``momentum`` is the weight of the *new* batch,
  ``running = (1 - momentum) * running + momentum * batch``;
  ``momentum=None`` is a cumulative average, ``1 / num_batches_tracked``.
* The output is normalized with the *biased* batch variance; ``running_var``
  receives the *unbiased* one, ``var * m / (m - 1)``.

What this op adds to PyTorch's:

* a training batch whose statistics are NaN or infinite raises
  :class:`NonfiniteBatchError` *before* any running statistic changes
  (``nonfinite="raise"``, the default), or leaves them untouched
  (``nonfinite="skip"``); PyTorch's op writes the NaN into the buffers.
  While traced (``torch.compile``, ``torch.export``, ``torch.jit.trace``),
  under ``torch.func`` transforms, and on CUDA devices (no host
  synchronization), where raising would need the host to read the
  statistics, such a batch is skipped (buffers and counter unchanged, by a
  masked update on the device) without raising; outside tracing it is
  counted on the device and :func:`check_nonfinite` raises for it later;
* float16 and bfloat16 inputs accumulate in float32 and return their own
  dtype; the variance is always computed stably.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from batchnorm import kernels
from batchnorm._shapes import canonical_axis
from batchnorm.kernels import native

__all__ = [
    "NONFINITE_POLICIES",
    "BatchNormArgumentError",
    "BatchNormFunction",
    "NonfiniteBatchError",
    "batch_norm",
    "batch_norm_with_status",
    "check_arguments",
    "check_nonfinite",
]

NonfinitePolicy = Literal["raise", "skip"]
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip")


class BatchNormArgumentError(ValueError, RuntimeError):
    """Invalid arguments (shapes, axis, eps, momentum): a ``ValueError``, and a ``RuntimeError`` as torch raises."""


class _InputDtypeError(BatchNormArgumentError, TypeError):
    """A non-floating input: also a ``TypeError`` for callers expecting one (torch raises ``RuntimeError``)."""


class NonfiniteBatchError(ValueError):
    """A training batch produced NaN or infinite statistics; running statistics were left unchanged."""


_NONFINITE_MESSAGE = (
    "the training batch contains NaN or Inf (its mean or variance is not finite); running "
    "statistics were left unchanged. Pass nonfinite='skip' to ignore such batches."
)


def _check_vector(name: str, value: Tensor | None, num_features: int, axis: int) -> None:
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise BatchNormArgumentError(f"expected {name} to be a tensor or None, got {type(value).__name__}")
    if value.dim() != 1 or value.numel() != num_features:
        raise BatchNormArgumentError(
            f"{name} has shape {tuple(value.shape)} but the input has {num_features} features "
            f"along axis {axis}: expected shape ({num_features},)"
        )
    if not value.is_floating_point():
        raise _InputDtypeError(f"expected {name} to be a floating-point tensor, got dtype {value.dtype}")


def _check_arguments(
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
        BatchNormArgumentError: (a ``ValueError`` and a ``RuntimeError``) with a
            message naming what was expected and what was received.
    """
    if not isinstance(input, Tensor):
        raise BatchNormArgumentError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise _InputDtypeError(
            f"expected a floating-point input (float16, bfloat16, float32 or float64), got dtype {input.dtype}"
        )
    ndim = input.dim()
    try:
        feature = canonical_axis(ndim, axis)
    except ValueError as error:
        raise BatchNormArgumentError(str(error)) from None
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise BatchNormArgumentError(f"expected eps > 0, got {eps}")
    if (
        training
        and momentum is not None
        and not (isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0.0 <= momentum <= 1.0)
    ):  # a momentum outside [0, 1] extrapolates the running statistics (unused in eval, as in torch)
        raise BatchNormArgumentError(f"expected momentum in [0, 1] or None, got {momentum}")
    if (running_mean is None) != (running_var is None):
        raise BatchNormArgumentError("expected running_mean and running_var to be both tensors or both None")
    num_features = input.shape[feature]
    for name, value in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_vector(name, value, num_features, feature)
    if training:
        values = input.numel() // num_features if num_features else 0
        if values == 1:
            raise BatchNormArgumentError(
                f"expected more than 1 value per feature when training, got input of shape "
                f"{tuple(input.shape)} (feature axis {feature}) with {values} value(s) per feature"
            )
    elif running_mean is None:
        raise BatchNormArgumentError("expected running_mean and running_var when training=False, got None")
    return feature


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

    ``momentum`` is checked in training only (eval does not use it, as in torch).

    Raises:
        BatchNormArgumentError: (a ``ValueError`` and a ``RuntimeError``) with a
            message naming what was expected and what was received.
    """
    if torch._C._get_tracing_state() is not None:
        # torch.jit.trace records sizes as tensors; comparing them warns, and the checks only read shapes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit._trace.TracerWarning)
            return _check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    return _check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)


class BatchNormFunction(torch.autograd.Function):
    r"""Training-mode BN as one autograd node over the kernel primitives.

    Forward: ``stats`` then ``normalize``; returns ``(y, mean, var)`` with
    the biased variance (``mean`` and ``var`` carry no gradient). Backward:
    ``grad_sums`` then ``grad_input`` (the derivation is in
    :mod:`batchnorm.reference`): ``dweight = sum(dy * x_hat)``,
    ``dbias = sum(dy)``. With ``create_graph=True`` (or a batched gradient,
    ``is_grads_batched``) the backward runs the ``torch_ops`` primitives with
    the statistics recomputed from ``x``, so autograd differentiates it again.

    Shape:
        - x, y: ``(*, C, *)`` with ``C`` at ``feature``; weight, bias, mean, var: ``(C,)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        feature: int,
        eps: float,
        backend: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        count, mean, m2 = kernels.stats(x, feature, backend=backend)
        var = m2 / count
        invstd = torch.rsqrt(var + eps)
        y = kernels.normalize(x, mean, invstd, weight, bias, feature, backend=backend)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.feature, ctx.eps, ctx.backend, ctx.count = feature, eps, backend, count
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_output: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        feature, count = ctx.feature, ctx.count
        if torch.is_grad_enabled() or kernels._transformed(grad_output):
            # Differentiable: the statistics as functions of x, through the torch_ops primitives.
            compute = kernels._compute(x, ctx.backend)
            _, mean, m2 = kernels.torch_ops.stats(x, feature, compute)
            invstd = torch.rsqrt(m2 / count + ctx.eps)
            sum_dy, sum_dy_xhat = kernels.torch_ops.grad_sums(grad_output, x, mean, invstd, feature, compute)
            grad_input = None
            if need_input:
                grad_input = kernels.torch_ops.grad_input(
                    grad_output, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, feature, compute
                )
        else:
            sum_dy, sum_dy_xhat = kernels.grad_sums(grad_output, x, mean, invstd, feature, backend=ctx.backend)
            grad_input = None
            if need_input:
                grad_input = kernels.grad_input(
                    grad_output, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, feature, backend=ctx.backend
                )
        return (
            grad_input,
            sum_dy_xhat.to(weight.dtype) if need_weight else None,
            sum_dy.to(ctx.bias_dtype) if need_bias else None,
            None,
            None,
            None,
        )


def _finite(mean: Tensor, var: Tensor) -> bool:
    """Whether every entry of the per-feature ``mean`` and ``var`` is finite, with one host sync.

    ``dot(mean, var)`` is NaN or infinite whenever an entry is (``inf * 0`` is
    NaN), so a finite dot product settles it in one kernel; only a non-finite
    one (an infinity, or an overflow of finite values) needs the exact test.
    """
    if mean.dtype == var.dtype and math.isfinite(float(torch.dot(mean, var))):
        return True
    return bool(torch.isfinite(mean).all() and torch.isfinite(var).all())


def _blend(running: Tensor, batch: Tensor, factor: float | Tensor) -> Tensor:
    """``(1 - factor) * running + factor * batch`` in the batch's (accumulation) precision.

    PyTorch's formula: an infinite running statistic stays infinite (``lerp`` would make it NaN).
    """
    return running.to(batch.dtype) * (1 - factor) + batch * factor


def _update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
    host_checks: bool,
) -> bool:
    """Blend the batch mean and *unbiased* variance into the buffers, in place; False when the batch was skipped.

    With ``host_checks`` a non-finite batch raises :class:`NonfiniteBatchError`
    (``nonfinite="raise"``) or is skipped, decided on the host before anything
    is written. Without (traced, transformed, CUDA), the update is masked on
    the device: a non-finite batch leaves buffers and counter as they were and,
    under ``nonfinite="raise"`` and not traced, is counted for
    :func:`check_nonfinite`.
    """
    with torch.no_grad():
        if momentum is None:
            if num_batches_tracked is None:
                raise BatchNormArgumentError("momentum=None (cumulative average) needs num_batches_tracked, got None")
            factor: float | Tensor = 1.0 / (num_batches_tracked.to(mean.dtype) + 1)
        else:
            factor = float(momentum)
        unbiased = var * (count / (count - 1))
        if host_checks:
            if not _finite(mean, var):
                if nonfinite == "skip":
                    return False
                raise NonfiniteBatchError(_NONFINITE_MESSAGE)
            running_mean.copy_(_blend(running_mean, mean, factor))
            running_var.copy_(_blend(running_var, unbiased, factor))
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            return True
        if not kernels._tracing() and kernels._transformed(mean) and not kernels._transformed(running_mean):
            # Under torch.func (grad, jvp): the buffers are captured state, written outside the
            # transform with the plain values (a vmap-batched statistic cannot fit them and raises).
            with temporarily_clear_interpreter_stack():
                return _update_running_stats(
                    running_mean,
                    running_var,
                    _unwrapped(mean),
                    _unwrapped(var),
                    count,
                    momentum,
                    num_batches_tracked,
                    nonfinite,
                    False,
                )
        ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
        countable = ok.device.type != "meta" and not kernels._tracing() and not kernels._transformed(ok)
        if nonfinite == "raise" and countable:
            _count_skipped(ok)
        running_mean.copy_(torch.where(ok, _blend(running_mean, mean, factor), running_mean.to(mean.dtype)))
        running_var.copy_(torch.where(ok, _blend(running_var, unbiased, factor), running_var.to(var.dtype)))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
        return True


#: Per device, the training batches under ``nonfinite="raise"`` whose non-finite statistics were kept out of the
#: running statistics on the device, without a host check (CUDA, torch.func), since the last check_nonfinite().
_skipped_batches: dict[torch.device, Tensor] = {}


def _count_skipped(ok: Tensor) -> None:
    """Add 1 on ``ok``'s device to its count of skipped batches when ``ok`` is False; no host synchronization."""
    counter = _skipped_batches.get(ok.device)
    if counter is None:
        if ok.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # a counter created inside a CUDA-graph capture would be reset by every replay
        counter = _skipped_batches[ok.device] = torch.zeros((), dtype=torch.long, device=ok.device)
    counter.add_(torch.logical_not(ok).to(torch.long))


def check_nonfinite() -> None:
    """Raise :class:`NonfiniteBatchError` if a training batch was skipped as non-finite since the last call.

    On CUDA the op never reads its statistics on the host in the call (that
    would wait for the device): a training batch whose mean or variance is NaN
    or infinite is left out of the running statistics on the device (buffers
    and ``num_batches_tracked`` unchanged) and, under ``nonfinite="raise"``,
    counted there; so are such batches under ``torch.func`` transforms. This
    reads the counts (one synchronization per device that has one), resets
    them, and raises if any was not zero: call it where a synchronization is
    acceptable (after an optimizer step whose loss is read anyway, at
    logging). ``batchnorm train`` calls it after every step. On the CPU,
    outside transforms, such a batch raises in the call itself, so there is
    nothing to report here. Batches under ``nonfinite="skip"`` and while
    traced (``torch.compile``) are not counted.

    Raises:
        NonfiniteBatchError: naming how many batches on which device.
    """
    found = []
    for device, counter in list(_skipped_batches.items()):
        count = int(counter.item())
        if count:
            counter.zero_()
            found.append(f"{count} on {device}")
    if found:
        raise NonfiniteBatchError(
            f"training batches with NaN or Inf statistics were left out of the running statistics "
            f"({', '.join(found)}) since the last check; pass nonfinite='skip' to ignore such batches"
        )


def _unwrapped(t: Tensor) -> Tensor:
    """The plain value under ``torch.func`` wrappers and forward-mode tangents."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t.detach()


def _composite_training(
    input: Tensor, feature: int, weight: Tensor | None, bias: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(y, mean, var, count)`` from the ``torch_ops`` primitives, differentiated by PyTorch itself."""
    compute = kernels._compute(input, backend)
    count, mean, m2 = kernels.torch_ops.stats(input, feature, compute)
    var = m2 / max(count, 1)
    invstd = torch.rsqrt(var + eps)
    y = kernels.torch_ops.normalize(input, mean, invstd, weight, bias, feature, compute)
    return y, mean.detach(), var.detach(), count


def _training(
    chosen: kernels.Plan,
    input: Tensor,
    feature: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
) -> tuple[Tensor, bool]:
    if chosen.route == "function":
        y, mean, var = BatchNormFunction.apply(input, weight, bias, feature, eps, chosen.backend)  # type: ignore[no-untyped-call]
        count = input.numel() // input.shape[feature]
    else:
        y, mean, var, count = _composite_training(input, feature, weight, bias, eps, chosen.backend)
    if running_mean is None or running_var is None:
        return y, False
    if count == 0:  # an empty batch: PyTorch's layers leave the statistics and count the batch
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return y, False
    # host_checks: False while traced or transformed (plan saw the input, and the statistics derive from it).
    updated = _update_running_stats(
        running_mean, running_var, mean, var, count, momentum, num_batches_tracked, nonfinite, chosen.host_checks
    )
    return y, updated


def _inference(
    chosen: kernels.Plan,
    input: Tensor,
    feature: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Algorithm 2: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``."""
    compute = kernels._compute(input, chosen.backend)
    # The running statistics are constants of the map (torch's op has no derivative for them either).
    invstd = torch.rsqrt(running_var.detach().to(compute) + eps)
    return kernels.torch_ops.normalize(input, running_mean.detach(), invstd, weight, bias, feature, compute)


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
    """:func:`batch_norm`, also returning whether the running statistics were updated."""
    if not isinstance(input, Tensor):
        raise BatchNormArgumentError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    chosen = kernels.plan(input, training, weight, bias, axis)
    if chosen.route == "fused":
        # The native operator checks the tensors itself (in C++) and declines what its kernels do not
        # take as they are; the scalars it would read differently are checked here. Declined: the
        # fallback, after the full argument checks below, which word any error.
        if type(eps) is float and type(axis) is int and (nonfinite == "raise" or nonfinite == "skip"):
            if not training:
                if running_mean is None or running_var is None:
                    output = None  # an error, worded by the checks below
                else:
                    try:
                        output = native.inference(input, running_mean, running_var, weight, bias, axis, eps)
                    except TypeError:  # an argument of a type the operator's schema refuses
                        output = None
                if output is not None:
                    return output, False
            elif momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0):
                try:
                    y, status = native.train(
                        input, weight, bias, running_mean, running_var, num_batches_tracked, axis, momentum, eps
                    )
                except TypeError:
                    y = None
                if y is not None:
                    if status == 1 and nonfinite == "raise" and running_mean is not None:
                        raise NonfiniteBatchError(_NONFINITE_MESSAGE)
                    return y, status == 0 and running_mean is not None
        assert chosen.fallback is not None
        chosen = chosen.fallback
    if nonfinite not in NONFINITE_POLICIES:
        raise BatchNormArgumentError(f"expected nonfinite to be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if input.dim() == 1 and input.numel() == 0 and axis in (0, 1, -1):
        return input.clone(), False  # torch's op returns an empty (0,) input as it is, whatever the buffers
    feature = check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    if (
        not chosen.host_checks
        and not kernels._tracing()
        and (kernels._dual(running_mean) or kernels._dual(running_var))
        and (training or kernels._dual(input))
    ):
        raise BatchNormArgumentError(
            "batch_norm is not differentiable with respect to running_mean and running_var: they carry "
            "forward-mode tangents (as in torch's op, only the input, weight and bias may)"
        )
    if training:
        return _training(
            chosen,
            input,
            feature,
            running_mean,
            running_var,
            weight,
            bias,
            momentum,
            float(eps),
            num_batches_tracked,
            nonfinite,
        )
    assert running_mean is not None
    assert running_var is not None
    return _inference(chosen, input, feature, running_mean, running_var, weight, bias, float(eps)), False


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
