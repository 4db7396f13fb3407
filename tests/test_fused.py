"""``batchnorm.nn.fused.BatchNormAct`` against ``nn.BatchNorm2d`` + activation: same numbers, half the saved bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from batchnorm import kernels
from batchnorm.nn.fused import BatchNormAct, batch_norm_act

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def _pair(activation: str, num_features: int, dtype: torch.dtype) -> tuple[nn.Module, BatchNormAct]:
    """torch's BN + activation and ours, with the same (non-trivial) parameters and buffers."""
    theirs = nn.Sequential(nn.BatchNorm2d(num_features), ACTIVATIONS[activation]()).to(dtype)
    with torch.no_grad():
        theirs[0].weight.uniform_(0.5, 1.5)
        theirs[0].bias.uniform_(-0.5, 0.5)
        theirs[0].running_mean.uniform_(-1, 1)
        theirs[0].running_var.uniform_(0.5, 2)
    ours = BatchNormAct(num_features, activation, negative_slope=0.1).to(dtype)
    ours.load_state_dict(theirs[0].state_dict())
    return theirs, ours


def saved_bytes(function: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while ``function`` runs (each storage counted once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(seen.values())


@pytest.mark.parametrize("path", ["auto", "exact", "torch", "native"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_outputs_gradients_and_buffers_equal_torch_in_float64(activation: str, path: str) -> None:
    theirs, ours = _pair(activation, 4, torch.float64)
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64) * 2 + 0.5
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_output = torch.randn_like(x)

    expected = theirs(x_theirs)
    with kernels.use_kernel(path):
        actual = ours(x_ours)
        actual.backward(grad_output)
    expected.backward(grad_output)

    tolerance = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(actual, expected, **tolerance)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **tolerance)
    torch.testing.assert_close(ours.weight.grad, theirs[0].weight.grad, **tolerance)
    torch.testing.assert_close(ours.bias.grad, theirs[0].bias.grad, **tolerance)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs[0], name), **tolerance)

    theirs.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), theirs(x), **tolerance)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_saves_at_most_six_tenths_of_the_bytes(activation: str) -> None:
    theirs, ours = _pair(activation, 32, torch.float32)
    x = torch.randn(16, 32, 28, 28, requires_grad=True)
    reference = saved_bytes(lambda: theirs(x))
    fused = saved_bytes(lambda: ours(x))
    assert reference >= 2 * x.numel() * x.element_size()  # BN's input and the activation's tensor
    assert fused <= 0.6 * reference, (fused, reference)


def test_invertible_activations_save_the_output_and_relu_the_input() -> None:
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    for activation, saves_output in (("relu", False), ("leaky_relu", True), ("sigmoid", True), ("tanh", True)):
        module = BatchNormAct(3, activation)
        packed: list[torch.Tensor] = []

        def pack(tensor: torch.Tensor, packed: list[torch.Tensor] = packed) -> torch.Tensor:
            packed.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = module(x)
        full = [t for t in packed if t.numel() == x.numel()]
        assert len(full) == 1, activation
        assert (full[0].data_ptr() == y.data_ptr()) == saves_output, activation


def test_small_gamma_falls_back_to_saving_the_input() -> None:
    """(z - beta) / gamma amplifies rounding when gamma is tiny: then the input is kept instead."""
    module = BatchNormAct(3, "tanh").double()
    with torch.no_grad():
        module.weight[1] = 1e-4
    reference = nn.Sequential(nn.BatchNorm2d(3), nn.Tanh()).double()
    reference[0].load_state_dict(module.state_dict())
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    module(x_ours).sum().backward()
    reference(x_theirs).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_float32_matches_torch_within_rounding(activation: str) -> None:
    theirs, ours = _pair(activation, 8, torch.float32)
    x = torch.randn(16, 8, 6, 6) * 3 + 1
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_output = torch.randn_like(x)
    theirs(x_theirs).backward(grad_output)
    actual = ours(x_ours)
    actual.backward(grad_output)
    torch.testing.assert_close(actual, theirs.train()(x), rtol=1e-5, atol=1e-5)
    scale = x_theirs.grad.abs().max().item()  # type: ignore[union-attr]
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-4 * scale)


def test_feature_axis_and_layouts() -> None:
    """Any feature axis and memory layout, like BatchNorm: a sequence with axis=-1 and channels-last images."""
    x = torch.randn(4, 7, 5, dtype=torch.float64, requires_grad=True)
    ours = BatchNormAct(5, "sigmoid", axis=-1).double()
    y = ours(x)
    expected = torch.sigmoid(torch.nn.functional.batch_norm(x.movedim(-1, 1), None, None, training=True)).movedim(1, -1)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: BatchNormAct(5, "tanh", axis=-1).double()(t), (x,))

    image = torch.randn(3, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = BatchNormAct(4, "leaky_relu").double()(image.requires_grad_())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t: BatchNormAct(4, "leaky_relu").double()(t), (image,))


def test_half_precision_accumulates_in_float32() -> None:
    x = (torch.randn(8, 4, 5, 5) * 2 + 1).to(torch.bfloat16).requires_grad_()
    ours = BatchNormAct(4, "relu")
    y = ours(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert x.grad is not None
    assert x.grad.dtype == torch.bfloat16
    assert ours.running_mean is not None
    assert ours.running_mean.dtype == torch.float32
    expected = torch.relu(torch.nn.functional.batch_norm(x.detach().double(), None, None, training=True))
    assert (y.double() - expected).abs().max().item() <= 0.01 * expected.abs().max().item()


def test_state_dict_keys_are_torch_batchnorms() -> None:
    assert set(BatchNormAct(3).state_dict()) == set(nn.BatchNorm2d(3).state_dict())
    assert "activation='tanh'" in repr(BatchNormAct(3, "tanh"))


def test_double_backward_is_refused_clearly() -> None:
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    y = BatchNormAct(3, "tanh").double()(x)
    with pytest.raises(RuntimeError, match=r"BatchNormAct does not support double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"expected activation to be one of .*got 'gelu'"):
        BatchNormAct(3, "gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected negative_slope >= 0, got -0.1"):
        BatchNormAct(3, "leaky_relu", negative_slope=-0.1)
    with pytest.raises(ValueError, match=r"expected recompute to be 'output' or 'input', got 'both'"):
        BatchNormAct(3, recompute="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected activation to be one of"):
        batch_norm_act(torch.randn(4, 3), None, None, training=True, activation="elu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"more than 1 value per feature"):
        BatchNormAct(3)(torch.randn(1, 3))
