r"""Synchronized batch norm: statistics of the global batch, split across the processes of a group.

With data parallelism each of ``P`` processes (ranks) sees a slice of the
batch. :class:`SyncBatchNorm` normalizes every slice with the statistics of
the *whole* batch, on ``torch.distributed`` (gloo on CPU, NCCL on GPU), with
exactly one collective forward and one backward per call, built from the
four primitives of :mod:`batchnorm.kernels`:

Forward (training, group of size > 1)
    1. ``stats`` on the local slice: :math:`(m_r, \mu_r, M_{2,r})` per feature;
    2. **one** ``all_gather`` of the packed ``(2C + 1,)`` buffer
       ``[m_r, \mu_r, M_{2,r}]`` (float64) from every rank, merged exactly
       (Chan et al.'s pairwise formula, generalised to ``P`` parts):

       .. math::

           m = \sum_r m_r,\quad \mu = \frac{1}{m}\sum_r m_r \mu_r,\quad
           M_2 = \sum_r M_{2,r} + \sum_r m_r (\mu_r - \mu)^2

       An all-gather rather than an all-reduce of sums: uneven slices
       (including empty ones, :math:`m_r = 0`) are weighted by their counts,
       and no :math:`E[x^2] - E[x]^2` cancellation ever happens;
    3. ``normalize`` with :math:`\mu` and :math:`s = 1/\sqrt{M_2/m + \epsilon}`;
       the running statistics take the global mean and the unbiased global
       variance :math:`M_2 / (m - 1)`, identically on every rank.

Backward
    1. ``grad_sums`` locally: :math:`(\sum_{\text{local}} dy,\ \sum_{\text{local}} dy\,\hat x)`;
    2. **one** ``all_reduce`` (sum) of the packed ``(2C,)`` buffer: the global sums;
    3. ``grad_input`` with the global sums and the global count :math:`m`:
       :math:`dx = s\gamma\,(dy - \frac1m\sum dy - \hat x\,\frac1m\sum dy\,\hat x)`.

    ``dweight`` and ``dbias`` are the *local* sums :math:`\sum_{\text{local}} dy\,\hat x`
    and :math:`\sum_{\text{local}} dy`, as in ``torch.nn.SyncBatchNorm``: the
    data-parallel wrapper (DDP) all-reduces parameter gradients itself. When
    the input needs no gradient, backward communicates nothing (as torch).

Every rank must call each layer in the same order, also with an empty slice
(it takes part in both collectives with a count of 0 and returns an empty
output). Eval mode, a process group of size 1, and no initialized process
group at all make it exactly :class:`~batchnorm.nn.batchnorm.BatchNorm`.
A rank that dies or never arrives makes the others raise
:class:`SyncBatchNormError` within ``timeout`` (default: the process group's,
set by ``init_process_group(timeout=...)``) instead of hanging.

Unlike ``torch.nn.SyncBatchNorm``, it runs on the CPU (gloo) as well as on
GPUs, takes any feature axis, and keeps the core's guarantee that a
non-finite batch never reaches the running statistics: the merged
statistics are identical on every rank, so every rank makes the same
decision (all raise :class:`~batchnorm.functional.NonfiniteBatchError`,
or all skip).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from batchnorm import kernels
from batchnorm.functional import (
    NONFINITE_POLICIES,
    BatchNormArgumentError,
    NonfinitePolicy,
    _update_running_stats,
    batch_norm,
    check_arguments,
)
from batchnorm.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["CollectiveCount", "SyncBatchNorm", "SyncBatchNormError", "convert_sync", "group_size", "sync_batch_norm"]

Timeout = float | datetime.timedelta | None


class SyncBatchNormError(RuntimeError):
    """A collective of synchronized BN failed: another rank died, or did not arrive within the timeout."""


@dataclass
class CollectiveCount:
    """Synchronized calls of one layer and the collectives they issued (forward, backward), in this process.

    Eval-mode calls and calls outside a process group are not counted (they communicate nothing).
    """

    calls: int = 0
    forward: int = 0
    backward: int = 0

    def reset(self) -> None:
        self.calls = self.forward = self.backward = 0


def group_size(process_group: Any = None) -> int:
    """The number of processes in ``process_group`` (default: the world); 1 without an initialized group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    group = process_group if process_group is not None else dist.group.WORLD
    return int(dist.get_world_size(group))


