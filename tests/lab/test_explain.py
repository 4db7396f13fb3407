"""``explain`` and ``explain_unit`` against the NumPy reference, and the ``explain`` command.

Every number is checked against float64 NumPy statistics of the BN layer's
*real* input, captured here with a forward hook on a copy of the model (so
the capture itself cannot disturb the model under test), and passed through
``batchnorm.reference.batch_norm_forward``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm.cli import main
from batchnorm.lab.data import load_dataset
from batchnorm.lab.explain import explain_unit, format_table, format_unit
from batchnorm.lab.models import build_model
from batchnorm.reference import batch_norm_forward
from helpers import run_cli


def _randomize_affine(model: nn.Module) -> None:
    """Non-trivial gamma, beta and running statistics, so that no field is trivially 1 or 0."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in model.modules():
            if bn.is_batch_norm(module):
                size = module.weight.shape
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_mean.copy_(torch.randn(size, generator=generator))
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(17)


def _capture_bn_inputs(model: nn.Module, x: torch.Tensor, train: bool = True) -> dict[str, np.ndarray]:
    """The input of every BN layer on ``x`` (float64), from a forward pass of a deep copy."""
    twin = copy.deepcopy(model)
    twin.train(train)
    inputs: dict[str, np.ndarray] = {}
    for name, module in twin.named_modules():
        if bn.is_batch_norm(module):

            def hook(_: nn.Module, args: tuple[torch.Tensor, ...], *, key: str = name) -> None:
                inputs[key] = args[0].detach().double().numpy()

            module.register_forward_pre_hook(hook)
    with torch.no_grad():
        twin(x)
    return inputs


def _state_snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    modes = {name: module.training for name, module in model.named_modules()}
    return state, modes


def _assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    state, modes = _state_snapshot(model)
    assert state.keys() == before[0].keys()
    for name in state:
        assert torch.equal(state[name], before[0][name]), f"{name} changed"
    assert modes == before[1]


