"""``compare``: results.json, figures, report.html, and the paper's result on real digits.

The recorded percentiles are recomputed from the final checkpoints with a
float64 NumPy forward pass (``batchnorm.reference`` for BN); the accuracy
the paper setup reports is recomputed the same way.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import shlex
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchnorm.lab import training
from batchnorm.lab.data import load_dataset
from batchnorm.lab.experiments import COMPARE_DEFAULTS, compare, percentile_steadiness, spread
from batchnorm.lab.report import format_summary, write_report
from batchnorm.lab.training import TrainConfig, train
from batchnorm.reference import batch_norm_forward
from helpers import run_cli

TINY = dataclasses.replace(
    COMPARE_DEFAULTS,
    model="mlp:64-32-32-10",
    data="synthetic",
    init="normal:0.1",
    input_norm="standardize",
    lr=0.5,
    momentum=0.0,
    batch_size=50,  # the 200 synthetic test images make exactly 4 probe batches
    steps=200,
    eval_every=20,
    checkpoint_every=200,
)
FIGURES = ("accuracy.png", "percentiles.png", "layers.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _hidden_pre_activations(state: dict[str, np.ndarray], x: np.ndarray, hidden: int, use_bn: bool) -> np.ndarray:
    """Input of the last hidden sigmoid in training mode (BN with this batch's statistics), float64."""
    h = x.reshape(len(x), -1)
    z = h
    for index in range(1, hidden + 1):
        z = h @ state[f"fc{index}.weight"].T
        if use_bn:
            z, _ = batch_norm_forward(z, state[f"bn{index}.weight"], state[f"bn{index}.bias"])
        else:
            z = z + state[f"fc{index}.bias"]
        h = _sigmoid(z)
    return z


def _eval_logits(state: dict[str, np.ndarray], x: np.ndarray, hidden: int, use_bn: bool) -> np.ndarray:
    """Eval-mode logits (BN with running statistics), float64."""
    h = x.reshape(len(x), -1)
    for index in range(1, hidden + 1):
        z = h @ state[f"fc{index}.weight"].T
        if use_bn:
            mean, var = state[f"bn{index}.running_mean"], state[f"bn{index}.running_var"]
            z = (z - mean) / np.sqrt(var + 1e-5) * state[f"bn{index}.weight"] + state[f"bn{index}.bias"]
        else:
            z = z + state[f"fc{index}.bias"]
        h = _sigmoid(z)
    return h @ state["out.weight"].T + state["out.bias"]


def _checkpoint_state(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["numpy"] = {name: tensor.double().numpy() for name, tensor in payload["model"].items()}
    return payload


# --------------------------------------------------------------------------- a tiny compare


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("compare")
    torch.set_num_threads(1)
    results = compare(TINY, out, progress=False)
    return out, results


def test_results_json_has_the_documented_schema(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, returned = tiny
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"runs", "config"}
    assert set(results["runs"]) == {"bn", "no_bn"}
    expected_steps = list(range(20, 201, 20))
    for label in ("bn", "no_bn"):
        run = results["runs"][label]
        assert set(run) >= {"steps", "test_accuracy", "train_loss", "percentiles"}
        assert run["steps"] == expected_steps
        assert len(run["test_accuracy"]) == len(run["train_loss"]) == len(expected_steps)
        assert all(0.0 <= accuracy <= 1.0 for accuracy in run["test_accuracy"])
        assert set(run["percentiles"]) == {"15", "50", "85"}
        for values in run["percentiles"].values():
            assert len(values) == len(expected_steps)
    config = results["config"]
    for key in ("model", "act", "init", "lr", "momentum", "batch_size", "steps", "seed"):
        assert config[key] == getattr(TINY, key)
    assert results["runs"]["bn"]["test_accuracy"] == returned["runs"]["bn"]["test_accuracy"]


def test_percentiles_are_ordered(tiny: tuple[Path, dict[str, Any]]) -> None:
    _, results = tiny
    for label in ("bn", "no_bn"):
        percentiles = results["runs"][label]["percentiles"]
        for low, middle, high in zip(percentiles["15"], percentiles["50"], percentiles["85"], strict=True):
            assert low <= middle <= high


@pytest.mark.parametrize("label", ["bn", "no_bn"])
def test_final_percentiles_equal_a_numpy_forward_of_the_final_weights(
    tiny: tuple[Path, dict[str, Any]], label: str
) -> None:
    out, results = tiny
    payload = _checkpoint_state(out / label / "checkpoint.pt")
    assert payload["step"] == TINY.steps
    data = load_dataset("synthetic")
    normalizer = payload["normalizer"]
    probe = ((data.test_images.double() - normalizer["shift"].double()) / normalizer["scale"].double()).numpy()
    # Training-mode forward passes over mini-batches of the probe set: BN sees each batch's statistics.
    batches = [probe[start : start + TINY.batch_size] for start in range(0, len(probe), TINY.batch_size)]
    unit = results["runs"][label]["percentile_unit"]
    assert unit == {"layer": "act2", "unit": 0}
    values = np.concatenate(
        [_hidden_pre_activations(payload["numpy"], batch, hidden=2, use_bn=label == "bn")[:, 0] for batch in batches]
    )
    for percentile in (15, 50, 85):
        recorded = results["runs"][label]["percentiles"][str(percentile)][-1]
        assert recorded == pytest.approx(np.percentile(values, percentile), rel=1e-4, abs=1e-5)


def test_recording_statistics_does_not_change_the_run(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The probe passes run in training mode; restoring BN's buffers keeps the run identical to plain training."""
    out, _ = tiny
    train(TINY, tmp_path, progress=False)
    plain = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    recorded = torch.load(out / "bn" / "checkpoint.pt", weights_only=True)["model"]
    assert plain.keys() == recorded.keys()
    for name in plain:
        assert torch.equal(plain[name], recorded[name]), name


def test_layer_statistics_are_recorded_per_hidden_layer(tiny: tuple[Path, dict[str, Any]]) -> None:
    _, results = tiny
    for label in ("bn", "no_bn"):
        run = results["runs"][label]
        assert set(run["layers"]) == {"act1", "act2"}
        steps = run["layer_steps"]
        assert steps[0] == 1
        for stats in run["layers"].values():
            assert set(stats) == {"mean", "std", "saturated_pct", "grad_std"}
            for values in stats.values():
                assert len(values) == len(steps)
            assert all(0.0 <= value <= 100.0 for value in stats["saturated_pct"])
            assert all(0.0 < value < 1.0 for value in stats["mean"])  # sigmoid outputs
        assert set(run["weight_grad_to_data"]) == {"fc1", "fc2", "out"}


def test_summary_and_explanation(tiny: tuple[Path, dict[str, Any]]) -> None:
    _, results = tiny
    summary = results["summary"]
    for label in ("bn", "no_bn"):
        run = results["runs"][label]
        assert summary[label]["final_accuracy"] == run["test_accuracy"][-1]
        assert summary[label]["percentile_steadiness"] == pytest.approx(percentile_steadiness(run["percentiles"]))
        assert summary[label]["diverged"] is None
    assert [record["name"] for record in results["explain"]] == ["bn1", "bn2"]
    assert results["explain"][0]["values_per_statistic"] == TINY.batch_size


def test_figures_and_self_contained_report(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny
    for name in FIGURES:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r"""src\s*=\s*["']([^"']*)["']""", page)
    assert len(sources) == len(FIGURES)
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert "http://" not in page
    assert "https://" not in page
    assert "<link" not in page
    # The first embedded image is the accuracy figure, byte for byte.
    embedded = base64.b64decode(sources[0].split(",", 1)[1])
    assert embedded == (out / "accuracy.png").read_bytes()
    assert "percentile drift" in page


def test_report_command_rebuilds_the_page(
    tiny: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = tiny
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "results.json").write_text((out / "results.json").read_text())
    code, stdout, err = run_cli(["report", str(copy)], capsys)
    assert code == 0, err
    assert "report.html" in stdout
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(FIGURES)
    for name in FIGURES:
        assert (copy / name).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "results.json does not exist", id="missing"),
        pytest.param("{not json", "is not valid JSON", id="bad-json"),
        pytest.param('{"a": 1}', "is not a compare results file", id="not-compare"),
    ],
)
def test_report_command_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    code, _, err = run_cli(["report", str(tmp_path)], capsys)
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


