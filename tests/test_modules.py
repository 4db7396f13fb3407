"""The modules as drop-in replacements: ``bn.BatchNorm1d/2d/3d`` against ``torch.nn.BatchNorm1d/2d/3d``.

Each comparison copies the same parameters into both layers, runs both through
several training steps and then eval mode, and compares outputs, gradients
and buffers (float64, to rounding).
"""

from __future__ import annotations

import copy
import inspect
import io
from collections.abc import Callable
from itertools import product

import pytest
import torch
from torch import nn

import batchnorm as bn

F64 = torch.float64
FLOAT64_TOLERANCE = {"rtol": 1e-12, "atol": 1e-12}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

MODULE_PAIRS = [
    pytest.param(bn.BatchNorm1d, nn.BatchNorm1d, (8, 5), id="1d-dense"),
    pytest.param(bn.BatchNorm1d, nn.BatchNorm1d, (4, 5, 6), id="1d-sequence"),
    pytest.param(bn.BatchNorm2d, nn.BatchNorm2d, (3, 5, 4, 3), id="2d"),
    pytest.param(bn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 2, 3), id="3d"),
]


def _option_id(momentum: float | None, affine: bool, track: bool) -> str:
    return f"momentum={momentum}-{'affine' if affine else 'noaffine'}-{'track' if track else 'notrack'}"


OPTIONS = [
    pytest.param(momentum, affine, track, id=_option_id(momentum, affine, track))
    for momentum, affine, track in product((0.1, None), (True, False), (True, False))
]


def _randomize_parameters(*modules: nn.Module) -> None:
    """Give every module the same non-trivial weight and bias (not 1 and 0)."""
    first = modules[0]
    if getattr(first, "weight", None) is None:
        return
    weight = torch.randn_like(first.weight)
    bias = torch.randn_like(first.bias)
    with torch.no_grad():
        for module in modules:
            module.weight.copy_(weight)
            module.bias.copy_(bias)


def _assert_same_state(ours: nn.Module, theirs: nn.Module) -> None:
    for name in ("weight", "bias", *BUFFERS):
        ours_tensor, their_tensor = getattr(ours, name), getattr(theirs, name)
        if their_tensor is None:
            assert ours_tensor is None, name
        else:
            torch.testing.assert_close(ours_tensor, their_tensor, **FLOAT64_TOLERANCE, msg=name)


def _step(
    ours: nn.Module, theirs: nn.Module, x: torch.Tensor, to_ours: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> torch.Tensor:
    """One forward and backward of both modules; compare outputs, gradients and buffers; return our output.

    ``to_ours`` maps torch's layout to ours (identity for the aliases, a transpose
    for the generic module with ``axis=-1``).
    """
    ours_x = to_ours(x).detach().clone().requires_grad_()
    their_x = x.detach().clone().requires_grad_()
    ours_y = ours(ours_x)
    their_y = theirs(their_x)
    torch.testing.assert_close(ours_y, to_ours(their_y), **FLOAT64_TOLERANCE)
    grad_output = torch.randn_like(their_y)
    ours_y.backward(to_ours(grad_output))
    their_y.backward(grad_output)
    torch.testing.assert_close(ours_x.grad, to_ours(their_x.grad), **FLOAT64_TOLERANCE)
    for name in ("weight", "bias"):
        if getattr(theirs, name) is not None:
            torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, **FLOAT64_TOLERANCE)
    _assert_same_state(ours, theirs)
    return ours_y


def _sgd(*modules: nn.Module) -> None:
    """Move the parameters so that later steps see weights other than the initial ones."""
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter -= 0.1 * parameter.grad
                parameter.grad = None


@pytest.mark.parametrize(("momentum", "affine", "track"), OPTIONS)
@pytest.mark.parametrize(("ours_class", "torch_class", "shape"), MODULE_PAIRS)
def test_alias_matches_torch_over_training_then_eval(
    ours_class: type[bn.BatchNorm],
    torch_class: type[nn.Module],
    shape: tuple[int, ...],
    momentum: float | None,
    affine: bool,
    track: bool,
) -> None:
    options = {"momentum": momentum, "affine": affine, "track_running_stats": track, "dtype": F64}
    ours, theirs = ours_class(shape[1], **options), torch_class(shape[1], **options)
    _randomize_parameters(ours, theirs)

    for step in range(3):
        _step(ours, theirs, torch.randn(shape, dtype=F64) * (step + 1) + step)
        _sgd(ours, theirs)
    ours.eval()
    theirs.eval()
    for _ in range(2):
        _step(ours, theirs, torch.randn(shape, dtype=F64) + 0.5)