class SequenceModel(nn.Module):
    """A token model: ``(N, L, C_in)`` -> Linear -> BN over the last axis (``N*L`` values per statistic)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.norm = bn.BatchNorm(6, axis=-1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.embed(x))))


def _dense() -> tuple[nn.Module, torch.Tensor]:
    return build_model("mlp:20-12-9-4", activation="tanh", init="normal:0.5", seed=0), torch.randn(16, 20)


def _conv() -> tuple[nn.Module, torch.Tensor]:
    return build_model("cnn:2-5-7-4", activation="relu", init="kaiming", image_size=8, seed=0), torch.randn(6, 2, 8, 8)


def _channels_last() -> tuple[nn.Module, torch.Tensor]:
    model, x = _conv()
    return model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)


def _torch_layers() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
        nn.BatchNorm1d(5),
    )
    return model, torch.randn(5, 3, 7, 7)


def _sequence() -> tuple[nn.Module, torch.Tensor]:
    return SequenceModel(), torch.randn(4, 9, 3)


MODELS: list[Any] = [
    pytest.param(_dense, {"bn1": (1, [0], 16), "bn2": (1, [0], 16)}, id="dense-mlp"),
    pytest.param(_conv, {"bn1": (1, [0, 2, 3], 6 * 8 * 8), "bn2": (1, [0, 2, 3], 6 * 4 * 4)}, id="cnn"),
    pytest.param(
        _channels_last, {"bn1": (1, [0, 2, 3], 6 * 8 * 8), "bn2": (1, [0, 2, 3], 6 * 4 * 4)}, id="cnn-channels-last"
    ),
    pytest.param(
        _torch_layers, {"1": (1, [0, 2, 3], 5 * 7 * 7), "4": (1, [0, 2, 3], 5 * 3 * 3), "7": (1, [0], 5)}, id="torch-bn"
    ),
    pytest.param(_sequence, {"norm": (2, [0, 1], 4 * 9)}, id="sequence-axis-minus-1"),
]

Factory = Callable[[], tuple[nn.Module, torch.Tensor]]


# --------------------------------------------------------------------------- explain


@pytest.mark.parametrize(("factory", "expected"), MODELS)
def test_explain_numbers_equal_the_numpy_reference(factory: Factory, expected: dict[str, Any]) -> None:
    model, x = factory()
    _randomize_affine(model)
    inputs = _capture_bn_inputs(model, x)
    records = bn.explain(model, x)
    assert [record["name"] for record in records] == list(expected)
    for record in records:
        feature_axis, reduced, values_per_statistic = expected[record["name"]]
        module = dict(model.named_modules())[record["name"]]
        captured = inputs[record["name"]]
        assert record["input_shape"] == list(captured.shape)
        assert record["feature_axis"] == feature_axis
        assert record["reduced_axes"] == reduced
        assert record["values_per_statistic"] == values_per_statistic == captured.size // captured.shape[feature_axis]
        assert record["num_features"] == captured.shape[feature_axis] == module.weight.numel()
        assert record["param_shape"] == [module.weight.numel()]
        assert record["normalizes_with"] == "batch"
        assert record["kind"] == type(module).__name__

        # Float64 statistics of the real input: the batch mean and the biased variance of each feature.
        np.testing.assert_allclose(record["batch_mean"], captured.mean(axis=tuple(reduced)), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(record["batch_var"], captured.var(axis=tuple(reduced)), rtol=1e-12, atol=1e-12)
        _, cache = batch_norm_forward(captured, axis=feature_axis)
        np.testing.assert_allclose(record["batch_mean"], cache.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(record["batch_var"], cache.var, rtol=1e-12, atol=1e-12)
        assert cache.values_per_statistic == record["values_per_statistic"]

        np.testing.assert_array_equal(record["running_mean"], module.running_mean.double().numpy())
        np.testing.assert_array_equal(record["running_var"], module.running_var.double().numpy())
        np.testing.assert_array_equal(record["weight"], module.weight.detach().double().numpy())
        np.testing.assert_array_equal(record["bias"], module.bias.detach().double().numpy())
        assert record["eps"] == module.eps
        assert record["output_shape"] == list(captured.shape)


def test_explain_reports_the_channels_last_layout() -> None:
    model, x = _channels_last()
    records = bn.explain(model, x)
    assert records[0]["layout"] == "channels_last"
    plain, y = _conv()
    assert bn.explain(plain, y)[0]["layout"] == "contiguous"


def test_explain_in_eval_mode_normalizes_with_running_statistics_and_still_reports_the_batch() -> None:
    model, x = _dense()
    _randomize_affine(model)
    inputs = _capture_bn_inputs(model, x, train=False)
    records = bn.explain(model, x, mode="eval")
    for record in records:
        assert record["normalizes_with"] == "running"
        # The second layer's input depends on the first layer normalizing with running statistics.
        np.testing.assert_allclose(record["batch_mean"], inputs[record["name"]].mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(record["batch_var"], inputs[record["name"]].var(axis=0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="expected mode 'train' or 'eval', got 'test'"):
        bn.explain(model, x, mode="test")


@pytest.mark.parametrize("factory", [param.values[0] for param in MODELS], ids=[param.id for param in MODELS])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_explain_changes_no_running_statistics_counters_or_modes(factory: Factory, mode: str) -> None:
    model, x = factory()
    _randomize_affine(model)
    model.train(mode != "eval")
    if mode == "mixed":
        first_bn = next(module for module in model.modules() if bn.is_batch_norm(module))
        first_bn.eval()
    before = _state_snapshot(model)
    for explain_mode in ("train", "eval"):
        bn.explain(model, x, mode=explain_mode)
        _assert_unchanged(model, before)
    first_bn_name = next(name for name, module in model.named_modules() if bn.is_batch_norm(module))
    explain_unit(model, x, first_bn_name, 0)
    _assert_unchanged(model, before)


def test_explain_of_a_bare_bn_layer_and_a_model_without_bn() -> None:
    layer = nn.BatchNorm1d(3)
    x = torch.randn(8, 3, 5)
    [record] = bn.explain(layer, x)
    assert record["name"] == "BatchNorm1d"
    assert record["values_per_statistic"] == 8 * 5
    assert record["reduced_axes"] == [0, 2]
    np.testing.assert_allclose(record["batch_var"], x.double().numpy().var(axis=(0, 2)), rtol=1e-12)
    assert bn.explain(build_model("mlp:6-4-2", norm="none"), torch.randn(3, 6)) == []


def test_format_table_lists_every_layer_and_its_reduction() -> None:
    model, x = _conv()
    table = format_table(bn.explain(model, x))
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two layers
    assert "bn1" in lines[2]
    assert "N,H,W" in lines[2]
    assert f"{6 * 8 * 8} = N*H*W" in lines[2]
    assert "(5,)" in lines[2]


# --------------------------------------------------------------------------- explain_unit


@pytest.mark.parametrize(
    ("factory", "layer", "unit"),
    [
        pytest.param(_dense, "bn2", 4, id="dense"),
        pytest.param(_conv, "bn2", 6, id="cnn"),
        pytest.param(_channels_last, "bn1", 2, id="cnn-channels-last"),
        pytest.param(_sequence, "norm", 5, id="sequence"),
    ],
)
def test_explain_unit_steps_equal_numpy_and_the_layers_own_output(factory: Factory, layer: str, unit: int) -> None:
    model, x = factory()
    _randomize_affine(model)
    module = dict(model.named_modules())[layer]
    captured = _capture_bn_inputs(model, x)[layer]
    feature_axis = module.axis % captured.ndim if isinstance(module, bn.BatchNorm) else 1
    result = explain_unit(model, x, layer, unit)

    values = np.take(captured, unit, axis=feature_axis).ravel()
    m = values.size
    mean = values.sum() / m
    variance = ((values - mean) ** 2).sum() / m
    normalized = (values - mean) / math.sqrt(variance + module.eps)
    gamma, beta = float(module.weight.detach()[unit]), float(module.bias.detach()[unit])
    assert result["values_per_statistic"] == m
    assert result["feature_axis"] == feature_axis
    np.testing.assert_allclose(sorted(result["values"]), sorted(values), rtol=1e-12)
    assert result["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-14)
    assert result["variance"] == pytest.approx(variance, rel=1e-12)
    assert result["unbiased_variance"] == pytest.approx(variance * m / (m - 1), rel=1e-12)
    assert result["inv_std"] == pytest.approx(1 / math.sqrt(variance + module.eps), rel=1e-12)
    assert result["gamma"] == gamma
    assert result["beta"] == beta
    np.testing.assert_allclose(np.sort(result["normalized"]), np.sort(normalized), rtol=1e-10, atol=1e-12)

    # The reference's full-layer output, feature `unit`, in the same order as the layer's own output.
    y, _ = batch_norm_forward(
        captured,
        module.weight.detach().double().numpy(),
        module.bias.detach().double().numpy(),
        module.eps,
        feature_axis,
    )
    expected_output = np.take(y, unit, axis=feature_axis).ravel()
    np.testing.assert_allclose(np.sort(result["output"]), np.sort(expected_output), rtol=1e-10, atol=1e-12)
    # What the layer itself returned (float32) matches the step-by-step numbers.
    np.testing.assert_allclose(result["layer_output"], result["output"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(result["normalized"]).mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(result["normalized"]).var(), variance / (variance + module.eps), rtol=1e-10)


def _torch_unit_reference(
    model: nn.Module, x: torch.Tensor, layer: str, unit: int, *, train: bool
) -> tuple[np.ndarray, float, float]:
    """Torch's own float64 answer for one feature: the output, and the running mean/var after the pass.

    The layer's real input is captured on a copy of the model run in ``train`` or eval mode, and
    ``torch.nn.functional.batch_norm`` (feature axis moved to 1) is applied to it in float64 with
    float64 copies of the layer's parameters and stored running statistics, which torch updates in
    place when ``train``.
    """
    module = dict(model.named_modules())[layer]
    inp = torch.from_numpy(_capture_bn_inputs(model, x, train=train)[layer])
    axis = module.axis % inp.dim() if isinstance(module, bn.BatchNorm) else 1
    running_mean, running_var = module.running_mean.double().clone(), module.running_var.double().clone()
    y = torch.nn.functional.batch_norm(
        inp.movedim(axis, 1), running_mean, running_var, module.weight.detach().double(),
        module.bias.detach().double(), training=train, momentum=0.1, eps=module.eps,
    ).movedim(1, axis)  # fmt: skip
    return y.select(axis, unit).flatten().numpy(), float(running_mean[unit]), float(running_var[unit])


@pytest.mark.parametrize(
    ("factory", "layer", "unit"),
    [
        pytest.param(_dense, "bn2", 4, id="dense"),
        pytest.param(_conv, "bn2", 6, id="cnn"),
        pytest.param(_torch_layers, "4", 3, id="torch-bn"),
        pytest.param(_sequence, "norm", 5, id="sequence"),
    ],
)
def test_explain_unit_in_eval_mode_walks_the_running_statistics(factory: Factory, layer: str, unit: int) -> None:
    """``--eval``: the step view normalizes with running_mean/running_var, as torch's layer does in eval mode."""
    model, x = factory()
    _randomize_affine(model)
    module = dict(model.named_modules())[layer]
    before = _state_snapshot(model)
    result = explain_unit(model, x, layer, unit, mode="eval")
    _assert_unchanged(model, before)
    eval_output, _, _ = _torch_unit_reference(model, x, layer, unit, train=False)
    train_output, _, _ = _torch_unit_reference(model, x, layer, unit, train=True)

    assert result["mode"] == "eval"
    assert result["statistics"] == "running"
    assert "running_mean and running_var" in result["statistics_text"]
    assert "nothing was updated" in result["statistics_text"]
    assert result["mean"] == float(module.running_mean[unit])
    assert result["variance"] == float(module.running_var[unit])
    assert result["running_mean"] == float(module.running_mean[unit])
    assert result["inv_std"] == pytest.approx(1 / math.sqrt(float(module.running_var[unit]) + module.eps), rel=1e-12)
    assert "running_mean_after" not in result
    # The step-by-step output is torch's eval-mode output of this feature (float64), not the training one.
    np.testing.assert_allclose(result["output"], eval_output, rtol=1e-9, atol=1e-10)
    assert not np.allclose(result["output"], train_output, atol=1e-3)
    np.testing.assert_allclose(result["layer_output"], eval_output, rtol=1e-4, atol=1e-5)
    # The batch statistics are still reported, for contrast.
    values = np.asarray(result["values"])
    assert result["batch_mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-14)
    assert result["batch_variance"] == pytest.approx(values.var(), rel=1e-12)

    text = format_unit(result)
    assert "statistics used: eval mode: the layer normalized with its stored running_mean and running_var" in text
    assert f"mu = running_mean[{unit}] = {result['mean']:+.6f}" in text
    assert f"var = running_var[{unit}] = {result['variance']:.6f}" in text
    assert "nothing was updated" in text
    assert "mu = sum(x) / m" not in text


@pytest.mark.parametrize(
    ("factory", "layer", "unit"),
    [pytest.param(_conv, "bn1", 2, id="cnn"), pytest.param(_torch_layers, "7", 1, id="torch-bn1d")],
)
def test_explain_unit_in_train_mode_names_the_batch_statistics_and_the_running_update(
    factory: Factory, layer: str, unit: int
) -> None:
    model, x = factory()
    _randomize_affine(model)
    result = explain_unit(model, x, layer, unit)
    train_output, running_mean_after, running_var_after = _torch_unit_reference(model, x, layer, unit, train=True)
    assert result["mode"] == "train"
    assert result["statistics"] == "batch"
    assert result["mean"] == result["batch_mean"]
    assert result["variance"] == result["batch_variance"]
    np.testing.assert_allclose(result["output"], train_output, rtol=1e-9, atol=1e-10)
    # torch's own momentum update of the running statistics (unbiased variance), float64.
    assert result["momentum"] == 0.1
    assert result["running_mean_after"] == pytest.approx(running_mean_after, rel=1e-12, abs=1e-14)
    assert result["running_var_after"] == pytest.approx(running_var_after, rel=1e-12)
    text = format_unit(result)
    assert f"statistics used: train mode: the layer normalized with this batch's mean and biased variance of the " \
        f"{result['values_per_statistic']} values" in text  # fmt: skip
    assert "running statistics updated with momentum 0.1" in text


def test_explain_unit_in_eval_mode_without_running_statistics_uses_the_batch() -> None:
    layer = nn.BatchNorm1d(3, track_running_stats=False)
    x = torch.randn(7, 3)
    result = explain_unit(nn.Sequential(layer), x, "0", 1, mode="eval")
    assert result["statistics"] == "batch"
    assert "keeps no running statistics" in result["statistics_text"]
    np.testing.assert_allclose(result["layer_output"], result["output"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expected mode 'train' or 'eval', got 'test'"):
        explain_unit(nn.Sequential(layer), x, "0", 1, mode="test")


def test_explain_unit_contrasts_with_input_standardization() -> None:
    model = build_model("mlp:4-3-2", seed=0, init="normal:0.3")
    raw = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 3.0, 2.0, 1.0], [0.0, 5.0, 2.0, 2.0]])
    pixel_mean = torch.tensor([0.0, 2.0, 2.0, 2.0])
    pixel_std = torch.tensor([1.0, 4.0, 1.0, 0.5])
    result = explain_unit(model, raw, "bn1", 0, (pixel_mean, pixel_std), raw)
    contrast = result["input_standardization"]
    assert contrast["pixel"] == 1  # the most variable pixel
    assert contrast["training_mean"] == 2.0
    assert contrast["training_std"] == 4.0
    assert contrast["batch_values"] == [1.0, 3.0, 5.0]
    assert contrast["standardized"] == [-0.25, 0.25, 0.75]


