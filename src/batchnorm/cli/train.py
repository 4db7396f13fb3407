"""``batchnorm train``: one training run (see :mod:`batchnorm.lab.training`)."""

from __future__ import annotations

import argparse
import sys

from batchnorm.cli.argtypes import UsageError, output_dir, positive_int
from batchnorm.cli.options import (
    add_data_arguments,
    add_model_arguments,
    add_optimizer_arguments,
    add_validation_argument,
    config_from_args,
    requested_model,
)
from batchnorm.lab.data import load_dataset
from batchnorm.lab.report import write_train_report
from batchnorm.lab.training import (
    EXIT_DIVERGED,
    DivergenceError,
    TrainConfig,
    config_from_checkpoint,
    load_checkpoint,
    train,
)

__all__ = ["configure_parser", "run"]

THREADS_NOTE = "Runs on one CPU thread unless --threads says otherwise."


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.description = (
        "Train one network with SGD. Writes metrics.jsonl and checkpoint.pt (atomic) into --out; --resume "
        "continues a run exactly. A divergence guard stops a run whose loss or weights blow up (exit code 3), "
        "keeping the last good checkpoint. A validation split (--val-fraction of each class) is held out of the "
        "training split and reported at every evaluation next to the test split. " + THREADS_NOTE
    )
    add_model_arguments(parser, defaults)
    add_data_arguments(parser, defaults)
    add_optimizer_arguments(parser, defaults)
    add_validation_argument(parser, defaults)
    parser.add_argument(
        "--checkpoint-every", type=positive_int, default=defaults.checkpoint_every, help="checkpoint interval"
    )
    parser.add_argument(
        "--out", type=output_dir, default="runs/train", help="output folder, created if missing (default %(default)s)"
    )
    parser.add_argument("--resume", default=None, metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, TrainConfig())
        if args.download:
            load_dataset(config.data, config.data_dir, download=True)
        if args.resume is not None and args.steps is None:
            config.steps = config_from_checkpoint(load_checkpoint(args.resume)).steps
        result = train(
            config,
            args.out,
            resume=args.resume,
            requested_model=requested_model(args),
            progress=not args.no_progress,
        )
    except DivergenceError as error:
        sys.stderr.write(f"batchnorm: {error}\n")
        return EXIT_DIVERGED
    except ValueError as error:
        raise UsageError(str(error)) from None
    validation = (
        f"validation accuracy {result.final_val_accuracy:.4f}, " if result.val_accuracy else "no validation split, "
    )
    test = f"test accuracy {result.final_accuracy:.4f}" if result.test_accuracy else "test split not evaluated"
    print(
        f"done: {result.final_step} steps in {result.seconds:.1f} s, {validation}{test}; checkpoint {result.checkpoint}"
    )
    print(f"report {write_train_report(args.out)} (loss and accuracy in train.png)")
    return 0
