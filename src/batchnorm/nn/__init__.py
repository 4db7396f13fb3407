"""Layers: drop-in batch-norm modules, BN fused with an activation, and conversion between ours and torch's."""

from batchnorm.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, convert, is_batch_norm
from batchnorm.nn.frozen import FrozenBatchNorm, freeze
from batchnorm.nn.fused import BatchNormAct
from batchnorm.nn.ghost import GhostBatchNorm, ghost_batch_norm
from batchnorm.nn.renorm import BatchRenorm, batch_renorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "batch_renorm",
    "convert",
    "freeze",
    "ghost_batch_norm",
    "is_batch_norm",
]