def test_generic_module_with_last_axis_equals_torch_on_moved_axis() -> None:
    """``bn.BatchNorm(C, axis=-1)`` on ``(N, L, C)`` is ``nn.BatchNorm1d`` on ``(N, C, L)``."""
    ours = bn.BatchNorm(6, axis=-1, dtype=F64)
    theirs = nn.BatchNorm1d(6, dtype=F64)
    _randomize_parameters(ours, theirs)

    def to_ours(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).contiguous()

    for step in range(3):
        _step(ours, theirs, torch.randn(4, 6, 5, dtype=F64) * 2 - step, to_ours)
        _sgd(ours, theirs)
    ours.eval()
    theirs.eval()
    _step(ours, theirs, torch.randn(3, 6, 7, dtype=F64), to_ours)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_no_running_stats_uses_batch_statistics_in_train_and_eval_like_torch(affine: bool) -> None:
    ours = bn.BatchNorm2d(3, affine=affine, track_running_stats=False, dtype=F64)
    theirs = nn.BatchNorm2d(3, affine=affine, track_running_stats=False, dtype=F64)
    assert ours.running_mean is None
    assert ours.running_var is None
    assert ours.num_batches_tracked is None
    _randomize_parameters(ours, theirs)
    for training in (True, False, True):
        ours.train(training)
        theirs.train(training)
        _step(ours, theirs, torch.randn(4, 3, 2, 2, dtype=F64) + 3.0)
    ours.eval()
    # Batch statistics in eval mode too, so a single value per feature is an error there as well.
    with pytest.raises(ValueError, match=r"expected more than 1 value per feature"):
        ours(torch.randn(1, 3, 1, 1, dtype=F64))


def test_tracking_switched_off_after_construction_behaves_like_torch() -> None:
    """Torch's semantics: buffers exist, train mode neither uses nor updates them, eval mode uses them."""
    ours, theirs = bn.BatchNorm2d(3, dtype=F64), nn.BatchNorm2d(3, dtype=F64)
    _step(ours, theirs, torch.randn(4, 3, 2, 2, dtype=F64) + 1.0)
    ours.track_running_stats = theirs.track_running_stats = False
    _step(ours, theirs, torch.randn(4, 3, 2, 2, dtype=F64) - 1.0)
    ours.eval()
    theirs.eval()
    _step(ours, theirs, torch.randn(4, 3, 2, 2, dtype=F64))


@pytest.mark.parametrize("device_memory_format", [torch.channels_last], ids=["channels_last"])
def test_channels_last_is_kept_and_correct(device_memory_format: torch.memory_format, device: torch.device) -> None:
    ours = bn.BatchNorm2d(4, dtype=F64, device=device)
    theirs = nn.BatchNorm2d(4, dtype=F64, device=device)
    _randomize_parameters(ours, theirs)
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(3, 4, 5, 6, dtype=F64, device=device).to(memory_format=device_memory_format)
        assert _step(ours, theirs, x).is_contiguous(memory_format=device_memory_format)


# --- state dict, checkpoints, convert ---------------------------------------------------


@pytest.mark.parametrize(("affine", "track"), [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize(("ours_class", "torch_class", "shape"), MODULE_PAIRS)
def test_state_dict_keys_are_torchs(
    ours_class: type[bn.BatchNorm], torch_class: type[nn.Module], shape: tuple[int, ...], affine: bool, track: bool
) -> None:
    ours = ours_class(shape[1], affine=affine, track_running_stats=track)
    theirs = torch_class(shape[1], affine=affine, track_running_stats=track)
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(their_state)
    for key in their_state:
        assert ours_state[key].dtype == their_state[key].dtype
        assert ours_state[key].shape == their_state[key].shape
    assert ours_state._metadata[""]["version"] == their_state._metadata[""]["version"]  # type: ignore[attr-defined]


def _train(module: nn.Module, shape: tuple[int, ...], steps: int = 3) -> None:
    module.train()
    with torch.no_grad():
        for step in range(steps):
            module(torch.randn(shape, dtype=F64) * (step + 2) + step)


@pytest.mark.parametrize(("ours_class", "torch_class", "shape"), MODULE_PAIRS)
def test_checkpoints_load_both_ways(
    ours_class: type[bn.BatchNorm], torch_class: type[nn.Module], shape: tuple[int, ...]
) -> None:
    x = torch.randn(shape, dtype=F64)

    # torch -> ours, through torch.save / torch.load(weights_only=True)
    theirs = torch_class(shape[1], dtype=F64)
    _randomize_parameters(theirs)
    _train(theirs, shape)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = ours_class(shape[1], dtype=F64)
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    _assert_same_state(ours, theirs)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), **FLOAT64_TOLERANCE)

    # ours -> torch
    ours = ours_class(shape[1], dtype=F64)
    _randomize_parameters(ours)
    _train(ours, shape)
    theirs = torch_class(shape[1], dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    _assert_same_state(ours, theirs)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), **FLOAT64_TOLERANCE)


