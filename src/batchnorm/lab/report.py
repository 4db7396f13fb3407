"""The self-contained ``report.html`` pages of ``train`` and ``compare`` runs, and the parts every page shares.

Every page is one static HTML file: figures are PNGs embedded as base64
(drawn with :mod:`batchnorm.lab.figures`, a caption under each, every axis
labelled), results and settings are HTML tables, the batch-norm formulas are
plain HTML, and no external asset (script, font, style sheet) is loaded, so a
page can be mailed or opened offline.

* :func:`write_report`: ``compare`` (``accuracy.png``, ``percentiles.png``,
  ``layers.png``, the comparison table, what each BN layer computes with its
  batch and running statistics, the formulas, the settings);
* :func:`write_train_report`: a ``train`` folder (``train.png`` from
  ``metrics.jsonl``, the last evaluation, the BN layers of the checkpoint, the
  settings);
* the page helpers (:func:`html_table`, :func:`settings_table`, the page frame
  and figures) that :mod:`batchnorm.lab.tune` and the experiments build their
  pages with; :mod:`batchnorm.lab.rebuild` recognizes a run folder and
  rebuilds its page (``batchnorm report DIR``).

:func:`format_summary` is the comparison table ``compare`` prints. This module
imports neither tune nor the experiments: they import it.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm.lab.figures import embed_png, pyplot

__all__ = [
    "FORMULAS_HTML",
    "PAGE_STYLE",
    "bn_table",
    "format_summary",
    "html_table",
    "load_results",
    "settings_table",
    "summary_rows",
    "write_report",
    "write_train_report",
]

COLORS = {"no_bn": "#d62728", "bn": "#1f77b4"}

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
img { max-width: 100%; } figure { margin: 1.5em 0; } figcaption { color: #555; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eef7ee; font-weight: 600; }
.formulas { display: flex; flex-wrap: wrap; gap: 1em; }
.formulas div { flex: 1 1 420px; border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; }
.formulas p { margin: 0.35em 0; font-family: "DejaVu Serif", Georgia, serif; font-size: 1.05em; }
.formulas h3 { margin: 0.2em 0 0.4em; font-size: 1em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""

# Training and eval of one feature, as every BN layer of this package (and torch's) computes them.
FORMULAS_HTML = """<div class="formulas">
<div><h3>Training: batch statistics</h3>
<p>For one feature, the <i>m</i> values <i>x</i><sub>1</sub> &hellip; <i>x</i><sub><i>m</i></sub> it takes over
the reduced axes of the batch (<i>m</i> = values per statistic):</p>
<p><i>&mu;</i><sub>B</sub> = (1/<i>m</i>) &sum;<sub><i>i</i></sub> <i>x</i><sub><i>i</i></sub></p>
<p><i>&sigma;</i><sup>2</sup><sub>B</sub> = (1/<i>m</i>) &sum;<sub><i>i</i></sub>
(<i>x</i><sub><i>i</i></sub> &minus; <i>&mu;</i><sub>B</sub>)<sup>2</sup> &nbsp;(biased)</p>
<p><i>y</i><sub><i>i</i></sub> = <i>&gamma;</i> &middot; (<i>x</i><sub><i>i</i></sub> &minus; <i>&mu;</i><sub>B</sub>)
/ &radic;(<i>&sigma;</i><sup>2</sup><sub>B</sub> + <i>&epsilon;</i>) + <i>&beta;</i></p>
<p>then the running statistics move by <i>momentum</i> (the weight of the new batch):</p>
<p>running_mean &larr; (1 &minus; momentum) &middot; running_mean + momentum &middot; <i>&mu;</i><sub>B</sub></p>
<p>running_var &larr; (1 &minus; momentum) &middot; running_var + momentum &middot;
<i>&sigma;</i><sup>2</sup><sub>B</sub> &middot; <i>m</i>/(<i>m</i> &minus; 1)</p>
</div>
<div><h3>Eval (inference): running statistics</h3>
<p>Nothing is measured on the batch and nothing is updated; every value of the feature uses the stored
estimates:</p>
<p><i>y</i> = <i>&gamma;</i> &middot; (<i>x</i> &minus; running_mean) / &radic;(running_var + <i>&epsilon;</i>)
+ <i>&beta;</i></p>
<p>so an example's output does not depend on the other examples of its batch.</p>
</div>
</div>"""


# --------------------------------------------------------------------------- HTML parts


def _cell(value: Any, header: bool = False) -> str:
    tag = "th" if header else "td"
    text = value if isinstance(value, str) else _format_value(value)
    numeric = not header and not isinstance(value, str) and isinstance(value, (int, float)) and value is not True
    return f"<{tag}{' class=num' if numeric else ''}>{html.escape(text)}</{tag}>"


def html_table(rows: Sequence[Sequence[Any]], *, highlight: int | None = None) -> str:
    """A ``<table>``: the first row is the header; ``highlight`` marks one body row (0-based) as the best."""
    head = "".join(_cell(cell, header=True) for cell in rows[0])
    body = "".join(
        f"<tr{' class=best' if index == highlight else ''}>" + "".join(_cell(cell) for cell in row) + "</tr>"
        for index, row in enumerate(rows[1:])
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(item) for item in value)
    if isinstance(value, dict):
        return "; ".join(f"{key} = {_format_value(item)}" for key, item in value.items())
    return str(value)


def settings_table(settings: dict[str, Any], heading: tuple[str, str] = ("setting", "value")) -> str:
    """A two-column table of ``settings`` (the option name as the CLI spells it: ``batch_size`` -> ``--batch-size``)."""
    rows: list[list[Any]] = [list(heading)]
    for key, value in settings.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        rows.append([key, value if number else _format_value(value)])
    return html_table(rows)


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def _figure(path: Path, caption: str) -> str:
    return f"<figure>{embed_png(path)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _stat_summary(values: list[float] | None) -> str:
    if not values:
        return "-"
    array = np.asarray(values, dtype=float)
    return f"{array.mean():+.3f} [{array.min():+.3f}, {array.max():+.3f}]"


def bn_table(records: Sequence[dict[str, Any]]) -> str:
    """What each BN layer computes: shapes and axes named as the ``explain`` table names them, and the numbers.

    Per layer: the input shape with axis letters, the feature axis, the
    reduced axes (``N`` or ``N,H,W``), values per statistic, gamma/beta
    shape, the statistic used in training (batch) and in eval (running) as
    mean [min, max] over the features.
    """
    from batchnorm.lab.explain import axis_letters, reduced_axes_text

    rows: list[list[Any]] = [
        [
            "layer",
            "kind",
            "input shape",
            "feature axis",
            "reduced axes",
            "values per statistic",
            "gamma, beta",
            "batch mean (train)",
            "batch var (train)",
            "running mean (eval)",
            "running var (eval)",
        ]
    ]
    for record in records:
        letters = axis_letters(record)
        shape = " x ".join(f"{letter}={size}" for letter, size in zip(letters, record["input_shape"]))
        reduced = reduced_axes_text(record)
        count = int(record["values_per_statistic"])
        rows.append(
            [
                str(record["name"]),
                str(record["kind"]),
                shape,
                f"{letters[record['feature_axis']]} ({record['num_features']} features)",
                reduced,
                f"{count:,} = {reduced.replace(',', ' x ')}" if "," in reduced else f"{count:,}",
                f"({record['num_features']},)" if record.get("param_shape") else "none",
                _stat_summary(record.get("batch_mean")),
                _stat_summary(record.get("batch_var")),
                _stat_summary(record.get("running_mean")),
                _stat_summary(record.get("running_var")),
            ]
        )
    return html_table(rows)


def _bn_section(records: Sequence[dict[str, Any]], context: str) -> str:
    """The heading, the BN table, the formulas and the drawn inputs (inline SVG) of explain records."""
    from batchnorm.lab.explain_html import explain_section

    try:
        pictures = explain_section(list(records), heading="h3") if records else ""
    except (KeyError, TypeError, ValueError, IndexError):  # records of an older results.json: the table stays
        pictures = ""
    table = (
        bn_table(records)
        if records
        else "<p>This model has no batch-norm layer: nothing computes a mean and variance over the batch.</p>"
    )
    return f"""<h2>What each BN layer computes</h2>
