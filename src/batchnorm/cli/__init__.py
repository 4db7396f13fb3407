"""The ``batchnorm`` command line: one verb per task, each in its own module of this package.

Every verb module (``batchnorm.cli.compare``, ``.explain``, ``.train``,
``.bench``, ``.report``, ``.tune``) exposes ``configure_parser(parser)`` and
``run(args) -> int``: it turns the parsed options into plain arguments for the
library in :mod:`batchnorm.lab` and prints the outcome. This file only wires
the verbs, sets threads, and turns user errors into one line on stderr with
exit code 2 (no traceback). Only this package imports ``argparse``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from batchnorm.cli.argtypes import MAX_THREADS, UsageError, threads

__all__ = ["VERBS", "UsageError", "build_parser", "main"]

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "compare": ("batchnorm.cli.compare", "the main job: the same deep net with and without BN on real digits"),
    "explain": ("batchnorm.cli.explain", "per-layer table: which axes each BN layer reduces, shapes and live numbers"),
    "train": ("batchnorm.cli.train", "one training run from a model spec; checkpoints, resume, divergence guard"),
    "bench": ("batchnorm.cli.bench", "kernel and end-to-end benchmarks, ours against torch's batch norm, side by side"),
    "report": ("batchnorm.cli.report", "rebuild report.html from a run folder"),
    "tune": ("batchnorm.cli.tune", "grid search (Optuna) over lr, momentum, weight decay, ... then the full run"),
    "fold": ("batchnorm.cli.fold", "fold BN into the layers before it; check and save a self-contained program"),
    "recalibrate": ("batchnorm.cli.recalibrate", "precise BN: recompute running statistics over the training split"),
    "experiment": ("batchnorm.cli.experiment", "named experiments: lr-sweep, small-batch, eval-stats (--seeds K)"),
}

THREADS_HELP = (
    "CPU threads for torch (default 1: on small networks one thread is as fast as two and does not "
    "collapse when another process is busy; OpenMP spin-waiting made 2-thread steps 4-200x slower under "
    "contention). Also read from BATCHNORM_THREADS."
)


def _default_threads() -> int:
    value = os.environ.get("BATCHNORM_THREADS", "1")
    try:
        count = int(value)
    except ValueError:
        raise UsageError(f"BATCHNORM_THREADS must be an integer from 1 to {MAX_THREADS}, got {value!r}") from None
    if not 1 <= count <= MAX_THREADS:
        raise UsageError(f"BATCHNORM_THREADS must be an integer from 1 to {MAX_THREADS}, got {value!r}")
    return count


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line message (argparse's default prints usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from batchnorm import __version__

    parser = _Parser(
        prog="batchnorm",
        description=(
            "Batch normalization in deep networks: how each BN layer computes its mean and variance, "
            "and what that does to training. Start with `batchnorm compare` (the main job) or "
            "`batchnorm explain`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb, (module_name, help_text) in VERBS.items():
        sub = subparsers.add_parser(verb, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        sub.add_argument("--threads", type=threads, default=None, help=THREADS_HELP)
        module = importlib.import_module(module_name)
        module.configure_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``batchnorm`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Torch's thread count and denormal flushing are set for the run and put
    back afterwards, so calling ``main`` in-process leaves no trace.
    """
    import torch

    threads_before = torch.get_num_threads()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        # The command as typed (for "resume with: ..." after Ctrl-C).
        args.command_line = list(argv) if argv is not None else sys.argv[1:]
        if args.verb is None:
            parser.print_help()
            return 2
        torch.set_num_threads(args.threads if args.threads is not None else _default_threads())
        # Saturated sigmoid networks produce denormals that slow CPU math by orders of magnitude.
        torch.set_flush_denormal(True)
        module = importlib.import_module(VERBS[args.verb][0])
        return int(module.run(args))
    except SystemExit as exit_request:  # argparse: --help, --version, usage errors
        return exit_request.code if isinstance(exit_request.code, int) else 2
    except (UsageError, ValueError) as error:
        if os.environ.get("BATCHNORM_DEBUG"):
            raise
        sys.stderr.write(f"batchnorm: error: {error}\n")
        return 2
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as interrupt:
        # Verbs that can say where the work is and how to resume raise KeyboardInterrupt with that message.
        sys.stderr.write(f"batchnorm: {interrupt}\n" if str(interrupt) else "batchnorm: interrupted\n")
        return 130
    finally:
        torch.set_num_threads(threads_before)
        torch.set_flush_denormal(False)
