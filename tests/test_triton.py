"""The Triton kernels (``batchnorm.kernels.triton_ops``) and how ``plan`` chooses them.

The kernels are checked on this CPU machine in Triton's interpreter, which
must be switched on (``TRITON_INTERPRET=1``) before the kernels are defined:
this file, run as a script in a subprocess with that variable set, runs every
check of :data:`CHECKS` and prints a JSON verdict per check; each pytest test
below asserts one verdict. They skip when triton is not importable.

Every number is compared with a float64 reference written out here in plain
torch operations on the input's (rounded) values, never with the package's
own output: the statistics, ``(x - mean) * invstd * weight + bias``, the two
gradient sums and the input-gradient formula, and ``F.batch_norm`` in float64
for the end-to-end autograd node. Tolerances (``u``: the unit roundoff of the
output dtype, zero for float32 and float64 results, which accumulate in
float32/float64):

* statistics: mean within ``1e-6`` of the mean absolute value, ``m2`` within
  ``1e-5`` relative (float32 accumulation); float64 inputs ``1e-12``; with
  ``|mean| = 1e4 * std`` (where ``E[x^2] - E[x]^2`` loses every digit) ``1e-6``
  and ``1e-5``;
* outputs and gradients: ``1e-5`` of their natural scale plus ``u`` relative
  (a whole ulp for bfloat16: the interpreter rounds float32 to bfloat16
  toward zero).

``plan``'s choices are checked in-process with a tensor that reports itself
as a CUDA tensor (this machine has no GPU) and a faked Triton availability.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from batchnorm import kernels
from batchnorm.kernels import triton_ops

F64 = torch.float64
EPS = 1e-5
HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# (name, shape, axis, layout): every input is feature-last; M values per feature from 1 to a few hundred.
LAYOUTS: tuple[tuple[str, tuple[int, ...], int, str], ...] = (
    ("nhwc", (2, 7, 3, 5), 1, "channels_last"),
    ("nhwc-c33", (3, 33, 2, 4), 1, "channels_last"),
    ("ndhwc", (2, 3, 2, 3, 4), 1, "channels_last_3d"),
    ("nlc", (4, 50, 130), -1, "contiguous"),
    ("nlc-one-row", (1, 1, 7), -1, "contiguous"),
    ("dense", (300, 33), 1, "contiguous"),
    ("dense-c3", (257, 3), 1, "contiguous"),
    ("dense-one-row", (1, 3), 1, "contiguous"),
    ("dense-transposed", (130, 5), 0, "transposed"),  # x.T of a contiguous (5, 130): features innermost
)


def _make(shape: tuple[int, ...], layout: str, dtype: torch.dtype, scale: float = 2.0, shift: float = 0.5) -> Any:
    x = (torch.randn(shape, dtype=F64) * scale + shift).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed":
        return x.t().contiguous().t()
    return x


def _view(v: torch.Tensor, x: torch.Tensor, feature: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[feature] = -1
    return v.reshape(shape)


def _reduced(x: torch.Tensor, feature: int) -> list[int]:
    return [d for d in range(x.dim()) if d != feature]


def _unit(dtype: torch.dtype) -> float:
    """The rounding of a result to ``dtype``: half an ulp for float16; a whole one for bfloat16, which Triton's
    interpreter (3.9) rounds toward zero from float32 (compiled kernels round to nearest even)."""
    if dtype == torch.float16:
        return torch.finfo(dtype).eps / 2
    return torch.finfo(dtype).eps if dtype == torch.bfloat16 else 0.0


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: torch.Tensor | float) -> None:
    error = (got.to(F64) - want).abs()
    bound = torch.as_tensor(tolerance, dtype=F64) + torch.zeros_like(want)
    excess = torch.where(error <= bound, 0.0, error - bound).flatten()  # NaN where either is NaN
    worst = int(excess.nan_to_num(float("inf")).argmax())
    assert not bool(excess[worst] != 0), (
        f"{name}: error {float(error.flatten()[worst]):.3g} > tolerance {float(bound.flatten()[worst]):.3g}"
        f" (got {float(got.flatten()[worst]):.6g}, want {float(want.flatten()[worst]):.6g})"
    )


def _reference_stats(x: torch.Tensor, feature: int) -> tuple[torch.Tensor, torch.Tensor]:
    xd = x.to(F64)
    dims = _reduced(x, feature)
    mean = xd.mean(dims)
    return mean, ((xd - _view(mean, x, feature)) ** 2).sum(dims)


def _stats_tolerance(x: torch.Tensor, feature: int, mean: torch.Tensor, m2: torch.Tensor) -> tuple[Any, Any]:
    dims = _reduced(x, feature)
    relative = 1e-12 if x.dtype == F64 else 1e-6
    mean_scale = x.to(F64).abs().mean(dims)
    return relative * mean_scale + 1e-300, 10 * relative * m2 + relative * 1e-3 * mean_scale**2


def _vectors(c: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    acc = F64 if dtype == F64 else torch.float32
    return {
        "mean": torch.randn(c, dtype=acc) * 0.5,
        "invstd": torch.rand(c, dtype=acc) + 0.5,
        "weight": torch.randn(c, dtype=acc),
        "bias": torch.randn(c, dtype=acc),
    }


# --- the checks (run in the interpreter subprocess) ------------------------------------------------------------------


def check_import_is_lazy() -> None:
    # The subprocess imported batchnorm before any check ran: triton was not imported by it.
    assert not _TRITON_AT_IMPORT, "import batchnorm imported triton"
    assert triton_ops.available()
    assert triton_ops.interpreted()


def check_applies() -> None:
    x = torch.randn(2, 3, 4, 5)
    assert not triton_ops.applies(x, 1), "contiguous NCHW is channels-first"
    assert triton_ops.applies(x.contiguous(memory_format=torch.channels_last), 1)
    assert not triton_ops.applies(x.contiguous(memory_format=torch.channels_last), -1)
    assert triton_ops.applies(x, -1)
    assert triton_ops.applies(x, 3)
    assert triton_ops.applies(torch.randn(4, 3), 1)
    assert not triton_ops.applies(torch.randn(4, 3), 0)
    assert not triton_ops.applies(torch.randn(4, 6)[:, ::2], 1), "strided features"
    assert not triton_ops.applies(torch.randn(8, 3)[::2], 1), "rows with gaps"
    assert not triton_ops.applies(torch.randn(0, 3), 1), "empty"
    assert not triton_ops.applies(torch.randn(4, 3).to(torch.int64), 1)
    assert not triton_ops.applies(torch.randn(4, 3), 2), "axis out of range"
    assert triton_ops.applies(torch.randn(4, 1, 3), -1), "a size-1 axis"


def check_stats() -> None:
    for dtype in DTYPES:
        for name, shape, axis, layout in LAYOUTS:
            x = _make(shape, layout, dtype)
            feature = axis % x.dim()
            count, mean, m2 = triton_ops.stats(x, axis)
            want_mean, want_m2 = _reference_stats(x, feature)
            assert count == x.numel() // x.shape[feature], name
            acc = F64 if dtype == F64 else torch.float32
            assert (mean.dtype, m2.dtype, mean.shape) == (acc, acc, (x.shape[feature],)), name
            tol_mean, tol_m2 = _stats_tolerance(x, feature, want_mean, want_m2)
            _close(f"{name} {dtype} mean", mean, want_mean, tol_mean)
            _close(f"{name} {dtype} m2", m2, want_m2, tol_m2)


def check_stats_are_stable_and_merge_partials() -> None:
    # |mean| = 1e4 std: E[x^2] - E[x]^2 in float32 would lose every digit. Few programs per reduction, so every
    # program loops over several tiles (Chan's merge in the kernel) and several partials merge on the device.
    saved = triton_ops._REDUCE_PROGRAMS
    try:
        for programs in (saved, 3):
            triton_ops._REDUCE_PROGRAMS = programs
            for shape, layout in (((2000, 3), "contiguous"), ((5, 130, 7, 8), "channels_last")):
                x = _make(shape, layout, torch.float32, scale=1.0, shift=1e4)
                _count, mean, m2 = triton_ops.stats(x, 1)
                want_mean, want_m2 = _reference_stats(x, 1)
                _close(f"{shape} mean", mean, want_mean, 1e-6 * want_mean.abs())
                _close(f"{shape} m2", m2, want_m2, 1e-5 * want_m2)
    finally:
        triton_ops._REDUCE_PROGRAMS = saved


def _normalize_reference(
    x: torch.Tensor, feature: int, v: dict[str, torch.Tensor], weight: bool, bias: bool, relu: bool
) -> torch.Tensor:
    y = (x.to(F64) - _view(v["mean"].to(F64), x, feature)) * _view(v["invstd"].to(F64), x, feature)
    if weight:
        y = y * _view(v["weight"].to(F64), x, feature)
    if bias:
        y = y + _view(v["bias"].to(F64), x, feature)
    return y.clamp_min(0) if relu else y


def check_normalize() -> None:
    for dtype in DTYPES:
        for name, shape, axis, layout in LAYOUTS:
            x = _make(shape, layout, dtype)
            feature = axis % x.dim()
            v = _vectors(x.shape[feature], dtype)
            for weight in (False, True):
                for bias in (False, True):
                    for relu in (False, True):
                        y = triton_ops.normalize(
                            x,
                            v["mean"],
                            v["invstd"],
                            v["weight"] if weight else None,
                            v["bias"] if bias else None,
                            axis,
                            "relu" if relu else None,
                        )
                        label = f"{name} {dtype} weight={weight} bias={bias} relu={relu}"
                        assert (y.dtype, y.shape, y.stride()) == (x.dtype, x.shape, x.stride()), label
                        want = _normalize_reference(x, feature, v, weight, bias, relu)
                        scale = 1.0 + want.abs()
                        _close(label, y, want, (1e-12 if dtype == F64 else 1e-5) * scale + _unit(dtype) * want.abs())


def _gradients(x: torch.Tensor, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Gradients in x's layout, in another (contiguous) one, and expanded (stride 0, as from ``y.sum()``)."""
    dy = (torch.randn(x.shape, dtype=F64) * 1.5 - 0.25).to(x.dtype)
    yield "same layout", torch.empty_like(x).copy_(dy)
    yield "contiguous", dy.contiguous()
    yield "expanded", torch.ones((), dtype=x.dtype).expand(x.shape)


