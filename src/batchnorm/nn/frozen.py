r"""Frozen batch norm: BN's eval map as a fixed layer, and :func:`freeze`, which converts a model's BN layers.

Setting ``requires_grad=False`` on a BN layer's parameters does not freeze it:
in training mode it still normalizes with the batch statistics and writes
them into ``running_mean``/``running_var``. Fine-tuning with small batches
(detection, segmentation) wants the pretrained statistics instead, whatever
the mode. :class:`FrozenBatchNorm` is that map, and :func:`freeze` swaps it in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.functional import BatchNormArgumentError, batch_norm
from batchnorm.nn.batchnorm import is_batch_norm
from batchnorm.nn.fused import ACTIVATIONS, BatchNormAct, _activate

__all__ = ["FrozenBatchNorm", "freeze"]


class FrozenBatchNorm(nn.Module):
    r"""Batch norm with fixed statistics: the affine map of BN's eval mode, in every mode.

    .. math::

        y = \frac{x - \text{running\_mean}}{\sqrt{\text{running\_var} + \epsilon}} \cdot \gamma + \beta

    Like torchvision's ``FrozenBatchNorm2d`` but for any rank and feature
    ``axis``. ``model.train()`` changes nothing and no batch is ever measured.
    ``weight`` and ``bias`` are buffers (nothing requires grad) unless
    ``trainable_affine=True``, which makes them parameters while the
    statistics stay fixed. The state dict has exactly the keys of torch's
    ``BatchNorm*d`` (``weight, bias, running_mean, running_var,
    num_batches_tracked``; the counter is carried, never incremented), so it
    loads from and into torch's layers and ours; a state dict without the
    counter (torchvision's) loads too. Gradients flow to the input.

    Args:
        num_features: ``C``, the size of the feature axis.
        eps: added to the variance. Default: 1e-5.
        affine: keep ``weight`` (init 1) and ``bias`` (init 0). Default: True.
        axis: the feature axis. Default: 1.
        trainable_affine: ``weight`` and ``bias`` as trainable parameters. Default: False.
        activation: ``None`` or an activation of :class:`~batchnorm.nn.fused.BatchNormAct`
            applied after the map (what :func:`freeze` gives a ``BatchNormAct``). Default: None.
        negative_slope: leaky ReLU's slope for negative inputs. Default: 0.01.
        bias: with ``affine``, keep ``bias`` (keyword-only, as in torch 2.13). Default: True.

    Shape:
        - Input: ``(*, C, *)`` with ``C`` at ``axis``; Output: same shape, dtype and layout.
    """

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        axis: int = 1,
        trainable_affine: bool = False,
        activation: str | None = None,
        negative_slope: float = 0.01,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise BatchNormArgumentError(f"expected num_features to be a positive integer, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise BatchNormArgumentError(f"expected eps > 0, got {eps!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise BatchNormArgumentError(f"expected an integer axis, got {axis!r}")
        if activation is not None and activation not in ACTIVATIONS:
            raise BatchNormArgumentError(f"expected activation to be None or one of {ACTIVATIONS}, got {activation!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine, self.axis = num_features, float(eps), affine, axis
        self.trainable_affine = trainable_affine
        self.activation, self.negative_slope = activation, float(negative_slope)
        for name, init, wanted in (("weight", torch.ones, affine), ("bias", torch.zeros, affine and bias)):
            value = init(num_features, **factory) if wanted else None
            if trainable_affine and value is not None:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batch_norm(cls, module: nn.Module, *, trainable_affine: bool = False) -> FrozenBatchNorm:
        """The frozen copy of a BN layer (torch's ``BatchNorm*d``/``SyncBatchNorm`` or ours): same numbers in eval.

        Raises:
            BatchNormArgumentError: the layer keeps no running statistics, or is lazy and not yet initialized.
        """
        source: Any = module
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise BatchNormArgumentError(
                f"cannot freeze an uninitialized {type(module).__name__}: run a forward pass first"
            )
        if source.running_mean is None or source.running_var is None:
            raise BatchNormArgumentError(
                f"cannot freeze {type(module).__name__} with track_running_stats=False: it keeps no running "
                "statistics to freeze (it normalizes every batch with its own statistics)"
            )
        frozen = cls(
            source.num_features,
            source.eps,
            source.weight is not None,
            getattr(source, "axis", 1),
            trainable_affine,
            source.activation if isinstance(module, BatchNormAct) else None,
            source.negative_slope if isinstance(module, BatchNormAct) else 0.01,
            bias=source.bias is not None,
        )
        # assign=True: the copies keep their device and dtype (parameters keep requires_grad=True).
        frozen.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()}, assign=True)
        frozen.train(module.training)
        return frozen

    def forward(self, input: Tensor) -> Tensor:
        """The fixed map, whatever ``self.training`` says."""
        y = batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps, self.axis
        )
        return y if self.activation is None else _activate(y, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if not self.affine:
            text += ", affine=False"
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self.trainable_affine:
            text += ", trainable_affine=True"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
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
        # torchvision's FrozenBatchNorm2d and torch's checkpoints before version 2 have no counter.
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def freeze(model: nn.Module, *, trainable_affine: bool = False) -> nn.Module:
    """Replace every BN layer of ``model`` by a :class:`FrozenBatchNorm` with its current numbers.

    Converts torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` and ours
    (:class:`~batchnorm.nn.batchnorm.BatchNorm` with any ``axis``, its variants
    and ``BatchNormAct``, whose activation is kept). Afterwards the model's
    eval outputs are unchanged, and ``model.train()`` no longer switches these
    layers to batch statistics nor updates their running statistics (which
    ``requires_grad_(False)`` alone does not stop). ``trainable_affine=True``
    keeps ``weight``/``bias`` trainable (new parameters: build the optimizer
    after freezing). Changed in place and returned; a BN layer passed as
    ``model`` is returned frozen.

    Raises:
        BatchNormArgumentError: a BN layer without running statistics, or an uninitialized lazy one.
    """
    if is_batch_norm(model):
        return FrozenBatchNorm.from_batch_norm(model, trainable_affine=trainable_affine)
    for name, child in model.named_children():
        replacement = freeze(child, trainable_affine=trainable_affine)
        if replacement is not child:
            setattr(model, name, replacement)
    return model