def _version_one_checkpoint(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """What torch wrote before ``num_batches_tracked`` existed: no counter, metadata version 1."""
    del state[prefix + "num_batches_tracked"]
    state._metadata[prefix.rstrip(".")]["version"] = 1  # type: ignore[attr-defined]
    return state


def test_version_one_checkpoint_without_counter_loads() -> None:
    theirs = nn.BatchNorm2d(3, dtype=F64)
    _randomize_parameters(theirs)
    _train(theirs, (4, 3, 2, 2))
    ours = bn.BatchNorm2d(3, dtype=F64)
    ours.load_state_dict(_version_one_checkpoint(theirs.state_dict()))
    assert ours.num_batches_tracked is not None
    assert ours.num_batches_tracked.item() == 0
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=0)


def test_version_one_checkpoint_inside_a_model_loads() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).double()
    state = _version_one_checkpoint(model.state_dict(), prefix="1.")
    ours = bn.convert(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).double())
    ours.load_state_dict(state)
    assert isinstance(ours[1], bn.BatchNorm2d)
    assert ours[1].num_batches_tracked.item() == 0


def test_current_checkpoint_without_counter_is_rejected_like_torch() -> None:
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*num_batches_tracked"):
        nn.BatchNorm2d(3).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*num_batches_tracked"):
        bn.BatchNorm2d(3).load_state_dict(state)


