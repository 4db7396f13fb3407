"""``batchnorm recalibrate CKPT``: precise BN statistics over the training split (:func:`batchnorm.recalibrate`).

Writes a checkpoint in the same format with only ``running_mean`` and
``running_var`` of the BN layers replaced (optimizer, sampler and step kept),
so ``explain --checkpoint``, ``fold`` and ``train --resume`` read it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from batchnorm.cli.argtypes import UsageError, positive_int, seed
from batchnorm.cli.fold import check_output_path, load_data_of
from batchnorm.deploy import recalibrate
from batchnorm.lab.data import split_validation
from batchnorm.lab.training import _atomic_save, evaluate, model_from_checkpoint

__all__ = ["configure_parser", "run"]


class _Batches:
    """``count`` shuffled full batches of ``size`` images (no leftover batch: BN in training needs 2 values)."""

    def __init__(self, images: Tensor, size: int, count: int, seed: int) -> None:
        self.images, self.size, self.count = images, size, count
        self.order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Tensor]:
        for index in range(self.count):
            yield self.images[self.order[index * self.size : (index + 1) * self.size]]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Recompute the population statistics of every BN layer of a trained network ('precise BN', Wu & "
        "Johnson 2021): run K shuffled batches of the training split through the network with its weights "
        "frozen and BN normalizing each batch with its own statistics, as in training, and set running_mean "
        "and running_var to the mean and unbiased variance pooled exactly over every value each layer saw "
        "(not a moving average). Writes a checkpoint in the same format (explain --checkpoint, fold and train "
        "--resume read it) and prints the test accuracy before and after."
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint written by `batchnorm train`")
    parser.add_argument(
        "--out",
        default=None,
        metavar="CKPT2",
        help="where to write the new checkpoint (default: CKPT's name with -recalibrated, in its folder)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="examples per batch (default: the checkpoint's training batch size); at least 2",
    )
    parser.add_argument(
        "--batches",
        type=positive_int,
        default=None,
        metavar="K",
        help="batches to pool (default: every full batch of one pass over the training split)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the shuffle (default %(default)s)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder (checkpoints of --data mnist)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out is not None else checkpoint.with_name(f"{checkpoint.stem}-recalibrated.pt")
    check_output_path(out, args.force)
    model, config, normalizer, payload = model_from_checkpoint(checkpoint)
    dataset = load_data_of(config, args.data_dir)
    # The training part only, when the run carved a validation split from the training split.
    if config.val_fraction > 0:
        dataset = split_validation(dataset, config.val_fraction)
    train_images = normalizer(dataset.train_images)
    test_images, test_labels = normalizer(dataset.test_images), dataset.test_labels
    size = args.batch_size if args.batch_size is not None else config.batch_size
    if size < 2:
        raise UsageError(f"--batch-size must be at least 2 (BN needs 2 values per statistic), got {size}")
    available = len(train_images) // size
    if available < 1:
        raise UsageError(f"--batch-size {size} is larger than the training split ({len(train_images)} examples)")
    count = args.batches if args.batches is not None else available
    if count > available:
        raise UsageError(
            f"--batches {count} is more than the {available} full batches of {size} in the training split "
            f"({len(train_images)} examples)"
        )
    _, accuracy_before = evaluate(model, test_images, test_labels)
    report = recalibrate(model, _Batches(train_images, size, count, args.seed), progress=not args.no_progress)
    _, accuracy_after = evaluate(model, test_images, test_labels)
    payload["model"] = model.state_dict()
    payload["recalibration"] = {
        "source": str(checkpoint),
        "batches": report.batches,
        "batch_size": size,
        "examples": report.examples,
        "seed": args.seed,
    }
    _atomic_save(payload, out)
    print(
        f"recalibrated {len(report.layers)} BN layer(s) over {report.batches} batches of {size} "
        f"({report.examples} training examples)"
    )
    for name, values in report.layers.items():
        print(f"  {name}: {values} values per statistic")
    for name, reason in report.skipped.items():
        print(f"  {name}: left as it was ({reason})")
    print(f"test accuracy: {accuracy_before:.4f} before, {accuracy_after:.4f} after")
    print(f"wrote {out}")
    return 0
