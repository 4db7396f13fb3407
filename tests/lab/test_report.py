"""The report pages' content: HTML tables, axes named as the CLI names them, statistics, labels, colour scales.

The BN table is checked against statistics computed here with torch from the
layer's captured input; figure labels are read from the matplotlib figures;
the heatmap's colour limits and cell numbers are recorded from the drawing
calls.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from torch import nn

from batchnorm import BatchNorm2d
from batchnorm.lab import report, tune
from batchnorm.lab.explain import explain
from batchnorm.lab.rebuild import detect_kind, rebuild_report
from batchnorm.lab.report import bn_table, summary_rows, write_report


def _fake_compare(act: str = "relu") -> dict[str, Any]:
    steps = [10, 20, 30]
    layers = {
        f"act{i}": {
            "mean": [0.1] * 3,
            "std": [1.0, 0.9, 0.8],
            "saturated_pct": [5.0] * 3,
            "grad_std": [1e-3, 1e-4, 1e-5],
        }
        for i in (1, 2)
    }
    run = {
        "steps": steps,
        "test_accuracy": [0.5, 0.7, 0.9],
        "percentile_steps": steps,
        "percentiles": {"15": [-1.0, -1.1, -1.2], "50": [0.0, 0.1, 0.2], "85": [1.0, 1.2, 1.4]},
        "percentile_unit": {"layer": "act2", "unit": 0},
        "layer_steps": steps,
        "layers": layers,
        "diverged": None,
    }
    summary = {
        "diverged": None,
        "accuracy_at": {},
        "final_accuracy": 0.9,
        "final_val_accuracy": None,
        "steps_to_90pct": 30,
        "percentile_steadiness": 1.5,
    }
    return {
        "runs": {"bn": run, "no_bn": run},
        "config": {"model": "mlp:64-32-32-10", "act": act, "batch_size": 50, "lr": 0.5},
        "summary": {"checkpoints": [], "bn": dict(summary), "no_bn": dict(summary)},
        "definitions": {"percentile_steadiness": "drift"},
        "explain": [],
    }


def test_every_compare_figure_has_labelled_axes_and_names_the_nonlinearity() -> None:
    results = _fake_compare("relu")
    for draw in (report._accuracy_figure, report._percentile_figure, report._layer_figure):
        figure = draw(results)
        for axis in figure.axes:
            assert axis.get_xlabel(), (draw.__name__, axis.get_title())
            assert axis.get_ylabel(), (draw.__name__, axis.get_title())
        titles = " ".join(axis.get_title() for axis in figure.axes)
        if draw is report._percentile_figure:
            assert "relu" in titles
            assert "sigmoid" not in titles
        report.pyplot().close(figure)


def test_compare_page_uses_tables_captions_formulas_and_no_preformatted_text(tmp_path: Path) -> None:
    results = _fake_compare("tanh")
    page = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert "<pre" not in page
    assert page.count("<figure>") == page.count("<figcaption>") == 3
    assert "input to one tanh unit" in page
    assert "sigmoid unit" not in page
    # The results table cell for the final accuracy, as summary_rows gives it.
    assert "<td>final test accuracy</td><td>0.900</td><td>0.900</td>" in page
    # The configuration as a table, not JSON.
    assert "<td>act</td><td>tanh</td>" in page
    assert '{"model"' not in page
    # The formulas: batch mean, biased variance, the running update, eval with running statistics.
    assert "Training: batch statistics" in page
    assert "Eval (inference): running statistics" in page
    assert "running_mean &larr; (1 &minus; momentum)" in page
    assert "<script" not in page.split("<h2>What each BN layer")[0]  # no MathJax or other script


def test_compare_page_names_the_device(tmp_path: Path) -> None:
    results = _fake_compare()
    results["device"] = "cuda:0"
    page = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert "steps, on cuda:0.</p>" in page
    del results["device"]  # results written before the device was recorded
    assert ", on " not in write_report(tmp_path, results).read_text(encoding="utf-8").split("<h2>Results")[0]


def test_summary_rows_are_the_printed_table() -> None:
    results = _fake_compare()
    text = report.format_summary(results)
    for row in summary_rows(results):
        assert re.search(r"\s+".join(re.escape(cell) for cell in row if cell), text), row


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = BatchNorm2d(3)
        self.fc = nn.Linear(3 * 5 * 5, 4)
        self.bn_fc = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_fc(self.fc(self.bn(self.conv(x)).flatten(1)))


def _summary(values: torch.Tensor) -> str:
    array = values.double().numpy()
    return f"{array.mean():+.3f} [{array.min():+.3f}, {array.max():+.3f}]"


def test_bn_table_names_axes_like_the_cli_and_shows_batch_and_running_statistics() -> None:
    torch.manual_seed(0)
    model = _ConvNet()
    with torch.no_grad():  # running statistics that differ from the batch's
        model.bn.running_mean.copy_(torch.tensor([0.5, -0.25, 2.0]))
        model.bn.running_var.copy_(torch.tensor([1.5, 0.75, 3.0]))
    x = torch.randn(6, 1, 5, 5) * 2 + 1
    captured: dict[str, torch.Tensor] = {}
    model.bn.register_forward_hook(lambda m, i, o: captured.setdefault("bn", i[0].detach().clone()))
    model.bn_fc.register_forward_hook(lambda m, i, o: captured.setdefault("bn_fc", i[0].detach().clone()))
    table = bn_table(explain(model, x))
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    conv, dense = cells
    # Independent statistics: torch over the captured inputs (biased variance), and the buffers set above.
    conv_input, dense_input = captured["bn"], captured["bn_fc"]
    assert conv[:7] == [
        "bn",
        "BatchNorm2d",
        "N=6 x C=3 x H=5 x W=5",
        "C (3 features)",
        "N,H,W",
        "150 = N x H x W",
        "(3,)",
    ]
    assert conv[7] == _summary(conv_input.mean(dim=(0, 2, 3)))
    assert conv[8] == _summary(conv_input.var(dim=(0, 2, 3), correction=0))
    assert conv[9] == _summary(torch.tensor([0.5, -0.25, 2.0]))
    assert conv[10] == _summary(torch.tensor([1.5, 0.75, 3.0]))
    assert dense[2:6] == ["N=6 x D=4", "D (4 features)", "N", "6"]
    assert dense[7] == _summary(dense_input.mean(dim=0))
    assert dense[8] == _summary(dense_input.var(dim=0, correction=0))
    assert dense[9] == _summary(torch.zeros(4))
    assert dense[10] == _summary(torch.ones(4))


def test_heatmap_colour_scale_fits_the_values_and_cells_carry_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits: list[tuple[float, float]] = []
    texts: list[str] = []
    imshow, text = Axes.imshow, Axes.text

    def recording_imshow(self: Axes, *args: Any, **kwargs: Any) -> Any:
        limits.append((kwargs["vmin"], kwargs["vmax"]))
        return imshow(self, *args, **kwargs)

    def recording_text(self: Axes, x: float, y: float, s: str, *args: Any, **kwargs: Any) -> Any:
        texts.append(s)
        return text(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", recording_imshow)
    monkeypatch.setattr(Axes, "text", recording_text)
    grid = {"lr": [0.01, 0.1, 1.0], "momentum": [0.0, 0.9]}
    values = [0.91, 0.93, 0.95, 0.92, 0.94, 0.935]
    points = [(lr, m) for m in grid["momentum"] for lr in grid["lr"]]
    records = [
        {"number": i, "params": {"lr": lr, "momentum": m}, "state": "complete", "value": v, "val_loss": 0.1}
        for i, ((lr, m), v) in enumerate(zip(points, values))
    ]
    paths = tune.draw_heatmaps(records, grid, tmp_path, trial_steps=30)
    assert len(paths) == 1
    assert paths[0].is_file()
    assert limits == [(pytest.approx(min(values)), pytest.approx(max(values)))]
    assert sorted(texts) == sorted(f"{v:.3f}" for v in values)


def _write(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content))


def test_detect_kind_from_the_files(tmp_path: Path) -> None:
    cases = {
        "compare": ("results.json", {"runs": {}}),
        "experiment": ("results.json", {"experiment": "lr-sweep"}),
        "tune": ("tune.json", {"grid": {}}),
        "train": ("metrics.jsonl", None),
    }
    for kind, (name, content) in cases.items():
        folder = tmp_path / kind
        folder.mkdir()
        if content is None:
            (folder / name).write_text('{"step": 1, "train_loss": 2.0}\n')
        else:
            _write(folder / name, content)
        assert detect_kind(folder) == kind
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.pt").write_bytes(b"x")
    assert detect_kind(tmp_path / "ckpt") == "train"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param({}, "results.json does not exist, nor tune.json, metrics.jsonl or checkpoint.pt", id="empty"),
        pytest.param({"results.json": "{oops"}, "is not valid JSON", id="bad-json"),
        pytest.param({"results.json": "[1, 2]"}, "not a JSON object", id="not-object"),
        pytest.param({"results.json": '{"a": 1}'}, "is not a compare results file", id="unknown"),
        pytest.param({"results.json": '{"experiment": "nope"}'}, "unknown experiment 'nope'", id="experiment"),
        pytest.param({"tune.json": '{"grid": {}}'}, "tune.json is incomplete", id="tune-incomplete"),
        pytest.param({"checkpoint.pt": "garbage"}, "checkpoint", id="bad-checkpoint"),
    ],
)
def test_rebuild_refuses_what_it_cannot_read(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        rebuild_report(tmp_path)


def test_train_report_from_metrics_alone(tmp_path: Path) -> None:
    lines = [{"step": s, "train_loss": 2.0 / s, "val_accuracy": 0.1 * s, "test_accuracy": 0.09 * s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    kind, page_path = rebuild_report(tmp_path)
    page = page_path.read_text(encoding="utf-8")
    assert kind == "train"
    assert (tmp_path / "train.png").is_file()
    assert "<td>test accuracy</td><td class=num>0.27</td>" in page
    assert "3 evaluations" in page
    assert "<pre" not in page
    figure = report._train_figure(lines)
    assert [(a.get_xlabel(), a.get_ylabel()) for a in figure.axes] == [
        ("training step", "cross-entropy loss"),
        ("training step", "accuracy"),
    ]
    report.pyplot().close(figure)
    assert np.isfinite([line["train_loss"] for line in lines]).all()
