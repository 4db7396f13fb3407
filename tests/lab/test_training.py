"""Training: learning, metrics, checkpoints, exact resume (also after SIGKILL) and the divergence guard.

Numbers a run reports are checked against a float64 NumPy forward pass of
the checkpointed weights; resume is checked bit for bit (``torch.equal``)
against an uninterrupted run with the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import training
from batchnorm.lab.data import load_dataset
from batchnorm.lab.models import build_model
from batchnorm.lab.training import (
    CheckpointError,
    DivergenceError,
    DivergenceGuard,
    TrainConfig,
    load_checkpoint,
    model_from_checkpoint,
    resume_changes,
    train,
)
from helpers import run_cli

SMALL = TrainConfig(
    model="mlp:64-32-32-10",
    act="sigmoid",
    norm="batch",
    placement="before",
    init="default",
    data="synthetic",
    input_norm="standardize",
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    batch_size=30,
    steps=200,
    eval_every=50,
    checkpoint_every=100,
    seed=0,
)


def _carve_by_hand(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The documented validation rule written out: per class, default_rng(2016) permutation, first round(f*n) held."""
    rng = np.random.default_rng(2016)
    kept: list[int] = []
    held: list[int] = []
    for label in sorted(set(labels.tolist())):
        members = [i for i, value in enumerate(labels.tolist()) if value == label]
        order = rng.permutation(len(members))
        cut = round(len(members) * fraction)
        held += [members[j] for j in order[:cut]]
        kept += [members[j] for j in order[cut:]]
    return np.array(sorted(kept)), np.array(sorted(held))