def test_explain_unit_errors() -> None:
    model, x = _dense()
    with pytest.raises(ValueError, match="no layer named 'bn9'; BN layers are: bn1, bn2"):
        explain_unit(model, x, "bn9", 0)
    with pytest.raises(ValueError, match="layer 'fc1' is a Linear, not a batch-norm layer"):
        explain_unit(model, x, "fc1", 0)
    with pytest.raises(ValueError, match=r"unit 12 is out of range: layer 'bn1' has 12 features \(0..11\)"):
        explain_unit(model, x, "bn1", 12)
    with pytest.raises(ValueError, match="unit -1 is out of range"):
        explain_unit(model, x, "bn1", -1)


# --------------------------------------------------------------------------- the explain command

SYNTHETIC_MLP = ["--data", "synthetic", "--model", "mlp:64-32-16-10", "--input-norm", "standardize"]


def test_cli_explain_json_has_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["explain", *SYNTHETIC_MLP, "--batch-size", "50", "--json"], capsys)
    assert code == 0, err
    records = json.loads(out)
    assert [record["name"] for record in records] == ["bn1", "bn2"]
    for record, width in zip(records, (32, 16)):
        assert record["input_shape"] == [50, width]
        assert record["feature_axis"] == 1
        assert record["reduced_axes"] == [0]
        assert record["values_per_statistic"] == 50
        assert record["param_shape"] == [width]
        assert record["num_statistics"] == 2 * width
        assert len(record["batch_mean"]) == len(record["batch_var"]) == width
        assert all(v >= 0 for v in record["batch_var"])


