"""Axis bookkeeping shared by the reference, the torch op and the inspector.

Every normalization in this package is described by one *feature axis*: the
axis whose entries each own a mean, a variance, a gamma and a beta. All other
axes are *reduced*: their values are pooled into the statistic of the feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def canonical_axis(ndim: int, axis: int) -> int:
    """Return ``axis`` as a non-negative index into a tensor of rank ``ndim``.

    Raises:
        ValueError: if ``ndim < 1`` or ``axis`` is not in ``[-ndim, ndim)``.
    """
    if ndim < 1:
        raise ValueError(f"expected an input with at least 1 dimension, got a {ndim}-D input")
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"expected an integer feature axis, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"feature axis {axis} is out of range for a {ndim}-D input (expected an axis in [{-ndim}, {ndim - 1}])"
        )
    return axis % ndim


def reduced_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """All axes except the (canonical) feature axis: the axes a statistic pools over."""
    feature = canonical_axis(ndim, axis)
    return tuple(d for d in range(ndim) if d != feature)


def values_per_statistic(shape: Sequence[int], axis: int) -> int:
    """How many values feed each mean and variance: the product of the reduced sizes."""
    feature = canonical_axis(len(shape), axis)
    return math.prod(size for d, size in enumerate(shape) if d != feature)


def broadcast_shape(ndim: int, axis: int, num_features: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-feature vector against the input, e.g. ``(1, C, 1, 1)``."""
    feature = canonical_axis(ndim, axis)
    return tuple(num_features if d == feature else 1 for d in range(ndim))
