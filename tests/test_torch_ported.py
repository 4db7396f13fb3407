"""PyTorch's own batch-norm tests, re-asked of ``bn.BatchNorm*d`` and ``bn.functional.batch_norm``.

Every group below checks the same properties as a family of PyTorch's tests,
with our own inputs and code (nothing is copied). The reference is always
PyTorch itself: ``torch.nn.BatchNorm1d/2d/3d`` or ``torch.nn.functional.batch_norm``
run on the same inputs (float64 where the tolerance matters), never our output.

Groups and the PyTorch tests they mirror:

* **test_nn.py** (``TestNN``, ``TestNNDeviceType``): ``test_batchnorm_update_stats``,
  ``test_batchnorm_simple_average``, ``test_batchnorm_eval``, ``test_batchnorm_affine``,
  ``test_batchnorm_grad``,
  ``test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_as_input``,
  ``test_batchnorm_raises_error_if_less_than_one_value_per_channel``,
  ``test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad``,
  ``test_batchnorm_buffer_update_when_stats_are_not_tracked``, ``test_batchnorm_large_batch``,
  ``test_batchnorm_load_state_dict``, and the running-statistics update against
  ``torch.batch_norm_update_stats`` (the aten op); in subprocesses: ``test_BatchNorm_empty`` (N=0, train and
  eval, with backward), ``test_batchnorm_nhwc_cpu``, ``test_batchnorm_non_contig_cpu``,
  ``test_batchnorm_nhwc_cuda`` (layout-independent eval), ``test_batchnorm_half_overflow``,
  ``test_batchnorm_nonaffine_cuda_half_input`` and the mixed-dtype (bfloat16 input, float32
  module) variants of the tests above.
* **test_modules.py** with ``module_inputs_torch_nn_BatchNorm1d/2d/3d`` (``module_db``):
  ``test_forward``, ``test_factory_kwargs``, ``test_repr``, ``test_pickle``, ``test_grad``,
  ``test_gradgrad``, ``test_if_train_and_eval_modes_differ``, ``test_device_ctx_init``,
  ``test_errors``, ``test_to``/``test_to_empty`` (meta), ``test_cpu_gpu_parity`` (CUDA only);
  in subprocesses: ``test_non_contiguous_tensors``, ``test_memory_format`` and the
  ``zero_batch`` inputs.
* **OpInfo ``nn.functional.batch_norm``** (``sample_inputs_batch_norm``): forward, gradcheck,
  gradgradcheck, forward-mode AD (``check_forward_ad``), fwgrad_bwgrad
  (``check_fwd_over_rev``); in subprocesses: the ``noncontiguous()`` samples (NaN in the gaps)
  and the empty ``(0,)`` samples.
* **test/nn/test_load_state_dict.py**: ``test_load_state_dict`` (BN entries, wrong sizes),
  ``test_load_state_dict_BC`` (version-1 checkpoints without ``num_batches_tracked``),
  ``test_load_state_dict_assign_meta``, each with and without ``swap_module_params_on_conversion``.
* **torch.func / functorch** (test_vmap, test_ops ``jvp``/``vmapjvp``, per-sample-gradient
  tutorials): ``vmap`` over the op and over modules via ``functional_call`` (train without
  running statistics, eval with them, ``replace_all_batch_norm_modules_``), per-sample
  gradients with ``vmap(grad(...))``, ``jvp``/forward AD with tangents on any subset of
  input/weight/bias, ``autograd.grad(..., is_grads_batched=True)``.
* **Interop**: ``isinstance`` against ``torch.nn.BatchNorm*d`` and ``_BatchNorm``,
  ``SyncBatchNorm.convert_sync_batchnorm``, ``torch.func.replace_all_batch_norm_modules_``,
  in-place ops on the output, ``torch.jit.trace``, ``torch.export.export`` and
  ``torch.compile(fullgraph=True)`` of a conv-BN-ReLU model.

Deliberately not checked: PyTorch writing NaN into the running statistics for a
non-finite training batch (ours raises :class:`bn.NonfiniteBatchError` or skips
the batch, see ``test_functional.py``); no input here contains NaN or Inf
(except the never-read gaps of non-contiguous tensors).

Cases that could crash the interpreter (empty batches with backward, odd strides,
half precision) run in child interpreters: one per group, all of the group's checks
in it, each reported as its own test; a crash fails the check that was running and
the rest of the group is re-run in a fresh interpreter.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import pickle
import re
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_, stack_module_state, vmap
from torch.testing import assert_close, make_tensor

import batchnorm as bn


class Tolerance(TypedDict):
    """Keyword arguments of ``torch.testing.assert_close``."""

    rtol: float
    atol: float


def _tol(rtol: float, atol: float | None = None) -> Tolerance:
    return {"rtol": rtol, "atol": rtol if atol is None else atol}


F64 = torch.float64
F64_TOLERANCE = _tol(1e-10)
LOW_PRECISION_TOLERANCE: dict[torch.dtype, Tolerance] = {
    torch.float16: _tol(5e-3),
    torch.bfloat16: _tol(2e-2),
    torch.float32: _tol(1e-5),
}
CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")

KINDS = ("1d", "2d", "3d")
OURS: dict[str, type[bn.BatchNorm]] = {"1d": bn.BatchNorm1d, "2d": bn.BatchNorm2d, "3d": bn.BatchNorm3d}
THEIRS: dict[str, type[nn.Module]] = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}
WARM_SHAPES = {"1d": (4, 3), "2d": (4, 3, 2, 2), "3d": (4, 3, 2, 2, 2)}
TRAIN_EVAL = [pytest.param(True, id="train"), pytest.param(False, id="eval")]

# torch 2.13 deprecates TorchScript; its own internals (decompositions, inductor) and
# torch.jit.trace warn, which pyproject turns into errors. These warnings are torch's, not ours.
TORCHSCRIPT_DEPRECATED = r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
pytestmark = pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)


# --------------------------------------------------------------------------- helpers


def _pair(kind: str, *args: Any, dtype: torch.dtype = F64, randomize: bool = True, **kwargs: Any) -> tuple[Any, Any]:
    """Our layer and torch's, built with the same arguments and holding the same (non-trivial) state."""
    theirs: Any = THEIRS[kind](*args, **kwargs).to(dtype)
    ours: Any = OURS[kind](*args, **kwargs).to(dtype)
    if randomize and getattr(theirs, "weight", None) is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _warm_up(ours: Any, theirs: Any, shape: tuple[int, ...], dtype: torch.dtype = F64) -> None:
    """One training step on both, so that eval mode sees non-trivial running statistics."""
    if not theirs.track_running_stats or shape[0] == 0:
        return
    ours.train()
    theirs.train()
    batch = torch.randn(shape, dtype=dtype) * 2 + 0.5
    with torch.no_grad():
        ours(batch)
        theirs(batch)


def _close(actual: Any, expected: Any, tolerance: Tolerance = F64_TOLERANCE, what: str = "") -> None:
    """``assert_close`` with a tolerance and a name for the message."""
    try:
        assert_close(actual, expected, **tolerance)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}" if what else str(error)) from None


def _assert_same_state(
    ours: nn.Module, theirs: nn.Module, tolerance: Tolerance = F64_TOLERANCE, upcast: bool = False
) -> None:
    """Same state-dict keys, and every parameter and buffer equal to torch's (counters exactly).

    With ``upcast``, ours is compared in the dtype of ``theirs`` (a higher-precision reference).
    """
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(their_state)
    for key, expected in their_state.items():
        if expected.is_floating_point():
            actual = ours_state[key].to(expected.dtype) if upcast else ours_state[key]
            _close(actual, expected, tolerance, key)
        else:
            assert torch.equal(ours_state[key], expected), f"{key}: {ours_state[key]} != {expected}"


