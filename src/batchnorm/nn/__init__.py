"""Layers: drop-in batch-norm modules, BN fused with an activation, and conversion between ours and torch's."""

from batchnorm.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, convert, is_batch_norm
from batchnorm.nn.fused import BatchNormAct

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct", "convert", "is_batch_norm"]
