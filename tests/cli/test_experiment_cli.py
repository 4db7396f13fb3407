"""``batchnorm experiment NAME``: help, a tiny run per experiment on synthetic data, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli

SYNTHETIC = ["--data", "synthetic", "--no-progress", "--seeds", "2"]
TINY = {
    "lr-sweep": ["--lrs", "0.5,100000", "--steps", "20", "--eval-every", "10", "--threshold", "0"],
    "small-batch": ["--batch-sizes", "6,12", "--norms", "batch,layer"],
    "eval-stats": ["--batch-sizes", "4,12", "--steps", "30", "--eval-every", "10", "--checkpoints", "2"],
}
FIGURES = {
    "lr-sweep": ["lr_accuracy.png", "lr_loss.png"],
    "small-batch": ["batch_accuracy.png", "batch_val_accuracy.png"],
    "eval-stats": ["eval_stats.png", "eval_stats_checkpoints.png"],
}


def _words(text: str) -> str:
    return " ".join(text.split())


def _one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_help_names_the_experiments_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["experiment", "--help"], capsys)
    assert code == 0
    text = _words(out)
    for mention in (
        "lr-sweep",
        "small-batch",
        "eval-stats",
        "--seeds",
        "--out",
        "--lrs",
        "--batch-sizes",
        "--norms",
        "--epochs",
        "--checkpoints",
        "validation split",
        "under 5 minutes",
    ):
        assert mention in text, mention


@pytest.mark.parametrize("name", list(TINY))
def test_a_tiny_run_writes_results_figures_and_report(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / name
    code, stdout, err = run_cli(["experiment", name, *SYNTHETIC, *TINY[name], "--out", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name
    assert results["seeds"] == [0, 1]
    for file in ["report.html", *FIGURES[name]]:
        assert (out / file).stat().st_size > 0, file
    assert f"wrote {out / 'results.json'}" in stdout
    for line in results["findings"]:
        assert f"- {line}" in stdout
    assert "±" in stdout  # mean ± std [min-max] in the table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lr-sweep", "--epochs", "2"], "--epochs applies to small-batch, not to lr-sweep"),
        (["small-batch", "--steps", "10"], "--steps applies to lr-sweep and eval-stats, not to small-batch"),
        (["eval-stats", "--norms", "batch"], "--norms applies to small-batch, not to eval-stats"),
        (["lr-sweep", "--seeds", "0"], "expected a positive integer, got '0'"),
        (["lr-sweep", "--lrs", "0.1,-1"], "argument --lrs: expected a finite number >= 0, got '-1'"),
        (["lr-sweep", "--threshold", "1.5"], "expected a number >= 0 and < 1, got '1.5'"),
        (["small-batch", "--norms", "batch,bogus"], "unknown norm 'bogus'"),
        (["small-batch", "--batch-sizes", "1,4"], "needs batches of at least 2"),
        (["small-batch", "--batch-sizes", "4,4"], "--batch-sizes has repeated values"),
        (["eval-stats", "--steps", "10"], "too short for 5 checkpoints"),
        (["lr-sweep", "--val-fraction", "0"], "--val-fraction must be > 0"),
        (["lr-sweep", "--lrs", ","], "--lrs needs at least one value"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_options_give_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["experiment", *argv, "--no-progress", "--out", str(tmp_path / "x")], capsys)
    _one_line_error(code, err, message)
    assert not (tmp_path / "x" / "results.json").exists()
