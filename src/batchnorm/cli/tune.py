"""``batchnorm tune``: grid search with Optuna, then the full run (see :mod:`batchnorm.lab.tune`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from batchnorm.cli.argtypes import output_dir, positive_int, storage_url
from batchnorm.cli.compare import same_command
from batchnorm.cli.options import (
    add_data_arguments,
    add_device_argument,
    add_model_arguments,
    add_optimizer_arguments,
    add_validation_argument,
    config_from_args,
)
from batchnorm.lab.data import load_dataset
from batchnorm.lab.training import EXIT_DIVERGED, TrainConfig, TrainingInterrupted
from batchnorm.lab.tune import (
    DEFAULT_TRIAL_STEPS,
    FINISHED_STATES,
    GRACE_SECONDS,
    GRID_OPTIONS,
    HEARTBEAT_SECONDS,
    TuneInterrupted,
    WorkerError,
    format_params,
    format_table,
    option_name,
    parse_grid,
    results_table,
    safe_url,
    tune,
)

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    options = ", ".join(option_name(name) for name in GRID_OPTIONS)
    parser.description = (
        "Grid search with Optuna's grid sampler: one short run (--trial-steps) per grid point, then the full run "
        "(--steps) with the setting of highest accuracy on the validation split (--val-fraction of each class, "
        "held out of the training split; trials never see the test split, and the full run reports it once). "
        "The study lives in SQLite (--out/study.db) or --storage; running the same command again resumes "
        "without repeating finished points (Ctrl-C prints the command; a trial cut short starts again, the full "
        "run continues from its checkpoint). Runs stopped by the divergence guard are recorded as diverged. "
        "Writes tune.json, heatmaps and report.html into --out. The options below set every trial's base "
        "values; --grid overrides them."
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help=f"values of one option to search (repeat for more options); NAME is one of {options}",
    )
    parser.add_argument(
        "--trial-steps",
        type=positive_int,
        default=DEFAULT_TRIAL_STEPS,
        help="SGD steps of each grid trial (default %(default)s)",
    )
    add_model_arguments(parser, defaults)
    add_data_arguments(parser, defaults)
    add_optimizer_arguments(parser, defaults)
    add_validation_argument(parser, defaults)
    add_device_argument(
        parser,
        "; every trial (in every --jobs worker) and the full run train there; the study does not record it, so "
        "machines with and without a GPU can share one --storage",
    )
    # argparse has no public way to reword an option another module added.
    steps_option = parser._option_string_actions["--steps"]
    steps_option.help = f"SGD steps of the full run with the best setting (default {defaults.steps})"
    parser.add_argument("--no-final", action="store_true", help="skip the full run with the best setting")
    parser.add_argument(
        "--out", type=output_dir, default="runs/tune", help="output folder, created if missing (default %(default)s)"
    )
    parser.add_argument(
        "--jobs", type=positive_int, default=1, help="worker processes, one trial each at a time (default 1)"
    )
    parser.add_argument(
        "--storage",
        type=storage_url,
        default=None,
        metavar="URL",
        help="Optuna database URL shared by several machines: run the same command with "
        "--storage postgresql://USER:PASSWORD@HOST:PORT/DB on each (pip install 'batchnorm[postgres]'); "
        "default sqlite:///OUT/study.db",
    )
    parser.add_argument(
        "--heartbeat",
        type=positive_int,
        default=HEARTBEAT_SECONDS,
        metavar="SECONDS",
        help="seconds between a running trial's heartbeats in the storage (default %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=positive_int,
        default=GRACE_SECONDS,
        metavar="SECONDS",
        help="seconds without a heartbeat after which a worker counts as dead (killed, machine down) and its "
        "trial is trained again by another worker or the next run (default %(default)s)",
    )
    parser.add_argument("--study-name", default=None, help="study name (default: derived from grid and settings)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    grid = parse_grid(args.grid)
    final = config_from_args(args, TrainConfig())
    base = dataclasses.replace(final, steps=args.trial_steps)
    if args.download:
        load_dataset(base.data, base.data_dir, download=True)
    started = time.perf_counter()
    try:
        results = tune(
            grid,
            base,
            args.out,
            final_steps=None if args.no_final else final.steps,
            storage=args.storage,
            study_name=args.study_name,
            jobs=args.jobs,
            threads=torch.get_num_threads(),
            progress=not args.no_progress,
            heartbeat=args.heartbeat,
            grace=args.grace,
            device=args.device,
        )
    except WorkerError as error:  # failed workers (each printed its own error); the study keeps what finished
        sys.stderr.write(f"batchnorm: {error}; run the same command again to resume\n")
        return 1
    except KeyboardInterrupt as interrupt:
        study = safe_url(args.storage) if args.storage else str(Path(args.out) / "study.db")
        if isinstance(interrupt, TrainingInterrupted):  # in the full run, which saved its checkpoint
            where = (
                f"interrupted in the full run at step {interrupt.step}; last checkpoint {interrupt.checkpoint} "
                f"(step {interrupt.checkpoint_step}); the grid search is finished and kept in {study}"
            )
        elif isinstance(interrupt, TuneInterrupted):
            where = f"{interrupt}; finished trials are kept in {study}"
        else:
            where = f"interrupted; finished trials are kept in {study}"
        raise KeyboardInterrupt(f"{where}; resume with the same command: {same_command(args)}") from None
    records = results["trials"]
    best_number = results["best_trial"]["number"] if results["best_trial"] else None
    print(
        f"{base.model}, {base.act}, {base.data}, {base.steps} steps per trial on {results['device']} "
        f"(study {results['study']})"
    )
    print(format_table(results_table(records), grid, best_number))
    retried = sum(1 for r in records if r["state"] not in FINISHED_STATES)
    if retried:
        print(f"({retried} other attempts: interrupted, failed or duplicate trials, retried or superseded)")
    out = Path(args.out)
    if results["unfinished"]:
        sys.stderr.write(
            f"batchnorm: {len(results['unfinished'])} grid points are unfinished (still running elsewhere?); "
            "run the same command again\n"
        )
        return 1
    if results["best"] is None:
        sys.stderr.write("batchnorm: every trial diverged; no setting to train fully\n")
        return EXIT_DIVERGED
    print(f"best: {format_params(results['best'])} (validation accuracy {results['best_trial']['value']:.4f})")
    final_record = results["final"]
    if final_record is not None:
        if final_record["state"] == "diverged":
            sys.stderr.write(f"batchnorm: the full run diverged: {final_record['message']}\n")
            return EXIT_DIVERGED
        validation = final_record.get("val_accuracy")
        print(
            f"full run: {final_record['steps']} steps, validation accuracy "
            f"{validation if validation is None else format(validation, '.4f')}, test accuracy (reported once) "
            f"{final_record['test_accuracy']:.4f}, test loss {final_record['test_loss']:.4f}; "
            f"checkpoint {final_record['checkpoint']}"
        )
    print(
        f"wrote {out / 'tune.json'}, {len(results['heatmaps'])} heatmaps and {out / 'report.html'} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return 0
