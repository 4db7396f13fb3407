"""``batchnorm tune``: grid strings, the search on synthetic data, divergence, resume after a kill, outputs.

The runs use the synthetic data set (8x8 templates plus noise) and a tiny
64-32-10 network, so each trial takes tens of milliseconds. The grid is
built so that one setting is clearly best: with 60 steps a learning rate of
1e-4 cannot learn, 0.01 learns partly, 1 learns fully, and 1000 blows up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchnorm.cli import main
from batchnorm.lab import training
from batchnorm.lab.data import load_dataset
from batchnorm.lab.training import TrainConfig, train
from batchnorm.lab.tune import FINISHED_STATES, parse_grid

SMALL = ["--data", "synthetic", "--model", "mlp:64-32-10", "--no-progress"]


def _tune(out: Path, *options: str) -> int:
    return main(["tune", *SMALL, "--out", str(out), *options])


def _load(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out / "tune.json").read_text())
    return result


def _finished_per_point(results: dict[str, Any]) -> Counter[tuple[tuple[str, Any], ...]]:
    return Counter(
        tuple(sorted(trial["params"].items())) for trial in results["trials"] if trial["state"] in FINISHED_STATES
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """One search over lr x norm with the full run: (folder, exit code)."""
    out = tmp_path_factory.mktemp("tune")
    code = _tune(
        out,
        "--grid",
        "lr=0.0001,0.01,1,1000",
        "--grid",
        "norm=batch,none",
        "--trial-steps",
        "60",
        "--steps",
        "120",
    )
    return out, code


# --------------------------------------------------------------------------- grid strings


def test_parse_grid_converts_and_keeps_order() -> None:
    grid = parse_grid(["weight-decay=0,1e-4", "--lr=0.1,1", "batch_size=32,64", "norm=none,batch"])
    assert grid == {"weight_decay": [0.0, 1e-4], "lr": [0.1, 1.0], "batch_size": [32, 64], "norm": ["none", "batch"]}


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        pytest.param(["foo=1"], r"unknown option 'foo'; choose from lr, momentum", id="unknown-option"),
        pytest.param(["lr="], r"empty value", id="empty-values"),
        pytest.param(["lr=0.1,,1"], r"empty value", id="empty-value-in-list"),
        pytest.param(["lr=abc"], r"--grid lr: expected numbers, got 'abc'", id="not-a-number"),
        pytest.param(["lr=0"], r"--grid lr: expected finite numbers > 0, got '0'", id="zero-lr"),
        pytest.param(["momentum=-1"], r"expected finite numbers >= 0, got '-1'", id="negative-momentum"),
        pytest.param(["batch-size=1.5"], r"--grid batch-size: expected positive integers, got '1.5'", id="not-int"),
        pytest.param(
            ["norm=foo"],
            r"--grid norm: expected one of batch, renorm, ghost, frozen, group, layer, none, got 'foo'",
            id="bad-choice",
        ),
        pytest.param(["init=uniform"], r"--grid init:", id="bad-init"),
        pytest.param(["lr"], r"expected NAME=V1,V2,... \(no '=' found\)", id="missing-equals"),
        pytest.param(["lr=1,1.0"], r"value '1.0' is listed twice", id="repeated-value"),
        pytest.param(["lr=1", "lr=2"], r"--grid lr is given twice", id="repeated-option"),
        pytest.param([], r"give at least one --grid", id="no-grid"),
    ],
)
def test_parse_grid_rejects(texts: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_grid(texts)


@pytest.mark.parametrize(
    "grid",
    [
        pytest.param(["foo=1"], id="unknown-option"),
        pytest.param(["lr="], id="empty-values"),
        pytest.param(["lr=abc"], id="not-a-number"),
        pytest.param(["norm=foo"], id="bad-choice"),
        pytest.param(["lr"], id="missing-equals"),
        pytest.param(["batch-size=1"], id="invalid-point"),  # BN needs 2 values per statistic
    ],
)
def test_bad_grid_is_one_line_exit_2(
    grid: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHNORM_DEBUG", raising=False)
    code = _tune(tmp_path, *[f"--grid={text}" for text in grid])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("batchnorm: error: --grid") or "batch-size" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err
    assert not (tmp_path / "tune.json").exists()


# --------------------------------------------------------------------------- the search


def test_search_picks_the_true_best(searched: tuple[Path, int]) -> None:
    out, code = searched
    assert code == 0
    results = _load(out)
    completed = [trial for trial in results["trials"] if trial["state"] == "complete"]
    top = max(trial["value"] for trial in completed)
    assert results["best"] == {"lr": 1.0, "norm": "batch"}
    assert results["best_trial"]["value"] == top
    best_trials = [trial for trial in completed if trial["params"] == results["best"]]
    assert len(best_trials) == 1
    assert best_trials[0]["value"] == top
    assert top > 0.9
    tiny = [trial["value"] for trial in completed if trial["params"]["lr"] == 0.0001]
    assert max(tiny) < 0.5  # 60 steps at lr 1e-4 learn nothing: the best is not a tie by luck


def test_diverging_trial_is_recorded_as_diverged(searched: tuple[Path, int]) -> None:
    results = _load(searched[0])
    absurd = [trial for trial in results["trials"] if trial["params"] == {"lr": 1000.0, "norm": "none"}]
    assert len(absurd) == 1
    assert absurd[0]["state"] == "diverged"
    assert absurd[0]["value"] is None
    assert "diverged" in absurd[0]["message"]
    assert absurd[0]["steps"] < 60  # stopped early by the guard


def test_tune_json_schema(searched: tuple[Path, int]) -> None:
    results = _load(searched[0])
    assert {"trials", "best", "final"} <= set(results)
    assert len(results["trials"]) == 8
    per_point = _finished_per_point(results)
    assert len(per_point) == 8
    assert set(per_point.values()) == {1}
    for trial in results["trials"]:
        assert set(trial["params"]) == {"lr", "norm"}
        assert trial["state"] in ("complete", "diverged")
        assert (trial["value"] is None) == (trial["state"] == "diverged")
    final = results["final"]
    assert final["state"] == "complete"
    assert final["params"] == results["best"]
    assert final["steps"] == 120
    assert 0.0 <= final["test_accuracy"] <= 1.0
    assert Path(final["checkpoint"]).is_file()


def test_heatmaps_and_report(searched: tuple[Path, int]) -> None:
    out = searched[0]
    heatmap = out / "heatmap_lr.png"  # one panel per norm, side by side
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1
    assert "Grid search" in page
    assert "diverged" in page


def test_rerun_trains_nothing_again(searched: tuple[Path, int], capsys: pytest.CaptureFixture[str]) -> None:
    out = searched[0]
    before = _load(out)
    code = _tune(out, "--grid", "lr=0.0001,0.01,1,1000", "--grid", "norm=batch,none", "--trial-steps", "60")
    assert code == 0
    after = _load(out)
    assert [t["number"] for t in after["trials"]] == [t["number"] for t in before["trials"]]
    assert after["final"]["resumed_from"] is not None  # the full run was resumed, not repeated
    assert "rank" in capsys.readouterr().out


def test_another_grid_is_another_study(searched: tuple[Path, int]) -> None:
    out = searched[0]
    assert _tune(out, "--grid", "lr=0.01,1", "--trial-steps", "60", "--no-final") == 0
    results = _load(out)
    assert results["study"] != json.loads(json.dumps(results))["storage"]
    assert len(results["trials"]) == 2


def test_study_name_of_another_search_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _tune(tmp_path, "--grid", "lr=0.01,1", "--trial-steps", "20", "--no-final", "--study-name", "s") == 0
    code = _tune(tmp_path, "--grid", "lr=0.1,1", "--trial-steps", "20", "--no-final", "--study-name", "s")
    assert code == 2
    assert "holds another search" in capsys.readouterr().err


# --------------------------------------------------------------------------- a killed study


def _states(database: Path) -> list[str]:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            return [row[0] for row in connection.execute("SELECT state FROM trials")]
    except sqlite3.Error:
        return []  # not created yet


@pytest.mark.slow
def test_killed_study_resumes_each_point_once(tmp_path: Path) -> None:
    grid = ["--grid", "lr=0.01,0.1,1", "--grid", "momentum=0,0.9", "--trial-steps", "800", "--no-final"]
    command = [sys.executable, "-m", "batchnorm", "tune", *SMALL, "--out", str(tmp_path), *grid]
    environment = {**os.environ, "BATCHNORM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            states = _states(tmp_path / "study.db")
            if states.count("COMPLETE") >= 2 and "RUNNING" in states:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the first run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert _states(tmp_path / "study.db").count("COMPLETE") < 6

    assert main(["tune", *SMALL, "--out", str(tmp_path), *grid, "--jobs", "2"]) == 0
    results = _load(tmp_path)
    per_point = _finished_per_point(results)
    assert len(per_point) == 6
    assert set(per_point.values()) == {1}
    states = Counter(trial["state"] for trial in results["trials"])
    assert states["interrupted"] <= 1
    assert set(states) <= {"complete", "diverged", "interrupted"}


# --------------------------------------------------------------------------- selection on the validation split


def test_selection_uses_the_validation_split_when_the_test_split_disagrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Test labels shifted by one class: a net that learns scores ~0 on test, one that cannot learn ~0.1.

    Selecting on test would pick lr=0.0001; on the validation split (real labels, held out of the
    training split) lr=1 is far better, and it must be the one picked.
    """
    real = load_dataset("synthetic")
    shifted = dataclasses.replace(real, test_labels=(real.test_labels + 1) % 10)
    monkeypatch.setattr("batchnorm.lab.tune.load_dataset", lambda *args, **kwargs: shifted)
    code = _tune(tmp_path, "--grid", "lr=0.0001,1", "--trial-steps", "60", "--steps", "60", "--eval-every", "20")
    assert code == 0, capsys.readouterr().err
    results = _load(tmp_path)
    assert results["objective"] == "val_accuracy"
    assert results["best"] == {"lr": 1.0}
    values = {trial["params"]["lr"]: trial["value"] for trial in results["trials"]}
    assert values[1.0] > 0.9 > 0.5 > values[0.0001]
    # Each trial's value is the validation accuracy of the same run trained on its own (deterministic).
    base = TrainConfig(model="mlp:64-32-10", data="synthetic", steps=60, eval_every=20)
    for lr, value in values.items():
        again = train(dataclasses.replace(base, lr=lr), None, dataset=shifted, progress=False, test_eval="every")
        assert again.final_val_accuracy == value
        test_accuracy = again.final_accuracy
        if lr == 1.0:
            assert test_accuracy < 0.1  # what selecting on the test split would have punished
    for trial in results["trials"]:  # trials never measure the test split
        assert not any(key.startswith("test") for key in trial)
    final = results["final"]
    assert final["params"] == {"lr": 1.0}
    assert final["val_accuracy"] == values[1.0]  # the full run repeats the best trial's 60 steps exactly
    assert final["test_accuracy"] < 0.1
    lines = [json.loads(line) for line in (tmp_path / "final" / "metrics.jsonl").read_text().splitlines()]
    assert ["test_accuracy" in line for line in lines] == [False, False, True]  # the test split: once, at the end
    out = capsys.readouterr().out
    assert "val acc" in out
    assert "best: lr=1 (validation accuracy" in out
    assert "test accuracy (reported once)" in out


