"""Every kernel path of ``batchnorm.kernels`` against a float64 reference, on every layout, and the dispatch.

The reference is ``torch.nn.functional.batch_norm`` in float64 on the same
(rounded) input values, with the feature axis moved to 1. Each path is forced
with :func:`batchnorm.kernels.use_kernel`.

Tolerances:

* float64: ``1e-10`` absolute and relative, outputs, running statistics and gradients;
* float32: outputs within ``2e-6`` (a few float32 roundings of normalized
  values), gradients within ``1e-5`` of their largest magnitude;
* bfloat16 (outputs rounded to 8 significant bits): half a unit in the last
  place plus ``1e-5`` (the float32 accumulation), gradients half a unit plus
  ``1e-4`` of their largest magnitude; running statistics (float32) within
  ``2e-6``. PyTorch's kernels (the ``torch`` path) round some bfloat16
  intermediates: one unit in the last place of each value plus one of the
  largest (its channels-last backward is off by up to 1% of the largest gradient).

The compiled path compiles once per (layout, dtype) with dynamic shapes: about
20 s on a cold Inductor cache for this whole file, 2-5 s warm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from batchnorm import functional, kernels
from batchnorm.kernels import native
from batchnorm.functional import batch_norm

PATHS = ["native", "eager", "torch", "compiled"]
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Layout:
    """An input layout: a shape, the feature axis and the memory format."""

    name: str
    shape: tuple[int, ...]
    axis: int = 1
    memory_format: torch.memory_format = torch.contiguous_format

    def make(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        x = (torch.randn(self.shape, dtype=torch.float64) * 2 + 0.5).to(device=device, dtype=dtype)
        return x.contiguous(memory_format=self.memory_format)


LAYOUTS = [
    Layout("nchw", (4, 3, 5, 6)),
    Layout("channels-last", (4, 3, 5, 6), memory_format=torch.channels_last),
    Layout("dense", (12, 5)),
    Layout("sequence", (3, 4, 5), axis=-1),
    Layout("3d", (4, 3, 7)),
    Layout("5d", (2, 3, 2, 3, 4)),
    Layout("5d-channels-last", (2, 3, 2, 3, 4), memory_format=torch.channels_last_3d),
]


def _skip_if_unavailable(path: str) -> None:
    if path == "compiled" and not kernels.compiled_available():
        pytest.skip(f"torch.compile is unavailable here: {kernels._compiled.failure}")
    if path == "native" and not native.available():
        pytest.skip(f"the native kernels are unavailable here: {native.failure()}")


def _reference(
    x: torch.Tensor, layout: Layout, weight: torch.Tensor, bias: torch.Tensor, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, running mean and var, and the leaf gradients, from torch's op in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    features, device = w64.numel(), x.device
    running = [
        torch.linspace(-0.5, 0.5, features, dtype=torch.float64, device=device),
        torch.linspace(0.5, 2, features, dtype=torch.float64, device=device),
    ]
    y = torch.nn.functional.batch_norm(x64.movedim(layout.axis, 1), *running, w64, b64, training, 0.1, 1e-5)
    return y.movedim(1, layout.axis), running[0], running[1], x64, torch.stack([w64, b64])


def _ours(
    x: torch.Tensor, layout: Layout, weight: torch.Tensor, bias: torch.Tensor, training: bool, path: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xg = x.detach().clone().requires_grad_()
    wg = weight.detach().clone().requires_grad_()
    bg = bias.detach().clone().requires_grad_()
    features = weight.numel()
    running_mean = torch.linspace(-0.5, 0.5, features, device=x.device).to(weight.dtype)
    running_var = torch.linspace(0.5, 2, features, device=x.device).to(weight.dtype)
    with kernels.use_kernel(path):
        y = batch_norm(xg, running_mean, running_var, wg, bg, training, 0.1, 1e-5, layout.axis)
    return y, running_mean, running_var, xg, wg, bg


def _check_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, grad: bool, ulps: float = 0.5
) -> None:
    actual64, expected64 = actual.double().cpu(), expected.double().cpu()
    error = (actual64 - expected64).abs()
    scale = expected64.abs().max().clamp_min(1e-30)
    if dtype == torch.float64:
        bound = 1e-10 + 1e-10 * expected64.abs()
    elif dtype == torch.float32:
        bound = 1e-5 * scale if grad else 2e-6 + 2e-6 * expected64.abs()
    elif ulps <= 0.5:
        rounding = ulps * torch.finfo(dtype).eps
        bound = rounding * expected64.abs() + (1e-4 * scale if grad else 1e-5 + 1e-5 * expected64.abs())
    else:  # PyTorch's half-precision kernels: a few units in the last place of the largest value
        bound = ulps * torch.finfo(dtype).eps * (expected64.abs() + scale)
    worst = (error - bound).max().item()
    assert worst <= 0, f"{what}: error {error.max().item():.3g} exceeds the {dtype} tolerance"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_the_float64_reference(
    path: str, layout: Layout, dtype_name: str, training: bool, device: torch.device
) -> None:
    _skip_if_unavailable(path)
    dtype = DTYPES[dtype_name]
    x = layout.make(dtype, device)
    features = layout.shape[layout.axis]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.linspace(0.5, 1.5, features, dtype=param_dtype, device=device)
    bias = torch.linspace(-0.2, 0.3, features, dtype=param_dtype, device=device)
    grad_output = torch.randn(layout.shape, dtype=torch.float64).to(device=device, dtype=dtype)

    y, running_mean, running_var, xg, _wg, _bg = _ours(x, layout, weight, bias, training, path)
    with kernels.use_kernel(path):
        y.backward(grad_output)
    expected, mean64, var64, x64, _ = _reference(x, layout, weight, bias, training)
    expected.backward(grad_output.double().cpu().to(expected.device))

    assert y.dtype == dtype
    assert y.shape == x.shape
    assert y.is_contiguous(memory_format=layout.memory_format)
    # PyTorch's own kernels round some half-precision intermediates (its channels-last
    # backward is off by up to 1% of the largest gradient in bfloat16): a looser bound.
    ulps = 1.0 if path == "torch" else 0.5
    _check_close(y, expected, dtype, "output", grad=False, ulps=ulps)
    assert xg.grad is not None
    assert xg.grad.dtype == dtype
    _check_close(xg.grad, x64.grad, dtype, "input gradient", grad=True, ulps=ulps)  # type: ignore[arg-type]
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    _check_close(running_mean, mean64, stats_dtype, "running_mean", grad=False)
    _check_close(running_var, var64, stats_dtype, "running_var", grad=False)


def _parameter_gradients(layout: Layout, dtype: torch.dtype, path: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    x = layout.make(dtype)
    features = layout.shape[layout.axis]
    weight = torch.linspace(0.5, 1.5, features, dtype=torch.float64)
    bias = torch.linspace(-0.2, 0.3, features, dtype=torch.float64)
    grad_output = torch.randn(layout.shape, dtype=torch.float64).to(dtype)
    if path == "reference":
        x64 = x.double().requires_grad_()
        w64, b64 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        y = torch.nn.functional.batch_norm(x64.movedim(layout.axis, 1), None, None, w64, b64, True)
        y.movedim(1, layout.axis).backward(grad_output.double())
        return x64.grad, w64.grad, b64.grad  # type: ignore[return-value]
    xg = x.clone().requires_grad_()
    wg, bg = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    with kernels.use_kernel(path):
        batch_norm(xg, None, None, wg, bg, True, axis=layout.axis).backward(grad_output)
    return xg.grad, wg.grad, bg.grad  # type: ignore[return-value]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("path", PATHS)
def test_parameter_gradients_match_in_float64(path: str, layout: Layout) -> None:
    _skip_if_unavailable(path)
    ours = _parameter_gradients(layout, torch.float64, path)
    expected = _parameter_gradients(layout, torch.float64, "reference")
    for name, actual, reference in zip(("input", "weight", "bias"), ours, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-10, msg=f"{name} gradient")


@pytest.mark.parametrize("path", PATHS)
def test_only_parameter_gradients_when_the_input_needs_none(path: str) -> None:
    _skip_if_unavailable(path)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.rand(3, dtype=torch.float64, requires_grad=True)
    with kernels.use_kernel(path):
        batch_norm(x, None, None, weight, bias, True).sum().mul(2).backward()
    reference_weight = weight.detach().clone().requires_grad_()
    reference_bias = bias.detach().clone().requires_grad_()
    torch.nn.functional.batch_norm(x, None, None, reference_weight, reference_bias, True).sum().mul(2).backward()
    torch.testing.assert_close(weight.grad, reference_weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bias.grad, reference_bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 5), 1), ((5, 4, 3), -1)], ids=["channels-first", "feature-last"])
def test_double_backward_on_every_path(path: str, shape: tuple[int, ...], axis: int) -> None:
    _skip_if_unavailable(path)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(shape[axis], dtype=torch.float64, requires_grad=True)
    with kernels.use_kernel(path):
        assert torch.autograd.gradcheck(lambda t, w: batch_norm(t, None, None, w, None, True, axis=axis), (x, weight))
        assert torch.autograd.gradgradcheck(
            lambda t, w: batch_norm(t, None, None, w, None, True, axis=axis), (x, weight)
        )


def test_compiled_rows_longer_than_the_split_threshold() -> None:
    """Rows of more than 4096 positions are split into pieces; the statistics must not notice."""
    _skip_if_unavailable("compiled")
    x = (torch.randn(2, 3, 8200, dtype=torch.float64) + 3).float().requires_grad_()
    grad_output = torch.randn(2, 3, 8200)
    with kernels.use_kernel("compiled"):
        y = batch_norm(x, None, None, training=True)
        y.backward(grad_output)
    x64 = x.detach().double().requires_grad_()
    expected = torch.nn.functional.batch_norm(x64, None, None, training=True)
    expected.backward(grad_output.double())
    _check_close(y, expected, torch.float32, "output", grad=False)
    _check_close(x.grad, x64.grad, torch.float32, "input gradient", grad=True)  # type: ignore[arg-type]


# --- numerics -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["auto", *PATHS])
def test_offset_data_is_at_least_as_accurate_as_torch(path: str) -> None:
    """float32 data with mean 1e4 and std 0.05: a stable variance and ``(x - mean) * scale`` keep the output."""
    _skip_if_unavailable(path)
    generator = torch.Generator().manual_seed(1234)
    for shape, axis in (((64, 16, 8, 8), 1), ((512, 16), 1), ((8, 64, 16), -1)):
        x = 1e4 + 0.05 * torch.randn(shape, generator=generator)
        exact = torch.nn.functional.batch_norm(x.double().movedim(axis, 1), None, None, training=True)
        torch_output = torch.nn.functional.batch_norm(x.movedim(axis, 1), None, None, training=True)
        torch_error = (torch_output.double() - exact).abs().max().item()
        with kernels.use_kernel(path):
            ours = batch_norm(x, None, None, training=True, axis=axis).movedim(axis, 1)
        ours_error = (ours.double() - exact).abs().max().item()
        if path == "torch":
            # Forced, it is PyTorch's arithmetic (x * a + b); on the (M, C) view of a
            # sequence its kernel rounds differently from its kernel on the moved tensor.
            assert ours_error < 5 * torch_error
        else:
            assert ours_error <= torch_error, shape
            assert ours_error < 0.02


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_a_bad_shift_is_detected_and_the_statistics_recomputed(path: str) -> None:
    """Sorted data: the leading values of each feature sit far below its mean, so the shifted sums go round again."""
    _skip_if_unavailable(path)
    x = torch.sort(1e3 + torch.randn(2, 4, 3000, dtype=torch.float64) * 50, dim=-1).values
    x[:, :, :64] -= 1e4  # the shift (mean of the first 64 values) is 200 standard deviations off
    x32 = x.float()
    with kernels.use_kernel(path):
        y = batch_norm(x32, None, None, training=True)
    exact = torch.nn.functional.batch_norm(x32.double(), None, None, training=True)
    assert (y.double() - exact).abs().max().item() < 1e-4


def test_batch_stats_variance_is_stable() -> None:
    x = (1e4 + 0.05 * torch.randn(32, 8, 50, dtype=torch.float64)).float()
    mean, var = kernels.batch_stats(x)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2), correction=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)


# --- dispatch -------------------------------------------------------------------------


def _view(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


@pytest.fixture
def without_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native kernels unavailable, as on a machine without a C compiler."""
    library = native._Library()
    library.tried, library.problem = True, "no C compiler found (test)"
    monkeypatch.setattr(native, "_library", library)
    monkeypatch.setattr(native, "_CODES", {})