@pytest.mark.slow
def test_compare_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", "--data", "synthetic", "--model", "mlp:64-32-32-10", "--input-norm", "standardize"]
    code, out, err = run_cli(
        [*argv, "--steps", "60", "--eval-every", "20", "--out", str(tmp_path), "--no-progress"], capsys
    )
    assert code == 0, err
    assert "What each BN layer computes" in out
    assert "final test accuracy" in out
    assert "percentile drift" in out
    results = json.loads((tmp_path / "results.json").read_text())
    # The paper's settings are compare's defaults.
    config = results["config"]
    assert (config["init"], config["lr"], config["momentum"], config["batch_size"], config["act"]) == (
        "normal:0.01",
        0.5,
        0.0,
        60,
        "sigmoid",
    )
    assert results["runs"]["bn"]["steps"] == [20, 40, 60]
    assert (tmp_path / "report.html").is_file()


# --------------------------------------------------------------------------- the steadiness measure


def test_percentile_steadiness_by_hand() -> None:
    # Ranges: 15th 1, 50th 0, 85th 2 -> movement 3; spreads 2 and 3 -> mean 2.5.
    assert percentile_steadiness({"15": [0.0, 1.0], "50": [1.0, 1.0], "85": [2.0, 4.0]}) == pytest.approx(3 / 2.5)
    steady = {"15": [-1.0, -1.0, -1.0], "50": [0.0, 0.0, 0.0], "85": [1.0, 1.0, 1.0]}
    assert percentile_steadiness(steady) == 0.0
    # Scale-free: the same picture at 10x scale scores the same.
    scaled = {
        key: [10 * v for v in values] for key, values in {"15": [0.0, 1.0], "50": [1.0, 1.0], "85": [2.0, 4.0]}.items()
    }
    assert percentile_steadiness(scaled) == pytest.approx(3 / 2.5)
    assert math.isnan(percentile_steadiness({"15": [0.0], "50": [1.0], "85": [2.0]}))
    assert percentile_steadiness({"15": [0.0, 1.0], "50": [0.0, 1.0], "85": [0.0, 1.0]}) == math.inf


