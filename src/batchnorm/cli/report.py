"""``batchnorm report``: rebuild the figures and report.html of a ``compare`` run (see :mod:`batchnorm.lab.report`)."""

from __future__ import annotations

import argparse

from batchnorm.cli.argtypes import existing_dir
from batchnorm.lab.report import load_results, write_report

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Rebuild the figures and report.html of a `compare` run from its results.json."
    parser.add_argument("run_dir", type=existing_dir, help="a folder written by `batchnorm compare`")


def run(args: argparse.Namespace) -> int:
    print(f"wrote {write_report(args.run_dir, load_results(args.run_dir))}")
    return 0