def check_grad_sums() -> None:
    for dtype in DTYPES:
        for name, shape, axis, layout in LAYOUTS:
            x = _make(shape, layout, dtype)
            feature = axis % x.dim()
            v = _vectors(x.shape[feature], dtype)
            dims = _reduced(x, feature)
            for kind, dy in _gradients(x, layout):
                sum_dy, sum_dy_xhat = triton_ops.grad_sums(dy, x, v["mean"], v["invstd"], axis)
                g = dy.to(F64)
                x_hat = (x.to(F64) - _view(v["mean"].to(F64), x, feature)) * _view(v["invstd"].to(F64), x, feature)
                relative = 1e-12 if dtype == F64 else 1e-5
                label = f"{name} {dtype} dy {kind}"
                assert (sum_dy.dtype, sum_dy_xhat.dtype) == (v["mean"].dtype, v["mean"].dtype), label
                _close(f"{label} sum_dy", sum_dy, g.sum(dims), relative * g.abs().sum(dims) + 1e-300)
                terms = g * x_hat
                _close(f"{label} sum_dy_xhat", sum_dy_xhat, terms.sum(dims), relative * terms.abs().sum(dims) + 1e-300)


def check_grad_input() -> None:
    for dtype in DTYPES:
        for name, shape, axis, layout in LAYOUTS:
            x = _make(shape, layout, dtype)
            feature = axis % x.dim()
            c = x.shape[feature]
            count = x.numel() // c
            v = _vectors(c, dtype)
            sum_dy, sum_dy_xhat = torch.randn(c, dtype=v["mean"].dtype), torch.randn(c, dtype=v["mean"].dtype)
            for weight in (False, True):
                for kind, dy in _gradients(x, layout):
                    w = v["weight"] if weight else None
                    dx = triton_ops.grad_input(dy, x, v["mean"], v["invstd"], w, sum_dy, sum_dy_xhat, count, axis)
                    label = f"{name} {dtype} weight={weight} dy {kind}"
                    assert (dx.dtype, dx.shape, dx.stride()) == (dy.dtype, x.shape, x.stride()), label

                    def per(t: torch.Tensor, x: torch.Tensor = x, feature: int = feature) -> torch.Tensor:
                        return _view(t.to(F64), x, feature)

                    gain = per(v["invstd"]) * (per(v["weight"]) if weight else 1.0)
                    x_hat = (x.to(F64) - per(v["mean"])) * per(v["invstd"])
                    inner = dy.to(F64) - per(sum_dy) / count - x_hat * per(sum_dy_xhat) / count
                    want = gain * inner
                    scale = gain.abs() * (
                        dy.to(F64).abs().max() + per(sum_dy).abs() + x_hat.abs() * per(sum_dy_xhat).abs()
                    )
                    relative = 1e-12 if dtype == F64 else 1e-5
                    _close(label, dx, want, relative * (1 + scale) + _unit(dtype) * want.abs())