@pytest.mark.skipif(not native.available(), reason="the native kernels are unavailable here")
def test_auto_rules_with_native_kernels() -> None:
    for shape, dtype in (
        ((4, 3, 5), torch.float32),
        ((60, 100, 1), torch.float32),
        ((8, 32, 1024), torch.float64),
        ((64, 32, 1024), torch.bfloat16),
        ((4096, 512, 1), torch.float16),
    ):
        for mode in ("train", "eval"):
            chosen = kernels.plan(_view(shape, dtype), mode)  # type: ignore[arg-type]
            assert (chosen.forward, chosen.backward, chosen.forced) == ("native", "native", False)


def test_auto_rules_without_native_kernels(without_native: None) -> None:
    assert not native.available()
    large = _view((8, 32, 32 * 32))  # 262144 values, channels-first
    small = kernels.plan(_view((4, 3, 5)), "train")
    assert (small.forward, small.backward) == ("torch", "torch")
    assert not small.forced
    assert kernels.plan(_view((60, 100, 1)), "train").forward == "torch"
    assert kernels.plan(large, "eval").forward == "torch"
    large64 = kernels.plan(_view((8, 32, 1024), torch.float64), "train")
    assert (large64.forward, large64.backward) == ("eager", "torch")
    expected = "compiled" if kernels.compiled_available() else "eager"
    assert kernels.plan(large, "train").forward == expected
    assert kernels.plan(large.bfloat16(), "train").forward == "torch"  # PyTorch's half kernels are fast
    assert kernels.plan(_view((64, 32, 1024), torch.bfloat16), "train").forward == expected
    assert kernels.plan(_view((4096, 512, 1)), "train").forward == "torch"  # feature-last: PyTorch's kernels
    with kernels.use_kernel("native"):
        forced = kernels.plan(_view((4, 3, 5)), "train")
    assert (forced.forward, forced.backward) == ("eager", "eager")
    assert "no C compiler found (test)" in forced.reason


