r"""Kernels for the torch op: one place decides how the arithmetic is done.

Every kernel works on a canonical 3-D view ``(B, C, S)`` of the input: ``C``
features, ``B`` blocks before the feature axis and ``S`` positions after it,
so a statistic reduces over axes 0 and 2. The view is free (no copy) for the
layouts users actually have:

* contiguous ``(N, C, H, W)`` with the feature axis 1: ``(N, C, H*W)``;
* dense ``(N, D)``: ``(N, D, 1)``;
* channels-last ``(N, C, H, W)`` or a sequence ``(N, L, C)`` with ``axis=-1``:
  the feature axis is the innermost in memory, ``(N*H*W, C, 1)``.

Numerics (shared by every kernel):

* half-precision inputs (float16, bfloat16) are accumulated in float32, and
  so are all statistics; float64 stays float64;
* the variance comes from a stable Welford/two-pass reduction
  (``torch.var_mean``), never from :math:`E[x^2]-E[x]^2`;
* the backward uses the closed form derived in :mod:`batchnorm.reference`,
  with ``x - mean`` formed per element, so data far from zero keeps its
  precision.

Nothing here checks arguments or knows about modules: :mod:`batchnorm.functional`
does that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CanonicalView", "canonical_view", "accumulation_dtype", "batch_stats", "normalize", "backward"]


@dataclass(frozen=True)
class CanonicalView:
    """A ``(B, C, S)`` view of an input and the way back to the input's shape and layout."""

    tensor: Tensor
    restore: Callable[[Tensor], Tensor]

    @property
    def values_per_statistic(self) -> int:
        batches, _, positions = self.tensor.shape
        return batches * positions


def canonical_view(x: Tensor, axis: int) -> CanonicalView:
    """View ``x`` (feature axis ``axis``, already canonical) as ``(B, C, S)`` without copying when possible.

    Shape:
        - x: ``(*, C, *)``; the view: ``(B, C, S)``; ``restore`` maps a
          ``(B, C, S)`` tensor back to ``x``'s shape and memory layout.
    """
    shape = x.shape
    num_features = shape[axis]
    if x.is_contiguous():
        blocks = 1
        for size in shape[:axis]:
            blocks *= size
        view = x.view(blocks, num_features, -1) if x.numel() else x.reshape(blocks, num_features, -1)
        return CanonicalView(view, lambda t: t.view(shape) if t.is_contiguous() else t.reshape(shape))
    moved = x.movedim(axis, -1)
    if moved.is_contiguous():
        moved_shape = moved.shape
        view = moved.view(-1, num_features, 1)
        return CanonicalView(view, lambda t: t.reshape(moved_shape).movedim(-1, axis))
    return canonical_view(x.contiguous(), axis)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_feature(vector: Tensor) -> Tensor:
    return vector.view(1, -1, 1)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and biased variance of a ``(B, C, S)`` tensor, in the accumulation dtype.

    Shape:
        - x: ``(B, C, S)``; mean, var: ``(C,)``.
    """
    acc = accumulation_dtype(x.dtype)
    var, mean = torch.var_mean(x.to(acc), dim=(0, 2), correction=0)
    return mean, var


def normalize(
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    r"""``y = (x - mean) * inv_std * weight + bias`` on a ``(B, C, S)`` tensor, output in ``x``'s dtype.

    Shape:
        - x, output: ``(B, C, S)``; mean, inv_std, weight, bias: ``(C,)``.
    """
    acc = mean.dtype
    scale = inv_std if weight is None else inv_std * weight.to(acc)
    centered = x.to(acc) - _per_feature(mean)
    if bias is None:
        y = centered * _per_feature(scale)
    else:
        y = torch.addcmul(_per_feature(bias.to(acc)), centered, _per_feature(scale))
    return y.to(x.dtype)


def backward(
    grad_output: Tensor,
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Tensor | None,
    need_input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    r"""Closed-form training-mode gradients (see :mod:`batchnorm.reference`).

    .. math::

        dx = \frac{\gamma s}{m}\left(m\,dy - \textstyle\sum dy
             - \hat x \sum dy\,\hat x\right)

    Returns:
        ``(dx or None, dweight, dbias)``; ``dweight`` and ``dbias`` are in the
        accumulation dtype (the caller casts them to the parameters' dtype).

    Shape:
        - grad_output, x, dx: ``(B, C, S)``; mean, inv_std, weight: ``(C,)``.
    """
    acc = mean.dtype
    batches, _, positions = x.shape
    m = batches * positions
    dy = grad_output.to(acc)
    centered = x.to(acc) - _per_feature(mean)
    sum_dy = dy.sum(dim=(0, 2))
    sum_dy_centered = (dy * centered).sum(dim=(0, 2))
    grad_weight = sum_dy_centered * inv_std  # sum(dy * x_hat)
    if not need_input_grad:
        return None, grad_weight, sum_dy
    gain = inv_std if weight is None else inv_std * weight.to(acc)
    # dx = gain * (dy - mean(dy) - (x - mean) * inv_std^2 * mean(dy * (x - mean)))
    projection = inv_std * inv_std * sum_dy_centered / m
    grad_input = (dy - _per_feature(sum_dy / m) - centered * _per_feature(projection)) * _per_feature(gain)
    return grad_input.to(x.dtype), grad_weight, sum_dy
