"""``batchnorm report DIR``: rebuild the figures and report.html of a train, compare, tune or experiment folder.

The kind of folder is recognized from its files (:func:`batchnorm.lab.rebuild.detect_kind`).
"""

from __future__ import annotations

import argparse

from batchnorm.cli.argtypes import existing_dir
from batchnorm.lab.rebuild import rebuild_report

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Rebuild the figures and report.html of a run folder: a `compare` or experiment folder (results.json), "
        "a `tune` folder (tune.json) or a `train` folder (metrics.jsonl, checkpoint.pt); the kind is recognized "
        "from the files."
    )
    parser.add_argument(
        "run_dir", type=existing_dir, help="a folder written by `batchnorm train`, `compare`, `tune` or `experiment`"
    )


def run(args: argparse.Namespace) -> int:
    kind, path = rebuild_report(args.run_dir)
    print(f"wrote {path} ({kind} report)")
    return 0