def test_tune_refuses_no_validation_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _tune(tmp_path, "--grid", "lr=0.1,1", "--val-fraction", "0")
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (
        "batchnorm: error: tune selects on the validation split: --val-fraction must be > 0 (default 0.1)"
    )


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_in_a_trial_and_in_the_full_run_is_one_line_and_the_rerun_finishes_as_an_uninterrupted_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    options = ["--grid", "lr=0.05,0.5", "--trial-steps", "40", "--steps", "60", "--eval-every", "20"]
    assert _tune(tmp_path / "whole", *options) == 0
    capsys.readouterr()
    original = training.BatchSampler.next
    drawn = [0]

    def next_batch(self: Any) -> Any:
        drawn[0] += 1
        # Trial 0 draws batches 1-40; trial 1 is interrupted at its step 10; after the rerun retrains trial 1
        # (batches 51-90), the full run is interrupted at its step 40.
        if drawn[0] in (50, 130):
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(training.BatchSampler, "next", next_batch)
    out = tmp_path / "split"
    command = f"batchnorm tune {' '.join(SMALL)} --out {out} {' '.join(options)}"
    assert _tune(out, *options) == 130
    err = capsys.readouterr().err
    assert err == (
        "batchnorm: interrupted in trial 1 (lr=0.05) at step 10; that trial starts again on resume; finished trials "
        f"are kept in {out / 'study.db'}; resume with the same command: {command}\n"
    )
    assert _tune(out, *options) == 130
    err = capsys.readouterr().err
    assert err == (
        f"batchnorm: interrupted in the full run at step 40; last checkpoint {out / 'final' / 'checkpoint.pt'} "
        f"(step 40); the grid search is finished and kept in {out / 'study.db'}; resume with the same command: "
        f"{command}\n"
    )
    assert _tune(out, *options) == 0
    whole, split = _load(tmp_path / "whole"), _load(out)
    assert [trial["state"] for trial in split["trials"]] == ["complete", "interrupted", "complete"]
    assert _finished_per_point(split) == _finished_per_point(whole)

    def values(results: dict[str, Any]) -> dict[str, Any]:
        return {
            trial["params"]["lr"]: (trial["value"], trial["val_loss"], trial["train_loss"])
            for trial in results["trials"]
            if trial["state"] == "complete"
        }

    assert values(split) == values(whole)
    for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss"):
        assert split["final"][key] == whole["final"][key], key
    assert split["final"]["resumed_from"] == str(out / "final" / "checkpoint.pt")
    assert re.search(r"interrupted", (out / "tune.json").read_text())