def _seconds(timeout: Timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


def _check_timeout(timeout: Timeout) -> None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        if timeout is not None and timeout.total_seconds() <= 0:
            raise BatchNormArgumentError(f"expected a positive timeout, got {timeout}")
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise BatchNormArgumentError(f"expected timeout in seconds > 0, a datetime.timedelta or None, got {timeout!r}")


def _communication_dtype(device: torch.device) -> torch.dtype:
    """float64 for the packed statistics and sums (exact counts, one rounding), where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _collective(
    start: Callable[[], Any], what: str, group: Any, size: int, timeout: Timeout, counter: CollectiveCount | None
) -> None:
    """Start one asynchronous collective and wait for it; a failure or a timeout raises :class:`SyncBatchNormError`."""
    rank = dist.get_rank(group)
    seconds = _seconds(timeout)
    try:
        work = start()
        if seconds is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=seconds))
    except RuntimeError as error:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        limit = (
            f"{seconds:g} s (SyncBatchNorm timeout)"
            if seconds is not None
            else "the process group's timeout, set by init_process_group(timeout=...)"
        )
        raise SyncBatchNormError(
            f"SyncBatchNorm: the {what} across the {size} processes of the group failed on rank {rank}: "
            f"another rank died or did not reach this batch-norm call within {limit}. Every rank must run each "
            f"BN layer's forward and backward in the same order, also with an empty batch. Cause: {error}"
        ) from error
    if counter is not None:
        if what.startswith("forward"):
            counter.forward += 1
        else:
            counter.backward += 1


def _all_merge(
    count: int,
    mean: Tensor,
    m2: Tensor,
    group: Any,
    size: int,
    timeout: Timeout,
    counter: CollectiveCount | None,
) -> tuple[int, Tensor, Tensor]:
    r"""Merge every rank's ``(count, mean, m2)`` exactly, with one all-gather of a packed ``(2C + 1,)`` buffer.

    .. math::

        m = \sum_r m_r,\quad \mu = \frac1m \sum_r m_r\mu_r,\quad M_2 = \sum_r M_{2,r} + \sum_r m_r(\mu_r - \mu)^2

    (:func:`batchnorm.kernels.merge_stats` applied to all ranks at once),
    in float64; the result is in ``mean``'s dtype and identical on every rank.
    Ranks with ``count = 0`` contribute nothing.

    Shape:
        - mean, m2 and the results: ``(C,)``.
    """
    channels = mean.numel()
    dtype = _communication_dtype(mean.device)
    packed = torch.empty(2 * channels + 1, dtype=dtype, device=mean.device)
    packed[0] = count
    packed[1 : channels + 1] = mean
    packed[channels + 1 :] = m2
    gathered = torch.empty(size, 2 * channels + 1, dtype=dtype, device=mean.device)
    outputs = list(gathered.unbind(0))
    _collective(
        lambda: dist.all_gather(outputs, packed, group=group, async_op=True),
        "forward all_gather of the batch statistics",
        group,
        size,
        timeout,
        counter,
    )
    counts = gathered[:, :1]
    total = int(counts.sum().item())
    if total == 0:
        return 0, torch.zeros_like(mean), torch.zeros_like(m2)
    means, m2s = gathered[:, 1 : channels + 1], gathered[:, channels + 1 :]
    merged_mean = (counts * means).sum(0) / total
    merged_m2 = m2s.sum(0) + (counts * (means - merged_mean) ** 2).sum(0)
    return total, merged_mean.to(mean.dtype), merged_m2.to(m2.dtype)


class _SyncBatchNormFunction(torch.autograd.Function):
    r"""``normalize`` with the global statistics; backward ``grad_sums``, one all-reduce, ``grad_input``.

    ``mean`` and ``invstd`` are the global batch's (functions of every rank's
    input, which ``grad_input`` accounts for through the global sums);
    ``dweight``, ``dbias`` are the local sums (DDP reduces them).

    Shape:
        - x, y: ``(*, C, *)`` with ``C`` at ``feature``; weight, bias, mean, invstd: ``(C,)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        count: int,
        feature: int,
        backend: str,
        group: Any,
        size: int,
        timeout: Timeout,
        counter: CollectiveCount | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.feature, ctx.backend = count, feature, backend
        ctx.group, ctx.size, ctx.timeout, ctx.counter = group, size, timeout, counter
        ctx.bias_dtype = None if bias is None else bias.dtype
        if x.numel() == 0:
            return torch.empty_like(x)
        return kernels.normalize(x, mean, invstd, weight, bias, feature, backend=backend)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "SyncBatchNorm does not support double backward (create_graph=True) while synchronizing across "
                "processes; torch.nn.SyncBatchNorm does not either"
            )
        x, weight, mean, invstd = ctx.saved_tensors
        feature, backend = ctx.feature, ctx.backend
        if x.numel() > 0:
            sum_dy, sum_dy_xhat = kernels.grad_sums(grad_output, x, mean, invstd, feature, backend=backend)
        else:
            sum_dy, sum_dy_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = None
        if need_input:
            channels = mean.numel()
            packed = torch.cat((sum_dy, sum_dy_xhat)).to(_communication_dtype(mean.device))
            _collective(
                lambda: dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group, async_op=True),
                "backward all_reduce of the gradient sums",
                ctx.group,
                ctx.size,
                ctx.timeout,
                ctx.counter,
            )
            total_dy, total_dy_xhat = packed[:channels].to(mean.dtype), packed[channels:].to(mean.dtype)
            if x.numel() > 0:
                grad_input = kernels.grad_input(
                    grad_output, x, mean, invstd, weight, total_dy, total_dy_xhat, ctx.count, feature, backend=backend
                )
            else:
                grad_input = torch.zeros_like(x)
        grad_weight = sum_dy_xhat.to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def _check_local(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    axis: int,
) -> int:
    """The core's argument checks, except that a slice may hold one value per feature (the global batch decides)."""
    ndim = input.dim() if isinstance(input, Tensor) else 0
    if ndim >= 2 and input.numel() > 0 and isinstance(axis, int) and -ndim <= axis < ndim:
        feature = axis % ndim
        if input.numel() // input.shape[feature] == 1:
            # One value per feature here: check the same arguments on a (shape-only) slice of two.
            shape = list(input.shape)
            shape[1 if feature == 0 else 0] = 2
            input = torch.empty(shape, dtype=input.dtype, device="meta")
    return check_arguments(input, running_mean, running_var, weight, bias, True, momentum, eps, axis)