def _metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_equal_states(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs"


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_forward(state: dict[str, torch.Tensor], x: np.ndarray, hidden_layers: int, eps: float = 1e-5) -> np.ndarray:
    """Eval-mode ``Linear (no bias) -> BN (running stats) -> sigmoid`` blocks and a Linear classifier, in float64."""

    def array(name: str) -> np.ndarray:
        return state[name].double().numpy()

    h = x.reshape(len(x), -1)
    for index in range(1, hidden_layers + 1):
        z = h @ array(f"fc{index}.weight").T
        mean, var = array(f"bn{index}.running_mean"), array(f"bn{index}.running_var")
        z = (z - mean) / np.sqrt(var + eps) * array(f"bn{index}.weight") + array(f"bn{index}.bias")
        h = _sigmoid(z)
    return h @ array("out.weight").T + array("out.bias")


# --------------------------------------------------------------------------- a short run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small-run")
    torch.set_num_threads(1)
    train(SMALL, out, progress=False)
    return out


def test_short_run_learns_well_above_chance(small_run: Path) -> None:
    lines = _metrics(small_run / "metrics.jsonl")
    assert lines[-1]["test_accuracy"] > 0.8  # chance is 0.1
    assert lines[-1]["train_loss"] < lines[0]["train_loss"] < math.log(10) + 0.5


def test_metrics_jsonl_has_one_line_per_evaluation(small_run: Path) -> None:
    lines = _metrics(small_run / "metrics.jsonl")
    assert [line["step"] for line in lines] == [50, 100, 150, 200]
    for line in lines:
        assert set(line) >= {"step", "train_loss", "test_loss", "test_accuracy", "steps_per_s"}
        assert 0.0 <= line["test_accuracy"] <= 1.0
        assert math.isfinite(line["train_loss"])
        assert line["steps_per_s"] > 0


def test_checkpoint_loads_with_weights_only_and_reproduces_the_reported_metrics(small_run: Path) -> None:
    payload = torch.load(small_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert payload["step"] == 200
    assert payload["config"]["model"] == "mlp:64-32-32-10"
    assert payload["config"]["seed"] == 0
    assert payload["image_size"] == 8
    state = payload["model"]
    assert int(state["bn1.num_batches_tracked"]) == 200

    # The input normalization is stored with the checkpoint and was fit on the training examples actually
    # used: the training split without its validation part (10% of each class, carved by hand here).
    data = load_dataset("synthetic")
    kept, _ = _carve_by_hand(data.train_labels.numpy(), 0.1)
    train_images = data.train_images.double().numpy()[kept]
    normalizer = payload["normalizer"]
    assert normalizer["kind"] == "standardize"
    np.testing.assert_allclose(normalizer["shift"].double().numpy(), train_images.mean(axis=0), atol=1e-6)

    # Float64 NumPy forward of the stored weights gives the run's last reported test loss and accuracy.
    test_images = data.test_images.double().numpy()
    x = (test_images - normalizer["shift"].double().numpy()) / normalizer["scale"].double().numpy()
    logits = _numpy_forward(state, x, hidden_layers=2)
    labels = data.test_labels.numpy()
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probabilities[np.arange(len(labels)), labels].mean()
    accuracy = (logits.argmax(axis=1) == labels).mean()
    last = _metrics(small_run / "metrics.jsonl")[-1]
    assert last["test_loss"] == pytest.approx(loss, rel=1e-4)
    assert last["test_accuracy"] == pytest.approx(accuracy, abs=1 / len(labels))


def test_model_from_checkpoint_rebuilds_the_trained_model_in_eval_mode(small_run: Path) -> None:
    model, config, normalizer, payload = model_from_checkpoint(small_run / "checkpoint.pt")
    assert config.model == SMALL.model
    assert not model.training
    _assert_equal_states(model.state_dict(), payload["model"])
    assert normalizer.kind == "standardize"


def test_checkpoint_is_written_atomically_without_leftovers(small_run: Path) -> None:
    assert sorted(path.name for path in small_run.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


def test_same_seed_gives_bit_identical_runs(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, steps=40, eval_every=20)
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False)
    _assert_equal_states(_state(tmp_path / "a" / "checkpoint.pt"), _state(tmp_path / "b" / "checkpoint.pt"))
    other = train(dataclasses.replace(config, seed=1), tmp_path / "c", progress=False)
    assert other.model is not None
    assert not torch.equal(
        other.model.state_dict()["fc1.weight"], _state(tmp_path / "a" / "checkpoint.pt")["fc1.weight"]
    )


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize(
    ("norm", "momentum"),
    [pytest.param("batch", 0.9, id="bn-momentum"), pytest.param("none", 0.0, id="no-bn-plain-sgd")],
)
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, norm: str, momentum: float) -> None:
    config = dataclasses.replace(SMALL, norm=norm, momentum=momentum, steps=120, eval_every=10, checkpoint_every=40)
    train(config, tmp_path / "whole", progress=False)

    # Stop after 50 steps (not an epoch boundary: 600 examples / 30 = 20 batches per epoch), then resume to 120.
    train(dataclasses.replace(config, steps=50), tmp_path / "split", progress=False)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 50
    train(
        dataclasses.replace(config, steps=120),
        tmp_path / "split",
        resume=tmp_path / "split" / "checkpoint.pt",
        progress=False,
    )

    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert whole["step"] == split["step"] == 120
    _assert_equal_states(whole["model"], split["model"])
    whole_buffers = [state.get("momentum_buffer") for state in whole["optimizer"]["state"].values()]
    split_buffers = [state.get("momentum_buffer") for state in split["optimizer"]["state"].values()]
    for first, second in zip(whole_buffers, split_buffers, strict=True):
        assert (first is None and second is None) or torch.equal(first, second)
    whole_metrics = _metrics(tmp_path / "whole" / "metrics.jsonl")
    split_metrics = _metrics(tmp_path / "split" / "metrics.jsonl")
    assert [m["step"] for m in split_metrics] == [m["step"] for m in whole_metrics]
    for first, second in zip(whole_metrics, split_metrics):
        assert first["test_loss"] == second["test_loss"]
        assert first["test_accuracy"] == second["test_accuracy"]
        assert first["train_loss"] == pytest.approx(second["train_loss"], rel=1e-12)


def _wait_for_metrics_step(path: Path, step: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before it could be killed mid-way")
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.005)
    raise AssertionError(f"no evaluation at step {step} within {timeout} s")


@pytest.mark.slow
def test_run_killed_with_sigkill_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    total = 600
    options = [
        "--data", "synthetic", "--model", "mlp:64-256-256-10", "--input-norm", "standardize",
        "--lr", "0.05", "--momentum", "0.9", "--batch-size", "30", "--seed", "3",
        "--steps", str(total), "--eval-every", "20", "--checkpoint-every", "20", "--no-progress",
    ]  # fmt: skip
    killed = tmp_path / "killed"
    environment = {**os.environ, "BATCHNORM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "batchnorm", "train", *options, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment,
    )
    try:
        _wait_for_metrics_step(killed / "metrics.jsonl", 100, process, timeout=120)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()

    stopped_at = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < stopped_at < total

    code, out, err = run_cli(
        ["train", "--resume", str(killed / "checkpoint.pt"), "--out", str(killed), "--no-progress"], capsys
    )
    assert code == 0, err
    assert f"done: {total} steps" in out
    code, _, err = run_cli(["train", *options, "--out", str(tmp_path / "whole")], capsys)
    assert code == 0, err

    resumed = torch.load(killed / "checkpoint.pt", weights_only=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == whole["step"] == total
    _assert_equal_states(resumed["model"], whole["model"])
    # Evaluations the killed run logged after its last checkpoint are dropped, not duplicated.
    resumed_metrics = _metrics(killed / "metrics.jsonl")
    whole_metrics = _metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [m["step"] for m in resumed_metrics] == [m["step"] for m in whole_metrics]
    assert [m["test_accuracy"] for m in resumed_metrics] == [m["test_accuracy"] for m in whole_metrics]


def test_resume_keeps_the_checkpoint_config_and_rejects_another_model(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, steps=20, eval_every=10)
    train(config, tmp_path, progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match=r"is of another model: model mlp:64-32-32-10 \(requested mlp:64-16-10\)"):
        train(
            dataclasses.replace(config, steps=30),
            tmp_path,
            resume=checkpoint,
            requested_model={"model": "mlp:64-16-10"},
        )
    with pytest.raises(CheckpointError, match=r"act sigmoid \(requested relu\)"):
        train(dataclasses.replace(config, steps=30), tmp_path, resume=checkpoint, requested_model={"act": "relu"})
    # Settings the caller did not ask for explicitly come from the checkpoint.
    result = train(dataclasses.replace(SMALL, lr=99.0, steps=30), tmp_path, resume=checkpoint, progress=False)
    assert result.config.lr == SMALL.lr
    assert result.final_step == 30


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "does not exist", id="missing"),
        pytest.param(b"\x00garbage" * 100, "corrupted or not a batchnorm checkpoint", id="random-bytes"),
        pytest.param("not-ours", "is not a batchnorm checkpoint", id="other-torch-file"),
    ],
)
def test_load_checkpoint_rejects_unusable_files(tmp_path: Path, content: bytes | str | None, message: str) -> None:
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint_is_rejected(small_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.pt"
    data = (small_run / "checkpoint.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- divergence guard


@pytest.mark.parametrize("checkpoint_every", [1, 1000])
def test_absurd_learning_rate_without_bn_stops_with_the_guard_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint_every: int
) -> None:
    code, out, err = run_cli(
        [
            "train", "--data", "synthetic", "--model", "mlp:64-32-32-10", "--norm", "none", "--init", "normal:0.1",
            "--lr", "1e6", "--steps", "200", "--checkpoint-every", str(checkpoint_every),
            "--out", str(tmp_path), "--no-progress",
        ],
        capsys,
    )  # fmt: skip
    assert code == 3
    assert "done:" not in out
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    match = re.search(r"training diverged at step (\d+): .*last good checkpoint: (.+) \(step (\d+)\)", err)
    assert match, err
    diverged_at, path, last_good = int(match[1]), Path(match[2]), int(match[3])
    assert path == tmp_path / "checkpoint.pt"
    assert last_good < diverged_at

    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["step"] == last_good
    assert all(torch.isfinite(tensor).all() for tensor in payload["model"].values())
    if last_good == 0:
        # Nothing was learned yet: the kept checkpoint holds the initial weights.
        initial = build_model("mlp:64-32-32-10", norm="none", init="normal:0.1", image_size=8, seed=0)
        _assert_equal_states(payload["model"], initial.state_dict())
    else:
        assert last_good == diverged_at - 1


def test_divergence_in_process_raises_divergence_error(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, norm="none", lr=1e6, steps=50)
    with pytest.raises(DivergenceError, match="training diverged at step"):
        train(config, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 0


def test_guard_trips_on_non_finite_loss_rising_loss_and_exploding_weights() -> None:
    guard = DivergenceGuard(loss_factor=4.0, norm_factor=100.0)
    with pytest.raises(DivergenceError, match="the loss is nan"):
        guard.check_loss(7, float("nan"))
    with pytest.raises(DivergenceError, match="the loss is inf"):
        DivergenceGuard().check_loss(1, float("inf"))

    rising = DivergenceGuard(loss_factor=4.0)
    rising.check_loss(1, 2.0)  # best smoothed loss 2.0: limit 4 * 2 + 1 = 9
    rising.check_loss(2, 50.0)  # smoothed 0.9 * 2 + 5 = 6.8: still under the limit
    with pytest.raises(DivergenceError, match=r"step 3: the smoothed loss .* far above its best 2"):
        rising.check_loss(3, 50.0)  # smoothed 0.9 * 6.8 + 5 = 11.12 > 9

    layer = nn.Linear(10, 10, bias=False)
    weights = DivergenceGuard(norm_factor=100.0)
    for step in (10, 20, 30):
        weights.check_weights(step, layer)
    with torch.no_grad():
        layer.weight.mul_(50.0)
    weights.check_weights(40, layer)  # 50x its median: allowed
    with torch.no_grad():
        layer.weight.mul_(10.0)
    with pytest.raises(DivergenceError, match=r"step 50: the weight norm .* more than 100x its recent median"):
        weights.check_weights(50, layer)
    with torch.no_grad():
        layer.weight.fill_(float("inf"))
    with pytest.raises(DivergenceError, match="the weight norm is inf"):
        weights.check_weights(60, layer)


def test_guard_state_round_trips() -> None:
    guard = DivergenceGuard()
    guard.check_loss(1, 2.0)
    guard.check_loss(2, 1.0)
    restored = DivergenceGuard()
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert restored.smoothed == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"lr": -0.1}, "--lr must be a finite number >= 0, got -0.1", id="negative-lr"),
        pytest.param({"lr": 0.0}, "--lr must be > 0", id="zero-lr"),
        pytest.param({"lr": float("nan")}, "--lr must be a finite number", id="nan-lr"),
        pytest.param({"momentum": -1.0}, "--momentum must be", id="negative-momentum"),
        pytest.param({"steps": 0}, "--steps must be a positive integer, got 0", id="zero-steps"),
        pytest.param({"batch_size": 1}, "--batch-size must be at least 2 with --norm batch", id="bn-batch-of-one"),
        pytest.param({"act": "gelu"}, "--act: expected one of sigmoid, tanh, relu, got 'gelu'", id="bad-act"),
        pytest.param({"data": "cifar"}, "--data: expected one of", id="bad-data"),
        pytest.param({"model": "mlp:64-0-10"}, "widths must be positive", id="zero-width"),
        pytest.param({"init": "normal:-1"}, "must be positive", id="bad-init"),
    ],
)
def test_config_validation_messages(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(SMALL, **change).validate()


def test_spec_that_does_not_fit_the_data_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expects 784 input values but synthetic images have 64"):
        train(dataclasses.replace(SMALL, model="mlp:784-32-10"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="larger than the training split"):
        train(dataclasses.replace(SMALL, batch_size=601), tmp_path, progress=False)


def test_cnn_trains_on_synthetic_images(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, model="cnn:1-8-16-10", act="relu", init="kaiming", steps=30, eval_every=30)
    result = train(config, tmp_path, progress=False)
    assert result.steps == [30]
    assert result.final_accuracy > 0.2
    assert "bn2.running_var" in _state(tmp_path / "checkpoint.pt")


# --------------------------------------------------------------------------- validation split


def test_every_evaluation_reports_the_validation_split_and_the_checkpoint_records_it(small_run: Path) -> None:
    lines = _metrics(small_run / "metrics.jsonl")
    for line in lines:
        assert 0.0 <= line["val_accuracy"] <= 1.0
        assert math.isfinite(line["val_loss"])
    payload = torch.load(small_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert payload["config"]["val_fraction"] == 0.1
    assert payload["last_eval"]["val_accuracy"] == lines[-1]["val_accuracy"]
    assert payload["last_eval"]["test_accuracy"] == lines[-1]["test_accuracy"]

    # The reported validation loss and accuracy are those of the stored weights on the hand-carved split.
    data = load_dataset("synthetic")
    _, held = _carve_by_hand(data.train_labels.numpy(), 0.1)
    assert len(held) == 59  # per class round(0.1 * n): the synthetic classes are of random sizes
    normalizer = payload["normalizer"]
    images = data.train_images.double().numpy()[held]
    x = (images - normalizer["shift"].double().numpy()) / normalizer["scale"].double().numpy()
    logits = _numpy_forward(payload["model"], x, hidden_layers=2)
    labels = data.train_labels.numpy()[held]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert lines[-1]["val_loss"] == pytest.approx(-log_probabilities[np.arange(len(labels)), labels].mean(), rel=1e-4)
    assert lines[-1]["val_accuracy"] == pytest.approx((logits.argmax(axis=1) == labels).mean(), abs=1 / len(labels))


def test_training_batches_never_contain_validation_or_test_examples(tmp_path: Path) -> None:
    seen: list[torch.Tensor] = []

    def record(model: nn.Module) -> nn.Module:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                seen.append(inputs[0].detach().clone())

        model.register_forward_pre_hook(hook)
        return model

    config = dataclasses.replace(SMALL, input_norm="none", steps=40, eval_every=20)  # raw pixels: comparable
    train(config, None, model_override=record, progress=False)
    data = load_dataset("synthetic")
    kept, held = _carve_by_hand(data.train_labels.numpy(), 0.1)
    used = {row.numpy().tobytes() for batch in seen for row in batch}
    kept_rows = {data.train_images[int(i)].numpy().tobytes() for i in kept}
    assert len(seen) == 40
    assert used <= kept_rows
    assert len(used) > 500  # two epochs and more over the 541 kept examples
    assert not used & {data.train_images[int(i)].numpy().tobytes() for i in held}
    assert not used & {image.numpy().tobytes() for image in data.test_images}


def test_test_eval_final_and_never(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, steps=40, eval_every=10)
    final = train(config, tmp_path / "final", progress=False, test_eval="final")
    lines = _metrics(tmp_path / "final" / "metrics.jsonl")
    assert [("test_accuracy" in line) for line in lines] == [False, False, False, True]
    assert all("val_accuracy" in line for line in lines)
    assert final.test_steps == [40]
    assert len(final.val_accuracy) == 4
    never = train(config, None, progress=False, test_eval="never")
    assert never.test_accuracy == []
    assert math.isnan(never.final_accuracy)
    assert never.val_accuracy == final.val_accuracy  # the same run: evaluating the test split changes nothing
    with pytest.raises(ValueError, match="test_eval must be one of"):
        train(config, None, progress=False, test_eval="sometimes")


def test_val_fraction_zero_trains_on_the_whole_split_and_reports_no_validation(tmp_path: Path) -> None:
    result = train(dataclasses.replace(SMALL, steps=20, eval_every=10, val_fraction=0.0), tmp_path, progress=False)
    assert result.val_accuracy == []
    assert math.isnan(result.final_val_accuracy)
    assert all("val_accuracy" not in line for line in _metrics(tmp_path / "metrics.jsonl"))


def test_checkpoint_from_before_the_validation_split_resumes_on_the_whole_training_split(tmp_path: Path) -> None:
    """An old checkpoint (no val_fraction, no last_eval) resumes as val_fraction=0, bit-identical to such a run."""
    old_style = dataclasses.replace(SMALL, steps=60, eval_every=20, checkpoint_every=20, val_fraction=0.0)
    train(old_style, tmp_path / "whole", progress=False)
    train(dataclasses.replace(old_style, steps=30), tmp_path / "split", progress=False)
    path = tmp_path / "split" / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    del payload["config"]["val_fraction"], payload["config"]["groups"], payload["last_eval"]
    torch.save(payload, path)
    resumed = train(dataclasses.replace(SMALL, steps=60), tmp_path / "split", resume=path, progress=False)
    assert resumed.config.val_fraction == 0.0
    _assert_equal_states(_state(tmp_path / "whole" / "checkpoint.pt"), _state(path))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"val_fraction": 0.6}, "--val-fraction must be between 0 and 0.5, got 0.6", id="big-val"),
        pytest.param({"val_fraction": -0.1}, "--val-fraction must be between 0 and 0.5", id="negative-val"),
        pytest.param({"groups": 0}, "--groups must be a positive integer, got 0", id="zero-groups"),
        pytest.param({"norm": "instance"}, "--norm: expected one of batch", id="bad-norm"),
        pytest.param({"rmax": 0.5}, "--rmax must be a finite number >= 1, got 0.5", id="small-rmax"),
        pytest.param({"dmax": -1.0}, "--dmax must be a finite number >= 0", id="negative-dmax"),
        pytest.param({"renorm_warmup": -1}, "--renorm-warmup must be an integer >= 0", id="negative-warmup"),
        pytest.param({"virtual_batch_size": 0}, "--virtual-batch-size must be a positive integer", id="zero-vbs"),
        pytest.param(
            {"norm": "ghost", "virtual_batch_size": 29},
            "--virtual-batch-size 29 with --batch-size 30 leaves a virtual batch of one example",
            id="ghost-remainder-of-one",
        ),
        pytest.param(
            {"norm": "renorm", "batch_size": 1}, "--batch-size must be at least 2 with --norm renorm", id="renorm-1"
        ),
    ],
)
def test_new_option_validation_messages(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(SMALL, **change).validate()


NORM_LAYERS = {
    "group": nn.GroupNorm,
    "layer": nn.LayerNorm,
    "renorm": batchnorm.BatchRenorm,
    "ghost": batchnorm.GhostBatchNorm,
    "frozen": batchnorm.FrozenBatchNorm,
}


@pytest.mark.parametrize("norm", list(NORM_LAYERS))
def test_every_norm_trains_and_resumes_bit_identically_from_its_checkpoint(tmp_path: Path, norm: str) -> None:
    config = dataclasses.replace(
        SMALL, norm=norm, steps=60, eval_every=30, checkpoint_every=30, virtual_batch_size=8, renorm_warmup=20
    )
    if norm in ("group", "layer", "frozen"):
        dataclasses.replace(config, batch_size=1).validate()  # no batch statistics: a batch of one is fine
    result = train(config, tmp_path / "whole", progress=False)
    assert result.final_accuracy > 0.2  # chance is 0.1
    model, stored, _, _ = model_from_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    assert (stored.norm, stored.virtual_batch_size, stored.renorm_warmup) == (norm, 8, 20)
    assert type(model.bn1) is NORM_LAYERS[norm]
    train(dataclasses.replace(config, steps=30), tmp_path / "split", progress=False)
    path = tmp_path / "split" / "checkpoint.pt"
    train(config, tmp_path / "split", resume=path, progress=False)
    _assert_equal_states(_state(tmp_path / "whole" / "checkpoint.pt"), _state(path))


# --------------------------------------------------------------------------- never lose work: Ctrl-C, changed options


TRAIN_OPTIONS = [
    "train", "--data", "synthetic", "--model", "mlp:64-32-32-10", "--input-norm", "standardize",
    "--lr", "0.1", "--momentum", "0.9", "--batch-size", "30", "--seed", "2",
    "--steps", "200", "--eval-every", "25", "--checkpoint-every", "40", "--no-progress",
]  # fmt: skip


def _lines_without_speed(path: Path) -> list[dict[str, Any]]:
    lines = _metrics(path)
    for line in lines:
        line.pop("steps_per_s", None)
    return lines


def _press_ctrl_c(monkeypatch: pytest.MonkeyPatch, at_batches: dict[int, int]) -> None:
    """Deliver SIGINT to this process (Ctrl-C) while drawing the given batches: {batch number: times}."""
    original = training.BatchSampler.next
    drawn = [0]

    def next_batch(self: Any) -> torch.Tensor:
        drawn[0] += 1
        for _ in range(at_batches.get(drawn[0], 0)):
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(training.BatchSampler, "next", next_batch)


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_the_resumed_run_is_bit_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli([*TRAIN_OPTIONS, "--out", str(tmp_path / "whole")], capsys)
    assert code == 0, err

    with monkeypatch.context() as patch:
        _press_ctrl_c(patch, {137: 1})  # mid-way between an evaluation (125) and a checkpoint (160)
        code, out, err = run_cli([*TRAIN_OPTIONS, "--out", str(tmp_path / "split")], capsys)
    assert code == 130
    assert "Traceback" not in err
    assert "done:" not in out
    assert len(err.strip().splitlines()) == 1, err
    checkpoint = tmp_path / "split" / "checkpoint.pt"
    match = re.fullmatch(
        r"batchnorm: interrupted at step 137; last checkpoint (\S+) \(step 137\); resume with: (.+)\n", err
    )
    assert match, err
    assert Path(match[1]) == checkpoint
    assert match[2] == shlex.join(["batchnorm", "train", "--resume", str(checkpoint), "--out", str(tmp_path / "split")])
    assert load_checkpoint(checkpoint)["step"] == 137  # the state at the interrupt, not the last periodic save

    code, out, err = run_cli([*shlex.split(match[2])[1:], "--no-progress"], capsys)
    assert code == 0, err
    assert "done: 200 steps" in out
    _assert_equal_states(_state(tmp_path / "whole" / "checkpoint.pt"), _state(checkpoint))
    # Every metric, the training loss averaged across the interrupt included, is the uninterrupted run's.
    assert _lines_without_speed(checkpoint.parent / "metrics.jsonl") == _lines_without_speed(
        tmp_path / "whole" / "metrics.jsonl"
    )


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_previous_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        _press_ctrl_c(patch, {97: 2})
        code, _, err = run_cli([*TRAIN_OPTIONS, "--out", str(tmp_path)], capsys)
    assert code == 130
    assert re.fullmatch(r"batchnorm: interrupted at step 96; last checkpoint \S+ \(step 80\); resume with: .+\n", err)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 80


def test_ctrl_c_before_training_names_the_existing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    short = [*TRAIN_OPTIONS[:-5], "--steps", "20", "--eval-every", "10", "--no-progress", "--out", str(tmp_path)]
    assert run_cli(short, capsys)[0] == 0

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("batchnorm.cli.train.train", interrupted)
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path)], capsys)
    assert code == 130
    assert err == (
        f"batchnorm: interrupted before training started; last checkpoint {tmp_path / 'checkpoint.pt'} (step 20); "
        f"resume with: batchnorm train --resume {tmp_path / 'checkpoint.pt'} --out {tmp_path}\n"
    )


