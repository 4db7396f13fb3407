"""``batchnorm fold`` and ``batchnorm recalibrate`` on checkpoints of short ``train`` runs (synthetic data).

References are independent of the code under test: the checkpoint's unfolded
model run in float64, and float64 statistics of the first hidden layer's
pre-activations over the whole training part.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from batchnorm.cli import main
from batchnorm.lab.data import load_dataset, split_validation
from batchnorm.lab.training import load_checkpoint, model_from_checkpoint
from helpers import run_cli

SYNTHETIC = ["--data", "synthetic", "--no-progress"]


def _words(text: str) -> str:
    return " ".join(text.split())


def _train(out: Path, *options: str) -> Path:
    assert main(["train", *SYNTHETIC, "--steps", "20", "--eval-every", "10", "--out", str(out), *options]) == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("mlp"), "--model", "mlp:64-16-10", "--act", "tanh")


@pytest.fixture(scope="module")
def cnn_after_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("cnn"), "--model", "cnn:1-4-6-10", "--act", "relu", "--placement", "after")


def _one_line_error(code: int, out: str, err: str, message: str) -> None:
    assert code == 2
    assert message in err
    assert err.count("\n") == 1, err
    assert err.startswith("batchnorm: error: ")


@pytest.mark.parametrize(
    ("verb", "mentions"),
    [
        (
            "fold",
            ["CKPT", "--out", "--force", "--tolerance", "torch.export", "gamma", "sqrt(var + eps)", "Exit code 1"],
        ),
        ("recalibrate", ["CKPT", "--out", "--force", "--batches", "--batch-size", "--seed", "unbiased", "precise BN"]),
    ],
)
def test_help_explains_the_verb(verb: str, mentions: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([verb, "--help"], capsys)
    assert code == 0
    text = _words(out)
    for mention in mentions:
        assert mention in text, mention


# --------------------------------------------------------------------------- fold


def _reference_logits(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw test images, labels and the unfolded model's float64 logits."""
    model, config, normalizer, _ = model_from_checkpoint(checkpoint)
    data = load_dataset(config.data, seed=config.seed)
    with torch.no_grad():
        logits = model.double()(normalizer(data.test_images).double())
    return data.test_images, data.test_labels, logits


