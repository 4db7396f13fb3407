r"""Batch-norm modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` with any feature axis.

The modules own parameters and buffers and decide between batch and running
statistics; the arithmetic lives in :func:`batchnorm.functional.batch_norm`.
State-dict keys are exactly torch's (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so checkpoints load both ways.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.functional import NONFINITE_POLICIES, BatchNormArgumentError, NonfinitePolicy, batch_norm

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "is_batch_norm"]


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch normalization over every axis except ``axis`` (Ioffe & Szegedy, 2015).

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training mode the mean and the biased variance are computed per feature
    over the batch and every other non-feature axis (``N*H*W`` values per
    channel for an image batch, ``N`` per unit for a dense layer, ``N*L`` per
    channel of a sequence). The running estimates are updated as
    ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased batch variance: ``momentum`` is the weight of the *new*
    observation (PyTorch's convention; Keras and Flax use ``1 - momentum``).
    With ``momentum=None`` the running statistics are a cumulative average.
    In eval mode, or when ``track_running_stats=False`` in training, the
    behaviour is exactly ``torch.nn.BatchNorm2d``'s.

    Unlike PyTorch's layer, a training batch containing NaN or Inf raises
    :class:`~batchnorm.functional.NonfiniteBatchError` before the running
    statistics change (``nonfinite="raise"``), or is left out of them
    (``nonfinite="skip"``).

    Args:
        num_features: ``C``, the size of the feature axis.
        eps: added to the variance for stability. Default: 1e-5.
        momentum: weight of the new batch in the running averages, or None for
            a cumulative average. Default: 0.1.
        affine: learn ``gamma`` (``weight``, init 1) and ``beta`` (``bias``,
            init 0). Default: True.
        track_running_stats: keep ``running_mean``/``running_var`` and use them
            in eval mode; if False, batch statistics are used in both modes.
            Default: True.
        axis: the feature axis. Default: 1 (torch's layout); use -1 for
            ``(N, L, C)`` sequences.
        nonfinite: ``"raise"`` or ``"skip"``, see above. Default: ``"raise"``.
        bias: with ``affine``, also learn ``beta`` (keyword-only, as in
            torch 2.13). Default: True.

    Shape:
        - Input: ``(*, C, *)`` with ``C`` at ``axis``.
        - Output: same shape, dtype and memory layout as the input.

    It is an instance of ``torch.nn.modules.batchnorm._BatchNorm`` (and
    :class:`BatchNorm1d`/``2d``/``3d`` of ``torch.nn.BatchNorm1d``/``2d``/``3d``),
    so helpers that look for batch norm by type (``SyncBatchNorm.convert_sync_batchnorm``,
    ``torch.func.replace_all_batch_norm_modules_``, weight-decay and freezing
    helpers of other libraries) treat it as one.
    """

    _version = 2
    _allowed_ranks: tuple[int, ...] | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        nonfinite: NonfinitePolicy = "raise",
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"expected num_features to be a positive integer, got {num_features!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"expected eps > 0, got {eps}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"expected momentum in [0, 1] or None, got {momentum}")
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ValueError(f"expected an integer axis, got {axis!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"expected nonfinite to be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.nonfinite: NonfinitePolicy = nonfinite
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Set running mean to 0, running variance to 1 and the batch counter to 0."""
        if self.track_running_stats:
            assert self.running_mean is not None
            assert self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        if self.affine:
            assert self.weight is not None
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if self._allowed_ranks is not None and input.dim() not in self._allowed_ranks:
            expected = " or ".join(f"{rank}D" for rank in self._allowed_ranks)
            raise BatchNormArgumentError(f"expected {expected} input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Batch statistics in training (and when no running statistics are kept), running ones in eval."""
        self._check_input_dim(input)
        try:  # the dictionaries directly: nn.Module.__getattr__ is a Python call per attribute
            parameters, buffers = self._parameters, self._buffers
            weight, bias = parameters["weight"], parameters["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
            counter = buffers["num_batches_tracked"]
        except KeyError:  # parametrized (torch.nn.utils.parametrize) or otherwise customised
            weight, bias = self.weight, self.bias
            running_mean, running_var, counter = self.running_mean, self.running_var, self.num_batches_tracked
        if self.training and not self.track_running_stats:
            running_mean = running_var = counter = None  # batch statistics, buffers left alone
        # In eval, running statistics when there are any (also with tracking switched off, as torch).
        return batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            self.training or running_mean is None,
            self.momentum,
            self.eps,
            self.axis,
            num_batches_tracked=counter,
            nonfinite=self.nonfinite,
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
        if self.affine and self._parameters.get("bias") is None:
            text += "bias=False, "
        text += f"track_running_stats={self.track_running_stats}"
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self.nonfinite != "raise":
            text += f", nonfinite={self.nonfinite!r}"
        return text

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints written before num_batches_tracked existed (torch's version 1) lack it.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            current = self.num_batches_tracked
            keep = current is not None and current.device != torch.device("meta")
            state_dict[key] = current if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _FixedAxisBatchNorm(BatchNorm):
    """An alias with the feature axis fixed at 1, like torch's classes."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        nonfinite: NonfinitePolicy = "raise",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            axis=1,
            nonfinite=nonfinite,
            device=device,
            dtype=dtype,
            bias=bias,
        )


class BatchNorm1d(_FixedAxisBatchNorm, nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: a dense ``(N, C)`` or sequence ``(N, C, L)`` input.

    Statistics pool ``N`` (or ``N*L``) values per feature. Arguments as :class:`BatchNorm`.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``; Output: same.
    """

    _allowed_ranks = (2, 3)


class BatchNorm2d(_FixedAxisBatchNorm, nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d``: image batches ``(N, C, H, W)``, ``N*H*W`` values per channel.

    Arguments as :class:`BatchNorm`.

    Shape:
        - Input: ``(N, C, H, W)``; Output: same (channels-last layout preserved).
    """

    _allowed_ranks = (4,)


class BatchNorm3d(_FixedAxisBatchNorm, nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d``: volumes ``(N, C, D, H, W)``, ``N*D*H*W`` values per channel.

    Arguments as :class:`BatchNorm`.

    Shape:
        - Input: ``(N, C, D, H, W)``; Output: same.
    """

    _allowed_ranks = (5,)


_TORCH_TO_OURS: dict[type[nn.Module], type[BatchNorm]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_OURS_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {ours: theirs for theirs, ours in _TORCH_TO_OURS.items()}


def is_batch_norm(module: nn.Module) -> bool:
    """True for our BN modules and for torch's (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy ones)."""
    return isinstance(module, (BatchNorm, nn.modules.batchnorm._BatchNorm))


def _copy_state(source: nn.Module, target: nn.Module) -> nn.Module:
    target.load_state_dict(source.state_dict())
    target.train(source.training)
    for name, parameter in source.named_parameters(recurse=False):
        getattr(target, name).requires_grad_(parameter.requires_grad)
    return target


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Swap every torch BN layer of ``model`` for ours (``to="batchnorm"``) or back (``to="torch"``).

    Weights, buffers, ``requires_grad``, train/eval mode, device and dtype are
    kept. The model is changed in place and returned (a BN layer passed as
    ``model`` itself is returned converted). Our generic :class:`BatchNorm`
    (any rank, any axis) has no torch equivalent and is left as it is when
    converting to torch; ``BatchNorm1d/2d/3d`` map both ways.

    Raises:
        ValueError: if ``to`` is neither ``"batchnorm"`` nor ``"torch"``.
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"expected to='batchnorm' or to='torch', got {to!r}")

    def swap(module: nn.Module) -> nn.Module:
        if to == "batchnorm" and type(module) in _TORCH_TO_OURS:
            source: Any = module
            replacement: nn.Module = _TORCH_TO_OURS[type(module)](
                source.num_features,
                source.eps,
                source.momentum,
                source.affine,
                source.track_running_stats,
                bias=not source.affine or source.bias is not None,
            )
        elif to == "torch" and type(module) in _OURS_TO_TORCH:
            ours: Any = module
            # torch < 2.13 has no `bias` argument: pass it only when it matters.
            options = {"bias": False} if ours.affine and ours.bias is None else {}
            replacement = _OURS_TO_TORCH[type(module)](
                ours.num_features, ours.eps, ours.momentum, ours.affine, ours.track_running_stats, **options
            )
        else:
            for name, child in module.named_children():
                new_child = swap(child)
                if new_child is not child:
                    setattr(module, name, new_child)
            return module
        reference = next(iter(list(module.parameters()) + list(module.buffers())), None)
        if reference is not None:
            replacement = replacement.to(device=reference.device)
            floating = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
            if floating:
                replacement = replacement.to(dtype=floating[0].dtype)
        return _copy_state(module, replacement)

    return swap(model)
