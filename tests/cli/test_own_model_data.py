"""Your own network (``--model FILE.py:FACTORY``) and data (``--data FILE.npz``): every error one line, and the
happy paths (explain and train an own MLP, train on an npz), with explain's numbers checked against torch."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab.data import load_npz
from batchnorm.lab.models import build_factory_model, check_forward, load_factory
from helpers import run_cli

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def raises():
        raise RuntimeError("boom")

    def not_a_module():
        return 42

    def wrong_outputs():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 5))

    NOT_CALLABLE = 3
    """
)


def _data(tmp_path: Path, name: str = "own.npz", **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _good_arrays(count: int = 90) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(count) % 3
    x = rng.normal(size=(count, 4, 4)).astype(np.float32) + y[:, None, None]
    return {"x": x, "y": y}


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(FACTORIES)
    return path


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.py:mlp", "no such file"),
        ("{net}:nope", "defines no function 'nope' (it defines: mlp, not_a_module, raises, wrong_outputs)"),
        ("{net}:raises", "raises() raised RuntimeError: boom"),
        ("{net}:not_a_module", "returned a value of type int, not a torch.nn.Module"),
        ("{net}:NOT_CALLABLE", "is a int, not a function"),
        ("{net}:1bad", "is not a function name"),
    ],
)
def test_factory_errors_are_one_line(
    factories: Path, spec: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _one_line_error(["explain", "--model", spec.format(net=factories), "--data", "synthetic"], capsys, message)
    with pytest.raises(ValueError, match="--model"):
        build_factory_model(spec.format(net=factories))


def test_factory_that_fails_to_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    _one_line_error(["explain", "--model", f"{broken}:f"], capsys, "importing")


def test_train_checks_the_logits_with_one_forward_pass(
    factories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data(tmp_path, **_good_arrays())
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    _one_line_error([*argv, "--model", f"{factories}:wrong_outputs"], capsys, "returns (60, 5); training needs")
    assert not (tmp_path / "run").exists()
    _one_line_error([*argv, "--model", f"{factories}:mlp", "--norm", "none"], capsys, "--norm does not apply")
    _one_line_error(["compare", "--model", f"{factories}:mlp"], capsys, "compare builds its two networks")
    model = build_factory_model(f"{factories}:mlp")
    with pytest.raises(ValueError, match=r"a forward pass on a batch of shape \(2, 7\) failed"):
        check_forward(model, torch.zeros(2, 7), "net.py:mlp")


def test_own_mlp_explained_matches_torch(factories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arrays = _good_arrays()
    data = _data(tmp_path, **arrays)
    argv = ["explain", "--model", f"{factories}:mlp", "--data", str(data), "--input-shape", "16", "--json"]
    code, out, err = run_cli([*argv, "--input-norm", "none", "--batch-size", "10"], capsys)
    assert code == 0, err
    (record,) = json.loads(out)
    assert record["input_shape"] == [10, 8]
    assert record["reduced_axes"] == [0]
    # Independently: the factory's model, the same 10 training examples (explain's batch rule), torch's BN input.
    dataset = load_npz(data)
    indices = torch.randperm(len(dataset.train_images), generator=torch.Generator().manual_seed(0))[:10]
    batch = dataset.train_images[indices].reshape(10, 16)
    model = load_factory(f"{factories}:mlp")()
    assert isinstance(model, torch.nn.Module)
    hidden = model[1](batch).double()
    assert np.allclose(record["batch_mean"], hidden.mean(0).detach().numpy(), atol=1e-6)
    assert np.allclose(record["batch_var"], hidden.var(0, correction=0).detach().numpy(), atol=1e-6)
    assert record["running_mean"] == [0.0] * 8
    assert record["running_var"] == [1.0] * 8
    wrong = [*argv[:-1], "--input-shape", "3,3"]
    _one_line_error(wrong, capsys, "--input-shape 3,3 holds 9 values but each example of the data holds 16")


def test_own_mlp_and_npz_train_for_a_few_steps(
    factories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays = _good_arrays()
    flat = {"x": arrays["x"].reshape(len(arrays["x"]), 16), "y": arrays["y"]}
    data = _data(tmp_path, **flat)
    out = tmp_path / "run"
    argv = ["train", "--model", f"{factories}:mlp", "--data", str(data), "--steps", "20", "--eval-every", "10"]
    code, stdout, err = run_cli([*argv, "--batch-size", "16", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "done: 20 steps" in stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20]
    assert (out / "report.html").is_file()
    # The spec-built network trains on the same file, with its own test split from x_test/y_test.
    with_test = _data(tmp_path, "split.npz", **flat, x_test=flat["x"][:9], y_test=flat["y"][:9])
    code, stdout, err = run_cli(
        [
            "train",
            "--model",
            "mlp:16-8-3",
            "--data",
            str(with_test),
            "--steps",
            "10",
            "--eval-every",
            "10",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "run2"),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert load_npz(with_test).test_labels.tolist() == flat["y"][:9].tolist()


def test_npz_without_test_holds_out_a_stratified_fifth(tmp_path: Path) -> None:
    dataset = load_npz(_data(tmp_path, **_good_arrays(90)))
    assert dataset.num_classes == 3
    assert tuple(dataset.train_images.shape[1:]) == (1, 4, 4)
    assert np.bincount(dataset.test_labels.numpy()).tolist() == [6, 6, 6]
    assert np.bincount(dataset.train_labels.numpy()).tolist() == [24, 24, 24]


GOOD = _good_arrays(30)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        pytest.param({"y": GOOD["y"]}, "missing array 'x' (found: y)", id="no-x"),
        pytest.param({"x": GOOD["x"]}, "missing array 'y' (found: x)", id="no-y"),
        pytest.param({"x": GOOD["x"].astype(bool), "y": GOOD["y"]}, "'x' has dtype bool", id="x-dtype"),
        pytest.param({"x": GOOD["x"], "y": GOOD["y"].astype(np.float32)}, "'y' has dtype float32", id="y-dtype"),
        pytest.param({"x": GOOD["x"], "y": GOOD["y"][:-1]}, "'x' has 30 examples but 'y' has 29", id="lengths"),
        pytest.param({"x": GOOD["x"], "y": GOOD["y"] - 1}, "holds the label -1", id="negative"),
        pytest.param({"x": GOOD["x"], "y": GOOD["y"] * 2}, "no example of 1, 3", id="not-0-to-k"),
        pytest.param({"x": GOOD["x"], "y": np.zeros(30, dtype=np.int64)}, "a single class", id="one-class"),
        pytest.param(
            {"x": np.where(np.arange(30)[:, None, None] == 3, np.nan, GOOD["x"]), "y": GOOD["y"]},
            "holds 16 NaN or infinite values",
            id="nan",
        ),
        pytest.param(
            {"x": GOOD["x"].reshape(-1), "y": GOOD["y"]}, "expected (N, D), (N, H, W) or (N, C, H, W)", id="rank"
        ),
        pytest.param({**GOOD, "x_test": GOOD["x"]}, "'x_test' is given without 'y_test'", id="half-test"),
        pytest.param(
            {**GOOD, "x_test": GOOD["x"][:, :2], "y_test": GOOD["y"]}, "'x_test' examples have shape", id="test-shape"
        ),
        pytest.param(
            {**GOOD, "x_test": GOOD["x"], "y_test": GOOD["y"] + 1}, "'y_test' holds the label 3", id="test-range"
        ),
    ],
)
def test_npz_errors_are_one_line(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data(tmp_path, **arrays)
    for verb in (["train", "--out", str(tmp_path / "run")], ["explain"]):
        _one_line_error([*verb, "--data", str(data), "--model", "mlp:16-8-3"], capsys, message)
    assert not (tmp_path / "run").exists()


def test_npz_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(["train", "--data", str(tmp_path / "none.npz")], capsys, "no such file")
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"not a zip")
    _one_line_error(["explain", "--data", str(damaged)], capsys, "not a readable .npz file")
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    _one_line_error(["explain", "--data", str(objects)], capsys, "not a readable .npz file")
    _one_line_error(["train", "--data", "npz"], capsys, "expected one of mnist5k, digits, mnist, synthetic or a FILE")
