"""``batchnorm train --distributed``: data-parallel training over torch.distributed, launched by ``torchrun``.

``torchrun --nproc-per-node K -m batchnorm train --distributed --batch-size B ...``
(multi-node: torchrun's ``--nnodes``, ``--node-rank``, ``--rdzv-*`` or
``--master-addr``/``--master-port``) starts K processes; each calls
:func:`from_environment`, which reads torchrun's ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and joins the process group
(gloo on the CPU, NCCL when CUDA is available, one GPU per local rank).

What the K processes share, so that a run equals the single-process run with
the same global batch ``B`` (up to float rounding):

* the batches: every rank draws the same global batch from the same seeded
  :class:`~batchnorm.lab.training.BatchSampler` and takes its contiguous slice
  (:meth:`Distributed.shard`, ``tensor_split``: slices differ by at most one
  example when ``B`` is not a multiple of K; an empty slice is allowed);
* the BN statistics: every BN layer is converted to
  :class:`batchnorm.nn.SyncBatchNorm` (:func:`batchnorm.nn.convert_sync`), so
  each batch is normalized with the global batch's mean and variance, and the
  running statistics are the global ones, identical on every rank;
* the gradients: DDP averages them over ranks; each rank's loss is its slice's
  summed cross-entropy times ``K / B`` (:meth:`Distributed.local_loss`), so the
  average is the gradient of the global batch's mean loss, uneven slices included;
* the logged training loss and the stop decisions: one all-reduce per step
  carries each rank's loss sum and its Ctrl-C/SIGTERM flag
  (:meth:`Distributed.agree_step`), so every rank sees the global mean loss
  (NaN if any rank's loss is NaN: every rank's divergence guard trips at the
  same step) and stops at the same step after a signal; the weight-norm check
  is agreed by one more all-reduce every 10 steps (:meth:`Distributed.agreed`).

Rank 0 alone evaluates (on the whole validation and test splits, with the
unwrapped model: eval-mode BN communicates nothing), prints, and writes
``metrics.jsonl`` and ``checkpoint.pt``; the other ranks write nothing. A
checkpoint is the plain single-process format (the unwrapped model's state
dict), so ``--resume`` on every rank reads the same file, and a distributed
checkpoint resumes in one process and back.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from batchnorm.nn.sync import convert_sync

__all__ = ["ENV_VARS", "NAN_HOOK_ENV", "Distributed", "DistributedSetupError", "from_environment"]

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Test hook: "RANK:STEP" makes that rank's loss NaN at that step (one rank's divergence).
NAN_HOOK_ENV = "BATCHNORM_TEST_NAN_AT"
DEFAULT_TIMEOUT_S = 300.0


class DistributedSetupError(ValueError):
    """``--distributed`` without torchrun's environment, or a process group that cannot be joined."""


@dataclass
class Distributed:
    """This process's place in a data-parallel run (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    broadcast_buffers: bool = True
    nan_at: tuple[int, int] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[nn.Module, nn.Module]:
        """``(model, ddp)``: BN layers converted to SyncBatchNorm (sharing their tensors), model and
        ``optimizer`` state moved to the device, the model wrapped in DDP."""
        model = convert_sync(model).to(self.device)
        if optimizer is not None:
            for state in optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.dim() > 0:
                        state[key] = value.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (our buffers are equal at init anyway).
        parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        name = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
        options: dict[str, Any] = {name: self.broadcast_buffers}
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **options)
        return model, ddp

    def shard(self, indices: Tensor) -> Tensor:
        """This rank's contiguous slice of the global batch ``indices``."""
        return indices.tensor_split(self.world_size)[self.rank]

    def local_loss(self, logits: Tensor, labels: Tensor, global_batch: int, step: int) -> Tensor:
        """This slice's summed cross-entropy times ``K / B``: DDP's gradient average is the global mean's gradient."""
        loss = F.cross_entropy(logits, labels, reduction="sum") * (self.world_size / global_batch)
        if self.nan_at == (self.rank, step):
            loss = loss * float("nan")
        return loss

    def agree_step(self, loss: Tensor, global_batch: int, interrupted: bool) -> tuple[float, bool]:
        """One all-reduce: the global batch's mean loss and whether any rank asked to stop (Ctrl-C, SIGTERM)."""
        local_sum = float(loss.detach()) * global_batch / self.world_size
        packed = torch.tensor([local_sum, float(interrupted)], dtype=torch.float64, device=self.device)
        dist.all_reduce(packed)
        total, flags = packed.tolist()
        return total / global_batch, flags > 0

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (an all-reduce)."""
        packed = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        dist.all_reduce(packed)
        return bool(packed.item() > 0)

    def agreed(self, check: Callable[[], None], error: type[Exception], message: str) -> None:
        """Run ``check`` on every rank; if it raised ``error`` on any rank, raise it on all (``message`` elsewhere)."""
        caught: Exception | None = None
        try:
            check()
        except error as raised:
            caught = raised
        if self.any(caught is not None):
            raise caught if caught is not None else error(message)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _nan_hook(environ: Mapping[str, str]) -> tuple[int, int] | None:
    text = environ.get(NAN_HOOK_ENV)
    if not text:
        return None
    rank, _, step = text.partition(":")
    return int(rank), int(step)


def from_environment(
    environ: Mapping[str, str] | None = None, *, broadcast_buffers: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Distributed:
    """Join the process group torchrun describes in ``environ`` (default ``os.environ``).

    Raises:
        DistributedSetupError: a variable is missing or malformed (one line naming them and the torchrun command).
    """
    environ = os.environ if environ is None else environ
    missing = [name for name in ENV_VARS if not environ.get(name)]
    if missing:
        raise DistributedSetupError(
            f"--distributed needs torchrun's environment ({', '.join(missing)} not set): launch with "
            "torchrun --nproc-per-node K -m batchnorm train --distributed ..."
        )
    try:
        rank, world, local_rank = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise DistributedSetupError(
            "--distributed: RANK, WORLD_SIZE and LOCAL_RANK must be integers "
            f"(got {environ['RANK']!r}, {environ['WORLD_SIZE']!r}, {environ['LOCAL_RANK']!r})"
        ) from None
    if not (world >= 1 and 0 <= rank < world and local_rank >= 0):
        raise DistributedSetupError(f"--distributed: rank {rank} is not within a world of {world} processes")
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return Distributed(rank, world, local_rank, device, broadcast_buffers, _nan_hook(environ))