# --------------------------------------------------------------------------- the paper's setup on real digits


@pytest.mark.slow
def test_paper_setup_bn_learns_far_faster_and_its_percentiles_are_steadier(tmp_path: Path) -> None:
    """Ioffe & Szegedy's MNIST experiment on the 5,000 embedded digits, 1,000 steps.

    Measured with seed 0: BN reaches about 0.90 test accuracy at 1,000 steps
    while the same network without BN is still at chance (0.10): with a
    N(0, 0.01) init and sigmoid units the no-BN signal vanishes. The BN
    network's percentile drift is about 0.27 against about 230 without BN.
    """
    assert (COMPARE_DEFAULTS.model, COMPARE_DEFAULTS.act, COMPARE_DEFAULTS.init) == (
        "mlp:784-100-100-100-10",
        "sigmoid",
        "normal:0.01",
    )
    assert (COMPARE_DEFAULTS.lr, COMPARE_DEFAULTS.momentum, COMPARE_DEFAULTS.batch_size) == (0.5, 0.0, 60)
    assert COMPARE_DEFAULTS.data == "mnist5k"
    config: TrainConfig = dataclasses.replace(COMPARE_DEFAULTS, steps=1000, eval_every=100, checkpoint_every=1000)
    torch.set_num_threads(1)
    results = compare(config, tmp_path, progress=False, figures=False)
    summary = results["summary"]
    bn_accuracy = summary["bn"]["accuracy_at"]["1000"]
    no_bn_accuracy = summary["no_bn"]["accuracy_at"]["1000"]
    assert bn_accuracy > 0.8
    assert no_bn_accuracy < 0.5
    assert bn_accuracy - no_bn_accuracy > 0.5
    assert summary["bn"]["percentile_steadiness"] < summary["no_bn"]["percentile_steadiness"]
    assert summary["bn"]["percentile_steadiness"] < 1.0

    # The reported BN accuracy, recomputed in float64 NumPy from the final checkpoint.
    data = load_dataset("mnist5k")
    x = data.test_images.double().numpy() / 255.0  # minmax on raw bytes
    labels = data.test_labels.numpy()
    for label in ("bn", "no_bn"):
        payload = _checkpoint_state(tmp_path / label / "checkpoint.pt")
        assert payload["step"] == 1000
        logits = _eval_logits(payload["numpy"], x, hidden=3, use_bn=label == "bn")
        accuracy = (logits.argmax(axis=1) == labels).mean()
        assert summary[label]["accuracy_at"]["1000"] == pytest.approx(accuracy, abs=2 / len(labels))


