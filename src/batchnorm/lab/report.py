"""The text and the self-contained ``report.html`` of a ``compare`` run.

:func:`format_summary` is the comparison table; :func:`write_report` turns
the ``results.json`` of ``compare`` into PNG figures (drawn with
:mod:`batchnorm.lab.figures`) and one HTML page with the images embedded
(base64), so the page can be mailed or opened offline. ``batchnorm report
RUN_DIR`` rebuilds both from the folder's ``results.json``
(:func:`load_results`). This module never imports the experiments: they
call it.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm.lab.figures import embed_png, pyplot

__all__ = ["format_summary", "load_results", "write_report"]

COLORS = {"no_bn": "#d62728", "bn": "#1f77b4"}


def _labels(results: dict[str, Any]) -> dict[str, str]:
    """``with BN`` / ``without BN``, or the compared normalization (``with GroupNorm`` / ``without normalization``)."""
    name = (results.get("arm_names") or {}).get("bn", "BN")
    return {"bn": f"with {name}", "no_bn": "without BN" if name == "BN" else "without normalization"}


def _seed_count(results: dict[str, Any]) -> int:
    return len(results.get("seeds") or [None])


def _finite(values: list[Any]) -> list[float]:
    return [float(v) if v is not None and math.isfinite(float(v)) else math.nan for v in values]


def _accuracy_figure(results: dict[str, Any], path: Path) -> None:
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
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _percentile_figure(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    labels = _labels(results)
    for axis, label, letter in zip(axes, ("no_bn", "bn"), ("b", "c")):
        run = results["runs"].get(label, {})
        steps = run.get("percentile_steps", [])
        for percentile, style in (("15", ":"), ("50", "-"), ("85", "--")):
            values = run.get("percentiles", {}).get(percentile, [])
            if steps and values:
                axis.plot(steps, values, style, color=COLORS[label], label=f"{percentile}th")
        unit = run.get("percentile_unit", {})
        axis.set_title(f"({letter}) {labels[label]}: input to sigmoid {unit.get('layer', '')}[{unit.get('unit', 0)}]")
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_ylabel("15th / 50th / 85th percentile")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _layer_figure(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    panels = (
        ("std", "activation std", False),
        ("saturated_pct", "% saturated", False),
        ("grad_std", "gradient std", True),
    )
    figure, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    labels = _labels(results)
    for row, label in enumerate(("no_bn", "bn")):
        run = results["runs"].get(label, {})
        steps = run.get("layer_steps", [])
        layers = run.get("layers", {})
        for column, (key, title, log) in enumerate(panels):
            axis = axes[row][column]
            for name, stats in layers.items():
                values = _finite(stats.get(key, []))
                if steps and values:
                    axis.plot(steps, values, label=name)
            if log:
                axis.set_yscale("log")
            axis.set_title(f"{labels[label]}: {title}")
            axis.grid(alpha=0.3)
            if row == 1:
                axis.set_xlabel("training step")
            if column == 0:
                axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _explain_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["layer", "kind", "input shape", "feature axis", "reduced axes", "values per statistic", "gamma, beta"]]
    for record in records:
        rows.append(
            [
                record["name"],
                record["kind"],
                "x".join(str(s) for s in record["input_shape"]),
                str(record["feature_axis"]),
                ", ".join(str(a) for a in record["reduced_axes"]),
                str(record["values_per_statistic"]),
                f"({record['num_features']},)" if record.get("param_shape") else "none",
            ]
        )
    return rows


def _explain_pictures(results: dict[str, Any]) -> str:
    """Each BN layer's input drawn (inline SVG, :mod:`batchnorm.lab.explain_html`); empty without explain records."""
    from batchnorm.lab.explain_html import explain_section

    try:
        return explain_section(results["explain"], heading="h3") if results.get("explain") else ""
    except (KeyError, TypeError, ValueError, IndexError):  # records of an older results.json: the table stays
        return ""


def format_summary(results: dict[str, Any]) -> str:
    """The final comparison table printed by ``compare``."""
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a ``compare`` run folder (``ValueError`` when missing, unreadable or of another kind)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: expected a folder written by `batchnorm compare`")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(results, dict) or "runs" not in results:
        raise ValueError(f"{path} is not a compare results file (no 'runs')")
    return results


def write_report(out_dir: str | Path, results: dict[str, Any], extra_sections: list[str] | None = None) -> Path:
    """Write ``accuracy.png``, ``percentiles.png``, ``layers.png`` and ``report.html`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "accuracy": (_accuracy_figure, "Test accuracy over training (the paper's Figure 1a)."),
        "percentiles": (
            _percentile_figure,
            "15th, 50th and 85th percentiles of the input to one sigmoid of the last hidden layer, over a fixed "
            "probe set of 1,000 test images in training-mode mini-batches (Figure 1b, c).",
        ),
        "layers": (
            _layer_figure,
            "Per hidden layer over training: activation std, percent of saturated units, and the std of the "
            "gradient reaching the layer (log scale).",
        ),
    }
    sections = []
    for name, (draw, caption) in figures.items():
        path = out / f"{name}.png"
        draw(results, path)
        sections.append(f"<figure>{embed_png(path)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    config = results.get("config", {})
    summary_text = format_summary(results) if "summary" in results else ""
    validation_text = f"; validation split: {results['validation']}" if results.get("validation") else ""
    seed_list = results.get("seeds") or []
    seeds_text = (
        f"Each arm ran with {len(seed_list)} seeds ({', '.join(str(s) for s in seed_list)}: init and batch "
        "order); the table gives mean ± sample std [min-max] over them, the accuracy figure the mean curve "
        f"and the min-max band, the other figures seed {seed_list[0]}. "
        if len(seed_list) > 1
        else ""
    )
    explain_html = _table(_explain_rows(results["explain"])) if results.get("explain") else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchnorm: with and without batch normalization</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
img {{ max-width: 100%; }} figure {{ margin: 1.5em 0; }} figcaption {{ color: #555; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; }}
pre {{ background: #f6f6f6; padding: 1em; white-space: pre-wrap; }}
</style></head><body>
<h1>Batch normalization in a deep network</h1>
<p>The same network ({html.escape(str(config.get("model", "")))}, {html.escape(str(config.get("act", "")))}) trained
from the same init ({html.escape(str(config.get("init", "")))}), seed and mini-batches of
{html.escape(str(config.get("batch_size", "")))}, {html.escape(_labels(results)["bn"])} and without.
{html.escape(seeds_text)}Data: {html.escape(str(results.get("dataset", "")))}{html.escape(validation_text)}.
SGD, learning rate {html.escape(str(config.get("lr", "")))},
momentum {html.escape(str(config.get("momentum", "")))}, {html.escape(str(config.get("steps", "")))} steps.</p>
<h2>Results</h2><pre>{html.escape(summary_text)}</pre>
<h2>What each BN layer computes</h2>
<p>Each BN layer has one mean, one variance, one gamma and one beta per feature of its <em>own</em> input;
a statistic pools every value of its feature over the reduced axes.</p>
{explain_html}
{_explain_pictures(results)}
<h2>Figures</h2>
{"".join(sections)}
{"".join(extra_sections or [])}
<h2>Definitions</h2>
<pre>{html.escape(json.dumps(results.get("definitions", {}), indent=2))}</pre>
<h2>Configuration</h2><pre>{html.escape(json.dumps(config, indent=2))}</pre>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
