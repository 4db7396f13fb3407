r"""Batch normalization from first principles, in NumPy.

This module is the textbook: Ioffe & Szegedy (2015), Algorithms 1 and 2, with
the backward pass written out. It favours clarity over speed, works in any
floating dtype (use float64 to check other implementations against it), for
inputs of any rank and any feature axis.

Which values feed a statistic
-----------------------------
For an input ``x`` with feature axis ``a``, every index ``c`` along ``a`` owns
one mean, one variance, one ``gamma`` and one ``beta``. The statistic of
feature ``c`` pools *all* values ``x[..., c, ...]``: every example of the batch
and every spatial or sequence position. With ``m`` such values
(``values_per_statistic``):

=========================  ============  ============  =====================
input                      feature axis  reduced axes  values per statistic
=========================  ============  ============  =====================
dense ``(N, D)``           1             0             ``N``
conv ``(N, C, H, W)``      1             0, 2, 3       ``N*H*W``
sequence ``(N, L, C)``     2 (``-1``)    0, 1          ``N*L``
=========================  ============  ============  =====================

This is why layers of different widths pose no problem: each BN layer owns
statistics and parameters sized to its own feature axis.

Forward (Algorithm 1), for one feature
--------------------------------------
.. math::

    \mu = \frac{1}{m}\sum_i x_i, \qquad
    \sigma^2 = \frac{1}{m}\sum_i (x_i - \mu)^2 \quad\text{(biased)},

    \hat x_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    y_i = \gamma \hat x_i + \beta.

Backward: the derivation
------------------------
Write :math:`s = (\sigma^2 + \epsilon)^{-1/2}` (the inverse standard deviation)
and :math:`g_i = \partial L / \partial y_i`. Then

* :math:`\partial L/\partial\beta = \sum_i g_i` and
  :math:`\partial L/\partial\gamma = \sum_i g_i \hat x_i`.
* :math:`\partial L/\partial \hat x_i = \gamma g_i`.
* :math:`\hat x_i = (x_i - \mu) s` depends on :math:`x_j` directly (when
  :math:`i=j`) and through :math:`\mu` and :math:`s`. With
  :math:`\partial\mu/\partial x_j = 1/m` and
  :math:`\partial\sigma^2/\partial x_j = 2(x_j-\mu)/m` (the term through
  :math:`\mu` vanishes because :math:`\sum_i (x_i - \mu) = 0`),
  :math:`\partial s/\partial x_j = -\tfrac12 s^3 \cdot 2(x_j-\mu)/m = -s\,\hat x_j\, s/m`.
  Hence

  .. math::

      \frac{\partial \hat x_i}{\partial x_j}
      = s\left(\delta_{ij} - \frac1m\right) - \hat x_i \hat x_j \frac{s}{m}.

* Summing over :math:`i` with weights :math:`\gamma g_i` gives the closed form

  .. math::

      \frac{\partial L}{\partial x_j} = \frac{\gamma s}{m}
      \left( m g_j - \sum_i g_i - \hat x_j \sum_i g_i \hat x_i \right).

  The gradient is the upstream gradient with its mean and its projection on
  :math:`\hat x` removed, then scaled by :math:`\gamma s`: BN's output is
  invariant to shifting its input, and (as :math:`\epsilon \to 0`) to
  scaling it, so the gradient has zero sum and, up to a term of order
  :math:`\epsilon/\sigma^2`, no component along :math:`x - \mu`.

:func:`batch_norm_backward` implements the closed form;
:func:`batch_norm_backward_stepwise` follows the paper's chain of
intermediate derivatives (``dxhat``, ``dvar``, ``dmu``) and serves as an
independent check.

Inference (Algorithm 2)
-----------------------
After training, BN uses fixed population statistics and becomes an affine map
:math:`y = \frac{\gamma}{\sqrt{\mathrm{Var}[x]+\epsilon}} x +
\left(\beta - \frac{\gamma\,E[x]}{\sqrt{\mathrm{Var}[x]+\epsilon}}\right)`.
The paper estimates :math:`E[x]` as the average of batch means and
:math:`\mathrm{Var}[x]` as :math:`\frac{m}{m-1}` times the average of batch
variances (:func:`population_statistics`); frameworks use a moving average
instead (:func:`update_running_stats`, in PyTorch's convention).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm._shapes import broadcast_shape, canonical_axis, reduced_axes

__all__ = [
    "ForwardCache",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_stepwise",
    "batch_norm_inference",
    "inference_affine",
    "update_running_stats",
    "population_statistics",
]

Array = NDArray[np.floating]


@dataclass(frozen=True)
class ForwardCache:
    """What the backward pass needs from the forward pass.

    Attributes:
        x: the input.
        x_hat: the normalized input :math:`(x-\\mu)s`.
        mean: per-feature batch mean, shape ``(C,)``.
        var: per-feature biased batch variance, shape ``(C,)``.
        inv_std: :math:`s = (\\sigma^2+\\epsilon)^{-1/2}`, shape ``(C,)``.
        gamma: the scale used, shape ``(C,)``.
        eps: the epsilon used.
        axis: the canonical feature axis.
    """

    x: Array
    x_hat: Array
    mean: Array
    var: Array
    inv_std: Array
    gamma: Array
    eps: float
    axis: int

    @property
    def values_per_statistic(self) -> int:
        """``m``: how many values fed each mean and variance."""
        return self.x.size // self.mean.size


def _as_float_array(value: ArrayLike, name: str) -> Array:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected a floating-point array for {name}, got dtype {array.dtype}")
    return array


def _per_feature(value: ArrayLike | None, num_features: int, fill: float, dtype: np.dtype, name: str) -> Array:
    if value is None:
        return np.full(num_features, fill, dtype=dtype)
    array = np.asarray(value, dtype=dtype)
    if array.shape != (num_features,):
        raise ValueError(f"expected {name} of shape ({num_features},), got shape {array.shape}")
    return array


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"expected eps > 0, got {eps}")


def batch_norm_forward(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[Array, ForwardCache]:
    r"""Training-mode batch normalization (Algorithm 1).

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    with :math:`\mu_B, \sigma_B^2` the mean and biased variance of each
    feature over every axis except ``axis``. The variance is computed in two
    passes (subtract the mean, then average the squares), never as
    :math:`E[x^2]-E[x]^2`.

    Args:
        x: input array of any floating dtype and rank >= 1.
        gamma: per-feature scale, default ones.
        beta: per-feature shift, default zeros.
        eps: added to the variance, > 0.
        axis: the feature axis (negative values count from the end).

    Returns:
        ``(y, cache)``: the output and a :class:`ForwardCache` for
        :func:`batch_norm_backward`.

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``axis``; ``y``: same as ``x``.
        - gamma, beta: ``(C,)``.

    Raises:
        ValueError: bad axis, ``eps <= 0``, wrong parameter shape, non-float
            input, or a single value per statistic.
    """
    x = _as_float_array(x, "x")
    _check_eps(eps)
    feature = canonical_axis(x.ndim, axis)
    num_features = x.shape[feature]
    values = x.size // max(num_features, 1)
    if values < 2:
        raise ValueError(
            f"expected more than 1 value per feature when training, got input of shape {x.shape} "
            f"with {values} value(s) per feature"
        )
    gamma_array = _per_feature(gamma, num_features, 1.0, x.dtype, "gamma")
    beta_array = _per_feature(beta, num_features, 0.0, x.dtype, "beta")
    axes = reduced_axes(x.ndim, feature)
    shape = broadcast_shape(x.ndim, feature, num_features)

    mean = x.mean(axis=axes)
    centered = x - mean.reshape(shape)
    var = (centered * centered).mean(axis=axes)  # biased: divide by m, as Algorithm 1
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = centered * inv_std.reshape(shape)
    y = gamma_array.reshape(shape) * x_hat + beta_array.reshape(shape)
    cache = ForwardCache(x, x_hat, mean, var, inv_std, gamma_array, eps, feature)
    return y, cache


def batch_norm_backward(dy: ArrayLike, cache: ForwardCache) -> tuple[Array, Array, Array]:
    r"""Gradients of training-mode BN, closed form (derivation in the module docstring).

    .. math::

        \frac{\partial L}{\partial x} = \frac{\gamma s}{m}
        \left(m\,dy - \textstyle\sum dy - \hat x \sum dy\,\hat x\right),\quad
        \frac{\partial L}{\partial \gamma} = \textstyle\sum dy\,\hat x,\quad
        \frac{\partial L}{\partial \beta} = \textstyle\sum dy

    Returns:
        ``(dx, dgamma, dbeta)``.

    Shape:
        - dy, dx: same as the forward input; dgamma, dbeta: ``(C,)``.
    """
    dy = np.asarray(dy, dtype=cache.x.dtype)
    if dy.shape != cache.x.shape:
        raise ValueError(f"expected dy of shape {cache.x.shape}, got shape {dy.shape}")
    axes = reduced_axes(dy.ndim, cache.axis)
    shape = broadcast_shape(dy.ndim, cache.axis, cache.mean.size)
    m = cache.values_per_statistic

    dbeta = dy.sum(axis=axes)
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    scale = (cache.gamma * cache.inv_std / m).reshape(shape)
    dx = scale * (m * dy - dbeta.reshape(shape) - cache.x_hat * dgamma.reshape(shape))
    return dx, dgamma, dbeta


def batch_norm_backward_stepwise(dy: ArrayLike, cache: ForwardCache) -> tuple[Array, Array, Array]:
    """Gradients of training-mode BN by the paper's chain of intermediate derivatives.

    Slower and longer than :func:`batch_norm_backward`; kept as an independent
    check of the closed form. Each line is one equation of Ioffe & Szegedy
    (2015), Section 3.

    Shape:
        - dy, dx: same as the forward input; dgamma, dbeta: ``(C,)``.
    """
    dy = np.asarray(dy, dtype=cache.x.dtype)
    axes = reduced_axes(dy.ndim, cache.axis)
    shape = broadcast_shape(dy.ndim, cache.axis, cache.mean.size)
    m = cache.values_per_statistic
    mu = cache.mean.reshape(shape)
    var_eps = (cache.var + cache.eps).reshape(shape)

    dx_hat = dy * cache.gamma.reshape(shape)
    dvar = (dx_hat * (cache.x - mu)).sum(axis=axes, keepdims=True) * -0.5 * var_eps**-1.5
    dmu = (-dx_hat / np.sqrt(var_eps)).sum(axis=axes, keepdims=True) + dvar * (-2.0 * (cache.x - mu)).sum(
        axis=axes, keepdims=True
    ) / m
    dx = dx_hat / np.sqrt(var_eps) + dvar * 2.0 * (cache.x - mu) / m + dmu / m
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return dx, dgamma, dbeta


def inference_affine(
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float = 1e-5,
) -> tuple[Array, Array]:
    r"""The fixed affine map of inference-mode BN: ``y = scale * x + shift``.

    .. math:: \text{scale} = \frac{\gamma}{\sqrt{\mathrm{Var}+\epsilon}},\qquad
              \text{shift} = \beta - \text{scale}\cdot E[x]

    Shape:
        - all arguments and both results: ``(C,)``.
    """
    _check_eps(eps)
    mean_array = _as_float_array(mean, "mean")
    var_array = np.asarray(var, dtype=mean_array.dtype)
    num_features = mean_array.size
    gamma_array = _per_feature(gamma, num_features, 1.0, mean_array.dtype, "gamma")
    beta_array = _per_feature(beta, num_features, 0.0, mean_array.dtype, "beta")
    scale = gamma_array / np.sqrt(var_array + eps)
    return scale, beta_array - scale * mean_array


def batch_norm_inference(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float = 1e-5,
    axis: int = 1,
) -> Array:
    """Inference-mode BN (Algorithm 2): the affine map of :func:`inference_affine`.

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``axis``; output: same as ``x``.
        - gamma, beta, mean, var: ``(C,)``.
    """
    x = _as_float_array(x, "x")
    feature = canonical_axis(x.ndim, axis)
    num_features = x.shape[feature]
    mean_array = np.asarray(mean, dtype=x.dtype)
    if mean_array.shape != (num_features,):
        raise ValueError(f"expected mean of shape ({num_features},), got shape {mean_array.shape}")
    scale, shift = inference_affine(gamma, beta, mean_array, np.asarray(var, dtype=x.dtype), eps)
    shape = broadcast_shape(x.ndim, feature, num_features)
    return x * scale.reshape(shape) + shift.reshape(shape)


def update_running_stats(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    batch_mean: ArrayLike,
    batch_var: ArrayLike,
    values_per_statistic: int,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> tuple[Array, Array, int]:
    r"""One moving-average step in PyTorch's convention.

    ``momentum`` is the weight of the *new* batch:

    .. math:: r \leftarrow (1 - \alpha)\, r + \alpha\, b

    with :math:`\alpha` = ``momentum``, or :math:`\alpha = 1/t` (a cumulative
    average over the ``t`` batches seen, counting this one) when ``momentum``
    is None. The *unbiased* batch variance
    :math:`\sigma_B^2 \cdot m/(m-1)` enters ``running_var``.

    Args:
        running_mean, running_var: current estimates, shape ``(C,)``.
        batch_mean, batch_var: this batch's mean and *biased* variance.
        values_per_statistic: ``m``, must be >= 2.
        momentum: float in ``[0, 1]`` or None.
        num_batches_tracked: batches seen before this one.

    Returns:
        ``(running_mean, running_var, num_batches_tracked + 1)`` as new arrays.
    """
    if values_per_statistic < 2:
        raise ValueError(f"expected values_per_statistic >= 2, got {values_per_statistic}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"expected momentum in [0, 1] or None, got {momentum}")
    count = num_batches_tracked + 1
    factor = 1.0 / count if momentum is None else momentum
    m = values_per_statistic
    unbiased = np.asarray(batch_var) * m / (m - 1)
    new_mean = (1.0 - factor) * np.asarray(running_mean) + factor * np.asarray(batch_mean)
    new_var = (1.0 - factor) * np.asarray(running_var) + factor * unbiased
    return new_mean, new_var, count


def population_statistics(batches: Iterable[ArrayLike], axis: int = 1) -> tuple[Array, Array]:
    r"""Population mean and variance from a sequence of batches (Algorithm 2).

    .. math:: E[x] = \overline{\mu_B},\qquad
              \mathrm{Var}[x] = \frac{m}{m-1}\,\overline{\sigma_B^2}

    where the bars average over batches and ``m`` is the values per statistic
    of one batch (batches must share the shape of their reduced axes so that
    every batch has the same ``m``).

    Shape:
        - each batch: ``(*, C, *)``; results: ``(C,)``.
    """
    means: list[Array] = []
    variances: list[Array] = []
    m = None
    for batch in batches:
        array = _as_float_array(batch, "batch")
        feature = canonical_axis(array.ndim, axis)
        values = array.size // array.shape[feature]
        if m is None:
            m = values
        elif values != m:
            raise ValueError(f"expected every batch to have {m} values per statistic, got one with {values}")
        axes = reduced_axes(array.ndim, feature)
        means.append(array.mean(axis=axes))
        variances.append(array.var(axis=axes))
    if m is None:
        raise ValueError("expected at least one batch, got none")
    if m < 2:
        raise ValueError(f"expected more than 1 value per statistic in each batch, got {m}")
    return np.mean(means, axis=0), m / (m - 1) * np.mean(variances, axis=0)
