"""The named experiments (:mod:`batchnorm.lab.studies`) on tiny settings and synthetic data.

What is checked: the structure of ``results.json``; that every mean, std,
min and max equals numpy's over the per-seed (or per-checkpoint) values;
that selection reads the validation split only (the same choices when the
test labels are scrambled, and one test evaluation per final model); that
precise BN's statistics equal float64 pooled statistics computed here; that
the figures and the report exist. References are computed independently
(numpy, float64 torch), never by the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.lab.data import Dataset, load_dataset, split_validation
from batchnorm.lab.models import build_model
from batchnorm.lab.studies import EXPERIMENTS, common, eval_stats, lr_sweep, run_experiment, small_batch
from batchnorm.lab.studies.common import spread

TINY_LR = {"lrs": (0.5, 1e5), "steps": 20, "eval_every": 10, "seeds": 2, "hidden": (16,), "threshold": 0.0}
TINY_SMALL = {"batch_sizes": (6, 12), "norms": ("batch", "group"), "seeds": 2, "hidden": (16,), "evals_per_run": 3}
TINY_EVAL = {"batch_sizes": (4, 12), "steps": 30, "eval_every": 10, "checkpoints": 2, "seeds": 2, "hidden": (16, 16)}


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    return load_dataset("synthetic")


def _scrambled(dataset: Dataset) -> Dataset:
    """The same dataset with the test labels replaced (the training and validation data untouched)."""
    labels = (dataset.test_labels + 1 + torch.arange(len(dataset.test_labels)) % 7) % 10
    return dataclasses.replace(dataset, test_labels=labels)


def _assert_spread(stats: dict[str, Any], values: list[float]) -> None:
    array = np.asarray(values, dtype=np.float64)
    assert stats["n"] == len(values)
    assert stats["mean"] == pytest.approx(float(array.mean()), abs=1e-12)
    assert stats["min"] == pytest.approx(float(array.min()), abs=1e-12)
    assert stats["max"] == pytest.approx(float(array.max()), abs=1e-12)
    if len(values) > 1:
        assert stats["std"] == pytest.approx(float(array.std(ddof=1)), abs=1e-12)
    else:
        assert stats["std"] is None


def _files(out: Path, names: list[str]) -> None:
    for name in ["results.json", "report.html", *names]:
        path = out / name
        assert path.is_file(), name
        assert path.stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert "What the data shows" in page
    assert page.count("<figcaption>") == len(names)
    assert page.count("data:image/png;base64,") == len(names)
    assert json.loads((out / "results.json").read_text())["experiment"]


# --------------------------------------------------------------------------- spread


def test_spread_equals_numpy_and_skips_missing_values() -> None:
    values = [0.91, 0.87, 0.95, 0.9]
    _assert_spread(spread(values), values)
    _assert_spread(spread([0.5, None, math.nan, 0.7]), [0.5, 0.7])
    _assert_spread(spread([0.25]), [0.25])
    assert spread([None, math.inf]) == {"mean": None, "std": None, "min": None, "max": None, "n": 0}


def test_every_experiment_has_defaults_and_a_table() -> None:
    assert set(EXPERIMENTS) == {"lr-sweep", "small-batch", "eval-stats"}
    for experiment in EXPERIMENTS.values():
        experiment.defaults.validate()
        assert experiment.defaults.data == "mnist5k"
        assert experiment.defaults.seeds >= 2  # a spread by default


def test_run_experiment_refuses_unknown_names_and_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        run_experiment("nope", tmp_path)
    with pytest.raises(ValueError, match="lr-sweep has no setting epochs"):
        run_experiment("lr-sweep", tmp_path, epochs=3)
    with pytest.raises(ValueError, match="--seeds must be a positive integer"):
        run_experiment("small-batch", tmp_path, seeds=0)
    with pytest.raises(ValueError, match="needs batches of at least 2"):
        run_experiment("small-batch", tmp_path, batch_sizes=(1, 4))
    with pytest.raises(ValueError, match="too short"):
        run_experiment("eval-stats", tmp_path, steps=10, eval_every=10, checkpoints=2)
    with pytest.raises(ValueError, match="val-fraction must be > 0"):
        run_experiment("lr-sweep", tmp_path, val_fraction=0.0, **TINY_LR)


# --------------------------------------------------------------------------- lr-sweep


@pytest.fixture(scope="module")
def lr_results(tmp_path_factory: pytest.TempPathFactory, synthetic: Dataset) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("lr")
    return out, run_experiment("lr-sweep", out, dataset=synthetic, progress=False, **TINY_LR)


def test_lr_sweep_writes_results_figures_and_report(lr_results: tuple[Path, dict[str, Any]]) -> None:
    out, _results = lr_results
    _files(out, ["lr_accuracy.png", "lr_loss.png"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == "lr-sweep"
    assert saved["lrs"] == [0.5, 1e5]
    assert saved["seeds"] == [0, 1]
    assert set(saved["grid"]) == {"batch", "none"}
    assert saved["model"] == "mlp:64-16-10"
    for rows in saved["grid"].values():
        assert [row["lr"] for row in rows] == [0.5, 1e5]
        for row in rows:
            assert [run["seed"] for run in row["runs"]] == [0, 1]
    assert saved["findings"]
    assert all(isinstance(line, str) for line in saved["findings"])


def test_lr_sweep_spread_and_stability_follow_the_per_seed_runs(lr_results: tuple[Path, dict[str, Any]]) -> None:
    _, results = lr_results
    for norm, rows in results["grid"].items():
        for row in rows:
            finished = [run["final_val_accuracy"] for run in row["runs"] if run["diverged"] is None]
            if finished:
                _assert_spread(row["val_accuracy"], finished)
            for run in row["runs"]:
                expected = run["diverged"] is None and run["final_val_accuracy"] > results["config"]["threshold"]
                assert run["stable"] == expected
            assert row["stable"] == all(run["stable"] for run in row["runs"])
        stable = [row["lr"] for row in rows if row["stable"]]
        assert results["arms"][norm]["largest_stable_lr"] == (max(stable) if stable else None)
        # An absurd learning rate trips the divergence guard for both networks.
        assert rows[-1]["diverged_seeds"] == 2
        assert not rows[-1]["stable"]
        arm = results["arms"][norm]
        if arm["best_lr"] is not None:
            _assert_spread(arm["test_accuracy"], arm["test_accuracy_per_seed"])
    head = results["headline"]
    if head["largest_stable_lr_bn"] and head["largest_stable_lr_no_bn"]:
        assert head["ratio"] == head["largest_stable_lr_bn"] / head["largest_stable_lr_no_bn"]


def test_lr_sweep_selects_on_validation_and_tests_each_final_model_once(
    tmp_path: Path, synthetic: Dataset, lr_results: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, clean = lr_results
    calls: list[nn.Module] = []
    original = common.test_accuracy

    def counting(model: nn.Module, prepared: common.Prepared) -> float:
        calls.append(model)
        return original(model, prepared)

    monkeypatch.setattr(lr_sweep, "test_accuracy", counting)
    scrambled = run_experiment("lr-sweep", tmp_path, dataset=_scrambled(synthetic), progress=False, **TINY_LR)
    # Same validation numbers, same choices: the test labels never entered them.
    assert scrambled["grid"] == clean["grid"]
    for norm in clean["arms"]:
        for key in ("largest_stable_lr", "best_lr", "best_val_accuracy"):
            assert scrambled["arms"][norm][key] == clean["arms"][norm][key]
    selected = [arm for arm in clean["arms"].values() if arm["best_lr"] is not None]
    assert selected, "the tiny sweep should find a usable learning rate"
    assert len(calls) == 2 * len(selected)  # one test evaluation per seed of each selected learning rate
    assert scrambled["arms"]["batch"]["test_accuracy"] != clean["arms"]["batch"]["test_accuracy"]


def test_lr_sweep_findings_are_computed_from_the_numbers(lr_results: tuple[Path, dict[str, Any]]) -> None:
    _, results = lr_results
    changed = json.loads(json.dumps(results))
    changed["arms"]["batch"]["largest_stable_lr"] = 30.0
    changed["arms"]["none"]["largest_stable_lr"] = 3.0
    changed["headline"] = {"largest_stable_lr_bn": 30.0, "largest_stable_lr_no_bn": 3.0, "ratio": 10.0}
    text = " ".join(lr_sweep.findings(changed))
    assert "without BN: 3, with BN: 30" in text
    assert "(10x)" in text
    assert "agrees" in text
    changed["headline"] = {"largest_stable_lr_bn": 3.0, "largest_stable_lr_no_bn": 3.0, "ratio": 1.0}
    assert "contradicts" in " ".join(lr_sweep.findings(changed))


# --------------------------------------------------------------------------- small-batch


@pytest.fixture(scope="module")
def small_results(tmp_path_factory: pytest.TempPathFactory, synthetic: Dataset) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("small")
    return out, run_experiment("small-batch", out, dataset=synthetic, progress=False, **TINY_SMALL)


def test_small_batch_writes_results_figures_and_report(
    small_results: tuple[Path, dict[str, Any]], synthetic: Dataset
) -> None:
    out, results = small_results
    _files(out, ["batch_accuracy.png", "batch_val_accuracy.png"])
    assert results["batch_sizes"] == [6, 12]
    assert results["norms"] == ["batch", "group"]
    n_train = results["n_train"]
    assert n_train == len(split_validation(synthetic, 0.1).train_images)  # 10% of each class held out
    for _norm, rows in results["results"].items():
        for row in rows:
            size = row["batch_size"]
            assert row["steps"] == n_train // size  # one epoch at every batch size
            assert row["lr"] == pytest.approx(0.1 * size / 64)
            assert [run["seed"] for run in row["runs"]] == [0, 1]
            _assert_spread(row["test_accuracy"], [run["test_accuracy"] for run in row["runs"]])
            _assert_spread(row["val_accuracy"], [run["val_accuracy"] for run in row["runs"]])


def test_small_batch_selects_the_best_validation_checkpoint_without_the_test_split(
    tmp_path: Path, synthetic: Dataset, small_results: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, clean = small_results
    calls: list[int] = []
    original = common.test_accuracy

    def counting(model: nn.Module, prepared: common.Prepared) -> float:
        calls.append(1)
        return original(model, prepared)

    monkeypatch.setattr(small_batch, "test_accuracy", counting)
    config = dataclasses.replace(small_batch.SmallBatchConfig(), **TINY_SMALL)
    scrambled = small_batch.small_batch(config, tmp_path, dataset=_scrambled(synthetic), progress=False)
    runs = sum(len(row["runs"]) for rows in clean["results"].values() for row in rows)
    assert len(calls) == runs  # the selected checkpoint of each run, once
    for norm in clean["norms"]:
        for a, b in zip(clean["results"][norm], scrambled["results"][norm]):
            for run_a, run_b in zip(a["runs"], b["runs"]):
                assert (run_a["best_step"], run_a["val_accuracy"]) == (run_b["best_step"], run_b["val_accuracy"])


def test_best_checkpoint_keeps_the_highest_validation_accuracy() -> None:
    keeper = common.BestCheckpoint(keep_last=2)
    model = nn.Linear(2, 2)
    for step, value in ((10, 0.5), (20, 0.8), (30, 0.8), (40, 0.7)):
        with torch.no_grad():
            model.weight.fill_(step)
        keeper.on_eval(step, model, {"val_accuracy": value, "test_accuracy": 1.0 - value})
    assert (keeper.best_step, keeper.best_val) == (20, 0.8)  # the earliest of the ties
    assert keeper.best_state is not None
    assert float(keeper.best_state["weight"][0, 0]) == 20
    assert [step for step, _ in keeper.recent] == [30, 40]
    with pytest.raises(ValueError, match="validation split"):
        keeper.on_eval(50, model, {"test_accuracy": 1.0})


# --------------------------------------------------------------------------- eval-stats


@pytest.fixture(scope="module")
def eval_results(tmp_path_factory: pytest.TempPathFactory, synthetic: Dataset) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("eval")
    return out, run_experiment("eval-stats", out, dataset=synthetic, progress=False, **TINY_EVAL)


def test_eval_stats_writes_results_figures_and_report(eval_results: tuple[Path, dict[str, Any]]) -> None:
    out, results = eval_results
    _files(out, ["eval_stats.png", "eval_stats_checkpoints.png"])
    assert results["batch_sizes"] == [4, 12]
    for size in ("4", "12"):
        rows = results["checkpoints"][size]
        assert [(row["seed"], row["step"]) for row in rows] == [(0, 20), (0, 30), (1, 20), (1, 30)]
        item = results["summary"][size]
        assert item["checkpoints"] == 4
        for method in eval_stats.METHODS:
            _assert_spread(item["methods"][method]["test_accuracy"], [row["test"][method] for row in rows])
            _assert_spread(item["methods"][method]["val_accuracy"], [row["val"][method] for row in rows])
        _assert_spread(item["precise_minus_ema"], [row["test"]["precise"] - row["test"]["ema"] for row in rows])
        assert item["precise_wins"] == sum(row["test"]["precise"] > row["test"]["ema"] for row in rows)
        for key in ("mean_shift_in_std", "abs_log_var_ratio"):
            _assert_spread(item["stats_gap"][key], [row["stats_gap"][key] for row in rows])
        means = {m: item["methods"][m]["val_accuracy"]["mean"] for m in eval_stats.METHODS}
        assert item["selected"] == max(eval_stats.METHODS, key=lambda m: means[m])
        assert item["selected_test_accuracy"] == item["methods"][item["selected"]]["test_accuracy"]


def test_eval_stats_selection_does_not_read_the_test_split(
    tmp_path: Path, synthetic: Dataset, eval_results: tuple[Path, dict[str, Any]]
) -> None:
    _, clean = eval_results
    scrambled = run_experiment("eval-stats", tmp_path, dataset=_scrambled(synthetic), progress=False, **TINY_EVAL)
    for size in ("4", "12"):
        assert scrambled["summary"][size]["selected"] == clean["summary"][size]["selected"]
        assert [row["val"] for row in scrambled["checkpoints"][size]] == [
            row["val"] for row in clean["checkpoints"][size]
        ]


def test_precise_statistics_equal_float64_pooled_statistics(synthetic: Dataset) -> None:
    torch.manual_seed(3)
    model = build_model("mlp:64-12-10", "sigmoid", "batch")
    model.eval()
    images = torch.randn(103, 1, 8, 8)
    precise = eval_stats.precise_model(model, images, 4, seed=0)
    bn = precise.bn1
    # The first BN's input does not depend on the batching: pool it once in float64.
    with torch.no_grad():
        inputs = model.fc1.double()(images.flatten(1).double())
    model.fc1.float()
    assert torch.allclose(bn.running_mean.double(), inputs.mean(0), rtol=0, atol=1e-5)
    assert torch.allclose(bn.running_var.double(), inputs.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    # The original model is untouched, and the copy is in eval mode.
    assert torch.equal(model.bn1.running_mean, torch.zeros(12))
    assert not precise.training
    gap = eval_stats.stats_gap(precise, precise)
    assert gap == {"mean_shift_in_std": 0.0, "abs_log_var_ratio": 0.0}


def test_train_mode_accuracy_leaves_the_model_unchanged() -> None:
    torch.manual_seed(4)
    model = build_model("mlp:64-12-10", "relu", "batch")
    model.eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    images, labels = torch.randn(21, 1, 8, 8), torch.randint(0, 10, (21,))
    accuracy = eval_stats.train_mode_accuracy(model, images, labels, 4)
    assert 0.0 <= accuracy <= 1.0
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # 21 examples in batches of 4: the last batch of one joins the one before.
    assert eval_stats._chunks(21, 4)[-1] == (16, 21)
    assert eval_stats._chunks(8, 4) == [(0, 4), (4, 8)]
