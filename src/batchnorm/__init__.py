"""batchnorm: batch normalization from first principles, and what it does in every layer of a deep network.

Import as ``import batchnorm as bn``:

- :mod:`batchnorm.reference`: the NumPy textbook (forward, backward, inference).
- :func:`batchnorm.functional.batch_norm`: the PyTorch op, any feature axis.
- :class:`BatchNorm`, :class:`BatchNorm1d`, :class:`BatchNorm2d`,
  :class:`BatchNorm3d`: drop-in modules; :func:`convert` swaps torch's for ours.
- :class:`BatchNormAct`: BN fused with an activation, saving half the memory for backward.
- Variants: :class:`BatchRenorm`, :class:`GhostBatchNorm`, :class:`FrozenBatchNorm` and :func:`freeze`.
- Scale-out: :class:`SyncBatchNorm` (statistics of the batch of every process, torch.distributed)
  and :func:`convert_sync`.
- Deployment: :func:`fold` (BN into the layer before it) and :func:`recalibrate` (precise BN statistics).
- :func:`explain`: what every BN layer of a model computes on a real batch.
- :mod:`batchnorm.kernels`: the four primitives (``stats``, ``normalize``, ``grad_sums``,
  ``grad_input``), their backends and the dispatch point (which route a call gets) and :mod:`batchnorm.kernels.native`
  (the native CPU kernels, compiled once on this machine).
"""

from batchnorm import functional, kernels, reference
from batchnorm.deploy import fold, recalibrate
from batchnorm.functional import BatchNormArgumentError, NonfiniteBatchError, check_nonfinite
from batchnorm.kernels import native
from batchnorm.lab.explain import explain
from batchnorm.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, convert, is_batch_norm
from batchnorm.nn.frozen import FrozenBatchNorm, freeze
from batchnorm.nn.fused import BatchNormAct
from batchnorm.nn.ghost import GhostBatchNorm
from batchnorm.nn.renorm import BatchRenorm
from batchnorm.nn.sync import SyncBatchNorm, SyncBatchNormError, convert_sync

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchNormArgumentError",
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "NonfiniteBatchError",
    "SyncBatchNorm",
    "SyncBatchNormError",
    "__version__",
    "check_nonfinite",
    "convert",
    "convert_sync",
    "explain",
    "fold",
    "freeze",
    "functional",
    "is_batch_norm",
    "kernels",
    "native",
    "recalibrate",
    "reference",
]
