"""``batchnorm compare``: the main job, the same deep net with and without BN (see :mod:`batchnorm.lab.experiments`)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from batchnorm.cli.argtypes import output_dir, seed_count
from batchnorm.cli.options import (
    add_data_arguments,
    add_device_argument,
    add_model_arguments,
    add_optimizer_arguments,
    add_validation_argument,
    config_from_args,
)
from batchnorm.lab.data import load_dataset
from batchnorm.lab.experiments import COMPARE_DEFAULTS, compare
from batchnorm.lab.explain import format_table
from batchnorm.lab.report import format_summary
from batchnorm.lab.training import TrainingInterrupted

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = COMPARE_DEFAULTS
    parser.description = (
        "The main job: Ioffe & Szegedy's MNIST experiment. The same 784-100-100-100-10 sigmoid network is trained "
        "with BN before each nonlinearity and without BN, from the same small Gaussian init, seed and batches of "
        "60. Prints the per-layer BN explanation and a comparison table; writes results.json, PNG figures and "
        "report.html into --out. --steps 50000 runs the paper's length. Runs on one CPU thread unless --threads "
        "says otherwise. --norm picks the normalized arm (default batch; e.g. group compares GroupNorm with no "
        "normalization). --seeds K trains each arm with K seeds and reports mean, std and min-max. A rerun into "
        "the same --out reuses every finished run with identical settings and continues an interrupted one from its "
        "checkpoint (Ctrl-C prints the command), ending as an uninterrupted compare would."
    )
    add_model_arguments(parser, defaults)
    add_data_arguments(parser, defaults)
    add_optimizer_arguments(parser, defaults)
    add_validation_argument(parser, defaults)
    add_device_argument(
        parser, "; both arms train there, recorded in results.json (finished runs are reused on any device)"
    )
    parser.add_argument(
        "--seeds",
        type=seed_count,
        default=1,
        help="seeds per arm, 1 to 1000 (seed, seed+1, ...: init and batch order); K > 1 reports mean, sample std "
        "and min-max in the table, results.json and the accuracy figure (default %(default)s)",
    )
    parser.set_defaults(init=defaults.init, input_norm=defaults.input_norm, lr=defaults.lr, momentum=defaults.momentum)
    parser.add_argument(
        "--out", type=output_dir, default="runs/compare", help="output folder, created if missing (default %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def same_command(args: argparse.Namespace) -> str:
    """The command as typed (``batchnorm VERB ...``), to run again after an interruption."""
    command_line = getattr(args, "command_line", None)
    return shlex.join(["batchnorm", *command_line]) if command_line else f"batchnorm {args.verb} (the same options)"


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, COMPARE_DEFAULTS)
    if args.download:
        load_dataset(config.data, config.data_dir, download=True)
    started = time.perf_counter()
    try:
        results = compare(config, args.out, seeds=args.seeds, progress=not args.no_progress, device=args.device)
    except TrainingInterrupted as interrupt:
        raise KeyboardInterrupt(
            f"interrupted in the {interrupt.run} run at step {interrupt.step}; last checkpoint "
            f"{interrupt.checkpoint} (step {interrupt.checkpoint_step}); finished runs are kept in {args.out}; "
            f"resume with the same command: {same_command(args)}"
        ) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted; finished runs and checkpoints are kept in {args.out}; "
            f"resume with the same command: {same_command(args)}"
        ) from None
    if results["explain"]:
        print("What each BN layer computes (trained BN network, one training batch):")
        print(format_table(results["explain"]))
        print()
    print(
        f"{config.model}, {config.act}, init {config.init}, batch {config.batch_size}, lr {config.lr}, "
        f"momentum {config.momentum}, {config.steps} steps, seeds {', '.join(str(s) for s in results['seeds'])}, "
        f"on {results['device']}; "
        f"data: {results['dataset']}; validation split: {results['validation']}"
    )
    if results["reused_runs"]:
        print(f"(reused {results['reused_runs']} finished runs from {args.out}; delete it to train them again)")
    print(format_summary(results))
    out = Path(args.out)
    print(f"\nwrote {out / 'results.json'} and {out / 'report.html'} in {time.perf_counter() - started:.0f} s")
    for label in ("bn", "no_bn"):
        for record in results["seed_runs"][label]:
            if record.get("diverged"):
                sys.stderr.write(f"batchnorm: the {label} run (seed {record['seed']}) diverged: {record['diverged']}\n")
    return 0