def _upcast(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Low-precision results in float64, to compare with a float64 reference."""
    return [None if t is None else t.double() for t in tensors]


def _leaf(tensor: Tensor) -> Tensor:
    return tensor.detach().clone().requires_grad_(True)


def _grads(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.grad for t in tensors]


def _assert_grads_close(
    actual: Sequence[Tensor | None], expected: Sequence[Tensor | None], tolerance: Tolerance = F64_TOLERANCE
) -> None:
    for index, (ours, theirs) in enumerate(zip(actual, expected, strict=True)):
        if theirs is None:
            assert ours is None or not ours.any(), f"gradient {index}: torch has none, ours is {ours}"
        else:
            assert ours is not None, f"gradient {index}: torch has one, ours is None"
            _close(ours, theirs, tolerance, f"tensor {index}")


def _parameters_and_buffers_are(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.device == torch.device(device), f"{name} is on {tensor.device}, expected {device}"
        expected = dtype if tensor.is_floating_point() else torch.long
        assert tensor.dtype == expected, f"{name} has dtype {tensor.dtype}, expected {expected}"


@contextmanager
def _swap_module_params(enabled: bool) -> Iterator[None]:
    """``torch.__future__.set_swap_module_params_on_conversion`` for one test (test_load_state_dict's ``@swap``)."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(enabled)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


SWAP = [pytest.param(False, id="no-swap"), pytest.param(True, id="swap")]


# --------------------------------------------------------------------------- module_db inputs


@dataclass(frozen=True)
class ModuleCase:
    """One ``module_inputs_torch_nn_BatchNorm*d`` entry: constructor arguments and forward input shape."""

    kind: str
    desc: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    shape: tuple[int, ...]

    def build(self, dtype: torch.dtype = F64) -> tuple[Any, Any]:
        return _pair(self.kind, *self.args, dtype=dtype, **dict(self.kwargs))

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.desc}"


NO_BIAS = (("bias", False),)
MODULE_DB = [
    ModuleCase("1d", "affine", (10,), (), (4, 10)),
    ModuleCase("1d", "3d_input", (5,), (), (4, 5, 3)),
    ModuleCase("1d", "affine_simple_average", (10, 1e-3, None), (), (4, 10)),
    ModuleCase("1d", "not_affine", (10, 1e-3, 0.3, False), (), (4, 10)),
    ModuleCase("1d", "not_tracking_stats", (10, 1e-3, 0.3, True, False), (), (4, 10)),
    ModuleCase("1d", "3d_input_not_affine", (5, 1e-3, 0.3, False), (), (4, 5, 3)),
    ModuleCase("1d", "zero_batch", (5, 1e-3, 0.3, False), (), (0, 5, 9)),
    ModuleCase("1d", "affine_not_bias", (10,), NO_BIAS, (4, 10)),
    ModuleCase("2d", "default", (3,), (), (2, 3, 6, 6)),
    ModuleCase("2d", "2d_simple_average", (3, 1e-3, None), (), (2, 3, 6, 6)),
    ModuleCase("2d", "momentum", (3, 1e-3, 0.8), (), (2, 3, 6, 6)),
    ModuleCase("2d", "not_affine", (3, 1e-3, 0.8, False), (), (2, 3, 6, 6)),
    ModuleCase("2d", "not_tracking_stats", (3, 1e-3, 0.8, True, False), (), (2, 3, 6, 6)),
    ModuleCase("2d", "zero_batch", (5, 1e-3, 0.3, False), (), (0, 5, 2, 2)),
    ModuleCase("2d", "affine_not_bias", (3,), NO_BIAS, (2, 3, 6, 6)),
    ModuleCase("3d", "default", (3,), (), (2, 3, 4, 4, 4)),
    ModuleCase("3d", "3d_simple_average", (3, 1e-3, None), (), (2, 3, 4, 4, 4)),
    ModuleCase("3d", "momentum", (3, 1e-3, 0.7), (), (2, 3, 4, 4, 4)),
    ModuleCase("3d", "not_affine", (3, 1e-3, 0.7, False), (), (2, 3, 4, 4, 4)),
    ModuleCase("3d", "not_tracking_stats", (3, 1e-3, 0.7, True, False), (), (2, 3, 4, 4, 4)),
    ModuleCase("3d", "zero_batch", (5, 1e-3, 0.3, False), (), (0, 5, 2, 2, 2)),
    ModuleCase("3d", "affine_not_bias", (3,), NO_BIAS, (2, 3, 4, 4, 4)),
]
NONEMPTY_MODULE_DB = [case for case in MODULE_DB if case.desc != "zero_batch"]
MODULE_INPUTS = [pytest.param(case, id=case.id) for case in NONEMPTY_MODULE_DB]


# --------------------------------------------------------------------------- OpInfo samples


@dataclass(frozen=True)
class OpSample:
    """One ``sample_inputs_batch_norm`` entry: input shape, mode, momentum, eps and which optional tensors are given."""

    shape: tuple[int, ...]
    training: bool
    momentum: float = 0.1
    eps: float = 1e-5
    weight: bool = True
    bias: bool = True
    running: bool = True

    @property
    def id(self) -> str:
        parts = ["x".join(map(str, self.shape)), "train" if self.training else "eval"]
        parts += [f"momentum={self.momentum}", f"eps={self.eps}"]
        parts += [f"no-{name}" for name, given in (("weight", self.weight), ("bias", self.bias)) if not given]
        parts += [] if self.running else ["no-running-stats"]
        return "-".join(parts)

    def tensors(self, dtype: torch.dtype = F64, seed: int = 0) -> dict[str, Tensor | None]:
        """Input, running statistics (``low=0``, as PyTorch's samples), weight and bias, from a fixed seed."""
        channels = self.shape[1] if len(self.shape) > 1 else 0
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            x = make_tensor(self.shape, dtype=dtype, device="cpu")
            weight = make_tensor((channels,), dtype=dtype, device="cpu")
            bias = make_tensor((channels,), dtype=dtype, device="cpu")
            running_mean = make_tensor((channels,), dtype=dtype, device="cpu", low=0)
            running_var = make_tensor((channels,), dtype=dtype, device="cpu", low=0)
        return {
            "input": x,
            "running_mean": running_mean if self.running else None,
            "running_var": running_var if self.running else None,
            "weight": weight if self.weight else None,
            "bias": bias if self.bias else None,
        }


S = 5
# PyTorch's cases. Its momentum=-1.2 (eval) and -1.0 (train and eval) are asked in one
# place, test_opinfo_negative_momentum_like_torch, so that only that test depends on
# accepting a momentum outside [0, 1]; here those samples keep their shapes and eps.
OPINFO_SAMPLES = [
    OpSample((S, S, S), True, momentum=0.5, eps=0.6),
    OpSample((3, 2, 4), False),
    OpSample((3, 1), True, momentum=0.0),
    OpSample((3, 2, 3, 4), True, momentum=0.5, eps=0.5),
    OpSample((3, 2, 3, 4), False, eps=0.5),
    OpSample((2, 1), False),
    *[
        OpSample((3, 2, 3, 4), training, weight=weight, bias=bias)
        for training in (True, False)
        for weight, bias in ((True, False), (False, True), (False, False))
    ],
    OpSample((1, 2, 3), True, weight=False, bias=False, running=False),
]
OPINFO_PARAMS = [pytest.param(sample, id=sample.id) for sample in OPINFO_SAMPLES]


def _run_sample(
    op: Callable[..., Tensor], sample: OpSample, tensors: dict[str, Tensor | None], clone_running: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Call ``op`` (ours or torch's) on a sample; return the output and the running statistics it left."""
    running_mean, running_var = tensors["running_mean"], tensors["running_var"]
    if clone_running and running_mean is not None and running_var is not None:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    output = op(
        tensors["input"],
        running_mean,
        running_var,
        weight=tensors["weight"],
        bias=tensors["bias"],
        training=sample.training,
        momentum=sample.momentum,
        eps=sample.eps,
    )
    return output, running_mean, running_var


def _differentiable(sample: OpSample, tensors: dict[str, Tensor | None]) -> tuple[list[str], Callable[..., Tensor]]:
    """The names of the differentiable arguments given, and our op as a function of them (running stats fixed)."""
    names = [name for name in ("input", "weight", "bias") if tensors[name] is not None]

    def function(*values: Tensor) -> Tensor:
        arguments = dict(tensors)
        arguments.update(zip(names, values))
        running_mean, running_var = arguments["running_mean"], arguments["running_var"]
        return bn.functional.batch_norm(
            values[0],
            running_mean,
            running_var,
            weight=arguments["weight"],
            bias=arguments["bias"],
            training=sample.training,
            momentum=sample.momentum,
            eps=sample.eps,
        )

    return names, function


# --------------------------------------------------------------------------- child interpreters

_ISOLATED: dict[str, dict[str, Callable[[], None]]] = {"empty": {}, "strides": {}, "half": {}}


def _isolated(group: str, name: str, function: Callable[[], None]) -> None:
    assert name not in _ISOLATED[group], f"duplicate isolated check {group}/{name}"
    _ISOLATED[group][name] = function


_RUNNER = r"""
import importlib.util, json, sys, warnings
spec = importlib.util.spec_from_file_location("_torch_ported_checks", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
import torch
torch.set_num_threads(1)
warnings.filterwarnings("error")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="mlxtend.*")
warnings.filterwarnings("ignore", message=".*is experimental.*", category=UserWarning)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
group = sys.argv[2]
for name in sys.argv[3:]:
    print("@@START " + json.dumps(name), flush=True)
    torch.manual_seed(0)
    try:
        module._ISOLATED[group][name]()
    except BaseException as error:
        print("@@FAIL " + json.dumps([name, f"{type(error).__name__}: {error}"[:3000]]), flush=True)
    else:
        print("@@PASS " + json.dumps(name), flush=True)
"""


@functools.cache
def _isolated_results(group: str) -> dict[str, str]:
    """Run every check of ``group`` in child interpreters: name -> "" when it passed, else why it failed.

    One interpreter runs all the checks; if it dies, the check it was running is
    reported as the crash and the remaining checks run in a new interpreter.
    """
    pending = list(_ISOLATED[group])
    results: dict[str, str] = {}
    while pending:
        command = [sys.executable, "-c", _RUNNER, str(Path(__file__).resolve()), group, *pending]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        except subprocess.TimeoutExpired as error:
            stdout = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
            stderr, returncode = "timed out after 300 s", None
        else:
            stdout, stderr, returncode = completed.stdout, completed.stderr, completed.returncode
        started: str | None = None
        for line in stdout.splitlines():
            if line.startswith("@@START "):
                started = json.loads(line[len("@@START ") :])
            elif line.startswith("@@PASS "):
                results[json.loads(line[len("@@PASS ") :])] = ""
            elif line.startswith("@@FAIL "):
                name, reason = json.loads(line[len("@@FAIL ") :])
                results[name] = reason or "failed"
        remaining = [name for name in pending if name not in results]
        if not remaining:
            break
        tail = stderr.strip().splitlines()[-12:]
        if started is None or started in results:  # nothing ran (import error) or it died between checks
            for name in remaining:
                results[name] = f"child interpreter failed (returncode {returncode}): " + " | ".join(tail)
            break
        results[started] = f"crashed the interpreter (returncode {returncode}): " + " | ".join(tail)
        pending = [name for name in remaining if name != started]
    return results


def _assert_isolated(group: str, name: str) -> None:
    reason = _isolated_results(group)[name]
    if reason:
        pytest.fail(reason, pytrace=False)


# =========================================================================== test_nn.py


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_update_stats_changes_buffers_in_training_only(kind: str, dtype: torch.dtype) -> None:
    """test_batchnorm_update_stats: a training pass moves both buffers and the counter; eval leaves all three."""
    ours, theirs = _pair(kind, 3, dtype=dtype)
    data = torch.rand((4, 3) if kind == "1d" else (4, 3, 2, 2), dtype=dtype)
    before = {name: buffer.clone() for name, buffer in ours.named_buffers()}
    assert_close(ours(data), theirs(data))
    assert not torch.equal(ours.running_mean, before["running_mean"])
    assert not torch.equal(ours.running_var, before["running_var"])
    assert int(ours.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
    _assert_same_state(ours, theirs, _tol(1e-6))

    ours.eval()
    theirs.eval()
    before = {name: buffer.clone() for name, buffer in ours.named_buffers()}
    assert_close(ours(data), theirs(data))
    for name, buffer in ours.named_buffers():
        assert torch.equal(buffer, before[name]), f"{name} changed in eval mode"


UPDATE_STATS_SHAPES = [
    pytest.param((6, 4), torch.contiguous_format, id="6x4"),
    pytest.param((3, 4, 5), torch.contiguous_format, id="3x4x5"),
    pytest.param((2, 4, 3, 3), torch.channels_last, id="2x4x3x3-channels_last"),
    pytest.param((2, 4, 2, 3, 2), torch.channels_last_3d, id="2x4x2x3x2-channels_last_3d"),
]


@pytest.mark.parametrize("momentum", [0.1, 0.75], ids=["momentum=0.1", "momentum=0.75"])
@pytest.mark.parametrize(("shape", "memory_format"), UPDATE_STATS_SHAPES)
def test_running_stats_equal_torch_batch_norm_update_stats(
    shape: tuple[int, ...], memory_format: torch.memory_format, momentum: float
) -> None:
    """The op's training update against ``torch.batch_norm_update_stats`` (the aten op SyncBatchNorm uses)."""
    x = torch.randn(shape, dtype=F64).contiguous(memory_format=memory_format) * 3 + 1
    start = (torch.randn(4, dtype=F64), torch.rand(4, dtype=F64) + 0.5)
    ours = [t.clone() for t in start]
    theirs = [t.clone() for t in start]
    bn.functional.batch_norm(x, ours[0], ours[1], training=True, momentum=momentum)
    torch.batch_norm_update_stats(x, theirs[0], theirs[1], momentum)
    _close(ours[0], theirs[0], what="running_mean")
    _close(ours[1], theirs[1], what="running_var")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_simple_average_is_the_mean_of_the_batch_statistics(dtype: torch.dtype) -> None:
    """test_batchnorm_simple_average: with momentum=None the buffers average the batches seen since the reset."""
    ours, theirs = _pair("1d", 3, momentum=None, dtype=dtype)
    assert torch.equal(ours.running_mean, torch.zeros(3, dtype=dtype))
    assert torch.equal(ours.running_var, torch.ones(3, dtype=dtype))
    data1, data2 = torch.rand(4, 3, dtype=dtype), torch.rand(4, 3, dtype=dtype)

    single: list[tuple[Tensor, Tensor, Tensor]] = []
    for data in (data1, data2):
        output = ours(data)
        assert_close(output, theirs(data))
        assert not torch.equal(ours.running_mean, torch.zeros(3, dtype=dtype))
        assert not torch.equal(ours.running_var, torch.ones(3, dtype=dtype))
        _assert_same_state(ours, theirs, _tol(1e-6))
        single.append((output, ours.running_mean.clone(), ours.running_var.clone()))
        ours.reset_running_stats()
        theirs.reset_running_stats()
        assert torch.equal(ours.running_mean, torch.zeros(3, dtype=dtype))
        assert torch.equal(ours.running_var, torch.ones(3, dtype=dtype))

    assert_close(ours(data1), single[0][0])
    assert_close(ours(data2), single[1][0])
    theirs(data1)
    theirs(data2)
    assert_close(ours.running_mean, (single[0][1] + single[1][1]) / 2)
    assert_close(ours.running_var, (single[0][2] + single[1][2]) / 2)
    _assert_same_state(ours, theirs, _tol(1e-6))


@pytest.mark.parametrize("ndim", [2, 3], ids=["ndim=2", "ndim=3"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_eval_is_repeatable_and_untracked_eval_equals_training(ndim: int, dtype: torch.dtype) -> None:
    """test_batchnorm_eval: two eval passes give the same output and gradient; without tracking, eval is training."""
    ours, theirs = _pair("1d", 3, dtype=dtype)
    _warm_up(ours, theirs, (6, 3), dtype)
    ours.eval()
    theirs.eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad_output = torch.rand([3] * ndim, dtype=dtype)
    outputs: list[Tensor] = []
    gradients: list[Tensor] = []
    for _ in range(2):
        x = _leaf(data)
        output = ours(x)
        output.backward(grad_output)
        assert x.grad is not None
        outputs.append(output.detach())
        gradients.append(x.grad)
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(gradients[0], gradients[1])
    reference = _leaf(data)
    theirs(reference).backward(grad_output)
    assert_close(outputs[0], theirs(data).detach())
    assert_close(gradients[0], reference.grad)

    ours, theirs = _pair("1d", 3, dtype=dtype, track_running_stats=False)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad_output = torch.rand(4, 3, dtype=dtype)
    results = []
    for training in (True, False):
        ours.train(training)
        data.grad = None
        output = ours(data)
        output.backward(grad_output)
        results.append((output.detach(), data.grad))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])
    reference = _leaf(data)
    theirs.eval()
    expected = theirs(reference)
    expected.backward(grad_output)
    assert_close(results[1][0], expected.detach())
    assert_close(results[1][1], reference.grad)


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("ndim", [2, 3], ids=["ndim=2", "ndim=3"])
def test_affine_with_unit_weight_and_zero_bias_equals_no_affine(ndim: int, training: bool) -> None:
    """test_batchnorm_affine: weight 1 and bias 0 change nothing, in the output or the input's gradient."""
    plain, plain_torch = _pair("1d", 3, affine=False)
    affine: Any = bn.BatchNorm1d(3, affine=True).to(F64)
    with torch.no_grad():
        affine.weight.fill_(1.0)
        affine.bias.zero_()
    for module in (plain, plain_torch, affine):
        module.train(training)
    data = torch.rand([3] * ndim, dtype=F64, requires_grad=True)
    grad_output = torch.ones_like(data)
    results = []
    for module in (affine, plain, plain_torch):
        data.grad = None
        output = module(data)
        output.backward(grad_output)
        results.append((output.detach(), data.grad))
    _close(results[0][0], results[1][0])
    _close(results[0][1], results[1][1])
    _close(results[1][0], results[2][0])
    _close(results[1][1], results[2][1])


@pytest.mark.parametrize("training", TRAIN_EVAL)
def test_arange_input_gradcheck_gradgradcheck_and_values(training: bool) -> None:
    """test_batchnorm_grad: gradcheck and gradgradcheck on an arange input, a zero running variance and eps=1e-4."""
    batch, features, length = 4, 5, 6
    x = torch.arange(batch * features * length, dtype=F64).view(batch, features, length).requires_grad_()
    weight = torch.arange(1, features + 1, dtype=F64, requires_grad=True)
    bias = torch.arange(features, dtype=F64, requires_grad=True)
    running_mean = 1 - torch.arange(features, dtype=F64)
    running_var = 2 * torch.arange(features, dtype=F64)

    def ours(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return bn.functional.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-4)

    assert gradcheck(ours, (x, weight, bias))
    assert gradgradcheck(ours, (x, weight, bias))

    ours_mean, ours_var = running_mean.clone(), running_var.clone()
    their_mean, their_var = running_mean.clone(), running_var.clone()
    output = bn.functional.batch_norm(x, ours_mean, ours_var, weight, bias, training, 0.1, 1e-4)
    expected = F.batch_norm(x, their_mean, their_var, weight, bias, training, 0.1, 1e-4)
    _close(output, expected)
    _close(ours_mean, their_mean)
    _close(ours_var, their_var)
    grad_output = torch.randn_like(output)
    assert_close(
        torch.autograd.grad(output, (x, weight, bias), grad_output),
        torch.autograd.grad(expected, (x, weight, bias), grad_output),
        **F64_TOLERANCE,
    )


def _wrong_size_arguments(name: str, size: int) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "running_mean": torch.rand(10),
        "running_var": torch.rand(10) + 0.5,
        "weight": None,
        "bias": None,
    }
    arguments[name] = nn.Parameter(torch.rand(size)) if name in ("weight", "bias") else torch.rand(size)
    return arguments


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("size", [9, 11], ids=["size=9", "size=11"])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_wrong_size_vector_is_a_runtime_error_and_a_value_error(name: str, size: int, training: bool) -> None:
    """test_batchnorm_raises_error_if_{name}_is_not_same_size_as_input: RuntimeError as torch's, and ValueError."""
    x = torch.rand(2, 10)
    arguments = _wrong_size_arguments(name, size)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, **arguments, training=training)
    with pytest.raises(RuntimeError) as raised:
        bn.functional.batch_norm(x, **_wrong_size_arguments(name, size), training=training)
    assert isinstance(raised.value, ValueError), f"{type(raised.value).__mro__} is not a ValueError"


MODULE_MISMATCH = [
    pytest.param("1d", (2, 9), id="1d"),
    pytest.param("2d", (2, 9, 3, 3), id="2d"),
    pytest.param("3d", (2, 9, 2, 2, 2), id="3d"),
]


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize(("kind", "shape"), MODULE_MISMATCH)
def test_module_with_wrong_feature_count_raises_runtime_and_value_error(
    kind: str, shape: tuple[int, ...], training: bool
) -> None:
    """The same mismatch through a layer: torch's layer raises RuntimeError, ours must too (and ValueError)."""
    ours, theirs = _pair(kind, 10)
    ours.train(training)
    theirs.train(training)
    x = torch.rand(shape, dtype=F64)
    with pytest.raises(RuntimeError):
        theirs(x)
    with pytest.raises(RuntimeError) as raised:
        ours(x)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("training", TRAIN_EVAL)
def test_generic_layer_with_wrong_feature_count_raises_runtime_and_value_error(training: bool) -> None:
    layer = bn.BatchNorm(10, axis=-1).train(training)
    with pytest.raises(RuntimeError) as raised:
        layer(torch.rand(2, 3, 9))
    assert isinstance(raised.value, ValueError)


ONE_VALUE = [
    pytest.param(lambda: bn.BatchNorm1d(10)(torch.rand(10)[None, :, None]), id="module-1x10x1"),
    pytest.param(lambda: bn.BatchNorm1d(10)(torch.rand(1, 10)), id="module-1x10"),
    pytest.param(lambda: bn.BatchNorm2d(10)(torch.rand(1, 10, 1, 1)), id="module-1x10x1x1"),
    pytest.param(lambda: bn.BatchNorm(10, axis=-1)(torch.rand(1, 1, 10)), id="generic-axis-last"),
    pytest.param(lambda: bn.functional.batch_norm(torch.rand(1, 10), None, None, training=True), id="functional"),
]


@pytest.mark.parametrize("call", ONE_VALUE)
def test_one_value_per_channel_in_training_is_a_value_error(call: Callable[[], Tensor]) -> None:
    """test_batchnorm_raises_error_if_less_than_one_value_per_channel (torch raises ValueError)."""
    with pytest.raises(ValueError):
        nn.BatchNorm1d(10)(torch.rand(10)[None, :, None])
    with pytest.raises(ValueError):
        call()


RANKS = [
    pytest.param("1d", 4, id="1d-given-4D"),
    pytest.param("2d", 3, id="2d-given-3D"),
    pytest.param("3d", 4, id="3d-given-4D"),
]


@pytest.mark.parametrize(("kind", "rank"), RANKS)
def test_wrong_rank_is_a_value_error_like_torch(kind: str, rank: int) -> None:
    ours, theirs = _pair(kind, 3)
    x = torch.rand((2, 3, 2, 2, 2, 2)[:rank], dtype=F64)
    with pytest.raises(ValueError) as expected:
        theirs(x)
    with pytest.raises(ValueError, match=re.escape(str(expected.value).split(" (")[0])):
        ours(x)


DUAL_INDICES = [
    pytest.param(indices, id="+".join(map(str, indices))) for indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2))
]