def check_dispatch_through_kernels() -> None:
    # kernels.stats/normalize/grad_sums/grad_input with backend="triton": the triton kernels where they apply,
    # PyTorch operations where they do not (a channels-first input), the same numbers either way.
    for x, axis in (
        (_make((3, 5, 4, 2), "channels_last", torch.float32), 1),
        (_make((3, 5, 4, 2), "contiguous", torch.float32), 1),
    ):
        feature = axis % x.dim()
        count, mean, m2 = kernels.stats(x, axis, backend="triton")
        want_mean, want_m2 = _reference_stats(x, feature)
        _close("kernels.stats mean", mean, want_mean, 1e-6 * (1 + want_mean.abs()))
        _close("kernels.stats m2", m2, want_m2, 1e-5 * want_m2)
        invstd = torch.rsqrt(m2 / count + EPS)
        v = {"mean": mean, "invstd": invstd}
        for activation, apply in (("relu", torch.relu), ("sigmoid", torch.sigmoid), (None, None)):
            y = kernels.normalize(x, mean, invstd, None, None, axis, activation=activation, backend="triton")
            want = _normalize_reference(x, feature, v, False, False, False)
            want = want if apply is None else apply(want)
            assert y.stride() == x.stride()
            assert y.dtype == x.dtype
            _close(f"kernels.normalize {activation}", y, want, 1e-5 * (1 + want.abs()))
        dy = torch.randn_like(x)
        sum_dy, sum_dy_xhat = kernels.grad_sums(dy, x, mean, invstd, axis, backend="triton")
        dx = kernels.grad_input(dy, x, mean, invstd, None, sum_dy, sum_dy_xhat, count, axis, backend="triton")
        dims = _reduced(x, feature)
        x_hat = (x.to(F64) - _view(want_mean, x, feature)) / _view((want_m2 / count + EPS).sqrt(), x, feature)
        _close("kernels.grad_sums", sum_dy, dy.to(F64).sum(dims), 1e-5 * dy.abs().sum(dims).to(F64))
        want_dx = _view(1 / (want_m2 / count + EPS).sqrt(), x, feature) * (
            dy.to(F64)
            - _view(dy.to(F64).sum(dims), x, feature) / count
            - x_hat * _view((dy.to(F64) * x_hat).sum(dims), x, feature) / count
        )
        _close("kernels.grad_input", dx, want_dx, 1e-4 * (1 + want_dx.abs().max()))