def sync_batch_norm(
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
    process_group: Any = None,
    num_batches_tracked: Tensor | None = None,
    nonfinite: NonfinitePolicy = "raise",
    timeout: Timeout = None,
    counter: CollectiveCount | None = None,
) -> Tensor:
    r""":func:`batchnorm.functional.batch_norm` over the batch of every process in ``process_group``.

    In training with a group of more than one process, the mean and biased
    variance come from the concatenation of every rank's ``input``
    (:mod:`batchnorm.nn.sync`: one all-gather forward, one all-reduce
    backward); the running statistics, if given, are updated with them
    (``running = (1 - momentum) * running + momentum * batch``, unbiased
    variance over the global count), identically on every rank. Otherwise
    (eval, one process, no process group) exactly
    :func:`~batchnorm.functional.batch_norm`.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps,
            axis, num_batches_tracked, nonfinite: as :func:`batchnorm.functional.batch_norm`.
        process_group: the group to synchronize over (default: the world).
        timeout: seconds (or a ``timedelta``) to wait for the other ranks at
            each collective; default ``None``: the process group's timeout.
        counter: a :class:`CollectiveCount` to increment per collective.

    Shape:
        - input, output: ``(*, C, *)`` with ``C`` at ``axis``; this rank's slice (possibly empty).
        - running_mean, running_var, weight, bias: ``(C,)``.

    Raises:
        SyncBatchNormError: a collective failed or timed out (a rank died or never arrived).
        BatchNormArgumentError: bad arguments, or a global batch of one value per feature.
        NonfiniteBatchError: the global batch has NaN/Inf statistics (on every rank, before any buffer changes).
    """
    _check_timeout(timeout)
    size = group_size(process_group) if training else 1
    if size <= 1:
        return batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
            num_batches_tracked=num_batches_tracked, nonfinite=nonfinite,
        )  # fmt: skip
    result: Tensor = _run(
        input, running_mean, running_var, weight, bias, momentum, eps, axis,
        process_group, size, num_batches_tracked, nonfinite, timeout, counter,
    )  # fmt: skip
    return result


