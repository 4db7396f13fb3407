r"""Ghost batch normalization (Hoffer et al., 2017): statistics per virtual batch inside a large batch.

The batch (axis 0) is cut into consecutive chunks of ``virtual_batch_size``
samples, ``x.split(virtual_batch_size)``; each chunk is normalized with its
own mean and biased variance, exactly as BN applied to that chunk alone. When
the batch does not divide evenly the last, smaller chunk is a virtual batch of
its own; if it has a single value per feature (one sample of a dense layer)
its variance is undefined and the call raises, as torch's BN does for such a
batch. A batch of at most ``virtual_batch_size`` samples is plain BN.

Running statistics: one momentum update per call (``num_batches_tracked``
counts calls, as for BN), from the virtual batches' statistics. With chunk
``g`` holding :math:`m_g` values per feature, mean :math:`\mu_g` and
:math:`M_{2,g} = \sum (x - \mu_g)^2`, :math:`m = \sum m_g` and ``G`` chunks:

.. math::

    \mu = \frac{1}{m}\sum_g m_g \mu_g, \qquad
    \sigma^2 = \frac{\sum_g M_{2,g}}{m - G}

the batch mean (the count-weighted mean of the chunks' means) and the pooled
*within-chunk* unbiased variance (for equal chunks, the mean of the chunks'
unbiased variances). It leaves out the spread between chunk means, which the
training outputs never see either; with ``G = 1`` it is BN's update. Then
``running = (1 - momentum) * running + momentum * batch`` (``momentum=None``:
cumulative average). Eval mode is BN with the running statistics.

Composition: each chunk is one node of the core's :class:`~batchnorm.functional.BatchNormFunction`
(``stats``, ``normalize``; backward ``grad_sums``, ``grad_input``), or the
``torch_ops`` primitives when traced or transformed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.functional import (
    NONFINITE_POLICIES,
    BatchNormArgumentError,
    BatchNormFunction,
    NonfinitePolicy,
    _composite_training,
    _update_running_stats,
    batch_norm,
    check_arguments,
)
from batchnorm.nn.batchnorm import BatchNorm

__all__ = ["GhostBatchNorm", "ghost_batch_norm"]


def _check_virtual_batch_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BatchNormArgumentError(f"expected virtual_batch_size to be a positive integer, got {size!r}")


def ghost_batch_norm(
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
    virtual_batch_size: int = 32,
    num_batches_tracked: Tensor | None = None,
    nonfinite: NonfinitePolicy = "raise",
) -> Tensor:
    r"""Ghost BN: :func:`batchnorm.functional.batch_norm` on each chunk of ``virtual_batch_size`` samples.

    In training, chunk ``g`` gives :math:`y_g = (x_g - \mu_g) / \sqrt{\sigma_g^2 + \epsilon} \cdot \gamma + \beta`
    and the running statistics take one update from the batch mean and the
    pooled within-chunk unbiased variance (see :mod:`batchnorm.nn.ghost`). In
    eval, exactly :func:`~batchnorm.functional.batch_norm` with the running statistics.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps,
            axis, num_batches_tracked, nonfinite: as :func:`batchnorm.functional.batch_norm`;
            the feature axis cannot be 0 (the batch axis that is split).
        virtual_batch_size: samples per virtual batch (the last may have fewer).

    Shape:
        - input, output: ``(N, *)`` with ``C`` features at ``axis`` (not 0).
        - running_mean, running_var, weight, bias: ``(C,)``.

    Raises:
        BatchNormArgumentError: bad arguments, a feature axis 0, or a virtual
            batch with a single value per feature in training.
    """
    _check_virtual_batch_size(virtual_batch_size)
    ndim = input.dim() if isinstance(input, Tensor) else 0
    if training and isinstance(axis, int) and -ndim <= axis < ndim and axis % ndim == 0:
        raise BatchNormArgumentError(
            f"ghost batch norm splits the batch along axis 0, so the feature axis cannot be 0 (got axis={axis})"
        )
    if not training or not isinstance(input, Tensor) or input.dim() < 2 or input.shape[0] <= virtual_batch_size:
        # Eval, or one virtual batch: BN itself (which also words the errors of a bad input).
        return batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
            num_batches_tracked=num_batches_tracked, nonfinite=nonfinite,
        )  # fmt: skip
    if nonfinite not in NONFINITE_POLICIES:
        raise BatchNormArgumentError(f"expected nonfinite to be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    feature = check_arguments(input, running_mean, running_var, weight, bias, True, momentum, eps, axis)
    chunks = torch.split(input, virtual_batch_size)
    per_sample = input[:1].numel() // input.shape[feature]
    if chunks[-1].shape[0] * per_sample == 1:
        raise BatchNormArgumentError(
            f"a batch of {input.shape[0]} samples in virtual batches of {virtual_batch_size} leaves a last "
            "virtual batch of 1 sample, with a single value per feature: its variance is undefined. Use a batch "
            "size that is not 1 more than a multiple of virtual_batch_size (e.g. drop_last=True)"
        )
    chosen = kernels.plan(input, True, weight, bias, feature)
    outputs, means, variances, counts = [], [], [], []
    for chunk in chunks:
        if chosen.route == "composite":
            y, mean, var, count = _composite_training(chunk, feature, weight, bias, float(eps), chosen.backend)
        else:
            y, mean, var = BatchNormFunction.apply(chunk, weight, bias, feature, float(eps), chosen.backend)  # type: ignore[no-untyped-call]
            count = chunk.numel() // chunk.shape[feature]
        outputs.append(y)
        means.append(mean)
        variances.append(var)
        counts.append(count)
    if running_mean is not None and running_var is not None:
        total, groups = sum(counts), len(counts)
        weights = torch.tensor(counts, dtype=means[0].dtype, device=means[0].device).unsqueeze(1)
        pooled_mean = (torch.stack(means) * weights).sum(0) / total
        within_m2 = (torch.stack(variances) * weights).sum(0)
        # The core's update takes a biased variance over `count` values and applies count / (count - 1):
        # over m - G + 1 values it writes within_m2 / (m - G), the pooled within-chunk unbiased variance.
        count = total - groups + 1
        _update_running_stats(
            running_mean,
            running_var,
            pooled_mean,
            within_m2 / count,
            count,
            momentum,
            num_batches_tracked,
            nonfinite,
            chosen.host_checks,
        )
    return torch.cat(outputs)


class GhostBatchNorm(BatchNorm):
    r"""Ghost batch normalization: BN statistics per virtual batch of ``virtual_batch_size`` samples.

    .. math::

        y_g = \frac{x_g - \mathrm{E}[x_g]}{\sqrt{\mathrm{Var}[x_g] + \epsilon}} \cdot \gamma + \beta,
        \qquad x_g = \text{chunk } g \text{ of the batch (axis 0)}

    In training each chunk is normalized exactly as BN applied to it alone;
    a remainder chunk is a virtual batch of its own, and one with a single
    value per feature raises :class:`~batchnorm.functional.BatchNormArgumentError`.
    Running statistics take one update per call (PyTorch's ``momentum``, the
    weight of the new batch; ``None``: cumulative average) from the batch mean
    and the pooled within-chunk unbiased variance :math:`\sum_g M_{2,g} / (m - G)`
    (details in :mod:`batchnorm.nn.ghost`). Eval mode is BN with the running
    statistics; with ``track_running_stats=False`` both modes use the chunks'
    statistics. Parameters, buffers and state dict are BN's (torch's keys).

    Args:
        num_features: ``C``, the size of the feature axis.
        virtual_batch_size: samples per virtual batch. Default: 32.
        eps, momentum, affine, track_running_stats, axis, nonfinite, device, dtype:
            as :class:`BatchNorm`; ``axis`` cannot be 0.

    Shape:
        - Input: ``(N, *)`` with ``C`` at ``axis``; Output: same.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        nonfinite: NonfinitePolicy = "raise",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _check_virtual_batch_size(virtual_batch_size)
        if axis == 0:
            raise BatchNormArgumentError("ghost batch norm splits the batch along axis 0: axis cannot be 0")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, axis, nonfinite, device=device, dtype=dtype
        )
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        """Per-chunk batch statistics in training (and without running statistics), running ones in eval."""
        self._check_input_dim(input)
        track = self.training and self.track_running_stats
        use_batch = self.training or self.running_mean is None
        return ghost_batch_norm(
            input,
            self.running_mean if track or not use_batch else None,
            self.running_var if track or not use_batch else None,
            self.weight,
            self.bias,
            use_batch,
            self.momentum,
            self.eps,
            self.axis,
            virtual_batch_size=self.virtual_batch_size,
            num_batches_tracked=self.num_batches_tracked if track else None,
            nonfinite=self.nonfinite,
        )

    def extra_repr(self) -> str:
        rest = super().extra_repr().split(", ", 1)[1]
        return f"{self.num_features}, virtual_batch_size={self.virtual_batch_size}, {rest}"