@pytest.mark.parametrize("dual_indices", DUAL_INDICES)
def test_forward_grad_on_running_statistics(dual_indices: tuple[int, ...]) -> None:
    """test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad (0 input, 1 mean, 2 var)."""
    primals = (torch.randn(3, 2, 5, dtype=F64), torch.randn(2, dtype=F64), torch.rand(2, dtype=F64) + 0.5)
    tangents = tuple(torch.rand_like(primal) for primal in primals)
    raises = 0 in dual_indices and (1 in dual_indices or 2 in dual_indices)
    results: list[tuple[Tensor, Tensor | None]] = []
    ops: list[Callable[..., Tensor]] = [F.batch_norm, bn.functional.batch_norm]
    for op in ops:
        with fwAD.dual_level():
            duals = [
                fwAD.make_dual(primal, tangent) if index in dual_indices else primal  # type: ignore[no-untyped-call]
                for index, (primal, tangent) in enumerate(zip(primals, tangents))
            ]
            if raises:
                with pytest.raises(RuntimeError):
                    op(*duals, training=False)
                continue
            unpacked = fwAD.unpack_dual(op(*duals, training=False))  # type: ignore[no-untyped-call]
            results.append((unpacked.primal.clone(), None if unpacked.tangent is None else unpacked.tangent.clone()))
    if not raises:
        (expected, expected_tangent), (output, tangent) = results
        _close(output, expected)
        _assert_grads_close([tangent], [expected_tangent])


@pytest.mark.parametrize("training", TRAIN_EVAL)
def test_buffers_untouched_when_tracking_is_switched_off(training: bool) -> None:
    """test_batchnorm_buffer_update_when_stats_are_not_tracked: buffers stay, batch statistics are used in training."""
    ours, theirs = _pair("1d", 4)
    _warm_up(ours, theirs, (8, 4))
    ours.track_running_stats = False
    theirs.track_running_stats = False
    ours.train(training)
    theirs.train(training)
    before = {name: buffer.clone() for name, buffer in ours.named_buffers()}
    data = torch.rand(32, 4, dtype=F64)
    _close(ours(data), theirs(data))
    for name, buffer in ours.named_buffers():
        assert torch.equal(buffer, before[name]), f"{name} changed"


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_large_batch_of_one_channel(dtype: torch.dtype) -> None:
    """test_batchnorm_large_batch: 880801 values in one channel, forward and backward.

    The reference is torch's layer in float64 on the same values: torch's own float32
    result is off by up to 1e-4 relative here (its weight gradient by 1e-4 of 204).
    """
    ours, theirs = _pair("2d", 1, dtype=dtype)
    theirs.double()
    data = torch.rand(880801, 1, 1, 1, dtype=dtype)
    grad_output = torch.randn_like(data)
    ours_result = _forward_backward(ours, data, grad_output)
    their_result = _forward_backward(theirs, data.double(), grad_output.double())
    tolerance = F64_TOLERANCE if dtype == F64 else _tol(1e-5)
    _assert_grads_close(_upcast(ours_result), their_result, tolerance)
    _assert_same_state(ours, theirs, tolerance, upcast=True)


