"""``explain`` as a picture: each BN layer's input tensor drawn as inline SVG, in a static HTML page.

For every record of :func:`batchnorm.lab.explain.explain`, :func:`layer_figure`
draws the layer's input as a labelled schematic: a conv input ``(N, C, H, W)``
as a row of example blocks, each a stack of ``C`` channel planes of ``H x W``;
a dense input ``(N, D)`` as a matrix; a sequence input ``(N, L, C)`` as a row
of ``L x C`` grids. Only the first few examples and features are drawn (with
``...`` and the true sizes written out). One feature is highlighted in every
example and position, which is exactly the set of values pooled into that
feature's single mean and variance; the reduced axes are marked. Next to the
drawing: the count of values per statistic, the shapes of gamma and beta, and
the statistics the layer uses in training (this batch's mean and biased
variance) and in eval (its running mean and variance), side by side, with the
numbers of the highlighted feature.

:func:`explain_section` is the HTML fragment that reports embed;
:func:`explain_page` a whole page; :func:`write_explain_page` writes one after
:func:`check_output_file` has checked the path. The page needs no server and
loads nothing: inline SVG, inline CSS, and a few lines of inline JavaScript
that add a slider to step through the features of a layer. Without
JavaScript the page shows the same drawings and numbers for the highlighted
feature. The markup is well-formed XML (XHTML-compatible), so it can be
checked with any XML parser.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchnorm.lab.explain import axis_letters, reduced_axes_text

__all__ = ["check_output_file", "explain_page", "explain_section", "layer_figure", "write_explain_page"]

MAX_EXAMPLES = 4  # example blocks drawn (N)
MAX_PLANES = 8  # channel planes drawn per example (C)
MAX_ROWS = 8  # rows drawn in a matrix or grid
MAX_COLUMNS = 12  # columns drawn in a matrix (D)
MAX_GRID_COLUMNS = 8  # feature columns drawn per example in a sequence grid (C)

FEATURE_COLOR = "#f28e2b"
REDUCED_COLOR = "#1f5fa8"

CSS = """
.bn-explain { font-family: system-ui, sans-serif; color: #222; }
.bn-explain figure.bn-layer { border: 1px solid #d8d8d8; border-radius: 6px; padding: 0.8em 1em; margin: 1.2em 0; }
.bn-explain figure.bn-layer h3 { margin: 0 0 0.4em 0; font-size: 1.1em; }
.bn-explain svg { display: block; max-width: 100%; height: auto; }
.bn-explain svg text { font-family: system-ui, sans-serif; font-size: 12px; fill: #333; }
.bn-explain svg text.reduced { fill: #1f5fa8; font-weight: 600; }
.bn-explain svg text.feature { fill: #b35806; font-weight: 600; }
.bn-explain svg text.title { font-size: 13px; font-weight: 600; }
.bn-explain .cell { fill: #e4ecf6; stroke: #7f93ad; stroke-width: 0.8; }
.bn-explain .cell.hl { fill: #f28e2b; stroke: #a34f00; }
.bn-explain .grid { stroke: #9fb0c6; stroke-width: 0.5; }
.bn-explain .brace { stroke: #1f5fa8; stroke-width: 1.5; fill: none; }
.bn-explain .facts { margin: 0.6em 0; }
.bn-explain .facts li { margin: 0.15em 0; }
.bn-explain .modes { display: flex; gap: 1em; flex-wrap: wrap; }
.bn-explain .mode { flex: 1 1 20em; border: 1px solid #ccc; border-radius: 4px; padding: 0.5em 0.8em; }
.bn-explain .mode.used { border: 2px solid #444; }
.bn-explain .mode h4 { margin: 0.1em 0 0.4em 0; }
.bn-explain .mode table { border-collapse: collapse; }
.bn-explain .mode td { padding: 0.1em 0.6em 0.1em 0; }
.bn-explain .mode td.num { font-family: ui-monospace, monospace; text-align: right; }
.bn-explain .swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: -0.1em;
  background: #f28e2b; border: 1px solid #a34f00; }
.bn-explain .slider label { font-size: 0.95em; }
.bn-explain figcaption { color: #555; margin-top: 0.5em; }
"""

# Steps every figure through its features: numbers from the figure's data-stats, highlight moved.
SCRIPT = """
(function () {
  function fmt(v) { return (v === null || v === undefined) ? "-" : Number(v).toPrecision(6); }
  var figures = document.querySelectorAll("figure.bn-layer");
  for (var i = 0; i < figures.length; i++) {
    (function (fig) {
      var stats = JSON.parse(fig.getAttribute("data-stats"));
      var box = fig.querySelector(".slider");
      var range = fig.querySelector("input.feature-slider");
      if (!box || !range) { return; }
      box.removeAttribute("hidden");
      range.addEventListener("input", function () {
        var k = Number(range.value);
        var fields = fig.querySelectorAll("[data-field]");
        for (var j = 0; j < fields.length; j++) {
          var values = stats[fields[j].getAttribute("data-field")];
          fields[j].textContent = values ? fmt(values[k]) : "-";
        }
        var cells = fig.querySelectorAll("[data-feature]");
        for (var c = 0; c < cells.length; c++) {
          var on = Number(cells[c].getAttribute("data-feature")) === k;
          cells[c].setAttribute("class", on ? "cell hl" : "cell");
        }
        var labels = fig.querySelectorAll(".feature-index");
        for (var l = 0; l < labels.length; l++) { labels[l].textContent = String(k); }
      });
    })(figures[i]);
  }
})();
"""


def _attr(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _text(x: float, y: float, content: str, css: str = "", anchor: str = "start", rotate: bool = False) -> str:
    """One SVG ``<text>`` element (escaped; optionally rotated by -90 degrees around its anchor)."""
    extra = f' class="{css}"' if css else ""
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}{turn}>{html.escape(content)}</text>'


def _rect(x: float, y: float, width: float, height: float, feature: int | None = None, highlight: bool = False) -> str:
    data = f' data-feature="{feature}"' if feature is not None else ""
    css = "cell hl" if highlight else "cell"
    return f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" class="{css}"{data}/>'


def _line(x1: float, y1: float, x2: float, y2: float, css: str = "grid") -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" class="{css}"/>'


def _brace(x1: float, x2: float, y: float) -> str:
    """A square bracket under ``[x1, x2]`` at height ``y``: marks an axis that is reduced."""
    return (
        f'<path d="M {x1:.1f} {y - 5:.1f} L {x1:.1f} {y:.1f} L {x2:.1f} {y:.1f} L {x2:.1f} {y - 5:.1f}" class="brace"/>'
    )


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (
        f'<svg viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" role="img" '
        f'aria-label="{_attr(label)}">' + "".join(body) + "</svg>"
    )


def _axis_label(letter: str, size: int, reduced: bool) -> str:
    return f"{letter}={size} " + ("(reduced)" if reduced else "(feature axis)")


def _conv_svg(shape: Sequence[int], letters: Sequence[str], feature: int) -> str:
    """``(N, C, *spatial)``: up to 4 example blocks, each a stack of up to 8 channel planes."""
    n, c = shape[0], shape[1]
    spatial = list(zip(letters[2:], shape[2:]))
    n_draw, c_draw = min(n, MAX_EXAMPLES), min(c, MAX_PLANES)
    plane, step, gap = 72.0, 8.0, 46.0
    left, top = 44.0, 44.0
    block = plane + step * (c_draw - 1)
    body: list[str] = []
    for example in range(n_draw):
        bx = left + example * (block + gap)
        for channel in reversed(range(c_draw)):  # the back plane first; channel 0 in front
            px, py = bx + channel * step, top + (c_draw - 1 - channel) * step
            body.append(_rect(px, py, plane, plane, channel, channel == feature))
            if channel == 0 or channel == feature:
                rows, columns = min(shape[-2], 8), min(shape[-1], 8)
                body += [_line(px, py + plane * r / rows, px + plane, py + plane * r / rows) for r in range(1, rows)]
                body += [
                    _line(px + plane * k / columns, py, px + plane * k / columns, py + plane) for k in range(1, columns)
                ]
        body.append(_text(bx + block / 2, top + block + 30, f"example {example}", anchor="middle"))
    right = left + n_draw * block + (n_draw - 1) * gap
    if n > n_draw:
        body.append(_text(right + 10, top + block / 2, f"... {n - n_draw} more", anchor="start"))
        right += 80
    bottom = top + block + 42
    body.append(_brace(left, right, bottom))
    body.append(_text((left + right) / 2, bottom + 16, _axis_label(letters[0], n, True), "reduced", "middle"))
    # Labels on the first block: the spatial axes along its front plane, the channels along the stack.
    front_y = top + (c_draw - 1) * step
    body.append(_text(left - 8, front_y + plane / 2, _axis_label(*spatial[-2], True), "reduced", "middle", True))
    body.append(_text(left, front_y + plane + 14, _axis_label(*spatial[-1], True), "reduced"))
    if len(spatial) > 2:  # (N, C, D, H, W): each plane stands for a D x H x W volume
        body.append(_text(left, top - 28, _axis_label(*spatial[0], True) + ": each plane is D x H x W", "reduced"))
    channels = f"{letters[1]}={c} (feature axis" + (f", first {c_draw} drawn)" if c > c_draw else ")")
    body.append(_text(left, top - 10, channels, "feature"))
    svg_width = max(right + 30, left + block + 40, 360)
    return _svg(svg_width, bottom + 30, body, f"input tensor {'x'.join(map(str, shape))}")


def _matrix_svg(shape: Sequence[int], letters: Sequence[str], feature: int) -> str:
    """``(N, D)``: a matrix of examples (rows) by features (columns)."""
    n, d = shape
    rows, columns = min(n, MAX_ROWS), min(d, MAX_COLUMNS)
    cell, left, top = 22.0, 70.0, 40.0
    body: list[str] = []
    for r in range(rows):
        for k in range(columns):
            body.append(_rect(left + k * cell, top + r * cell, cell, cell, k, k == feature))
    right, bottom = left + columns * cell, top + rows * cell
    if d > columns:
        body.append(_text(right + 6, top + rows * cell / 2, f"... {d - columns} more", anchor="start"))
    if n > rows:
        body.append(_text(left + columns * cell / 2, bottom + 16, f"... {n - rows} more examples", anchor="middle"))
    features = f"{letters[1]}={d} (feature axis" + (f", first {columns} drawn)" if d > columns else ")")
    body.append(_text(left, top - 10, features, "feature"))
    body.append(f'<path d="M {left - 8:.1f} {top:.1f} L {left - 14:.1f} {top:.1f} L {left - 14:.1f} {bottom:.1f} '
                f'L {left - 8:.1f} {bottom:.1f}" class="brace"/>')  # fmt: skip
    body.append(_text(left - 22, (top + bottom) / 2, _axis_label(letters[0], n, True), "reduced", "middle", True))
    return _svg(max(right + 110, 360), bottom + 30, body, f"input tensor {n}x{d}")


def _grid_svg(shape: Sequence[int], letters: Sequence[str], feature_axis: int, feature: int) -> str:
    """``(N, L, C)`` or ``(N, C, L)``: one grid per example, positions as rows, features as columns."""
    n = shape[0]
    position_axis = 1 if feature_axis == 2 else 2
    positions, features = shape[position_axis], shape[feature_axis]
    n_draw, rows, columns = min(n, MAX_EXAMPLES), min(positions, MAX_ROWS), min(features, MAX_GRID_COLUMNS)
    cell, gap, left, top = 16.0, 40.0, 60.0, 40.0
    block = columns * cell
    body: list[str] = []
    for example in range(n_draw):
        bx = left + example * (block + gap)
        for r in range(rows):
            for k in range(columns):
                body.append(_rect(bx + k * cell, top + r * cell, cell, cell, k, k == feature))
        if positions > rows:
            body.append(_text(bx + block / 2, top + rows * cell + 13, "...", anchor="middle"))
        body.append(_text(bx + block / 2, top + rows * cell + 28, f"example {example}", anchor="middle"))
    right = left + n_draw * block + (n_draw - 1) * gap
    if n > n_draw:
        body.append(_text(right + 10, top + rows * cell / 2, f"... {n - n_draw} more", anchor="start"))
        right += 80
    bottom = top + rows * cell + 38
    body.append(_brace(left, right, bottom))
    body.append(_text((left + right) / 2, bottom + 16, _axis_label(letters[0], n, True), "reduced", "middle"))
    position_label = _axis_label(letters[position_axis], positions, True) + (" rows" if positions <= rows else "")
    body.append(_text(left - 10, top + rows * cell / 2, position_label, "reduced", "middle", True))
    feature_label = f"{letters[feature_axis]}={features} (feature axis" + (
        f", first {columns} drawn)" if features > columns else ")"
    )
    body.append(_text(left, top - 10, feature_label, "feature"))
    return _svg(max(right + 30, 360), bottom + 30, body, f"input tensor {'x'.join(map(str, shape))}")


def _generic_svg(shape: Sequence[int], letters: Sequence[str], feature_axis: int) -> str:
    """Any other layout: one labelled box per axis, the feature axis in the feature colour."""
    body: list[str] = []
    x = 20.0
    for axis, (letter, size) in enumerate(zip(letters, shape)):
        is_feature = axis == feature_axis
        label = _axis_label(letter, size, not is_feature)
        width = 8.0 * len(label) + 16
        body.append(_rect(x, 20, width, 34, axis if is_feature else None, is_feature))
        body.append(_text(x + width / 2, 42, label, "feature" if is_feature else "reduced", "middle"))
        x += width + 10
    return _svg(x + 10, 74, body, f"input tensor {'x'.join(map(str, shape))}")


def _drawing(record: dict[str, Any], feature: int) -> str:
    shape, axis = record["input_shape"], record["feature_axis"]
    letters = axis_letters(record)
    if len(shape) == 2 and axis == 1:
        return _matrix_svg(shape, letters, feature)
    if len(shape) == 3 and axis in (1, 2):
        return _grid_svg(shape, letters, axis, feature)
    if len(shape) in (4, 5) and axis == 1:
        return _conv_svg(shape, letters, feature)
    return _generic_svg(shape, letters, axis)


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-" if value is None else str(value)
    return f"{value:.6g}"


def _value(values: list[float] | None, feature: int) -> float | None:
    return None if values is None or feature >= len(values) else float(values[feature])


def count_text(record: dict[str, Any]) -> str:
    """``60 x 28 x 28 = 47,040 values -> 1 mean, 1 variance`` for one feature of the record."""
    shape = record["input_shape"]
    sizes = [str(shape[axis]) for axis in record["reduced_axes"]]
    count = int(record["values_per_statistic"])
    product = f"{' x '.join(sizes)} = {count:,}" if len(sizes) > 1 else f"{count:,}"
    return f"{product} values -> 1 mean, 1 variance"


def _mode_box(title: str, used: bool, rows: list[tuple[str, str, float | None]], note: str) -> str:
    cells = "".join(
        f'<tr><td>{html.escape(name)}</td><td class="num" data-field="{field}" data-value="{_attr(repr(value))}">'
        f"{html.escape(_number(value))}</td></tr>"
        for name, field, value in rows
    )
    flag = " - used in this run" if used else ""
    return (
        f'<div class="mode{" used" if used else ""}"><h4>{html.escape(title)}{html.escape(flag)}</h4>'
        f"<table><tbody>{cells}</tbody></table><p>{note}</p></div>"
    )


def layer_figure(record: dict[str, Any], feature: int = 0) -> str:
    """One BN layer as an HTML ``<figure>``: the input drawn as SVG, the counts, and train vs eval statistics.

    Args:
        record: one entry of :func:`batchnorm.lab.explain.explain`.
        feature: the feature to highlight (its numbers are shown; the slider starts there).
    """
    num_features = int(record["num_features"])
    if not 0 <= feature < max(num_features, 1):
        raise ValueError(f"feature {feature} is out of range: layer {record['name']!r} has {num_features} features")
    letters = axis_letters(record)
    shape = record["input_shape"]
    shape_text = " x ".join(f"{letter}={size}" for letter, size in zip(letters, shape))
    reduced = reduced_axes_text(record)
    feature_letter = letters[record["feature_axis"]]
    m = int(record["values_per_statistic"])
    params = f"({num_features},)" if record.get("param_shape") else "none (affine=False)"
    running = record.get("running_mean") is not None
    momentum = record.get("momentum")
    update = (
        "a cumulative average over the batches seen"
        if momentum is None
        else f"running = (1 - {momentum:g}) * running + {momentum:g} * batch"
    )
    stats = {
        "batch_mean": record.get("batch_mean"),
        "batch_var": record.get("batch_var"),
        "running_mean": record.get("running_mean"),
        "running_var": record.get("running_var"),
        "weight": record.get("weight"),
        "bias": record.get("bias"),
    }
    train_rows = [
        ("batch mean", "batch_mean", _value(stats["batch_mean"], feature)),
        ("batch variance (biased)", "batch_var", _value(stats["batch_var"], feature)),
        ("gamma", "weight", _value(stats["weight"], feature)),
        ("beta", "bias", _value(stats["bias"], feature)),
    ]
    eval_rows = [
        ("running_mean", "running_mean", _value(stats["running_mean"], feature)),
        ("running_var", "running_var", _value(stats["running_var"], feature)),
        ("gamma", "weight", _value(stats["weight"], feature)),
        ("beta", "bias", _value(stats["bias"], feature)),
    ]
    train_note = (
        f"model.train(): the layer normalizes with the mean and biased variance of these {m:,} values of this "
        "batch" + (f"; then its running statistics move: {html.escape(update)}, with the unbiased variance "
                   f"(x {m}/{m - 1})." if running and m > 1 else ".")
    )  # fmt: skip
    eval_note = (
        "model.eval(): the layer normalizes with its stored running_mean and running_var, whatever the batch; "
        "nothing is updated."
        if running
        else "This layer keeps no running statistics: in eval it uses the batch statistics too."
    )
    used = record.get("normalizes_with", "batch")
    modes = (
        '<div class="modes">'
        + _mode_box("Training: batch statistics", used == "batch", train_rows, train_note)
        + _mode_box("Eval: running statistics", used == "running", eval_rows if running else train_rows, eval_note)
        + "</div>"
    )
    name = html.escape(str(record["name"]))
    data = html.escape(json.dumps(stats, separators=(",", ":")), quote=True)
    slider = (
        f'<p class="slider" hidden="hidden"><label>feature <span class="feature-index">{feature}</span> of '
        f'{num_features}: <input type="range" class="feature-slider" min="0" max="{max(num_features - 1, 0)}" '
        f'value="{feature}" aria-label="feature of {name}"/></label></p>'
    )
    facts = (
        '<ul class="facts">'
        f"<li>input <strong>{html.escape(shape_text)}</strong>, feature axis {record['feature_axis']} "
        f"({html.escape(feature_letter)}): {num_features} features, {num_features} means and {num_features} "
        "variances</li>"
        f'<li>reduced over <strong class="reduced-axes">{html.escape(reduced)}</strong>: per feature '
        f'<strong class="count">{html.escape(count_text(record))}</strong></li>'
        f"<li>gamma, beta: {html.escape(params)} each</li>"
        f'<li><span class="swatch"></span> highlighted: feature <span class="feature-index">{feature}</span>, '
        f"every value with that index on axis {html.escape(feature_letter)}, in every example and position</li>"
        "</ul>"
    )
    caption = (
        f"{name} ({html.escape(str(record['kind']))}): the orange values, {m:,} of them, are pooled into one mean "
        "and one variance; each other feature has its own, from its own slice."
    )
    return (
        f'<figure class="bn-layer" id="layer-{_attr(record["name"])}" data-layer="{_attr(record["name"])}" '
        f'data-stats="{data}"><h3>{name} <small>{html.escape(str(record["kind"]))}</small></h3>'
        f"{_drawing(record, feature)}{slider}{facts}{modes}<figcaption>{caption}</figcaption></figure>"
    )


def explain_section(
    records: Sequence[dict[str, Any]], highlight: dict[str, int] | None = None, heading: str = "h2"
) -> str:
    """The pictures of every BN layer as one self-contained HTML ``<section>`` (its CSS and script inline).

    Args:
        records: the output of :func:`batchnorm.lab.explain.explain`.
        highlight: the feature to highlight per layer name (default feature 0).
        heading: the heading element of the section title.
    """
    highlight = highlight or {}
    figures = "".join(layer_figure(record, highlight.get(str(record["name"]), 0)) for record in records)
    intro = (
        "<p>Each box below is one BN layer's input on this batch. The layer owns one mean, one variance, one "
        "gamma and one beta per feature (the orange axis label); a feature's statistics pool every value of "
        "that feature over the reduced axes (blue), so layers of any width or shape each get statistics sized "
        "to their own input.</p>"
    )
    body = figures or "<p>This model has no batch-norm layer: nothing computes a mean and variance over the batch.</p>"
    return (
        f'<section class="bn-explain"><style>{CSS}</style>'
        f"<{heading}>What each BN layer computes, drawn</{heading}>{intro}{body}"
        f"<script>//<![CDATA[{SCRIPT}//]]></script></section>"
    )


def explain_page(
    records: Sequence[dict[str, Any]],
    *,
    title: str = "batchnorm explain",
    context: str = "",
    highlight: dict[str, int] | None = None,
) -> str:
    """A whole static HTML page (no external assets) with :func:`explain_section` and a line of ``context``."""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"/><title>{html.escape(title)}</title>'
        "<style>body { max-width: 1100px; margin: 2em auto; padding: 0 1em; font-family: system-ui, sans-serif; }"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(context)}</p>"
        f"{explain_section(records, highlight)}</body></html>\n"
    )


def check_output_file(path: str | Path) -> Path:
    """Check, before any work, that ``path`` can be written as a file; return it.

    An existing file is overwritten. Raises ``ValueError`` (one line) for a
    directory, a missing parent folder, a parent that is not a folder, or a
    place this process cannot write.
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{target} is a directory: give a file name for the page, e.g. {target / 'explain.html'}")
    parent = target.parent
    if not parent.exists():
        raise ValueError(f"cannot write {target}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"cannot write {target}: {parent} is not a folder")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"cannot write {target}: the file is not writable")
    if not target.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {target}: the folder {parent} is not writable")
    return target


def write_explain_page(path: str | Path, records: Sequence[dict[str, Any]], **options: Any) -> Path:
    """Write :func:`explain_page` to ``path`` (checked with :func:`check_output_file`); return the path."""
    target = check_output_file(path)
    try:
        target.write_text(explain_page(records, **options), encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot write {target}: {error.strerror or error}") from None
    return target
