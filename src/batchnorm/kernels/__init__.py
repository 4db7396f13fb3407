r"""The four kernel primitives of batch norm, their backends, and the one dispatch point.

Every batch-norm computation in this package (the op, its backward, the
variants and synchronized BN) is built from four primitives. With ``x`` of
any shape and layout, ``C`` features on ``axis`` and ``m`` values per feature:

.. math::

    \text{stats}(x) &= \Big(m,\ \mu = \tfrac1m \textstyle\sum x,\ M_2 = \sum (x-\mu)^2\Big) \\
    \text{normalize}(x, \mu, s, \gamma, \beta) &= (x - \mu)\, s\, \gamma + \beta,
        \qquad s = 1/\sqrt{\sigma^2 + \epsilon} \\
    \text{grad\_sums}(dy, x, \mu, s) &= \Big(\textstyle\sum dy,\ \sum dy\, \hat x\Big),
        \qquad \hat x = (x - \mu)\, s \\
    \text{grad\_input}(\dots) &= s\gamma \Big(dy - \tfrac{1}{m}\textstyle\sum dy
        - \hat x\, \tfrac{1}{m} \sum dy\, \hat x\Big)

``stats`` results merge exactly across groups or processes
(:func:`merge_stats`, Chan's pairwise formula); the gradient sums add up.
So synchronized BN is ``stats``, an all-reduce of the merged statistics,
``normalize``; and backward ``grad_sums``, an all-reduce of the sums,
``grad_input``. The derivation of ``grad_input`` is in :mod:`batchnorm.reference`.

Backends (each provides all four):

``native``
    C kernels compiled on this machine (:mod:`batchnorm.kernels.native`):
    CPU, float32/float64/bfloat16/float16, any dense layout (contiguous,
    channels-last, ``(N, L, C)`` with the features innermost) read in place.
``torch``
    PyTorch operations (:mod:`batchnorm.kernels.torch_ops`): any device,
    differentiable and traceable, accumulation in float32 (float64 for float64).
``exact``
    the same formulas computed in float64 and rounded once: the readable
    reference, on any device.
``triton``
    Triton GPU kernels (:mod:`batchnorm.kernels.triton_ops`) for CUDA inputs in
    the feature-last layout (channels-last, ``(N, L, C)`` with ``axis=-1``,
    dense ``(N, C)``: memory a dense ``(M, C)`` matrix, features innermost),
    read in place; optional (Triton imported on first use). A primitive asked
    for ``triton`` on an input these kernels do not take runs PyTorch operations.
    :func:`plan` picks it; it is not a kernel setting.

Numerics (every backend): half-precision inputs accumulate in float32 and
return their own dtype; the variance never comes from
:math:`E[x^2] - E[x]^2` on raw values (shifted sums in ``native``, Welford in
``torch``); ``x - mean`` is formed per element before scaling.

:func:`plan` is the one place that decides, per call, the *route* of the op
(:mod:`batchnorm.functional`) and its backend; see its docstring.
``BATCHNORM_KERNEL=auto|native|torch|exact`` (read once) or
:func:`use_kernel`/:func:`set_kernel` force a backend. Choices are logged at
DEBUG level on the ``batchnorm.kernels`` logger and shown by ``batchnorm bench --explain``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from batchnorm.kernels import native, torch_ops, triton_ops

__all__ = [
    "BACKENDS",
    "KERNELS",
    "KERNEL_ENV_VAR",
    "Plan",
    "accumulation_dtype",
    "get_kernel",
    "grad_input",
    "grad_sums",
    "merge_stats",
    "native",
    "normalize",
    "plan",
    "set_kernel",
    "stats",
    "torch_ops",
    "triton_ops",
    "use_kernel",
]

logger = logging.getLogger(__name__)

Backend = Literal["native", "torch", "exact", "triton"]
Route = Literal["fused", "function", "composite"]
#: The backends a kernel setting can force.
BACKENDS: tuple[str, ...] = ("native", "torch", "exact")
KERNELS: tuple[str, ...] = ("auto", *BACKENDS)
#: The backends a primitive can be asked for: the forcible ones, and ``triton`` (chosen by :func:`plan`).
_PRIMITIVE_BACKENDS: tuple[str, ...] = (*BACKENDS, "triton")
KERNEL_ENV_VAR = "BATCHNORM_KERNEL"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the setting ------------------------------------------------------------------------


class _Setting(threading.local):
    """The backend forced in this thread (:func:`use_kernel`/:func:`set_kernel`), ``None`` when not forced."""

    kernel: str | None = None


_local = _Setting()
_environment: dict[str, str] = {}


def _check_choice(choice: str, source: str) -> str:
    if choice not in KERNELS:
        raise ValueError(f"expected {source} to be one of {', '.join(KERNELS)}, got {choice!r}")
    return choice


def _environment_kernel() -> str:
    """``$BATCHNORM_KERNEL`` (default ``auto``), read once: the environment does not change under a run."""
    cached = _environment.get(KERNEL_ENV_VAR)
    if cached is None:
        value = os.environ.get(KERNEL_ENV_VAR, "").strip().lower() or "auto"
        cached = _environment[KERNEL_ENV_VAR] = _check_choice(value, KERNEL_ENV_VAR)
    return cached


def get_kernel() -> str:
    """The setting in force: :func:`use_kernel`/:func:`set_kernel`, else ``$BATCHNORM_KERNEL``, else ``auto``."""
    forced: str | None = _local.kernel
    return forced if forced is not None else _environment_kernel()


def set_kernel(choice: str | None) -> None:
    """Force ``native``, ``torch``, ``exact`` or ``auto`` in this thread; ``None`` returns to ``$BATCHNORM_KERNEL``.

    ``None`` also re-reads the environment variable (it is otherwise read once).
    """
    if choice is None:
        _environment.clear()
    _local.kernel = None if choice is None else _check_choice(choice, "kernel")


@contextmanager
def use_kernel(choice: str) -> Iterator[None]:
    """Force a backend (``native``, ``torch``, ``exact`` or ``auto``) inside a ``with`` block, in this thread.

    Example::

        with batchnorm.kernels.use_kernel("exact"):
            y = batchnorm.functional.batch_norm(x, None, None, training=True)
    """
    previous: str | None = _local.kernel
    _local.kernel = _check_choice(choice, "kernel")
    try:
        yield
    finally:
        _local.kernel = previous


# --- the dispatch point -----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one call of the op runs: its ``route``, the ``backend`` of its primitives, and why.

    Routes (executed by :mod:`batchnorm.functional`):

    ``fused``
        the native operator: training forward (statistics, output, guarded
        running-statistics update) in one C++ call with a C++ autograd node
        (backward = ``grad_sums`` + ``grad_input`` fused in one kernel call),
        or eval in one call. When the operator declines its arguments (a
        layout or dtype its kernels do not read as it is) the call takes
        ``fallback``.
    ``function``
        one Python autograd node: ``stats`` then ``normalize`` forward,
        ``grad_sums`` then ``grad_input`` backward, on ``backend``.
    ``composite``
        the ``torch_ops`` primitives differentiated by PyTorch itself: what
        ``torch.func`` transforms, forward-mode AD, ``torch.compile``,
        ``torch.export`` and ``torch.jit.trace`` see through, and eval with
        a gradient.
    """

    route: Route
    backend: Backend
    reason: str
    fallback: Plan | None = None
    #: whether the op reads results on the host (raises on a non-finite batch): not while traced or
    #: transformed, and not for CUDA inputs (it would wait for the device; the update is masked there instead)
    host_checks: bool = True
    #: whether the host *can* read results at all (SyncBatchNorm must): not while traced or transformed, nor on meta
    host_readable: bool = True

    def describe(self) -> str:
        text = f"{self.route} route, {self.backend} kernels: {self.reason}"
        if self.fallback is not None:
            text += f" (else {self.fallback.route} route, {self.fallback.backend} kernels)"
        return text