def test_plan_from_an_input_and_its_axis_agrees_with_the_view() -> None:
    for x, feature in (
        (_view((4, 3, 5, 6)), 1),
        (_view((4, 3, 5, 6)).contiguous(memory_format=torch.channels_last), 1),
        (_view((12, 5)), 1),
        (_view((3, 4, 5)), 2),
        (_view((4, 5)).t(), 1),
    ):
        view = kernels.canonical_view(x, feature).tensor
        assert kernels.plan(x, "train", feature).layout == kernels.plan(view, "train").layout


def test_use_kernel_forces_and_restores() -> None:
    view = _view((4, 3, 5))
    before = kernels.get_kernel()
    with kernels.use_kernel("torch"):
        assert kernels.get_kernel() == "torch"
        chosen = kernels.plan(view, "train")
        assert (chosen.forward, chosen.backward, chosen.forced) == ("torch", "torch", True)
        with kernels.use_kernel("eager"):
            assert kernels.plan(view, "eval").forward == "eager"
        assert kernels.get_kernel() == "torch"
    assert kernels.get_kernel() == before


def test_set_kernel_and_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.KERNEL_ENV_VAR, "eager")
    kernels.set_kernel(None)  # re-reads the environment
    try:
        assert kernels.get_kernel() == "eager"
        assert kernels.plan(_view((60, 100, 1)), "train").reason == f"forced by ${kernels.KERNEL_ENV_VAR}"
        kernels.set_kernel("torch")
        assert kernels.get_kernel() == "torch"
        monkeypatch.setenv(kernels.KERNEL_ENV_VAR, "fastest")
        kernels.set_kernel(None)
        with pytest.raises(
            ValueError, match=r"expected BATCHNORM_KERNEL to be one of auto, native, eager, compiled, torch"
        ):
            kernels.get_kernel()
    finally:
        monkeypatch.delenv(kernels.KERNEL_ENV_VAR)
        kernels.set_kernel(None)
    assert kernels.get_kernel() == "auto"


