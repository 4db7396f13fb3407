r"""Batch renormalization (Ioffe, 2017): training-time outputs corrected towards the running statistics.

With the batch statistics :math:`\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}`
(biased variance) and the running ones :math:`\mu, \sigma = \sqrt{\text{running\_var} + \epsilon}`:

.. math::

    r = \mathrm{clip}\big(\sigma_B / \sigma,\ 1/r_{max},\ r_{max}\big), \qquad
    d = \mathrm{clip}\big((\mu_B - \mu) / \sigma,\ -d_{max},\ d_{max}\big), \\
    y = \gamma\,(\hat x_B\, r + d) + \beta, \qquad \hat x_B = (x - \mu_B) / \sigma_B

``r`` and ``d`` are constants in backprop (stop-gradient) and use the running
statistics *before* this batch updates them. Unclipped, ``y`` is exactly the
eval-mode output, so training and inference agree; with ``r_max = 1,
d_max = 0`` it is plain BN.

Composition of the primitives: forward is ``stats``, then ``r, d``, then
``normalize`` with the effective weight :math:`\gamma r` and bias
:math:`\gamma d + \beta`; backward is BN's (``grad_sums``, ``grad_input``) with
the weight :math:`\gamma r`, and :math:`d\gamma = r \sum dy\,\hat x + d \sum dy`,
:math:`d\beta = \sum dy`.

Buffers: the paper keeps a moving mean and a moving standard deviation. Here
the buffers are torch's, ``running_mean`` and ``running_var`` (the moving
*unbiased variance*, updated exactly like BN's), and
:math:`\sigma = \sqrt{\text{running\_var} + \epsilon}` is the standard
deviation eval mode divides by. So the state dict is a ``BatchNorm*d``'s, its
buffers mean the same thing, and checkpoints move both ways.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.functional import (
    NONFINITE_POLICIES,
    BatchNormArgumentError,
    NonfinitePolicy,
    _update_running_stats,
    batch_norm,
    check_arguments,
)
from batchnorm.nn.batchnorm import BatchNorm

__all__ = ["BatchRenorm", "batch_renorm"]


def _check_limits(rmax: float, dmax: float) -> None:
    if isinstance(rmax, bool) or not isinstance(rmax, (int, float)) or not rmax >= 1:
        raise BatchNormArgumentError(f"expected rmax >= 1 (1 disables the scale correction), got {rmax!r}")
    if isinstance(dmax, bool) or not isinstance(dmax, (int, float)) or not dmax >= 0:
        raise BatchNormArgumentError(f"expected dmax >= 0 (0 disables the shift correction), got {dmax!r}")


def _corrections(
    mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float, rmax: float, dmax: float
) -> tuple[Tensor, Tensor]:
    """``(r, d)`` per feature from the batch's mean and biased variance, detached, in the batch's dtype."""
    with torch.no_grad():
        inv_sigma = torch.rsqrt(running_var.detach().to(mean.dtype) + eps)
        r = (torch.sqrt(var + eps) * inv_sigma).clamp(1.0 / rmax, rmax)
        d = ((mean - running_mean.detach().to(mean.dtype)) * inv_sigma).clamp(-dmax, dmax)
    return r, d


def _effective(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The affine map of ``x_hat_B``: weight ``gamma * r``, bias ``gamma * d + beta`` (gamma 1, beta 0 if absent)."""
    gain = r if weight is None else weight.to(r.dtype) * r
    shift = d if weight is None else weight.to(d.dtype) * d
    return gain, shift if bias is None else shift + bias.to(d.dtype)