def test_diverged_run_keeps_its_metrics_and_resumed_with_a_lower_lr_equals_a_fresh_run_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = [
        "train", "--data", "synthetic", "--model", "mlp:64-32-32-10", "--norm", "none", "--init", "normal:0.1",
        "--steps", "60", "--eval-every", "1", "--checkpoint-every", "1000", "--no-progress",
    ]  # fmt: skip
    diverged = tmp_path / "diverged"
    code, _, err = run_cli([*options, "--lr", "1e6", "--out", str(diverged)], capsys)
    assert code == 3, err
    lines = _metrics(diverged / "metrics.jsonl")
    match = re.search(r"training diverged at step (\d+)", err)
    assert match, err
    # Every evaluation before the divergence, then one line saying where and why it stopped.
    assert [line["step"] for line in lines] == [*range(1, int(match[1])), int(match[1])]
    assert lines[-1]["diverged"] == err.removeprefix("batchnorm: ").strip()
    assert all("test_accuracy" in line for line in lines[:-1])

    # The kept checkpoint is the initial state (step 0): resumed with a sane learning rate, it must train exactly
    # as a fresh run with that learning rate does.
    checkpoint = diverged / "checkpoint.pt"
    code, out, err = run_cli(["train", "--resume", str(checkpoint), "--out", str(diverged), "--lr", "0.1"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == "resuming with lr 0.1 (checkpoint had 1e+06)"
    fresh = tmp_path / "fresh"
    code, _, err = run_cli([*options, "--lr", "0.1", "--out", str(fresh)], capsys)
    assert code == 0, err
    _assert_equal_states(_state(fresh / "checkpoint.pt"), _state(checkpoint))
    assert load_checkpoint(checkpoint)["config"]["lr"] == 0.1  # the next resume keeps the new rate
    assert _lines_without_speed(checkpoint.parent / "metrics.jsonl") == _lines_without_speed(fresh / "metrics.jsonl")


def test_resume_applies_changed_optimizer_options_and_refuses_data_and_batch_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = [*TRAIN_OPTIONS[:-5], "--steps", "40", "--eval-every", "20", "--no-progress", "--out", str(tmp_path)]
    assert run_cli(short, capsys)[0] == 0
    checkpoint = tmp_path / "checkpoint.pt"
    before = checkpoint.read_bytes()
    resume = ["train", "--resume", str(checkpoint), "--out", str(tmp_path), "--no-progress"]
    for option, value, message in (
        ("--batch-size", "10", "--batch-size 10 differs from the checkpoint's 30"),
        ("--seed", "3", "--seed 3 differs from the checkpoint's 2"),
        ("--data", "digits", "--data digits differs from the checkpoint's synthetic"),
        ("--val-fraction", "0.2", "--val-fraction 0.2 differs from the checkpoint's 0.1"),
    ):
        code, out, err = run_cli([*resume, "--steps", "60", option, value], capsys)
        assert code == 2, err
        assert err.startswith(f"batchnorm: error: {message}: a resumed run keeps its data, batches and network"), err
        assert len(err.strip().splitlines()) == 1
        assert checkpoint.read_bytes() == before

    # The same values given again change nothing and say nothing.
    code, out, err = run_cli([*resume, "--steps", "50", "--batch-size", "30", "--lr", "0.1", "--seed", "2"], capsys)
    assert code == 0, err
    assert out.startswith("done: 50 steps")
    code, out, err = run_cli(
        [*resume, "--steps", "60", "--lr", "0.05", "--momentum", "0.5", "--weight-decay", "0.001", "--no-guard"],
        capsys,
    )
    assert code == 0, err
    assert out.splitlines()[:4] == [
        "resuming with lr 0.05 (checkpoint had 0.1)",
        "resuming with momentum 0.5 (checkpoint had 0.9)",
        "resuming with weight decay 0.001 (checkpoint had 0)",
        "resuming with the divergence guard off (checkpoint had it on)",
    ]
    payload = load_checkpoint(checkpoint)
    assert payload["step"] == 60
    assert (payload["config"]["lr"], payload["config"]["momentum"], payload["config"]["weight_decay"]) == (
        0.05,
        0.5,
        0.001,
    )
    assert payload["config"]["guard"] is False
    group = payload["optimizer"]["param_groups"][0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.5, 0.001)


def test_resuming_a_finished_run_says_there_is_nothing_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = [*TRAIN_OPTIONS[:-5], "--steps", "40", "--eval-every", "20", "--no-progress", "--out", str(tmp_path)]
    assert run_cli(short, capsys)[0] == 0
    checkpoint, metrics = tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl"
    before = checkpoint.read_bytes(), metrics.read_bytes()
    last = _metrics(metrics)[-1]
    for extra in ([], ["--steps", "30"]):
        code, out, err = run_cli(["train", "--resume", str(checkpoint), "--out", str(tmp_path), *extra], capsys)
        assert code == 0, err
        assert out.startswith(
            f"nothing to do: run finished at step 40{' (--steps 30 is not beyond it)' if extra else ''}; "
            f"validation accuracy {last['val_accuracy']:.4f}, test accuracy {last['test_accuracy']:.4f}; "
        ), out
        assert "nan" not in out
        assert (checkpoint.read_bytes(), metrics.read_bytes()) == before


def test_resume_changes_lists_applied_settings_and_refuses_the_others() -> None:
    stored = dataclasses.replace(SMALL, lr=0.5)
    config, notes = resume_changes(stored, {"lr": 0.1, "eval_every": 10, "batch_size": 30, "steps": 999})
    assert (config.lr, config.eval_every, config.batch_size, config.steps) == (0.1, 10, 30, SMALL.steps)
    assert notes == ["resuming with lr 0.1 (checkpoint had 0.5)", "resuming with eval every 10 (checkpoint had 50)"]
    assert resume_changes(stored, {"model": "mlp:64-32-32-10"}) == (stored, [])  # the same spec, spelled alike
    with pytest.raises(CheckpointError, match=r"--input-norm minmax differs from the checkpoint's standardize"):
        resume_changes(stored, {"input_norm": "minmax"})
