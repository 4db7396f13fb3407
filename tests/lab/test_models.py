"""Networks from spec strings: parsing, layer order, BN sizing, and weight init.

The forward pass of a built network is checked against the same network
written out by hand in float64 NumPy (``batchnorm.reference`` for BN), and
init standard deviations against their textbook formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm.lab.models import NORMS, ModelSpec, NormOptions, build_model, group_count, parse_init, parse_spec
from batchnorm.reference import batch_norm_forward

# --------------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("text", "kind", "widths"),
    [
        pytest.param("mlp:784-100-100-100-10", "mlp", (784, 100, 100, 100, 10), id="paper-mlp"),
        pytest.param("mlp:64-10", "mlp", (64, 10), id="mlp-no-hidden"),
        pytest.param("cnn:1-16-32-10", "cnn", (1, 16, 32, 10), id="cnn"),
        pytest.param(" MLP:64-32-10", "mlp", (64, 32, 10), id="case-and-space"),
    ],
)
def test_parse_spec_accepts_mlp_and_cnn(text: str, kind: str, widths: tuple[int, ...]) -> None:
    spec = parse_spec(text)
    assert spec == ModelSpec(kind, widths)
    assert str(spec) == f"{kind}:" + "-".join(map(str, widths))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("resnet:1-2-3", "unknown model spec", id="unknown-kind"),
        pytest.param("784-100-10", "unknown model spec", id="no-kind"),
        pytest.param("", "unknown model spec", id="empty"),
        pytest.param("mlp:784-0-10", "widths must be positive, got 0", id="zero-width"),
        pytest.param("mlp:784--5-10", "is not an integer", id="empty-width"),
        pytest.param("mlp:784-100--10", "is not an integer", id="double-dash"),
        pytest.param("mlp:784-1.5-10", "width '1.5' is not an integer", id="float-width"),
        pytest.param("mlp:784-abc-10", "width 'abc' is not an integer", id="word-width"),
        pytest.param("mlp:784", "at least 2 widths", id="mlp-too-short"),
        pytest.param("cnn:1-10", "at least 3 widths", id="cnn-too-short"),
    ],
)
def test_parse_spec_rejects_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(text)


def test_build_model_rejects_bad_spec_and_options() -> None:
    with pytest.raises(ValueError, match="unknown model spec"):
        build_model("transformer:1-2")
    with pytest.raises(ValueError, match="widths must be positive"):
        build_model("mlp:64-0-10")
    for option, value in (("activation", "gelu"), ("norm", "instance"), ("placement", "middle")):
        with pytest.raises(ValueError, match=f"unknown {option} '{value}'"):
            build_model("mlp:64-32-10", **{option: value})


def test_cnn_with_too_many_pooling_blocks_for_the_image_is_rejected() -> None:
    # 28 -> 14 -> 7 -> 3 -> 1 -> 0: the fifth block would see a 0x0 map.
    build_model("cnn:1-4-4-4-4-10", image_size=28)
    with pytest.raises(ValueError, match="too many for 28x28 images"):
        build_model("cnn:1-4-4-4-4-4-10", image_size=28)


# --------------------------------------------------------------------------- layer structure


def _layer_kinds(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_children()]


def test_mlp_before_placement_is_linear_without_bias_then_bn_then_activation() -> None:
    model = build_model("mlp:64-32-16-10", activation="tanh", norm="batch", placement="before")
    assert _layer_kinds(model) == [
        ("flatten", nn.Flatten),
        ("fc1", nn.Linear),
        ("bn1", bn.BatchNorm1d),
        ("act1", nn.Tanh),
        ("fc2", nn.Linear),
        ("bn2", bn.BatchNorm1d),
        ("act2", nn.Tanh),
        ("out", nn.Linear),
    ]
    # BN's beta replaces the bias, so the Linear before BN has none.
    assert model.fc1.bias is None
    assert model.fc2.bias is None
    assert model.out.bias is not None
    # Each BN layer is sized to its own hidden layer.
    assert model.bn1.num_features == 32
    assert model.bn2.num_features == 16
    assert model.bn1.weight.shape == (32,)
    assert model.bn2.running_mean.shape == (16,)
    assert (model.fc1.in_features, model.fc1.out_features) == (64, 32)
    assert (model.fc2.in_features, model.fc2.out_features) == (32, 16)
    assert (model.out.in_features, model.out.out_features) == (16, 10)


def test_mlp_after_placement_is_linear_with_bias_then_activation_then_bn() -> None:
    model = build_model("mlp:64-32-16-10", activation="relu", norm="batch", placement="after")
    assert _layer_kinds(model) == [
        ("flatten", nn.Flatten),
        ("fc1", nn.Linear),
        ("act1", nn.ReLU),
        ("bn1", bn.BatchNorm1d),
        ("fc2", nn.Linear),
        ("act2", nn.ReLU),
        ("bn2", bn.BatchNorm1d),
        ("out", nn.Linear),
    ]
    assert model.fc1.bias is not None
    assert model.fc2.bias is not None
    assert model.bn1.num_features == 32
    assert model.bn2.num_features == 16


@pytest.mark.parametrize("placement", ["before", "after"])
def test_norm_none_has_no_bn_layer_and_linear_layers_keep_their_bias(placement: str) -> None:
    model = build_model("mlp:64-32-16-10", norm="none", placement=placement)
    assert not any(bn.is_batch_norm(module) for module in model.modules())
    assert _layer_kinds(model) == [
        ("flatten", nn.Flatten),
        ("fc1", nn.Linear),
        ("act1", nn.Sigmoid),
        ("fc2", nn.Linear),
        ("act2", nn.Sigmoid),
        ("out", nn.Linear),
    ]
    assert model.fc1.bias is not None


def test_cnn_blocks_have_batchnorm2d_sized_to_their_channels() -> None:
    model = build_model("cnn:1-16-32-10", activation="relu")
    assert _layer_kinds(model) == [
        ("conv1", nn.Conv2d),
        ("bn1", bn.BatchNorm2d),
        ("act1", nn.ReLU),
        ("pool1", nn.MaxPool2d),
        ("conv2", nn.Conv2d),
        ("bn2", bn.BatchNorm2d),
        ("act2", nn.ReLU),
        ("pool2", nn.MaxPool2d),
        ("gap", nn.AdaptiveAvgPool2d),
        ("flatten", nn.Flatten),
        ("out", nn.Linear),
    ]
    assert (model.conv1.in_channels, model.conv1.out_channels) == (1, 16)
    assert (model.conv2.in_channels, model.conv2.out_channels) == (16, 32)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.padding == (1, 1)
    assert model.conv1.bias is None
    assert model.bn1.num_features == 16
    assert model.bn2.num_features == 32
    assert (model.out.in_features, model.out.out_features) == (32, 10)
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_cnn_after_placement_and_norm_none() -> None:
    after = build_model("cnn:1-8-10", placement="after")
    assert [name for name, _ in after.named_children()][:4] == ["conv1", "act1", "bn1", "pool1"]
    assert after.conv1.bias is not None
    plain = build_model("cnn:1-8-10", norm="none")
    assert not any(bn.is_batch_norm(module) for module in plain.modules())


def test_torch_norm_implementation_uses_torch_layers() -> None:
    mlp = build_model("mlp:64-32-10", norm_implementation="torch")
    assert type(mlp.bn1) is nn.BatchNorm1d
    cnn = build_model("cnn:1-8-10", norm_implementation="torch")
    assert type(cnn.bn1) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="unknown norm implementation"):
        build_model("mlp:64-32-10", norm_implementation="jax")


def test_mlp_flattens_images_and_outputs_logits() -> None:
    model = build_model("mlp:64-32-16-10")
    assert model(torch.randn(7, 1, 8, 8)).shape == (7, 10)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("placement", ["before", "after"])
def test_mlp_forward_matches_float64_numpy_network(placement: str) -> None:
    """The whole network in training mode equals the paper's layers written out in NumPy."""
    model = build_model("mlp:12-9-7-4", activation="sigmoid", placement=placement, init="normal:0.5", seed=3)
    with torch.no_grad():
        for module in model.modules():
            if bn.is_batch_norm(module):  # non-trivial gamma, beta
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    model.double().train()
    x = torch.randn(16, 12, dtype=torch.float64)
    actual = model(x).detach().numpy()

    h = x.numpy()
    for index in (1, 2):
        linear = getattr(model, f"fc{index}")
        norm = getattr(model, f"bn{index}")
        gamma, beta = norm.weight.detach().numpy(), norm.bias.detach().numpy()
        z = h @ linear.weight.detach().numpy().T
        if placement == "before":
            # z = g(BN(Wu)): no bias before BN.
            h = _sigmoid(batch_norm_forward(z, gamma, beta, eps=norm.eps)[0])
        else:
            z = z + linear.bias.detach().numpy()
            h = batch_norm_forward(_sigmoid(z), gamma, beta, eps=norm.eps)[0]
    expected = h @ model.out.weight.detach().numpy().T + model.out.bias.detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- init


