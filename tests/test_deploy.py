"""Deployment: fold and recalibrate, against independent references.

fold: the folded model's eval output against the *unfolded* model run in
float64. recalibrate: the running statistics against float64 statistics of
the inputs each BN layer saw, collected by a hand-written train-mode forward
pass (``torch.nn.functional.batch_norm`` with batch statistics) and pooled
with ``torch.var_mean`` over the concatenation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import batchnorm as bn
from batchnorm.deploy import FoldReport, fold, recalibrate

# --------------------------------------------------------------------------- helpers


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial gamma, beta, running mean and variance in every BN layer (eval mode afterwards)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, bn.FrozenBatchNorm)):
                features = module.num_features
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(features, generator=generator))
                    module.running_var.copy_(torch.rand(features, generator=generator) * 2 + 0.1)
                if module.weight is not None:
                    module.weight.copy_(torch.randn(features, generator=generator))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(features, generator=generator))
    return model.eval()


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, bn.FrozenBatchNorm)) for m in model.modules())


def _assert_folded_equal(original: nn.Module, folded: nn.Module, x: Tensor) -> None:
    """Folded output in x's dtype vs the unfolded model in float64: max |diff| <= tol * max |reference|."""
    reference_model = copy.deepcopy(original).double().eval()
    with torch.no_grad():
        reference = reference_model(x.double())
        got = folded(x).double()
    tolerance = 1e-12 if x.dtype == torch.float64 else 1e-5
    scale = float(reference.abs().max())
    assert float((got - reference).abs().max()) <= tolerance * scale


def _mlp(norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 9, bias=False),
        norm(9),
        nn.Tanh(),
        nn.Linear(9, 7),
        norm(7),
        nn.ReLU(),
        nn.Linear(7, 3),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        bn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.Conv2d(8, 12, 1, groups=4),  # grouped
        bn.BatchNorm2d(12),
        nn.ConvTranspose2d(12, 6, 3, stride=2, groups=3, bias=False),
        nn.BatchNorm2d(6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def _conv1d_3d() -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 3, groups=2)
            self.b1 = bn.BatchNorm1d(4)
            self.c3 = nn.Conv3d(1, 3, 2, bias=False)
            self.b3 = bn.BatchNorm3d(3)
            self.t1 = nn.ConvTranspose1d(4, 4, 2, groups=4)
            self.bt = nn.BatchNorm1d(4)

        def forward(self, x: Tensor) -> Tensor:
            one = self.bt(self.t1(self.b1(self.c1(x.flatten(2)))))
            three = self.b3(self.c3(x.unsqueeze(1)))
            return one.sum(-1).sum(-1, keepdim=True) + three.mean((1, 2, 3, 4)).unsqueeze(1)

    return Net()


MODELS = {
    "mlp-torch-bn": (lambda: _mlp(nn.BatchNorm1d), (10, 3, 4), 2),
    "mlp-our-bn": (lambda: _mlp(bn.BatchNorm1d), (10, 3, 4), 2),
    "mlp-our-bn-axis-minus-1": (lambda: _mlp(lambda c: bn.BatchNorm(c, axis=-1)), (10, 3, 4), 2),
    "cnn-grouped-depthwise-transposed": (_cnn, (5, 3, 6, 6), 4),
    "conv1d-conv3d-fx": (_conv1d_3d, (5, 2, 3, 3), 3),
}


# --------------------------------------------------------------------------- fold


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fold_equals_the_unfolded_model(name: str, dtype: torch.dtype) -> None:
    build, shape, expected = MODELS[name]
    model = _randomize(build()).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold(model, report=True)
    assert len(report.folded) == expected
    assert _bn_count(folded) == _bn_count(model) - expected
    assert report.method == "fx"
    assert type(folded) is type(model)
    _assert_folded_equal(model, folded, torch.randn(shape, dtype=dtype))
    # A copy by default: the original is untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fold_inplace_changes_and_returns_the_model() -> None:
    model = _randomize(_mlp(nn.BatchNorm1d))
    reference = copy.deepcopy(model)
    returned = fold(model, inplace=True)
    assert returned is model
    assert _bn_count(model) == 0
    _assert_folded_equal(reference, model, torch.randn(6, 12))