def test_counter_survives_loading_a_state_dict_without_it() -> None:
    """test_batchnorm_load_state_dict: a missing counter keeps the module's, or becomes 0 on a meta module."""
    layer = bn.BatchNorm2d(3)
    assert torch.equal(layer.state_dict()["num_batches_tracked"], torch.tensor(0))
    layer.num_batches_tracked = torch.tensor(10)
    assert torch.equal(layer.state_dict()["num_batches_tracked"], torch.tensor(10))
    layer.load_state_dict(OrderedDict(), strict=False)
    assert torch.equal(layer.state_dict()["num_batches_tracked"], torch.tensor(10))

    with torch.device("meta"):
        meta = bn.BatchNorm2d(3)
    assert meta.num_batches_tracked is not None
    assert meta.num_batches_tracked.device == torch.device("meta")
    meta.load_state_dict(OrderedDict(), assign=True, strict=False)
    assert torch.equal(meta.state_dict()["num_batches_tracked"], torch.tensor(0))


# =========================================================================== test_load_state_dict.py


@pytest.mark.parametrize("swap", SWAP)
def test_version_one_checkpoint_gets_a_zero_counter(swap: bool) -> None:
    """test_load_state_dict_BC: version 1 (and unversioned) BN checkpoints lack num_batches_tracked.

    A fresh layer gets a zero counter and the checkpoint's statistics; a layer that has
    trained keeps its own counter. Both exactly as torch's layer given the same checkpoint.
    """
    with _swap_module_params(swap):
        for kind in KINDS:
            donor, donor_torch = _pair(kind, 3)
            _warm_up(donor, donor_torch, WARM_SHAPES[kind])
            state = donor_torch.state_dict()
            del state["num_batches_tracked"]
            for version in (1, None):
                if version is None:
                    del state._metadata[""]["version"]
                else:
                    state._metadata[""]["version"] = version
                for trained in (False, True):
                    ours, theirs = _pair(kind, 3)
                    if trained:
                        _warm_up(ours, theirs, WARM_SHAPES[kind])
                    ours.load_state_dict(copy.deepcopy(state))
                    theirs.load_state_dict(copy.deepcopy(state))
                    assert ours.num_batches_tracked.dtype == torch.long
                    assert ours.num_batches_tracked.item() == (1 if trained else 0)
                    _assert_same_state(ours, theirs)


@pytest.mark.parametrize("swap", SWAP)
def test_state_dict_of_a_network_with_our_layer(swap: bool) -> None:
    """test_load_state_dict: BN entries load, a wrong-sized running_mean is a RuntimeError even with strict=False."""
    with _swap_module_params(swap):
        net: Any = nn.Module()
        net.linear = nn.Linear(5, 5)
        net.bn = bn.BatchNorm2d(2)
        state = net.state_dict()
        state.update({"bn.running_mean": torch.randn(2), "bn.weight": torch.rand(2)})
        prefixed = OrderedDict(("module." + key, value) for key, value in state.items())
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(prefixed, "module.")
        for checkpoint in (state, prefixed):
            incompatible = net.load_state_dict(checkpoint)
            assert not incompatible.missing_keys
            assert not incompatible.unexpected_keys
            assert torch.equal(net.bn.running_mean, checkpoint["bn.running_mean"])
            assert torch.equal(net.bn.weight.detach(), checkpoint["bn.weight"])

        state = net.state_dict()
        state["extra"] = torch.ones(5)
        with pytest.raises(RuntimeError):
            net.load_state_dict(state)
        assert net.load_state_dict(state, strict=False).unexpected_keys == ["extra"]

        state = net.state_dict()
        del state["bn.running_var"]
        with pytest.raises(RuntimeError):
            net.load_state_dict(state)
        assert net.load_state_dict(state, strict=False).missing_keys == ["bn.running_var"]

        state = net.state_dict()
        state["bn.running_mean"] = torch.rand(14, 4)
        with pytest.raises(RuntimeError):
            net.load_state_dict(state)
        with pytest.raises(RuntimeError):
            net.load_state_dict(state, strict=False)


@pytest.mark.parametrize("keep_vars", [False, True], ids=["tensors", "keep_vars"])
@pytest.mark.parametrize("swap", SWAP)
def test_assign_a_state_dict_to_a_meta_model(swap: bool, keep_vars: bool) -> None:
    """test_load_state_dict_assign_meta: a meta-device model with our BN takes a checkpoint by assignment."""

    def build(layer: type[nn.Module]) -> nn.Sequential:
        return nn.Sequential(nn.Linear(3, 5), layer(5))

    with _swap_module_params(swap):
        net = build(bn.BatchNorm1d)
        net.train()
        net(torch.randn(6, 3))  # non-trivial running statistics and counter
        state = net.state_dict(keep_vars=keep_vars)
        for value in state.values():
            value.requires_grad_(False)
        with torch.device("meta"):
            meta = build(bn.BatchNorm1d)
        meta.load_state_dict(state, assign=True)
        for name, tensor in [*meta.named_parameters(), *meta.named_buffers()]:
            assert not tensor.is_meta, f"{name} is still on the meta device"
        assert [name for name, _ in meta.named_parameters()] == [name for name, _ in net.named_parameters()]
        assert [name for name, _ in meta.named_buffers()] == [name for name, _ in net.named_buffers()]

        reference = build(nn.BatchNorm1d)
        reference.load_state_dict(net.state_dict())
        for model in (net, meta, reference):
            model.eval()
        x = torch.randn(4, 3)
        assert_close(meta(x), reference(x))
        assert_close(net(x), reference(x))


def test_state_dicts_load_both_ways_with_torchs_version_tag() -> None:
    for kind in KINDS:
        ours, theirs = _pair(kind, 4)
        ours_state, their_state = ours.state_dict(), theirs.state_dict()
        assert list(ours_state) == list(their_state)
        assert ours_state._metadata[""]["version"] == their_state._metadata[""]["version"]
        fresh_theirs, fresh_ours = THEIRS[kind](4).to(F64), OURS[kind](4).to(F64)
        fresh_theirs.load_state_dict(ours_state)
        fresh_ours.load_state_dict(their_state)
        _assert_same_state(fresh_ours, fresh_theirs)


# =========================================================================== test_modules.py (module_db)


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_forward_and_dtype_methods(case: ModuleCase, training: bool) -> None:
    """test_forward: outputs and buffers equal torch's; .float() and .double() convert every parameter and buffer."""
    ours, theirs = case.build()
    _warm_up(ours, theirs, case.shape)
    ours.train(training)
    theirs.train(training)
    x = make_tensor(case.shape, dtype=F64, device="cpu")
    for _ in range(2):
        _close(ours(x), theirs(x))
    _assert_same_state(ours, theirs)

    ours.float()
    theirs.float()
    _parameters_and_buffers_are(ours, "cpu", torch.float32)
    assert_close(ours(x.float()), theirs(x.float()))
    _assert_same_state(ours, theirs, _tol(1e-5, 1e-6))
    ours.double()
    _parameters_and_buffers_are(ours, "cpu", F64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, F64], ids=["float16", "float32", "float64"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_factory_kwargs(case: ModuleCase, device: str, dtype: torch.dtype) -> None:
    """test_factory_kwargs: device= and dtype= reach every parameter and buffer, as they do torch's."""
    kwargs = dict(case.kwargs)
    factory: dict[str, Any] = {**kwargs, "device": device, "dtype": dtype}
    ours = OURS[case.kind](*case.args, **factory)
    theirs = THEIRS[case.kind](*case.args, **factory)
    _parameters_and_buffers_are(ours, device, dtype)
    ours_tensors = [(name, t.shape, t.dtype) for name, t in [*ours.named_parameters(), *ours.named_buffers()]]
    their_tensors = [(name, t.shape, t.dtype) for name, t in [*theirs.named_parameters(), *theirs.named_buffers()]]
    assert ours_tensors == their_tensors


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_repr(case: ModuleCase, training: bool) -> None:
    """test_repr: repr and str work; the class name and every field we print read as torch's.

    (torch 2.13 also prints ``bias=``, which ours leaves out for older torch: see test_modules.py.)
    """
    ours, theirs = case.build()
    ours.train(training)
    assert str(ours) == repr(ours)
    assert repr(ours).startswith(f"{type(theirs).__name__}(")
    their_fields = theirs.extra_repr().split(", ")
    for field in ours.extra_repr().split(", "):
        assert field in their_fields, f"{field!r} not in torch's {theirs.extra_repr()!r}"


@pytest.mark.parametrize("swap", SWAP)
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_to_dtype(case: ModuleCase, swap: bool) -> None:
    """test_to: ``.to(dtype)`` (with and without swapping parameters) keeps Parameters and the layer working."""
    with _swap_module_params(swap):
        ours, theirs = case.build()
        _warm_up(ours, theirs, case.shape)
        weight_before = ours.weight
        for module in (ours, theirs):
            module.to(torch.float32)
        _parameters_and_buffers_are(ours, "cpu", torch.float32)
        for name, parameter in ours.named_parameters():
            assert isinstance(parameter, nn.Parameter), f"{name} is no longer a Parameter"
        if swap and weight_before is not None:
            assert ours.weight is weight_before, "swap_module_params_on_conversion keeps the Parameter object"
        x = make_tensor(case.shape, dtype=torch.float32, device="cpu")
        for training in (True, False):
            ours.train(training)
            theirs.train(training)
            _close(ours(x), theirs(x), _tol(1e-5))
        _assert_same_state(ours, theirs, _tol(1e-5))


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_pickle_round_trip(case: ModuleCase, training: bool) -> None:
    """test_pickle: torch.save/torch.load (and pickle, deepcopy) give a layer with the same output and state."""
    ours, theirs = case.build()
    _warm_up(ours, theirs, case.shape)
    ours.train(training)
    theirs.train(training)
    x = make_tensor(case.shape, dtype=F64, device="cpu")
    _close(ours(x), theirs(x))
    state = copy.deepcopy(theirs.state_dict())
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)]
    for restored in copies:
        assert type(restored) is type(ours)
        assert restored.training == training
        theirs.load_state_dict(state)
        _assert_same_state(restored, theirs)
        _close(restored(x), theirs(x))
        _assert_same_state(restored, theirs)


def _module_gradcheck(case: ModuleCase, training: bool, check: Callable[..., bool]) -> None:
    """test_grad/test_gradgrad: total derivative, then each parameter with the input, then the parameters alone."""
    ours, _ = case.build()
    ours.train(training)
    x = make_tensor(case.shape, dtype=F64, device="cpu", requires_grad=True)
    names = [name for name, _ in ours.named_parameters()]
    parameters = [parameter.detach().clone().requires_grad_(True) for parameter in ours.parameters()]

    def function(x: Tensor, *values: Tensor) -> Tensor:
        output: Tensor = functional_call(ours, dict(zip(names, values, strict=True)), (x,))
        return output

    assert check(function, (x, *parameters), fast_mode=True)
    for index in range(len(parameters)):
        only = [p if i == index else p.detach() for i, p in enumerate(parameters)]
        assert check(function, (x, *only), fast_mode=True)
    if parameters:
        assert check(function, (x.detach(), *parameters), fast_mode=True)


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_gradcheck(case: ModuleCase, training: bool) -> None:
    _module_gradcheck(case, training, gradcheck)


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_gradgradcheck(case: ModuleCase, training: bool) -> None:
    _module_gradcheck(case, training, gradgradcheck)


@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_train_and_eval_differ(case: ModuleCase) -> None:
    """test_if_train_and_eval_modes_differ: the forward reads ``training`` (BN's ModuleInfo says they differ)."""
    ours, _ = case.build()
    del ours.training
    with pytest.raises(AttributeError, match="'training'"):
        ours(make_tensor(case.shape, dtype=F64, device="cpu"))