_peek_transforms = torch._C._functorch.peek_interpreter_stack
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_grad_tracking = torch._C._functorch.is_gradtrackingtensor
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _has_tangent(t: Tensor) -> bool:
    """A forward-mode tangent on ``t`` (``make_dual``); none can exist outside a dual level."""
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None  # type: ignore[no-untyped-call]


def _transformed(t: Tensor | None) -> bool:
    """A ``torch.func`` wrapper (vmap, grad, jvp), a legacy batched gradient (``is_grads_batched``),
    or a tensor carrying a forward-mode tangent: what the native kernels cannot read."""
    if t is None:
        return False
    if _is_legacy_batched(t):
        return True
    # A wrapper exists only inside a transform: a cheap global check first.
    if _peek_transforms() is not None and _is_wrapped(t):
        return True
    return _has_tangent(t)


def _dual(t: Tensor | None) -> bool:
    """A tensor carrying a forward-mode tangent (``make_dual`` or ``torch.func.jvp``)."""
    if t is None:
        return False
    if _peek_transforms() is not None and _is_grad_tracking(t):
        return True  # a jvp or grad wrapper (a vmap-batched buffer is not differentiated)
    return _has_tangent(t)


_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state


def _tracing() -> bool:
    """Inside ``torch.compile``/``torch.export`` tracing or ``torch.jit.trace``."""
    return _is_compiling() or _tracing_state() is not None


