"""What the three studies share: seeds and spread, the validation/test protocol, one progress bar, the page.

Protocol (every study):

* the training split is cut by :func:`batchnorm.lab.data.split_validation`
  (``val_fraction`` of each class, fixed seed): runs train on the rest, and
  every choice (learning rate, checkpoint, statistics) reads the
  *validation* split only;
* :func:`prepare` gives the validation and test tensors normalized as
  :func:`batchnorm.lab.training.train` normalizes its inputs (fit on the
  training part only);
* runs never evaluate the test split (``test_eval="never"``); the test split
  is evaluated once per final model, after the selection, by
  :func:`test_accuracy`.

Spread over seeds (or checkpoints): :func:`spread` gives the mean, the sample
standard deviation (``ddof=1``; None for one value), min, max and ``n`` of the
finite values.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from batchnorm.lab.data import Dataset, InputNormalizer, split_validation
from batchnorm.lab.experiments import spread
from batchnorm.lab.files import write_json_atomically
from batchnorm.lab.report import _figure, _page, html_table, settings_table
from batchnorm.lab.training import DivergenceError, TrainConfig, TrainResult, evaluate, train

__all__ = [
    "BestCheckpoint",
    "Prepared",
    "Progress",
    "fmt_spread",
    "html_table",
    "prepare",
    "run_training",
    "spread",
    "test_accuracy",
    "text_table",
    "write_json",
    "write_page",
]


def fmt_spread(stats: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± std [min-max]`` (``-`` when empty; no ``± std`` for one value)."""
    if not stats or stats.get("mean") is None:
        return "-"
    text = f"{stats['mean']:.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std']:.{digits}f} [{stats['min']:.{digits}f}-{stats['max']:.{digits}f}]"
    return text


@dataclass
class Prepared:
    """The dataset with its validation split, and the normalized validation and test tensors."""

    data: Dataset
    normalizer: InputNormalizer
    train_images: Tensor
    val_images: Tensor
    val_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def prepare(dataset: Dataset, val_fraction: float, input_norm: str) -> Prepared:
    """Carve the validation split and normalize as :func:`~batchnorm.lab.training.train` does (fit on the rest)."""
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"--val-fraction must be > 0 and < 1 for a study (selection needs it), got {val_fraction}")
    data = split_validation(dataset, val_fraction)
    assert data.val_images is not None
    assert data.val_labels is not None
    normalizer = InputNormalizer.fit(input_norm, data.train_images)
    return Prepared(
        data=data,
        normalizer=normalizer,
        train_images=normalizer(data.train_images),
        val_images=normalizer(data.val_images),
        val_labels=data.val_labels,
        test_images=normalizer(data.test_images),
        test_labels=data.test_labels,
    )


def test_accuracy(model: nn.Module, prepared: Prepared) -> float:
    """Accuracy on the test split (eval mode). Called once per final model, after every selection."""
    return evaluate(model, prepared.test_images, prepared.test_labels)[1]


class Progress:
    """One progress bar (tqdm on stderr) over all the steps of a study; a :class:`StepCallback` for ``train``."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=description,
            unit="step",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.run_done = 0

    def start_run(self, label: str) -> None:
        self.run_done = 0
        self.bar.set_postfix_str(label, refresh=False)

    def finish_run(self, planned: int) -> None:
        """Count the steps a diverged run did not take."""
        if planned > self.run_done:
            self.bar.update(planned - self.run_done)
        self.run_done = planned

    def close(self) -> None:
        self.bar.close()

    def before_step(self, step: int, model: nn.Module) -> None:
        pass

    def after_step(self, step: int, model: nn.Module, loss: float) -> None:
        self.run_done += 1
        self.bar.update(1)

    def on_eval(self, step: int, model: nn.Module, metrics: dict[str, float]) -> None:
        pass


class BestCheckpoint:
    """Keeps a copy of the weights at the evaluation with the highest *validation* accuracy (the earliest on ties).

    Also keeps the last ``keep_last`` evaluated checkpoints (``recent``: ``(step, state_dict)``).
    """

    def __init__(self, keep_last: int = 0) -> None:
        self.best_step = 0
        self.best_val = -math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.keep_last = keep_last
        self.recent: list[tuple[int, dict[str, Tensor]]] = []

    def before_step(self, step: int, model: nn.Module) -> None:
        pass

    def after_step(self, step: int, model: nn.Module, loss: float) -> None:
        pass

    def on_eval(self, step: int, model: nn.Module, metrics: dict[str, float]) -> None:
        value = metrics.get("val_accuracy")
        if value is None:
            raise ValueError("selection needs a validation split, but the run evaluated none")
        if value > self.best_val:
            self.best_val, self.best_step = float(value), step
            self.best_state = copy.deepcopy(model.state_dict())
        if self.keep_last:
            self.recent = [*self.recent, (step, copy.deepcopy(model.state_dict()))][-self.keep_last :]


def run_training(
    config: TrainConfig, dataset: Dataset, progress: Progress, label: str, extra: Iterable[Any] = ()
) -> tuple[TrainResult | None, str | None]:
    """Train one run with no test evaluation; return ``(result, None)`` or ``(None, why)`` when it diverged."""
    progress.start_run(label)
    try:
        result = train(
            config,
            None,
            dataset=dataset,
            callbacks=[progress, *extra],
            progress=False,
            description=label,
            test_eval="never",
        )
    except DivergenceError as error:
        progress.finish_run(config.steps)
        return None, str(error)
    progress.finish_run(config.steps)
    return result, None


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass as JSON-ready values (tuples become lists)."""
    converted: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(config)))
    return converted


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, payload, indent=1)


def text_table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, for the terminal."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def write_page(
    out: Path,
    title: str,
    setup: str,
    findings: list[str],
    table: list[list[str]],
    figures: list[tuple[str, str]],
    definitions: dict[str, str],
    config: dict[str, Any],
) -> Path:
    """``report.html``: setup, findings (plain sentences), the table, the figures (embedded) with captions."""
    findings_html = "".join(f"<li>{html.escape(line)}</li>" for line in findings)
    figures_html = "".join(_figure(out / name, caption) for name, caption in figures)
    body = f"""<section>
<h1>{html.escape(title)}</h1>
<p>{html.escape(setup)}</p>
<h2>What the data shows</h2><ul>{findings_html}</ul>
<h2>Results</h2>{html_table(table)}
<h2>Figures</h2>
{figures_html}
<h2>Definitions</h2>
{settings_table(definitions, ("term", "meaning"))}
<h2>Configuration</h2>
{settings_table(config)}
</section>"""
    page = _page(f"batchnorm experiment: {title}", body)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def error_bars(axis: Any, xs: list[float], stats: list[dict[str, Any]], label: str, color: str | None) -> None:
    """Mean line with std error bars and a min-max band (points without values are skipped)."""
    points = [(x, s) for x, s in zip(xs, stats) if s.get("mean") is not None]
    if not points:
        return
    x = [p[0] for p in points]
    mean = [p[1]["mean"] for p in points]
    std = [p[1]["std"] or 0.0 for p in points]
    axis.errorbar(x, mean, yerr=std, label=label, color=color, marker="o", capsize=3)
    if any(p[1]["n"] > 1 for p in points):
        axis.fill_between(x, [p[1]["min"] for p in points], [p[1]["max"] for p in points], color=color, alpha=0.15)
