"""``batchnorm bench``: kernel and end-to-end benchmarks (see :mod:`batchnorm.lab.bench`).

:func:`main` is the same command without the verb (``python
benchmarks/bench_kernels.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from batchnorm.cli.argtypes import (
    argument_type,
    check_output_dir,
    comma_separated,
    device,
    memory_limit_bytes,
    output_dir,
    output_file,
    positive_int,
    threads,
)
from batchnorm.lab import bench, bench_distributed
from batchnorm.lab.bench import (
    OPERATIONS,
    BenchOptions,
    Case,
    parse_case,
    parse_dtype,
    parse_kernel,
    parse_operation,
)

__all__ = ["configure_parser", "main", "parse_shape", "run"]

MAX_BLOCK_MS = 60_000.0
# Bytes per element a case may hold at once: input, output, gradients and saved statistics in float64.
BYTES_PER_ELEMENT = 8 * 8


def parse_shape(text: str) -> Case:
    """A ``--shapes`` case (:func:`batchnorm.lab.bench.parse_case`) whose tensors fit in memory (``ValueError``)."""
    case = parse_case(text)
    elements = math.prod(case.shape)
    needed, limit = elements * BYTES_PER_ELEMENT, memory_limit_bytes()
    if needed > limit:
        raise ValueError(
            f"{text!r} has {elements:.3g} elements: about {needed / 2**30:.1f} GiB of tensors, more than half of "
            f"this machine's memory ({limit / 2**30:.1f} GiB)"
        )
    return case


def _block_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_BLOCK_MS:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds > 0 and <= {MAX_BLOCK_MS:g}, got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (the CLI adds ``--threads``)."""
    parser.add_argument(
        "--quick", action="store_true", help="float32 only, fewer and shorter repeats: about a minute once compiled"
    )
    parser.add_argument(
        "--shapes",
        type=comma_separated(argument_type(parse_shape)),
        default=None,
        help="comma-separated cases LAYOUT:AxBx... (layouts: dense, nchw, channels-last, sequence) or suite "
        "shapes; default: the whole suite",
    )
    parser.add_argument(
        "--dtype",
        type=comma_separated(argument_type(parse_dtype)),
        default=None,
        help="comma-separated dtypes (float32, bfloat16, float16, float64); default float32,bfloat16 "
        "(float32 with --quick)",
    )
    parser.add_argument(
        "--kernel",
        type=comma_separated(argument_type(parse_kernel)),
        default=["auto"],
        help="our kernel settings to time, comma-separated among auto, native, torch, exact (default auto)",
    )
    parser.add_argument(
        "--operations",
        type=comma_separated(argument_type(parse_operation)),
        default=list(OPERATIONS),
        help=f"comma-separated among {', '.join(OPERATIONS)} (default all)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="interleaved repeats per timing (default 9, 5 with --quick)"
    )
    parser.add_argument(
        "--block-ms",
        type=_block_ms,
        default=None,
        help="target duration of one timed block in ms (default 20, 8 with --quick)",
    )
    parser.add_argument(
        "--device",
        type=device,
        default="cpu",
        metavar="DEVICE",
        help="where the tensors live: cpu (default, unlike the training verbs: a benchmark's numbers should not "
        "change hardware by themselves), auto (CUDA when torch.cuda.is_available(), else cpu), cuda or cuda:N; "
        "a GPU that is not there is an error before any timing",
    )
    parser.add_argument(
        "--explain", action="store_true", help="print which kernel path is chosen for every case, then time"
    )
    parser.add_argument("--explain-only", action="store_true", help="print the kernel choices and stop")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="time training steps of a BN CNN in 2 processes (gloo) with our SyncBatchNorm, local BN and torch's "
        "SyncBatchNorm, and count collectives per BN call (writes bench_distributed.json); then stop",
    )
    parser.add_argument(
        "--end-to-end", action="store_true", help="also time training steps of the paper MLP and a small CNN"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="end-to-end steps per timed block (default 20)"
    )
    parser.add_argument(
        "--out", type=output_dir, default=None, help="folder for bench.json, created if missing (default runs/bench)"
    )
    parser.add_argument(
        "--json",
        type=output_file,
        default=None,
        help="write the results here instead of OUT/bench.json (its folder must exist; checked before timing)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`configure_parser`); return the exit code."""
    threads = getattr(args, "threads", None)
    if threads is None:  # the CLI's default: $BATCHNORM_THREADS, else 1
        value = os.environ.get("BATCHNORM_THREADS", "1")
        threads = int(value) if value.isdigit() and int(value) > 0 else 1
    out = Path(args.out) if args.out is not None else Path("runs/bench")
    if args.json is None and not args.explain_only:
        check_output_dir(out)  # the default folder: checked before timing, like --out and --json
    torch.set_num_threads(threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("batchnorm bench: error: --device cuda, but torch.cuda.is_available() is False\n")
        return 2
    if args.distributed:
        bench_distributed.run(
            bench_distributed.DistributedOptions(
                steps=args.steps or (5 if args.quick else 10),
                repeats=args.repeats or (3 if args.quick else 5),
                threads=threads,
                out=out,
                json_path=args.json,
            )
        )
        return 0
    options = BenchOptions(
        quick=args.quick,
        shapes=args.shapes,
        dtype=args.dtype,
        kernel=args.kernel,
        operations=args.operations,
        repeats=args.repeats,
        block_ms=args.block_ms,
        device=args.device,
        explain=args.explain,
        explain_only=args.explain_only,
        end_to_end=args.end_to_end,
        steps=args.steps,
        out=out,
        json_path=args.json,
    )
    bench.run(options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python benchmarks/bench_kernels.py``): the ``bench`` options plus ``--threads``."""
    parser = argparse.ArgumentParser(
        prog="bench_kernels", description=bench.__doc__.split("\n\n")[0] if bench.__doc__ else None
    )
    parser.add_argument("--threads", type=threads, default=None, help="CPU threads for torch, 1 to 1024 (default 1)")
    configure_parser(parser)
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    return run(args)