# --------------------------------------------------------------------------- several seeds


SEEDED = dataclasses.replace(TINY, steps=40, eval_every=20, checkpoint_every=40)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("compare-seeds")
    torch.set_num_threads(1)
    return out, compare(SEEDED, out, seeds=3, progress=False)


def test_seeds_give_one_run_per_seed_and_arm_with_numpy_mean_std_min_max(seeded: tuple[Path, dict[str, Any]]) -> None:
    out, results = seeded
    assert results["seeds"] == [0, 1, 2]
    for label in ("bn", "no_bn"):
        records = results["seed_runs"][label]
        assert [record["seed"] for record in records] == [0, 1, 2]
        assert records[0]["test_accuracy"] == results["runs"][label]["test_accuracy"]  # runs[...] is seed 0
        finals = np.array([record["test_accuracy"][-1] for record in records])
        over = results["summary"][label]["over_seeds"]
        assert over["final_accuracy"]["n"] == 3
        assert over["final_accuracy"]["mean"] == pytest.approx(np.mean(finals), abs=1e-12)
        assert over["final_accuracy"]["std"] == pytest.approx(np.std(finals, ddof=1), abs=1e-12)
        assert (over["final_accuracy"]["min"], over["final_accuracy"]["max"]) == (finals.min(), finals.max())
        vals = np.array([record["val_accuracy"][-1] for record in records])
        assert over["final_val_accuracy"]["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
        assert (out / label / "checkpoint.pt").is_file()
        assert (out / f"{label}_seed2" / "checkpoint.pt").is_file()
    # Each seed's run is the plain training run with that seed (init and batch order), and the seeds differ.
    alone = train(dataclasses.replace(SEEDED, seed=2), None, dataset=load_dataset("synthetic"), progress=False)
    assert alone.test_accuracy == results["seed_runs"]["bn"][2]["test_accuracy"]
    assert alone.val_accuracy == results["seed_runs"]["bn"][2]["val_accuracy"]
    assert results["seed_runs"]["bn"][1]["test_accuracy"] != results["seed_runs"]["bn"][0]["test_accuracy"] or (
        results["seed_runs"]["no_bn"][1]["test_accuracy"] != results["seed_runs"]["no_bn"][0]["test_accuracy"]
    )


def test_seeds_table_figure_and_report_rebuild(
    seeded: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, results = seeded
    table = format_summary(results)
    assert "over 3 seeds" in table
    over = results["summary"]["bn"]["over_seeds"]["final_accuracy"]
    expected = f"{over['mean']:.3f} ± {over['std']:.3f} [{over['min']:.3f}-{over['max']:.3f}]"
    assert expected in table
    assert "0 of 3" in table
    assert (
        results["validation"] == "59 examples (0.1 of each class) held out of the training split, 541 left for training"
    )
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "3 seeds" in page
    assert (out / "accuracy.png").read_bytes().startswith(PNG_MAGIC)
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "results.json").write_text((out / "results.json").read_text())
    code, _, err = run_cli(["report", str(copy)], capsys)
    assert code == 0, err
    assert "over 3 seeds" in (copy / "report.html").read_text(encoding="utf-8")


def test_report_rebuilds_results_written_before_seeds(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, results = tiny
    old = json.loads(json.dumps(results))
    for key in ("seeds", "seed_runs", "arms", "arm_names", "reused_runs"):
        old.pop(key)
    for label in ("bn", "no_bn"):
        old["summary"][label].pop("over_seeds")
        old["summary"][label].pop("final_val_accuracy")
    assert "with BN" in format_summary(old)
    assert "±" not in format_summary(old)
    write_report(tmp_path, old)
    assert (tmp_path / "report.html").is_file()


def test_more_seeds_into_the_same_folder_reuse_the_finished_runs(
    seeded: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, first = seeded
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = compare(SEEDED, copy, seeds=4, progress=False, figures=False)
    assert again["reused_runs"] == 6
    assert again["seeds"] == [0, 1, 2, 3]
    for label in ("bn", "no_bn"):
        assert again["seed_runs"][label][:3] == first["seed_runs"][label]
    assert (copy / "bn_seed3" / "record.json").is_file()
    assert [record["name"] for record in again["explain"]] == ["bn1", "bn2"]  # model reloaded from its checkpoint
    # Other settings are not reused.
    changed = compare(dataclasses.replace(SEEDED, lr=0.4), copy, seeds=1, progress=False, figures=False)
    assert changed["reused_runs"] == 0


def test_spread_by_hand() -> None:
    stats = spread([0.5, None, 0.7, 0.9])
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(0.7)
    assert stats["std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / (3 - 1))
    assert (stats["min"], stats["max"]) == (0.5, 0.9)
    assert spread([0.5])["std"] is None
    assert spread([None]) == {"mean": None, "std": None, "min": None, "max": None, "n": 0}


def test_compare_another_normalization_and_bad_arguments(tmp_path: Path) -> None:
    results = compare(
        dataclasses.replace(SEEDED, norm="group", steps=20, eval_every=20), tmp_path, progress=False, figures=False
    )
    assert results["arms"] == {"bn": "group", "no_bn": "none"}
    assert results["explain"] == []  # GroupNorm computes no batch statistics
    assert "with GroupNorm" in format_summary(results)
    assert "without normalization" in format_summary(results)
    with pytest.raises(ValueError, match="compare trains --norm against none"):
        compare(dataclasses.replace(SEEDED, norm="none"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="--seeds must be a positive integer, got 0"):
        compare(SEEDED, tmp_path, seeds=0, progress=False)


# --------------------------------------------------------------------------- interrupted and continued


def _without_seconds(results: dict[str, Any]) -> dict[str, Any]:
    """results.json without the wall-clock times and the count of reused runs (all else must match)."""
    copy = json.loads(json.dumps(results))
    copy.pop("reused_runs")
    for label in ("bn", "no_bn"):
        copy["runs"][label].pop("seconds")
        copy["summary"][label].pop("seconds")
        for record in copy["seed_runs"][label]:
            record.pop("seconds")
    return copy


def test_compare_interrupted_twice_continues_each_run_and_ends_as_an_uninterrupted_compare(
    tiny: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C in the BN run (step 77) and in the run without BN (step 50): each rerun continues from the checkpoint."""
    whole_out, whole = tiny
    original = training.BatchSampler.next
    drawn = [0]

    def next_batch(self: Any) -> torch.Tensor:
        drawn[0] += 1
        if drawn[0] in (77, 200 + 50):  # the BN run draws 200 batches in all, interrupted or not
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(training.BatchSampler, "next", next_batch)
    out = tmp_path / "split"
    for label, step in (("bn", 77), ("no_bn", 50)):
        with pytest.raises(training.TrainingInterrupted) as interrupt:
            compare(TINY, out, progress=False, figures=False)
        assert (interrupt.value.run, interrupt.value.step, interrupt.value.checkpoint_step) == (label, step, step)
        assert torch.load(out / label / "checkpoint.pt", weights_only=True)["step"] == step
    split = compare(TINY, out, progress=False, figures=False)
    assert split["reused_runs"] == 1  # the BN run finished in the second call
    assert _without_seconds(split) == _without_seconds(whole)
    for label in ("bn", "no_bn"):
        first = torch.load(whole_out / label / "checkpoint.pt", weights_only=True)["model"]
        second = torch.load(out / label / "checkpoint.pt", weights_only=True)["model"]
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first)
    # A rerun now reuses both finished runs.
    assert compare(TINY, out, progress=False, figures=False)["reused_runs"] == 2


def test_compare_ctrl_c_is_one_line_with_the_checkpoint_and_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = training.BatchSampler.next
    drawn = [0]

    def next_batch(self: Any) -> torch.Tensor:
        drawn[0] += 1
        if drawn[0] == 30:
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(training.BatchSampler, "next", next_batch)
    argv = [
        "compare", "--data", "synthetic", "--model", "mlp:64-32-32-10", "--input-norm", "standardize",
        "--batch-size", "50", "--steps", "40", "--eval-every", "20", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 130
    assert "Traceback" not in err
    assert err == (
        f"batchnorm: interrupted in the bn run at step 30; last checkpoint {tmp_path / 'bn' / 'checkpoint.pt'} "
        f"(step 30); finished runs are kept in {tmp_path}; resume with the same command: "
        f"{shlex.join(['batchnorm', *argv])}\n"
    )