def _training_against_float64(
    what: str, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor], relu: bool
) -> None:
    """``forward(x, weight, bias, feature)`` (training mode, triton backend) and its gradients against
    ``F.batch_norm`` (then ReLU when ``relu``) in float64, on the first four layouts, float32 and bfloat16."""
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, axis, layout in LAYOUTS[:4]:
            x = _make(shape, layout, dtype).requires_grad_()
            feature = axis % x.dim()
            c = x.shape[feature]
            weight = torch.randn(c, requires_grad=True)
            bias = torch.randn(c, requires_grad=True)
            y = forward(x, weight, bias, feature)
            dy = torch.randn(x.shape, dtype=F64).to(dtype)
            dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), dy)
            xd = x.detach().to(F64).movedim(feature, 1).contiguous().requires_grad_()
            wd = weight.detach().to(F64).requires_grad_()
            bd = bias.detach().to(F64).requires_grad_()
            yd = F.batch_norm(xd, None, None, wd, bd, training=True, eps=EPS)
            if relu:
                yd = torch.relu(yd)
            want = torch.autograd.grad(yd, (xd, wd, bd), dy.to(F64).movedim(feature, 1).contiguous())
            label = f"{what} {name} {dtype}"
            assert (y.stride(), dx.stride()) == (x.stride(), x.stride()), label
            u = _unit(dtype)
            _close(f"{label} y", y.movedim(feature, 1), yd.detach(), 1e-4 + 2 * u * (1 + yd.detach().abs()))
            for got, ref, grad in zip((dx.movedim(feature, 1), dweight, dbias), want, ("dx", "dweight", "dbias")):
                _close(f"{label} {grad}", got, ref, (1e-4 + 4 * u) * (1 + ref.abs().max()))