def test_fold_saves_a_program_equal_to_the_checkpoint(mlp_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = mlp_checkpoint.parent / "model.pt2"
    code, stdout, err = run_cli(["fold", str(mlp_checkpoint), "--out", str(out)], capsys)
    assert code == 0, err
    assert "folded 1 BN layer(s), left 0" in stdout
    assert "folded bn1 into fc1 (now Identity)" in stdout
    assert "test accuracy: " in stdout
    assert f"wrote {out}" in stdout
    images, labels, reference = _reference_logits(mlp_checkpoint)
    program = torch.export.load(str(out)).module()  # torch only: no batchnorm class is needed to load it
    with torch.no_grad():
        logits = program(images).double()
    assert float((logits - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    accuracy = float((reference.argmax(1) == labels).double().mean())
    assert f"test accuracy: {accuracy:.4f} before folding, {accuracy:.4f} after" in stdout
    # The saved graph has no BN left.
    assert "batch_norm" not in str(torch.export.load(str(out)).graph)


def test_fold_keeps_bn_after_the_activation_and_says_so(
    cnn_after_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = run_cli(["fold", str(cnn_after_checkpoint)], capsys)  # default --out: folded.pt2 beside
    assert code == 0, err
    assert "folded 0 BN layer(s), left 2" in stdout
    assert "left   bn1: follows act1 (ReLU), not a Linear or Conv layer" in stdout
    out = cnn_after_checkpoint.parent / "folded.pt2"
    images, _, reference = _reference_logits(cnn_after_checkpoint)
    with torch.no_grad():
        logits = torch.export.load(str(out)).module()(images).double()
    assert float((logits - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_output_paths_are_checked_before_any_work(
    mlp_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "exists.pt2"
    existing.write_bytes(b"keep me")
    for verb in ("fold", "recalibrate"):
        _one_line_error(
            *run_cli([verb, str(mlp_checkpoint), "--out", str(existing)], capsys),
            f"--out {existing} exists; pass --force to overwrite it",
        )
        _one_line_error(
            *run_cli([verb, str(mlp_checkpoint), "--out", str(tmp_path / "missing" / "x.pt")], capsys),
            f"the folder {tmp_path / 'missing'} does not exist",
        )
        _one_line_error(*run_cli([verb, str(mlp_checkpoint), "--out", str(tmp_path)], capsys), "is a folder")
        _one_line_error(
            *run_cli([verb, str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "y.pt")], capsys), "does not exist"
        )
    assert existing.read_bytes() == b"keep me"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            _one_line_error(
                *run_cli(["fold", str(mlp_checkpoint), "--out", str(locked / "x.pt2")], capsys), "is not writable"
            )
        finally:
            locked.chmod(0o700)


# --------------------------------------------------------------------------- recalibrate


def _training_part(checkpoint: Path) -> torch.Tensor:
    """The normalized images of the split the run trained on (the validation part carved off, if any)."""
    _, config, normalizer, _ = model_from_checkpoint(checkpoint)
    dataset = load_dataset(config.data, seed=config.seed)
    if config.val_fraction > 0:
        dataset = split_validation(dataset, config.val_fraction)
    return normalizer(dataset.train_images)


def test_recalibrate_writes_pooled_statistics(
    mlp_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _training_part(mlp_checkpoint)
    size = len(images)  # one batch of every example (the split's size need not have a divisor)
    out = tmp_path / "recalibrated.pt"
    code, stdout, err = run_cli(
        ["recalibrate", str(mlp_checkpoint), "--batch-size", str(size), "--out", str(out), "--no-progress"], capsys
    )
    assert code == 0, err
    batches = len(images) // size
    assert f"recalibrated 1 BN layer(s) over {batches} batches of {size} ({len(images)} training examples)" in stdout
    assert "test accuracy: " in stdout
    # Reference: bn1's input is fc1 of every training image, whatever the batches; float64 statistics.
    model, _, _, payload = model_from_checkpoint(mlp_checkpoint)
    with torch.no_grad():
        hidden = model.fc1.double()(images.double().flatten(1))
    var, mean = torch.var_mean(hidden, dim=0, correction=1)
    written = load_checkpoint(out)
    torch.testing.assert_close(written["model"]["bn1.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(written["model"]["bn1.running_var"].double(), var, rtol=1e-5, atol=1e-6)
    for key, value in payload["model"].items():
        if not key.startswith("bn1.running_"):
            assert torch.equal(written["model"][key], value), key
    assert written["step"] == payload["step"]
    assert written["recalibration"]["batches"] == batches
    # The new checkpoint is read by explain and by train --resume.
    assert run_cli(["explain", "--checkpoint", str(out), "--eval"], capsys)[0] == 0
    resumed = tmp_path / "resumed"
    code, _, err = run_cli(
        ["train", "--resume", str(out), "--steps", "22", "--no-progress", "--out", str(resumed)], capsys
    )
    assert code == 0, err


def test_recalibrate_default_output_and_bad_batches(mlp_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run_cli(["recalibrate", str(mlp_checkpoint), "--batches", "3", "--no-progress"], capsys)
    assert code == 0, err
    default = mlp_checkpoint.with_name("checkpoint-recalibrated.pt")
    assert f"wrote {default}" in stdout
    assert load_checkpoint(default)["recalibration"]["batches"] == 3
    _one_line_error(
        *run_cli(["recalibrate", str(mlp_checkpoint), "--force", "--batch-size", "1"], capsys), "at least 2"
    )
    _one_line_error(
        *run_cli(["recalibrate", str(mlp_checkpoint), "--force", "--batches", "100000"], capsys),
        "--batches 100000 is more than the",
    )
    _one_line_error(
        *run_cli(["recalibrate", str(mlp_checkpoint), "--force", "--batch-size", "100000"], capsys),
        "is larger than the training split",
    )
