"""``batchnorm train``: one training run (see :mod:`batchnorm.lab.training`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from batchnorm.cli.argtypes import UsageError, output_dir, positive_int
from batchnorm.cli.options import (
    add_data_arguments,
    add_device_argument,
    add_model_arguments,
    add_optimizer_arguments,
    add_validation_argument,
    config_from_args,
    requested_model,
)
from batchnorm.lab.data import load_dataset
from batchnorm.lab.distributed import Distributed, from_environment
from batchnorm.lab.report import write_train_report
from batchnorm.lab.training import (
    EXIT_DIVERGED,
    CheckpointError,
    DivergenceError,
    TrainConfig,
    TrainingInterrupted,
    check_same_model,
    config_from_checkpoint,
    load_checkpoint,
    resolve_device,
    resume_changes,
    train,
)

__all__ = ["configure_parser", "run"]

THREADS_NOTE = "Runs on one CPU thread unless --threads says otherwise."


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.description = (
        "Train one network with SGD. Writes metrics.jsonl and checkpoint.pt (atomic) into --out; --resume "
        "continues a run exactly (Ctrl-C saves a checkpoint and prints the command that resumes). On --resume, "
        "a changed --lr, --momentum, --weight-decay, --eval-every, --checkpoint-every or --no-guard is applied "
        "and announced; options that change the data, batches or network are refused. A divergence guard stops "
        "a run whose loss or weights blow up (exit code 3), keeping the last good checkpoint and its metrics. "
        "A validation split (--val-fraction of each class) is held out of the "
        "training split and reported at every evaluation next to the test split. --device puts the network and "
        "the data on the GPU or the CPU (recorded in metrics.jsonl and the checkpoint); a checkpoint resumes on "
        "any device. " + THREADS_NOTE
    )
    add_model_arguments(parser, defaults)
    add_data_arguments(parser, defaults)
    add_optimizer_arguments(parser, defaults)
    add_validation_argument(parser, defaults)
    add_device_argument(
        parser,
        "; a resumed run may use another device than the checkpoint's; with --distributed each rank uses its own "
        "(cuda:LOCAL_RANK with NCCL, else cpu)",
    )
    parser.add_argument(
        "--checkpoint-every", type=positive_int, default=defaults.checkpoint_every, help="checkpoint interval"
    )
    parser.add_argument(
        "--out", type=output_dir, default="runs/train", help="output folder, created if missing (default %(default)s)"
    )
    parser.add_argument("--resume", default=None, metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parallel = parser.add_argument_group("data-parallel training (batchnorm.lab.distributed)")
    parallel.add_argument(
        "--distributed",
        action="store_true",
        help="one of the processes started by torchrun --nproc-per-node K -m batchnorm train --distributed ...: "
        "BN synchronized over the global batch (--batch-size is the global batch, sliced over the K ranks), DDP; "
        "rank 0 alone evaluates, prints and writes --out; equals the one-process run with the same --batch-size",
    )
    parallel.add_argument(
        "--no-broadcast-buffers",
        action="store_true",
        help="with --distributed: DDP does not broadcast rank 0's buffers before each forward (SyncBatchNorm "
        "keeps the running statistics equal on every rank anyway)",
    )


# option dest -> TrainConfig field, for the options a resumed run compares with its checkpoint
# (model, act, norm and placement are checked by check_same_model).
RESUME_COMPARED = {
    "init": "init",
    "data": "data",
    "data_dir": "data_dir",
    "input_norm": "input_norm",
    "lr": "lr",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "batch_size": "batch_size",
    "eval_every": "eval_every",
    "seed": "seed",
    "no_guard": "guard",
    "checkpoint_every": "checkpoint_every",
    "val_fraction": "val_fraction",
    "groups": "groups",
    "virtual_batch_size": "virtual_batch_size",
    "rmax": "rmax",
    "dmax": "dmax",
    "renorm_warmup": "renorm_warmup",
}


def _explicit_options(args: argparse.Namespace) -> set[str]:
    """The option dests typed on the command line (parsed again with every default suppressed)."""
    command_line = getattr(args, "command_line", None)
    if not command_line or "train" not in command_line:
        return set()
    parser = argparse.ArgumentParser(add_help=False)
    configure_parser(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(command_line[command_line.index("train") + 1 :])
    return set(vars(given))


def _resume_overrides(args: argparse.Namespace, config: TrainConfig) -> dict[str, Any]:
    explicit = _explicit_options(args)
    return {field: getattr(config, field) for dest, field in RESUME_COMPARED.items() if dest in explicit}


def _command(*words: str | Path, program: tuple[str, ...] = ("batchnorm",)) -> str:
    return shlex.join([*program, *(str(word) for word in words)])


def _launcher(distributed: Distributed | None) -> tuple[str, ...]:
    if distributed is None:
        return ("batchnorm",)
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(distributed.world_size))
    return ("torchrun", "--nproc-per-node", per_node, "-m", "batchnorm")


def _interrupted(interrupt: KeyboardInterrupt, out: Path, distributed: Distributed | None = None) -> KeyboardInterrupt:
    """The one-line message for Ctrl-C: where the last checkpoint is and the command that resumes."""
    checkpoint = out / "checkpoint.pt"
    flags = ("--distributed",) if distributed is not None else ()
    resume = _command("train", *flags, "--resume", checkpoint, "--out", out, program=_launcher(distributed))
    if isinstance(interrupt, TrainingInterrupted) and interrupt.checkpoint is not None:
        return KeyboardInterrupt(f"{interrupt}; resume with: {resume}")
    try:
        step = int(load_checkpoint(checkpoint)["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return KeyboardInterrupt(f"interrupted before training started; no checkpoint in {out}")
    return KeyboardInterrupt(
        f"interrupted before training started; last checkpoint {checkpoint} (step {step}); resume with: {resume}"
    )


def _accuracies(validation: list[float], test: list[float]) -> str:
    shown = f"validation accuracy {validation[-1]:.4f}, " if validation else "no validation split, "
    return shown + (f"test accuracy {test[-1]:.4f}" if test else "test split not evaluated")


def run(args: argparse.Namespace) -> int:
    distributed: Distributed | None = None
    try:
        if args.distributed:
            distributed = from_environment(broadcast_buffers=not args.no_broadcast_buffers)
        elif args.no_broadcast_buffers:
            raise UsageError("--no-broadcast-buffers needs --distributed")
        return _run(args, distributed)
    finally:
        if distributed is not None:
            distributed.close()


def _run(args: argparse.Namespace, distributed: Distributed | None) -> int:
    out = Path(args.out)
    quiet = distributed is not None and not distributed.is_main  # ranks other than 0 print and write nothing
    try:
        config = config_from_args(args, TrainConfig())
        if args.download:
            load_dataset(config.data, config.data_dir, download=True)
        overrides: dict[str, Any] = {}
        if args.resume is not None:
            payload = load_checkpoint(args.resume)
            stored = config_from_checkpoint(payload)
            if args.steps is None:
                config.steps = stored.steps
            check_same_model(requested_model(args), stored, args.resume)
            overrides = _resume_overrides(args, config)
            _, notes = resume_changes(dataclasses.replace(stored, steps=config.steps), overrides)
            written_on = payload.get("device")
            here = str(distributed.device if distributed is not None else resolve_device(args.device))
            if isinstance(written_on, str) and written_on != here:
                notes.append(f"resuming on {here} (checkpoint written on {written_on})")
            for note in notes if not quiet else ():
                print(note, flush=True)
        result = train(
            config,
            args.out,
            resume=args.resume,
            requested_model=requested_model(args),
            progress=not args.no_progress,
            overrides=overrides,
            distributed=distributed,
            device=args.device,
        )
    except DivergenceError as error:
        if not quiet:
            sys.stderr.write(f"batchnorm: {error}\n")
        return EXIT_DIVERGED
    except ValueError as error:
        raise UsageError(str(error)) from None
    except KeyboardInterrupt as interrupt:
        if quiet:
            return 130
        raise _interrupted(interrupt, out, distributed) from None
    if quiet:
        return 0
    if result.nothing_to_do:
        further = f" (--steps {config.steps} is not beyond it)" if config.steps != result.final_step else ""
        print(
            f"nothing to do: run finished at step {result.final_step}{further}; "
            f"{_accuracies(result.val_accuracy, result.test_accuracy)}; checkpoint {result.checkpoint}; "
            f"give --steps above {result.final_step} to train further"
        )
        return 0
    print(
        f"done: {result.final_step} steps in {result.seconds:.1f} s on {result.device}, "
        f"{_accuracies(result.val_accuracy, result.test_accuracy)}; checkpoint {result.checkpoint}"
    )
    print(f"report {write_train_report(args.out)} (loss and accuracy in train.png)")
    return 0