def test_fold_leaves_bn_after_an_activation_and_says_why() -> None:
    model = _randomize(
        nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.BatchNorm1d(4), nn.Linear(4, 4), bn.BatchNorm1d(4))
    )
    folded, report = fold(model, report=True)
    assert [(item.norm, item.layer) for item in report.folded] == [("4", "3")]
    assert [(item.norm, item.reason) for item in report.skipped] == [
        ("2", "follows 1 (Sigmoid), not a Linear or Conv layer")
    ]
    assert isinstance(folded[2], nn.BatchNorm1d)
    assert "left   2: follows 1 (Sigmoid)" in str(report)
    _assert_folded_equal(model, folded, torch.randn(7, 5))


def test_fold_skips_bn_without_running_statistics() -> None:
    model = _randomize(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False)))
    folded, report = fold(model, report=True)
    assert not report.folded
    assert "track_running_stats=False" in report.skipped[0].reason
    x = torch.randn(8, 5)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_fold_skips_an_axis_that_is_not_the_layers_feature_axis() -> None:
    # Conv2d output (N, 4, 5, 4); BN over axis -1 (the width, also 4 long) is not per output channel.
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), bn.BatchNorm(4, axis=-1)))
    folded, report = fold(model, report=True)
    assert not report.folded
    assert report.skipped[0].reason.startswith("normalizes axis -1, not the channel axis")
    _assert_folded_equal(model, folded, torch.randn(2, 3, 5, 4))


def test_fold_on_a_sequence_linear_with_axis_minus_1() -> None:
    model = _randomize(nn.Sequential(nn.Linear(4, 6), bn.BatchNorm(6, axis=-1)))
    folded, report = fold(model, report=True)
    assert len(report.folded) == 1
    _assert_folded_equal(model, folded, torch.randn(3, 5, 4))


def test_fold_refuses_a_model_in_training_mode() -> None:
    model = _mlp(nn.BatchNorm1d)
    with pytest.raises(ValueError, match=r"fold needs a model in eval mode \(call model.eval\(\) first\)"):
        fold(model.train())
    model.eval()
    model[2].train()
    with pytest.raises(ValueError, match="in training mode: 2"):
        fold(model)


