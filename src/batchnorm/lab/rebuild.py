"""``batchnorm report DIR``: which verb wrote a run folder, and its ``report.html`` rebuilt.

The one module that knows every kind of page: compare's and train's
(:mod:`batchnorm.lab.report`), tune's (:mod:`batchnorm.lab.tune`) and the
experiments' (:mod:`batchnorm.lab.studies`); those modules import the page
helpers of :mod:`batchnorm.lab.report`, never this one.
"""

from __future__ import annotations

from pathlib import Path

from batchnorm.lab.report import _read_json, load_results, write_report, write_train_report
from batchnorm.lab.tune import draw_heatmaps, write_tune_report

__all__ = ["REPORT_KINDS", "detect_kind", "rebuild_report"]

REPORT_KINDS = ("compare", "experiment", "tune", "train")


def detect_kind(run_dir: str | Path) -> str:
    """Which verb wrote ``run_dir``, from its files: ``compare``, ``experiment``, ``tune`` or ``train``.

    ``results.json`` with ``runs`` is a compare, with ``experiment`` an
    experiment; ``tune.json`` a tune; ``metrics.jsonl`` or ``checkpoint.pt`` a
    train run. ``ValueError`` otherwise (one line naming what was looked for).
    """
    folder = Path(run_dir)
    results_path = folder / "results.json"
    if results_path.is_file():
        results = _read_json(results_path)
        if "runs" in results:
            return "compare"
        if "experiment" in results:
            return "experiment"
        raise ValueError(
            f"{results_path} is not a compare results file (no 'runs') nor an experiment's (no 'experiment')"
        )
    if (folder / "tune.json").is_file():
        return "tune"
    if (folder / "metrics.jsonl").is_file() or (folder / "checkpoint.pt").is_file():
        return "train"
    raise ValueError(
        f"{results_path} does not exist, nor tune.json, metrics.jsonl or checkpoint.pt: expected a folder written "
        "by `batchnorm train`, `compare`, `tune` or `experiment`"
    )


def rebuild_report(run_dir: str | Path) -> tuple[str, Path]:
    """Rebuild the figures and ``report.html`` of a run folder (:func:`detect_kind`); returns (kind, page)."""
    folder = Path(run_dir)
    kind = detect_kind(folder)
    if kind == "compare":
        return kind, write_report(folder, load_results(folder))
    if kind == "experiment":
        from batchnorm.lab.studies import eval_stats, lr_sweep, small_batch

        results = _read_json(folder / "results.json")
        writers = {
            "lr-sweep": lr_sweep.write_report,
            "small-batch": small_batch.write_report,
            "eval-stats": eval_stats.write_report,
        }
        name = results.get("experiment")
        if name not in writers:
            raise ValueError(f"{folder / 'results.json'}: unknown experiment {name!r}")
        try:
            return kind, writers[str(name)](folder, results)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{folder / 'results.json'} is incomplete ({type(error).__name__}: {error})") from None
    if kind == "tune":
        results = _read_json(folder / "tune.json")
        try:
            heatmaps = draw_heatmaps(results["trials"], results["grid"], folder, results["trial_steps"])
            return kind, write_tune_report(folder, results, heatmaps)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{folder / 'tune.json'} is incomplete ({type(error).__name__}: {error})") from None
    return kind, write_train_report(folder)
