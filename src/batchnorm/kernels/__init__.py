r"""Kernels for the torch op: one place decides how the arithmetic is done.

Every kernel works on a canonical 3-D view ``(B, C, S)`` of the input: ``C``
features, ``B`` blocks before the feature axis and ``S`` positions after it,
so a statistic reduces over axes 0 and 2. The view is free (no copy) for the
layouts users actually have:

* contiguous ``(N, C, H, W)`` with the feature axis 1: ``(N, C, H*W)``
  (*channels-first*, ``S > 1``);
* dense ``(N, D)``: ``(N, D, 1)``;
* channels-last ``(N, C, H, W)`` or a sequence ``(N, L, C)`` with ``axis=-1``:
  the feature axis is the innermost in memory, ``(N*H*W, C, 1)``.

The last two are *feature-last*: ``S == 1``, and the kernels treat them as an
``(M, C)`` matrix reduced over its rows.

Four implementations ("kernels") exist for each of train forward, train
backward and eval forward:

``native``
    C kernels (:mod:`batchnorm.kernels.native`, compiled once with the system's
    compilers and cached) behind ``batchnorm::`` PyTorch operators whose
    backward is a C++ autograd node. On the input's own memory (contiguous
    or feature-last, no view or copy): statistics in one pass of shifted
    sums, the output in a second, the running-statistics update and the
    NaN/Inf check in the same call; backward reads ``x`` and ``dy`` once for
    both reductions and once more for ``dx``; large float32 outputs use
    streaming stores. Multi-threaded on PyTorch's own OpenMP runtime. The
    fastest on the CPU at every size measured (``benchmarks/README.md``).
``eager``
    plain PyTorch operations, no compilation: the readable composite. Its
    forward (one pass of shifted sums, then ``(x - mean) * scale + bias``)
    is 1.5-2x faster than PyTorch's CPU forward on channels-first tensors;
    its backward is a chain of unfused operations.
``compiled``
    the same formulas fused by Inductor (``torch.compile``): one pass over
    ``x`` for both sums and one to write ``y``; one pass over ``x`` and
    ``dy`` for both gradient reductions and one to write ``dx``. Compiled
    lazily, the first time a large enough tensor needs it, with dynamic
    shapes, so one compilation serves every size of a layout and dtype
    (seconds; later processes reuse Inductor's on-disk cache). A failed
    compilation is logged once and the eager kernels take over for the rest
    of the process. The CPU choice for large channels-first tensors where the
    native kernels are unavailable; Triton kernels on a GPU when forced.
``torch``
    PyTorch's own ``native_batch_norm`` (differentiated by PyTorch's own
    backward, double backward included), called on the input when it can
    take it as it is and on our ``(M, C)`` view otherwise, so a sequence with
    ``axis=-1`` needs no transpose.

:func:`plan` picks them per call (``auto``; the rules are in its docstring);
``BATCHNORM_KERNEL=native|eager|compiled|torch|auto`` (read once) or
:func:`use_kernel`/:func:`set_kernel` force one. The choice is logged at DEBUG
level on the ``batchnorm.kernels`` logger and printed by ``batchnorm bench --explain``.

Numerics (every kernel, except where ``torch`` is named):

* half-precision inputs (float16, bfloat16) are accumulated in float32, and
  so are all statistics; float64 stays float64;
* the variance never comes from :math:`E[x^2]-E[x]^2` on raw values. The
  forward uses one pass of *shifted* sums :math:`\sum (x-k)`,
  :math:`\sum (x-k)^2` with ``k`` the mean of (up to) 64 leading values of
  each feature (16 leading rows of a feature-last input in ``native``), so
  ``|mean - k|`` is a fraction of a standard deviation on real data; when
  it is not (``(mean - k)^2 > 16 var``, e.g. sorted data) the sums are
  recomputed with ``k`` = the mean just found, which is then a two-pass
  algorithm;
* the output is formed as ``(x - mean) * (inv_std * weight) + bias``, never as
  ``x * a + b`` with ``b = bias - mean * a`` (which loses digits when
  ``|mean| >> std``; PyTorch's CPU forward does this);
* the backward uses the closed form derived in :mod:`batchnorm.reference`,
  with ``x - mean`` formed per element.

``torch``'s forward computes ``x * a + b``. When ``auto`` uses it, it checks
``max |mean| * inv_std`` and recomputes the output with our formula when that
exceeds 16, i.e. when PyTorch's rounding could exceed about ``1e-6`` in
normalized units (a constant feature at 0.1, data at 1e4 with std 0.05).
Forced with ``BATCHNORM_KERNEL=torch``, the numbers are PyTorch's, bit for bit.

Nothing here checks arguments or knows about modules: :mod:`batchnorm.functional`
does that.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from batchnorm.kernels import native

__all__ = [
    "COMPILE_MIN_NUMEL",
    "COMPILE_MIN_NUMEL_HALF",
    "KERNELS",
    "KERNEL_ENV_VAR",
    "CanonicalView",
    "Plan",
    "accumulation_dtype",
    "backward",
    "batch_stats",
    "canonical_view",
    "compiled_available",
    "get_kernel",
    "inference",
    "native_ready",
    "normalize",
    "plan",
    "set_kernel",
    "torch_inference_applies",
    "torch_training",
    "torch_training_applies",
    "torch_training_tracked",
    "train_backward",
    "train_forward",
    "use_kernel",
]

logger = logging.getLogger(__name__)

Kernel = Literal["eager", "compiled", "torch", "native"]
Mode = Literal["train", "eval"]
KERNELS: tuple[str, ...] = ("auto", "native", "eager", "compiled", "torch")
KERNEL_ENV_VAR = "BATCHNORM_KERNEL"

# Tensors smaller than this never trigger a compilation under ``auto``: a first
# compilation costs seconds, and small tensors are dominated by per-call overhead.
COMPILE_MIN_NUMEL = 1 << 18
# The same for float16/bfloat16, where PyTorch's own CPU kernels are about 4x faster than in float32.
COMPILE_MIN_NUMEL_HALF = 1 << 21

# ``(mean - shift)^2 > _SHIFT_TOLERANCE * var`` sends the shifted sums round again.
_SHIFT_TOLERANCE = 16.0
# Leading values per feature whose mean is the shift of the one-pass sums.
_SHIFT_SAMPLES = 64
# ``max |mean| * inv_std`` above which torch's ``x * a + b`` is recomputed.
_OFFSET_TOLERANCE = 16.0


# --- the canonical view -----------------------------------------------------------------


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
    blocks = math.prod(shape[:axis])
    positions = math.prod(shape[axis + 1 :])  # explicit sizes: an empty tensor has no -1 to infer
    if x.is_contiguous():
        view = x.view(blocks, num_features, positions)
        return CanonicalView(view, lambda t: t.view(shape) if t.is_contiguous() else t.reshape(shape))
    moved = x.movedim(axis, -1)
    if moved.is_contiguous():
        moved_shape = moved.shape
        view = moved.view(blocks * positions, num_features, 1)
        return CanonicalView(view, lambda t: t.reshape(moved_shape).movedim(-1, axis))
    return canonical_view(x.contiguous(), axis)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_feature(vector: Tensor) -> Tensor:
    return vector.view(1, -1, 1)


# --- choosing a kernel ------------------------------------------------------------------


class _Setting(threading.local):
    """The kernel forced in this thread (:func:`use_kernel`/:func:`set_kernel`), ``None`` when not forced."""

    kernel: str | None = None  # a class default: reading it costs no AttributeError when never set


_local = _Setting()


def _check_choice(choice: str, source: str) -> str:
    if choice not in KERNELS:
        raise ValueError(f"expected {source} to be one of {', '.join(KERNELS)}, got {choice!r}")
    return choice


_environment: dict[str, str] = {}


def _environment_kernel() -> str:
    """``$BATCHNORM_KERNEL`` (default ``auto``), read once: the environment does not change under a run."""
    cached = _environment.get(KERNEL_ENV_VAR)
    if cached is None:
        value = os.environ.get(KERNEL_ENV_VAR, "").strip().lower() or "auto"
        cached = _environment[KERNEL_ENV_VAR] = _check_choice(value, KERNEL_ENV_VAR)
    return cached


def get_kernel() -> str:
    """The kernel setting in force: :func:`use_kernel`/:func:`set_kernel`, else ``$BATCHNORM_KERNEL``, else ``auto``."""
    forced: str | None = _local.kernel
    return forced if forced is not None else _environment_kernel()


def set_kernel(choice: str | None) -> None:
    """Force ``eager``, ``compiled``, ``torch`` or ``auto`` in this thread; ``None`` returns to ``$BATCHNORM_KERNEL``.

    ``None`` also re-reads the environment variable (it is otherwise read once).
    """
    if choice is None:
        _environment.clear()
    _local.kernel = None if choice is None else _check_choice(choice, "kernel")


@contextmanager
def use_kernel(choice: str) -> Iterator[None]:
    """Force a kernel (``eager``, ``compiled``, ``torch`` or ``auto``) inside a ``with`` block, in this thread.

    Example::

        with batchnorm.kernels.use_kernel("eager"):
            y = batchnorm.functional.batch_norm(x, None, None, training=True)
    """
    previous: str | None = _local.kernel
    _local.kernel = _check_choice(choice, "kernel")
    try:
        yield
    finally:
        _local.kernel = previous


@dataclass(frozen=True)
class Plan:
    """Which kernel runs a call, and why.

    ``forward`` and ``backward`` name the kernels of the training forward and
    its backward (in eval mode only ``forward`` is used). ``layout`` is
    ``channels-first`` for a ``(B, C, S)`` view with ``S > 1`` and
    ``feature-last`` for an ``(M, C)`` one.
    """

    forward: Kernel
    backward: Kernel
    layout: str
    reason: str
    forced: bool = False

    def describe(self) -> str:
        kernels = self.forward if self.forward == self.backward else f"{self.forward} forward, {self.backward} backward"
        return f"{kernels} ({self.layout}): {self.reason}"


def _is_feature_last(x: Tensor, feature: int | None) -> bool:
    """Whether ``x`` (a ``(B, C, S)`` view, or an input with its feature axis) has the features innermost in memory."""
    if feature is None:
        if x.dim() == 3:
            return x.shape[2] == 1
        feature = 1 if x.dim() > 1 else 0  # an input with the default feature axis
    positions = 1
    for size in x.shape[feature + 1 :]:
        positions *= size
    return positions == 1 or x.stride(feature) == 1


def plan(x: Tensor, mode: Mode = "train", feature: int | None = None) -> Plan:
    """Choose the kernels for ``x`` in ``mode`` (``train`` or ``eval``).

    ``x`` is a ``(B, C, S)`` view, or any input when its (canonical) ``feature``
    axis is given (an input of another rank without it: axis 1); the choice
    depends on the dtype, the device, the number of values and whether the
    features are innermost in memory (feature-last).

    Rules under ``auto``, from ``batchnorm bench`` on a 2-core CPU (figures in
    ``benchmarks/README.md``):

    * a CPU input of float32, float64, bfloat16 or float16 when the native
      kernels are built (:func:`batchnorm.kernels.native.available`): ``native``,
      train and eval, every layout and size (1.0-16x PyTorch's op on every
      case of the suite, with the least per-call overhead).

    Without the native kernels (no compiler, ``BATCHNORM_NATIVE=0``, another device):

    * eval: ``torch``. PyTorch's eval kernel runs at the memory bandwidth and
      computes what ours would (``x * a + b``); on our ``(M, C)`` view a
      sequence needs no transpose.
    * training on a GPU with float16/bfloat16 input: ``eager`` (our float32
      formulas, rounded once; PyTorch's CUDA backward is off by up to 2 units
      of roundoff).
    * training, feature-last (dense, channels-last, sequences) or not on the
      CPU: ``torch``, PyTorch's differentiable op on the input or its
      ``(M, C)`` view, forward checked for offset data (module docstring).
      On our view a sequence runs 5-10x faster than through the transpose a
      user of ``F.batch_norm`` needs.
    * training, channels-first, at least :data:`COMPILE_MIN_NUMEL` values
      (:data:`COMPILE_MIN_NUMEL_HALF` for float16/bfloat16, whose PyTorch
      kernels are faster), on the CPU, when Inductor works here: ``compiled``,
      2-4x faster than PyTorch's (whose float32 statistics run at 15% of the
      memory bandwidth).
    * training, channels-first, as large but float64 or without a compiler:
      ``eager`` forward (shifted sums, 1.5-2x faster than PyTorch's) and
      ``torch`` backward.
    * smaller training inputs: ``torch`` (checked). Per-call overhead
      dominates, and PyTorch's C++ op, differentiated by PyTorch's own
      backward, has the least.
    """
    setting: str | None = _local.kernel
    if setting is None:
        setting = _environment_kernel()
    layout = "feature-last" if _is_feature_last(x, feature) else "channels-first"
    if setting == "auto" and native_ready(x):
        chosen = _NATIVE_PLANS[layout]
    elif setting == "auto" and (mode == "eval" or layout == "feature-last"):
        # The common cases (eval, dense, channels-last, sequences) get a constant Plan: no allocation.
        if mode == "eval":
            chosen = _EVAL_PLANS[layout]
        elif x.device.type != "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            chosen = _HALF_DEVICE_PLANS[layout]
        else:
            chosen = _FEATURE_LAST_PLAN
    elif setting != "auto":
        kernel: Kernel = setting  # type: ignore[assignment]
        if kernel == "compiled" and not compiled_available():
            return Plan("eager", "eager", layout, f"{setting} requested but compilation is unavailable here", True)
        if kernel == "native" and not native_ready(x):
            reason = native.failure() if x.is_cpu else f"{x.device.type} input"
            if reason is None:
                reason = f"no native kernel for {x.dtype}"
            return Plan("eager", "eager", layout, f"native requested but unavailable: {reason}", True)
        chosen = Plan(kernel, kernel, layout, f"forced by {_setting_source()}", forced=True)
    elif x.device.type != "cpu":
        if x.dtype in (torch.float16, torch.bfloat16):
            chosen = _HALF_DEVICE_PLANS[layout]
        else:
            chosen = _DEVICE_PLAN
    else:
        threshold = COMPILE_MIN_NUMEL_HALF if x.dtype in (torch.float16, torch.bfloat16) else COMPILE_MIN_NUMEL
        if x.numel() < threshold:
            chosen = Plan("torch", "torch", layout, f"{x.numel()} values < {threshold}: least per-call overhead")
        elif x.dtype != torch.float64 and compiled_available():
            chosen = Plan("compiled", "compiled", layout, f"{x.numel()} values >= {threshold}: fused kernels")
        else:
            chosen = Plan("eager", "torch", layout, "shifted-sum statistics, PyTorch's backward")
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("batch norm %s %s %s: %s", mode, tuple(x.shape), x.dtype, chosen.describe())
    return chosen


def native_ready(x: Tensor) -> bool:
    """Whether the native kernels can run ``x``: a non-empty CPU tensor of a dtype they have, the library built.

    Not while ``torch.compile`` traces (Dynamo cannot trace into the operators, and the other kernels
    are plain PyTorch operations that the caller's compilation fuses itself), and not for inputs of
    ``torch.func`` transforms or with forward-mode tangents (the operators have no forward derivative).
    """
    return (
        x.is_cpu
        and x.numel() > 0
        and native.supports(x.dtype)
        and not torch.compiler.is_compiling()
        and not _transformed(x)
    )


def _transformed(x: Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper or carries a forward-mode tangent (which the native kernels drop)."""
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.is_functorch_wrapped_tensor(x):
        return True
    return torch.autograd.forward_ad.unpack_dual(x).tangent is not None  # type: ignore[no-untyped-call]


def _auto_unlogged() -> bool:
    """``auto`` in force and debug logging off: the fast paths' precondition (:func:`plan` serves the rest)."""
    return (
        _local.kernel is None
        and (_environment.get(KERNEL_ENV_VAR) or _environment_kernel()) == "auto"
        and not logger.isEnabledFor(logging.DEBUG)
    )


def torch_training_applies(x: Tensor, feature: int) -> bool:
    """Whether :func:`plan` would choose PyTorch's op (checked, not forced) for training ``x`` on the CPU.

    The training fast path's question, answered without building a :class:`Plan`:
    ``auto`` in force, a CPU input the native kernels cannot take, feature-last
    or below the compilation threshold. False whenever anything else holds (another setting, another
    device, debug logging on, which :func:`plan` serves), so that the caller
    takes the general path; ``x`` is any input, ``feature`` its canonical feature axis.
    """
    if not x.is_cpu or not _auto_unlogged() or native_ready(x):
        return False
    if feature == x.dim() - 1 or x.stride(feature) == 1:  # feature-last (_is_feature_last, inline)
        return True
    return x.numel() < (COMPILE_MIN_NUMEL_HALF if x.dtype in (torch.float16, torch.bfloat16) else COMPILE_MIN_NUMEL)


def torch_inference_applies(input: Tensor, feature: int) -> bool:
    """Whether :func:`inference` under ``auto`` would run PyTorch's op on ``input`` as it is (no view, no logging)."""
    return _auto_unlogged() and not native_ready(input) and _native_direct(input, feature)


_EVAL_PLANS = {
    layout: Plan("torch", "torch", layout, "eval: PyTorch's kernel runs at the memory bandwidth")
    for layout in ("feature-last", "channels-first")
}
# PyTorch's CUDA backward for half inputs rounds more than once (errors up to ~2 units of
# roundoff, measured on an H200); ours computes in float32 and rounds once.
_HALF_DEVICE_PLANS = {
    layout: Plan("eager", "eager", layout, "half precision off the CPU: float32 formulas, one rounding")
    for layout in ("feature-last", "channels-first")
}
_NATIVE_PLANS = {
    layout: Plan("native", "native", layout, "native kernels: fused passes, least per-call overhead")
    for layout in ("feature-last", "channels-first")
}
_FEATURE_LAST_PLAN = Plan("torch", "torch", "feature-last", "PyTorch's kernels on the (M, C) view, forward checked")
_DEVICE_PLAN = Plan("torch", "torch", "channels-first", "PyTorch's kernels on the (M, C) view, forward checked")


def _setting_source() -> str:
    if _local.kernel is not None:
        return "use_kernel/set_kernel"
    return f"${KERNEL_ENV_VAR}"


# --- eager kernels ----------------------------------------------------------------------


def _shift(x: Tensor) -> Tensor:
    """Per-feature shift for the one-pass sums: the mean of up to 64 leading values of each feature."""
    acc = accumulation_dtype(x.dtype)
    if x.shape[2] == 1:
        return x[:_SHIFT_SAMPLES, :, 0].to(acc).mean(0)
    return x[0, :, :_SHIFT_SAMPLES].to(acc).mean(1)


def _reduce(t: Tensor) -> Tensor:
    """Sum a ``(B, C, S)`` tensor over B and S: the contiguous axis first, the cheap way round."""
    if t.shape[2] == 1:
        return t.view(t.shape[0], t.shape[1]).sum(0)
    return t.sum(2).sum(0)


def _finish_stats(shift: Tensor, sum_shifted: Tensor, sum_squares: Tensor, count: int) -> tuple[Tensor, Tensor, bool]:
    """Mean and biased variance from shifted sums, and whether the shift was too far to trust them."""
    offset = sum_shifted / count  # mean - shift
    var = (sum_squares / count - offset * offset).clamp_min_(0)
    too_far = bool((offset * offset > _SHIFT_TOLERANCE * var).any())
    return shift + offset, var, too_far


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-feature mean and biased variance of a ``(B, C, S)`` tensor, in the accumulation dtype.

    One pass of shifted sums (see the module docstring), a second one only
    when the shift turns out to be more than 4 standard deviations from the mean.

    Shape:
        - x: ``(B, C, S)``; mean, var: ``(C,)``.
    """
    acc = accumulation_dtype(x.dtype)
    batches, _, positions = x.shape
    count = batches * positions
    shift = _shift(x)
    for _ in range(2):
        shifted = x.to(acc) - _per_feature(shift)
        sum_shifted = _reduce(shifted)
        sum_squares = _reduce(shifted.square_())
        mean, var, too_far = _finish_stats(shift, sum_shifted, sum_squares, count)
        if not too_far:
            break
        shift = mean
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
    if torch.is_grad_enabled():  # differentiable (eval mode, double backward): no in-place updates
        y = centered * _per_feature(scale)
        return (y if bias is None else y + _per_feature(bias.to(acc))).to(x.dtype)
    centered.mul_(_per_feature(scale))
    if bias is not None:
        centered.add_(_per_feature(bias.to(acc)))
    return centered.to(x.dtype)


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
    sum_dy = _reduce(dy)
    sum_dy_centered = _reduce(dy * centered)
    grad_weight = sum_dy_centered * inv_std  # sum(dy * x_hat)
    if not need_input_grad:
        return None, grad_weight, sum_dy
    gain = inv_std if weight is None else inv_std * weight.to(acc)
    # dx = gain * (dy - mean(dy) - (x - mean) * inv_std^2 * mean(dy * (x - mean)))
    projection = inv_std * inv_std * sum_dy_centered / m
    if torch.is_grad_enabled():  # create_graph=True: stay differentiable
        grad_input = (dy - _per_feature(sum_dy / m) - centered * _per_feature(projection)) * _per_feature(gain)
        return grad_input.to(x.dtype), grad_weight, sum_dy
    centered.mul_(_per_feature(-projection)).add_(dy).sub_(_per_feature(sum_dy / m)).mul_(_per_feature(gain))
    return centered.to(x.dtype), grad_weight, sum_dy


def _eager_inference(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    acc = accumulation_dtype(x.dtype)
    inv_std = torch.rsqrt(running_var.to(acc) + eps)
    return normalize(x, running_mean.to(acc), inv_std, weight, bias)


def _block(x: Tensor) -> tuple[int, int, int]:
    """The sizes of a ``(B, C, S)`` tensor, as the native kernels take them."""
    batches, features, positions = x.shape
    return batches, features, positions


def _accumulated(vector: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-feature vector as the native kernels take it: contiguous, detached, in ``x``'s accumulation dtype."""
    if vector is None:
        return None
    acc = accumulation_dtype(x.dtype)
    if vector.dtype != acc or not vector.is_contiguous():
        vector = vector.to(acc).contiguous()
    return vector.detach()


# --- PyTorch's own kernels --------------------------------------------------------------


def _native_input(x: Tensor) -> Tensor:
    """The view PyTorch's op runs fastest on: ``(M, C)`` for feature-last, ``(B, C, S)`` otherwise."""
    return x.view(x.shape[0], x.shape[1]) if x.shape[2] == 1 else x


def _native_direct(input: Tensor, feature: int) -> bool:
    """Whether PyTorch's op can take ``input`` as it is: feature axis 1, in a layout it has a fast kernel for."""
    if feature != 1 or input.dim() < 2:
        return False
    if input.is_contiguous():
        return True
    if input.dim() == 4:
        return input.is_contiguous(memory_format=torch.channels_last)
    return input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d)


def torch_training(
    input: Tensor,
    feature: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    check_offset: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """PyTorch's differentiable training op on ``input`` (or our ``(M, C)`` view of it): ``(y, mean, var)``.

    The statistics come back in the accumulation dtype and carry no gradient;
    ``y`` is differentiable by PyTorch's own formulas (double backward
    included). With ``check_offset``, returns ``None`` when PyTorch's
    ``x * a + b`` could have lost more than about ``1e-6`` (see the module
    docstring), for the caller to use our forward instead.

    Shape:
        - input, y: any layout with ``C`` features at ``feature``; mean, var: ``(C,)``.
    """
    y, mean, inv_std = _native_forward(input, feature, weight, bias, None, None, 0.0, eps)
    # torch forms y = x * a + (bias - mean * a): with |mean| >> std the two
    # terms cancel and rounding shows. Those (rare) batches take our formula.
    if check_offset and float(torch.linalg.vector_norm(mean * inv_std, math.inf)) > _OFFSET_TOLERANCE:
        return None
    return y, mean, inv_std.pow(-2).sub_(eps).clamp_min_(0)


def _native_forward(
    input: Tensor,
    feature: int,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch's training op on ``input`` itself where it can take it, else on our view: ``(y, mean, inv_std)``."""
    # The first test is _native_direct's commonest case, inline: this is the hot path of every small call.
    if (feature == 1 and input.dim() >= 2 and input.is_contiguous()) or _native_direct(input, feature):
        return torch.native_batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps)
    view = canonical_view(input, feature)
    y, mean, inv_std = torch.native_batch_norm(
        _native_input(view.tensor), weight, bias, running_mean, running_var, True, momentum, eps
    )
    return view.restore(y.view(view.tensor.shape)), mean, inv_std


_scratch = threading.local()


def _scratch_statistics(like: Tensor) -> tuple[Tensor, Tensor]:
    """Two finite ``(C,)`` tensors shaped and typed as ``like``, for PyTorch's op to write batch statistics into.

    On the CPU they are cached per thread and per ``(C, dtype)``: their values
    do not matter as long as they are finite (they are multiplied by 0), so
    a caller that lets a NaN into them must zero them (:func:`torch_training_tracked`).
    Elsewhere (where kernels run asynchronously on streams) each call gets new zeros.
    """
    if like.device.type != "cpu":
        return torch.zeros_like(like), torch.zeros_like(like)
    cache: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] | None = getattr(_scratch, "cache", None)
    if cache is None:
        cache = _scratch.cache = {}
    key = (like.shape[0], like.dtype)
    pair = cache.get(key)
    if pair is None:
        with torch.inference_mode(False):  # usable in and out of inference mode
            pair = cache[key] = (torch.zeros_like(like), torch.zeros_like(like))
    return pair


def torch_training_tracked(
    input: Tensor,
    feature: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`torch_training` that also returns the batch mean and *unbiased* variance as running statistics.

    Returns ``(y, mean, inv_std, batch_mean, unbiased_var)``: ``mean`` and
    ``1 / sqrt(var + eps)`` as PyTorch's op returns them, and the statistics
    its kernel writes into running buffers given with ``momentum=1``
    (``batch_mean`` equals ``mean``; ``unbiased_var`` is ``var * m / (m - 1)``,
    computed inside the statistics kernel: no extra operations). Those buffers
    are scratch tensors of ``running_mean``'s size and dtype, never the
    caller's: the caller checks the batch, then blends them into its buffers
    (or does not). They may be reused by the next call in this thread, so the
    caller uses them at once, and zeros them (``zero_``) if they are not
    finite. No offset check here; the caller makes it.

    Shape:
        - input, y: any layout with ``C`` features at ``feature``; the rest: ``(C,)``.
    """
    # The cache lookup of _scratch_statistics, inline: this is the hot path of every small training call.
    cache: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] | None = getattr(_scratch, "cache", None)
    pair = None if cache is None or not input.is_cpu else cache.get((running_mean.shape[0], running_mean.dtype))
    batch_mean, unbiased_var = _scratch_statistics(running_mean) if pair is None else pair
    y, mean, inv_std = _native_forward(input, feature, weight, bias, batch_mean, unbiased_var, 1.0, eps)
    return y, mean, inv_std, batch_mean, unbiased_var


def _torch_backward(
    grad_output: Tensor,
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Tensor | None,
    eps: float,
    need_input_grad: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    native_x = _native_input(x)
    grad = grad_output.reshape(native_x.shape)
    if not grad.is_contiguous():
        grad = grad.contiguous()
    # PyTorch needs a weight to return a weight gradient; ones give sum(dy * x_hat).
    native_weight = weight if weight is not None else torch.ones_like(mean)
    grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad, native_x, native_weight, None, None, mean, inv_std, True, eps, [need_input_grad, True, True]
    )
    if grad_input is not None:
        grad_input = grad_input.view(x.shape)
    return grad_input, grad_weight, grad_bias


# --- compiled kernels -------------------------------------------------------------------
#
# Written for Inductor's C++ (and Triton) code generation: every reduction runs
# over the contiguous axis first (``sum(2)`` of ``(B, C, S)``, or ``sum(1)`` of
# a ``(P, G, C)`` grouping of ``(M, C)`` rows), which it vectorizes at memory
# speed; a direct reduction over axes (0, 2) or over the rows of a tall
# ``(M, C)`` matrix generates strided loops that run 2-3x slower.


def _accumulate(x: Tensor) -> Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _channels_first_forward(
    x: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    batches, _, pieces, length = x.shape  # (B, C, R, L): rows of S = R * L positions, split in pieces
    count = batches * pieces * length
    xa = _accumulate(x)
    shifted = xa - shift[None, :, None, None]
    offset = shifted.sum(3).sum(2).sum(0) / count  # mean - shift, (C,)
    var = ((shifted * shifted).sum(3).sum(2).sum(0) / count - offset * offset).clamp_min(0)
    mean = shift + offset
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std * weight
    y = (xa - mean[None, :, None, None]) * scale[None, :, None, None] + bias[None, :, None, None]
    too_far = (offset * offset > _SHIFT_TOLERANCE * var).any()
    return y.to(x.dtype), mean, var, inv_std, too_far


def _channels_first_backward(
    grad_output: Tensor, x: Tensor, mean: Tensor, inv_std: Tensor, weight: Tensor, ones: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    batches, _, pieces, length = x.shape  # (B, C, R, L)
    count = batches * pieces * length
    dy = _accumulate(grad_output)
    centered = _accumulate(x) - mean[None, :, None, None]
    # Multiplying by a per-feature tensor of ones gives both reductions the same
    # loop nest, so that Inductor fuses them into one pass over dy and x.
    sum_dy = (dy * ones[None, :, None, None]).sum(3).sum(2).sum(0)
    sum_dy_centered = (dy * centered).sum(3).sum(2).sum(0)
    # dx = gain * (dy - sum_dy / m) - (x - mean) * gain * inv_std^2 * sum_dy_centered / m, as two FMAs
    gain = inv_std * weight
    offset = (-gain * sum_dy / count)[None, :, None, None]
    slope = (gain * inv_std * inv_std * sum_dy_centered / count)[None, :, None, None]
    grad_input = dy * gain[None, :, None, None] + offset - centered * slope
    return grad_input.to(x.dtype), sum_dy_centered * inv_std, sum_dy


def _feature_last_forward(
    x: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    groups, rows, _ = x.shape  # (P, G, C): M = P * G rows of C features
    count = groups * rows
    xa = _accumulate(x)
    shifted = xa - shift
    offset = shifted.sum(1).sum(0) / count
    var = ((shifted * shifted).sum(1).sum(0) / count - offset * offset).clamp_min(0)
    mean = shift + offset
    inv_std = torch.rsqrt(var + eps)
    y = (xa - mean) * (inv_std * weight) + bias
    too_far = (offset * offset > _SHIFT_TOLERANCE * var).any()
    return y.to(x.dtype), mean, var, inv_std, too_far


def _feature_last_backward(
    grad_output: Tensor, x: Tensor, mean: Tensor, inv_std: Tensor, weight: Tensor, ones: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    groups, rows, _ = x.shape  # (P, G, C)
    count = groups * rows
    dy = _accumulate(grad_output)
    centered = _accumulate(x) - mean
    sum_dy = (dy * ones).sum(1).sum(0)
    sum_dy_centered = (dy * centered).sum(1).sum(0)
    gain = inv_std * weight
    grad_input = dy * gain - gain * sum_dy / count - centered * (gain * inv_std * inv_std * sum_dy_centered / count)
    return grad_input.to(x.dtype), sum_dy_centered * inv_std, sum_dy


_SOURCES: dict[str, Callable[..., Any]] = {
    "channels-first forward": _channels_first_forward,
    "channels-first backward": _channels_first_backward,
    "feature-last forward": _feature_last_forward,
    "feature-last backward": _feature_last_backward,
}


_RECOMPILE_LIMIT = 32


class _CompiledKernels:
    """Lazily compiled kernels; the first failure turns compilation off for the process."""

    def __init__(self) -> None:
        self.functions: dict[str, Callable[..., Any]] = {}
        self.failure: str | None = None
        self.lock = threading.Lock()

    def available(self) -> bool:
        if self.failure is not None:
            return False
        if not hasattr(torch, "compile"):
            self.failure = "this PyTorch has no torch.compile"
            return False
        try:
            import torch._dynamo as dynamo

            supported = getattr(dynamo, "is_dynamo_supported", None)
            if supported is not None and not supported():
                self.failure = "torch.compile does not support this Python"
        except Exception as error:  # pragma: no cover - depends on the installation
            self.failure = f"torch._dynamo is unusable: {error}"
        return self.failure is None

    def _function(self, name: str) -> Callable[..., Any]:
        function = self.functions.get(name)
        if function is None:
            with self.lock:
                function = self.functions.get(name)
                if function is None:
                    function = torch.compile(_SOURCES[name], dynamic=True)
                    self.functions[name] = function
        return function

    def call(self, name: str, *args: Any) -> Any:
        """Run compiled kernel ``name``; ``None`` when compilation is (or just became) unavailable."""
        if not self.available():
            return None
        # Views carry their base into Dynamo's guards (one compilation per base shape); detached, they do not.
        plain = [arg.detach() if isinstance(arg, Tensor) else arg for arg in args]
        try:
            # Compiling imports parts of PyTorch that emit DeprecationWarnings, which
            # programs (and test suites) running with warnings as errors turn into
            # failures. Each dtype and each size-1 axis is its own graph: allow more
            # than Dynamo's default 8 before it falls back to running the formula eagerly.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                function = self._function(name)
                import torch._dynamo.config as dynamo_config

                with dynamo_config.patch(recompile_limit=_RECOMPILE_LIMIT):
                    return function(*plain)
        except Exception as error:
            self.failure = f"{type(error).__name__}: {error}"
            logger.warning("batchnorm: compiling the %s kernel failed, using eager kernels: %s", name, self.failure)
            return None


_compiled = _CompiledKernels()


def compiled_available() -> bool:
    """Whether the compiled kernels can run here (``torch.compile`` present and no compilation has failed)."""
    return _compiled.available()


def _group_rows(x: Tensor) -> Tensor:
    """View an ``(M, C, 1)`` tensor as ``(P, G, C)``: blocks of ``G`` rows small enough for the L1 cache."""
    rows, features = x.shape[0], x.shape[1]
    for group in (8, 16, 4, 12, 6, 10, 5, 3, 2):
        if rows % group == 0:
            return x.view(rows // group, group, features)
    return x.view(rows, 1, features)


# Inductor's vectorized sum switches to a slower cascade summation for rows
# longer than this; longer rows are split into pieces no longer than it.
_MAX_ROW = 4096


def _split_rows(x: Tensor) -> Tensor:
    """View ``(B, C, S)`` as ``(B, C, R, L)`` with rows of ``L = S / R <= 4096`` positions when S allows."""
    batches, features, positions = x.shape
    pieces = 1
    if positions > _MAX_ROW:
        pieces = next(
            (r for r in range(2, positions // 256 + 1) if positions % r == 0 and positions // r <= _MAX_ROW), 1
        )
    return x.view(batches, features, pieces, positions // pieces)


def _compiled_input(x: Tensor) -> tuple[str, Tensor]:
    if x.shape[2] == 1:
        return "feature-last", _group_rows(x)
    return "channels-first", _split_rows(x)


def _compiled_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    layout, xc = _compiled_input(x)
    acc = accumulation_dtype(x.dtype)
    features = x.shape[1]
    weight_acc = torch.ones(features, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    bias_acc = torch.zeros(features, dtype=acc, device=x.device) if bias is None else bias.to(acc)
    shift = _shift(x)
    for _ in range(2):
        result = _compiled.call(f"{layout} forward", xc, shift, weight_acc, bias_acc, float(eps))
        if result is None:
            return None
        y, mean, var, inv_std, too_far = result
        if not bool(too_far):
            break
        shift = mean
    return y.view(x.shape), mean, var, inv_std


def _compiled_backward(
    grad_output: Tensor, x: Tensor, mean: Tensor, inv_std: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor] | None:
    layout, xc = _compiled_input(x)
    grad = grad_output.reshape(xc.shape)
    if not grad.is_contiguous():
        grad = grad.contiguous()
    ones = torch.ones_like(mean)
    weight_acc = ones if weight is None else weight.to(mean.dtype)
    result = _compiled.call(f"{layout} backward", grad, xc, mean, inv_std, weight_acc, ones)
    if result is None:
        return None
    grad_input, grad_weight, grad_bias = result
    return grad_input.view(x.shape), grad_weight, grad_bias


# --- entry points -----------------------------------------------------------------------


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, chosen: Plan
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward with batch statistics: ``(y, mean, var, inv_std)``, statistics in the accumulation dtype.

    Shape:
        - x, y: ``(B, C, S)`` (contiguous); weight, bias, mean, var, inv_std: ``(C,)``.
    """
    if chosen.forward == "native":
        x = x.contiguous()
        y, stats = native.train_forward(x, _block(x), _accumulated(weight, x), _accumulated(bias, x), eps)
        return y, stats[0], stats[2], stats[1]
    if chosen.forward == "compiled":
        result = _compiled_forward(x, weight, bias, eps)
        if result is not None:
            return result
    elif chosen.forward == "torch":
        y, mean, inv_std = torch.native_batch_norm(_native_input(x), weight, bias, None, None, True, 0.0, eps)
        var = inv_std.pow(-2).sub_(eps).clamp_min_(0)
        # Forced, it is PyTorch's forward bit for bit; under auto, offset data takes our formula.
        if chosen.forced or float((mean * inv_std).abs_().max()) <= _OFFSET_TOLERANCE:
            return y.view(x.shape), mean, var, inv_std
        return normalize(x, mean, inv_std, weight, bias), mean, var, inv_std
    mean, var = batch_stats(x)
    inv_std = torch.rsqrt(var + eps)
    return normalize(x, mean, inv_std, weight, bias), mean, var, inv_std


def train_backward(
    grad_output: Tensor,
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Tensor | None,
    eps: float,
    need_input_grad: bool,
    chosen: Plan,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of :func:`train_forward`: ``(dx or None, dweight, dbias)``, the last two in the accumulation dtype.

    Shape:
        - grad_output, x, dx: ``(B, C, S)``; mean, inv_std, weight: ``(C,)``.
    """
    if chosen.backward == "native":
        x = x.contiguous()
        stats = torch.stack((mean, inv_std))
        return native.train_backward(
            grad_output.contiguous(), x, _block(x), stats, _accumulated(weight, x), need_input_grad
        )
    if chosen.backward == "compiled":
        result = _compiled_backward(grad_output, x, mean, inv_std, weight)
        if result is not None:
            grad_input, grad_weight, grad_bias = result
            return (grad_input if need_input_grad else None), grad_weight, grad_bias
    elif chosen.backward == "torch":
        return _torch_backward(grad_output, x, mean, inv_std, weight, eps, need_input_grad)
    return backward(grad_output, x, mean, inv_std, weight, need_input_grad)


def inference(
    input: Tensor,
    feature: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    chosen: Plan,
) -> Tensor:
    """Algorithm 2, the fixed affine map with running statistics, in ``input``'s shape and layout.

    ``torch``: PyTorch's op (differentiable by its own formulas) on ``input``
    or on the ``(M, C)`` view; otherwise our formula on the ``(B, C, S)`` view.

    Shape:
        - input, output: any layout with ``C`` features at ``feature``;
          running_mean, running_var, weight, bias: ``(C,)``.
    """
    if chosen.forward == "torch" and _native_direct(input, feature):
        return torch.native_batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
    view = canonical_view(input, feature)
    if chosen.forward == "native" and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    ):
        x = view.tensor.contiguous()
        y = native.inference(
            x,
            _accumulated(running_mean, x),  # type: ignore[arg-type]
            _accumulated(running_var, x),  # type: ignore[arg-type]
            _accumulated(weight, x),
            _accumulated(bias, x),
            1,
            eps,
        )
        assert y is not None
        return view.restore(y)
    if chosen.forward == "torch":
        native_x = _native_input(view.tensor)
        y = torch.native_batch_norm(native_x, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
        return view.restore(y.view(view.tensor.shape))
    return view.restore(_eager_inference(view.tensor, running_mean, running_var, weight, bias, eps))