class _Branchy(nn.Module):
    """Layers outside any Sequential; one conv output feeds BN and a residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv_c = nn.Conv2d(4, 4, 1)
        self.norms = nn.ModuleDict({"a": nn.BatchNorm2d(4), "b": bn.BatchNorm2d(4), "c": nn.BatchNorm2d(4)})
        self.after_pool = bn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.norms["a"](self.conv_a(x)))
        b = self.norms["b"](self.conv_b(a))
        c = self.conv_c(b)
        residual = self.norms["c"](c) + c  # conv_c's output has two users
        return self.after_pool(F.max_pool2d(residual, 2))


def test_fold_finds_edges_in_an_fx_trace_outside_sequentials() -> None:
    model = _randomize(_Branchy())
    folded, report = fold(model, report=True)
    assert report.method == "fx"
    assert [(item.norm, item.layer) for item in report.folded] == [("norms.a", "conv_a"), ("norms.b", "conv_b")]
    reasons = {item.norm: item.reason for item in report.skipped}
    assert reasons["norms.c"] == "the output of conv_c is also used by add"
    assert reasons["after_pool"].startswith("follows the function max_pool2d")
    assert isinstance(folded, _Branchy)
    _assert_folded_equal(model, folded, torch.randn(2, 3, 6, 6))


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
        self.head_norm = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return self.head_norm(y) if float(y.sum()) > 0 else y


def test_fold_falls_back_to_sequential_children_when_tracing_fails() -> None:
    model = _randomize(_Untraceable())
    folded, report = fold(model, report=True)
    assert report.method == "sequential"
    assert report.trace_error
    assert [(item.norm, item.layer) for item in report.folded] == [("body.1", "body.0")]
    reasons = {item.norm: item.reason for item in report.skipped}
    assert reasons == {
        "body.3": "follows body.2 (ReLU), not a Linear or Conv layer",
        "head_norm": "not in an nn.Sequential, and the model could not be traced",
    }
    for seed in range(3):
        _assert_folded_equal(model, folded, torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(seed)))


def test_fold_skips_a_shared_bn_and_a_shared_layer() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.norm(self.fc2(self.norm(self.fc1(x))))

    model = _randomize(Shared())
    folded, report = fold(model, report=True)
    assert not report.folded
    assert report.skipped[0].reason == "called 2 times in the forward pass (a shared layer)"
    _assert_folded_equal(model, folded, torch.randn(3, 4))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_fold_replaces_a_fused_bn_activation_and_a_frozen_one_by_their_activation(activation: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        bn.BatchNormAct(4, activation=activation, negative_slope=0.2),  # type: ignore[arg-type]
        nn.Conv2d(4, 4, 1),
        bn.BatchNormAct(4, activation=activation, negative_slope=0.2),  # type: ignore[arg-type]
    )
    model = _randomize(model)
    model[3] = bn.FrozenBatchNorm.from_batch_norm(model[3])
    folded, report = fold(model, report=True)
    expected = {"relu": "ReLU", "leaky_relu": "LeakyReLU", "sigmoid": "Sigmoid", "tanh": "Tanh"}[activation]
    assert [item.replacement for item in report.folded] == [expected, expected]
    _assert_folded_equal(model, folded, torch.randn(3, 2, 5, 5))


def test_fold_probes_bn_variants_and_skips_one_whose_eval_map_is_not_bn() -> None:
    class Doubled(bn.BatchNorm1d):
        def forward(self, input: Tensor) -> Tensor:
            return 2 * super().forward(input)

    model = nn.Sequential(
        nn.Linear(5, 4), bn.BatchRenorm(4), nn.Linear(4, 4), bn.GhostBatchNorm(4, virtual_batch_size=2)
    )
    model.append(nn.Linear(4, 4)).append(Doubled(4))
    model = _randomize(model)
    folded, report = fold(model, report=True)
    assert [item.norm for item in report.folded] == ["1", "3"]
    assert report.skipped[0].norm == "5"
    assert "eval output is not the affine map of its running statistics (probed)" in report.skipped[0].reason
    _assert_folded_equal(model, folded, torch.randn(6, 5))


def test_fold_report_type_and_plain_return() -> None:
    model = _randomize(_mlp(nn.BatchNorm1d))
    folded = fold(model)
    assert isinstance(folded, nn.Sequential)
    _, report = fold(model, report=True)
    assert isinstance(report, FoldReport)
    assert str(report).startswith("folded 2 BN layer(s), left 0 (edges found by fx)")


# --------------------------------------------------------------------------- recalibrate


def _reference_statistics(model: nn.Sequential, inputs: list[Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Float64 mean and unbiased variance of every value each BN layer sees in a train-mode forward pass.

    Written independently of the package: each layer of the Sequential is
    applied by hand; a BN layer's input is recorded and normalized with its
    own batch statistics by ``torch.nn.functional.batch_norm``.
    """
    seen: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for x in inputs:
            h = x
            for name, layer in model.named_children():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    seen.setdefault(name, []).append(h.double())
                    h = F.batch_norm(h, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
                else:
                    h = layer(h)
    result = {}
    for name, parts in seen.items():
        values = torch.cat(parts).movedim(1, -1).reshape(-1, parts[0].shape[1])
        var, mean = torch.var_mean(values, dim=0, correction=1)
        result[name] = (mean, var)
    return result


def _recal_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None), nn.Sigmoid(), nn.Linear(8, 5), bn.BatchNorm1d(5)
    )