_FUNCTION = {name: Plan("function", name, "forced by the kernel setting") for name in BACKENDS}  # type: ignore[arg-type]
_TRAIN_FUSED = Plan(
    "fused",
    "native",
    "native kernels: one call forward, one backward, least per-call overhead",
    Plan("function", "native", "arguments the fused operator does not take as they are"),
)
_EVAL_FUSED = Plan(
    "fused",
    "native",
    "native eval kernel, with a C++ autograd node when a gradient is needed",
    Plan("composite", "torch", "arguments the fused operator does not take as they are"),
)
_TRAIN_NO_NATIVE = Plan("function", "torch", "native kernels unavailable here: PyTorch operations")
_TRAIN_TRITON = Plan(
    "function",
    "triton",
    "triton kernels: feature-last layout, read in place as a dense (rows, features) matrix, where PyTorch's "
    "CUDA kernels reduce over strided outer axes or transpose (a choice not yet measured on a GPU)",
    None,
    False,
)
_TRAIN_CUDA = Plan(
    "function",
    "torch",
    "PyTorch operations on CUDA (triton kernels only with the auto setting, for the feature-last layout, with "
    "triton available; a choice not yet measured on a GPU)",
    None,
    False,
)
_COMPOSITE = {
    "traced": Plan("composite", "torch", "traced (torch.compile, torch.export or torch.jit.trace)", None, False, False),
    "transformed": Plan("composite", "torch", "torch.func transform or forward-mode AD", None, False, False),
    "empty": Plan("composite", "torch", "empty input"),
    "meta": Plan("composite", "torch", "meta tensors: shapes only, nothing for the host to check", None, False, False),
    "eval": Plan("composite", "torch", "native kernels unavailable here: PyTorch operations"),
    "exact": Plan("composite", "exact", "forced by the kernel setting"),
}


def _on_device(chosen: Plan) -> Plan:
    """``chosen`` without host checks: what a CUDA input gets (reading a result on the host waits for the device)."""
    if not chosen.host_checks:
        return chosen
    device_plan = _DEVICE_PLANS.get(chosen)
    if device_plan is None:
        device_plan = _DEVICE_PLANS[chosen] = replace(chosen, host_checks=False)
    return device_plan


_DEVICE_PLANS: dict[Plan, Plan] = {}


def _other_plan(setting: str, training: bool, numel: int, input: Tensor, otherwise: Plan) -> Plan:
    """The plan of an input the fused native route and the triton kernels do not take; ``otherwise`` for training."""
    if numel == 0:
        return _COMPOSITE["empty"]
    if input.device.type == "meta":
        return _COMPOSITE["meta"]
    if setting == "exact":
        return _FUNCTION["exact"] if training else _COMPOSITE["exact"]
    if setting == "torch":
        return _FUNCTION["torch"] if training else _COMPOSITE["eval"]
    return otherwise if training else _COMPOSITE["eval"]