<p>{html.escape(context)} Each BN layer has one mean, one variance, one gamma and one beta per feature of its
<em>own</em> input; a statistic pools every value of its feature over the reduced axes. Statistics are given as
mean [min, max] over the layer's features.</p>
{table}
<h3>The formulas</h3>
{FORMULAS_HTML}
{pictures}"""


# --------------------------------------------------------------------------- compare


def _labels(results: dict[str, Any]) -> dict[str, str]:
    """``with BN`` / ``without BN``, or the compared normalization (``with GroupNorm`` / ``without normalization``)."""
    name = (results.get("arm_names") or {}).get("bn", "BN")
    return {"bn": f"with {name}", "no_bn": "without BN" if name == "BN" else "without normalization"}


def _activation(results: dict[str, Any]) -> str:
    """The nonlinearity of the compared networks (``sigmoid``, ``tanh``, ``relu``) as the config names it."""
    return str((results.get("config") or {}).get("act") or "nonlinearity")


def _seed_count(results: dict[str, Any]) -> int:
    return len(results.get("seeds") or [None])


def _finite(values: list[Any]) -> list[float]:
    return [float(v) if v is not None and math.isfinite(float(v)) else math.nan for v in values]


def _accuracy_figure(results: dict[str, Any]) -> Any:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    labels = _labels(results)
    seeds = _seed_count(results)
    for label in ("no_bn", "bn"):
        curves = [
            record
            for record in (results.get("seed_runs") or {}).get(label, [])
            if record.get("steps") and not record.get("diverged")
        ]
        steps = curves[0]["steps"] if curves else []
        if seeds > 1 and curves and all(record["steps"] == steps for record in curves):
            values = np.asarray([_finite(record["test_accuracy"]) for record in curves])
            name = f"{labels[label]}: mean of {len(curves)} seeds, band min-max"
            axis.plot(steps, values.mean(axis=0), label=name, color=COLORS[label])
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=COLORS[label], alpha=0.25)
            continue
        run = results["runs"].get(label, {})
        if run.get("steps"):
            axis.plot(run["steps"], run["test_accuracy"], label=labels[label], color=COLORS[label])
    axis.set_xlabel("training step")
    axis.set_ylabel("test accuracy")
    axis.set_title("(a) test accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def _percentile_figure(results: dict[str, Any]) -> Any:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    labels = _labels(results)
    act = _activation(results)
    for axis, label, letter in zip(axes, ("no_bn", "bn"), ("b", "c")):
        run = results["runs"].get(label, {})
        steps = run.get("percentile_steps", [])
        for percentile, style in (("15", ":"), ("50", "-"), ("85", "--")):
            values = run.get("percentiles", {}).get(percentile, [])
            if steps and values:
                axis.plot(steps, values, style, color=COLORS[label], label=f"{percentile}th")
        unit = run.get("percentile_unit", {})
        axis.set_title(f"({letter}) {labels[label]}: input to {act} {unit.get('layer', '')}[{unit.get('unit', 0)}]")
        axis.set_xlabel("training step")
        axis.set_ylabel(f"input to {act} (15th / 50th / 85th percentile)")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    return figure


LAYER_PANELS = (
    ("std", "activation std", "std of the layer's output", False),
    ("saturated_pct", "% saturated", "% of units saturated", False),
    ("grad_std", "gradient std", "std of dLoss/d(output), log scale", True),
)


def _layer_figure(results: dict[str, Any]) -> Any:
    plt = pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    labels = _labels(results)
    for row, label in enumerate(("no_bn", "bn")):
        run = results["runs"].get(label, {})
        steps = run.get("layer_steps", [])
        layers = run.get("layers", {})
        for column, (key, title, ylabel, log) in enumerate(LAYER_PANELS):
            axis = axes[row][column]
            for name, stats in layers.items():
                values = _finite(stats.get(key, []))
                if steps and values and not all(math.isnan(v) for v in values):
                    axis.plot(steps, values, label=name)
            if log and axis.lines:
                axis.set_yscale("log")
            axis.set_title(f"{labels[label]}: {title}")
            axis.set_xlabel("training step")
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
            if column == 0 and axis.lines:
                axis.legend(fontsize=8, title="hidden layer", title_fontsize=8)
    figure.tight_layout()
    return figure


def _save(figure: Any, path: Path, dpi: int = 110) -> Path:
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """The comparison table (header row first): accuracy at checkpoints, final, steps to 90%, drift, diverged."""
    summary = results["summary"]
    labels = [label for label in ("no_bn", "bn") if label in summary]
    names = _labels(results)
    seeds = _seed_count(results)
    rows = [["", *[names[label] for label in labels]]]

    def cell(value: Any, kind: str = "acc") -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3f}" if kind == "acc" else f"{value:.2f}" if kind == "float" else f"{value:.0f}"

    def spread_cell(stats: dict[str, Any] | None, kind: str = "acc") -> str:
        """``mean ± std [min-max]`` over the seeds (``(n=k)`` when only k of them entered)."""
        if not stats or stats.get("mean") is None:
            return "-"
        average = "float" if kind == "int" else kind
        text = f"{cell(stats['mean'], average)} ± {cell(stats['std'], average)}"
        text += f" [{cell(stats['min'], kind)}-{cell(stats['max'], kind)}]"
        return text + (f" (n={stats['n']})" if stats["n"] < seeds else "")

    def row(title: str, key: str, kind: str = "acc", step: str | None = None) -> list[str]:
        cells = []
        for lb in labels:
            if seeds > 1 and "over_seeds" in summary[lb]:
                over = summary[lb]["over_seeds"]
                cells.append(spread_cell(over[key][step] if step is not None else over[key], kind))
            else:
                value = summary[lb][key][step] if step is not None else summary[lb].get(key)
                cells.append(cell(value, kind))
        return [title, *cells]

    if seeds > 1:
        rows.append([f"over {seeds} seeds", *["mean ± std [min-max]" for _ in labels]])
    for step in summary["checkpoints"]:
        rows.append(row(f"test accuracy at {step} steps", "accuracy_at", step=str(step)))
    rows.append(row("final test accuracy", "final_accuracy"))
    if any(summary[lb].get("final_val_accuracy") is not None for lb in labels):
        rows.append(row("final validation accuracy", "final_val_accuracy"))
    rows.append(row("steps to 90% test accuracy", "steps_to_90pct", "int"))
    rows.append(row("percentile drift (lower = steadier)", "percentile_steadiness", "float"))
    if seeds > 1:
        rows.append(["diverged", *[f"{summary[lb]['over_seeds']['diverged']} of {seeds}" for lb in labels]])
    else:
        rows.append(["diverged", *["yes" if summary[lb]["diverged"] else "no" for lb in labels]])
    return rows


def format_summary(results: dict[str, Any]) -> str:
    """The final comparison table printed by ``compare`` (:func:`summary_rows` as padded text)."""
    rows = summary_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a ``compare`` run folder (``ValueError`` when missing, unreadable or of another kind)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: expected a folder written by `batchnorm compare`")
    results = _read_json(path)
    if "runs" not in results:
        raise ValueError(f"{path} is not a compare results file (no 'runs')")
    return results


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read ({error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a results file (not a JSON object)")
    return content


def write_report(out_dir: str | Path, results: dict[str, Any], extra_sections: list[str] | None = None) -> Path:
    """Write ``accuracy.png``, ``percentiles.png``, ``layers.png`` and ``report.html`` of a compare into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    act = _activation(results)
    figures = {
        "accuracy": (_accuracy_figure, "Test accuracy over training (the paper's Figure 1a)."),
        "percentiles": (
            _percentile_figure,
            f"15th, 50th and 85th percentiles of the input to one {act} unit of the last hidden layer, over a fixed "
            "probe set of test images fed in training-mode mini-batches (the paper's Figure 1b, c): without "
            "normalization the distribution drifts, with it the input keeps its place and width.",
        ),
        "layers": (
            _layer_figure,
            "Per hidden layer over training: the std of the activations, the percent of saturated units "
            "(sigmoid |z| > 4, tanh |a| > 0.97, ReLU a = 0) and the std of the gradient reaching the layer (log "
            "scale); top row without normalization, bottom row with it.",
        ),
    }
    sections = []
    for name, (draw, caption) in figures.items():
        path = _save(draw(results), out / f"{name}.png", dpi=100 if name == "layers" else 110)
        sections.append(_figure(path, caption))
    config = results.get("config", {})
    validation_text = f"; validation split: {results['validation']}" if results.get("validation") else ""
    seed_list = results.get("seeds") or []
    seeds_text = (
        f"Each arm ran with {len(seed_list)} seeds ({', '.join(str(s) for s in seed_list)}: init and batch "
        "order); the table gives mean ± sample std [min-max] over them, the accuracy figure the mean curve "
        f"and the min-max band, the other figures seed {seed_list[0]}. "
        if len(seed_list) > 1
        else ""
    )
    results_table = html_table(summary_rows(results)) if "summary" in results else "<p>No summary.</p>"
    definitions = results.get("definitions") or {}
    definitions_html = settings_table(definitions, ("quantity", "definition")) if definitions else ""
    explain_html = (
        _bn_section(
            results["explain"],
            f"The trained network {_labels(results)['bn']} on one training batch of {config.get('batch_size', '')}.",
        )
        if results.get("explain")
        else f"<h2>The formulas</h2>\n{FORMULAS_HTML}"
    )
    device_text = f", on {html.escape(str(results['device']))}" if results.get("device") else ""
    body = f"""<h1>Batch normalization in a deep network</h1>
<p>The same network ({html.escape(str(config.get("model", "")))}, {html.escape(act)}) trained
from the same init ({html.escape(str(config.get("init", "")))}), seed and mini-batches of
{html.escape(str(config.get("batch_size", "")))}, {html.escape(_labels(results)["bn"])} and without.
{html.escape(seeds_text)}Data: {html.escape(str(results.get("dataset", "")))}{html.escape(validation_text)}.
SGD, learning rate {html.escape(str(config.get("lr", "")))},
momentum {html.escape(str(config.get("momentum", "")))},
{html.escape(str(config.get("steps", "")))} steps{device_text}.</p>
<h2>Results</h2>
{results_table}
{explain_html}
<h2>Figures</h2>
{"".join(sections)}
{"".join(extra_sections or [])}
<h2>Definitions</h2>
{definitions_html}
<h2>Configuration</h2>
{settings_table(config)}"""
    path = out / "report.html"
    path.write_text(_page("batchnorm: with and without batch normalization", body), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- train


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The evaluations of ``metrics.jsonl`` (lines that are not JSON objects with a ``step`` are skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _train_figure(metrics: list[dict[str, Any]]) -> Any:
    plt = pyplot()
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [record["step"] for record in metrics]
    for axis, keys, ylabel in (
        (
            loss_axis,
            (
                ("train_loss", "training (mean since the last evaluation)"),
                ("val_loss", "validation"),
                ("test_loss", "test"),
            ),
            "cross-entropy loss",
        ),
        (accuracy_axis, (("val_accuracy", "validation"), ("test_accuracy", "test")), "accuracy"),
    ):
        for key, name in keys:
            points = [(s, r[key]) for s, r in zip(steps, metrics) if isinstance(r.get(key), (int, float))]
            if points:
                axis.plot(
                    [p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None, label=name
                )
        axis.set_xlabel("training step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    loss_axis.set_title("(a) loss")
    accuracy_axis.set_title("(b) accuracy")
    accuracy_axis.set_ylim(0, 1)
    figure.tight_layout()
    return figure


def _train_explain(checkpoint: Path, batch_size: int) -> list[dict[str, Any]]:
    """The BN layers of the trained model on one training batch (empty when the data cannot be loaded)."""
    from batchnorm.lab.explain import explain, prepare
    from batchnorm.lab.training import TrainConfig

    try:
        model, batch, _, _ = prepare(TrainConfig(), checkpoint=checkpoint, batch_size=batch_size)
        return explain(model, batch)
    except (ValueError, OSError, RuntimeError):
        return []


def write_train_report(run_dir: str | Path) -> Path:
    """``train.png`` and ``report.html`` of a ``train`` folder (``metrics.jsonl``, ``checkpoint.pt``).

    Raises:
        ValueError: the folder has neither file, or the checkpoint cannot be read.
    """
    from batchnorm.lab.training import config_from_checkpoint, load_checkpoint

    out = Path(run_dir)
    metrics_path, checkpoint = out / "metrics.jsonl", out / "checkpoint.pt"
    if not metrics_path.is_file() and not checkpoint.is_file():
        raise ValueError(f"{out} holds neither metrics.jsonl nor checkpoint.pt: expected a folder of `batchnorm train`")
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
    config: dict[str, Any] = {}
    step = None
    records: list[dict[str, Any]] = []
    if checkpoint.is_file():
        payload = load_checkpoint(checkpoint)
        config = dict(vars(config_from_checkpoint(payload)))
        step = payload.get("step")
        records = _train_explain(checkpoint, min(int(config.get("batch_size", 60)), 60))
    figure_path = _save(_train_figure(metrics), out / "train.png")
    last = metrics[-1] if metrics else {}
    final_rows: list[list[Any]] = [["quantity", "value"]]
    for key, name in (
        ("step", "step of the last evaluation"),
        ("train_loss", "training loss (mean since the previous evaluation)"),
        ("val_loss", "validation loss"),
        ("val_accuracy", "validation accuracy"),
        ("test_loss", "test loss"),
        ("test_accuracy", "test accuracy"),
        ("steps_per_s", "steps per second"),
        ("device", "device"),
    ):
        if key in last:
            final_rows.append([name, last[key]])
    if step is not None:
        final_rows.append(["checkpoint step", step])
    history: list[list[Any]] = [["step", "training loss", "validation accuracy", "test accuracy"]]
    history += [[r["step"], r.get("train_loss"), r.get("val_accuracy"), r.get("test_accuracy")] for r in metrics]
    model_text = ", ".join(str(config.get(key, "")) for key in ("model", "act", "norm", "placement")) if config else ""
    bn_html = _bn_section(records, "The trained network (from checkpoint.pt) on one training batch.") if config else ""
    body = f"""<h1>Training run</h1>
<p>Folder <code>{html.escape(str(out))}</code>{f": {html.escape(model_text)}" if model_text else ""};
{len(metrics)} evaluations in metrics.jsonl.</p>
<h2>Results</h2>
{html_table(final_rows) if len(final_rows) > 1 else "<p>No evaluation recorded yet.</p>"}
<h2>Figures</h2>
{
        _figure(
            figure_path,
            "(a) Loss on the training batches (mean since the previous evaluation), the validation "
            "split and the test split; (b) accuracy on the validation and test splits, at every evaluation.",
        )
    }
{bn_html}
<h2>Every evaluation</h2>
{html_table(history) if metrics else "<p>None.</p>"}
<h2>Configuration</h2>
{settings_table(config) if config else "<p>No checkpoint.pt: the settings are unknown.</p>"}"""
    path = out / "report.html"
    path.write_text(_page("batchnorm train: one run", body), encoding="utf-8")
    return path