@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_device_context_init(case: ModuleCase) -> None:
    """test_device_ctx_init: built under ``with torch.device('meta')``, every tensor is meta with the CPU layout."""
    kwargs = dict(case.kwargs)
    cpu = OURS[case.kind](*case.args, **kwargs)
    with torch.device("meta"):
        meta = OURS[case.kind](*case.args, **kwargs)
    cpu_tensors = [*cpu.parameters(), *cpu.buffers()]
    meta_tensors = [*meta.parameters(), *meta.buffers()]
    assert len(cpu_tensors) == len(meta_tensors)
    for on_meta, on_cpu in zip(meta_tensors, cpu_tensors, strict=True):
        assert on_meta.is_meta
        assert (on_meta.shape, on_meta.dtype, on_meta.stride()) == (on_cpu.shape, on_cpu.dtype, on_cpu.stride())


@pytest.mark.parametrize("eps", [-1.0, 0.0], ids=["eps=-1", "eps=0"])
@pytest.mark.parametrize("kind", KINDS)
def test_module_db_errors_non_positive_eps(kind: str, eps: float) -> None:
    """test_errors: eps <= 0 is a ValueError in training (torch's at forward; ours may refuse at construction)."""
    shape = {"1d": (2, 10), "2d": (2, 10, 5, 5), "3d": (2, 10, 4, 4, 4)}[kind]
    with pytest.raises(ValueError, match="eps"):
        THEIRS[kind](10, eps=eps)(torch.randn(shape))
    with pytest.raises(ValueError, match="eps"):
        OURS[kind](10, eps=eps)(torch.randn(shape))


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_meta_forward_and_to_empty(case: ModuleCase, training: bool) -> None:
    """test_to_empty / meta: a meta layer runs on meta inputs; to_empty + reset_parameters gives a fresh layer."""
    kwargs = dict(case.kwargs)
    with torch.device("meta"):
        ours = OURS[case.kind](*case.args, **kwargs).train(training)
        theirs = THEIRS[case.kind](*case.args, **kwargs).train(training)
        x = torch.empty(case.shape)
    try:
        expected = theirs(x)
    except RuntimeError:  # momentum=None in training reads the counter (.item()), which torch cannot on meta
        expected = None
    if expected is not None:
        output = ours(x)
        assert output.is_meta
        assert (output.shape, output.dtype) == (expected.shape, expected.dtype)

    ours.to_empty(device="cpu")
    ours.reset_parameters()
    fresh = OURS[case.kind](*case.args, **kwargs)
    for (name, actual), (_, wanted) in zip(ours.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert not actual.is_meta, name
        assert torch.equal(actual, wanted), name
    cpu_theirs = THEIRS[case.kind](*case.args, **kwargs).train(training)
    ours.train(training)
    data = make_tensor(case.shape, dtype=torch.float32, device="cpu")
    assert_close(ours(data), cpu_theirs(data))


@requires_cuda
@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("case", MODULE_INPUTS)
def test_module_db_cpu_gpu_parity(case: ModuleCase, training: bool) -> None:
    """test_cpu_gpu_parity: on CUDA the layer gives the CPU layer's outputs and gradients (4e-4 in float64)."""
    cpu, _ = case.build()
    gpu = copy.deepcopy(cpu).cuda()
    cpu.train(training)
    gpu.train(training)
    x = make_tensor(case.shape, dtype=F64, device="cpu", requires_grad=True)
    x_gpu = _leaf(x.detach().cuda())
    outputs = (cpu(x), gpu(x_gpu))
    assert_close(outputs[1].cpu(), outputs[0], rtol=4e-4, atol=4e-4)
    grad_output = torch.randn_like(outputs[0])
    outputs[0].backward(grad_output)
    outputs[1].backward(grad_output.cuda())
    assert x.grad is not None
    assert x_gpu.grad is not None
    assert_close(x_gpu.grad.cpu(), x.grad, rtol=4e-4, atol=4e-4)
    for p_cpu, p_gpu in zip(cpu.parameters(), gpu.parameters(), strict=True):
        assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=4e-4, atol=4e-4)


# =========================================================================== OpInfo nn.functional.batch_norm


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("sample", OPINFO_PARAMS)
def test_opinfo_forward_and_running_stats_match_torch(sample: OpSample, dtype: torch.dtype) -> None:
    tensors = sample.tensors(dtype)
    output, ours_mean, ours_var = _run_sample(bn.functional.batch_norm, sample, tensors)
    expected, their_mean, their_var = _run_sample(F.batch_norm, sample, tensors)
    tolerance = F64_TOLERANCE if dtype == F64 else _tol(1e-5)
    assert output.dtype == expected.dtype
    _close(output, expected, tolerance)
    if their_mean is not None:
        _close(ours_mean, their_mean, tolerance)
        _close(ours_var, their_var, tolerance)


@pytest.mark.parametrize("sample", OPINFO_PARAMS)
def test_opinfo_gradcheck(sample: OpSample) -> None:
    tensors = sample.tensors()
    names, function = _differentiable(sample, tensors)
    values = [_leaf(tensors[name]) for name in names]  # type: ignore[arg-type]
    assert gradcheck(function, values)


@pytest.mark.parametrize("sample", OPINFO_PARAMS)
def test_opinfo_gradgradcheck(sample: OpSample) -> None:
    tensors = sample.tensors()
    names, function = _differentiable(sample, tensors)
    values = [_leaf(tensors[name]) for name in names]  # type: ignore[arg-type]
    assert gradgradcheck(function, values)


@pytest.mark.parametrize("sample", OPINFO_PARAMS)
def test_opinfo_forward_ad(sample: OpSample) -> None:
    """supports_forward_ad: gradcheck(check_forward_ad=True), and the tangent equals torch's jvp."""
    tensors = sample.tensors()
    names, function = _differentiable(sample, tensors)
    values = [_leaf(tensors[name]) for name in names]  # type: ignore[arg-type]
    assert gradcheck(function, values, check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)

    primals = tuple(value.detach() for value in values)
    tangents = tuple(torch.randn_like(value) for value in primals)

    def theirs(*arguments: Tensor) -> Tensor:
        given = dict(tensors)
        given.update(zip(names, arguments))
        return F.batch_norm(
            arguments[0],
            given["running_mean"],
            given["running_var"],
            given["weight"],
            given["bias"],
            sample.training,
            sample.momentum,
            sample.eps,
        )

    output, tangent = jvp(function, primals, tangents)[:2]
    expected, expected_tangent = jvp(theirs, primals, tangents)[:2]
    _close(output, expected)
    _close(tangent, expected_tangent)


@pytest.mark.parametrize("sample", OPINFO_PARAMS)
def test_opinfo_fwgrad_bwgrad(sample: OpSample) -> None:
    """supports_fwgrad_bwgrad: forward-over-reverse second derivatives (gradgradcheck with check_fwd_over_rev)."""
    tensors = sample.tensors()
    names, function = _differentiable(sample, tensors)
    values = [_leaf(tensors[name]) for name in names]  # type: ignore[arg-type]
    assert gradgradcheck(
        function, values, check_fwd_over_rev=True, check_rev_over_rev=False, check_undefined_grad=False
    )


@pytest.mark.parametrize("training", TRAIN_EVAL)
def test_opinfo_negative_momentum_like_torch(training: bool) -> None:
    """PyTorch's samples pass momentum=-1.0 (train and eval) and -1.2 (eval): torch's op takes any momentum.

    In eval mode momentum is unused; in training it extrapolates (-1.0: ``running = 2 * running - batch``).
    """
    for sample in (
        OpSample((3, 2, 3, 4), training, momentum=-1.0, eps=0.5),
        OpSample((3, 2, 4), training, momentum=-1.2),
    ):
        tensors = sample.tensors()
        if training:
            # Deliberate difference (README): extrapolating running statistics corrupts them (a negative
            # running variance), so training with momentum outside [0, 1] is refused, as a RuntimeError too.
            with pytest.raises(RuntimeError, match=r"momentum in \[0, 1\]"):
                _run_sample(bn.functional.batch_norm, sample, tensors)
            continue
        output, ours_mean, ours_var = _run_sample(bn.functional.batch_norm, sample, tensors)
        expected, their_mean, their_var = _run_sample(F.batch_norm, sample, tensors)
        _close(output, expected)
        _close(ours_mean, their_mean)
        _close(ours_var, their_var)


# =========================================================================== interop and torch.func


def _model_with_every_rank() -> nn.Module:
    model = nn.Module()
    model.one = nn.BatchNorm1d(4)
    model.two = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    model.three = nn.BatchNorm3d(4, affine=False)
    return model


def test_converted_layers_are_torch_batch_norms() -> None:
    model = bn.convert(_model_with_every_rank())
    expected = {"one": nn.BatchNorm1d, "two.1": nn.BatchNorm2d, "three": nn.BatchNorm3d}
    modules = dict(model.named_modules())
    for name, torch_class in expected.items():
        layer = modules[name]
        assert isinstance(layer, bn.BatchNorm), f"{name} was not converted"
        assert isinstance(layer, torch_class), f"{type(layer).__mro__} lacks {torch_class}"
        assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
        assert bn.is_batch_norm(layer)
    assert isinstance(bn.BatchNorm2d(3), nn.BatchNorm2d)
    assert isinstance(bn.BatchNorm1d(3), nn.modules.batchnorm._BatchNorm)


def test_convert_sync_batchnorm_sees_our_layers() -> None:
    model = bn.convert(_model_with_every_rank()).double()
    ours = dict(model.named_modules())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))  # type: ignore[no-untyped-call]
    converted = dict(synced.named_modules())
    for name in ("one", "two.1", "three"):
        layer, original = converted[name], ours[name]
        assert isinstance(layer, nn.SyncBatchNorm), f"{name}: convert_sync_batchnorm skipped {type(original).__name__}"
        _assert_same_state(layer, original)
        assert (layer.eps, layer.momentum, layer.affine) == (original.eps, original.momentum, original.affine)


@pytest.mark.parametrize("training", TRAIN_EVAL)
def test_replace_all_batch_norm_modules_sees_our_layers(training: bool) -> None:
    reference = _model_with_every_rank().double()
    model = bn.convert(copy.deepcopy(reference))
    replace_all_batch_norm_modules_(model)
    replace_all_batch_norm_modules_(reference)
    for name in ("one", "two.1", "three"):
        layer = dict(model.named_modules())[name]
        assert layer.running_mean is None, f"{name} still has running statistics"
        assert layer.running_var is None
        assert layer.track_running_stats is False
    model.train(training)
    reference.train(training)
    for name, shape in (("one", (5, 4)), ("two", (3, 2, 3, 3)), ("three", (2, 4, 2, 2, 2))):
        x = torch.randn(shape, dtype=F64)
        _close(getattr(model, name)(x), getattr(reference, name)(x))


INPLACE_OPS: list[Any] = [
    pytest.param(lambda y: torch.relu_(y), id="relu_"),
    pytest.param(lambda y: y.add_(1), id="add_"),
    pytest.param(nn.ReLU(inplace=True), id="ReLU(inplace=True)"),
    pytest.param(lambda y: y.mul_(2).clamp_(min=-1), id="mul_-clamp_"),
]