def _torch_model() -> nn.Module:
    """A small CNN with every torch BN kind, nested, with differing options."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6),
        nn.BatchNorm1d(6, momentum=None),
        nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, affine=False, eps=1e-3)),
        nn.Unflatten(1, (5, 1, 1, 1)),
        nn.BatchNorm3d(5, track_running_stats=False),
    ).double()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _randomize_parameters(module)
    with torch.no_grad():
        for step in range(3):
            model(torch.randn(8, 2, 3, 3, dtype=F64) + step)
    return model


def _batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if bn.is_batch_norm(module)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_keeps_weights_buffers_mode_and_outputs(training: bool) -> None:
    model = _torch_model().train(training)
    model[1].weight.requires_grad_(False)  # a frozen layer stays frozen
    ours = bn.convert(copy.deepcopy(model))

    originals, converted = _batch_norm_layers(model), _batch_norm_layers(ours)
    assert [name for name, _ in originals] == [name for name, _ in converted]
    for (_, original), (_, replacement) in zip(originals, converted):
        assert type(replacement).__name__ == type(original).__name__
        assert isinstance(replacement, bn.BatchNorm)
        assert replacement.training == original.training
        for key in ("eps", "momentum", "affine", "track_running_stats", "num_features"):
            assert getattr(replacement, key) == getattr(original, key)
        _assert_same_state(replacement, original)
    assert not ours[1].weight.requires_grad
    assert ours[1].bias.requires_grad

    x = torch.randn(8, 2, 3, 3, dtype=F64)
    torch.testing.assert_close(ours(x), model(x), **FLOAT64_TOLERANCE)
    for (_, original), (_, replacement) in zip(originals, converted):
        _assert_same_state(replacement, original)  # buffers updated alike in train mode

    back = bn.convert(copy.deepcopy(ours), to="torch")
    for (_, original), (_, restored) in zip(originals, _batch_norm_layers(back)):
        assert type(restored) is type(original)
        assert restored.training == original.training
        _assert_same_state(restored, original)
    assert not back[1].weight.requires_grad
    torch.testing.assert_close(back(x), model(x), **FLOAT64_TOLERANCE)


def test_convert_a_single_layer_and_keep_dtype() -> None:
    layer = nn.BatchNorm1d(4, dtype=torch.float16)
    converted = bn.convert(layer)
    assert isinstance(converted, bn.BatchNorm1d)
    assert converted.weight.dtype == converted.running_mean.dtype == torch.float16
    assert converted.num_batches_tracked.dtype == torch.long
    assert type(bn.convert(converted, to="torch")) is nn.BatchNorm1d


def test_convert_leaves_the_generic_module_when_going_to_torch() -> None:
    generic = bn.BatchNorm(4, axis=-1)
    model = nn.Sequential(generic, bn.BatchNorm2d(4))
    bn.convert(model, to="torch")
    assert model[0] is generic
    assert type(model[1]) is nn.BatchNorm2d


def test_convert_rejects_unknown_target() -> None:
    with pytest.raises(ValueError, match=r"expected to='batchnorm' or to='torch', got 'jax'"):
        bn.convert(nn.BatchNorm1d(3), to="jax")


@pytest.mark.skipif(
    "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters,
    reason="torch.nn.BatchNorm2d has no bias= option before torch 2.13",
)
def test_convert_a_torch_layer_without_bias() -> None:
    """torch >= 2.13: ``nn.BatchNorm2d(C, bias=False)`` has a weight but no bias."""
    layer = nn.BatchNorm2d(3, bias=False, dtype=F64)  # type: ignore[call-arg]
    _train(layer, (4, 3, 2, 2))
    converted = bn.convert(copy.deepcopy(layer))
    assert converted.bias is None
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    torch.testing.assert_close(converted(x), layer(x), **FLOAT64_TOLERANCE)


# --- small API surface --------------------------------------------------------------------


def test_reset_running_stats() -> None:
    ours = bn.BatchNorm2d(3)
    _randomize_parameters(ours)
    weight = ours.weight.detach().clone()
    _train(ours.double(), (4, 3, 2, 2))
    assert ours.num_batches_tracked.item() == 3
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(3, dtype=F64))
    assert torch.equal(ours.running_var, torch.ones(3, dtype=F64))
    assert ours.num_batches_tracked.item() == 0
    torch.testing.assert_close(ours.weight.float(), weight)  # parameters untouched
    bn.BatchNorm2d(3, track_running_stats=False).reset_running_stats()  # nothing to reset, no error


def test_reset_parameters_like_torch() -> None:
    ours, theirs = bn.BatchNorm1d(3, dtype=F64), nn.BatchNorm1d(3, dtype=F64)
    _randomize_parameters(ours, theirs)
    _train(ours, (5, 3))
    _train(theirs, (5, 3))
    ours.reset_parameters()
    theirs.reset_parameters()
    _assert_same_state(ours, theirs)


@pytest.mark.parametrize(("ours_class", "torch_class", "shape"), MODULE_PAIRS)
def test_extra_repr(ours_class: type[bn.BatchNorm], torch_class: type[nn.Module], shape: tuple[int, ...]) -> None:
    ours = ours_class(shape[1], eps=1e-3, momentum=None, affine=False)
    theirs = torch_class(shape[1], eps=1e-3, momentum=None, affine=False)
    assert ours.extra_repr() == f"{shape[1]}, eps=0.001, momentum=None, affine=False, track_running_stats=True"
    # Every field we print is printed the same way by torch (newer torch adds ``bias=``).
    their_fields = theirs.extra_repr().split(", ")
    assert all(field in their_fields for field in ours.extra_repr().split(", "))
    assert repr(ours).startswith(f"{ours_class.__name__}({shape[1]}, eps=0.001")


def test_extra_repr_of_generic_module_names_axis_and_policy() -> None:
    assert bn.BatchNorm(8, axis=-1, nonfinite="skip").extra_repr() == (
        "8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, axis=-1, nonfinite='skip'"
    )


def test_is_batch_norm() -> None:
    assert bn.is_batch_norm(nn.BatchNorm2d(3))
    assert bn.is_batch_norm(bn.BatchNorm(3))
    assert not bn.is_batch_norm(nn.LayerNorm(3))


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module_class", "rank", "expected"),
    [
        pytest.param(bn.BatchNorm1d, 4, "2D or 3D", id="1d-got-4d"),
        pytest.param(bn.BatchNorm1d, 1, "2D or 3D", id="1d-got-1d"),
        pytest.param(bn.BatchNorm2d, 3, "4D", id="2d-got-3d"),
        pytest.param(bn.BatchNorm2d, 5, "4D", id="2d-got-5d"),
        pytest.param(bn.BatchNorm3d, 4, "5D", id="3d-got-4d"),
    ],
)
def test_alias_rejects_other_ranks(module_class: type[bn.BatchNorm], rank: int, expected: str) -> None:
    module = module_class(3)
    x = torch.randn((4, 3, 2, 2, 2, 2)[:rank] if rank > 1 else (3,))
    with pytest.raises(ValueError, match=rf"expected {expected} input \(got {rank}D input\)"):
        module(x)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param({"eps": 0.0}, r"expected eps > 0, got 0.0", id="eps-zero"),
        pytest.param({"eps": -1e-5}, r"expected eps > 0, got -1e-05", id="eps-negative"),
        pytest.param({"momentum": -0.5}, r"expected momentum in \[0, 1\] or None, got -0.5", id="momentum-negative"),
        pytest.param({"momentum": 1.01}, r"expected momentum in \[0, 1\] or None, got 1.01", id="momentum-above-one"),
        pytest.param({"nonfinite": "warn"}, r"expected nonfinite to be one of", id="nonfinite-policy"),
    ],
)
@pytest.mark.parametrize("module_class", [bn.BatchNorm, bn.BatchNorm2d], ids=["generic", "2d"])
def test_constructor_rejects_bad_arguments(
    module_class: type[bn.BatchNorm], arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        module_class(3, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_features", [0, -2, 2.5, True])
def test_constructor_rejects_bad_num_features(num_features: object) -> None:
    with pytest.raises(ValueError, match=r"expected num_features to be a positive integer"):
        bn.BatchNorm(num_features)  # type: ignore[arg-type]


def test_module_errors_from_the_op() -> None:
    with pytest.raises(ValueError, match=r"feature axis 3 is out of range for a 3-D input"):
        bn.BatchNorm(4, axis=3)(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"running_mean has shape \(4,\) but the input has 5 features along axis 1"):
        bn.BatchNorm1d(4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"expected more than 1 value per feature when training"):
        bn.BatchNorm2d(4)(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match=r"expected a floating-point input .*got dtype torch.int64"):
        bn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    # A single example is fine in eval mode, as in torch.
    assert bn.BatchNorm2d(4).eval()(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


BAD_VALUES = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf")]


@pytest.mark.parametrize("bad_value", BAD_VALUES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
def test_nonfinite_batch_raises_and_leaves_buffers_bit_identical(bad_value: float, momentum: float | None) -> None:
    module = bn.BatchNorm2d(3, momentum=momentum)
    _train(module.double(), (4, 3, 2, 2))
    before = {name: getattr(module, name).clone() for name in BUFFERS}
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    x[1, 2, 0, 1] = bad_value
    with pytest.raises(bn.NonfiniteBatchError, match=r"NaN or Inf"):
        module(x)
    for name, original in before.items():
        assert torch.equal(getattr(module, name), original), name


@pytest.mark.parametrize("bad_value", BAD_VALUES)
def test_nonfinite_batch_is_skipped_with_the_skip_policy(bad_value: float) -> None:
    module = bn.BatchNorm2d(3, nonfinite="skip").double()
    _train(module, (4, 3, 2, 2))
    before = {name: getattr(module, name).clone() for name in BUFFERS}
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    x[1, 2, 0, 1] = bad_value
    y = module(x)
    assert y.shape == x.shape
    assert torch.isfinite(y[:, :2]).all()
    for name, original in before.items():
        assert torch.equal(getattr(module, name), original), name


# --- half precision -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_input_keeps_float32_running_stats(dtype: torch.dtype, device: torch.device) -> None:
    """A float32 module on half input: output in the input dtype, buffers stay float32 and accurate."""
    ours = bn.BatchNorm2d(4, device=device)
    reference = nn.BatchNorm2d(4, dtype=F64, device=device)
    _randomize_parameters(reference)
    with torch.no_grad():
        ours.weight.copy_(reference.weight)
        ours.bias.copy_(reference.bias)
    for step in range(3):
        x = (torch.randn(8, 4, 3, 3, device=device) * 2 + step).to(dtype)
        y = ours(x)
        expected = reference(x.double())
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), expected, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 4)
    assert ours.running_mean.dtype == ours.running_var.dtype == torch.float32
    torch.testing.assert_close(ours.running_mean.double(), reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var.double(), reference.running_var, rtol=1e-5, atol=1e-6)