def check_batch_norm_function() -> None:
    # The function route with backend "triton", forward and backward, against F.batch_norm in float64.
    from batchnorm.functional import BatchNormFunction

    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, feature: int) -> torch.Tensor:
        y: torch.Tensor = BatchNormFunction.apply(x, weight, bias, feature, EPS, "triton")[0]  # type: ignore[no-untyped-call]
        return y

    _training_against_float64("function", forward, relu=False)


def check_batch_norm_act_fused_relu() -> None:
    # BatchNormAct's training function on the triton backend (ReLU fused into the normalize kernel, the input
    # saved since a CUDA plan has no host checks), forward and backward, against BN + ReLU in float64.
    from batchnorm.nn.fused import _BatchNormActFunction

    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, feature: int) -> torch.Tensor:
        a: torch.Tensor = _BatchNormActFunction.apply(  # type: ignore[no-untyped-call]
            x, weight, bias, feature, EPS, "relu", 0.0, "output", "triton", False
        )[0]
        return a

    _training_against_float64("act", forward, relu=True)


CHECKS: dict[str, Callable[[], None]] = {
    name.removeprefix("check_"): function for name, function in globals().items() if name.startswith("check_")
}
_TRITON_AT_IMPORT = "triton" in sys.modules


def _main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    verdicts: dict[str, str] = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            check()
        except Exception:
            verdicts[name] = traceback.format_exc(limit=4)
        else:
            verdicts[name] = "ok"
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(verdicts))


# --- pytest: the interpreter run -------------------------------------------------------------------------------------


@cache
def _interpreted_verdicts() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", BATCHNORM_TRITON="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"the interpreter run failed:\n{done.stdout}\n{done.stderr}"
    verdicts: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return verdicts


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]' on Linux x86-64)")
@pytest.mark.parametrize("name", list(CHECKS))
def test_in_the_triton_interpreter(name: str) -> None:
    verdict = _interpreted_verdicts()[name]
    assert verdict == "ok", verdict


# --- pytest: plan's choices, in-process ----------------------------------------------------------------------------


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that says it lives on a CUDA device: all ``plan`` reads of the device."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False


def _cuda_like(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(_ReportsCuda)


@pytest.fixture
def triton_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_ops, "available", lambda: True)


def _route(chosen: kernels.Plan) -> tuple[str, str]:
    return chosen.route, chosen.backend


