"""CUDA behaviour of the op and layers: no host synchronization, CUDA-graph capture and replay.

Every test here needs a CUDA device and skips without one (``benchmarks/gpu.sh`` runs them on a GPU).
"""

from __future__ import annotations

import pytest
import torch

import batchnorm as bn
from batchnorm import kernels
from batchnorm.functional import batch_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [
    ("nchw", (8, 16, 10, 10), 1, False),
    ("channels-last", (8, 16, 10, 10), 1, True),
    ("sequence", (4, 12, 24), -1, False),
    ("dense", (32, 40), 1, False),
]


def _input(shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, device="cuda", dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "shape", "axis", "channels_last"), CASES, ids=[c[0] for c in CASES])
def test_training_and_eval_never_synchronize(
    name: str, shape: tuple[int, ...], axis: int, channels_last: bool, dtype: torch.dtype
) -> None:
    """torch.cuda.set_sync_debug_mode('error') raises on any host synchronization."""
    features = shape[axis]
    x = _input(shape, channels_last, dtype).requires_grad_()
    weight = torch.ones(features, device="cuda", requires_grad=True)
    bias = torch.zeros(features, device="cuda", requires_grad=True)
    running = (torch.zeros(features, device="cuda"), torch.ones(features, device="cuda"))
    counter = torch.zeros((), dtype=torch.long, device="cuda")
    grad_output = torch.randn_like(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = batch_norm(x, *running, weight, bias, True, 0.1, 1e-5, axis, num_batches_tracked=counter)
        torch.autograd.grad(y, (x, weight, bias), grad_output)
        y = batch_norm(x, *running, weight, bias, False, 0.1, 1e-5, axis)
        torch.autograd.grad(y, (x, weight, bias), grad_output)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counter.item() == 1


def test_a_nonfinite_batch_is_skipped_on_the_device() -> None:
    """On CUDA a NaN batch leaves the running statistics and the counter as they were, without a sync, and
    check_nonfinite() reports it afterwards."""
    layer = bn.BatchNorm1d(3).cuda()
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(8, 3, device="cuda")
    x[0, 1] = float("nan")
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(layer.running_mean, before[0])
    assert torch.equal(layer.running_var, before[1])
    assert layer.num_batches_tracked.item() == 0
    with pytest.raises(bn.NonfiniteBatchError, match="1 on cuda"):
        bn.check_nonfinite()
    bn.check_nonfinite()  # reset


def test_plans_on_cuda_never_read_the_device() -> None:
    x = torch.randn(4, 3, 5, 5, device="cuda")
    for training in (True, False):
        assert not kernels.plan(x, training).host_checks


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(8, 4, 3, padding=1, bias=False),
        bn.BatchNorm2d(4),
    ).cuda()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_cuda_graph_capture_and_replay_equal_eager(channels_last: bool) -> None:
    """A training step (forward, backward, SGD) captured in a CUDA graph, replayed: equal to eager steps."""
    torch.manual_seed(0)
    eager, graphed = _model(), _model()
    graphed.load_state_dict(eager.state_dict())
    if channels_last:
        eager, graphed = eager.to(memory_format=torch.channels_last), graphed.to(memory_format=torch.channels_last)
    batches = [_input((6, 3, 12, 12), channels_last, torch.float32) for _ in range(3)]

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        return loss

    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    graph_opt = torch.optim.SGD(graphed.parameters(), lr=0.1)
    static_x = batches[0].clone()
    # warm-up on a side stream, as torch.cuda.graphs requires
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warm = _model()
    warm.load_state_dict(graphed.state_dict())
    with torch.cuda.stream(side):
        step(warm, torch.optim.SGD(warm.parameters(), lr=0.0), static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph_opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = step(graphed, graph_opt, static_x)
    # capture ran nothing: replay every batch, comparing with eager steps
    for x in batches:
        static_x.copy_(x)
        graph.replay()
        expected = step(eager, eager_opt, x)
        torch.testing.assert_close(static_loss, expected)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(graphed.state_dict()[name], value, msg=name)


def test_compile_reduce_overhead_trains_like_eager() -> None:
    """torch.compile(mode="reduce-overhead") (CUDA graphs where Inductor can use them): the same losses,
    parameters and running statistics as eager over a few SGD steps."""
    import copy

    torch.manual_seed(0)
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, mode="reduce-overhead")
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    for _ in range(4):
        x = torch.randn(6, 3, 12, 12, device="cuda")
        losses = []
        for model, optimizer in ((eager, eager_opt), (compiled, compiled_opt)):
            optimizer.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().clone())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
