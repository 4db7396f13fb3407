"""``batchnorm.nn.frozen``: FrozenBatchNorm against torch's eval-mode BN, and ``freeze`` against torch's behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import batchnorm as bn
from batchnorm.nn.frozen import FrozenBatchNorm, freeze


def _trained(module: nn.Module, shape: tuple[int, ...], steps: int = 3) -> nn.Module:
    """``module`` after a few training batches and with non-trivial weight and bias."""
    module.train()
    for step in range(steps):
        module(torch.randn(shape, dtype=torch.float64) * (step + 2) + step)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.uniform_(0.5, 1.5)
    return module


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_the_map_is_torch_eval_batch_norm_in_every_mode() -> None:
    theirs = _trained(nn.BatchNorm2d(3).double(), (4, 3, 5, 5)).eval()
    frozen = FrozenBatchNorm(3).double()
    frozen.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), theirs(x))
    before = _state(frozen)
    frozen.train()
    frozen(x * 10 + 3)
    for key, value in frozen.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert list(frozen.parameters()) == []


def test_any_axis_and_rank(torch_batch_norm) -> None:
    frozen = FrozenBatchNorm(5, eps=1e-3, axis=-1).double()
    with torch.no_grad():
        frozen.running_mean.uniform_(-1, 1)
        frozen.running_var.uniform_(0.5, 2)
        frozen.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
        frozen.bias.uniform_(-1, 1)  # type: ignore[union-attr]
    for shape in ((4, 5), (4, 7, 5), (2, 3, 4, 5)):
        x = torch.randn(shape, dtype=torch.float64)
        expected = torch_batch_norm(
            x, frozen.running_mean, frozen.running_var, frozen.weight, frozen.bias, False, 0.1, 1e-3, -1
        )
        torch.testing.assert_close(frozen(x), expected)


def test_gradients_reach_the_input_as_through_torch_eval_batch_norm() -> None:
    theirs = _trained(nn.BatchNorm1d(4).double(), (8, 4)).eval()
    frozen = freeze(_trained(nn.BatchNorm1d(4).double(), (8, 4)))
    frozen.load_state_dict(theirs.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(8, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad(frozen(x), x, dy)
    (expected,) = torch.autograd.grad(theirs(x), x, dy)
    torch.testing.assert_close(ours, expected)


def test_state_dicts_load_from_torch_and_ours_and_back() -> None:
    ours_bn = _trained(bn.BatchNorm(4, axis=-1).double(), (3, 6, 4))
    frozen = FrozenBatchNorm(4, axis=-1).double()
    frozen.load_state_dict(ours_bn.state_dict())
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    ours_bn.eval()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), ours_bn(x))
    back = nn.BatchNorm1d(4).double()
    back.load_state_dict(frozen.state_dict())  # strict: exactly torch's keys
    assert int(back.num_batches_tracked) == 3
    # torchvision's FrozenBatchNorm2d state dicts have no counter.
    state = {k: v for k, v in back.state_dict().items() if k != "num_batches_tracked"}
    FrozenBatchNorm(4).double().load_state_dict(state)


def test_requires_grad_false_does_not_stop_torch_but_freeze_does() -> None:
    def model() -> nn.Sequential:
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
        return _trained(net.double(), (4, 2, 4, 4))  # type: ignore[return-value]

    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    # The problem, as torch behaves: parameters frozen, statistics still move in train mode.
    plain = model()
    plain.requires_grad_(False)
    before = plain[1].running_mean.clone()
    plain.train()
    plain(x * 5 + 2)
    assert not torch.equal(plain[1].running_mean, before)
    # The fix.
    reference = model().eval()
    fixed = freeze(model())
    assert isinstance(fixed[1], FrozenBatchNorm)
    fixed.train()
    state = _state(fixed[1])
    torch.testing.assert_close(fixed(x), reference(x))
    fixed(x * 5 + 2)
    for key, value in fixed[1].state_dict().items():
        assert torch.equal(value, state[key]), key


def test_trainable_affine_learns_gamma_and_beta_with_the_statistics_fixed() -> None:
    net = freeze(
        nn.Sequential(nn.Linear(3, 4), _trained(nn.BatchNorm1d(4).double(), (8, 4)).float()), trainable_affine=True
    )
    frozen = net[1]
    assert {name for name, p in frozen.named_parameters() if p.requires_grad} == {"weight", "bias"}
    statistics = frozen.running_mean.clone(), frozen.running_var.clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    weight = frozen.weight.detach().clone()
    net.train()
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(8, 3)).square().sum().backward()
        optimizer.step()
    assert not torch.equal(frozen.weight, weight)
    assert torch.equal(frozen.running_mean, statistics[0])
    assert torch.equal(frozen.running_var, statistics[1])


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.BatchNorm1d(3), (5, 3, 4)),
        (lambda: nn.BatchNorm2d(3), (5, 3, 4, 4)),
        (lambda: nn.BatchNorm3d(3), (5, 3, 2, 2, 2)),
        (lambda: nn.BatchNorm2d(3, affine=False), (5, 3, 4, 4)),
        (lambda: bn.BatchNorm2d(3), (5, 3, 4, 4)),
        (lambda: bn.BatchNorm(3, axis=-1), (5, 4, 3)),
        (lambda: bn.BatchRenorm(3, axis=2), (5, 4, 3, 2)),
        (lambda: bn.GhostBatchNorm(3, 2), (6, 3)),
        (lambda: bn.BatchNormAct(3, "tanh"), (5, 3, 4)),
    ],
)
def test_freeze_converts_every_kind_of_batch_norm_with_eval_outputs_kept(make, shape: tuple[int, ...]) -> None:
    layer = _trained(make().double(), shape)
    net = nn.Sequential(nn.Identity(), nn.Sequential(layer))
    x = torch.randn(shape, dtype=torch.float64)
    expected = net.eval()(x)
    frozen = freeze(net)
    assert frozen is net
    assert isinstance(net[1][0], FrozenBatchNorm)
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    torch.testing.assert_close(net(x), expected)


def test_freeze_of_a_layer_returns_the_frozen_layer_and_keeps_bias_free_weights() -> None:
    layer = _trained(bn.BatchNorm2d(3, bias=False).double(), (4, 3, 2, 2))
    frozen = freeze(layer)
    assert isinstance(frozen, FrozenBatchNorm)
    assert frozen.bias is None
    assert frozen.running_mean.dtype == torch.float64
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), layer.eval()(x))


def test_freeze_refuses_what_it_cannot_freeze() -> None:
    with pytest.raises(bn.BatchNormArgumentError, match="track_running_stats=False"):
        freeze(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))
    with pytest.raises(bn.BatchNormArgumentError, match="uninitialized LazyBatchNorm1d"):
        freeze(nn.LazyBatchNorm1d())


def test_argument_errors() -> None:
    for bad in (0, -1, 2.0, True):
        with pytest.raises(bn.BatchNormArgumentError, match="num_features"):
            FrozenBatchNorm(bad)  # type: ignore[arg-type]
    with pytest.raises(bn.BatchNormArgumentError, match="eps > 0"):
        FrozenBatchNorm(3, eps=0.0)
    with pytest.raises(bn.BatchNormArgumentError, match="activation"):
        FrozenBatchNorm(3, activation="gelu")
    with pytest.raises(bn.BatchNormArgumentError, match="4 features"):
        FrozenBatchNorm(3)(torch.randn(2, 4))
    assert repr(FrozenBatchNorm(3, axis=-1)) == "FrozenBatchNorm(3, eps=1e-05, axis=-1)"
