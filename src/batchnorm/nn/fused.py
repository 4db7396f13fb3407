r"""Batch norm fused with its activation, saving half the memory for backward.

``nn.BatchNorm2d`` followed by an activation keeps two full tensors alive for
the backward pass: the BN input ``x`` and the activation's output (or, for
leaky ReLU, its input ``z``). :class:`BatchNormAct` keeps one, and recomputes
the rest in the backward pass (the idea of in-place activated BN, Rota Bulò
et al. 2018):

* invertible activations (leaky ReLU with a positive slope, sigmoid, tanh)
  save only their **output** ``a``. The backward recovers ``z = act^{-1}(a)``
  and the normalized input :math:`\hat x = (z - \beta) / \gamma`, and takes
  :math:`act'(z)` from ``a`` (:math:`a(1-a)` for sigmoid, :math:`1-a^2` for tanh);
* ReLU (not invertible below zero) saves only the **input** ``x`` and
  recomputes :math:`\hat x = (x - \mu)\,s` with the saved per-feature mean
  and inverse standard deviation ``s``.

Given :math:`dz = da \cdot act'(z)` the BN backward is the closed form of
:mod:`batchnorm.reference`:

.. math::

    d\beta = \sum dz, \quad d\gamma = \sum dz\,\hat x, \quad
    dx = \frac{\gamma s}{m}\left(m\,dz - \textstyle\sum dz - \hat x \sum dz\,\hat x\right)

Numerics: recovering :math:`\hat x` from the output divides by :math:`\gamma`,
so the output is saved only while every :math:`|\gamma| \ge 10^{-2}`; otherwise
the input is saved (as for ReLU). A sigmoid or tanh output that rounds to its
limit (``|z|`` above about 17 for sigmoid and 9 for tanh in float32) has
:math:`act'(z) = 0` exactly; its :math:`\hat x` is recovered from the clamped
output, so ``dx`` of such saturated elements is approximate (by less than the
saturation threshold times the projection term). Half-precision inputs
accumulate in float32, as everywhere in this package. Double backward
(``create_graph=True``) raises ``RuntimeError``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from batchnorm import functional, kernels
from batchnorm.kernels.torch_ops import per_feature
from batchnorm.nn.batchnorm import BatchNorm

__all__ = ["ACTIVATIONS", "BatchNormAct", "batch_norm_act"]

Activation = Literal["relu", "leaky_relu", "sigmoid", "tanh"]
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "sigmoid", "tanh")

# Smallest |gamma| for which x_hat = (z - beta) / gamma is recovered from the output.
_MIN_GAIN_FOR_INVERSION = 1e-2


def _activate(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    return torch.tanh(z)


def _derivative_from_output(a: Tensor, activation: str, negative_slope: float) -> Tensor:
    """:math:`act'(z)` written in terms of the output ``a = act(z)``."""
    if activation == "sigmoid":
        return a * (1 - a)
    if activation == "tanh":
        return 1 - a * a
    if activation == "leaky_relu":
        return (a > 0).to(a.dtype) * (1 - negative_slope) + negative_slope
    return (a > 0).to(a.dtype)


def _inverse(a: Tensor, activation: str, negative_slope: float) -> Tensor:
    """``z = act^{-1}(a)``; saturated sigmoid/tanh outputs are clamped just inside their range first."""
    if activation == "leaky_relu":
        return torch.where(a > 0, a, a / negative_slope)
    tiny = torch.finfo(a.dtype).eps
    if activation == "sigmoid":
        clamped = a.clamp(tiny, 1 - tiny)
        return torch.log(clamped) - torch.log1p(-clamped)
    return torch.atanh(a.clamp(-1 + tiny, 1 - tiny))


def _invertible(activation: str, negative_slope: float) -> bool:
    return activation in ("sigmoid", "tanh") or (activation == "leaky_relu" and negative_slope > 0)


class _BatchNormActFunction(torch.autograd.Function):
    """Training-mode ``act(BN(x))`` from the kernel primitives, saving one full tensor (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        feature: int,
        eps: float,
        activation: str,
        negative_slope: float,
        recompute: str,
        backend: str,
        host_checks: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        count, mean, m2 = kernels.stats(x, feature, backend=backend)
        var = m2 / count
        inv_std = torch.rsqrt(var + eps)
        if activation == "leaky_relu":
            a = _activate(
                kernels.normalize(x, mean, inv_std, weight, bias, feature, backend=backend), activation, negative_slope
            )
        else:  # in the normalize kernel where the backend fuses it (triton: relu), else in place on its output
            a = kernels.normalize(x, mean, inv_std, weight, bias, feature, activation=activation, backend=backend)
        from_output = recompute == "output" and _invertible(activation, negative_slope)
        if from_output and weight is not None:
            # Whether every |weight| is large enough to divide by is read on the host; where the host must not
            # wait for the device (CUDA), the input is saved instead.
            from_output = host_checks and bool(weight.detach().abs().min() >= _MIN_GAIN_FOR_INVERSION)
        ctx.backend = backend
        ctx.from_output = from_output
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.feature = feature
        ctx.count = count
        ctx.save_for_backward(a if from_output else x, weight, bias, mean, inv_std)
        ctx.mark_non_differentiable(mean, var)
        return a, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_output: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None, None, None, None]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "BatchNormAct does not support double backward (create_graph=True): its backward "
                "recomputes from a saved output. Use BatchNorm followed by the activation instead."
            )
        saved, weight, bias, mean, inv_std = ctx.saved_tensors
        feature = ctx.feature
        acc = mean.dtype
        gain = inv_std if weight is None else inv_std * weight.to(acc)
        if ctx.from_output:
            a = saved.to(acc)
            z = _inverse(a, ctx.activation, ctx.negative_slope)
            if bias is not None:
                z = z - per_feature(bias.to(acc), z, feature)
            x_hat = z if weight is None else z / per_feature(weight.to(acc), z, feature)
        else:
            x_hat = (saved.to(acc) - per_feature(mean, saved, feature)) * per_feature(inv_std, saved, feature)
            z = x_hat if weight is None else x_hat * per_feature(weight.to(acc), x_hat, feature)
            if bias is not None:
                z = z + per_feature(bias.to(acc), z, feature)
            a = _activate(z, ctx.activation, ctx.negative_slope)
        grad_z = grad_output.to(acc) * _derivative_from_output(a, ctx.activation, ctx.negative_slope)
        # The primitives on x_hat itself (mean 0, inverse std 1) with the gain in place of the weight.
        zeros, ones = torch.zeros_like(mean), torch.ones_like(mean)
        sum_grad_z, sum_grad_z_x_hat = kernels.grad_sums(  # dbeta, dgamma
            grad_z, x_hat, zeros, ones, feature, backend=ctx.backend
        )
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = None
        if need_input:
            grad_input = kernels.grad_input(
                grad_z, x_hat, zeros, ones, gain, sum_grad_z, sum_grad_z_x_hat, ctx.count, feature, backend=ctx.backend
            ).to(saved.dtype)
        return (
            grad_input,
            sum_grad_z_x_hat.to(weight.dtype) if need_weight else None,
            sum_grad_z.to(bias.dtype) if need_bias else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    activation: Activation = "relu",
    negative_slope: float = 0.01,
    *,
    recompute: Literal["output", "input"] = "output",
    num_batches_tracked: Tensor | None = None,
    nonfinite: functional.NonfinitePolicy = "raise",
) -> Tensor:
    r"""``act(batch_norm(input, ...))`` with the memory-saving backward described in the module docstring.

    Arguments as :func:`batchnorm.functional.batch_norm`, plus:

    Args:
        activation: ``"relu"``, ``"leaky_relu"``, ``"sigmoid"`` or ``"tanh"``.
        negative_slope: leaky ReLU's slope for negative inputs (``> 0`` to be invertible).
        recompute: ``"output"`` (default) saves the output of an invertible
            activation; ``"input"`` always saves the BN input instead.

    Shape:
        - input, output: ``(*, C, *)`` with ``C`` features at ``axis``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"expected activation to be one of {ACTIVATIONS}, got {activation!r}")
    if not (isinstance(negative_slope, (int, float)) and negative_slope >= 0):
        raise ValueError(f"expected negative_slope >= 0, got {negative_slope!r}")
    if recompute not in ("output", "input"):
        raise ValueError(f"expected recompute to be 'output' or 'input', got {recompute!r}")
    if not training:
        y = functional.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, axis)
        return _activate(y, activation, float(negative_slope))
    if nonfinite not in functional.NONFINITE_POLICIES:
        raise ValueError(f"expected nonfinite to be one of {functional.NONFINITE_POLICIES}, got {nonfinite!r}")
    feature = functional.check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    chosen = kernels.plan(input, True, weight, bias, feature)
    if chosen.route == "composite":
        # Traced, transformed or empty: the plain composition, which PyTorch differentiates itself.
        y = functional.batch_norm(
            input, running_mean, running_var, weight, bias, True, momentum, eps, axis,
            num_batches_tracked=num_batches_tracked, nonfinite=nonfinite,
        )  # fmt: skip
        return _activate(y, activation, float(negative_slope))
    a, mean, var = _BatchNormActFunction.apply(  # type: ignore[no-untyped-call]
        input,
        weight,
        bias,
        feature,
        float(eps),
        activation,
        float(negative_slope),
        recompute,
        chosen.backend,
        chosen.host_checks,
    )
    if running_mean is not None and running_var is not None:
        functional._update_running_stats(
            running_mean,
            running_var,
            mean,
            var,
            input.numel() // input.shape[feature],
            momentum,
            num_batches_tracked,
            nonfinite,
            chosen.host_checks,
        )
    result: Tensor = a
    return result


class BatchNormAct(BatchNorm):
    r"""Batch normalization followed by an activation, with half the memory for backward.

    .. math::

        a = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta\right)

    Equal (to rounding) to :class:`BatchNorm` followed by ``act``, with the
    same parameters, buffers and state-dict keys (``weight, bias,
    running_mean, running_var, num_batches_tracked``), so checkpoints of
    ``nn.BatchNorm2d`` load into it. In training only one full-size tensor is
    kept for backward, the output for invertible activations and the input for
    ReLU (see :mod:`batchnorm.nn.fused`); eval mode is the plain composition.

    Args:
        num_features, eps, momentum, affine, track_running_stats, axis, nonfinite:
            as :class:`BatchNorm`.
        activation: ``"relu"`` (default), ``"leaky_relu"``, ``"sigmoid"`` or ``"tanh"``.
        negative_slope: leaky ReLU's slope for negative inputs. Default: 0.01.
        recompute: ``"output"`` (default: recompute from the output when the
            activation is invertible) or ``"input"``.

    Shape:
        - Input: ``(*, C, *)`` with ``C`` at ``axis``; Output: same.
    """

    def __init__(
        self,
        num_features: int,
        activation: Activation = "relu",
        negative_slope: float = 0.01,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        recompute: Literal["output", "input"] = "output",
        nonfinite: functional.NonfinitePolicy = "raise",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"expected activation to be one of {ACTIVATIONS}, got {activation!r}")
        if not (isinstance(negative_slope, (int, float)) and negative_slope >= 0):
            raise ValueError(f"expected negative_slope >= 0, got {negative_slope!r}")
        if recompute not in ("output", "input"):
            raise ValueError(f"expected recompute to be 'output' or 'input', got {recompute!r}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, axis, nonfinite, device=device, dtype=dtype
        )
        self.activation: Activation = activation
        self.negative_slope = float(negative_slope)
        self.recompute: Literal["output", "input"] = recompute

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        track = self.training and self.track_running_stats
        return batch_norm_act(
            input,
            self.running_mean if (not self.training or self.track_running_stats) else None,
            self.running_var if (not self.training or self.track_running_stats) else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.axis,
            self.activation,
            self.negative_slope,
            recompute=self.recompute,
            num_batches_tracked=self.num_batches_tracked if track else None,
            nonfinite=self.nonfinite,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        if self.recompute != "output":
            text += f", recompute={self.recompute!r}"
        return text