def _recal_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        bn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, groups=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        bn.BatchNorm2d(3),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("build", "shape"), [(_recal_mlp, (6,)), (_recal_cnn, (2, 5, 5))], ids=["mlp", "cnn"])
def test_recalibrate_equals_float64_pooled_statistics(
    build: Callable[[], nn.Sequential], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    model = _randomize(build()).to(dtype)
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn((n, *shape), generator=generator, dtype=dtype) * 2 + 1 for n in (7, 12, 3, 9)]
    batches: list[object] = [inputs[0], (inputs[1], torch.zeros(12)), [inputs[2], None], (inputs[3],)]
    # Mixed modes and momenta, all to be restored.
    model.train()
    model[2].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    momenta = {name: m.momentum for name, m in model.named_modules() if hasattr(m, "momentum")}
    tracked = {name: int(m.num_batches_tracked) for name, m in model.named_modules() if hasattr(m, "momentum")}
    parameters = {name: p.clone() for name, p in model.named_parameters()}
    reference = _reference_statistics(model, inputs)

    report = recalibrate(model, batches, progress=False)

    assert report.batches == 4
    assert report.examples == 31
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    values_per_example = 1 if len(shape) == 1 else shape[1] * shape[2]
    for name, (mean, var) in reference.items():
        norm = model.get_submodule(name)
        torch.testing.assert_close(norm.running_mean.double(), mean, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(norm.running_var.double(), var, rtol=tolerance, atol=tolerance)
        assert norm.running_mean.dtype == dtype
    # The CNN's last BN sees 3x3 maps; the first sees 5x5 (values per statistic = examples * positions).
    assert report.layers[next(iter(reference))] == 31 * values_per_example
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: m.momentum for name, m in model.named_modules() if hasattr(m, "momentum")} == momenta
    assert {name: int(m.num_batches_tracked) for name, m in model.named_modules() if hasattr(m, "momentum")} == tracked
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, parameters[name]), name
        assert parameter.grad is None


def test_recalibrate_max_batches_uses_the_first_batches_only() -> None:
    model = _randomize(_recal_mlp())
    inputs = [torch.randn(n, 6) for n in (5, 8, 4)]
    reference = _reference_statistics(model, inputs[:2])
    report = recalibrate(model, iter(inputs), max_batches=2, progress=False)
    assert report.batches == 2
    for name, (mean, var) in reference.items():
        torch.testing.assert_close(model.get_submodule(name).running_mean.double(), mean, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(model.get_submodule(name).running_var.double(), var, rtol=2e-6, atol=2e-6)


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_recalibrate_refuses_an_empty_iterable_and_leaves_the_model_alone() -> None:
    model = _randomize(_recal_mlp())
    before = _buffers(model)
    with pytest.raises(ValueError, match="recalibrate needs at least one batch, but the iterable of batches is empty"):
        recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        recalibrate(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 6))))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training


def test_recalibrate_restores_the_statistics_when_a_batch_is_bad() -> None:
    model = _randomize(_recal_mlp())
    before = _buffers(model)
    with pytest.raises(ValueError, match="an input tensor or an \\(input, target\\) pair, got str"):
        recalibrate(model, [torch.randn(4, 6), "not a tensor"], progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(m.momentum in (None, 0.1) for m in model.modules() if hasattr(m, "momentum"))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_recalibrate_rejects_bad_max_batches(bad: object) -> None:
    with pytest.raises(ValueError, match="max_batches must be a positive integer or None"):
        recalibrate(_recal_mlp(), [torch.randn(4, 6)], max_batches=bad, progress=False)  # type: ignore[arg-type]


def test_recalibrate_needs_bn_layers_with_running_statistics() -> None:
    with pytest.raises(ValueError, match="found no BN layer with running statistics"):
        recalibrate(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)), [torch.randn(2, 3)])


def test_recalibrate_reports_layers_it_leaves_alone() -> None:
    frozen = bn.FrozenBatchNorm(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), frozen, nn.BatchNorm1d(4, track_running_stats=False))
    report = recalibrate(model.eval(), [torch.randn(5, 3)], progress=False)
    assert set(report.layers) == {"1"}
    assert report.skipped == {
        "2": "FrozenBatchNorm: its statistics are frozen on purpose",
        "3": "no running statistics (track_running_stats=False)",
    }
    assert torch.equal(frozen.running_mean, torch.zeros(4))


def test_recalibrate_progress_bar_on_stderr_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    model = _recal_mlp().eval()
    recalibrate(model, [torch.randn(4, 6)], progress=False)
    assert capsys.readouterr().err == ""
    recalibrate(model, [torch.randn(4, 6)], progress=True)
    assert "recalibrate" in capsys.readouterr().err


def test_the_top_level_exports() -> None:
    assert bn.fold is fold
    assert bn.recalibrate is recalibrate
    from batchnorm import deploy

    assert deploy.freeze is bn.freeze