def plan(
    input: Tensor,
    training: bool,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    axis: int = 1,
) -> Plan:
    """Choose the route and backend of one call of the op: the only place that decides.

    In order:

    1. traced by ``torch.compile``/``torch.export``/``torch.jit.trace``, or a
       ``torch.func`` wrapper or forward-mode tangent on the input, weight or
       bias, or an empty input: ``composite`` (PyTorch differentiates and
       traces the ``torch_ops`` primitives itself);
    2. ``exact`` forced: ``function`` (training) / ``composite`` (eval) on float64 formulas;
    3. ``torch`` forced: ``function`` / ``composite`` on PyTorch operations;
    4. ``auto`` or ``native``, a CPU input of a dtype the native kernels have:
       ``fused`` for training and eval (with or without a gradient). On every case of
       ``batchnorm bench`` the fused native route is the fastest measured
       (``benchmarks/README.md``);
    5. ``auto``, training, a CUDA input whose feature ``axis`` is innermost in a
       dense layout (channels-last with ``axis=1``, ``(N, L, C)`` with
       ``axis=-1``, dense ``(N, C)``: :func:`triton_ops.supports`) and Triton
       available: ``function`` on the ``triton`` kernels, which read it in place.
       Contiguous channels-first CUDA inputs keep PyTorch's operations. Neither
       choice has been measured on a GPU yet;
    6. otherwise (another device, no compiler, ``BATCHNORM_NATIVE=0``):
       ``function`` (training) / ``composite`` (eval) on PyTorch operations.

    Every plan for a CUDA input has ``host_checks=False``: nothing is read back
    on the host (which would wait for the device), so a non-finite batch does
    not raise or get skipped on the host; the running-statistics update is
    masked on the device instead (a non-finite batch leaves the buffers and
    the counter as they were).
    """
    if _tracing():
        return _COMPOSITE["traced"]  # no logging: a tracer cannot follow it
    # Outside transforms and forward-AD dual levels nothing is wrapped or dual: two global checks.
    plain = _peek_transforms() is None and forward_ad._current_level < 0
    if not plain and (_transformed(input) or _transformed(weight) or _transformed(bias)):
        chosen = _COMPOSITE["transformed"]
    else:
        setting: str | None = _local.kernel
        if setting is None:
            setting = _environment.get(KERNEL_ENV_VAR) or _environment_kernel()
        numel = input.numel()
        # The common case first, in the fewest operations: a plain CPU call the native kernels take.
        if (setting == "auto" or setting == "native") and numel and input.is_cpu and native.supports(input.dtype):
            chosen = _TRAIN_FUSED if training else _EVAL_FUSED
        elif input.is_cuda:
            if numel and training and setting == "auto" and triton_ops.supports(input, axis) and triton_ops.available():
                chosen = _TRAIN_TRITON
            else:
                chosen = _on_device(_other_plan(setting, training, numel, input, _TRAIN_CUDA))
        else:
            chosen = _other_plan(setting, training, numel, input, _TRAIN_NO_NATIVE)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "batch norm %s %s %s: %s",
            "train" if training else "eval",
            tuple(input.shape),
            input.dtype,
            chosen.describe(),
        )
    return chosen


# --- the primitives ---------------------------------------------------------------------


