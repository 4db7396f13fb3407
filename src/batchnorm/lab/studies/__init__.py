"""Named experiments on real digits (``batchnorm experiment NAME``), one module each.

* ``lr-sweep`` (:mod:`.lr_sweep`): the largest stable learning rate with and
  without BN, and accuracy against learning rate;
* ``small-batch`` (:mod:`.small_batch`): test accuracy against batch size for
  BN, Batch Renorm, Ghost BN, GroupNorm and LayerNorm;
* ``eval-stats`` (:mod:`.eval_stats`): EMA running statistics against precise
  (recalibrated) population statistics against test-batch statistics, at
  training batches of 4 and 60.

Each writes ``results.json``, PNG figures and ``report.html`` (findings in
plain sentences computed from the numbers, the table, the figures with
captions) into its output folder, runs ``seeds`` seeds per configuration and
reports mean, sample std and min-max, chooses on a validation split carved
from the training split (:mod:`.common`) and measures test accuracy once per
final model. The defaults are sized to finish in under 5 minutes on a 2-core
CPU with one thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchnorm.lab.data import Dataset
from batchnorm.lab.studies import eval_stats, lr_sweep, small_batch
from batchnorm.lab.studies.common import spread, text_table

__all__ = ["EXPERIMENTS", "Experiment", "format_table", "run_experiment", "spread"]


@dataclass(frozen=True)
class Experiment:
    """A named experiment: its default settings, the function that runs it and its result table."""

    name: str
    summary: str
    defaults: Any
    run: Callable[..., dict[str, Any]]
    table: Callable[[dict[str, Any]], list[list[str]]]


EXPERIMENTS: dict[str, Experiment] = {
    "lr-sweep": Experiment(
        "lr-sweep",
        "largest stable learning rate with and without BN (sigmoid MLP, log grid of learning rates)",
        lr_sweep.LrSweepConfig(),
        lr_sweep.lr_sweep,
        lr_sweep.table,
    ),
    "small-batch": Experiment(
        "small-batch",
        "test accuracy against batch size 2-64 for BN, Batch Renorm, Ghost BN, GroupNorm and LayerNorm",
        small_batch.SmallBatchConfig(),
        small_batch.small_batch,
        small_batch.table,
    ),
    "eval-stats": Experiment(
        "eval-stats",
        "EMA vs precise (recalibrated) vs test-batch BN statistics at training batches of 4 and 60",
        eval_stats.EvalStatsConfig(),
        eval_stats.eval_stats,
        eval_stats.table,
    ),
}


def run_experiment(
    name: str,
    out_dir: str | Path,
    *,
    progress: bool = True,
    dataset: Dataset | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run experiment ``name`` with its defaults changed by ``settings`` (fields of its config dataclass).

    Raises:
        ValueError: unknown name, a setting the experiment does not have, or an invalid value.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: expected one of {', '.join(EXPERIMENTS)}")
    experiment = EXPERIMENTS[name]
    fields = {field.name for field in dataclasses.fields(experiment.defaults)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"experiment {name} has no setting {', '.join(unknown)}")
    config = dataclasses.replace(experiment.defaults, **settings)
    return experiment.run(config, out_dir, dataset=dataset, progress=progress)


def format_table(results: dict[str, Any]) -> str:
    """The experiment's result table as text."""
    return text_table(EXPERIMENTS[results["experiment"]].table(results))