def test_parse_init_names() -> None:
    assert parse_init("normal:0.01") == ("normal", 0.01)
    assert parse_init("Normal:2") == ("normal", 2.0)
    assert parse_init("kaiming") == ("kaiming", 0.0)
    assert parse_init("xavier") == ("xavier", 0.0)
    assert parse_init("default") == ("default", 0.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("normal", "expected 'normal:STD' with a number", id="normal-no-std"),
        pytest.param("normal:abc", "expected 'normal:STD' with a number", id="normal-word"),
        pytest.param("normal:0", "must be positive", id="normal-zero"),
        pytest.param("normal:-0.1", "must be positive", id="normal-negative"),
        pytest.param("normal:inf", "must be positive", id="normal-inf"),
        pytest.param("normal:nan", "must be positive", id="normal-nan"),
        pytest.param("kaiming:2", "unknown init", id="kaiming-argument"),
        pytest.param("uniform", "unknown init", id="unknown"),
        pytest.param("", "unknown init", id="empty"),
    ],
)
def test_parse_init_rejects_bad_strings(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_init(text)
    with pytest.raises(ValueError, match=message):
        build_model("mlp:64-32-10", init=text)


def _sample_std(tensor: torch.Tensor) -> float:
    return float(tensor.detach().double().std())


@pytest.mark.parametrize("std", [0.01, 0.5])
def test_normal_init_has_the_requested_std_and_zero_mean(std: float) -> None:
    model = build_model("mlp:784-500-10", init=f"normal:{std}", seed=0)
    weight = model.fc1.weight.detach().double()  # 392,000 draws
    # The sample std of n Gaussian draws has relative standard error 1/sqrt(2n) ~ 0.1%.
    assert _sample_std(weight) == pytest.approx(std, rel=0.01)
    assert abs(float(weight.mean())) < 5 * std / math.sqrt(weight.numel())
    assert _sample_std(model.out.weight) == pytest.approx(std, rel=0.1)  # 5,000 draws
    assert torch.count_nonzero(model.out.bias) == 0


def test_same_seed_gives_the_same_weights_with_and_without_bn() -> None:
    with_bn = build_model("mlp:784-100-100-100-10", norm="batch", init="normal:0.01", seed=7)
    without_bn = build_model("mlp:784-100-100-100-10", norm="none", init="normal:0.01", seed=7)
    for name in ("fc1", "fc2", "fc3", "out"):
        assert torch.equal(getattr(with_bn, name).weight, getattr(without_bn, name).weight), name
    # The no-BN network's extra biases start at zero, so both compute the same pre-activations.
    for name in ("fc1", "fc2", "fc3"):
        assert torch.count_nonzero(getattr(without_bn, name).bias) == 0
    other_seed = build_model("mlp:784-100-100-100-10", norm="none", init="normal:0.01", seed=8)
    assert not torch.equal(other_seed.fc1.weight, without_bn.fc1.weight)


def test_same_seed_gives_the_same_cnn_weights_with_and_without_bn() -> None:
    with_bn = build_model("cnn:1-8-16-10", norm="batch", init="kaiming", activation="relu", seed=1)
    without_bn = build_model("cnn:1-8-16-10", norm="none", init="kaiming", activation="relu", seed=1)
    for name in ("conv1", "conv2", "out"):
        assert torch.equal(getattr(with_bn, name).weight, getattr(without_bn, name).weight), name


@pytest.mark.parametrize(
    ("activation", "gain"),
    [
        pytest.param("relu", math.sqrt(2.0), id="relu"),
        pytest.param("sigmoid", 1.0, id="sigmoid-linear-gain"),
        pytest.param("tanh", 1.0, id="tanh-linear-gain"),
    ],
)
def test_kaiming_init_std_is_gain_over_sqrt_fan_in(activation: str, gain: float) -> None:
    model = build_model("mlp:784-500-10", activation=activation, init="kaiming", seed=0)
    assert _sample_std(model.fc1.weight) == pytest.approx(gain / math.sqrt(784), rel=0.01)


@pytest.mark.parametrize(
    ("activation", "gain"),
    [
        pytest.param("sigmoid", 1.0, id="sigmoid"),
        pytest.param("tanh", 5.0 / 3.0, id="tanh"),
        pytest.param("relu", math.sqrt(2.0), id="relu"),
    ],
)
def test_xavier_init_std_is_gain_times_sqrt_two_over_fans(activation: str, gain: float) -> None:
    model = build_model("mlp:784-500-10", activation=activation, init="xavier", seed=0)
    expected = gain * math.sqrt(2.0 / (784 + 500))
    assert _sample_std(model.fc1.weight) == pytest.approx(expected, rel=0.01)


def test_conv_init_uses_the_requested_std() -> None:
    model = build_model("cnn:1-64-128-10", init="normal:0.05", seed=0)
    assert _sample_std(model.conv2.weight) == pytest.approx(0.05, rel=0.02)  # 73,728 draws


def test_init_with_seed_is_reproducible_and_default_init_is_torch() -> None:
    first = build_model("mlp:64-32-10", init="xavier", seed=5)
    second = build_model("mlp:64-32-10", init="xavier", seed=5)
    assert torch.equal(first.fc1.weight, second.fc1.weight)
    default = build_model("mlp:784-500-10", init="default")
    # torch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std = 1/sqrt(3 * fan_in).
    assert _sample_std(default.fc1.weight) == pytest.approx(1 / math.sqrt(3 * 784), rel=0.01)


# --------------------------------------------------------------------------- other normalizations


@pytest.mark.parametrize(
    ("channels", "groups", "positions", "expected"),
    [
        pytest.param(100, 32, 1, 5, id="mlp-100: 5 groups of 20"),
        pytest.param(32, 32, 1, 2, id="mlp-32: 2 groups of 16"),
        pytest.param(16, 32, 784, 16, id="conv-16 on 28x28: one channel per group"),
        pytest.param(64, 32, 49, 32, id="conv-64 on 7x7: capped at 32"),
        pytest.param(100, 4, 1, 4, id="--groups 4"),
        pytest.param(7, 32, 1, 1, id="too-small-for-two-groups"),
    ],
)
def test_group_count_rule(channels: int, groups: int, positions: int, expected: int) -> None:
    assert group_count(channels, groups, positions) == expected
    # The rule by brute force: the largest divisor <= groups whose groups hold >= 16 values per example.
    candidates = [g for g in range(1, groups + 1) if channels % g == 0 and channels // g * positions >= 16]
    assert expected == max(candidates, default=1)


def test_group_norm_layers_are_torch_group_norm_named_bn_and_sized_to_each_layer() -> None:
    mlp = build_model("mlp:64-100-32-10", norm="group")
    assert [name for name, _ in mlp.named_children()] == ["flatten", "fc1", "bn1", "act1", "fc2", "bn2", "act2", "out"]
    assert type(mlp.bn1) is nn.GroupNorm
    assert (mlp.bn1.num_groups, mlp.bn1.num_channels) == (5, 100)
    assert type(mlp.bn2) is nn.GroupNorm
    assert (mlp.bn2.num_groups, mlp.bn2.num_channels) == (2, 32)
    assert mlp.bn1.weight.shape == (100,)
    assert mlp.fc1.bias is None  # before placement: the norm's per-feature beta replaces the bias
    assert not any(bn.is_batch_norm(module) for module in mlp.modules())
    assert build_model("mlp:64-100-10", norm="group", norm_options=NormOptions(groups=4)).bn1.num_groups == 4
    cnn = build_model("cnn:1-16-64-10", norm="group", image_size=28)
    assert (cnn.bn1.num_groups, cnn.bn1.num_channels) == (16, 16)
    assert (cnn.bn2.num_groups, cnn.bn2.num_channels) == (32, 64)
    after = build_model("mlp:64-32-10", norm="group", placement="after")
    assert [name for name, _ in after.named_children()][1:4] == ["fc1", "act1", "bn1"]
    assert after.fc1.bias is not None


def test_group_norm_mlp_forward_equals_numpy_group_statistics_per_example() -> None:
    model = build_model("mlp:12-20-4", norm="group", activation="tanh", init="normal:0.5", seed=1)
    assert model.bn1.num_groups == 1  # 20 features: no divisor leaves >= 16 per group except 1
    model = build_model("mlp:12-40-4", norm="group", activation="tanh", init="normal:0.5", seed=1)
    assert model.bn1.num_groups == 2
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
        model.bn1.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = model.double()
    z = x.numpy() @ model.fc1.weight.detach().numpy().T
    groups = z.reshape(5, 2, 20)  # per example, two groups of 20 features
    normalized = (groups - groups.mean(axis=2, keepdims=True)) / np.sqrt(groups.var(axis=2, keepdims=True) + 1e-5)
    h = np.tanh(normalized.reshape(5, 40) * model.bn1.weight.detach().numpy() + model.bn1.bias.detach().numpy())
    expected = h @ model.out.weight.detach().numpy().T + model.out.bias.detach().numpy()
    np.testing.assert_allclose(model(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_layer_norm_is_layernorm_on_features_and_groupnorm_of_one_group_on_maps() -> None:
    mlp = build_model("mlp:64-32-16-10", norm="layer")
    assert type(mlp.bn1) is nn.LayerNorm
    assert mlp.bn1.normalized_shape == (32,)
    assert type(mlp.bn2) is nn.LayerNorm
    assert mlp.bn2.normalized_shape == (16,)
    cnn = build_model("cnn:1-8-16-10", norm="layer", activation="relu", init="kaiming", seed=0).double()
    assert type(cnn.bn1) is nn.GroupNorm
    assert (cnn.bn1.num_groups, cnn.bn1.num_channels) == (1, 8)
    assert (cnn.bn2.num_groups, cnn.bn2.num_channels) == (1, 16)
    # Per example over (C, H, W), one gamma and beta per channel: checked in NumPy on the first block.
    with torch.no_grad():
        cnn.bn1.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
        cnn.bn1.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    captured: dict[str, torch.Tensor] = {}
    cnn.bn1.register_forward_hook(lambda _m, inputs, output: captured.update(x=inputs[0], y=output))
    cnn(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    x = captured["x"].detach().numpy()
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    gamma = cnn.bn1.weight.detach().numpy().reshape(1, 8, 1, 1)
    beta = cnn.bn1.bias.detach().numpy().reshape(1, 8, 1, 1)
    expected = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    np.testing.assert_allclose(captured["y"].detach().numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", [norm for norm in NORMS if norm != "none"])
def test_every_norm_builds_mlp_and_cnn_with_bn_names_and_the_same_linear_weights(norm: str) -> None:
    reference = build_model("mlp:64-32-16-10", norm="batch", init="normal:0.1", seed=5)
    model = build_model("mlp:64-32-16-10", norm=norm, init="normal:0.1", seed=5)
    assert [name for name, _ in model.named_children()] == [name for name, _ in reference.named_children()]
    assert torch.equal(model.fc1.weight, reference.fc1.weight)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    cnn = build_model("cnn:1-8-16-10", norm=norm, image_size=8)
    assert {"bn1", "bn2"} <= {name for name, _ in cnn.named_children()}
    assert cnn(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_variant_norms_are_the_package_layers_with_the_requested_parameters() -> None:
    options = NormOptions(virtual_batch_size=8, rmax=2.0, dmax=0.5, renorm_warmup=7)
    renorm = build_model("mlp:64-32-16-10", norm="renorm", norm_options=options)
    assert type(renorm.bn1) is bn.BatchRenorm
    assert (renorm.bn1.num_features, renorm.bn2.num_features) == (32, 16)
    assert (renorm.bn1.rmax, renorm.bn1.dmax, renorm.bn1.warmup_steps) == (2.0, 0.5, 7)
    assert renorm.fc1.bias is None
    ghost = build_model("cnn:1-8-10", norm="ghost", norm_options=options, image_size=8)
    assert type(ghost.bn1) is bn.GhostBatchNorm
    assert ghost.bn1.virtual_batch_size == 8
    assert build_model("mlp:64-32-10", norm="ghost").bn1.virtual_batch_size == 20  # 60 = 3 virtual batches
    defaults = build_model("mlp:64-32-10", norm="renorm").bn1
    assert (defaults.rmax, defaults.dmax, defaults.warmup_steps) == (3.0, 5.0, 1000)
    frozen = build_model("mlp:64-32-10", norm="frozen")
    assert type(frozen.bn1) is bn.FrozenBatchNorm
    # gamma and beta are trained (they replace the Linear's bias), the statistics stay at mean 0, variance 1.
    assert {name for name, _ in frozen.named_parameters()} == {
        "fc1.weight",
        "bn1.weight",
        "bn1.bias",
        "out.weight",
        "out.bias",
    }
    frozen.train()
    x = torch.randn(6, 1, 8, 8)
    z = frozen.fc1(frozen.flatten(x))
    torch.testing.assert_close(frozen.bn1(z), z / math.sqrt(1 + 1e-5))