def _feature(x: Tensor, axis: int) -> int:
    ndim = x.dim()
    if not -ndim <= axis < ndim:
        raise ValueError(f"feature axis {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def _backend(x: Tensor, backend: str | None) -> str:
    """The backend a primitive runs: the one asked for (else the setting); ``native`` only where it can run."""
    if backend is None:
        backend = get_kernel()
    elif backend not in _PRIMITIVE_BACKENDS:
        raise ValueError(f"expected backend to be one of {', '.join(_PRIMITIVE_BACKENDS)}, got {backend!r}")
    if backend == "triton":
        # Where the triton kernels cannot run (checked per primitive, with the axis): torch operations.
        return "torch" if _transformed(x) else "triton"
    if backend in ("auto", "native"):
        # The same results either way (to rounding): torch operations where the native kernels cannot run.
        native_here = x.is_cpu and native.supports(x.dtype) and not _transformed(x)
        return "native" if native_here else "torch"
    return backend


def _compute(x: Tensor, backend: str) -> torch.dtype:
    return torch.float64 if backend == "exact" else accumulation_dtype(x.dtype)


def _vector(v: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-feature tensor as the native kernels read it: contiguous, detached, of ``x``'s accumulation dtype."""
    if v is None:
        return None
    acc = accumulation_dtype(x.dtype)
    if v.dtype != acc or not v.is_contiguous() or v.device != x.device:
        v = v.to(device=x.device, dtype=acc).contiguous()
    return v.detach()


def stats(x: Tensor, axis: int = 1, *, backend: str | None = None) -> tuple[int, Tensor, Tensor]:
    r"""Per-feature ``(count, mean, m2)``: the values per feature, their mean and ``sum((x - mean)^2)``.

    The biased variance is ``m2 / count``; the unbiased one ``m2 / (count - 1)``.
    Results of disjoint parts of a batch merge exactly with :func:`merge_stats`.

    Args:
        x: floating tensor with its features on ``axis``.
        axis: the feature axis.
        backend: ``native``, ``torch``, ``exact`` or ``triton`` (where its kernels apply, else ``torch``);
            default: the setting in force (``auto``: ``native`` for CPU inputs it supports, else ``torch``).

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``axis``; mean, m2: ``(C,)`` in the
          accumulation dtype (float32; float64 for float64 inputs).
    """
    feature = _feature(x, axis)
    chosen = _backend(x, backend)
    if chosen == "triton" and triton_ops.applies(x, feature):
        return triton_ops.stats(x.detach(), feature)
    if chosen == "native" and x.numel() > 0:
        result = native.stats(x.detach(), feature)
        if result is None and x.is_cpu and native.supports(x.dtype):
            result = native.stats(x.detach().contiguous(), feature)
        if result is not None:
            count = x.numel() // x.shape[feature]
            return count, result[0], result[1] * count
    count, mean, m2 = torch_ops.stats(x, feature, _compute(x, chosen))
    acc = accumulation_dtype(x.dtype)
    return count, mean.to(acc), m2.to(acc)


def merge_stats(first: tuple[int, Tensor, Tensor], second: tuple[int, Tensor, Tensor]) -> tuple[int, Tensor, Tensor]:
    r"""Merge the :func:`stats` of two disjoint sets of values (Chan et al., 1979), exactly.

    .. math::

        m = m_a + m_b,\quad \delta = \mu_b - \mu_a,\quad
        \mu = \mu_a + \delta\, m_b / m,\quad M_2 = M_{2,a} + M_{2,b} + \delta^2 m_a m_b / m

    Shape:
        - means and m2s: ``(C,)``.
    """
    count_a, mean_a, m2_a = first
    count_b, mean_b, m2_b = second
    count = count_a + count_b
    if count_a == 0:
        return second
    if count_b == 0:
        return first
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / count)
    return count, mean, m2


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    axis: int = 1,
    *,
    activation: str | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""``y = act((x - mean) * (invstd * weight) + bias)``, elementwise, in ``x``'s dtype, shape and memory layout.

    ``activation``: ``None`` (the identity), ``"relu"``, ``"sigmoid"`` or
    ``"tanh"``, applied in place on the freshly written output when autograd
    does not track it (no second allocation). The native backend reads ``x``
    in place in any dense layout.

    Shape:
        - x, y: ``(*, C, *)`` with ``C`` at ``axis``; mean, invstd, weight, bias: ``(C,)``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"expected activation to be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    feature = _feature(x, axis)
    chosen = _backend(x, backend)
    y = None
    if chosen == "triton" and triton_ops.applies(x, feature):
        if activation == "relu" or activation is None:  # fused into the kernel
            return triton_ops.normalize(x.detach(), mean, invstd, weight, bias, feature, activation)
        y = triton_ops.normalize(x.detach(), mean, invstd, weight, bias, feature)
    if chosen == "native" and x.numel() > 0:
        y = native.normalize(
            x.detach(),
            _vector(mean, x),  # type: ignore[arg-type]
            _vector(invstd, x),  # type: ignore[arg-type]
            _vector(weight, x),
            _vector(bias, x),
            feature,
        )
    if y is None:
        y = torch_ops.normalize(x, mean, invstd, weight, bias, feature, _compute(x, chosen))
    apply = _ACTIVATIONS[activation]
    return y if apply is None else apply(y)


def _in_place_or_not(
    inplace: Callable[[Tensor], Tensor], plain: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """In place on a tensor autograd does not track (saves an allocation), out of place otherwise."""
    return lambda y: plain(y) if y.requires_grad and torch.is_grad_enabled() else inplace(y)


_ACTIVATIONS: dict[str | None, Callable[[Tensor], Tensor] | None] = {
    None: None,
    "relu": _in_place_or_not(torch.relu_, torch.relu),
    "sigmoid": _in_place_or_not(torch.sigmoid_, torch.sigmoid),
    "tanh": _in_place_or_not(torch.tanh_, torch.tanh),
}


def grad_sums(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, axis: int = 1, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    r"""``(sum_dy, sum_dy_xhat)`` per feature: :math:`\sum dy` and :math:`\sum dy\,\hat x`.

    ``x_hat = (x - mean) * invstd``.

    They are ``dbias`` and ``dweight``, and add up across groups and processes.

    Shape:
        - dy, x: ``(*, C, *)`` with ``C`` at ``axis``; mean, invstd, sums: ``(C,)`` (sums in the accumulation dtype).
    """
    feature = _feature(x, axis)
    chosen = _backend(x, backend) if not _transformed(dy) else "torch"
    if chosen == "triton" and triton_ops.applies(x, feature) and dy.device == x.device:
        return triton_ops.grad_sums(dy.detach(), x.detach(), mean, invstd, feature)
    if chosen == "native" and x.numel() > 0:
        result = native.grad_sums(dy.detach(), x.detach(), _vector(mean, x), _vector(invstd, x), feature)  # type: ignore[arg-type]
        if result is not None:
            return result[0], result[1]
    sum_dy, sum_dy_xhat = torch_ops.grad_sums(dy, x, mean, invstd, feature, _compute(x, chosen))
    acc = accumulation_dtype(x.dtype)
    return sum_dy.to(acc), sum_dy_xhat.to(acc)


def grad_input(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    axis: int = 1,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""The input gradient of training-mode BN from the two gradient sums over ``count`` values.

    .. math::

        dx = s\gamma\Big(dy - \frac{\sum dy}{m} - \hat x\,\frac{\sum dy\,\hat x}{m}\Big)

    (derivation: :mod:`batchnorm.reference`). ``count`` is the number of values
    the statistics pooled, which with synchronized BN exceeds the local ones.

    Shape:
        - dy, x, dx: ``(*, C, *)`` with ``C`` at ``axis``; the per-feature tensors: ``(C,)``.
    """
    feature = _feature(x, axis)
    chosen = _backend(x, backend) if not _transformed(dy) else "torch"
    if chosen == "triton" and triton_ops.applies(x, feature) and dy.device == x.device:
        return triton_ops.grad_input(dy.detach(), x.detach(), mean, invstd, weight, sum_dy, sum_dy_xhat, count, feature)
    if chosen == "native" and x.numel() > 0:
        dx = native.grad_input(
            dy.detach(),
            x.detach(),
            _vector(mean, x),  # type: ignore[arg-type]
            _vector(invstd, x),  # type: ignore[arg-type]
            _vector(weight, x),
            _vector(sum_dy, x),  # type: ignore[arg-type]
            _vector(sum_dy_xhat, x),  # type: ignore[arg-type]
            count,
            feature,
        )
        if dx is not None:
            return dx
    return torch_ops.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, feature, _compute(x, chosen))
