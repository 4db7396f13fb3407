"""``batchnorm.kernels``: the four primitives on every backend, the settings, the dispatch (``plan``), the routes.

Every number is checked against an independent float64 reference written out
here: the primitives' formulas as float64 torch operations on the input's
(rounded) values, and ``torch.nn.functional.batch_norm`` in float64 with the
feature axis moved to 1, never the package's own output.

The reference calls ``F.batch_norm`` on *contiguous* float64 copies of the
input, the gradient and the per-feature tensors. PyTorch's CPU batch-norm
backward (2.x) returns wrong input gradients for a non-contiguous weight and
for an input or gradient whose strides are ambiguously channels-last (a size-1
spatial axis): a reference fed such tensors is the one that is wrong.

Tolerances, by the dtype of the result (``u``: its unit roundoff, ``eps/2``):

* float64: ``1e-10`` relative to the natural scale of the value (outputs,
  running statistics, gradients); merged statistics ``1e-12``;
* float32 and the narrow dtypes accumulate in float32: per-feature sums within
  ``1e-5`` of the sum of the magnitudes of their terms, outputs and gradients
  within ``1e-5`` of their natural scale (for an input gradient
  ``invstd * |weight| * max|dy| * (1 + |mean| * invstd)``: its terms cancel,
  entirely when a feature has two values, and the mean rounded to float32
  shifts ``x_hat`` by ``u * |mean| * invstd``);
* bfloat16 and float16 outputs are rounded once from float32: one unit in the
  last place of the value on top of the float32 term;
* ``exact`` results of narrower dtypes are float64 arithmetic rounded once: at
  most one unit in the last place.

The differential fuzz test runs 300 seeded random calls on every setting
(about 2 s); :data:`INVALID_CALLS` must raise alike on every setting.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

from batchnorm import kernels
from batchnorm.functional import BatchNormArgumentError, NonfiniteBatchError, batch_norm
from batchnorm.kernels import native

F64 = torch.float64
BACKENDS = list(kernels.BACKENDS)
SETTINGS = list(kernels.KERNELS)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPS = 1e-5

requires_native = pytest.mark.skipif(
    not native.available(), reason=f"the native kernels are unavailable here: {native.failure()}"
)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


def _roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# --- layouts ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """An input layout: a shape, the feature axis, and how the memory is arranged.

    ``kind``: ``contiguous``; ``channels_last``/``channels_last_3d``; ``permuted`` (dense, axes
    in memory in the order ``order``, not a layout the native kernels read in place); ``sliced``
    (every other element of ``sliced_dim``: not dense).
    """

    name: str
    shape: tuple[int, ...]
    axis: int = 1
    kind: str = "contiguous"
    order: tuple[int, ...] = ()
    sliced_dim: int = -1

    @property
    def feature(self) -> int:
        return self.axis % len(self.shape)

    @property
    def features(self) -> int:
        return self.shape[self.axis]

    @property
    def dense(self) -> bool:
        return self.kind != "sliced"

    def like(self, values: Tensor) -> Tensor:
        """``values`` (of this shape) copied into this layout."""
        if self.kind == "channels_last":
            return values.contiguous(memory_format=torch.channels_last)
        if self.kind == "channels_last_3d":
            return values.contiguous(memory_format=torch.channels_last_3d)
        if self.kind == "permuted":
            inverse = [self.order.index(d) for d in range(len(self.shape))]
            return values.permute(self.order).contiguous().permute(inverse)
        if self.kind == "sliced":
            dim = self.sliced_dim % len(self.shape)
            wide = list(self.shape)
            wide[dim] *= 2
            base = torch.zeros(wide, dtype=values.dtype)
            view = base.narrow(dim, 0, wide[dim])[(slice(None),) * dim + (slice(None, None, 2),)]
            view.copy_(values)
            return view
        return values.contiguous()

    def make(self, dtype: torch.dtype, scale: float = 2.0, offset: float = 0.5) -> Tensor:
        values = (torch.randn(self.shape, dtype=F64) * scale + offset).to(dtype)
        x = self.like(values)
        assert x.shape == self.shape
        assert x.is_contiguous() or self.kind != "contiguous"
        return x


LAYOUTS = [
    Layout("nchw", (4, 3, 5, 6)),
    Layout("channels-last", (4, 3, 5, 6), kind="channels_last"),
    Layout("sequence", (3, 4, 5), axis=-1),  # (N, L, C), features innermost
    Layout("dense", (12, 5)),
    Layout("3d", (4, 3, 7)),
    Layout("5d", (2, 3, 2, 3, 4)),
    Layout("5d-channels-last", (2, 3, 2, 3, 4), kind="channels_last_3d"),
    # dense, axes in memory in the order 1, 3, 2, 0 (features outermost): neither contiguous nor features innermost
    Layout("permuted", (4, 3, 5, 6), kind="permuted", order=(1, 3, 2, 0)),
    Layout("sliced-nchw", (4, 3, 5, 6), kind="sliced", sliced_dim=-1),
    Layout("sliced-sequence", (3, 4, 5), axis=-1, kind="sliced", sliced_dim=1),
]
LAYOUT_IDS = [layout.name for layout in LAYOUTS]


def test_the_layouts_are_what_they_say() -> None:
    for layout in LAYOUTS:
        x = layout.make(torch.float32)
        if layout.kind == "sliced":
            assert not x.is_contiguous()
            assert x.untyped_storage().nbytes() == 2 * x.numel() * x.element_size()
        elif layout.kind in ("channels_last", "channels_last_3d", "permuted"):
            assert not x.is_contiguous()
            assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
        elif layout.name == "sequence":
            assert x.stride(layout.feature) == 1


# --- float64 references -------------------------------------------------------------------------------------------


def _dims(x: Tensor, feature: int) -> list[int]:
    return [d for d in range(x.dim()) if d != feature]


def _b(vector: Tensor, x: Tensor, feature: int) -> Tensor:
    """A per-feature vector shaped to broadcast against ``x``."""
    shape = [1] * x.dim()
    shape[feature] = -1
    return vector.reshape(shape)


def _reference_stats(x: Tensor, feature: int) -> tuple[int, Tensor, Tensor]:
    x64 = x.detach().double()
    dims = _dims(x, feature)
    mean = x64.mean(dims)
    m2 = ((x64 - _b(mean, x, feature)) ** 2).sum(dims)
    return x.numel() // x.shape[feature], mean, m2


def _reference_batch_norm(
    x: Tensor,
    axis: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = EPS,
    grad_output: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor | None, Tensor | None]:
    """``F.batch_norm`` in float64 on contiguous copies: ``(y, gradients by name, new running mean and var)``."""
    feature = axis % x.dim()
    x64 = x.detach().double().movedim(feature, 1).contiguous().requires_grad_()
    w64 = None if weight is None else weight.detach().double().clone().requires_grad_()
    b64 = None if bias is None else bias.detach().double().clone().requires_grad_()
    rm64 = None if running_mean is None else running_mean.detach().double().clone()
    rv64 = None if running_var is None else running_var.detach().double().clone()
    y64 = F.batch_norm(x64, rm64, rv64, w64, b64, training, momentum, eps)
    grads: dict[str, Tensor] = {}
    if grad_output is not None:
        named = {name: t for name, t in (("x", x64), ("weight", w64), ("bias", b64)) if t is not None}
        g64 = grad_output.detach().double().movedim(feature, 1).contiguous()
        values = torch.autograd.grad(y64, list(named.values()), g64)
        grads = dict(zip(named, values))
        grads["x"] = grads["x"].movedim(1, feature)
    return y64.detach().movedim(1, feature), grads, rm64, rv64


def _input_grad_scale(x: Tensor, feature: int, weight: Tensor | None, dy: Tensor, eps: float = EPS) -> Tensor:
    """The natural size of the input gradient, per feature: ``invstd * |weight| * max|dy| * (1 + |mean| * invstd)``.

    The terms of ``dx`` are of size ``invstd * |weight| * |dy|`` and cancel (exactly, when a feature
    has two values); the mean, rounded to the accumulation dtype, is off by ``u * |mean|``, a
    relative error of ``u * |mean| * invstd`` in ``x_hat``.
    """
    _, mean, m2 = _reference_stats(x, feature)
    count = x.numel() // x.shape[feature]
    invstd = torch.rsqrt(m2 / count + eps)
    gain = invstd if weight is None else invstd * weight.detach().double().abs()
    peak = dy.detach().double().abs().amax(_dims(x, feature))
    return _b(gain * peak * (1 + mean.abs() * invstd), x, feature)


def _output_scale(x: Tensor, feature: int, weight: Tensor | None, expected: Tensor, eps: float = EPS) -> Tensor:
    """The natural size of a training output's error: ``1 + |y| + |mean| * invstd * |weight|``.

    The batch mean, rounded to the accumulation dtype, is off by ``u * |mean|``, which the
    normalization scales by ``invstd * |weight|`` (large when a feature's few values lie close).
    """
    _, mean, m2 = _reference_stats(x, feature)
    count = x.numel() // x.shape[feature]
    invstd = torch.rsqrt(m2 / count + eps)
    gain = invstd if weight is None else invstd * weight.detach().double().abs()
    return 1 + expected.double().abs() + _b(mean.abs() * gain, x, feature)


def _sum_scale(x: Tensor, feature: int, dy: Tensor, eps: float = EPS) -> Tensor:
    """The natural size of the parameter gradients' errors, per feature: ``sum |dy| (1 + |x_hat| + |mean| invstd)``."""
    count, mean, m2 = _reference_stats(x, feature)
    invstd = torch.rsqrt(m2 / count + eps)
    x_hat = (x.detach().double() - _b(mean, x, feature)) * _b(invstd, x, feature)
    terms = dy.detach().double().abs() * (1 + x_hat.abs() + _b(mean.abs() * invstd, x, feature))
    return terms.sum(_dims(x, feature))


def _check(
    actual: Tensor,
    expected: Tensor,
    what: str,
    dtype: torch.dtype,
    scale: Tensor | float | None = None,
    relative: float | None = None,
    ulps: float = 2.0,
) -> None:
    """``|actual - expected| <= ulps * u(dtype) * |expected| + relative * scale`` elementwise.

    ``scale`` defaults to ``1 + |expected|``; ``relative`` to ``1e-10`` for float64 and ``1e-5`` otherwise.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a64, e64 = actual.detach().double(), expected.detach().double()
    assert not (a64.isnan() & ~e64.isnan()).any(), f"{what}: NaN in the result"
    if relative is None:
        relative = 1e-10 if dtype == F64 else 1e-5
    if scale is None:
        scale = 1 + e64.abs()
    error = (a64 - e64).abs()
    bound = ulps * _roundoff(dtype) * e64.abs() + relative * scale
    excess = error - bound
    worst = excess.max().item() if excess.numel() else -1.0
    assert worst <= 0, f"{what}: error {error.max().item():.3g} exceeds the {dtype} tolerance"


# --- the four primitives, on every backend, layout and dtype -----------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_matches_the_float64_reference(backend: str, layout: Layout, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    x = layout.make(dtype, offset=3.0)
    count, mean, m2 = kernels.stats(x, layout.axis, backend=backend)
    expected_count, expected_mean, expected_m2 = _reference_stats(x, layout.feature)
    acc = _accumulation(dtype)
    assert count == expected_count
    assert isinstance(count, int)
    assert mean.dtype == acc
    assert m2.dtype == acc
    assert mean.shape == m2.shape == (layout.features,)
    std = (expected_m2 / count).sqrt()
    if backend == "exact" and dtype != F64:  # float64 arithmetic, rounded once to float32
        _check(mean, expected_mean, "mean", acc, scale=expected_mean.abs(), relative=1e-12, ulps=1.0)
        _check(m2, expected_m2, "m2", acc, scale=expected_m2, relative=1e-12, ulps=1.0)
    else:
        tolerance = 1e-12 if dtype == F64 else 2e-6
        _check(mean, expected_mean, "mean", acc, scale=expected_mean.abs() + std, relative=tolerance)
        _check(m2, expected_m2, "m2", acc, scale=expected_m2, relative=10 * tolerance)


def _per_feature(layout: Layout, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mean, invstd (from the reference), weight, bias: ``(C,)`` in the accumulation dtype."""
    acc = _accumulation(x.dtype)
    count, mean, m2 = _reference_stats(x, layout.feature)
    invstd = torch.rsqrt(m2 / count + EPS)
    weight = torch.linspace(-1.5, 1.5, layout.features, dtype=F64)
    bias = torch.linspace(-0.2, 0.3, layout.features, dtype=F64)
    return mean.to(acc), invstd.to(acc), weight.to(acc), bias.to(acc)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_matches_the_float64_reference(backend: str, layout: Layout, dtype_name: str, affine: bool) -> None:
    dtype = DTYPES[dtype_name]
    x = layout.make(dtype)
    mean, invstd, weight, bias = _per_feature(layout, x)
    w, b = (weight, bias) if affine else (None, None)
    y = kernels.normalize(x, mean, invstd, w, b, layout.axis, backend=backend)
    f = layout.feature
    centered = (x.double() - _b(mean.double(), x, f)) * _b(invstd.double(), x, f)
    expected = centered * _b(weight.double(), x, f) + _b(bias.double(), x, f) if affine else centered
    assert y.dtype == dtype
    assert y.shape == x.shape
    if layout.dense:
        assert y.stride() == x.stride(), "the memory layout is kept"
    if backend == "exact" and dtype != F64:  # float64 arithmetic, rounded (PyTorch may round via float32)
        _check(y, expected, "y", dtype, relative=1e-12, ulps=2.0)
    else:
        _check(y, expected, "y", dtype, relative=1e-10 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_sums_match_the_float64_reference(backend: str, layout: Layout, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    x = layout.make(dtype)
    dy = layout.make(dtype, scale=1.0, offset=0.3)
    mean, invstd, _, _ = _per_feature(layout, x)
    sum_dy, sum_dy_xhat = kernels.grad_sums(dy, x, mean, invstd, layout.axis, backend=backend)
    f, dims = layout.feature, _dims(x, layout.feature)
    x_hat = (x.double() - _b(mean.double(), x, f)) * _b(invstd.double(), x, f)
    g = dy.double()
    acc = _accumulation(dtype)
    assert sum_dy.dtype == sum_dy_xhat.dtype == acc
    for name, actual, terms in (("sum_dy", sum_dy, g), ("sum_dy_xhat", sum_dy_xhat, g * x_hat)):
        magnitude = terms.abs().sum(dims)
        if backend == "exact" and dtype != F64:
            _check(actual, terms.sum(dims), name, acc, scale=magnitude, relative=1e-13, ulps=1.0)
        else:
            _check(actual, terms.sum(dims), name, acc, scale=magnitude, relative=1e-13 if dtype == F64 else 1e-5)


def _reference_grad_input(
    dy: Tensor,
    x: Tensor,
    feature: int,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: float,
) -> tuple[Tensor, Tensor]:
    """The closed form ``invstd * w * (dy - sum_dy / m - x_hat * sum_dy_xhat / m)`` and its natural scale."""
    s = _b(invstd.double(), x, feature)
    gain = s if weight is None else s * _b(weight.double(), x, feature)
    x_hat = (x.double() - _b(mean.double(), x, feature)) * s
    g = dy.double()
    mean_dy = _b(sum_dy.double(), x, feature) / count
    mean_dy_xhat = _b(sum_dy_xhat.double(), x, feature) / count
    dx = gain * (g - mean_dy - x_hat * mean_dy_xhat)
    scale = gain.abs() * (g.abs() + mean_dy.abs() + x_hat.abs() * mean_dy_xhat.abs())
    return dx, scale


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_input_matches_the_float64_reference(backend: str, layout: Layout, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    x = layout.make(dtype)
    dy = layout.make(dtype, scale=1.0, offset=0.3)
    mean, invstd, weight, _ = _per_feature(layout, x)
    f, dims = layout.feature, _dims(x, layout.feature)
    x_hat = (x.double() - _b(mean.double(), x, f)) * _b(invstd.double(), x, f)
    acc = _accumulation(dtype)
    sum_dy, sum_dy_xhat = dy.double().sum(dims).to(acc), (dy.double() * x_hat).sum(dims).to(acc)
    count = x.numel() // layout.features
    for w in (weight, None):
        dx = kernels.grad_input(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat, count, layout.axis, backend=backend)
        expected, scale = _reference_grad_input(dy, x, f, mean, invstd, w, sum_dy, sum_dy_xhat, count)
        assert dx.dtype == dtype
        assert dx.shape == x.shape
        if layout.dense:
            assert dx.stride() == x.stride(), "the memory layout is kept"
        if backend == "exact" and dtype != F64:
            _check(dx, expected, "dx", dtype, scale=scale, relative=1e-13, ulps=2.0)
        else:
            _check(dx, expected, "dx", dtype, scale=scale, relative=1e-13 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_sums_and_grad_input_take_a_gradient_in_another_layout(backend: str) -> None:
    """dy contiguous while x is channels-last (and the reverse): the sums and dx do not depend on dy's strides."""
    layout = LAYOUTS[1]
    x = layout.make(torch.float32)
    mean, invstd, weight, _ = _per_feature(layout, x)
    dy_values = torch.randn(layout.shape)
    for x_, dy in ((x, dy_values.contiguous()), (x.contiguous(), layout.like(dy_values))):
        sums = kernels.grad_sums(dy, x_, mean, invstd, 1, backend=backend)
        dims = _dims(x_, 1)
        x_hat = (x_.double() - _b(mean.double(), x_, 1)) * _b(invstd.double(), x_, 1)
        _check(sums[0], dy.double().sum(dims), "sum_dy", torch.float32, scale=dy.double().abs().sum(dims))
        _check(sums[1], (dy.double() * x_hat).sum(dims), "sum_dy_xhat", torch.float32,
               scale=(dy.double() * x_hat).abs().sum(dims))  # fmt: skip
        count = x_.numel() // 3
        dx = kernels.grad_input(dy, x_, mean, invstd, weight, sums[0], sums[1], count, 1, backend=backend)
        expected, scale = _reference_grad_input(dy, x_, 1, mean, invstd, weight, sums[0], sums[1], count)
        _check(dx, expected, "dx", torch.float32, scale=scale, relative=1e-6)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_applies_an_activation(backend: str, activation: str) -> None:
    layout = LAYOUTS[1]
    x = layout.make(torch.float32)
    mean, invstd, weight, bias = _per_feature(layout, x)
    functions: dict[str, Callable[[Tensor], Tensor]] = {
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
    }
    centered = (x.double() - _b(mean.double(), x, 1)) * _b(invstd.double(), x, 1)
    expected = functions[activation](centered * _b(weight.double(), x, 1) + _b(bias.double(), x, 1))
    y = kernels.normalize(x, mean, invstd, weight, bias, 1, activation=activation, backend=backend)
    _check(y, expected, activation, torch.float32, relative=1e-6)
    assert y.stride() == x.stride()
    # Differentiable when the input needs a gradient (the torch backends): the activation out of place.
    if backend != "native":
        xg = x.detach().clone().requires_grad_()
        y = kernels.normalize(xg, mean, invstd, weight, bias, 1, activation=activation, backend=backend)
        (grad,) = torch.autograd.grad(y.sum(), xg)
        x64 = x.detach().double().requires_grad_()
        centered = (x64 - _b(mean.double(), x, 1)) * _b(invstd.double(), x, 1)
        y64 = functions[activation](centered * _b(weight.double(), x, 1) + _b(bias.double(), x, 1))
        (grad64,) = torch.autograd.grad(y64.sum(), x64)
        _check(grad, grad64, "activation gradient", torch.float32, relative=1e-5)


def test_normalize_rejects_an_unknown_activation() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="activation"):
        kernels.normalize(x, torch.zeros(3), torch.ones(3), activation="gelu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_primitives_on_a_constant_feature(backend: str) -> None:
    """A feature whose values are all equal, far from zero: m2 == 0, x_hat == 0, dx == 0, no NaN."""
    for dtype in (torch.float32, F64, torch.bfloat16):
        x = torch.randn(6, 3, 5, dtype=F64).to(dtype)
        x[:, 1] = 1000.0
        count, mean, m2 = kernels.stats(x, 1, backend=backend)
        assert mean[1].item() == 1000.0
        assert m2[1].item() == 0.0
        invstd = torch.rsqrt(m2 / count + EPS)
        y = kernels.normalize(x, mean, invstd, None, torch.full((3,), 0.25, dtype=mean.dtype), 1, backend=backend)
        assert torch.equal(y[:, 1].double(), torch.full_like(y[:, 1], 0.25).double())
        dy = torch.randn_like(x)
        sums = kernels.grad_sums(dy, x, mean, invstd, 1, backend=backend)
        assert sums[1][1].item() == 0.0
        dx = kernels.grad_input(dy, x, mean, invstd, None, *sums, count, 1, backend=backend)
        assert dx.isfinite().all()
        expected = (dy[:, 1].double() - dy[:, 1].double().mean()) / math.sqrt(EPS)
        _check(dx[:, 1], expected, "dx of the constant feature", dtype, scale=expected.abs().max(), relative=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_of_offset_data_keep_the_variance(backend: str) -> None:
    """|mean| / std = 2e5 in float32: a variance from E[x^2] - E[x]^2 would be noise; the shifted sums keep it."""
    x = (1e4 + 0.05 * torch.randn(32, 8, 50, dtype=F64)).float()
    count, mean, m2 = kernels.stats(x, 1, backend=backend)
    expected_count, expected_mean, expected_m2 = _reference_stats(x, 1)
    assert count == expected_count
    torch.testing.assert_close(m2.double(), expected_m2, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-7, atol=0)


def test_the_primitives_reject_a_bad_axis_or_backend() -> None:
    x = torch.randn(4, 3)
    v = torch.ones(3)
    with pytest.raises(ValueError, match="out of range"):
        kernels.stats(x, 2)
    with pytest.raises(ValueError, match="out of range"):
        kernels.normalize(x, v, v, axis=-3)
    with pytest.raises(ValueError, match="out of range"):
        kernels.grad_sums(x, x, v, v, 5)
    with pytest.raises(ValueError, match="out of range"):
        kernels.grad_input(x, x, v, v, None, v, v, 4, 2)
    with pytest.raises(ValueError, match="expected backend to be one of native, torch, exact, triton, got 'cuda'"):
        kernels.stats(x, backend="cuda")
    with pytest.raises(ValueError, match="expected backend"):
        kernels.normalize(x, v, v, backend="auto")


@requires_native
def test_the_primitives_default_to_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """No backend given: native under auto (for a CPU input it takes), the forced one otherwise."""
    calls: list[str] = []
    original = native.stats

    def spy(x: Tensor, axis: int) -> Tensor | None:
        calls.append("native")
        return original(x, axis)

    monkeypatch.setattr(native, "stats", spy)
    x = torch.randn(6, 3) + 1000.0
    kernels.stats(x)
    assert calls == ["native"]
    for setting in ("torch", "exact"):
        with kernels.use_kernel(setting):
            kernels.stats(x)
    assert calls == ["native"]
    with kernels.use_kernel("native"):
        kernels.stats(x)
    assert calls == ["native", "native"]
    # exact: float64 arithmetic rounded once; the torch backend accumulates in float32
    with kernels.use_kernel("exact"):
        _, mean, _ = kernels.stats(x)
    assert torch.equal(mean, x.double().mean(0).float())


# --- merging statistics, and synchronized BN from the primitives --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("shape", "axis", "split_dim", "first"),
    [((8, 3, 5), 1, 0, 4), ((8, 3, 5), 1, 0, 1), ((8, 3, 5), 1, 2, 2), ((4, 6, 5), -1, 1, 5), ((9, 4), 1, 0, 3)],
    ids=["halves", "one-and-seven", "along-positions", "sequence", "dense"],
)
def test_merged_stats_of_two_parts_equal_the_stats_of_the_whole(
    backend: str, shape: tuple[int, ...], axis: int, split_dim: int, first: int
) -> None:
    x = torch.randn(shape, dtype=F64) * 3 + 7
    a, b = x.narrow(split_dim, 0, first), x.narrow(split_dim, first, shape[split_dim] - first)
    feature = axis % x.dim()
    count, mean, m2 = kernels.merge_stats(
        kernels.stats(a, axis, backend=backend), kernels.stats(b, axis, backend=backend)
    )
    expected_count, expected_mean, expected_m2 = _reference_stats(x, feature)
    assert count == expected_count
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m2, expected_m2, rtol=1e-12, atol=1e-12)
    # merging is symmetric
    swapped = kernels.merge_stats(kernels.stats(b, axis, backend=backend), kernels.stats(a, axis, backend=backend))
    torch.testing.assert_close(swapped[1], expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(swapped[2], expected_m2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merging_with_an_empty_part_changes_nothing(backend: str) -> None:
    x = torch.randn(8, 3, 5, dtype=F64) * 3 + 7
    empty = kernels.stats(x[:0], 1, backend=backend)
    assert empty[0] == 0
    whole = kernels.stats(x, 1, backend=backend)
    expected_count, expected_mean, expected_m2 = _reference_stats(x, 1)
    for merged in (kernels.merge_stats(empty, whole), kernels.merge_stats(whole, empty)):
        assert merged[0] == expected_count
        torch.testing.assert_close(merged[1], expected_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged[2], expected_m2, rtol=1e-12, atol=1e-12)
    nothing = kernels.merge_stats(empty, empty)
    assert nothing[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_grad_input_with_a_count_larger_than_the_local_values(backend: str, dtype: torch.dtype) -> None:
    """Synchronized BN: the sums and ``count`` are global, ``dy`` and ``x`` local; the formula with that count."""
    x = torch.randn(4, 3, 5, dtype=F64).to(dtype)
    dy = torch.randn(4, 3, 5, dtype=F64).to(dtype)
    acc = _accumulation(dtype)
    mean = torch.tensor([0.1, -0.2, 0.3], dtype=acc)
    invstd = torch.tensor([1.5, 0.7, 1.1], dtype=acc)
    weight = torch.tensor([0.9, -1.2, 0.4], dtype=acc)
    sum_dy = torch.tensor([3.0, -1.0, 0.5], dtype=acc)
    sum_dy_xhat = torch.tensor([-2.0, 4.0, 1.5], dtype=acc)
    count = 3 * 20  # three processes of 20 values per feature
    dx = kernels.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, 1, backend=backend)
    expected, scale = _reference_grad_input(dy, x, 1, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
    _check(dx, expected, "dx", dtype, scale=scale, relative=1e-13 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_synchronized_batch_norm_from_the_primitives_equals_one_big_batch(backend: str) -> None:
    """Three "processes" with parts of a batch: stats merged, sums added, grad_input with the global count."""
    x = torch.randn(9, 3, 4, dtype=F64) * 2 + 1
    dy = torch.randn(9, 3, 4, dtype=F64)
    weight = torch.tensor([0.5, 1.0, -1.5], dtype=F64)
    bias = torch.tensor([0.1, 0.0, -0.3], dtype=F64)
    parts = [x.narrow(0, start, size) for start, size in ((0, 2), (2, 3), (5, 4))]
    grads = [dy.narrow(0, start, size) for start, size in ((0, 2), (2, 3), (5, 4))]
    merged = kernels.stats(parts[0], 1, backend=backend)
    for part in parts[1:]:
        merged = kernels.merge_stats(merged, kernels.stats(part, 1, backend=backend))
    count, mean, m2 = merged
    invstd = torch.rsqrt(m2 / count + EPS)
    y = torch.cat([kernels.normalize(p, mean, invstd, weight, bias, 1, backend=backend) for p in parts])
    local_sums = [kernels.grad_sums(g, p, mean, invstd, 1, backend=backend) for g, p in zip(grads, parts)]
    sum_dy = torch.stack([s[0] for s in local_sums]).sum(0)
    sum_dy_xhat = torch.stack([s[1] for s in local_sums]).sum(0)
    dx = torch.cat(
        [
            kernels.grad_input(g, p, mean, invstd, weight, sum_dy, sum_dy_xhat, count, 1, backend=backend)
            for g, p in zip(grads, parts)
        ]
    )
    expected_y, expected_grads, _, _ = _reference_batch_norm(x, 1, weight, bias, grad_output=dy)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, expected_grads["x"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum_dy_xhat, expected_grads["weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum_dy, expected_grads["bias"], rtol=1e-12, atol=1e-12)


# --- the setting ----------------------------------------------------------------------------------------------------


@contextmanager
def _environment(value: str | None) -> Iterator[None]:
    """``$BATCHNORM_KERNEL`` set to ``value`` (unset for None) and re-read; restored and re-read afterwards."""
    previous = os.environ.get(kernels.KERNEL_ENV_VAR)
    try:
        if value is None:
            os.environ.pop(kernels.KERNEL_ENV_VAR, None)
        else:
            os.environ[kernels.KERNEL_ENV_VAR] = value
        kernels.set_kernel(None)
        yield
    finally:
        if previous is None:
            os.environ.pop(kernels.KERNEL_ENV_VAR, None)
        else:
            os.environ[kernels.KERNEL_ENV_VAR] = previous
        kernels.set_kernel(None)


def test_use_kernel_forces_and_restores() -> None:
    before = kernels.get_kernel()
    with kernels.use_kernel("torch"):
        assert kernels.get_kernel() == "torch"
        with kernels.use_kernel("exact"):
            assert kernels.get_kernel() == "exact"
        assert kernels.get_kernel() == "torch"
    assert kernels.get_kernel() == before
    with pytest.raises(RuntimeError, match="boom"), kernels.use_kernel("exact"):
        raise RuntimeError("boom")
    assert kernels.get_kernel() == before


def test_set_kernel_and_the_environment_variable() -> None:
    with _environment("Torch "):
        assert kernels.get_kernel() == "torch"
        kernels.set_kernel("exact")
        assert kernels.get_kernel() == "exact"
        kernels.set_kernel(None)  # back to the environment
        assert kernels.get_kernel() == "torch"
    with _environment("fastest"):
        with pytest.raises(ValueError, match=r"expected BATCHNORM_KERNEL to be one of auto, native, torch, exact"):
            kernels.get_kernel()
        with kernels.use_kernel("native"):  # a forced setting does not read the environment
            assert kernels.get_kernel() == "native"
    with _environment(None):
        assert kernels.get_kernel() == "auto"


def test_the_setting_is_per_thread() -> None:
    import threading

    seen: list[str] = []
    outside = kernels.get_kernel()
    with kernels.use_kernel("exact" if outside != "exact" else "torch"):
        thread = threading.Thread(target=lambda: seen.append(kernels.get_kernel()))
        thread.start()
        thread.join()
    assert seen == [outside]


def test_an_unknown_kernel_is_rejected() -> None:
    assert kernels.KERNELS == ("auto", "native", "torch", "exact")
    with pytest.raises(ValueError, match=r"expected kernel to be one of auto, native, torch, exact, got 'cuda'"):
        kernels.set_kernel("cuda")
    with pytest.raises(ValueError, match="got 'eager'"), kernels.use_kernel("eager"):
        pass
    assert kernels.get_kernel() == "auto"


# --- plan: which route and backend each call gets -----------------------------------------------------------------


def _route(chosen: kernels.Plan) -> tuple[str, str]:
    return chosen.route, chosen.backend


@requires_native
def test_plan_on_the_cpu_with_native_kernels() -> None:
    for dtype in (torch.float32, F64, torch.bfloat16):
        x = torch.randn(4, 3, 5).to(dtype)
        chosen = kernels.plan(x, True)
        assert _route(chosen) == ("fused", "native")
        assert chosen.fallback is not None
        assert _route(chosen.fallback) == ("function", "native")
        assert chosen.host_checks
        evaluated = kernels.plan(x, False)
        assert _route(evaluated) == ("fused", "native")
        assert evaluated.fallback is not None
        assert _route(evaluated.fallback) == ("composite", "torch")
    with kernels.use_kernel("native"):
        assert _route(kernels.plan(torch.randn(4, 3), True)) == ("fused", "native")


@requires_native
def test_plan_of_eval_with_a_gradient_is_fused() -> None:
    x = torch.randn(4, 3, 5)
    weight, bias = torch.ones(3), torch.zeros(3)
    for args in (
        (x.clone().requires_grad_(), weight, bias),
        (x, weight.clone().requires_grad_(), bias),
        (x, weight, bias.clone().requires_grad_()),
    ):
        assert _route(kernels.plan(args[0], False, args[1], args[2])) == ("fused", "native")
        with torch.no_grad():
            assert _route(kernels.plan(args[0], False, args[1], args[2])) == ("fused", "native")
        assert _route(kernels.plan(args[0], True, args[1], args[2])) == ("fused", "native")


def test_plan_of_an_empty_input_is_composite() -> None:
    for shape in ((0, 3), (4, 3, 0), (4, 0)):
        for training in (True, False):
            chosen = kernels.plan(torch.empty(shape), training)
            assert _route(chosen) == ("composite", "torch")
            assert chosen.host_checks


def test_plan_when_forced() -> None:
    x = torch.randn(4, 3, 5)
    for setting in ("torch", "exact"):
        with kernels.use_kernel(setting):
            train = kernels.plan(x, True)
            assert _route(train) == ("function", setting)
            assert train.fallback is None
            assert "forced" in train.reason
            assert _route(kernels.plan(x, False)) == ("composite", setting)
            assert _route(kernels.plan(x.requires_grad_(), False)) == ("composite", setting)
            x = x.detach()


def test_plan_inside_torch_compile() -> None:
    seen: list[kernels.Plan] = []

    def step(t: Tensor) -> Tensor:
        seen.append(kernels.plan(t, True))
        seen.append(kernels.plan(t, False))
        return t * 2

    with kernels.use_kernel("exact"):  # even forced: a tracer cannot run the Python node or read results
        torch.compile(step, backend="eager", fullgraph=True)(torch.randn(4, 3))
    assert len(seen) == 2
    for chosen in seen:
        assert _route(chosen) == ("composite", "torch")
        assert chosen.host_checks is False
    assert _route(kernels.plan(torch.randn(4, 3), True)) != ("composite", "torch")  # outside again


def test_plan_inside_torch_jit_trace() -> None:
    seen: list[kernels.Plan] = []

    def step(t: Tensor) -> Tensor:
        seen.append(kernels.plan(t, True))
        return t * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent PyTorch
        torch.jit.trace(step, torch.randn(4, 3), check_trace=False)  # type: ignore[no-untyped-call]
    assert seen
    assert all(_route(chosen) == ("composite", "torch") and not chosen.host_checks for chosen in seen)


def test_plan_under_vmap() -> None:
    seen: list[kernels.Plan] = []

    def step(t: Tensor) -> Tensor:
        seen.append(kernels.plan(t, True))
        return t

    torch.func.vmap(step)(torch.randn(2, 4, 3))
    assert len(seen) == 1
    assert _route(seen[0]) == ("composite", "torch")
    assert seen[0].host_checks is False


@pytest.mark.parametrize("dual", ["input", "weight", "bias"])
def test_plan_with_a_forward_mode_tangent(dual: str) -> None:
    x, weight, bias = torch.randn(4, 3), torch.ones(3), torch.zeros(3)
    with forward_ad.dual_level(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # make_dual loads decompositions that use torch.jit.script
        values = {"input": x, "weight": weight, "bias": bias}
        values[dual] = forward_ad.make_dual(values[dual], torch.ones_like(values[dual]))  # type: ignore[no-untyped-call]
        for training in (True, False):
            chosen = kernels.plan(values["input"], training, values["weight"], values["bias"])
            assert _route(chosen) == ("composite", "torch")
            assert chosen.host_checks is False
        with kernels.use_kernel("exact"):
            assert _route(kernels.plan(values["input"], True, values["weight"], values["bias"])) == (
                "composite",
                "torch",
            )


def _without_native(monkeypatch: pytest.MonkeyPatch) -> None:
    library = native._Library()
    library.tried, library.loaded, library.problem = True, False, "no C compiler found (test)"
    monkeypatch.setattr(native, "_library", library)
    monkeypatch.setattr(native, "_CODES", {})


def test_plan_without_native_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_native(monkeypatch)
    x = torch.randn(4, 3, 5)
    for setting in ("auto", "native"):
        with kernels.use_kernel(setting):
            assert _route(kernels.plan(x, True)) == ("function", "torch")
            assert _route(kernels.plan(x, False)) == ("composite", "torch")
    # every setting still computes the right numbers, and the primitives fall back to torch
    for setting in SETTINGS:
        with kernels.use_kernel(setting):
            y = batch_norm(x, None, None, training=True)
        torch.testing.assert_close(y.double(), _reference_batch_norm(x, 1)[0], rtol=1e-5, atol=2e-6)
    _, mean, _ = kernels.stats(x, backend="native")
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2)), rtol=1e-6, atol=1e-7)


@requires_native
def test_plan_of_a_dtype_the_library_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a compiler without _Float16: float16 is then not native, and the numbers still match."""
    monkeypatch.setattr(native, "_CODES", {torch.float16: None})
    x = torch.randn(8, 3, 5).half()
    assert _route(kernels.plan(x, True)) == ("function", "torch")
    assert _route(kernels.plan(x, False)) == ("composite", "torch")
    assert _route(kernels.plan(x.float(), True)) == ("fused", "native")
    for training in (True, False):
        y = batch_norm(x, torch.zeros(3), torch.ones(3), None, None, training)
        expected = _reference_batch_norm(x, 1, None, None, torch.zeros(3), torch.ones(3), training)[0]
        _check(y, expected, "y", torch.float16, relative=1e-5)


def test_plan_describes_itself_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    chosen = kernels.plan(torch.randn(6, 4), True)
    text = chosen.describe()
    assert text.startswith(f"{chosen.route} route, {chosen.backend} kernels: ")
    if chosen.fallback is not None:
        assert f"(else {chosen.fallback.route} route, {chosen.fallback.backend} kernels)" in text
    with caplog.at_level(logging.DEBUG, logger="batchnorm.kernels"):
        batch_norm(torch.randn(6, 4), None, None, training=True)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("batch norm train (6, 4) torch.float32: ") for m in messages), messages


def test_without_native_kernels_in_a_subprocess() -> None:
    """``BATCHNORM_NATIVE=0``: plan says function/torch, and a train + eval step matches F.batch_norm in float64."""
    script = r"""
import json
import torch
import torch.nn.functional as F
from batchnorm import kernels
from batchnorm.functional import batch_norm
from batchnorm.kernels import native

torch.manual_seed(0)
x = torch.randn(8, 3, 5, dtype=torch.float64) * 2 + 1
w = torch.linspace(0.5, 1.5, 3, dtype=torch.float64)
b = torch.linspace(-0.2, 0.3, 3, dtype=torch.float64)
ours = [t.clone().requires_grad_() for t in (x, w, b)]
theirs = [t.clone().requires_grad_() for t in (x, w, b)]
rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
rm2, rv2 = rm.clone(), rv.clone()
train, evaluate = kernels.plan(ours[0], True), kernels.plan(x, False)
y = batch_norm(ours[0], rm, rv, ours[1], ours[2], True, 0.1, 1e-5)
expected = F.batch_norm(theirs[0], rm2, rv2, theirs[1], theirs[2], True, 0.1, 1e-5)
g = torch.randn_like(x)
grads = torch.autograd.grad(y, ours, g)
expected_grads = torch.autograd.grad(expected, theirs, g)
e = batch_norm(x, rm, rv, w, b, False)
expected_e = F.batch_norm(x, rm2, rv2, w, b, False)
errors = [(a - b).abs().max().item() for a, b in [(y, expected), (rm, rm2), (rv, rv2), (e, expected_e),
                                                    *zip(grads, expected_grads)]]
print(json.dumps({"available": native.available(), "failure": native.failure(),
                  "train": [train.route, train.backend], "eval": [evaluate.route, evaluate.backend],
                  "error": max(errors)}))
"""
    env = {**os.environ, native.NATIVE_ENV_VAR: "0"}
    env.pop(kernels.KERNEL_ENV_VAR, None)
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["available"] is False
    assert "BATCHNORM_NATIVE" in result["failure"]
    assert result["train"] == ["function", "torch"]
    assert result["eval"] == ["composite", "torch"]
    assert result["error"] < 1e-12


# --- the op on every setting, layout and dtype --------------------------------------------------------------------


def _tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"relative": 1e-10} if dtype == F64 else {"relative": 1e-5}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_batch_norm_matches_torch_in_float64(setting: str, layout: Layout, dtype_name: str) -> None:
    """Training (output, three gradients, running statistics, counter), then eval, against F.batch_norm in float64."""
    dtype = DTYPES[dtype_name]
    acc = _accumulation(dtype)
    x = layout.make(dtype).requires_grad_()
    weight = torch.linspace(0.5, 1.5, layout.features, dtype=acc).requires_grad_()
    bias = torch.linspace(-0.2, 0.3, layout.features, dtype=acc).requires_grad_()
    running_mean = torch.linspace(-0.5, 0.5, layout.features, dtype=acc)
    running_var = torch.linspace(0.5, 2.0, layout.features, dtype=acc)
    counter = torch.tensor(3)
    old = (running_mean.clone(), running_var.clone())
    grad_output = layout.like(torch.randn(layout.shape, dtype=F64).to(dtype))
    with kernels.use_kernel(setting):
        y = batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, EPS, layout.axis,
                       num_batches_tracked=counter)  # fmt: skip
        grads = torch.autograd.grad(y, (x, weight, bias), grad_output)
    expected, expected_grads, mean64, var64 = _reference_batch_norm(
        x, layout.axis, weight, bias, *old, grad_output=grad_output
    )
    assert y.dtype == dtype
    assert y.shape == x.shape
    if layout.dense:
        assert y.stride() == x.stride()
    _check(y, expected, "y", dtype, scale=_output_scale(x, layout.feature, weight, expected), **_tolerances(dtype))
    assert grads[0].dtype == dtype
    scale = _input_grad_scale(x, layout.feature, weight, grad_output)
    _check(grads[0], expected_grads["x"], "grad x", dtype, scale=scale, **_tolerances(dtype))
    for name, grad in zip(("weight", "bias"), grads[1:]):
        assert grad.dtype == acc
        scale = _sum_scale(x, layout.feature, grad_output)
        _check(grad, expected_grads[name], f"grad {name}", acc, scale=scale, **_tolerances(dtype))
    assert mean64 is not None
    assert var64 is not None
    _check(running_mean, mean64, "running_mean", acc, **_tolerances(dtype))
    _check(running_var, var64, "running_var", acc, **_tolerances(dtype))
    assert counter.item() == 4

    with kernels.use_kernel(setting):
        evaluated = batch_norm(x.detach(), running_mean, running_var, weight.detach(), bias.detach(), False, 0.1,
                               EPS, layout.axis)  # fmt: skip
    expected_eval = _reference_batch_norm(x, layout.axis, weight, bias, running_mean, running_var, False)[0]
    if layout.dense:
        assert evaluated.stride() == x.stride()
    _check(evaluated, expected_eval, "eval y", dtype, **_tolerances(dtype))


@pytest.mark.parametrize("setting", SETTINGS)
def test_eval_with_gradients_on_every_setting(setting: str) -> None:
    layout = LAYOUTS[1]
    x = layout.make(torch.float32).requires_grad_()
    weight = torch.linspace(0.5, 1.5, 3).requires_grad_()
    bias = torch.linspace(-0.2, 0.3, 3).requires_grad_()
    running_mean, running_var = torch.linspace(-0.5, 0.5, 3), torch.linspace(0.5, 2.0, 3)
    grad_output = torch.randn(layout.shape)
    with kernels.use_kernel(setting):
        y = batch_norm(x, running_mean, running_var, weight, bias, False)
        grads = torch.autograd.grad(y, (x, weight, bias), grad_output)
    expected, expected_grads, _, _ = _reference_batch_norm(
        x, 1, weight, bias, running_mean, running_var, False, grad_output=grad_output
    )
    _check(y, expected, "y", torch.float32)
    for name, grad in zip(("x", "weight", "bias"), grads):
        _check(grad, expected_grads[name], f"grad {name}", torch.float32, scale=expected_grads[name].abs().max() + 1)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 5), 1), ((5, 4, 3), -1)], ids=["channels-first", "feature-last"])
def test_double_backward_on_every_setting(setting: str, shape: tuple[int, ...], axis: int) -> None:
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    weight = torch.rand(shape[axis], dtype=F64, requires_grad=True)
    bias = torch.rand(shape[axis], dtype=F64, requires_grad=True)

    def function(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return batch_norm(t, None, None, w, b, True, axis=axis)

    with kernels.use_kernel(setting):
        assert torch.autograd.gradcheck(function, (x, weight, bias))
        assert torch.autograd.gradgradcheck(function, (x, weight, bias))


@pytest.mark.parametrize("setting", SETTINGS)
def test_only_parameter_gradients_when_the_input_needs_none(setting: str) -> None:
    x = torch.randn(6, 3, 4, dtype=F64)
    weight = torch.rand(3, dtype=F64, requires_grad=True)
    bias = torch.rand(3, dtype=F64, requires_grad=True)
    grad_output = torch.randn(6, 3, 4, dtype=F64)
    with kernels.use_kernel(setting):
        y = batch_norm(x, None, None, weight, bias, True)
        grads = torch.autograd.grad(y, (weight, bias), grad_output)
    _, expected, _, _ = _reference_batch_norm(x, 1, weight, bias, grad_output=grad_output)
    torch.testing.assert_close(grads[0], expected["weight"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[1], expected["bias"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("setting", SETTINGS)
def test_offset_data_is_at_least_as_accurate_as_torch(setting: str) -> None:
    """float32 data with mean 1e4 and std 0.05: a stable variance and ``(x - mean) * scale`` keep the output."""
    generator = torch.Generator().manual_seed(1234)
    for shape, axis in (((64, 16, 8, 8), 1), ((512, 16), 1), ((8, 64, 16), -1)):
        x = 1e4 + 0.05 * torch.randn(shape, generator=generator)
        exact = F.batch_norm(x.double().movedim(axis, 1), None, None, training=True)
        torch_error = (F.batch_norm(x.movedim(axis, 1), None, None, training=True).double() - exact).abs().max().item()
        with kernels.use_kernel(setting):
            ours = batch_norm(x, None, None, training=True, axis=axis).movedim(axis, 1)
        error = (ours.double() - exact).abs().max().item()
        assert error <= max(torch_error, 4e-3), (shape, error, torch_error)
        assert error < 0.02


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("dtype_name", ["float32", "float64", "bfloat16"])
def test_a_constant_feature_gives_the_bias_and_finite_gradients(setting: str, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    x = torch.randn(6, 3, 5, dtype=F64).to(dtype)
    x[:, 2] = 1e4
    x.requires_grad_()
    bias = torch.tensor([0.0, 0.0, 0.25], dtype=_accumulation(dtype))
    grad_output = torch.randn(6, 3, 5, dtype=F64).to(dtype)
    with kernels.use_kernel(setting):
        y = batch_norm(x, None, None, None, bias, True)
        (grad,) = torch.autograd.grad(y, x, grad_output)
    assert torch.equal(y[:, 2].double(), torch.full((6, 5), 0.25, dtype=F64))
    assert grad.isfinite().all()
    expected, expected_grads, _, _ = _reference_batch_norm(x, 1, None, bias, grad_output=grad_output)
    _check(y, expected, "y", dtype, **_tolerances(dtype))
    scale = _input_grad_scale(x, 1, None, grad_output)
    _check(grad, expected_grads["x"], "grad x", dtype, scale=scale, **_tolerances(dtype))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_a_nonfinite_batch_raises_or_is_skipped_on_every_setting(setting: str, value: float) -> None:
    x = torch.randn(8, 3, 5)
    x[2, 1, 3] = value
    running_mean, running_var, counter = torch.zeros(3), torch.ones(3), torch.tensor(5)
    with kernels.use_kernel(setting):
        with pytest.raises(NonfiniteBatchError):
            batch_norm(
                x.requires_grad_(), running_mean, running_var, None, None, True, 0.1, num_batches_tracked=counter
            )
        assert torch.equal(running_mean, torch.zeros(3))
        assert torch.equal(running_var, torch.ones(3))
        assert counter.item() == 5
        y = batch_norm(x.detach(), running_mean, running_var, None, None, True, None, num_batches_tracked=counter,
                       nonfinite="skip")  # fmt: skip
        assert torch.equal(running_mean, torch.zeros(3))
        assert torch.equal(running_var, torch.ones(3))
        assert counter.item() == 5
        # the features without the bad value are normalized as usual
        expected = _reference_batch_norm(x, 1)[0]
        for feature in (0, 2):
            _check(y[:, feature], expected[:, feature], f"y feature {feature}", torch.float32)
        # and without running statistics nothing is checked
        assert batch_norm(x.detach(), None, None, None, None, True).shape == x.shape


# --- the fused route's fallback: arguments the operator declines --------------------------------------------------

FALLBACK_CASES: dict[str, Callable[[], dict[str, Tensor]]] = {
    "strided-weight": lambda: {"weight": torch.linspace(0.5, 1.5, 6)[::2]},
    "strided-bias": lambda: {"bias": torch.linspace(-0.2, 0.3, 6)[::2]},
    "float64-weight": lambda: {"weight": torch.linspace(0.5, 1.5, 3, dtype=F64)},
    "float64-weight-and-bias": lambda: {
        "weight": torch.linspace(0.5, 1.5, 3, dtype=F64),
        "bias": torch.linspace(-0.2, 0.3, 3, dtype=F64),
    },
    "bfloat16-weight": lambda: {"weight": torch.linspace(0.5, 1.5, 3).bfloat16()},
    "strided-running-stats": lambda: {
        "running_mean": torch.linspace(-0.5, 0.5, 6)[::2],
        "running_var": torch.linspace(0.5, 2.0, 6)[::2],
    },
    "float64-running-stats": lambda: {
        "running_mean": torch.linspace(-0.5, 0.5, 3, dtype=F64),
        "running_var": torch.linspace(0.5, 2.0, 3, dtype=F64),
    },
    "int32-counter": lambda: {"counter": torch.tensor(3, dtype=torch.int32)},
    "strided-everything": lambda: {
        "weight": torch.linspace(0.5, 1.5, 9)[::3],
        "bias": torch.linspace(-0.2, 0.3, 9)[::3],
        "running_mean": torch.linspace(-0.5, 0.5, 6)[::2],
        "running_var": torch.linspace(0.5, 2.0, 6)[::2],
    },
}


def _fallback_arguments(case: str) -> dict[str, Tensor]:
    arguments = {
        "x": torch.randn(8, 3, 5) * 2 + 0.5,
        "weight": torch.linspace(0.5, 1.5, 3),
        "bias": torch.linspace(-0.2, 0.3, 3),
        "running_mean": torch.linspace(-0.5, 0.5, 3),
        "running_var": torch.linspace(0.5, 2.0, 3),
        "counter": torch.tensor(3),
    }
    arguments.update(FALLBACK_CASES[case]())
    return arguments


@pytest.fixture
def native_train_statuses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The statuses of every ``native.train`` call made through the op (-1: declined)."""
    statuses: list[int] = []
    original = native.train

    def spy(*args: Any) -> tuple[Tensor | None, int]:
        y, status = original(*args)
        statuses.append(status)
        return y, status

    monkeypatch.setattr(native, "train", spy)
    return statuses


@requires_native
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_the_fused_fallback_equals_torch(case: str, momentum: float | None, native_train_statuses: list[int]) -> None:
    a = _fallback_arguments(case)
    x = a["x"].requires_grad_()
    weight, bias = a["weight"].requires_grad_(), a["bias"].requires_grad_()
    running_mean, running_var, counter = a["running_mean"], a["running_var"], a["counter"]
    mean_base, var_base = running_mean._base, running_var._base
    gaps = [None if base is None else base[1::2].clone() for base in (mean_base, var_base)]
    old = (running_mean.clone(), running_var.clone())
    grad_output = torch.randn(x.shape)
    assert _route(kernels.plan(x, True, weight, bias)) == ("fused", "native")
    y = batch_norm(x, running_mean, running_var, weight, bias, True, momentum, EPS, num_batches_tracked=counter)
    assert native_train_statuses == [-1]  # asked, declined, then the fallback
    grads = torch.autograd.grad(y, (x, weight, bias), grad_output)
    factor = momentum if momentum is not None else 1 / 4  # the counter was 3
    expected, expected_grads, mean64, var64 = _reference_batch_norm(
        x, 1, weight, bias, *old, momentum=factor, grad_output=grad_output
    )
    _check(y, expected, "y", torch.float32, scale=_output_scale(x, 1, weight, expected))
    assert y.dtype == torch.float32
    for name, grad, leaf in zip(("x", "weight", "bias"), grads, (x, weight, bias)):
        assert grad.dtype == leaf.dtype, name
        scale = _input_grad_scale(x, 1, weight, grad_output) if name == "x" else _sum_scale(x, 1, grad_output)
        tolerance_dtype = torch.float32 if leaf.dtype != torch.bfloat16 else torch.bfloat16
        _check(grad, expected_grads[name], f"grad {name}", tolerance_dtype, scale=scale)
    assert mean64 is not None
    assert var64 is not None
    _check(running_mean, mean64, "running_mean", torch.float32)
    _check(running_var, var64, "running_var", torch.float32)
    assert counter.item() == 4
    # updated in place, in the caller's storage, and nothing between the strided entries
    for base, gap in zip((mean_base, var_base), gaps):
        if base is not None:
            assert gap is not None
            assert torch.equal(base[1::2], gap)
    assert running_mean._base is mean_base

    evaluated = batch_norm(x.detach(), running_mean, running_var, weight.detach(), bias.detach(), False)
    expected_eval = _reference_batch_norm(x, 1, weight, bias, running_mean, running_var, False)[0]
    _check(evaluated, expected_eval, "eval y", torch.float32)


@requires_native
def test_the_fused_fallback_on_inputs_the_operator_cannot_read(native_train_statuses: list[int]) -> None:
    for layout in (LAYOUTS[7], LAYOUTS[8], LAYOUTS[9]):
        x = layout.make(torch.float32).requires_grad_()
        grad_output = torch.randn(layout.shape)
        y = batch_norm(x, None, None, None, None, True, axis=layout.axis)
        (grad,) = torch.autograd.grad(y, x, grad_output)
        expected, expected_grads, _, _ = _reference_batch_norm(x, layout.axis, grad_output=grad_output)
        _check(y, expected, f"y {layout.name}", torch.float32, scale=_output_scale(x, layout.feature, None, expected))
        scale = _input_grad_scale(x, layout.feature, None, grad_output)
        _check(grad, expected_grads["x"], f"grad {layout.name}", torch.float32, scale=scale)
    assert native_train_statuses[0] == -1  # the permuted input: dense, but not a block the kernels read


# --- batched gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "case", "route"),
    [
        ("auto", "plain", ("fused", "native")),
        ("auto", "strided-weight", ("fused", "native")),  # declined by the operator: function route, native kernels
        ("auto", "sliced-input", ("fused", "native")),  # declined by the operator: function route, native kernels
        ("torch", "plain", ("function", "torch")),
        ("exact", "plain", ("function", "exact")),
    ],
    ids=["fused", "fallback-strided-weight", "fallback-sliced-input", "function-torch", "function-exact"],
)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_batched_gradients_equal_a_loop(setting: str, case: str, route: tuple[str, str], dtype: torch.dtype) -> None:
    """``torch.autograd.grad(..., is_grads_batched=True)`` through the op in training: one vmapped backward."""
    values = (torch.randn(6, 3, 8, dtype=F64) * 2 + 1).to(dtype)
    x = (values[:, :, ::2] if case == "sliced-input" else values[:, :, :4].clone()).requires_grad_()
    parameters = torch.linspace(0.5, 1.5, 6, dtype=dtype)
    weight = (parameters[::2] if case == "strided-weight" else parameters[:3].clone()).requires_grad_()
    bias = torch.linspace(-0.2, 0.3, 3, dtype=dtype).requires_grad_()
    grads_batch = torch.randn(5, 6, 3, 4, dtype=F64).to(dtype)
    with kernels.use_kernel(setting):
        if native.available():
            assert _route(kernels.plan(x, True, weight, bias)) == route
        y = batch_norm(x, torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype), weight, bias, True)
        batched = torch.autograd.grad(y, (x, weight, bias), grads_batch, is_grads_batched=True, retain_graph=True)
        loop = [torch.autograd.grad(y, (x, weight, bias), g, retain_graph=True) for g in grads_batch]
    tolerance = 1e-10 if dtype == F64 else 2e-5
    for index, name in enumerate(("x", "weight", "bias")):
        expected = torch.stack([grads[index] for grads in loop])
        assert batched[index].shape == expected.shape
        torch.testing.assert_close(batched[index], expected, rtol=tolerance, atol=tolerance, msg=name)
    # and the loop equals torch's gradients
    _, reference, _, _ = _reference_batch_norm(x, 1, weight, bias, grad_output=grads_batch[0])
    scale = _input_grad_scale(x, 1, weight, grads_batch[0])
    _check(loop[0][0], reference["x"], "grad x", dtype, scale=scale, **_tolerances(dtype))


# --- differential fuzzing: every setting against F.batch_norm in float64 -----------------------------------------

FUZZ_DTYPES = [torch.float32, F64, torch.bfloat16, torch.float16]


@dataclass
class FuzzCase:
    """One random call of the op: everything needed to build it and its reference."""

    index: int
    shape: tuple[int, ...]
    axis: int
    layout: str
    dtype: torch.dtype
    affine: bool
    parameters: str  # acc, float64, strided
    running: bool
    momentum: float | None
    counter: int | None
    training: bool
    grad: bool
    offset: float
    seed: int
    order: list[int] = field(default_factory=list)

    @property
    def feature(self) -> int:
        return self.axis % len(self.shape)


def _fuzz_case(index: int, rng: random.Random) -> FuzzCase:
    rank = rng.randint(2, 5)
    axis = rng.randrange(-rank, rank)
    feature = axis % rank
    shape = [rng.choice([1, 1, 2, 3, 4, 5, 7]) for _ in range(rank)]
    shape[feature] = rng.choice([1, 2, 3, 5, 8])
    training = rng.random() < 0.6
    while training and math.prod(shape) // shape[feature] < 2:  # one value per feature is an error when training
        shape[rng.choice([d for d in range(rank) if d != feature])] += 1
    layout = rng.choice(["contiguous", "channels-last", "permuted", "sliced"])
    if layout == "channels-last" and rank not in (4, 5):
        layout = "permuted"
    order = list(range(rank))
    rng.shuffle(order)
    momentum = rng.choice([0.1, 0.0, 1.0, 0.7, None])
    counter = rng.randrange(5) if momentum is None or rng.random() < 0.5 else None
    return FuzzCase(
        index=index,
        shape=tuple(shape),
        axis=axis,
        layout=layout,
        dtype=rng.choice(FUZZ_DTYPES),
        affine=rng.random() < 0.6,
        parameters=rng.choice(["acc", "acc", "float64", "strided"]),
        running=not training or rng.random() < 0.6,
        momentum=momentum,
        counter=counter,
        training=training,
        grad=rng.random() < 0.8,
        offset=rng.choice([0.0, 0.0, 3.0, -50.0]),
        seed=rng.randrange(1 << 30),
        order=order,
    )


@dataclass
class FuzzArguments:
    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    counter: Tensor | None
    grad_output: Tensor


def _fuzz_arguments(case: FuzzCase) -> FuzzArguments:
    """Fresh tensors for one run (each setting gets its own: the op updates buffers in place)."""
    generator = torch.Generator().manual_seed(case.seed)
    values = (torch.randn(case.shape, generator=generator, dtype=F64) + case.offset).to(case.dtype)
    rank = len(case.shape)
    if case.layout == "channels-last":
        x = values.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    elif case.layout == "permuted":
        inverse = [case.order.index(d) for d in range(rank)]
        x = values.permute(case.order).contiguous().permute(inverse)
    elif case.layout == "sliced":
        dim = case.order[0]
        wide = list(case.shape)
        wide[dim] *= 2
        x = torch.full(wide, math.nan, dtype=case.dtype)[(slice(None),) * dim + (slice(None, None, 2),)]
        x.copy_(values)
    else:
        x = values
    features = case.shape[case.feature]
    acc = _accumulation(case.dtype)
    dtype = F64 if case.parameters == "float64" else acc

    def vector(low: float, high: float) -> Tensor:
        v = torch.empty(2 * features, dtype=F64).uniform_(low, high, generator=generator).to(dtype)
        return v[::2] if case.parameters == "strided" else v[:features].clone()

    weight, bias = (vector(-1.5, 1.5), vector(-0.5, 0.5)) if case.affine else (None, None)
    running_mean, running_var = (vector(-0.5, 0.5), vector(0.5, 2.0)) if case.running else (None, None)
    counter = None if case.counter is None else torch.tensor(case.counter)
    grad_output = torch.randn(case.shape, generator=generator, dtype=F64).to(case.dtype)
    return FuzzArguments(x, weight, bias, running_mean, running_var, counter, grad_output)


def _run_fuzz_case(case: FuzzCase, setting: str) -> tuple[Tensor, dict[str, Tensor], FuzzArguments]:
    a = _fuzz_arguments(case)
    leaves = {
        name: t.requires_grad_(case.grad)
        for name, t in (("x", a.x), ("weight", a.weight), ("bias", a.bias))
        if t is not None
    }
    with kernels.use_kernel(setting):
        y = batch_norm(a.x, a.running_mean, a.running_var, a.weight, a.bias, case.training, case.momentum, EPS,
                       case.axis, num_batches_tracked=a.counter)  # fmt: skip
        grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), a.grad_output))) if case.grad else {}
    return y.detach(), grads, a


def _check_fuzz_case(case: FuzzCase) -> None:
    reference_arguments = _fuzz_arguments(case)
    a = reference_arguments
    momentum = case.momentum
    if momentum is None:  # cumulative average: weight 1 / (batches so far + 1)
        assert case.counter is not None
        momentum = 1.0 / (case.counter + 1)
    expected, expected_grads, mean64, var64 = _reference_batch_norm(
        a.x, case.axis, a.weight, a.bias, a.running_mean, a.running_var, case.training, momentum, EPS,
        a.grad_output if case.grad else None,
    )  # fmt: skip
    acc = _accumulation(case.dtype)
    for setting in SETTINGS:
        what = f"case {case.index} {case} on {setting}"
        y, grads, ours = _run_fuzz_case(case, setting)
        assert y.dtype == case.dtype, what
        assert y.shape == case.shape, what
        scale = _output_scale(a.x, case.feature, a.weight, expected) if case.training else None
        _check(y, expected, f"y: {what}", case.dtype, scale=scale, **_tolerances(case.dtype))
        if case.grad:
            assert set(grads) == set(expected_grads), what
            scale = _input_grad_scale(a.x, case.feature, a.weight, a.grad_output)
            _check(grads["x"], expected_grads["x"], f"grad x: {what}", case.dtype, scale=scale,
                   **_tolerances(case.dtype))  # fmt: skip
            magnitude = _sum_scale(a.x, case.feature, a.grad_output)
            for name in ("weight", "bias"):
                if name in grads:
                    _check(grads[name], expected_grads[name], f"grad {name}: {what}", acc, scale=magnitude,
                           **_tolerances(case.dtype))  # fmt: skip
        if ours.running_mean is not None and ours.running_var is not None:
            assert mean64 is not None
            assert var64 is not None
            _check(ours.running_mean, mean64, f"running_mean: {what}", acc, **_tolerances(case.dtype))
            _check(ours.running_var, var64, f"running_var: {what}", acc, **_tolerances(case.dtype))
        if ours.counter is not None:
            assert case.counter is not None
            updated = case.training and case.running
            assert ours.counter.item() == case.counter + int(updated), what


def test_differential_fuzz_against_torch() -> None:
    """300 random calls (rank, axis, sizes down to 1, layout, dtype, affine, buffers, momentum, mode), every setting."""
    rng = random.Random(20240611)
    cases = [_fuzz_case(index, rng) for index in range(300)]
    assert {case.layout for case in cases} == {"contiguous", "channels-last", "permuted", "sliced"}
    assert {case.dtype for case in cases} == set(FUZZ_DTYPES)
    assert any(case.momentum is None for case in cases)
    assert any(case.training for case in cases)
    assert any(not case.training for case in cases)
    for case in cases:
        _check_fuzz_case(case)


INVALID_CALLS: dict[str, Callable[[], Tensor]] = {
    "axis-out-of-range": lambda: batch_norm(torch.randn(4, 3, 5), None, None, training=True, axis=3),
    "eps-zero": lambda: batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0),
    "eps-int-zero": lambda: batch_norm(torch.randn(4, 3), None, None, training=True, eps=0),
    "momentum-above-one": lambda: batch_norm(
        torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=1.5
    ),
    "momentum-nan": lambda: batch_norm(torch.randn(4, 3), None, None, training=True, momentum=math.nan),
    "one-value-per-feature": lambda: batch_norm(torch.randn(1, 3, 1), None, None, training=True),
    "integer-input": lambda: batch_norm(torch.ones(4, 3, dtype=torch.int64), None, None, training=True),
    "weight-too-long": lambda: batch_norm(torch.randn(4, 3), None, None, torch.ones(4), training=True),
    "weight-2d": lambda: batch_norm(torch.randn(4, 3), None, None, torch.ones(3, 1), training=True),
    "integer-weight": lambda: batch_norm(torch.randn(4, 3), None, None, torch.ones(3, dtype=torch.int64), None, True),
    "only-running-mean": lambda: batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True),
    "eval-without-running-stats": lambda: batch_norm(torch.randn(4, 3), None, None, training=False),
    "cumulative-without-counter": lambda: batch_norm(
        torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None
    ),
    "nonfinite-policy": lambda: batch_norm(torch.randn(4, 3), None, None, training=True, nonfinite="ignore"),  # type: ignore[arg-type]
    "nan-batch": lambda: batch_norm(torch.full((4, 3), math.nan), torch.zeros(3), torch.ones(3), training=True),
    "overflowing-variance": lambda: batch_norm(
        torch.tensor([[3e38, 1.0], [-3e38, 2.0]]), torch.zeros(2), torch.ones(2), training=True
    ),
    # valid, on every setting
    "nan-batch-without-buffers": lambda: batch_norm(torch.full((4, 3), math.nan), None, None, training=True),
    "cumulative-without-buffers": lambda: batch_norm(torch.randn(4, 3), None, None, training=True, momentum=None),
    "float-counter": lambda: batch_norm(
        torch.randn(4, 3),
        torch.zeros(3),
        torch.ones(3),
        training=True,
        momentum=None,
        num_batches_tracked=torch.tensor(2.0),
    ),
    "empty-batch": lambda: batch_norm(torch.empty(0, 3), torch.zeros(3), torch.ones(3), training=True),
    "momentum-int-one": lambda: batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=1),
    "float64-buffers-float32-input": lambda: batch_norm(
        torch.randn(4, 3), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), training=False
    ),
}


@pytest.mark.parametrize("call", list(INVALID_CALLS))
def test_every_setting_raises_alike(call: str) -> None:
    outcomes: list[type[Exception] | None] = []
    for setting in SETTINGS:
        with kernels.use_kernel(setting):
            try:
                INVALID_CALLS[call]()
            except Exception as error:
                outcomes.append(type(error))
            else:
                outcomes.append(None)
    assert len(set(outcomes)) == 1, dict(zip(SETTINGS, outcomes))
    if outcomes[0] is not None:
        assert issubclass(outcomes[0], (BatchNormArgumentError, NonfiniteBatchError))
