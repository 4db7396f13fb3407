"""The native CPU kernels (``batchnorm.kernels.native``): the operators themselves, their declines and their fallbacks.

The operators: ``train`` (the fused route's training forward, running
statistics included, with its C++ autograd node), ``inference`` (the fused
eval), the four primitives ``stats``, ``normalize``, ``grad_sums`` and
``grad_input`` (each returns None for arguments its kernels do not read as
they are), and the raw ``forward``/``backward`` operators.

Every number is checked against an independent float64 reference:
``torch.nn.functional.batch_norm`` in float64 on contiguous copies of the same
(rounded) input values with the feature axis moved to 1 (PyTorch's CPU
backward is wrong for non-contiguous weights and ambiguously channels-last
strides), running statistics and the primitives' formulas written out by hand
in float64, and ``torch.autograd.gradcheck``/``gradgradcheck`` (central
finite differences) for the derivatives. Never against the package's own output.

Tolerances (the operator-level ones):

* float64: ``1e-10`` absolute and relative;
* float32: outputs and running statistics within ``2e-6`` absolute plus
  relative, gradients within ``1e-5`` of their largest magnitude;
* bfloat16 and float16 (outputs rounded once from float32): half a unit in the
  last place plus ``1e-5`` (outputs) or ``1e-4`` of the largest magnitude
  (gradients); per-feature results are float32 and get float32's tolerances.

The tests that need the library are skipped where it cannot be built; the
fallback tests (no compiler, disabled, failed build) run everywhere.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from batchnorm import kernels
from batchnorm.functional import NonfiniteBatchError, batch_norm
from batchnorm.kernels import native

requires_native = pytest.mark.skipif(
    not native.available(), reason=f"the native kernels are unavailable here: {native.failure()}"
)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPS = 1e-5


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Layout:
    """An input layout: a shape, the feature axis and the memory format."""

    name: str
    shape: tuple[int, ...]
    axis: int = 1
    memory_format: torch.memory_format = torch.contiguous_format
    features_innermost: bool = False  # the feature axis moved last in memory, the others dense

    @property
    def features(self) -> int:
        return self.shape[self.axis]

    def make(self, dtype: torch.dtype) -> torch.Tensor:
        x = (torch.randn(self.shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
        if self.features_innermost:
            return x.movedim(self.axis, -1).contiguous().movedim(-1, self.axis)
        return x.contiguous(memory_format=self.memory_format)

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` in this layout."""
        if self.features_innermost:
            return x.movedim(self.axis, -1).contiguous().movedim(-1, self.axis)
        return x.contiguous(memory_format=self.memory_format)


LAYOUTS = [
    Layout("dense", (12, 5)),
    Layout("dense-64", (40, 64)),  # exactly the widest row summed in registers
    Layout("dense-wide", (20, 70)),  # rows wider than that: the chunked sums
    Layout("nchw", (4, 3, 5, 6)),
    Layout("channels-last", (4, 3, 5, 6), memory_format=torch.channels_last),
    Layout("channels-last-3d", (2, 3, 2, 3, 4), memory_format=torch.channels_last_3d),
    Layout("sequence-minus-1", (3, 4, 5), axis=-1),
    Layout("sequence-axis-2", (3, 4, 5), axis=2),
    Layout("ncl", (4, 3, 7)),
    Layout("ncl-long", (2, 3, 600)),  # more positions than one span, not a multiple of the lanes
    Layout("ncl-features-innermost", (3, 4, 5), features_innermost=True),  # (N, L, C) memory seen as (N, C, L)
]
LAYOUT_IDS = [layout.name for layout in LAYOUTS]