def _run(*args: Any) -> Tensor:
    """:func:`_synchronized`; under ``torch.compile``, a graph break around it (it runs eagerly)."""
    if torch.compiler.is_compiling():
        eager: Tensor = torch.compiler.disable(_synchronized)(*args)  # type: ignore[no-untyped-call]
        return eager
    return _synchronized(*args)


def _synchronized(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    axis: int,
    process_group: Any,
    size: int,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
    timeout: Timeout,
    counter: CollectiveCount | None,
) -> Tensor:
    if nonfinite not in NONFINITE_POLICIES:
        raise BatchNormArgumentError(f"expected nonfinite to be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    feature = _check_local(input, running_mean, running_var, weight, bias, momentum, eps, axis)
    chosen = kernels.plan(input, True, weight, bias, feature)
    if not chosen.host_readable:
        raise BatchNormArgumentError(
            "SyncBatchNorm cannot synchronize while traced (torch.export, torch.jit.trace), under "
            "torch.func transforms or forward-mode AD, or on meta tensors: it must read the merged statistics on "
            "the host. Compile or transform the model in eval mode, or in one process"
        )
    backend = chosen.fallback.backend if chosen.route == "fused" and chosen.fallback is not None else chosen.backend
    group = process_group if process_group is not None else dist.group.WORLD
    eps = float(eps)
    with torch.no_grad():
        if input.numel() > 0:
            count, mean, m2 = kernels.stats(input, feature, backend=backend)
        else:
            acc = kernels.accumulation_dtype(input.dtype)
            count = 0
            mean = torch.zeros(input.shape[feature], dtype=acc, device=input.device)
            m2 = torch.zeros_like(mean)
        count, mean, m2 = _all_merge(count, mean, m2, group, size, timeout, counter)
        if count == 1:
            raise BatchNormArgumentError(
                f"expected more than 1 value per feature when training, got 1 value per feature in the batch of "
                f"all {size} processes (this rank's input has shape {tuple(input.shape)}, feature axis {feature})"
            )
        var = m2 / count if count > 0 else m2
        if running_mean is not None and running_var is not None:
            if count == 0:  # an empty global batch: statistics left alone, the batch counted (as BatchNorm)
                if num_batches_tracked is not None:
                    num_batches_tracked.add_(1)
            else:
                _update_running_stats(
                    running_mean, running_var, mean, var, count, momentum, num_batches_tracked, nonfinite, True
                )
        invstd = torch.rsqrt(var + eps)
    result: Tensor = _SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        input, weight, bias, mean, invstd, count, feature, backend, group, size, timeout, counter
    )
    return result