@pytest.mark.usefixtures("triton_here")
def test_plan_picks_triton_for_feature_last_cuda_inputs() -> None:
    cases = (
        (torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), 1),
        (torch.randn(2, 3, 2, 4, 5).contiguous(memory_format=torch.channels_last_3d), 1),
        (torch.randn(4, 6, 7), -1),
        (torch.randn(8, 33), 1),
        (torch.randn(8, 33).to(torch.bfloat16), 1),
    )
    for x, axis in cases:
        chosen = kernels.plan(_cuda_like(x), True, None, None, axis)
        assert _route(chosen) == ("function", "triton"), (x.shape, axis)
        assert chosen.host_checks is False
        assert chosen.host_readable
        assert "not yet measured on a GPU" in chosen.reason
        evaluated = kernels.plan(_cuda_like(x), False, None, None, axis)
        assert _route(evaluated) == ("composite", "torch")
        assert evaluated.host_checks is False


@pytest.mark.usefixtures("triton_here")
def test_plan_keeps_torch_for_channels_first_cuda_inputs() -> None:
    for x, axis in (
        (torch.randn(2, 3, 4, 5), 1),  # contiguous NCHW
        (torch.randn(4, 6, 7), 1),  # (N, C, L)
        (torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), -1),  # W is not innermost
        (torch.randn(8, 6)[:, ::2], 1),  # strided features
        (torch.randn(8, 3).to(torch.int32), 1),
    ):
        chosen = kernels.plan(_cuda_like(x), True, None, None, axis)
        assert _route(chosen) == ("function", "torch"), (x.shape, x.stride(), axis)
        assert chosen.host_checks is False
        assert chosen.host_readable


@pytest.mark.usefixtures("triton_here")
def test_every_cuda_plan_skips_host_checks() -> None:
    x = _cuda_like(torch.randn(8, 3))
    empty = kernels.plan(_cuda_like(torch.empty(0, 3)), True)
    assert _route(empty) == ("composite", "torch")
    assert empty.host_checks is False
    assert empty.host_readable
    expected = {  # setting: (training backend, eval backend)
        "auto": ("triton", "torch"),
        "native": ("torch", "torch"),  # no native kernels on CUDA
        "torch": ("torch", "torch"),
        "exact": ("exact", "exact"),
    }
    assert set(expected) == set(kernels.KERNELS)
    for setting, backends in expected.items():
        with kernels.use_kernel(setting):
            for training, backend in zip((True, False), backends):
                chosen = kernels.plan(x, training)
                assert chosen.backend == backend, (setting, training, chosen)
                assert chosen.host_checks is False, (setting, training)
    # The CPU plans are as they were.
    assert kernels.plan(torch.randn(8, 3), True).host_checks


def test_plan_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton cannot be imported: available() is False with the reason, plan keeps PyTorch's operations.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "batchnorm.kernels._triton_kernels", raising=False)
    monkeypatch.setattr(triton_ops, "_loaded", {})
    monkeypatch.setattr(triton_ops, "_failure", [])
    assert not triton_ops.available()
    assert "triton cannot be imported" in str(triton_ops.failure())
    x = torch.randn(8, 33)
    assert not triton_ops.applies(x, 1)
    assert _route(kernels.plan(_cuda_like(x), True)) == ("function", "torch")
    # A primitive asked for triton runs PyTorch operations: the same numbers as the torch backend.
    count, mean, m2 = kernels.stats(x, backend="triton")
    assert count == 8
    torch.testing.assert_close(mean, x.to(F64).mean(0).float())
    torch.testing.assert_close(m2, ((x.to(F64) - x.to(F64).mean(0)) ** 2).sum(0).float())


def test_an_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected backend to be one of native, torch, exact, triton, got 'cuda'"):
        kernels.stats(torch.randn(4, 3), backend="cuda")


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device")
def test_on_a_gpu() -> None:
    x = torch.randn(64, 9, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last) * 3 + 1
    assert _route(kernels.plan(x, True)) == ("function", "triton")
    feature_last = x.movedim(1, -1).reshape(-1, 9).to(F64)
    _count, mean, m2 = kernels.stats(x, 1, backend="triton")
    torch.testing.assert_close(mean.to(F64), feature_last.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2.to(F64), ((feature_last - feature_last.mean(0)) ** 2).sum(0), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    _main()
