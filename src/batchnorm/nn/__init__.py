"""Layers: drop-in batch-norm modules, BN fused with an activation, synchronized BN, and conversions."""

from batchnorm.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, convert, is_batch_norm
from batchnorm.nn.frozen import FrozenBatchNorm, freeze
from batchnorm.nn.fused import BatchNormAct
from batchnorm.nn.ghost import GhostBatchNorm, ghost_batch_norm
from batchnorm.nn.renorm import BatchRenorm, batch_renorm
from batchnorm.nn.sync import SyncBatchNorm, SyncBatchNormError, convert_sync, sync_batch_norm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "SyncBatchNorm",
    "SyncBatchNormError",
    "batch_renorm",
    "convert",
    "convert_sync",
    "freeze",
    "ghost_batch_norm",
    "is_batch_norm",
    "sync_batch_norm",
]