class SyncBatchNorm(BatchNorm):
    r"""Batch norm whose training statistics cover the batch of every process in ``process_group``.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta,
        \qquad \mathrm{E}, \mathrm{Var} \text{ over the concatenation of all ranks' batches}

    In training inside an initialized process group of more than one process:
    ``stats`` locally, one all-gather of the packed ``(count, mean, m2)``
    merged exactly (Chan's formula, uneven and empty slices weighted by their
    counts), ``normalize``; backward ``grad_sums``, one all-reduce of the two
    sums, ``grad_input`` with the global count (:mod:`batchnorm.nn.sync`).
    ``weight``/``bias`` gradients are local, as in ``torch.nn.SyncBatchNorm``
    (DDP reduces them). Running statistics get the global mean and unbiased
    variance, identically on every rank. In eval mode, with one process, or
    without an initialized process group it is exactly :class:`BatchNorm`
    and communicates nothing (in eval without running statistics each rank
    normalizes its own batch, as torch's layer does). Parameters, buffers
    and state-dict keys are torch's. Synchronized training runs eagerly:
    ``torch.compile`` breaks the graph around it; ``torch.jit.trace``,
    ``torch.export`` and ``torch.func`` raise a clear error, and double
    backward is refused (as torch's).

    Every rank must call the layer, also with an empty batch (its output is
    empty, and it takes part in both collectives). A rank that dies or never
    arrives makes the others raise :class:`SyncBatchNormError` within
    ``timeout`` rather than hang.

    Unlike ``torch.nn.SyncBatchNorm`` it runs on the CPU (gloo), takes any
    feature axis, and never writes a NaN batch into the running statistics.
    It is not an instance of ``torch.nn.SyncBatchNorm`` (DDP refuses those
    on the CPU); :attr:`collectives` counts its synchronized calls and collectives.

    Args:
        num_features: ``C``, the size of the feature axis.
        eps, momentum, affine, track_running_stats, axis, nonfinite, device, dtype, bias:
            as :class:`BatchNorm`.
        process_group: the group to synchronize over. Default: the world.
        timeout: seconds (or a ``timedelta``) to wait at each collective before
            raising :class:`SyncBatchNormError`. Default: ``None``, the process
            group's timeout (``init_process_group(timeout=...)``).

    Shape:
        - Input: ``(*, C, *)`` with ``C`` at ``axis``: this rank's slice of the batch (possibly empty).
        - Output: same shape, dtype and memory layout as the input.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        process_group: Any = None,
        nonfinite: NonfinitePolicy = "raise",
        timeout: Timeout = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        if dist.is_available() and isinstance(axis, dist.ProcessGroup):
            raise ValueError(
                "expected an integer axis, got a process group: batchnorm.SyncBatchNorm takes axis before "
                "process_group (pass process_group=... by keyword)"
            )
        _check_timeout(timeout)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            axis,
            nonfinite,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.process_group = process_group
        self.timeout = timeout
        self.collectives = CollectiveCount()

    def forward(self, input: Tensor) -> Tensor:
        """Global batch statistics in training inside a process group; otherwise :meth:`BatchNorm.forward`."""
        if not self.training:
            return super().forward(input)
        size = group_size(self.process_group)
        if size <= 1:
            return super().forward(input)
        self._check_input_dim(input)
        self.collectives.calls += 1
        track = self.track_running_stats
        result: Tensor = _run(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            self.axis,
            self.process_group,
            size,
            self.num_batches_tracked if track else None,
            self.nonfinite,
            self.timeout,
            self.collectives,
        )
        return result

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.timeout is not None:
            text += f", timeout={self.timeout}"
        return text


_CONVERTIBLE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)


def convert_sync(model: nn.Module, process_group: Any = None, *, timeout: Timeout = None) -> nn.Module:
    """Swap every plain BN layer of ``model`` for a :class:`SyncBatchNorm` over ``process_group``.

    Converted: torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, and our
    :class:`BatchNorm` and ``BatchNorm1d/2d/3d`` (their ``axis`` and
    ``nonfinite`` kept). The new layer *shares* the old one's parameters and
    buffers (the same tensors, so an optimizer built before still holds
    them), and keeps ``eps``, ``momentum``, ``affine``, ``bias``,
    ``track_running_stats`` and train/eval mode. Existing :class:`SyncBatchNorm`
    layers get ``process_group`` (and ``timeout``) when given. BN variants
    (Ghost, Renorm, Frozen, fused with an activation) are left as they are:
    their statistics are not a plain batch's. The model is changed in place
    and returned (a BN layer passed as ``model`` is returned converted), as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.
    """
    _check_timeout(timeout)
    if isinstance(model, SyncBatchNorm):
        if process_group is not None:
            model.process_group = process_group
        if timeout is not None:
            model.timeout = timeout
        return model
    if type(model) in _CONVERTIBLE:
        source: Any = model
        replacement = SyncBatchNorm(
            source.num_features,
            source.eps,
            source.momentum,
            source.affine,
            source.track_running_stats,
            axis=getattr(source, "axis", 1),
            process_group=process_group,
            nonfinite=getattr(source, "nonfinite", "raise"),
            timeout=timeout,
            device="meta",
            bias=not source.affine or source.bias is not None,
        )
        for name in ("weight", "bias"):
            replacement._parameters[name] = source._parameters.get(name)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            replacement._buffers[name] = source._buffers.get(name)
        replacement.train(source.training)
        if hasattr(source, "qconfig"):
            replacement.qconfig = source.qconfig
        return replacement
    for name, child in model.named_children():
        converted = convert_sync(child, process_group, timeout=timeout)
        if converted is not child:
            setattr(model, name, converted)
    return model