def test_an_unknown_kernel_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"expected kernel to be one of auto, native, eager, compiled, torch, got 'cuda'"
    ):
        kernels.set_kernel("cuda")
    with pytest.raises(ValueError, match="got 'fast'"), kernels.use_kernel("fast"):
        pass


def test_the_choice_is_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="batchnorm.kernels"):
        batch_norm(torch.randn(6, 4), None, None, training=True)
    assert any("batch norm train (6, 4)" in record.getMessage() for record in caplog.records)
    assert any("torch" in record.getMessage() for record in caplog.records)


def test_a_failing_compilation_falls_back_to_eager_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    state = kernels._CompiledKernels()
    calls = []

    def broken(*args: object) -> object:
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    state.functions = dict.fromkeys(kernels._SOURCES, broken)
    monkeypatch.setattr(kernels, "_compiled", state)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="batchnorm.kernels"), kernels.use_kernel("compiled"):
        y = batch_norm(x, None, None, training=True)
        y.sum().backward()
        batch_norm(x, None, None, training=True)
    assert len(calls) == 1  # tried once, then remembered
    assert not kernels.compiled_available()
    assert "no C++ compiler" in caplog.text
    expected = torch.nn.functional.batch_norm(x.detach(), None, None, training=True)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    with kernels.use_kernel("compiled"):
        assert kernels.plan(x, "train").forward == "eager"


def test_small_inputs_never_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under auto, the test suite and small networks must not pay for a compilation."""

    def refuse(*args: object, **kwargs: object) -> Callable[..., object]:
        raise AssertionError("torch.compile was called for a small input")

    monkeypatch.setattr(torch, "compile", refuse)
    state = kernels._CompiledKernels()
    monkeypatch.setattr(kernels, "_compiled", state)
    for shape in ((60, 100), (8, 16, 28, 28), (32, 10, 64)):
        x = torch.randn(shape, requires_grad=True)
        functional.batch_norm(x, None, None, training=True).sum().backward()
    assert state.functions == {}


def test_eval_uses_the_running_statistics_on_every_path() -> None:
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    running_mean, running_var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    expected = torch.nn.functional.batch_norm(x, running_mean, running_var, None, None, False)
    for path in PATHS:
        with kernels.use_kernel(path):
            torch.testing.assert_close(batch_norm(x, running_mean, running_var), expected, rtol=1e-12, atol=1e-12)