def test_cli_explain_cnn_reduces_over_batch_and_space(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--data", "synthetic", "--model", "cnn:1-4-8-10", "--batch-size", "20", "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    first, second = json.loads(out)
    assert first["input_shape"] == [20, 4, 8, 8]
    assert first["reduced_axes"] == [0, 2, 3]
    assert first["values_per_statistic"] == 20 * 8 * 8
    assert second["values_per_statistic"] == 20 * 4 * 4
    assert second["param_shape"] == [8]


def test_cli_explain_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["explain", *SYNTHETIC_MLP, "--batch-size", "40"], capsys)
    assert code == 0, err
    assert "2 BN layer(s) on a batch of shape (40, 1, 8, 8)" in out
    assert "values/stat" in out
    assert "40 = N" in out
    assert "bn2" in out


def test_cli_explain_unit_prints_mean_and_variance(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", *SYNTHETIC_MLP, "--batch-size", "30", "--layer", "bn2", "--unit", "3"]
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    values = np.asarray(result["values"])
    assert values.size == 30
    assert result["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-15)
    assert result["variance"] == pytest.approx(values.var(), rel=1e-12)
    assert "input_standardization" in result

    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "layer bn2, feature 3" in text
    assert f"mean     mu = sum(x) / m = {result['mean']:+.6f}" in text
    assert f"variance var = sum((x - mu)^2) / m = {result['variance']:.6f}" in text
    assert "m = 30 values" in text
    assert "input standardization" in text


def test_cli_explain_eval_unit_names_the_running_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", *SYNTHETIC_MLP, "--batch-size", "30", "--layer", "bn2", "--unit", "3", "--eval"]
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["mode"] == "eval"
    assert result["statistics"] == "running"
    assert result["mean"] == result["running_mean"]
    assert result["variance"] == result["running_var"]
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "statistics used: eval mode" in text
    assert "mu = running_mean[3]" in text


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explain-checkpoint")
    code = main(
        [
            "train", *SYNTHETIC_MLP, "--steps", "60", "--eval-every", "30", "--batch-size", "30",
            "--lr", "0.1", "--out", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    return out / "checkpoint.pt"


def test_cli_explain_checkpoint_of_a_trained_run(trained_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole training split as the batch: the statistics are then checkable without knowing the sampled batch."""
    code, out, err = run_cli(
        ["explain", "--checkpoint", str(trained_checkpoint), "--batch-size", "600", "--json"], capsys
    )
    assert code == 0, err
    records = json.loads(out)
    payload = torch.load(trained_checkpoint, weights_only=True)
    state = {name: tensor.double().numpy() for name, tensor in payload["model"].items()}
    assert float(state["bn1.num_batches_tracked"]) == 60
    np.testing.assert_allclose(records[0]["running_mean"], state["bn1.running_mean"], rtol=1e-6)
    np.testing.assert_allclose(records[1]["running_var"], state["bn2.running_var"], rtol=1e-6)
    np.testing.assert_allclose(records[1]["weight"], state["bn2.weight"], rtol=1e-6)

    data = load_dataset("synthetic")
    normalizer = payload["normalizer"]
    x = ((data.train_images.double() - normalizer["shift"].double()) / normalizer["scale"].double()).numpy()
    z1 = x.reshape(600, -1) @ state["fc1.weight"].T
    np.testing.assert_allclose(records[0]["batch_mean"], z1.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(records[0]["batch_var"], z1.var(axis=0), rtol=1e-4, atol=1e-6)
    h1 = 1 / (1 + np.exp(-batch_norm_forward(z1, state["bn1.weight"], state["bn1.bias"])[0]))
    z2 = h1 @ state["fc2.weight"].T
    np.testing.assert_allclose(records[1]["batch_mean"], z2.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(records[1]["batch_var"], z2.var(axis=0), rtol=1e-4, atol=1e-6)


def test_cli_explain_checkpoint_eval_mode(trained_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["explain", "--checkpoint", str(trained_checkpoint), "--eval", "--json"], capsys)
    assert code == 0, err
    assert {record["normalizes_with"] for record in json.loads(out)} == {"running"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            ["--layer", "bn9", "--unit", "0"], "no layer named 'bn9'; BN layers are: bn1, bn2", id="unknown-layer"
        ),
        pytest.param(["--layer", "fc1", "--unit", "0"], "not a batch-norm layer", id="not-bn"),
        pytest.param(["--layer", "bn1", "--unit", "32"], "unit 32 is out of range", id="unit-out-of-range"),
        pytest.param(["--layer", "bn1"], "--layer and --unit go together", id="layer-without-unit"),
        pytest.param(["--batch-size", "601"], "exceeds the 600 training images", id="batch-too-large"),
        pytest.param(["--unit", "x"], "invalid int value", id="non-integer-unit"),
    ],
)
def test_cli_explain_bad_options_exit_2_with_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["explain", *SYNTHETIC_MLP, *extra], capsys)
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_cli_explain_checkpoint_of_another_model(trained_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["explain", "--checkpoint", str(trained_checkpoint), "--model", "mlp:64-8-10"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "is of another model" in err
