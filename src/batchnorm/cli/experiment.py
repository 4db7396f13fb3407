"""``batchnorm experiment NAME``: the named experiments of :mod:`batchnorm.lab.studies`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from batchnorm.cli.argtypes import (
    UsageError,
    comma_separated,
    fraction,
    learning_rate,
    output_dir,
    positive_int,
    seed,
    seed_count,
)
from batchnorm.cli.compare import same_command
from batchnorm.lab.data import DATASETS
from batchnorm.lab.models import NORMS
from batchnorm.lab.studies import EXPERIMENTS, format_table, run_experiment

__all__ = ["configure_parser", "run"]


def _norm(text: str) -> str:
    if text not in NORMS:
        raise argparse.ArgumentTypeError(f"unknown norm {text!r}: expected some of {', '.join(NORMS)}")
    return text


def _threshold(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 and < 1, got {text!r}") from None
    if not (0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 and < 1, got {text!r}")
    return value


# option dest -> (experiments that take it, config field)
SPECIFIC: dict[str, tuple[tuple[str, ...], str]] = {
    "lrs": (("lr-sweep",), "lrs"),
    "threshold": (("lr-sweep",), "threshold"),
    "steps": (("lr-sweep", "eval-stats"), "steps"),
    "eval_every": (("lr-sweep", "eval-stats"), "eval_every"),
    "batch_sizes": (("small-batch", "eval-stats"), "batch_sizes"),
    "norms": (("small-batch",), "norms"),
    "epochs": (("small-batch",), "epochs"),
    "checkpoints": (("eval-stats",), "checkpoints"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    lr, sb, es = (EXPERIMENTS[name].defaults for name in ("lr-sweep", "small-batch", "eval-stats"))
    parser.description = (
        "Named experiments on real digits (mnist5k), each writing results.json, PNG figures and report.html into "
        "--out, each under 5 minutes with its defaults on a 2-core CPU. Every configuration runs --seeds K seeds; "
        "tables and figures give mean, sample std and min-max. Choices (learning rate, checkpoint, statistics) "
        "use a validation split carved from the training split; the test split is evaluated once per final model. "
        + " ".join(f"{name}: {experiment.summary}." for name, experiment in EXPERIMENTS.items())
    )
    parser.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME", help=", ".join(EXPERIMENTS))
    parser.add_argument(
        "--seeds",
        type=seed_count,
        default=None,
        help=f"seeds per configuration (defaults: lr-sweep {lr.seeds}, small-batch {sb.seeds}, eval-stats {es.seeds})",
    )
    parser.add_argument("--seed", type=seed, default=0, help="first seed (seeds SEED..SEED+K-1; default %(default)s)")
    parser.add_argument("--out", type=output_dir, default=None, help="output folder (default runs/experiment-NAME)")
    parser.add_argument("--data", choices=DATASETS, default="mnist5k", help="dataset (default %(default)s)")
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=None,
        help=f"share of each class of the training split held out for selection (default {lr.val_fraction})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    group = parser.add_argument_group("experiment settings (each applies only to the experiments named)")
    group.add_argument(
        "--lrs",
        type=comma_separated(learning_rate),
        default=None,
        help=f"lr-sweep: learning rates (default {','.join(f'{v:g}' for v in lr.lrs)})",
    )
    group.add_argument(
        "--threshold",
        type=_threshold,
        default=None,
        help=f"lr-sweep: validation accuracy a stable run must exceed (default {lr.threshold})",
    )
    group.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"lr-sweep, eval-stats: SGD steps per run (defaults {lr.steps}, {es.steps})",
    )
    group.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help=f"lr-sweep, eval-stats: validation interval (defaults {lr.eval_every}, {es.eval_every})",
    )
    group.add_argument(
        "--batch-sizes",
        type=comma_separated(positive_int),
        default=None,
        help="small-batch, eval-stats: batch sizes (defaults "
        f"{','.join(str(s) for s in sb.batch_sizes)}; {','.join(str(s) for s in es.batch_sizes)})",
    )
    group.add_argument(
        "--norms",
        type=comma_separated(_norm),
        default=None,
        help=f"small-batch: normalizations (default {','.join(sb.norms)})",
    )
    group.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"small-batch: passes over the training part at every batch size (default {sb.epochs})",
    )
    group.add_argument(
        "--checkpoints",
        type=positive_int,
        default=None,
        help=f"eval-stats: last checkpoints kept per run (default {es.checkpoints})",
    )


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"data": args.data, "seed": args.seed}
    if args.seeds is not None:
        settings["seeds"] = args.seeds
    if args.val_fraction is not None:
        if args.val_fraction == 0:
            raise UsageError("--val-fraction must be > 0: the experiments select on the validation split")
        settings["val_fraction"] = args.val_fraction
    for dest, (names, field) in SPECIFIC.items():
        value = getattr(args, dest)
        if value is None:
            continue
        option = "--" + dest.replace("_", "-")
        if args.name not in names:
            raise UsageError(f"{option} applies to {' and '.join(names)}, not to {args.name}")
        if isinstance(value, list):
            if not value:
                raise UsageError(f"{option} needs at least one value")
            value = tuple(value)
        settings[field] = value
    return settings


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    out = Path(args.out if args.out is not None else f"runs/experiment-{args.name}")
    started = time.perf_counter()
    try:
        results = run_experiment(args.name, out, progress=not args.no_progress, **settings)
    except KeyboardInterrupt:
        # The experiments keep their runs in memory (no checkpoints): the same command starts them over.
        raise KeyboardInterrupt(
            f"interrupted; experiment {args.name} keeps no partial runs, so the same command starts it over: "
            f"{same_command(args)}"
        ) from None
    print(
        f"{args.name}: {results['model']}, seeds {', '.join(str(s) for s in results['seeds'])}; "
        f"data: {results['dataset']}"
    )
    print(format_table(results))
    print()
    for line in results["findings"]:
        print(f"- {line}")
    print(f"\nwrote {out / 'results.json'}, figures and {out / 'report.html'} in {time.perf_counter() - started:.0f} s")
    return 0