@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("inplace", INPLACE_OPS)
def test_inplace_op_on_the_output_keeps_torchs_gradients(inplace: Callable[[Tensor], Tensor], training: bool) -> None:
    ours, theirs = _pair("2d", 3)
    _warm_up(ours, theirs, (4, 3, 2, 2))
    results = []
    data = torch.randn(4, 3, 5, 5, dtype=F64)
    grad_output = torch.randn_like(data)
    for module in (ours, theirs):
        module.train(training)
        x = _leaf(data)
        output = inplace(module(x))
        torch.autograd.backward((output * grad_output).sum())
        results.append([output.detach(), *_grads(x, module.weight, module.bias)])
    _assert_grads_close(results[0], results[1])
    _assert_same_state(ours, theirs)


def _functional_on_batch(op: Callable[..., Tensor], training: bool) -> Callable[..., Tensor]:
    def function(
        x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor | None, running_var: Tensor | None
    ) -> Tensor:
        return op(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)

    return function


VMAP_CASES = [
    pytest.param(False, (None, None, None, None, None), True, id="eval-input-batched"),
    pytest.param(False, (0, 0, 0, None, None), True, id="eval-input-weight-bias-batched"),
    pytest.param(False, (0, None, None, 0, 0), True, id="eval-running-stats-batched"),
    pytest.param(True, (None, None, None, None, None), False, id="train-no-running-stats"),
    pytest.param(True, (0, 0, None, None, None), False, id="train-weight-batched-no-running-stats"),
    pytest.param(True, (None, None, None, 0, 0), True, id="train-running-stats-batched"),
]


@pytest.mark.parametrize(("training", "dims", "running"), VMAP_CASES)
def test_vmap_over_the_functional_op(training: bool, dims: tuple[int | None, ...], running: bool) -> None:
    """functorch test_vmap batch_norm: vmap over the input (and any of weight, bias, running statistics)."""
    batch, features = 3, 4
    x = torch.randn(batch, 5, features, 2, dtype=F64)
    arguments = {
        "weight": torch.rand(batch, features, dtype=F64) + 0.5,
        "bias": torch.randn(batch, features, dtype=F64),
        "running_mean": torch.randn(batch, features, dtype=F64),
        "running_var": torch.rand(batch, features, dtype=F64) + 0.5,
    }
    for (name, value), dim in zip(arguments.items(), dims[1:], strict=True):
        if dim is None:
            arguments[name] = value[0]
    if not running:
        arguments["running_mean"] = arguments["running_var"] = None  # type: ignore[assignment]
    in_dims = (0, *dims[1:])
    results = []
    for op in (bn.functional.batch_norm, F.batch_norm):
        state = {k: None if v is None else v.clone() for k, v in arguments.items()}
        output = vmap(_functional_on_batch(op, training), in_dims=in_dims)(
            x, state["weight"], state["bias"], state["running_mean"], state["running_var"]
        )
        results.append((output, state["running_mean"], state["running_var"]))
    (output, ours_mean, ours_var), (expected, their_mean, their_var) = results
    _close(output, expected)
    if their_mean is not None:
        _close(ours_mean, their_mean)
        _close(ours_var, their_var)


def _small_model(layer: type[nn.Module], track: bool = True, seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), layer(3, track_running_stats=track), nn.Tanh(), nn.Linear(3, 2)).double()


def _ours_and_torchs(track: bool = True, seed: int = 1) -> tuple[nn.Sequential, nn.Sequential]:
    reference = _small_model(nn.BatchNorm1d, track, seed)
    if track:
        with torch.no_grad():
            reference(torch.randn(16, 4, dtype=F64) * 2 + 1)
    model = bn.convert(copy.deepcopy(reference))
    assert isinstance(model, nn.Sequential)
    return model, reference


@pytest.mark.parametrize("training", TRAIN_EVAL)
def test_vmap_over_an_ensemble_via_functional_call(training: bool) -> None:
    """Model ensembling (stack_module_state + vmap(functional_call)): train without tracking, eval with buffers."""
    track = not training
    results = []
    for which in range(2):
        models = []
        for seed in range(3):
            ours, theirs = _ours_and_torchs(track, seed)
            models.append((ours, theirs)[which].train(training))
        parameters, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def call(
            parameters: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, base: nn.Module = base
        ) -> Tensor:
            output: Tensor = functional_call(base, (parameters, buffers), (x,))
            return output

        x = torch.randn(6, 4, dtype=F64)
        results.append(vmap(call, in_dims=(0, 0, None))(parameters, buffers, x))
    _close(results[0], results[1])


def test_vmap_over_minibatches_after_replace_all_batch_norm_modules() -> None:
    results = []
    for model in _ours_and_torchs():
        replace_all_batch_norm_modules_(model).train()
        parameters: dict[str, Tensor] = dict(model.named_parameters())

        def call(x: Tensor, model: nn.Module = model, parameters: dict[str, Tensor] = parameters) -> Tensor:
            output: Tensor = functional_call(model, parameters, (x,))
            return output

        results.append(vmap(call)(torch.randn(3, 5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))))
    _close(results[0], results[1])


def _per_sample_grads(model: nn.Module, training: bool) -> dict[str, Tensor]:
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    generator = torch.Generator().manual_seed(0)
    # Training: one "sample" is a minibatch of 4 rows (per-minibatch gradients with batch statistics);
    # eval: one sample is one row, normalised by the running statistics.
    if training:
        inputs, targets = (
            torch.randn(5, 4, 4, dtype=F64, generator=generator),
            torch.randn(5, 4, 2, dtype=F64, generator=generator),
        )
    else:
        inputs, targets = (
            torch.randn(5, 4, dtype=F64, generator=generator),
            torch.randn(5, 2, dtype=F64, generator=generator),
        )

    def loss(parameters: dict[str, Tensor], x: Tensor, target: Tensor) -> Tensor:
        batch = x if training else x.unsqueeze(0)
        output = functional_call(model, (parameters, buffers), (batch,))
        error: Tensor = ((output - (target if training else target.unsqueeze(0))) ** 2).sum()
        return error

    return vmap(grad(loss), in_dims=(None, 0, 0))(parameters, inputs, targets)  # type: ignore[no-any-return]


@pytest.mark.parametrize("training", TRAIN_EVAL)
def test_per_sample_gradients_with_vmap_of_grad(training: bool) -> None:
    results = []
    for model in _ours_and_torchs(track=not training):
        model.train(training)
        results.append(_per_sample_grads(model, training))
    assert list(results[0]) == list(results[1])
    for name in results[1]:
        _close(results[0][name], results[1][name], what=name)


SUBSETS = [
    pytest.param(subset, id="+".join(subset))
    for subset in (
        ("input",),
        ("weight",),
        ("bias",),
        ("input", "weight"),
        ("input", "bias"),
        ("weight", "bias"),
        ("input", "weight", "bias"),
    )
]


def _jvp_with(
    api: str, op: Callable[..., Tensor], subset: tuple[str, ...], training: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output and tangent of ``op`` with tangents on ``subset``, plus the running statistics it left."""
    generator = torch.Generator().manual_seed(0)
    primals = {
        "input": torch.randn(6, 3, 4, dtype=F64, generator=generator) * 2 + 1,
        "weight": torch.rand(3, dtype=F64, generator=generator) + 0.5,
        "bias": torch.randn(3, dtype=F64, generator=generator),
    }
    tangents = {name: torch.randn(value.shape, dtype=F64, generator=generator) for name, value in primals.items()}
    running_mean = torch.randn(3, dtype=F64, generator=generator)
    running_var = torch.rand(3, dtype=F64, generator=generator) + 0.5

    def function(*values: Tensor) -> Tensor:
        given = dict(primals)
        given.update(zip(subset, values))
        return op(given["input"], running_mean, running_var, given["weight"], given["bias"], training, 0.1, 1e-5)

    if api == "torch.func.jvp":
        output, tangent = jvp(function, tuple(primals[n] for n in subset), tuple(tangents[n] for n in subset))[:2]
    else:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(primals[n], tangents[n]) for n in subset]  # type: ignore[no-untyped-call]
            unpacked = fwAD.unpack_dual(function(*duals))  # type: ignore[no-untyped-call]
            output, tangent = unpacked.primal.clone(), unpacked.tangent
            assert tangent is not None, "no tangent on the output"
            tangent = tangent.clone()
    return output, tangent, running_mean, running_var


@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad.make_dual"])
@pytest.mark.parametrize("training", TRAIN_EVAL)
@pytest.mark.parametrize("subset", SUBSETS)
def test_forward_mode_ad_on_any_subset_of_input_weight_bias(subset: tuple[str, ...], training: bool, api: str) -> None:
    ours = _jvp_with(api, bn.functional.batch_norm, subset, training)
    theirs = _jvp_with(api, F.batch_norm, subset, training)
    for name, actual, expected in zip(("output", "tangent", "running_mean", "running_var"), ours, theirs, strict=True):
        _close(actual, expected, what=name)


@pytest.mark.parametrize("training", TRAIN_EVAL)
def test_jvp_through_the_module(training: bool) -> None:
    """torch.func.jvp of the layer itself: eval with running statistics, training without them.

    (A transform cannot update captured buffers in place, torch's layer included, so a
    tracking layer in training mode is out of scope for torch.func as for torch.)
    """
    ours, theirs = _pair("2d", 3, track_running_stats=not training)
    _warm_up(ours, theirs, (4, 3, 2, 2))
    x = torch.randn(4, 3, 3, 3, dtype=F64)
    tangent = torch.randn_like(x)
    results = []
    for module in (ours, theirs):
        module.train(training)
        results.append(jvp(module, (x,), (tangent,)))
    _close(results[0], results[1])
    _assert_same_state(ours, theirs)


def test_batched_grad_outputs_in_training() -> None:
    """autograd.grad(..., is_grads_batched=True): the backward runs under vmap."""
    ours, theirs = _pair("2d", 3)
    data = torch.randn(4, 3, 2, 2, dtype=F64)
    grad_outputs = torch.randn(5, *data.shape, dtype=F64)
    results = []
    for module in (ours, theirs):
        x = _leaf(data)
        output = module(x)
        results.append(
            torch.autograd.grad(output, (x, module.weight, module.bias), grad_outputs, is_grads_batched=True)
        )
    _close(results[0], results[1])


# =========================================================================== jit.trace, export, compile


def _conv_bn_relu(dtype: torch.dtype = torch.float32) -> tuple[nn.Sequential, nn.Sequential]:
    """A conv-BN-ReLU(inplace) model with trained statistics: torch's, and a converted copy (ours)."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).to(dtype)
    layer: Any = reference[1]
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        for _ in range(3):
            reference(torch.randn(4, 3, 6, 6, dtype=dtype) * 2 + 1)
    model = bn.convert(copy.deepcopy(reference))
    assert isinstance(model, nn.Sequential)
    return model, reference


def test_jit_trace_in_eval_mode() -> None:
    model, reference = _conv_bn_relu()
    model.eval()
    reference.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, 6, 6))  # type: ignore[no-untyped-call]
        for _ in range(2):
            x = torch.randn(3, 3, 6, 6) * 2 + 1
            assert_close(traced(x), reference(x))


def test_export_in_eval_mode() -> None:
    model, reference = _conv_bn_relu()
    model.eval()
    reference.eval()
    exported = torch.export.export(model, (torch.randn(2, 3, 6, 6),))
    x = torch.randn(2, 3, 6, 6) * 2 + 1
    with torch.no_grad():
        assert_close(exported.module()(x), reference(x))


