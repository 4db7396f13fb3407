r"""The four primitives as PyTorch operations: any device, differentiable, traceable.

Every function here is a composition of ATen operations, so autograd,
``torch.func`` (``vmap``, ``grad``, ``jvp``), forward-mode AD,
``torch.compile``, ``torch.export`` and ``torch.jit.trace`` see through it.
They take the input in its own shape and layout with its feature axis,
and compute in ``compute`` precision: the accumulation dtype (float32 for
float32/bfloat16/float16 inputs, float64 for float64) for the ``torch``
backend, float64 for the ``exact`` backend (the readable reference
formulas, float64 throughout and rounded once at the end).

Numerics:

* statistics from :func:`torch.var_mean`, which PyTorch computes with
  Welford's/Chan's algorithm on every device (never :math:`E[x^2]-E[x]^2`);
* ``y = (x - mean) * (invstd * weight) + bias``: the centred value is formed
  per element, so ``|mean| >> std`` loses nothing;
* ``dx = gain * (dy - sum_dy / m - x_hat * sum_dy_xhat / m)`` with
  ``x_hat = (x - mean) * invstd`` formed first: no ``invstd^2`` that could
  overflow or underflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grad_input", "grad_sums", "normalize", "per_feature", "stats"]


def _reduced(x: Tensor, feature: int) -> list[int]:
    return [d for d in range(x.dim()) if d != feature]


def per_feature(vector: Tensor, x: Tensor, feature: int) -> Tensor:
    """``vector`` (``(C,)``) viewed to broadcast against ``x`` with its features on ``feature``: ``(1, C, 1, 1)``."""
    shape = [1] * x.dim()
    shape[feature] = vector.shape[0]
    return vector.view(shape)


def stats(x: Tensor, feature: int, compute: torch.dtype) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, m2)`` per feature of ``x``; ``m2 = sum((x - mean)^2)``.

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``feature``; mean, m2: ``(C,)`` in ``compute``.
    """
    count = x.numel() // x.shape[feature] if x.shape[feature] else 0
    if count == 0:  # no values: zeros (as PyTorch's layers, whose gradients of an empty batch are zero)
        zeros = x.new_zeros(x.shape[feature], dtype=compute)
        return 0, zeros, zeros.clone()
    var, mean = torch.var_mean(x.to(compute), dim=_reduced(x, feature), correction=0)
    return count, mean, var * count


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    feature: int,
    compute: torch.dtype,
) -> Tensor:
    """``y = (x - mean) * (invstd * weight) + bias``, in ``x``'s dtype and memory layout.

    Shape:
        - x, y: ``(*, C, *)`` with ``C`` at ``feature``; mean, invstd, weight, bias: ``(C,)``.
    """
    scale = invstd.to(compute) if weight is None else invstd.to(compute) * weight.to(compute)
    centered = x.to(compute) - per_feature(mean.to(compute), x, feature)
    if bias is None:
        y = centered * per_feature(scale, x, feature)
    else:
        y = torch.addcmul(per_feature(bias.to(compute), x, feature), centered, per_feature(scale, x, feature))
    return y.to(x.dtype)


def grad_sums(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, feature: int, compute: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(sum(dy), sum(dy * x_hat))`` per feature, ``x_hat = (x - mean) * invstd``.

    Shape:
        - dy, x: ``(*, C, *)`` with ``C`` at ``feature``; mean, invstd and both sums: ``(C,)`` in ``compute``.
    """
    dims = _reduced(x, feature)
    g = dy.to(compute)
    centered = x.to(compute) - per_feature(mean.to(compute), x, feature)
    sum_dy = g.sum(dim=dims)
    sum_dy_centered = (g * centered).sum(dim=dims)
    return sum_dy, sum_dy_centered * invstd.to(compute)


def grad_input(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: float,
    feature: int,
    compute: torch.dtype,
) -> Tensor:
    """``dx = invstd * weight * (dy - sum_dy / count - x_hat * sum_dy_xhat / count)``, in ``x``'s dtype.

    The closed form derived in :mod:`batchnorm.reference`.

    Shape:
        - dy, x, dx: ``(*, C, *)`` with ``C`` at ``feature``; the per-feature tensors: ``(C,)``.
    """
    inv = invstd.to(compute)
    gain = inv if weight is None else inv * weight.to(compute)
    x_hat = (x.to(compute) - per_feature(mean.to(compute), x, feature)) * per_feature(inv, x, feature)
    mean_dy = sum_dy.to(compute) / count
    mean_dy_xhat = sum_dy_xhat.to(compute) / count
    inner = dy.to(compute) - per_feature(mean_dy, x, feature) - x_hat * per_feature(mean_dy_xhat, x, feature)
    return (inner * per_feature(gain, x, feature)).to(dy.dtype)