class _BatchRenormFunction(torch.autograd.Function):
    """``normalize`` with the effective weight and bias; backward = BN's with weight ``gamma * r``.

    ``mean`` and ``invstd`` are the batch's (functions of ``x``, which ``grad_input`` accounts for); ``r``, ``d``
    are constants.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        r: Tensor,
        d: Tensor,
        feature: int,
        eps: float,
        backend: str,
    ) -> Tensor:
        gain, shift = _effective(weight, bias, r, d)
        ctx.save_for_backward(x, weight, mean, invstd, r, d)
        ctx.feature, ctx.eps, ctx.backend = feature, eps, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return kernels.normalize(x, mean, invstd, gain, shift, feature, backend=backend)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, r, d = ctx.saved_tensors
        feature = ctx.feature
        count = x.numel() // x.shape[feature]
        gain = r if weight is None else weight.to(r.dtype) * r
        if torch.is_grad_enabled() or kernels._transformed(grad_output):
            # Differentiable (double backward): the batch statistics recomputed as functions of x.
            compute = kernels._compute(x, ctx.backend)
            _, mean, m2 = kernels.torch_ops.stats(x, feature, compute)
            invstd = torch.rsqrt(m2 / count + ctx.eps)
            sum_dy, sum_dy_xhat = kernels.torch_ops.grad_sums(grad_output, x, mean, invstd, feature, compute)
            grad_input = kernels.torch_ops.grad_input(
                grad_output, x, mean, invstd, gain, sum_dy, sum_dy_xhat, count, feature, compute
            )
        else:
            sum_dy, sum_dy_xhat = kernels.grad_sums(grad_output, x, mean, invstd, feature, backend=ctx.backend)
            grad_input = None
            if ctx.needs_input_grad[0]:
                grad_input = kernels.grad_input(
                    grad_output, x, mean, invstd, gain, sum_dy, sum_dy_xhat, count, feature, backend=ctx.backend
                )
        need_weight, need_bias = ctx.needs_input_grad[1:3]
        grad_weight = (r * sum_dy_xhat + d * sum_dy).to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def batch_renorm(
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
    rmax: float = 3.0,
    dmax: float = 5.0,
    num_batches_tracked: Tensor | None = None,
    nonfinite: NonfinitePolicy = "raise",
) -> Tensor:
    r"""Batch renormalization: :func:`batchnorm.functional.batch_norm` with the corrections ``r``, ``d``.

    In training, :math:`y = \gamma(\hat x_B r + d) + \beta` (see
    :mod:`batchnorm.nn.renorm`), then the running statistics are updated as
    BN's: ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased batch variance (``momentum=None``: cumulative average). In eval,
    exactly :func:`~batchnorm.functional.batch_norm` with the running statistics.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps,
            axis, num_batches_tracked, nonfinite: as :func:`batchnorm.functional.batch_norm`;
            training needs the running statistics (``r`` and ``d`` compare with them).
        rmax: the clip of ``r`` to ``[1/rmax, rmax]``, ``>= 1``.
        dmax: the clip of ``d`` to ``[-dmax, dmax]``, ``>= 0``.

    Shape:
        - input, output: ``(*, C, *)`` with ``C`` features at ``axis``.
        - running_mean, running_var, weight, bias: ``(C,)``.

    Raises:
        BatchNormArgumentError: bad limits or arguments, or training without running statistics.
    """
    _check_limits(rmax, dmax)
    if not training or (isinstance(input, Tensor) and input.numel() == 0):
        # Eval: the fixed map of the running statistics. Empty: nothing to correct, as BN.
        return batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
            num_batches_tracked=num_batches_tracked, nonfinite=nonfinite,
        )  # fmt: skip
    if nonfinite not in NONFINITE_POLICIES:
        raise BatchNormArgumentError(f"expected nonfinite to be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if running_mean is None or running_var is None:
        raise BatchNormArgumentError(
            "batch renormalization needs running_mean and running_var in training: r and d compare the "
            "batch statistics with them"
        )
    feature = check_arguments(input, running_mean, running_var, weight, bias, True, momentum, eps, axis)
    chosen = kernels.plan(input, True, weight, bias, feature)
    eps = float(eps)
    if chosen.route == "composite":
        # Traced or transformed: the torch_ops primitives, differentiated by PyTorch (r and d detached).
        compute = kernels._compute(input, chosen.backend)
        count, mean, m2 = kernels.torch_ops.stats(input, feature, compute)
        var = m2 / count
        r, d = _corrections(mean.detach(), var.detach(), running_mean, running_var, eps, rmax, dmax)
        gain, shift = _effective(weight, bias, r, d)
        y = kernels.torch_ops.normalize(input, mean, torch.rsqrt(var + eps), gain, shift, feature, compute)
    else:
        with torch.no_grad():
            count, mean, m2 = kernels.stats(input, feature, backend=chosen.backend)
            var = m2 / count
        r, d = _corrections(mean, var, running_mean, running_var, eps, rmax, dmax)
        y = _BatchRenormFunction.apply(  # type: ignore[no-untyped-call]
            input, weight, bias, mean, torch.rsqrt(var + eps), r, d, feature, eps, chosen.backend
        )
    _update_running_stats(
        running_mean,
        running_var,
        mean.detach(),
        var.detach(),
        count,
        momentum,
        num_batches_tracked,
        nonfinite,
        chosen.host_checks,
    )
    result: Tensor = y
    return result


class BatchRenorm(BatchNorm):
    r"""Batch renormalization (Ioffe, 2017): BN whose training outputs are corrected towards the running statistics.

    .. math::

        y = \gamma\,(\hat x_B\, r + d) + \beta, \quad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big)

    with ``r``, ``d`` constants in backprop; :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}`
    (biased), :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`. Eval mode is
    BN's with the running statistics. The buffers are torch's
    (``running_mean``, ``running_var`` = the moving *unbiased variance*,
    ``num_batches_tracked``), updated exactly as BN's with PyTorch's
    ``momentum`` (the weight of the new batch; ``None``: cumulative average),
    so state dicts load into and from ``torch.nn.BatchNorm*d``.

    Warm-up: the limits in force at training step ``t`` (``num_batches_tracked``
    before the batch, i.e. the batches already in the running statistics) are

    .. math::

        f = \min(1, t / \text{warmup\_steps}), \quad
        r_{max}(t) = 1 + (r_{max} - 1) f, \quad d_{max}(t) = d_{max} f

    so training starts as plain BN (``r = 1, d = 0``, exactly) while the
    running statistics settle, and relaxes linearly to the given limits
    (``warmup_steps=0``: the limits from the first step). The paper relaxes over
    thousands of steps at momentum 0.01; the default 1000 suits momentum 0.1.
    :meth:`limits` returns the pair in force.

    Args:
        num_features: ``C``, the size of the feature axis.
        eps, momentum, affine, axis, nonfinite, device, dtype: as :class:`BatchNorm`.
        rmax: the final clip of ``r`` to ``[1/rmax, rmax]``, ``>= 1``. Default: 3.
        dmax: the final clip of ``d`` to ``[-dmax, dmax]``, ``>= 0``. Default: 5.
        warmup_steps: training steps over which the limits relax from BN's. Default: 1000.

    Shape:
        - Input: ``(*, C, *)`` with ``C`` at ``axis``; Output: same.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 1000,
        axis: int = 1,
        nonfinite: NonfinitePolicy = "raise",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _check_limits(rmax, dmax)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise BatchNormArgumentError(f"expected warmup_steps to be an integer >= 0, got {warmup_steps!r}")
        super().__init__(num_features, eps, momentum, affine, True, axis, nonfinite, device=device, dtype=dtype)
        self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), warmup_steps

    def limits(self) -> tuple[float, float]:
        """``(rmax, dmax)`` in force for the next training batch (see the warm-up above)."""
        steps = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        fraction = 1.0 if steps >= self.warmup_steps else steps / self.warmup_steps
        return 1.0 + (self.rmax - 1.0) * fraction, self.dmax * fraction

    def forward(self, input: Tensor) -> Tensor:
        """Renormalized batch statistics in training, the running statistics in eval."""
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        rmax, dmax = self.limits()
        return batch_renorm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            True,
            self.momentum,
            self.eps,
            self.axis,
            rmax=rmax,
            dmax=dmax,
            num_batches_tracked=self.num_batches_tracked,
            nonfinite=self.nonfinite,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr().replace(", track_running_stats=True", "")
        return text + f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"