@pytest.fixture
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_trains_and_evaluates_like_torch(backend: str) -> None:
    """torch.compile(fullgraph=True): two SGD steps in training, then eval, equal torch's uncompiled model."""
    model, reference = _conv_bn_relu(F64)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6, dtype=F64, generator=generator) * 2 + 1
        grad_output = torch.randn(4, 4, 6, 6, dtype=F64, generator=generator)
        output, expected = compiled(x), reference(x)
        _close(output, expected)
        (output * grad_output).sum().backward()
        (expected * grad_output).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad is not None, f"{name} has no gradient"
            assert q.grad is not None
            _close(p.grad, q.grad, what=f"{name}.grad")
            with torch.no_grad():
                p.sub_(0.1 * p.grad)
                q.sub_(0.1 * q.grad)
            p.grad = q.grad = None
        _assert_same_state(model, reference)
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64, generator=generator)
    _close(compiled(x), reference(x))


@pytest.mark.usefixtures("_fresh_dynamo")
def test_compile_inductor_eval() -> None:
    model, reference = _conv_bn_relu()
    model.eval()
    reference.eval()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)


# =========================================================================== isolated: empty batches


def _compare_empty(ours: Any, theirs: Any, x: Tensor, training: bool) -> None:
    """Forward and backward of an empty batch through both layers: same output, zero gradients, same buffers."""
    ours.train(training)
    theirs.train(training)
    results = []
    for module in (ours, theirs):
        leaf = _leaf(x)
        output = module(leaf)
        output.backward(torch.rand_like(output))
        results.append(
            (output.detach(), leaf.grad, *_grads(getattr(module, "weight", None), getattr(module, "bias", None)))
        )
    (output, *ours_grads), (expected, *their_grads) = results
    assert output.shape == expected.shape == x.shape
    assert output.dtype == expected.dtype
    for actual, wanted in zip(ours_grads, their_grads, strict=True):
        if wanted is None:
            assert actual is None or not actual.any()
        else:
            assert actual is not None
            assert actual.shape == wanted.shape
            assert not actual.any()
    _assert_same_state(ours, theirs)


def _register_empty_checks() -> None:
    for case in (case for case in MODULE_DB if case.desc == "zero_batch"):
        for training in (True, False):

            def zero_batch(case: ModuleCase = case, training: bool = training) -> None:
                ours, theirs = case.build()
                _compare_empty(ours, theirs, torch.randn(case.shape, dtype=F64), training)

            _isolated("empty", f"module_db-{case.id}-{'train' if training else 'eval'}", zero_batch)

    for training in (True, False):

        def affine_empty(training: bool = training) -> None:
            """test_BatchNorm_empty: (0, 3, 2, 2) through an affine BatchNorm2d, weight and bias gradients zero."""
            ours, theirs = _pair("2d", 3)
            _compare_empty(ours, theirs, torch.randn(0, 3, 2, 2, dtype=F64), training)
            if training:
                assert torch.equal(ours.running_mean, torch.zeros(3, dtype=F64))
                assert torch.equal(ours.running_var, torch.ones(3, dtype=F64))

        def channels_last_empty(training: bool = training) -> None:
            ours, theirs = _pair("2d", 3)
            x = torch.randn(0, 3, 2, 2, dtype=F64).contiguous(memory_format=torch.channels_last)
            _compare_empty(ours, theirs, x, training)

        def generic_axis_last_empty(training: bool = training) -> None:
            ours: Any = bn.BatchNorm(3, axis=-1).double().train(training)
            x = _leaf(torch.randn(0, 5, 3, dtype=F64))
            output = ours(x)
            output.backward(torch.rand_like(output))
            assert output.shape == x.shape
            assert x.grad is not None
            assert x.grad.shape == x.shape
            assert ours.weight.grad is not None
            assert not ours.weight.grad.any()

        def functional_empty(training: bool = training) -> None:
            data = torch.randn(0, 3, 4, dtype=F64)
            weight, bias = torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)
            running = (torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5)
            results = []
            ops: list[Callable[..., Tensor]] = [bn.functional.batch_norm, F.batch_norm]
            for op in ops:
                leaves = [_leaf(t) for t in (data, weight, bias)]
                stats = [t.clone() for t in running]
                output = op(leaves[0], *stats, leaves[1], leaves[2], training, 0.1, 1e-5)
                torch.autograd.backward(output, torch.rand_like(output))
                results.append([output.detach(), *_grads(*leaves), *stats])
            _assert_grads_close(results[0], results[1])

        def opinfo_zero_size(training: bool = training) -> None:
            """PyTorch's ((0,), {'training': ...}) samples: a 1-D empty input with empty running statistics."""
            x, running_mean, running_var = (
                torch.randn(0, dtype=F64),
                torch.randn(0, dtype=F64),
                torch.rand(0, dtype=F64),
            )
            expected = F.batch_norm(x, running_mean.clone(), running_var.clone(), training=training)
            output = bn.functional.batch_norm(x, running_mean.clone(), running_var.clone(), training=training)
            assert output.shape == expected.shape
            assert output.dtype == expected.dtype

        mode = "train" if training else "eval"
        _isolated("empty", f"BatchNorm2d-affine-0x3x2x2-{mode}", affine_empty)
        _isolated("empty", f"BatchNorm2d-channels_last-0x3x2x2-{mode}", channels_last_empty)
        _isolated("empty", f"generic-axis-last-0x5x3-{mode}", generic_axis_last_empty)
        _isolated("empty", f"functional-0x3x4-weight-bias-running-{mode}", functional_empty)
        _isolated("empty", f"opinfo-shape-(0,)-{mode}", opinfo_zero_size)


_register_empty_checks()


@pytest.mark.parametrize("name", list(_ISOLATED["empty"]))
def test_empty_batch_in_a_child_interpreter(name: str) -> None:
    _assert_isolated("empty", name)


# =========================================================================== isolated: strides and layouts