def _data(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _parameters(features: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    acc = _accumulation(dtype)
    return torch.linspace(0.5, 1.5, features, dtype=acc), torch.linspace(-0.2, 0.3, features, dtype=acc)


def _buffers(features: int, dtype: torch.dtype, count: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = _accumulation(dtype)
    running_mean = torch.linspace(-0.5, 0.5, features, dtype=acc)
    running_var = torch.linspace(0.5, 2.0, features, dtype=acc)
    return running_mean, running_var, torch.tensor(count)


@dataclass
class Reference:
    """What float64 arithmetic gives: the output, the new running statistics and the gradients."""

    y: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    grads: dict[str, torch.Tensor]


def _reference(
    x: torch.Tensor,
    axis: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float | None = 0.1,
    count: int = 0,
    grad_output: torch.Tensor | None = None,
    training: bool = True,
    eps: float = EPS,
) -> Reference:
    """``F.batch_norm`` in float64 on ``x``'s values; running statistics blended by hand in float64."""
    feature = axis % x.dim()
    x64 = x.detach().double().movedim(feature, 1).contiguous().requires_grad_()
    w64 = None if weight is None else weight.detach().double().clone().requires_grad_()
    b64 = None if bias is None else bias.detach().double().clone().requires_grad_()
    rm64 = None if running_mean is None else running_mean.detach().double().clone()
    rv64 = None if running_var is None else running_var.detach().double().clone()
    if training:
        y = F.batch_norm(x64, None, None, w64, b64, True, 0.0, eps)
    else:
        y = F.batch_norm(x64, rm64, rv64, w64, b64, False, 0.0, eps)
    new_mean = new_var = None
    if training and rm64 is not None and rv64 is not None:
        dims = [d for d in range(x.dim()) if d != 1]
        values = x64.detach()
        factor = momentum if momentum is not None else 1.0 / (count + 1)
        new_mean = (1 - factor) * rm64 + factor * values.mean(dims)
        new_var = (1 - factor) * rv64 + factor * values.var(dims, correction=1)
    grads: dict[str, torch.Tensor] = {}
    if grad_output is not None:
        named = [(name, t) for name, t in (("x", x64), ("weight", w64), ("bias", b64)) if t is not None]
        g64 = grad_output.detach().double().movedim(feature, 1).contiguous()
        computed = torch.autograd.grad(y, [t for _, t in named], g64)
        grads = {name: value for (name, _), value in zip(named, computed)}
        if "x" in grads:
            grads["x"] = grads["x"].movedim(1, feature)
    return Reference(y.detach().movedim(1, feature), new_mean, new_var, grads)


def _stats(expected: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's new running statistics (it was given buffers)."""
    assert expected.running_mean is not None
    assert expected.running_var is not None
    return expected.running_mean, expected.running_var


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, grad: bool = False, dtype: torch.dtype | None = None
) -> None:
    """``actual`` within the tolerance of ``dtype`` (default: ``actual``'s) of the float64 ``expected``."""
    dtype = actual.dtype if dtype is None else dtype
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual64, expected64 = actual.detach().double(), expected.detach().double()
    assert not actual64.isnan().any(), f"{what}: NaN in the result"
    error = (actual64 - expected64).abs()
    scale = expected64.abs().max().clamp_min(1e-30)
    if dtype == torch.float64:
        bound = 1e-10 + 1e-10 * expected64.abs()
    elif dtype == torch.float32:
        bound = 1e-5 * scale if grad else 2e-6 + 2e-6 * expected64.abs()
    else:
        rounding = 0.5 * torch.finfo(dtype).eps * expected64.abs()
        bound = rounding + (1e-4 * scale if grad else 1e-5 + 1e-5 * expected64.abs())
    worst = (error - bound).max().item()
    assert worst <= 0, f"{what}: error {error.max().item():.3g} exceeds the {dtype} tolerance"


def _same_layout(y: torch.Tensor, x: torch.Tensor, layout: Layout) -> None:
    """``y`` has ``x``'s shape, dtype and strides: channels-last stays channels-last."""
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert y.stride() == x.stride()
    assert y.is_contiguous(memory_format=layout.memory_format) != layout.features_innermost


@pytest.fixture
def native_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The statuses of every ``native.train`` call made through :func:`batch_norm`."""
    statuses: list[int] = []
    original = native.train

    def spy(*args: Any) -> tuple[torch.Tensor | None, int]:
        y, status = original(*args)
        statuses.append(status)
        return y, status

    monkeypatch.setattr(native, "train", spy)
    return statuses


@pytest.fixture
def two_threads() -> Iterator[None]:
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(1)


@pytest.fixture
def without_native(monkeypatch: pytest.MonkeyPatch) -> str:
    """The native kernels unavailable, as on a machine without a C compiler; returns the reason given."""
    reason = "no C compiler found (test)"
    library = native._Library()
    library.tried, library.loaded, library.problem = True, False, reason
    monkeypatch.setattr(native, "_library", library)
    monkeypatch.setattr(native, "_CODES", {})
    return reason


# --- the training operator, on every layout and dtype ------------------------------------------------------------


def _check_training(
    layout: Layout,
    dtype: torch.dtype,
    momentum: float | None = 0.1,
    with_weight: bool = True,
    with_bias: bool = True,
    call: Callable[..., tuple[torch.Tensor | None, int]] | None = None,
) -> None:
    x = layout.make(dtype).requires_grad_()
    parameters = _parameters(layout.features, dtype)
    weight = parameters[0].requires_grad_() if with_weight else None
    bias = parameters[1].requires_grad_() if with_bias else None
    running_mean, running_var, counter = _buffers(layout.features, dtype)
    old_mean, old_var = running_mean.clone(), running_var.clone()
    x_before = x.detach().clone()
    operator = native.train if call is None else call
    y, status = operator(x, weight, bias, running_mean, running_var, counter, layout.axis, momentum, EPS)
    assert status == 0
    assert y is not None
    _same_layout(y, x, layout)
    assert torch.equal(x.detach(), x_before)

    grad_output = torch.randn(layout.shape, dtype=torch.float64).to(dtype)
    leaves = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(y, leaves, grad_output)
    cumulative = momentum is None or momentum < 0
    expected = _reference(
        x, layout.axis, weight, bias, old_mean, old_var, None if cumulative else momentum, 3, grad_output
    )

    stats_dtype = _accumulation(dtype)
    _assert_close(y, expected.y, "y")
    expected_mean, expected_var = _stats(expected)
    _assert_close(running_mean, expected_mean, "running_mean", dtype=stats_dtype)
    _assert_close(running_var, expected_var, "running_var", dtype=stats_dtype)
    assert counter.item() == 4
    assert counter.dtype == torch.int64
    names = [name for name, t in (("x", x), ("weight", weight), ("bias", bias)) if t is not None]
    for name, grad in zip(names, grads):
        assert grad.dtype == (dtype if name == "x" else stats_dtype), name
        _assert_close(grad, expected.grads[name], f"grad {name}", grad=True)


@requires_native
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_train_operator_matches_the_float64_reference(layout: Layout, dtype_name: str) -> None:
    _check_training(layout, DTYPES[dtype_name])


@requires_native
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_train_operator_cumulative_average_with_the_counter(layout: Layout, dtype_name: str) -> None:
    """momentum < 0 (None in Python): weight 1 / (counter + 1), here 1/4; the raw operator, as registered."""
    _check_training(layout, DTYPES[dtype_name], momentum=-1.0, call=torch.ops.batchnorm.train.default)


@requires_native
@pytest.mark.parametrize("momentum", [0.0, 0.75, 1.0, None])
def test_train_momentum_edges(momentum: float | None) -> None:
    """Both branches of the lerp (weight below and above one half), the ends of [0, 1], and None."""
    _check_training(LAYOUTS[0], torch.float64, momentum=momentum)


@requires_native
@pytest.mark.parametrize(
    ("dtype_name", "with_weight", "with_bias"),
    [
        pytest.param(name, with_weight, with_bias, id=f"{name}-{label}")
        for name in ("float32", "bfloat16", "float16")
        for with_weight, with_bias, label in ((False, False, "none"), (True, False, "weight"), (False, True, "bias"))
    ],
)
def test_train_operator_without_weight_or_bias(dtype_name: str, with_weight: bool, with_bias: bool) -> None:
    _check_training(LAYOUTS[3], DTYPES[dtype_name], with_weight=with_weight, with_bias=with_bias)


@requires_native
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[4]], ids=["dense", "nchw", "channels-last"])
def test_train_operator_without_gradients(layout: Layout) -> None:
    """No input needs a gradient (the call without autograd): with running statistics, then without any."""
    x = layout.make(torch.float32)
    weight, bias = _parameters(layout.features, torch.float32)
    running_mean, running_var, counter = _buffers(layout.features, torch.float32)
    expected = _reference(x, layout.axis, weight, bias, running_mean, running_var, 0.1, 3)
    y, status = native.train(x, weight, bias, running_mean, running_var, counter, layout.axis, 0.1, EPS)
    assert status == 0
    assert y is not None
    assert not y.requires_grad
    _same_layout(y, x, layout)
    _assert_close(y, expected.y, "y")
    expected_mean, expected_var = _stats(expected)
    _assert_close(running_mean, expected_mean, "running_mean")
    _assert_close(running_var, expected_var, "running_var")
    assert counter.item() == 4

    y, status = native.train(x, weight, bias, None, None, counter, layout.axis, 0.1, EPS)
    assert status == 0
    assert y is not None
    _same_layout(y, x, layout)
    _assert_close(y, expected.y, "y without buffers")
    assert counter.item() == 4  # counted only when running statistics are updated


@requires_native
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[3]], ids=["dense", "nchw"])
def test_train_operator_on_offset_data(layout: Layout) -> None:
    """Data far from zero (|mean| / std ~ 1000): the shifted sums keep the variance accurate."""
    x = (torch.randn(layout.shape, dtype=torch.float64) + 1000.0).float()
    running_mean, running_var, counter = _buffers(layout.features, torch.float32)
    y, status = native.train(x, None, None, running_mean, running_var, counter, layout.axis, 1.0, EPS)
    assert status == 0
    assert y is not None
    expected = _reference(x, layout.axis, None, None, torch.zeros(layout.features), torch.ones(layout.features), 1.0)
    expected_mean, expected_var = _stats(expected)
    _assert_close(running_mean, expected_mean, "batch mean")
    _assert_close(running_var, expected_var, "unbiased batch variance")
    # y = (x - mean) * inv_std with the mean rounded to float32: an error of about eps32 * |x| / std.
    error = (y.double() - expected.y).abs().max().item()
    assert error <= 4 * torch.finfo(torch.float32).eps * 1001.0 / expected_var.min().sqrt().item()


@requires_native
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_train_operator_on_rows_wider_than_a_chunk(dtype_name: str) -> None:
    """Feature-last rows of more than 1024 features are summed 1024 features at a time."""
    _check_training(Layout("dense-chunked", (10, 2100)), DTYPES[dtype_name])


@requires_native
@pytest.mark.parametrize(
    ("shape", "leading"), [((4000, 3), (slice(0, 16),)), ((8, 3, 1000), (0, slice(None), slice(0, 64)))],
    ids=["dense", "ncl"],
)  # fmt: skip
def test_train_operator_when_the_first_values_are_far_from_the_mean(shape: tuple[int, ...], leading: Any) -> None:
    """The shift (the mean of the first rows or positions) lies far from the mean: the sums are taken again."""
    x = torch.randn(shape, dtype=torch.float64) + 1000.0
    x[leading] -= 1000.0
    x = x.float()
    features = shape[1]
    running_mean, running_var, counter = _buffers(features, torch.float32)
    y, status = native.train(x, None, None, running_mean, running_var, counter, 1, 1.0, EPS)
    assert status == 0
    assert y is not None
    expected = _reference(x, 1, None, None, torch.zeros(features), torch.ones(features), 1.0)
    expected_mean, expected_var = _stats(expected)
    _assert_close(running_mean, expected_mean, "batch mean")
    _assert_close(running_var, expected_var, "unbiased batch variance")
    error = (y.double() - expected.y).abs().max().item()
    assert error <= 4 * torch.finfo(torch.float32).eps * 1001.0 / expected_var.min().sqrt().item()


# --- declines ------------------------------------------------------------------------------------------------------


def _arguments(**changes: Any) -> dict[str, Any]:
    """Valid float32 arguments for the operator on a (6, 4) input, with ``changes``."""
    weight, bias = _parameters(4, torch.float32)
    running_mean, running_var, counter = _buffers(4, torch.float32)
    arguments: dict[str, Any] = {
        "x": _data((6, 4)),
        "weight": weight,
        "bias": bias,
        "running_mean": running_mean,
        "running_var": running_var,
        "counter": counter,
        "axis": 1,
        "momentum": 0.1,
        "eps": EPS,
    }
    arguments.update(changes)
    return arguments


def _call(arguments: dict[str, Any]) -> tuple[torch.Tensor | None, int]:
    a = arguments
    return native.train(
        a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["counter"], a["axis"], a["momentum"],
        a["eps"],
    )  # fmt: skip


def _snapshot(arguments: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        name: value.detach().clone()
        for name, value in arguments.items()
        if isinstance(value, torch.Tensor) and value.device.type != "meta"
    }


def _assert_unchanged(arguments: dict[str, Any], before: dict[str, torch.Tensor]) -> None:
    for name, value in before.items():
        assert torch.equal(arguments[name].detach(), value), f"{name} changed"


# Arguments the operator declines and batch_norm takes on the fused route's fallback (the function route on the
# native primitives), with the tolerance dtype.
GENERAL_DECLINES: dict[str, tuple[Callable[[], dict[str, Any]], torch.dtype]] = {
    "strided-input": (lambda: {"x": _data((6, 8))[:, ::2]}, torch.float32),
    "transposed-input": (lambda: {"x": _data((4, 6)).t()}, torch.float32),
    "strided-nchw": (lambda: {"x": _data((4, 4, 5, 6))[:, :, ::2]}, torch.float32),
    # Features innermost (stride 1) but the other axes not dense.
    "sliced-columns": (lambda: {"x": _data((6, 8))[:, :4]}, torch.float32),
    "sliced-channels-last": (
        lambda: {"x": _data((4, 4, 5, 6)).contiguous(memory_format=torch.channels_last)[:, :, 1:]},
        torch.float32,
    ),
    "sliced-sequence": (lambda: {"x": _data((3, 7, 4)).transpose(1, 2)[:, :, ::2]}, torch.float32),
    "float64-weight": (lambda: {"weight": torch.linspace(0.5, 1.5, 4, dtype=torch.float64)}, torch.float32),
    "float64-input-float32-parameters": (lambda: {"x": _data((6, 4), torch.float64)}, torch.float32),
    "bfloat16-parameters": (
        lambda: {
            "x": _data((6, 4), torch.bfloat16),
            "weight": torch.linspace(0.5, 1.5, 4).bfloat16(),
            "bias": torch.linspace(-0.2, 0.3, 4).bfloat16(),
        },
        torch.bfloat16,
    ),
    "strided-weight": (lambda: {"weight": torch.linspace(0.5, 1.5, 8)[::2]}, torch.float32),
    "strided-running-mean": (lambda: {"running_mean": torch.linspace(-0.5, 0.5, 8)[::2]}, torch.float32),
    "float64-running-stats": (
        lambda: {
            "running_mean": torch.linspace(-0.5, 0.5, 4, dtype=torch.float64),
            "running_var": torch.linspace(0.5, 2.0, 4, dtype=torch.float64),
        },
        torch.float32,
    ),
    "running-mean-requires-grad": (
        lambda: {"running_mean": torch.linspace(-0.5, 0.5, 4).requires_grad_()},
        torch.float32,
    ),
    "running-var-requires-grad": (
        lambda: {"running_var": torch.linspace(0.5, 2.0, 4).requires_grad_()},
        torch.float32,
    ),
    "int32-counter": (lambda: {"counter": torch.tensor(3, dtype=torch.int32)}, torch.float32),
}

# Arguments the operator declines and batch_norm rejects (or that are on another device).
INVALID_DECLINES: dict[str, Callable[[], dict[str, Any]]] = {
    "integer-input": lambda: {"x": torch.randint(-5, 5, (6, 4), dtype=torch.int32)},
    "empty-input": lambda: {"x": torch.empty(0, 4)},
    "one-value-per-feature": lambda: {"x": _data((1, 4))},
    "one-value-per-feature-4d": lambda: {"x": _data((1, 4, 1, 1))},
    "meta-input": lambda: {"x": torch.empty(6, 4, device="meta")},
    "axis-out-of-range": lambda: {"axis": 2},
    "weight-too-long": lambda: {"weight": torch.ones(5)},
    "only-running-mean": lambda: {"running_var": None},
    "float-counter": lambda: {"counter": torch.tensor(3.0)},
    "momentum-above-one": lambda: {"momentum": 1.5},
    "momentum-nan": lambda: {"momentum": math.nan},
    "cumulative-without-counter": lambda: {"momentum": None, "counter": None},
    "eps-zero": lambda: {"eps": 0.0},
    "eps-negative": lambda: {"eps": -1e-5},
}


@requires_native
@pytest.mark.parametrize("case", list(GENERAL_DECLINES) + list(INVALID_DECLINES))
def test_train_operator_declines_and_changes_nothing(case: str) -> None:
    make = GENERAL_DECLINES[case][0] if case in GENERAL_DECLINES else INVALID_DECLINES[case]
    arguments = _arguments(**make())
    before = _snapshot(arguments)
    assert _call(arguments) == (None, -1)
    _assert_unchanged(arguments, before)
    arguments["x"] = arguments["x"].requires_grad_() if arguments["x"].is_floating_point() else arguments["x"]
    assert _call(arguments) == (None, -1)  # the autograd branch declines the same arguments
    _assert_unchanged(arguments, before)


@requires_native
@pytest.mark.parametrize("case", list(GENERAL_DECLINES))
def test_batch_norm_takes_what_the_operator_declines(case: str, native_calls: list[int]) -> None:
    make, tolerance = GENERAL_DECLINES[case]
    arguments = _arguments(**make())
    x = arguments["x"].requires_grad_()
    weight = arguments["weight"].detach().requires_grad_()
    bias = arguments["bias"].detach().requires_grad_()
    running_mean, running_var, counter = arguments["running_mean"], arguments["running_var"], arguments["counter"]
    old_mean, old_var = running_mean.detach().clone(), running_var.detach().clone()
    y = batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, EPS, 1, num_batches_tracked=counter)
    assert native_calls == [-1]  # asked, declined, then the fallback
    grad_output = torch.randn(y.shape, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_output)
    expected = _reference(x, 1, weight, bias, old_mean, old_var, 0.1, 3, grad_output)
    _assert_close(y, expected.y, "y", dtype=tolerance)
    expected_mean, expected_var = _stats(expected)
    _assert_close(running_mean, expected_mean, "running_mean", dtype=torch.float32)
    _assert_close(running_var, expected_var, "running_var", dtype=torch.float32)
    assert counter.item() == 4
    for name, grad in zip(("x", "weight", "bias"), grads):
        _assert_close(grad, expected.grads[name], f"grad {name}", grad=True, dtype=tolerance)


@requires_native
@pytest.mark.parametrize("case", ["running-mean-requires-grad", "strided-input", "float64-stats", "eps-0"])
def test_inference_operator_declines(case: str) -> None:
    x = _data((6, 4))
    weight, bias = _parameters(4, torch.float32)
    running_mean, running_var, _ = _buffers(4, torch.float32)
    eps = EPS
    if case == "running-mean-requires-grad":  # torch's op does not differentiate the running statistics
        x.requires_grad_()
        running_mean.requires_grad_()
    elif case == "strided-input":
        x = _data((6, 8))[:, ::2]
    elif case == "float64-stats":
        running_mean, running_var = running_mean.double(), running_var.double()
    else:
        eps = 0.0
    before = (x.detach().clone(), running_mean.clone(), running_var.clone())
    assert native.inference(x, running_mean, running_var, weight, bias, 1, eps) is None
    assert all(torch.equal(a, b) for a, b in zip(before, (x.detach(), running_mean.detach(), running_var)))


# --- non-finite batches --------------------------------------------------------------------------------------------

NONFINITE_LAYOUTS = [Layout("dense", (8, 3)), LAYOUTS[3], LAYOUTS[4]]


def _poisoned(layout: Layout, value: float) -> torch.Tensor:
    x = layout.make(torch.float32)
    index = [0] * len(layout.shape)
    index[layout.axis] = 1
    x[tuple(index)] = value  # feature 1 only
    return x


@requires_native
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", NONFINITE_LAYOUTS, ids=[layout.name for layout in NONFINITE_LAYOUTS])
def test_train_operator_reports_a_nonfinite_batch(layout: Layout, value: float) -> None:
    x = _poisoned(layout, value).requires_grad_()
    weight, bias = _parameters(layout.features, torch.float32)
    running_mean, running_var, counter = _buffers(layout.features, torch.float32)
    before = (running_mean.clone(), running_var.clone())
    y, status = native.train(x, weight, bias, running_mean, running_var, counter, layout.axis, 0.1, EPS)
    assert status == 1
    assert y is not None
    assert torch.equal(running_mean, before[0])
    assert torch.equal(running_var, before[1])
    assert counter.item() == 3
    # The features without the bad value are normalized as usual.
    expected = _reference(x, layout.axis, weight, bias)
    assert not y.select(layout.axis, 1).isfinite().all()
    for feature in (0, 2):
        _assert_close(y.select(layout.axis, feature), expected.y.select(layout.axis, feature), f"y feature {feature}")


@requires_native
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", NONFINITE_LAYOUTS, ids=[layout.name for layout in NONFINITE_LAYOUTS])
def test_batch_norm_raises_or_skips_a_nonfinite_batch(layout: Layout, value: float, native_calls: list[int]) -> None:
    weight, bias = _parameters(layout.features, torch.float32)
    running_mean, running_var, counter = _buffers(layout.features, torch.float32)
    before = (running_mean.clone(), running_var.clone())
    x = _poisoned(layout, value)
    with pytest.raises(NonfiniteBatchError):
        batch_norm(
            x.requires_grad_(), running_mean, running_var, weight, bias, True, None, EPS, 1,
            num_batches_tracked=counter,
        )  # fmt: skip
    assert torch.equal(running_mean, before[0])
    assert torch.equal(running_var, before[1])
    assert counter.item() == 3
    y = batch_norm(
        x.detach(), running_mean, running_var, weight, bias, True, 0.1, EPS, 1, num_batches_tracked=counter,
        nonfinite="skip",
    )  # fmt: skip
    assert y.shape == x.shape
    assert torch.equal(running_mean, before[0])
    assert torch.equal(running_var, before[1])
    assert counter.item() == 3
    assert native_calls == [1, 1]  # both decided by the native operator


# --- double backward -----------------------------------------------------------------------------------------------


@requires_native
@pytest.mark.parametrize("with_bias", [True, False], ids=["weight-bias", "weight-only"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 4)], ids=["6x4", "3x2x4"])
def test_gradcheck_and_gradgradcheck_through_batch_norm(
    shape: tuple[int, ...], with_bias: bool, native_calls: list[int]
) -> None:
    features = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.linspace(0.5, 1.5, features, dtype=torch.float64).requires_grad_()
    bias = torch.linspace(-0.2, 0.3, features, dtype=torch.float64).requires_grad_()
    running_mean, running_var, counter = _buffers(features, torch.float64)

    def function(*inputs: torch.Tensor) -> torch.Tensor:
        b = inputs[2] if with_bias else None
        return batch_norm(
            inputs[0], running_mean, running_var, inputs[1], b, True, 0.1, EPS, 1, num_batches_tracked=counter
        )

    inputs = (x, weight, bias) if with_bias else (x, weight)
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)
    assert native_calls
    assert set(native_calls) == {0}  # every call ran the native operator


CREATE_GRAPH_LAYOUTS = [LAYOUTS[0], LAYOUTS[3], LAYOUTS[4], LAYOUTS[6]]


@requires_native
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("layout", CREATE_GRAPH_LAYOUTS, ids=[layout.name for layout in CREATE_GRAPH_LAYOUTS])
def test_gradients_with_create_graph_match_the_reference(layout: Layout, dtype_name: str) -> None:
    """create_graph=True takes the composite backward: its first and second derivatives against torch's in float64.

    (gradgradcheck alone cannot see an error of the composite: its numerical and
    analytical sides both differentiate the same composite first derivative.)
    """
    dtype = DTYPES[dtype_name]
    x = layout.make(dtype).requires_grad_()
    weight, bias = (t.requires_grad_() for t in _parameters(layout.features, dtype))
    running_mean, running_var, counter = _buffers(layout.features, dtype)
    y, status = native.train(x, weight, bias, running_mean, running_var, counter, layout.axis, 0.1, EPS)
    assert status == 0
    assert y is not None
    grad_output = torch.randn(layout.shape, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_output, create_graph=True)

    feature = layout.axis % len(layout.shape)
    x64, w64, b64 = (t.detach().double().clone().requires_grad_() for t in (x, weight, bias))
    moved = x64.movedim(feature, 1).contiguous()
    y64 = F.batch_norm(moved, None, None, w64, b64, True, 0.0, EPS).movedim(1, feature).contiguous()
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), grad_output.double(), create_graph=True)
    for name, grad, expected in zip(("x", "weight", "bias"), grads, grads64):
        _assert_close(grad, expected, f"grad {name}", grad=True)
    if dtype == torch.bfloat16:
        return
    probe = torch.randn(layout.shape, dtype=torch.float64)
    probe_weight = torch.randn(layout.features, dtype=torch.float64)
    second = torch.autograd.grad(
        (grads[0] * probe.to(dtype)).sum() + (grads[1] * probe_weight.to(grads[1].dtype)).sum(), (x, weight)
    )
    second64 = torch.autograd.grad((grads64[0] * probe).sum() + (grads64[1] * probe_weight).sum(), (x64, w64))
    for name, grad, expected in zip(("x", "weight"), second, second64):
        _assert_close(grad, expected, f"second derivative, {name}", grad=True)


@requires_native
@pytest.mark.parametrize("leaves", ["x", "weight", "bias", "weight-bias", "x-bias"])
def test_gradients_of_some_inputs_only(leaves: str) -> None:
    """Only some of x, weight and bias need a gradient: the backward must give each its own."""
    layout = LAYOUTS[3]
    x = layout.make(torch.float32)
    weight, bias = _parameters(layout.features, torch.float32)
    named = {"x": x, "weight": weight, "bias": bias}
    wanted = leaves.split("-")
    for name in wanted:
        named[name].requires_grad_()
    y, status = native.train(x, weight, bias, None, None, None, layout.axis, 0.1, EPS)
    assert status == 0
    assert y is not None
    grad_output = torch.randn(layout.shape)
    grads = torch.autograd.grad(y, [named[name] for name in wanted], grad_output)
    expected = _reference(x, layout.axis, weight, bias, grad_output=grad_output)
    for name, grad in zip(wanted, grads):
        assert grad.dtype == torch.float32
        _assert_close(grad, expected.grads[name], f"grad {name}", grad=True)


# --- threads -------------------------------------------------------------------------------------------------------

THREADED_LAYOUTS = [
    Layout("nchw", (64, 16, 8, 8)),
    Layout("dense", (4096, 40)),
    Layout("dense-wide", (600, 100)),
    Layout("channels-last", (16, 32, 16, 16), memory_format=torch.channels_last),
]


def _team_size(numel: int) -> int | None:
    path = native.library_path()
    if path is None:
        return None
    library = ctypes.CDLL(str(path))
    library.bn_team_size.restype = ctypes.c_int
    library.bn_team_size.argtypes = [ctypes.c_int64]
    return int(library.bn_team_size(numel))


def _run_training(layout: Layout, x: torch.Tensor, grad_output: torch.Tensor) -> list[torch.Tensor]:
    x = layout.like(x.detach()).requires_grad_()
    weight, bias = (t.requires_grad_() for t in _parameters(layout.features, x.dtype))
    running_mean, running_var, counter = _buffers(layout.features, x.dtype)
    y, status = native.train(x, weight, bias, running_mean, running_var, counter, layout.axis, 0.1, EPS)
    assert status == 0
    assert y is not None
    _same_layout(y, x, layout)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_output)
    assert counter.item() == 4
    return [y.detach(), running_mean, running_var, *grads]


@requires_native
@pytest.mark.parametrize("layout", THREADED_LAYOUTS, ids=[layout.name for layout in THREADED_LAYOUTS])
def test_two_threads_match_the_reference_and_one_thread(layout: Layout, two_threads: None) -> None:
    assert layout.make(torch.float32).numel() > 32768
    x = layout.make(torch.float32)
    grad_output = layout.like(torch.randn(layout.shape))
    two = _run_training(layout, x, grad_output)
    weight, bias = _parameters(layout.features, torch.float32)
    old_mean, old_var, _ = _buffers(layout.features, torch.float32)
    expected = _reference(x, layout.axis, weight, bias, old_mean, old_var, 0.1, 3, grad_output)
    targets = [expected.y, *_stats(expected), *expected.grads.values()]
    names = ["y", "running_mean", "running_var", "grad x", "grad weight", "grad bias"]
    for index, (actual, target, name) in enumerate(zip(two, targets, names)):
        _assert_close(actual, target, f"{name} (2 threads)", grad=index >= 3)
    torch.set_num_threads(1)
    one = _run_training(layout, x, grad_output)
    for index, (a, b, name) in enumerate(zip(two, one, names)):
        _assert_close(a, b.double(), f"{name} (1 thread vs 2)", grad=index >= 3)


def _primitive_results(
    x: torch.Tensor, axis: int, dy: torch.Tensor, inputs: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    i = inputs
    count = x.numel() // x.shape[axis]
    results = [
        native.stats(x, axis),
        native.normalize(x, i["mean"], i["invstd"], i["weight"], i["bias"], axis),
        native.grad_sums(dy, x, i["mean"], i["invstd"], axis),
        native.grad_input(dy, x, i["mean"], i["invstd"], i["weight"], i["sum_dy"], i["sum_dy_xhat"], count, axis),
    ]
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


@requires_native
@pytest.mark.parametrize("layout", THREADED_LAYOUTS, ids=[layout.name for layout in THREADED_LAYOUTS])
def test_two_threads_primitive_operators_match_the_reference_and_one_thread(layout: Layout, two_threads: None) -> None:
    x = layout.make(torch.float32)
    dy = layout.like(torch.randn(layout.shape))
    _check_primitive_operators(x, layout.axis, dy)  # with two threads
    inputs = _primitive_reference(x, dy, layout.axis % x.dim()).inputs
    two = _primitive_results(x, layout.axis, dy, inputs)
    torch.set_num_threads(1)
    one = _primitive_results(x, layout.axis, dy, inputs)
    for name, a, b in zip(("stats", "normalize", "grad_sums", "grad_input"), two, one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


@requires_native
def test_the_library_follows_torch_thread_count(two_threads: None) -> None:
    if native.library_path() is None:
        pytest.skip("the operators were registered by another library in this process")
    assert _team_size(1 << 20) == 2
    assert _team_size(32767) == 1  # below the grain: one thread
    assert _team_size(40000) == 1  # one grain's worth of work per thread at most
    assert _team_size(65536) == 2
    torch.set_num_threads(1)
    assert _team_size(1 << 20) == 1


@requires_native
def test_a_new_python_thread_follows_torch_thread_count() -> None:
    """torch.set_num_threads(1) (conftest), then a native call in a fresh Python thread: its kernels use one thread.

    PyTorch sets each thread's OpenMP count lazily; the operators ask for it before running, so a
    thread whose first PyTorch call is ours still follows ``torch.set_num_threads``.
    """
    if native.library_path() is None:
        pytest.skip("the operators were registered by another library in this process")
    assert torch.get_num_threads() == 1
    seen: dict[str, int | None] = {}

    def work() -> None:
        batch_norm(torch.randn(8, 4), None, None, training=True)  # the thread's first PyTorch call
        seen["team"] = _team_size(1 << 20)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen["team"] == 1


# --- large float32 outputs: streaming stores -----------------------------------------------------------------------

LARGE_LAYOUTS = [
    Layout("nchw-4MiB", (4, 64, 64, 64)),  # exactly 4 MiB of float32
    Layout("dense", (2048, 600)),
    Layout("nchw-unaligned-rows", (10, 7, 123, 131)),  # rows of 131 floats: not 32-byte multiples
    Layout("dense-unaligned-rows", (20000, 55)),
    Layout("channels-last", (4, 64, 64, 64), memory_format=torch.channels_last),
]


@requires_native
@pytest.mark.parametrize("layout", LARGE_LAYOUTS, ids=[layout.name for layout in LARGE_LAYOUTS])
def test_large_float32_outputs_match_the_reference(layout: Layout) -> None:
    x = layout.make(torch.float32)
    assert x.numel() * 4 >= 4 << 20
    grad_output = torch.randn(layout.shape)
    trained = _run_training(layout, x, grad_output)
    weight, bias = _parameters(layout.features, torch.float32)
    old_mean, old_var, _ = _buffers(layout.features, torch.float32)
    expected = _reference(x, layout.axis, weight, bias, old_mean, old_var, 0.1, 3, grad_output)
    targets = [expected.y, *_stats(expected), *expected.grads.values()]
    names = ["y", "running_mean", "running_var", "grad x", "grad weight", "grad bias"]
    for index, (actual, target, name) in enumerate(zip(trained, targets, names)):
        _assert_close(actual, target, name, grad=index >= 3)

    y = native.inference(x, old_mean, old_var, weight, bias, layout.axis, EPS)
    assert y is not None
    _same_layout(y, x, layout)
    _assert_close(y, _reference(x, layout.axis, weight, bias, old_mean, old_var, training=False).y, "eval y")
    _check_primitive_operators(x, layout.axis, layout.like(grad_output))


# --- bfloat16 outputs: vectors of 16, rows that straddle them, streaming stores ------------------------------------

BF16_LAYOUTS = [
    Layout("rows-131", (3, 5, 131)),  # 8 vectors and 3 elements a row: every row ends inside a vector
    Layout("rows-196", (4, 6, 14, 14)),
    Layout("rows-7", (5, 3, 7)),  # rows shorter than a vector
    Layout("rows-16", (3, 4, 16)),
    Layout("rows-17", (3, 4, 17)),
    Layout("dense-55", (9, 55)),  # 16 + 16 + 16 + 7 per row: every tail
    Layout("channels-last", (2, 40, 3, 5), memory_format=torch.channels_last),
    Layout("streamed-rows-131", (9, 16, 131, 131)),  # 4.9 MiB of bfloat16 per thread: streaming stores
    Layout("streamed-channels-last", (8, 48, 80, 80), memory_format=torch.channels_last),
]


def _bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at ``values`` (float64), for normal numbers."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, exponent - 7)


@requires_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", BF16_LAYOUTS, ids=[layout.name for layout in BF16_LAYOUTS])
def test_bfloat16_outputs_are_rounded_to_nearest(layout: Layout, threads: int) -> None:
    """Eval and normalize of bfloat16 inputs: every output within one bfloat16 step of the float64 value (and
    float32 rounding of the terms), nearly all of them the nearest bfloat16 (float32 arithmetic can tip a value
    lying within 1e-7 of a midpoint), NaN and infinity propagated, the input's layout kept."""
    torch.set_num_threads(threads)
    try:
        x = layout.make(torch.bfloat16)
        flat = x.view(-1) if x.is_contiguous() else x.permute(0, 2, 3, 1).reshape(-1)
        flat[7] = float("nan")
        flat[x.numel() // 2 + 3] = float("inf")
        weight, bias = _parameters(layout.features, torch.bfloat16)
        running_mean, running_var, _ = _buffers(layout.features, torch.bfloat16)
        shape = [1] * x.dim()
        shape[layout.axis] = layout.features
        exact = (x.double() - running_mean.double().view(shape)) / torch.sqrt(running_var.double().view(shape) + EPS)
        exact = exact * weight.double().view(shape) + bias.double().view(shape)
        scale = weight.double().view(shape) / torch.sqrt(running_var.double().view(shape) + EPS)
        terms = (x.double().abs() + running_mean.double().abs().view(shape)) * scale.abs() + bias.double().abs().view(
            shape
        )
        invstd = 1 / torch.sqrt(running_var.double() + EPS)
        outputs = {
            "eval": native.inference(x, running_mean, running_var, weight, bias, layout.axis, EPS),
            "normalize": kernels.normalize(
                x, running_mean, invstd.float(), weight, bias, layout.axis, backend="native"
            ),
        }
        for what, y in outputs.items():
            assert y is not None, what
            assert y.dtype == torch.bfloat16, what
            _same_layout(y, x, layout)
            finite = exact.isfinite()
            assert torch.equal(y.isnan(), exact.isnan()), what
            assert torch.equal(y.isinf() & (y > 0), exact.isinf() & (exact > 0)), what
            error = (y.double() - exact)[finite].abs()
            # One bfloat16 step, plus float32 rounding of the terms summed (x * scale + shift cancels near 0).
            allowed = _bf16_ulp(exact[finite]) + 2.0**-22 * terms[finite]
            assert bool((error <= allowed).all()), f"{what}: an output more than one step away"
            nearest = (y[finite] == exact[finite].float().to(torch.bfloat16)).double().mean().item()
            assert nearest >= 0.999, f"{what}: only {nearest:.5f} rounded to nearest"
    finally:
        torch.set_num_threads(1)


# --- eval through batch_norm ---------------------------------------------------------------------------------------


@requires_native
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_eval_matches_the_float64_reference(layout: Layout, dtype_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = DTYPES[dtype_name]
    calls: list[bool] = []
    original = native.inference

    def spy(*args: Any) -> torch.Tensor | None:
        y = original(*args)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(native, "inference", spy)
    x = layout.make(dtype)
    weight, bias = _parameters(layout.features, dtype)
    running_mean, running_var, counter = _buffers(layout.features, dtype)
    before = (running_mean.clone(), running_var.clone())
    y = batch_norm(
        x, running_mean, running_var, weight, bias, False, 0.1, EPS, layout.axis, num_batches_tracked=counter
    )
    assert calls == [True]
    _same_layout(y, x, layout)
    _assert_close(y, _reference(x, layout.axis, weight, bias, running_mean, running_var, training=False).y, "y")
    assert torch.equal(running_mean, before[0])
    assert torch.equal(running_var, before[1])
    assert counter.item() == 3


@requires_native
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_eval_with_gradients_runs_the_native_node(layout: Layout, dtype_name: str) -> None:
    """Eval with a gradient (fine-tuning on frozen statistics): the native node, matching float64 torch."""
    dtype = DTYPES[dtype_name]
    x = layout.make(dtype).requires_grad_()
    weight, bias = (t.requires_grad_() for t in _parameters(layout.features, dtype))
    running_mean, running_var, _ = _buffers(layout.features, dtype)
    before = (running_mean.clone(), running_var.clone())
    y = native.inference(x, running_mean, running_var, weight, bias, layout.axis, EPS)
    assert y is not None
    assert y.requires_grad
    assert "Eval" in type(y.grad_fn).__name__ or "Eval" in y.grad_fn.name()
    _same_layout(y, x, layout)
    grad_output = layout.like(torch.randn(layout.shape).to(dtype))
    grads = torch.autograd.grad(y, (x, weight, bias), grad_output)
    expected = _reference(x, layout.axis, weight, bias, running_mean, running_var, None, 0, grad_output, False)
    _assert_close(y, expected.y, "y")
    for name, grad in zip(("x", "weight", "bias"), grads):
        _assert_close(grad, expected.grads[name], f"grad {name}", grad=True, dtype=dtype)
    assert grads[0].dtype == dtype
    assert grads[1].dtype == weight.dtype
    assert torch.equal(running_mean, before[0])
    assert torch.equal(running_var, before[1])


@requires_native
@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "x+weight"])
def test_eval_with_gradients_on_a_subset_of_inputs(wanted: str) -> None:
    """Only what requires a gradient gets one; torch's op in float64 is the reference."""
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64)
    weight, bias = torch.linspace(0.5, 1.5, 4, dtype=torch.float64), torch.linspace(-1, 1, 4, dtype=torch.float64)
    running_mean, running_var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    ours = [t.clone().requires_grad_(name in wanted) for t, name in ((x, "x"), (weight, "weight"), (bias, "bias"))]
    theirs = [t.clone().requires_grad_(name in wanted) for t, name in ((x, "x"), (weight, "weight"), (bias, "bias"))]
    grad_output = torch.randn(6, 4, 3, 5, dtype=torch.float64)
    y = batch_norm(ours[0], running_mean, running_var, ours[1], ours[2], False, 0.1, EPS)
    expected = torch.nn.functional.batch_norm(
        theirs[0], running_mean, running_var, theirs[1], theirs[2], False, 0.1, EPS
    )
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y.backward(grad_output)
    expected.backward(grad_output)
    for mine, reference in zip(ours, theirs):
        assert (mine.grad is None) == (reference.grad is None)
        if reference.grad is not None:
            torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-12, atol=1e-12)


@requires_native
def test_eval_with_gradients_has_second_derivatives() -> None:
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.linspace(0.5, 1.5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.linspace(-1, 1, 3, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = native.inference(x, running_mean, running_var, weight, bias, 1, EPS)
        assert y is not None
        return y

    assert torch.autograd.gradcheck(op, (x, weight, bias))
    assert torch.autograd.gradgradcheck(op, (x, weight, bias))


@requires_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("shape", "axis", "channels_last"),
    [
        ((3000, 10), 1, False),  # narrow rows: many cache-sized chunks of rows
        ((700, 300), 1, False),  # wide rows
        ((6, 5, 70, 70), 1, False),  # channels-first rows of 4,900 positions
        ((4, 9, 40, 40), 1, True),  # channels-last
        ((40, 50, 33), -1, False),  # (N, L, C) sequence
    ],
    ids=["narrow", "wide", "nchw", "channels-last", "sequence"],
)
@pytest.mark.parametrize("wanted", ["x+weight+bias", "x", "weight+bias", "bias"])
def test_eval_backward_in_one_pass_matches_float64(
    shape: tuple[int, ...], axis: int, channels_last: bool, dtype: torch.dtype, threads: int, wanted: str
) -> None:
    """The one-pass eval backward (sums and dx chunk by chunk) on tensors of many chunks, 1 and 2 threads,
    against torch's op in float64; with 2 threads the row ranges split between them too."""
    generator = torch.Generator().manual_seed(7)
    x64 = 3 + 2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    dy64 = torch.randn(shape, generator=generator, dtype=torch.float64)
    features = shape[axis]
    weight64 = 1 + 0.5 * torch.randn(features, generator=generator, dtype=torch.float64)
    bias64 = torch.randn(features, generator=generator, dtype=torch.float64)
    mean64 = 3 + torch.randn(features, generator=generator, dtype=torch.float64)
    var64 = 4 * torch.rand(features, generator=generator, dtype=torch.float64) + 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    x, dy = cast(x64), cast(dy64)
    # the reference sees the rounded input, so only the op's own rounding differs
    xr = x.to(torch.float64)
    leaves = [x.requires_grad_("x" in wanted), weight64.to(acc).requires_grad_("weight" in wanted)]
    leaves.append(bias64.to(acc).requires_grad_("bias" in wanted))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = native.inference(leaves[0], mean64.to(acc), var64.to(acc), leaves[1], leaves[2], axis, EPS)
        assert y is not None
        wanted_leaves = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(y, wanted_leaves, dy)
    finally:
        torch.set_num_threads(previous)
    moved = (lambda t: t.movedim(-1, 1)) if axis == -1 else (lambda t: t)
    ref_leaves = [xr.detach().clone(), weight64.to(acc).double(), bias64.to(acc).double()]
    for leaf, ref in zip(leaves, ref_leaves):
        ref.requires_grad_(leaf.requires_grad)
    expected_y = F.batch_norm(
        moved(ref_leaves[0]),
        mean64.to(acc).double(),
        var64.to(acc).double(),
        ref_leaves[1],
        ref_leaves[2],
        False,
        0.1,
        EPS,
    )
    expected = torch.autograd.grad(expected_y, [t for t in ref_leaves if t.requires_grad], moved(dy.double()))
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for grad, reference in zip(grads, expected):
        scale = reference.abs().max().item() + 1.0
        assert (grad.double() - reference).abs().max().item() <= tolerance * scale
    if leaves[0].requires_grad:
        assert grads[0].dtype == dtype
        assert grads[0].stride() == x.stride()


@requires_native
def test_eval_backward_checks_versions_and_frees_its_tensors() -> None:
    """As torch's op: running_mean changed in place before backward, or a second backward, raise."""
    x = torch.randn(8, 3, requires_grad=True)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    y = native.inference(x, running_mean, running_var, None, None, 1, EPS)
    assert y is not None
    running_mean.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = native.inference(x, running_mean, running_var, None, None, 1, EPS)
    assert y is not None
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


@requires_native
def test_train_backward_checks_versions_and_frees_its_tensors() -> None:
    x = torch.randn(8, 3, requires_grad=True)
    weight = torch.ones(3, requires_grad=True)
    y, status = native.train(x * 1, weight, None, None, None, None, 1, 0.1, EPS)
    assert y is not None
    assert status == 0
    y.sum().backward(retain_graph=True)
    with torch.no_grad():
        weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y, _ = native.train(x * 1, weight, None, None, None, None, 1, 0.1, EPS)
    assert y is not None
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


@requires_native
def test_python_entry_points_equal_the_operators() -> None:
    """With Python's headers the library is also an extension module, called directly; its functions and the
    torch.ops operators are the same C++ functions: bit-identical results, and the same declines."""
    import sysconfig

    if (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        assert native._entry == "python module"
    ops = torch.ops.batchnorm
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    weight, bias = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y = native.inference(x, mean, var, weight, bias, 1, EPS)
    assert y is not None
    assert torch.equal(y, ops.inference(x, mean, var, weight, bias, 1, EPS))
    buffers = [(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)) for _ in range(2)]
    y1, status1 = native.train(x, weight, bias, *buffers[0], None, 1, 0.1, EPS)
    y2, status2 = ops.train(x, weight, bias, *buffers[1], None, 1, 0.1, EPS)
    assert status1 == status2 == 0
    assert y1 is not None
    assert torch.equal(y1, y2)
    assert torch.equal(buffers[0][0], buffers[1][0])
    assert torch.equal(buffers[0][1], buffers[1][1])
    # declined alike: an integer input
    assert native.inference(x.long(), mean, var, weight, bias, 1, EPS) is None
    assert ops.inference(x.long(), mean, var, weight, bias, 1, EPS) is None


# --- fallbacks: no library -----------------------------------------------------------------------------------------


def test_without_the_library_batch_norm_falls_back(without_native: str) -> None:
    assert not native.available()
    assert native.failure() == without_native
    assert not native.supports(torch.float32)
    assert native.code(torch.float32) is None
    layout = LAYOUTS[3]
    x = layout.make(torch.float32).requires_grad_()
    for setting in ("auto", "native"):
        with kernels.use_kernel(setting):
            train = kernels.plan(x, True)
            assert (train.route, train.backend) == ("function", "torch")
            assert "unavailable" in train.reason
            evaluate = kernels.plan(x.detach(), False)
            assert (evaluate.route, evaluate.backend) == ("composite", "torch")
    with pytest.raises(RuntimeError, match="native kernels unavailable: no C compiler found"):
        native._require()
    with pytest.raises(RuntimeError, match="no C compiler found"):
        native.build()

    weight, bias = (t.requires_grad_() for t in _parameters(layout.features, torch.float32))
    running_mean, running_var, counter = _buffers(layout.features, torch.float32)
    old_mean, old_var = running_mean.clone(), running_var.clone()
    y = batch_norm(x, running_mean, running_var, weight, bias, True, None, EPS, 1, num_batches_tracked=counter)
    grad_output = torch.randn(layout.shape)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_output)
    expected = _reference(x, 1, weight, bias, old_mean, old_var, None, 3, grad_output)
    _assert_close(y, expected.y, "y")
    expected_mean, expected_var = _stats(expected)
    _assert_close(running_mean, expected_mean, "running_mean")
    _assert_close(running_var, expected_var, "running_var")
    assert counter.item() == 4
    for name, grad in zip(("x", "weight", "bias"), grads):
        _assert_close(grad, expected.grads[name], f"grad {name}", grad=True)
    with kernels.use_kernel("native"):
        forced_y = batch_norm(x.detach(), running_mean, running_var, weight, bias, False, 0.1, EPS, 1)
    _assert_close(forced_y, _reference(x, 1, weight, bias, running_mean, running_var, training=False).y, "eval y")


@pytest.mark.parametrize("setting", ["0", "off", "false", "No"])
def test_disabled_by_the_environment(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.NATIVE_ENV_VAR, setting)
    library = native._Library()
    assert library.get() is False
    assert library.tried
    assert library.problem is not None
    assert "BATCHNORM_NATIVE" in library.problem
    assert library.get() is False  # remembered
    monkeypatch.setattr(native, "_library", library)
    monkeypatch.setattr(native, "_CODES", {})
    assert not native.available()
    assert "BATCHNORM_NATIVE" in (native.failure() or "")
    with pytest.raises(RuntimeError, match="BATCHNORM_NATIVE"):
        native.build()
    x = _data((6, 4))
    y = batch_norm(x, None, None, None, None, True)
    _assert_close(y, _reference(x, 1, None, None).y, "y")


def test_a_missing_compiler_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(native.NATIVE_ENV_VAR, raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(tmp_path / "cache"))
    library = native._Library()
    # get() would find the operators this process has already registered; ask the build step itself.
    assert library._ensure_built() is None
    assert library.problem is not None
    assert "compiler" in library.problem
    assert "CC" in library.problem
    assert not (tmp_path / "cache").exists()  # nothing was written


@pytest.mark.skipif(shutil.which("false") is None or shutil.which("c++") is None, reason="needs false and c++")
def test_a_failing_compiler_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    false = shutil.which("false")
    assert false is not None
    if not (Path(torch.__file__).parent / "include" / "torch" / "library.h").exists():
        pytest.skip("this PyTorch installation has no C++ headers")
    monkeypatch.setenv("CC", false)
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(tmp_path))
    library = native._Library()
    assert library._ensure_built() is None
    assert library.problem is not None
    assert library.problem.startswith("compilation failed")
    assert false in library.problem
    assert not list(tmp_path.glob("*.so"))


