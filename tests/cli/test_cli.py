"""The command line: help for every verb, and bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchnorm import __version__
from batchnorm.cli import VERBS, main
from helpers import run_cli


def _words(text: str) -> str:
    """Help text with line wrapping undone."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- help

HELP_MENTIONS = {
    "train": [
        "--model", "--act", "--norm", "--placement", "--init", "normal:STD", "kaiming", "xavier",
        "mlp:784-100-100-100-10", "cnn:1-16-32-10", "--data", "mnist5k", "--data-dir", "--download",
        "--input-norm", "--lr", "--momentum", "--weight-decay", "--batch-size", "--steps", "--eval-every",
        "--seed", "--checkpoint-every", "--out", "--resume", "--no-guard", "one CPU thread", "exit code 3",
        "renorm", "ghost", "frozen", "group", "layer", "--groups", "--virtual-batch-size", "--rmax", "--dmax",
        "--renorm-warmup", "--val-fraction", "validation split",
    ],
    "explain": ["--checkpoint", "--layer", "--unit", "--json", "--eval", "--batch-size", "--model", "--data"],
    "compare": [
        "--out", "--steps", "--model", "--init", "--lr", "--data", "50000", "report.html", "--seeds", "--norm",
        "--val-fraction", "mean", "std",
    ],
    "tune": ["--grid", "--val-fraction", "validation split", "never see the test split", "--norm"],
    "report": ["run_dir", "report.html"],
}  # fmt: skip


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_help_exits_0_and_mentions_its_options(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli([verb, "--help"], capsys)
    assert code == 0, err
    text = _words(out)
    assert text.startswith(f"usage: batchnorm {verb}")
    for mention in ["--threads", *HELP_MENTIONS.get(verb, [])]:
        assert mention in text, f"{verb} --help does not mention {mention!r}"


def test_top_level_help_lists_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for verb in VERBS:
        assert verb in out
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert __version__ in out


def test_no_verb_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([], capsys)
    assert code == 2
    assert "compare" in out


def test_python_dash_m_batchnorm_help() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "batchnorm", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "usage: batchnorm" in completed.stdout
    for verb in VERBS:
        assert verb in completed.stdout


# --------------------------------------------------------------------------- bad input

SYNTHETIC = ["--data", "synthetic", "--model", "mlp:64-16-10", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-checkpoint")
    assert main(["train", *SYNTHETIC, "--steps", "10", "--eval-every", "5", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corrupted") / "checkpoint.pt"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    return path


def _bad_inputs(out: str, checkpoint: str, corrupted: str) -> list[tuple[list[str], str]]:
    return [
        (["train", "--model", "resnet:1-2", "--out", out], "unknown model spec 'resnet:1-2'"),
        (["train", "--data", "synthetic", "--model", "mlp:64-0-10", "--out", out], "widths must be positive, got 0"),
        (["train", "--data", "synthetic", "--model", "mlp:64-x-10", "--out", out], "width 'x' is not an integer"),
        (["train", "--data", "imagenet", "--out", out], "argument --data: invalid choice: 'imagenet'"),
        (
            ["train", "--data", "mnist", "--data-dir", "/nonexistent/mnist", "--out", out],
            "/nonexistent/mnist does not exist",
        ),
        (["train", "--data", "mnist", "--out", out], "needs --data-dir"),
        (["train", "--lr", "-1", "--out", out], "argument --lr"),
        (["train", "--lr=-0.5", "--out", out], "argument --lr"),
        (["train", "--lr", "0", "--out", out], "argument --lr: expected a number > 0"),
        (["train", "--lr", "nan", "--out", out], "argument --lr"),
        (["train", "--steps", "abc", "--out", out], "argument --steps: expected a positive integer, got 'abc'"),
        (["train", "--steps", "0", "--out", out], "argument --steps"),
        (["train", "--steps", "1.5", "--out", out], "argument --steps"),
        (["train", "--batch-size", "-3", "--out", out], "argument --batch-size"),
        (["train", "--momentum", "-0.1", "--out", out], "argument --momentum"),
        (["train", "--init", "normal:zero", "--out", out], "init 'normal:zero'"),
        (["train", "--act", "gelu", "--out", out], "argument --act: invalid choice"),
        (["train", *SYNTHETIC, "--model", "mlp:784-10", "--out", out], "expects 784 input values"),
        (["train", *SYNTHETIC, "--batch-size", "1000", "--out", out], "larger than the training split"),
        (["train", "--resume", corrupted, "--out", out], "is corrupted or not a batchnorm checkpoint"),
        (["train", "--resume", "/nonexistent/checkpoint.pt", "--out", out], "does not exist"),
        (["train", "--resume", checkpoint, "--model", "mlp:64-32-10", "--out", out], "is of another model"),
        (["train", "--resume", checkpoint, "--norm", "none", "--out", out], "norm batch (requested none)"),
        (["explain", "--checkpoint", corrupted], "is corrupted or not a batchnorm checkpoint"),
        (["explain", "--checkpoint", "/nonexistent/checkpoint.pt"], "does not exist"),
        (["explain", "--checkpoint", checkpoint, "--act", "relu"], "is of another model"),
        (["explain", "--model", "cnn:1-0-10", "--data", "synthetic"], "widths must be positive"),
        (["explain", "--data", "mnist", "--data-dir", "/nonexistent/mnist"], "does not exist"),
        (["explain", "--data", "synthetic"], "the model cannot run on this data"),
        (["compare", "--model", "mlp:784-100--10", "--out", out], "is not an integer"),
        (["compare", "--lr", "-1", "--out", out], "argument --lr"),
        (["compare", "--data", "mnist", "--data-dir", "/nonexistent/mnist", "--out", out], "does not exist"),
        (["train", "--threads", "0", "--out", out], "argument --threads"),
        (["train", "--norm", "instance", "--out", out], "argument --norm: invalid choice: 'instance'"),
        (["train", "--val-fraction", "0.7", "--out", out], "argument --val-fraction: expected a number between 0"),
        (["train", "--val-fraction", "x", "--out", out], "argument --val-fraction"),
        (["train", "--groups", "0", "--out", out], "argument --groups: expected a positive integer"),
        (["train", "--rmax", "0.5", "--out", out], "--rmax must be a finite number >= 1, got 0.5"),
        (["train", "--dmax", "-1", "--out", out], "argument --dmax"),
        (["train", "--renorm-warmup", "-1", "--out", out], "--renorm-warmup must be an integer >= 0"),
        (
            ["train", *SYNTHETIC, "--norm", "ghost", "--virtual-batch-size", "59", "--out", out],
            "--virtual-batch-size 59 with --batch-size 60 leaves a virtual batch of one example",
        ),
        (["train", *SYNTHETIC, "--norm", "renorm", "--batch-size", "1", "--out", out], "at least 2 with --norm renorm"),
        (["compare", "--seeds", "0", "--out", out], "argument --seeds: expected a positive integer"),
        (["compare", *SYNTHETIC, "--norm", "none", "--out", out], "compare trains --norm against none"),
        (["tune", *SYNTHETIC, "--grid", "lr=1", "--val-fraction", "0", "--out", out], "--val-fraction must be > 0"),
        (["tune", *SYNTHETIC, "--grid", "norm=batch,instance", "--out", out], "--grid norm: expected one of batch"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]


BAD_INPUT_IDS = [
    "unknown-spec", "zero-width", "non-integer-width", "unknown-dataset", "missing-data-folder", "mnist-without-dir",
    "negative-lr", "negative-lr-equals", "zero-lr", "nan-lr", "non-numeric-steps", "zero-steps", "float-steps",
    "negative-batch", "negative-momentum", "bad-init", "unknown-act", "spec-does-not-fit-data", "batch-too-large",
    "resume-corrupted", "resume-missing", "resume-other-model", "resume-other-norm", "explain-corrupted",
    "explain-missing", "explain-other-model", "explain-zero-width", "explain-missing-data-folder",
    "explain-spec-does-not-fit", "compare-bad-spec", "compare-negative-lr", "compare-missing-data-folder",
    "zero-threads", "bad-norm", "big-val-fraction", "text-val-fraction", "zero-groups", "small-rmax",
    "negative-dmax", "negative-warmup", "ghost-remainder-of-one", "renorm-batch-of-one", "zero-seeds",
    "compare-norm-none", "tune-without-validation", "tune-bad-norm-grid", "unknown-verb",
]  # fmt: skip


@pytest.mark.parametrize("index", range(len(BAD_INPUT_IDS)), ids=BAD_INPUT_IDS)
def test_bad_input_is_one_line_on_stderr_with_exit_code_2(
    index: int, tmp_path: Path, checkpoint: Path, corrupted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = _bad_inputs(str(tmp_path / "out"), str(checkpoint), str(corrupted))
    assert len(cases) == len(BAD_INPUT_IDS)
    argv, message = cases[index]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert err.startswith("batchnorm")


@pytest.mark.parametrize("value", ["many", "0", "100000000000"])
def test_bad_threads_environment_variable(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATCHNORM_THREADS", value)
    code, _, err = run_cli(["explain", "--data", "synthetic", "--model", "mlp:64-8-10", "--json"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"BATCHNORM_THREADS must be an integer from 1 to 1024, got '{value}'" in err


def test_bad_resume_leaves_the_checkpoint_untouched(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = checkpoint.read_bytes()
    code, _, _ = run_cli(
        ["train", "--resume", str(checkpoint), "--model", "mlp:64-32-10", "--out", str(tmp_path)], capsys
    )
    assert code == 2
    assert checkpoint.read_bytes() == before
    assert not (tmp_path / "checkpoint.pt").exists()


def test_train_on_tiny_idx_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Full-MNIST code path end to end, on eight 28x28 images written here."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(1)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for stem, shape in (
        ("train-images-idx3-ubyte", (8, 28, 28)),
        ("train-labels-idx1-ubyte", (8,)),
        ("t10k-images-idx3-ubyte", (4, 28, 28)),
        ("t10k-labels-idx1-ubyte", (4,)),
    ):
        values = rng.integers(0, 10 if len(shape) == 1 else 256, shape, dtype=np.uint8)
        header = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
        with gzip.open(folder / f"{stem}.gz", "wb") as handle:
            handle.write(header + values.tobytes())
    argv = ["train", "--data", "mnist", "--data-dir", str(folder), "--model", "mlp:784-16-10", "--batch-size", "4"]
    # Eight images of random digits: 10% of a class of one or two rounds to no validation example.
    code, out, err = run_cli([*argv, "--steps", "3", "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2
    assert "--val-fraction 0.1 leaves 0 validation and 8 training examples" in err
    code, out, err = run_cli(
        [*argv, "--steps", "3", "--val-fraction", "0", "--out", str(tmp_path / "run"), "--no-progress"], capsys
    )
    assert code == 0, err
    assert "done: 3 steps" in out


# --------------------------------------------------------------------------- normalizations, validation, seeds


@pytest.mark.parametrize("norm", ["group", "layer", "frozen", "none"])
def test_explain_says_there_is_nothing_to_explain_without_bn_layers(
    norm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["explain", "--data", "synthetic", "--model", "mlp:64-32-10", "--norm", norm], capsys)
    assert code == 0, err
    assert out.startswith("nothing to explain: this model has no batch-norm layer")
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("norm", ["renorm", "ghost"])
def test_explain_shows_batch_statistic_variants(norm: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--data", "synthetic", "--model", "mlp:64-32-16-10", "--norm", norm]
    code, out, err = run_cli([*argv, "--virtual-batch-size", "16"], capsys)
    assert code == 0, err
    assert "2 BN layer(s)" in out
    kind = "BatchRenorm" if norm == "renorm" else "GhostBatchNorm"
    assert out.count(kind) == 2
    if norm == "ghost":
        assert "per virtual batch of 16 examples (4 of them in this batch of 60)" in out


def test_train_reports_validation_and_test_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", *SYNTHETIC, "--norm", "group", "--steps", "10", "--eval-every", "5", "--out", str(tmp_path)]
    code, out, err = run_cli([*argv, "--val-fraction", "0.2"], capsys)
    assert code == 0, err
    assert "validation accuracy" in out
    assert "test accuracy" in out
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (payload["config"]["norm"], payload["config"]["val_fraction"]) == ("group", 0.2)


def test_compare_with_seeds_prints_mean_and_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", "--data", "synthetic", "--model", "mlp:64-16-10", "--input-norm", "standardize"]
    code, out, err = run_cli(
        [*argv, "--steps", "20", "--eval-every", "10", "--seeds", "2", "--out", str(tmp_path), "--no-progress"], capsys
    )
    assert code == 0, err
    assert "seeds 0, 1" in out
    assert "over 2 seeds" in out
    assert "±" in out
    code, out, err = run_cli(
        [*argv, "--steps", "20", "--eval-every", "10", "--seeds", "2", "--out", str(tmp_path), "--no-progress"], capsys
    )
    assert code == 0, err
    assert "reused 4 finished runs" in out