def _forward_backward(
    module: Any, x: Tensor, grad_output: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Output, input gradient, weight and bias gradients; ``x`` enters as a leaf with its own strides."""
    leaf = x.detach().requires_grad_(True)
    output = module(leaf)
    output.backward(grad_output)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return output.detach(), leaf.grad, None if weight is None else weight.grad, None if bias is None else bias.grad


def _register_stride_checks() -> None:
    for shape in ((4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)):

        def nhwc(shape: tuple[int, ...] = shape) -> None:
            """test_batchnorm_nhwc_cpu (float32): channels-last in, channels-last out, torch's values on contiguous."""
            ours, theirs = _pair("2d", shape[1], dtype=torch.float32)
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            grad_output = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            ours_result = _forward_backward(ours, x, grad_output)
            their_result = _forward_backward(theirs, x.contiguous(), grad_output.contiguous())
            assert ours_result[0].is_contiguous(memory_format=torch.channels_last)
            _assert_grads_close(ours_result, their_result, _tol(1e-5))

        _isolated("strides", f"nhwc-float32-{'x'.join(map(str, shape))}", nhwc)

    def non_contig() -> None:
        """test_batchnorm_non_contig_cpu: a permuted (channels-last) input in eval mode keeps its layout."""
        ours, theirs = _pair("2d", 2, dtype=torch.float32)
        _warm_up(ours, theirs, (4, 2, 3, 1), torch.float32)
        ours.eval()
        theirs.eval()
        x = torch.arange(6, dtype=torch.float32).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
        output = ours(x)
        assert output.is_contiguous(memory_format=torch.channels_last)
        assert_close(output, theirs(x.contiguous()))

    _isolated("strides", "non_contig-eval-permuted-1x2x3x1", non_contig)

    def nhwc_eval_bitwise() -> None:
        """test_batchnorm_nhwc_cuda: in eval mode, channels-last and contiguous inputs give equal outputs."""
        ours, theirs = _pair("2d", 64, dtype=torch.float32)
        _warm_up(ours, theirs, (2, 64, 5, 5), torch.float32)
        ours.eval()
        x = torch.randn(2, 64, 50, 50)
        assert torch.equal(ours(x), ours(x.contiguous(memory_format=torch.channels_last)))

    _isolated("strides", "nhwc-eval-equal-to-contiguous-2x64x50x50", nhwc_eval_bitwise)

    for case in NONEMPTY_MODULE_DB:
        for training in (True, False):
            mode = "train" if training else "eval"

            def noncontiguous(case: ModuleCase = case, training: bool = training) -> None:
                """test_non_contiguous_tensors: every (input, grad_output) contiguity pair gives the same results."""
                ours, theirs = case.build()
                _warm_up(ours, theirs, case.shape)
                x = make_tensor(case.shape, dtype=F64, device="cpu")
                grad_output = torch.randn(case.shape, dtype=F64)

                def spread(t: Tensor) -> Tensor:
                    return torch.repeat_interleave(t, 2, dim=-1)[..., ::2]

                expected = None
                for module in (theirs, ours):
                    module.train(training)
                    saved = copy.deepcopy(module.state_dict())
                    for x_in, g_in in (
                        (x, grad_output),
                        (spread(x), grad_output),
                        (x, spread(grad_output)),
                        (spread(x), spread(grad_output)),
                    ):
                        module.load_state_dict(saved)
                        for p in module.parameters():
                            p.grad = None
                        result = _forward_backward(module, x_in, g_in)
                        if expected is None:
                            expected = result
                        _assert_grads_close(result, expected)

            _isolated("strides", f"module_db-non_contiguous-{case.id}-{mode}", noncontiguous)

            if len(case.shape) in (4, 5):

                def memory_format(case: ModuleCase = case, training: bool = training) -> None:
                    """test_memory_format: channels-last input and module formats; output and grads follow the input."""
                    channels_last = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
                    ours, theirs = case.build()
                    _warm_up(ours, theirs, case.shape)
                    ours.train(training)
                    theirs.train(training)
                    x = make_tensor(case.shape, dtype=F64, device="cpu")
                    grad_output = torch.rand(case.shape, dtype=F64)
                    state = copy.deepcopy(theirs.state_dict())
                    expected = _forward_backward(theirs, x, grad_output)
                    for input_format in (torch.contiguous_format, channels_last):
                        for module_format in (torch.preserve_format, torch.contiguous_format, channels_last):
                            ours.load_state_dict(state)
                            ours.to(memory_format=module_format)
                            for p in ours.parameters():
                                p.grad = None
                            x_in = x.contiguous(memory_format=input_format)
                            result = _forward_backward(ours, x_in, grad_output.contiguous(memory_format=input_format))
                            _assert_grads_close(result, expected)
                            assert result[0].is_contiguous(memory_format=input_format), (
                                f"output layout, input {input_format}"
                            )
                            assert result[1] is not None
                            assert result[1].is_contiguous(memory_format=input_format)

                _isolated("strides", f"module_db-memory_format-{case.id}-{mode}", memory_format)

    for sample in OPINFO_SAMPLES:

        def noncontiguous_sample(sample: OpSample = sample) -> None:
            """OpInfo noncontiguous(): every tensor (running statistics too) strided, NaN in the gaps."""
            tensors = sample.tensors()
            results = []
            for op in (bn.functional.batch_norm, F.batch_norm):
                given = {name: None if t is None else _noncontiguous_like(t) for name, t in tensors.items()}
                for name in ("input", "weight", "bias"):
                    if given[name] is not None:
                        given[name].requires_grad_(True)  # type: ignore[union-attr]
                assert given["input"] is not None
                assert not given["input"].is_contiguous()
                output, running_mean, running_var = _run_sample(op, sample, given, clone_running=False)
                torch.autograd.backward(output, torch.ones_like(output))
                results.append(
                    [
                        output.detach(),
                        *_grads(given["input"], given["weight"], given["bias"]),
                        running_mean,
                        running_var,
                    ]
                )
            _assert_grads_close(results[0], results[1])

        _isolated("strides", f"opinfo-noncontiguous-{sample.id}", noncontiguous_sample)

    def expanded_batch() -> None:
        """A stride-0 batch axis (one image expanded to four), in training, gradients summed into the image."""
        ours, theirs = _pair("2d", 3)
        image = torch.randn(1, 3, 5, 5, dtype=F64)
        grad_output = torch.randn(4, 3, 5, 5, dtype=F64)
        results = []
        for module in (ours, theirs):
            leaf = _leaf(image)
            output = module(leaf.expand(4, 3, 5, 5))
            output.backward(grad_output)
            results.append([output.detach(), leaf.grad, *_grads(module.weight, module.bias)])
        _assert_grads_close(results[0], results[1])

    def expanded_eval() -> None:
        ours, theirs = _pair("2d", 3)
        _warm_up(ours, theirs, (4, 3, 2, 2))
        ours.eval()
        theirs.eval()
        x = torch.randn(1, 3, 1, 1, dtype=F64).expand(4, 3, 5, 5)
        _close(ours(x), theirs(x))

    def sliced(training: bool) -> Callable[[], None]:
        def check() -> None:
            ours, theirs = _pair("2d", 3)
            _warm_up(ours, theirs, (4, 3, 2, 2))
            base = torch.randn(5, 6, 6, 9, dtype=F64)
            for view in _ODD_VIEWS:
                ours.train(training)
                theirs.train(training)
                grad_output = torch.randn(view(base).shape, dtype=F64)
                results = []
                for module in (ours, theirs):
                    leaf = _leaf(base)
                    output = module(view(leaf))
                    output.backward(grad_output)
                    results.append([output.detach(), leaf.grad, *_grads(module.weight, module.bias)])
                _assert_grads_close(results[0], results[1])
                _assert_same_state(ours, theirs)

        return check

    def axis_last_transposed() -> None:
        ours = bn.BatchNorm(4, axis=-1).double()
        reference = nn.BatchNorm1d(4).double()
        ours.load_state_dict(reference.state_dict())
        base = torch.randn(3, 4, 7, dtype=F64)
        grad_output = torch.randn(3, 7, 4, dtype=F64)
        leaf = _leaf(base)
        output = ours(leaf.transpose(1, 2))
        output.backward(grad_output)
        reference_leaf = _leaf(base)
        expected = reference(reference_leaf).transpose(1, 2)
        expected.backward(grad_output)
        _assert_grads_close([output.detach(), leaf.grad], [expected.detach(), reference_leaf.grad])
        _assert_same_state(ours, reference)

    _isolated("strides", "odd-expanded-batch-train", expanded_batch)
    _isolated("strides", "odd-expanded-eval", expanded_eval)
    _isolated("strides", "odd-sliced-views-train", sliced(True))
    _isolated("strides", "odd-sliced-views-eval", sliced(False))
    _isolated("strides", "odd-generic-axis-last-transposed-train", axis_last_transposed)


# Views of a (5, 6, 6, 9) tensor with 3 channels: strided batch/channels/width, transposed, permuted and sliced.
_ODD_VIEWS: list[Callable[[Tensor], Tensor]] = [
    lambda t: t[1:, ::2, :, 1::2],
    lambda t: t.transpose(2, 3)[:, 1:4],
    lambda t: t[:, 2:5].permute(0, 1, 3, 2)[..., ::3],
]


def _noncontiguous_like(t: Tensor) -> Tensor:
    """PyTorch's ``noncontiguous_like``: the same values every other element, NaN in the gaps (never to be read)."""
    result = t.new_empty((*t.shape, 2))
    result[..., 0] = float("nan")
    result[..., 1] = t.detach()
    return result[..., 1]


_register_stride_checks()


@pytest.mark.parametrize("name", list(_ISOLATED["strides"]))
def test_strides_and_layouts_in_a_child_interpreter(name: str) -> None:
    _assert_isolated("strides", name)


# =========================================================================== isolated: half precision


def _register_half_checks() -> None:
    for dtype, mixed in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)):
        label = f"{str(dtype).split('.')[-1]}{'-float32-module' if mixed else ''}"
        for shape in ((4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)):

            def nhwc(shape: tuple[int, ...] = shape, dtype: torch.dtype = dtype, mixed: bool = mixed) -> None:
                """test_batchnorm_nhwc_cpu in low precision (mixed: float32 parameters and buffers).

                The reference is torch's layer in float64 on the same values and state.
                """
                module_dtype = torch.float32 if mixed else dtype
                ours, theirs = _pair("2d", shape[1], dtype=module_dtype)
                theirs.double()
                x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
                grad_output = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
                ours_result = _forward_backward(ours, x, grad_output)
                their_result = _forward_backward(theirs, x.double().contiguous(), grad_output.double().contiguous())
                assert ours_result[0].dtype == dtype
                assert ours_result[0].is_contiguous(memory_format=torch.channels_last)
                _assert_grads_close(_upcast(ours_result), their_result, LOW_PRECISION_TOLERANCE[dtype])
                _assert_same_state(ours, theirs, LOW_PRECISION_TOLERANCE[module_dtype], upcast=True)

            _isolated("half", f"nhwc-{label}-{'x'.join(map(str, shape))}", nhwc)

    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).split(".")[-1]

        def simple_average(dtype: torch.dtype = dtype) -> None:
            """test_batchnorm_simple_average with a low-precision input and a float32 module."""
            ours, theirs = _pair("1d", 3, momentum=None, dtype=torch.float32)
            batches = [torch.rand(4, 3).to(dtype) for _ in range(2)]
            for data in batches:
                _close(ours(data), theirs(data), LOW_PRECISION_TOLERANCE[dtype])
            assert ours.running_mean.dtype == torch.float32
            _assert_same_state(ours, theirs, _tol(1e-3))

        def eval_mixed(dtype: torch.dtype = dtype) -> None:
            """test_batchnorm_eval with a low-precision input and a float32 module (ndim 2 and 3)."""
            for ndim in (2, 3):
                ours, theirs = _pair("1d", 3, dtype=torch.float32)
                _warm_up(ours, theirs, (6, 3), torch.float32)
                ours.eval()
                theirs.eval()
                data = torch.rand([3] * ndim).to(dtype)
                grad_output = torch.rand([3] * ndim).to(dtype)
                first = _forward_backward(ours, data, grad_output)
                ours.weight.grad = ours.bias.grad = None
                second = _forward_backward(ours, data, grad_output)
                assert torch.equal(first[0], second[0])
                assert first[1] is not None
                assert second[1] is not None
                assert torch.equal(first[1], second[1])
                expected = _forward_backward(theirs, data, grad_output)
                assert first[0].dtype == dtype
                _assert_grads_close(first[:2], expected[:2], LOW_PRECISION_TOLERANCE[dtype])

        def affine_mixed(dtype: torch.dtype = dtype) -> None:
            """test_batchnorm_affine with a low-precision input and float32 modules."""
            plain = bn.BatchNorm1d(3, affine=False)
            affine = bn.BatchNorm1d(3)
            reference = nn.BatchNorm1d(3, affine=False)
            data = torch.rand(3, 3, 3).to(dtype)
            grad_output = torch.ones_like(data)
            results = [_forward_backward(m, data, grad_output)[:2] for m in (affine, plain, reference)]
            _assert_grads_close(results[0], results[1], LOW_PRECISION_TOLERANCE[dtype])
            _assert_grads_close(results[1], results[2], LOW_PRECISION_TOLERANCE[dtype])

        def nonaffine_input(dtype: torch.dtype = dtype) -> None:
            """test_batchnorm_nonaffine_cuda_half_input: float32 buffers, low-precision input and output, both modes."""
            ours, theirs = _pair("2d", 3, affine=False, dtype=torch.float32)
            data = torch.randn(16, 3, 24, 24).to(dtype)
            for training in (True, False):
                ours.train(training)
                theirs.train(training)
                output = ours(data)
                assert output.dtype == dtype
                _close(output, theirs(data), LOW_PRECISION_TOLERANCE[dtype])
            _assert_same_state(ours, theirs, _tol(1e-4))

        def low_precision_module(dtype: torch.dtype = dtype) -> None:
            """The whole layer in low precision (``.half()``/``.bfloat16()``), training then eval, with backward."""
            ours, theirs = _pair("2d", 3, dtype=dtype)
            data = torch.randn(8, 3, 5, 5).to(dtype)
            grad_output = torch.randn(8, 3, 5, 5).to(dtype)
            for training in (True, False):
                ours.train(training)
                theirs.train(training)
                for p in [*ours.parameters(), *theirs.parameters()]:
                    p.grad = None
                ours_result = _forward_backward(ours, data, grad_output)
                their_result = _forward_backward(theirs, data, grad_output)
                assert ours_result[0].dtype == dtype
                assert ours.weight.grad is not None
                assert ours.weight.grad.dtype == dtype
                _assert_grads_close(ours_result, their_result, _tol(5e-2))
            _assert_same_state(ours, theirs, _tol(1e-2))

        _isolated("half", f"simple_average-{name}-float32-module", simple_average)
        _isolated("half", f"eval-{name}-float32-module", eval_mixed)
        _isolated("half", f"affine-{name}-float32-module", affine_mixed)
        _isolated("half", f"nonaffine-{name}-input-float32-module", nonaffine_input)
        _isolated("half", f"{name}-module-and-input", low_precision_module)

    def half_overflow() -> None:
        """test_batchnorm_half_overflow: float16 values whose squares overflow float16; finite, float64-exact result."""
        ours: Any = bn.BatchNorm2d(3)
        data = (torch.randn(8, 3, 6, 6) * 300 + 1000).half()
        assert torch.isfinite(data).all()
        assert (data.float() ** 2).max() > torch.finfo(torch.float16).max
        reference_mean, reference_var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
        expected = F.batch_norm(data.double(), reference_mean, reference_var, torch.ones(3, dtype=F64), None, True)
        output = ours(data)
        assert output.dtype == torch.float16
        assert torch.isfinite(output).all()
        assert_close(output.double(), expected, rtol=0, atol=4e-3)
        assert_close(ours.running_mean.double(), reference_mean, rtol=1e-5, atol=1e-3)
        assert_close(ours.running_var.double(), reference_var, rtol=1e-5, atol=1e-2)
        ours.eval()
        assert torch.isfinite(ours(data)).all()

    _isolated("half", "half_overflow-float16-input-float32-module", half_overflow)


_register_half_checks()


@pytest.mark.parametrize("name", list(_ISOLATED["half"]))
def test_half_precision_in_a_child_interpreter(name: str) -> None:
    _assert_isolated("half", name)


# =========================================================================== DDP wrapping


_DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
import batchnorm as bn
rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.set_num_threads(1)
torch.manual_seed(0)
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2),
    ).double()
results = []
for broadcast in (True, False):
    for convert in (False, True):
        net = model()
        if convert:
            net = bn.convert(net)
        ddp = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=broadcast)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randn(5, 3, 8, 8, generator=generator, dtype=torch.float64)
            optimizer.zero_grad()
            ddp(x).square().mean().backward()
            optimizer.step()
        state = [t.detach().flatten() for t in [*net.parameters(), *net.buffers()] if t.is_floating_point()]
        results.append(torch.cat(state))
for theirs, ours in ((results[0], results[1]), (results[2], results[3])):
    assert torch.allclose(theirs, ours, rtol=1e-10, atol=1e-12), (theirs - ours).abs().max()
dist.destroy_process_group()
print("ok")
"""


def test_ddp_wrapping_of_a_converted_model_trains_like_torchs() -> None:
    """DDP (gloo, 2 processes) around a converted conv-BN-ReLU model: parameters and buffers after three steps
    equal those of the same model with torch's layers, with ``broadcast_buffers`` on and off."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_SCRIPT, str(rank), "2", port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        assert out.strip().endswith("ok")