def _fake_compile(calls: list[Path]) -> Callable[..., str | None]:
    """A stand-in for ``native._compile`` that writes a file where the library would go (no compiler runs)."""

    def compile_(c_compiler: list[str], cxx_compiler: list[str], target: Path) -> str | None:
        calls.append(target)
        target.write_bytes(b"not a library")
        return None

    return compile_


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("c++") is None, reason="needs cc and c++")
def test_a_build_is_cached_and_reused_without_compiling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Built once into an empty cache, then found there by a second library; new sources, a new key.

    The compilation itself is stood in for (it takes 15-60 s here); conftest has built the real library.
    """
    if not (Path(torch.__file__).parent / "include" / "torch" / "library.h").exists():
        pytest.skip("this PyTorch installation has no C++ headers")
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []
    monkeypatch.setattr(native, "_compile", _fake_compile(calls))
    first = native._Library()
    path = first._ensure_built()
    assert path is not None, first.problem
    assert calls == [path]
    assert path.parent == tmp_path / "cache"
    assert path.name.startswith("native-")
    assert path.suffix == ".so"
    assert (tmp_path / "cache" / "build.lock").exists()

    second = native._Library()
    assert second._ensure_built() == path
    assert second.problem is None
    assert calls == [path]  # found, not compiled again

    sources = tmp_path / "sources"
    shutil.copytree(native._SOURCE_DIR, sources)
    (sources / "batchnorm.c").write_text((sources / "batchnorm.c").read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "_SOURCE_DIR", sources)
    third = native._Library()
    changed = third._ensure_built()
    assert changed is not None
    assert changed != path  # another key
    assert calls == [path, changed]


def test_the_cache_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(tmp_path / "explicit"))
    assert native._cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("BATCHNORM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native._cache_dir() == tmp_path / "xdg" / "batchnorm"


# --- sizes, codes ---------------------------------------------------------------------------------------------------


_NCHW = (4, 3, 5, 6)
DENSE_BLOCKS = [  # (input, feature axis): memory the operator reads as a (B, C, S) block
    (lambda: torch.randn(_NCHW), 1),
    (lambda: torch.randn(_NCHW), 0),
    (lambda: torch.randn(_NCHW), 3),
    (lambda: torch.randn(_NCHW).contiguous(memory_format=torch.channels_last), 1),
    (lambda: torch.randn(2, 3, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d), 1),
    (lambda: torch.randn(3, 4, 5), 2),
    (lambda: torch.randn(12, 5), 1),
    (lambda: torch.randn(4, 6).t(), 0),  # features innermost
]
NOT_DENSE = [
    (lambda: torch.randn(6, 8)[:, ::2], 1),
    (lambda: torch.randn(4, 6).t(), 1),
    (lambda: torch.randn(4, 4, 5, 6)[:, :, ::2], 1),
    (lambda: torch.randn(_NCHW).contiguous(memory_format=torch.channels_last)[:, :, 1:], 1),
]


@requires_native
@pytest.mark.parametrize(("make", "axis"), DENSE_BLOCKS)
def test_the_operator_reads_dense_layouts_in_place(make: Callable[[], torch.Tensor], axis: int) -> None:
    x = make()
    y, status = native.train(x, None, None, None, None, None, axis, 0.1, 1e-5)
    assert status == 0
    assert y is not None
    assert y.stride() == x.stride()
    expected = F.batch_norm(x.double().movedim(axis, 1), None, None, training=True).movedim(1, axis)
    torch.testing.assert_close(y.double(), expected, rtol=2e-6, atol=2e-6)


@requires_native
@pytest.mark.parametrize(("make", "axis"), NOT_DENSE)
def test_the_operator_declines_layouts_that_are_not_dense(make: Callable[[], torch.Tensor], axis: int) -> None:
    assert native.train(make(), None, None, None, None, None, axis, 0.1, 1e-5) == (None, -1)


@requires_native
def test_codes_of_dtypes() -> None:
    assert native.code(torch.float32) == 0
    assert native.code(torch.float64) == 1
    assert native.code(torch.bfloat16) == 2
    assert native.supports(torch.float32)
    assert not native.supports(torch.int32)
    assert native.code(torch.int64) is None
    assert native.failure() is None
    path = native.library_path()
    assert path is None or path.exists()


# --- the primitives' operators: stats, normalize, grad_sums, grad_input ---------------------------------------------


def _dims(x: torch.Tensor, feature: int) -> list[int]:
    return [d for d in range(x.dim()) if d != feature]


def _b(vector: torch.Tensor, x: torch.Tensor, feature: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[feature] = -1
    return vector.reshape(shape)


@dataclass
class PrimitiveReference:
    """Per-feature statistics of ``x`` in float64, the per-feature inputs of the other primitives, and their results."""

    mean: torch.Tensor  # float64
    var: torch.Tensor  # float64, biased
    inputs: dict[str, torch.Tensor]  # mean, invstd, weight, bias, sum_dy, sum_dy_xhat: accumulation dtype
    y: torch.Tensor
    sum_dy: torch.Tensor
    sum_dy_xhat: torch.Tensor
    dx: torch.Tensor
    dx_scale: torch.Tensor  # the magnitude of dx's terms, which cancel


def _primitive_reference(x: torch.Tensor, dy: torch.Tensor, feature: int) -> PrimitiveReference:
    acc = _accumulation(x.dtype)
    dims = _dims(x, feature)
    x64, g = x.double(), dy.double()
    mean64 = x64.mean(dims)
    var64 = ((x64 - _b(mean64, x, feature)) ** 2).mean(dims)
    features = x.shape[feature]
    inputs = {
        "mean": mean64.to(acc),
        "invstd": torch.rsqrt(var64 + EPS).to(acc),
        "weight": torch.linspace(-1.5, 1.5, features, dtype=acc),
        "bias": torch.linspace(-0.2, 0.3, features, dtype=acc),
    }
    s = _b(inputs["invstd"].double(), x, feature)
    x_hat = (x64 - _b(inputs["mean"].double(), x, feature)) * s
    y = x_hat * _b(inputs["weight"].double(), x, feature) + _b(inputs["bias"].double(), x, feature)
    sum_dy, sum_dy_xhat = g.sum(dims), (g * x_hat).sum(dims)
    inputs["sum_dy"], inputs["sum_dy_xhat"] = sum_dy.to(acc), sum_dy_xhat.to(acc)
    count = x.numel() // features
    gain = s * _b(inputs["weight"].double(), x, feature)
    mean_dy = _b(inputs["sum_dy"].double(), x, feature) / count
    mean_dy_xhat = _b(inputs["sum_dy_xhat"].double(), x, feature) / count
    dx = gain * (g - mean_dy - x_hat * mean_dy_xhat)
    scale = gain.abs() * (g.abs() + mean_dy.abs() + x_hat.abs() * mean_dy_xhat.abs())
    return PrimitiveReference(mean64, var64, inputs, y, sum_dy, sum_dy_xhat, dx, scale)


def _within(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, relative: float, what: str,
            ulps: float = 0.0, dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """``|actual - expected| <= relative * scale + ulps * u(dtype) * |expected|``, elementwise."""
    assert actual.shape == expected.shape, what
    error = (actual.double() - expected.double()).abs()
    rounding = 0.0 if dtype is None else ulps * torch.finfo(dtype).eps / 2 * expected.double().abs()
    bound = relative * scale + rounding
    assert bool((error <= bound).all()), f"{what}: error {error.max().item():.3g} exceeds the tolerance"


def _check_primitive_operators(x: torch.Tensor, axis: int, dy: torch.Tensor) -> None:
    feature = axis % x.dim()
    dtype = x.dtype
    expected = _primitive_reference(x, dy, feature)
    i = expected.inputs
    tight = dtype == torch.float64
    count = x.numel() // x.shape[feature]

    stats = native.stats(x, axis)
    assert stats is not None
    assert stats.dtype == _accumulation(dtype)
    assert stats.shape == (2, x.shape[feature])
    std = expected.var.sqrt()
    _within(stats[0], expected.mean, expected.mean.abs() + std, 1e-12 if tight else 2e-6, "mean")
    _within(stats[1], expected.var, expected.var, 1e-11 if tight else 2e-5, "var")

    for weight, bias in ((i["weight"], i["bias"]), (None, None)):
        y = native.normalize(x, i["mean"], i["invstd"], weight, bias, axis)
        assert y is not None
        assert y.dtype == dtype
        assert y.stride() == x.stride()
        reference = expected.y
        if weight is None:
            reference = (x.double() - _b(i["mean"].double(), x, feature)) * _b(i["invstd"].double(), x, feature)
        _within(y, reference, 1 + reference.abs(), 1e-12 if tight else 1e-6, "y", ulps=2.0, dtype=dtype)

    sums = native.grad_sums(dy, x, i["mean"], i["invstd"], axis)
    assert sums is not None
    assert sums.dtype == _accumulation(dtype)
    dims = _dims(x, feature)
    x_hat = (x.double() - _b(i["mean"].double(), x, feature)) * _b(i["invstd"].double(), x, feature)
    _within(sums[0], expected.sum_dy, dy.double().abs().sum(dims), 1e-13 if tight else 1e-5, "sum_dy")
    magnitude = (dy.double() * x_hat).abs().sum(dims)
    _within(sums[1], expected.sum_dy_xhat, magnitude, 1e-13 if tight else 1e-5, "sum_dy_xhat")

    dx = native.grad_input(dy, x, i["mean"], i["invstd"], i["weight"], i["sum_dy"], i["sum_dy_xhat"], count, axis)
    assert dx is not None
    assert dx.dtype == dtype
    assert dx.stride() == x.stride()
    _within(dx, expected.dx, expected.dx_scale, 1e-13 if tight else 1e-6, "dx", ulps=2.0, dtype=dtype)


@requires_native
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(("make", "axis"), DENSE_BLOCKS)
def test_primitive_operators_read_dense_layouts_in_place(
    make: Callable[[], torch.Tensor], axis: int, dtype_name: str
) -> None:
    dtype = DTYPES[dtype_name]
    values = make()
    x = (values * 2 + 0.5).to(dtype)
    assert x.stride() == values.stride()
    dy = torch.randn_like(values).to(dtype)
    _check_primitive_operators(x, axis, dy)


@requires_native
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_primitive_operators_on_every_layout(layout: Layout, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    x = layout.make(dtype)
    dy = layout.like(torch.randn(layout.shape, dtype=torch.float64).to(dtype))
    _check_primitive_operators(x, layout.axis, dy)


@requires_native
def test_primitive_operators_on_offset_data_and_one_value_per_feature() -> None:
    x = (torch.randn(64, 5, 30, dtype=torch.float64) * 0.05 + 1e4).float()
    stats = native.stats(x, 1)
    assert stats is not None
    var = x.double().var((0, 2), correction=0)
    torch.testing.assert_close(stats[1].double(), var, rtol=1e-4, atol=0)
    single = torch.randn(1, 4)
    stats = native.stats(single, 1)
    assert stats is not None
    assert torch.equal(stats[0], single[0])
    assert torch.equal(stats[1], torch.zeros(4))


@requires_native
def test_grad_operators_copy_a_gradient_of_other_strides() -> None:
    """dy contiguous while x is channels-last: read in x's layout; dx has x's strides."""
    x = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 3, 5, 6)
    expected = _primitive_reference(x, dy, 1)
    i = expected.inputs
    sums = native.grad_sums(dy, x, i["mean"], i["invstd"], 1)
    assert sums is not None
    _within(sums[0], expected.sum_dy, dy.double().abs().sum((0, 2, 3)), 1e-5, "sum_dy")
    dx = native.grad_input(dy, x, i["mean"], i["invstd"], i["weight"], i["sum_dy"], i["sum_dy_xhat"], 120, 1)
    assert dx is not None
    assert dx.stride() == x.stride()
    _within(dx, expected.dx, expected.dx_scale, 1e-6, "dx")
    # and the reverse: x contiguous, dy channels-last
    x, dy = x.contiguous(), dy.contiguous(memory_format=torch.channels_last)
    dx = native.grad_input(dy, x, i["mean"], i["invstd"], i["weight"], i["sum_dy"], i["sum_dy_xhat"], 120, 1)
    assert dx is not None
    assert dx.is_contiguous()
    _within(dx, expected.dx, expected.dx_scale, 1e-6, "dx")


def _primitive_arguments(**changes: Any) -> dict[str, Any]:
    """Valid float32 arguments of the four primitive operators on a (6, 4) input, with ``changes``."""
    x = _data((6, 4))
    arguments: dict[str, Any] = {
        "x": x,
        "dy": torch.randn(6, 4),
        "mean": x.mean(0),
        "invstd": torch.linspace(0.5, 1.5, 4),
        "weight": torch.linspace(0.5, 1.5, 4),
        "bias": torch.linspace(-0.2, 0.3, 4),
        "sum_dy": torch.linspace(-1.0, 1.0, 4),
        "sum_dy_xhat": torch.linspace(1.0, 2.0, 4),
        "count": 6,
        "axis": 1,
    }
    arguments.update(changes)
    return arguments


def _primitive_calls(a: dict[str, Any]) -> dict[str, Callable[[], torch.Tensor | None]]:
    return {
        "stats": lambda: native.stats(a["x"], a["axis"]),
        "normalize": lambda: native.normalize(a["x"], a["mean"], a["invstd"], a["weight"], a["bias"], a["axis"]),
        "grad_sums": lambda: native.grad_sums(a["dy"], a["x"], a["mean"], a["invstd"], a["axis"]),
        "grad_input": lambda: native.grad_input(
            a["dy"], a["x"], a["mean"], a["invstd"], a["weight"], a["sum_dy"], a["sum_dy_xhat"], a["count"], a["axis"]
        ),
    }


# case -> (changes, the operators that decline it; the others take it)
PRIMITIVE_DECLINES: dict[str, tuple[Callable[[], dict[str, Any]], tuple[str, ...]]] = {
    "strided-input": (
        lambda: {"x": _data((6, 8))[:, ::2], "dy": torch.randn(6, 8)[:, ::2]},
        ("stats", "normalize", "grad_sums", "grad_input"),
    ),
    "transposed-input": (
        lambda: {"x": _data((4, 6)).t(), "dy": torch.randn(6, 4)},
        ("stats", "normalize", "grad_sums", "grad_input"),
    ),
    "sliced-channels-last": (
        lambda: {
            "x": _data((4, 4, 5, 6)).contiguous(memory_format=torch.channels_last)[:, :, 1:],
            "dy": torch.randn(4, 3, 5, 6),
            "mean": torch.zeros(3),
            "invstd": torch.ones(3),
            "weight": None,
            "bias": None,
            "sum_dy": torch.zeros(3),
            "sum_dy_xhat": torch.zeros(3),
        },
        ("stats", "normalize", "grad_sums", "grad_input"),
    ),
    "integer-input": (
        lambda: {"x": torch.randint(-5, 5, (6, 4), dtype=torch.int32)},
        ("stats", "normalize", "grad_sums", "grad_input"),
    ),
    "empty-input": (
        lambda: {"x": torch.empty(0, 4), "dy": torch.empty(0, 4)},
        ("stats", "normalize", "grad_sums", "grad_input"),
    ),
    "meta-input": (lambda: {"x": torch.empty(6, 4, device="meta")}, ("stats", "normalize", "grad_sums", "grad_input")),
    "axis-out-of-range": (lambda: {"axis": 2}, ("stats", "normalize", "grad_sums", "grad_input")),
    "float64-mean": (lambda: {"mean": torch.zeros(4, dtype=torch.float64)}, ("normalize", "grad_sums", "grad_input")),
    "strided-invstd": (lambda: {"invstd": torch.linspace(0.5, 1.5, 8)[::2]}, ("normalize", "grad_sums", "grad_input")),
    "weight-too-long": (lambda: {"weight": torch.ones(5)}, ("normalize", "grad_input")),
    "bfloat16-bias": (lambda: {"bias": torch.zeros(4, dtype=torch.bfloat16)}, ("normalize",)),
    "float64-sum": (lambda: {"sum_dy": torch.zeros(4, dtype=torch.float64)}, ("grad_input",)),
    "float64-gradient": (lambda: {"dy": torch.randn(6, 4, dtype=torch.float64)}, ("grad_sums", "grad_input")),
    "gradient-of-another-shape": (lambda: {"dy": torch.randn(4, 6)}, ("grad_sums", "grad_input")),
    "zero-count": (lambda: {"count": 0}, ("grad_input",)),
    "negative-count": (lambda: {"count": -6}, ("grad_input",)),
}


@requires_native
@pytest.mark.parametrize("case", list(PRIMITIVE_DECLINES))
def test_primitive_operators_decline_and_change_nothing(case: str) -> None:
    make, declining = PRIMITIVE_DECLINES[case]
    arguments = _primitive_arguments(**make())
    before = _snapshot(arguments)
    for name, call in _primitive_calls(arguments).items():
        result = call()
        if name in declining:
            assert result is None, name
        else:
            assert result is not None, name
        _assert_unchanged(arguments, before)


@requires_native
def test_primitive_operators_with_a_nonfinite_value() -> None:
    """NaN or inf in feature 1: its statistics are not finite, the other features are untouched."""
    for value in (math.nan, math.inf):
        x = _data((8, 3))
        x[2, 1] = value
        stats = native.stats(x, 1)
        assert stats is not None
        assert not stats[:, 1].isfinite().all()
        expected = x.double()[:, [0, 2]]
        torch.testing.assert_close(stats[0, [0, 2]].double(), expected.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[1, [0, 2]].double(), expected.var(0, correction=0), rtol=1e-5, atol=1e-6)


# --- torch.compile -------------------------------------------------------------------------------------------------


def test_torch_compile_runs_without_tracing_into_the_native_operators(native_calls: list[int]) -> None:
    """Under ``torch.compile`` the native operators step aside (Dynamo cannot trace them): same numbers, no warning."""
    from batchnorm import BatchNorm1d

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), BatchNorm1d(16), torch.nn.ReLU())
    theirs = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(32, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(ours, backend="eager", fullgraph=True)
        y = compiled(x)
        y.sum().backward()
    assert native_calls == []  # the composite route, traced
    expected = theirs(x)
    expected.sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var, rtol=1e-6, atol=1e-6)
    assert ours[1].get_buffer("num_batches_tracked").item() == 1
    assert ours[1].weight.grad is not None
    assert theirs[1].weight.grad is not None
    torch.testing.assert_close(ours[1].weight.grad, theirs[1].weight.grad, rtol=1e-5, atol=1e-5)
    assert not [w for w in caught if "torch._ops.batchnorm" in str(w.message)]
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(compiled(x), theirs(x), rtol=1e-5, atol=1e-5)


# --- edges found in review: empty batches, momentum, forward-mode AD, torch.func, raw operators ----------------------


@pytest.mark.parametrize(("shape", "axis"), [((0, 3), 1), ((2, 3, 0), 1), ((0, 3, 4, 4), 1), ((0, 5, 3), -1)], ids=str)
def test_eval_of_an_empty_batch_returns_an_empty_output(shape: tuple[int, ...], axis: int) -> None:
    """PyTorch returns an empty tensor for an empty eval batch; so must we, on every path."""
    x = torch.randn(shape)
    y = batch_norm(x, torch.zeros(3), torch.ones(3), training=False, axis=axis)
    assert y.shape == x.shape
    if axis == 1:
        module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[x.dim()]
        from batchnorm.nn.batchnorm import convert

        assert convert(module(3).eval())(x).shape == x.shape


@pytest.mark.parametrize("momentum", [-0.5, 1.5, math.nan])
@pytest.mark.parametrize("buffers", [True, False], ids=["buffers", "no-buffers"])
def test_a_momentum_outside_zero_one_is_an_error(momentum: float, buffers: bool) -> None:
    """The operator reads a negative momentum as "cumulative": the Python side must never pass one."""
    x = torch.randn(8, 3, 5)
    running = (torch.zeros(3), torch.ones(3)) if buffers else (None, None)
    counter = torch.tensor(0)
    with pytest.raises(ValueError, match="expected momentum in"):
        batch_norm(x, running[0], running[1], None, None, True, momentum=momentum, num_batches_tracked=counter)
    assert counter.item() == 0
    if buffers:
        assert running[0] is not None
        assert torch.equal(running[0], torch.zeros(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 3, 5), (12, 4)], ids=str)
def test_forward_mode_tangents_match_torch(training: bool, shape: tuple[int, ...]) -> None:
    import torch.autograd.forward_ad as forward_ad

    x = torch.randn(shape, dtype=torch.float64)
    tangent = torch.randn_like(x)
    features = shape[1]
    results = []
    for op in (batch_norm, F.batch_norm):
        running = (torch.zeros(features, dtype=torch.float64), torch.ones(features, dtype=torch.float64))
        with forward_ad.dual_level(), warnings.catch_warnings():
            # make_dual loads PyTorch's forward-AD decompositions, which use deprecated torch.jit.script
            warnings.simplefilter("ignore", DeprecationWarning)
            y = op(forward_ad.make_dual(x, tangent), running[0], running[1], None, None, training)  # type: ignore[no-untyped-call]
            unpacked = forward_ad.unpack_dual(y)  # type: ignore[no-untyped-call]
            results.append((unpacked.primal, unpacked.tangent))
    (ours, our_tangent), (theirs, their_tangent) = results
    assert our_tangent is not None
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(our_tangent, their_tangent, rtol=1e-10, atol=1e-10)


def test_torch_func_grad_and_jvp_match_torch() -> None:
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    tangent = torch.randn_like(x)

    def ours(t: torch.Tensor) -> torch.Tensor:
        return batch_norm(t, None, None, None, None, True)

    def theirs(t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, None, None, None, None, True)

    with warnings.catch_warnings():  # PyTorch's forward-AD decompositions use deprecated torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        grads = [torch.func.grad(lambda t, f=f: f(t).pow(3).sum())(x) for f in (ours, theirs)]
        jvps = [torch.func.jvp(f, (x,), (tangent,))[1] for f in (ours, theirs)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(jvps[0], jvps[1], rtol=1e-10, atol=1e-10)


@requires_native
def test_supports_agrees_with_the_library() -> None:
    """float16 kernels exist only when the compiler has _Float16; Python must ask the library, not assume."""
    for dtype, code in native.DTYPES.items():
        assert native.supports(dtype) == bool(torch.ops.batchnorm.supports(code))
    assert not torch.ops.batchnorm.supports(7)


def test_compiler_variables_may_carry_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """``CC="ccache gcc"`` style values: the program is looked up on PATH, the rest kept as arguments."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("CC", f"{compiler} -O0")
    assert native._compiler_command("CC", "cc") == [compiler, "-O0"]
    monkeypatch.setenv("CC", "/nonexistent/cc -O2")
    assert native._compiler_command("CC", "cc") is None
