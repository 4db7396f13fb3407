"""``batchnorm.nn.sync``: synchronized BN in 2-3 real processes over gloo on loopback.

The reference is independent of the code under test: torch's own
``BatchNorm1d/2d`` (float64) run by *one* process on the concatenation of
every rank's slice. Outputs and input gradients concatenate, weight and bias
gradients add up over ranks (what DDP reduces), running statistics are equal
on every rank, all within 1e-10.

Workers are forked from a fork server that imports torch once (:func:`launch`);
every launch runs under a deadline and kills what is left, so no test can hang.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

DEADLINE_S = 90.0  # a launch that takes longer is a hang: killed, and the test fails
TOLERANCE = {"atol": 1e-10, "rtol": 1e-10}
EPS = 1e-5
WORLD = 3


# --- launching workers ------------------------------------------------------------------


def _context() -> Any:
    """Workers forked from a fork server that imported torch and batchnorm once (fresh, single-threaded)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")  # slower (each worker imports torch), same results
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "batchnorm"])
    return context


def _child(mode: str, rank: int, world: int, store: str, directory: str) -> None:
    """A worker process: run :func:`_worker`; a failure leaves its traceback in ``DIR/error-RANK.txt``."""
    try:
        _worker(mode, rank, world, store, directory)
    except BaseException:
        (Path(directory) / f"error-{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)


def launch(directory: Path, mode: str, world: int, *, wait_for: tuple[int, ...] | None = None) -> dict[int, int | None]:
    """Start ``world`` worker processes; wait (under :data:`DEADLINE_S`) for ranks ``wait_for`` (default all).

    Returns ``{rank: exit code, or None if it had to be killed}``; every process still running is killed.
    """
    store = directory / f"store-{mode}"
    context = _context()
    processes = [
        context.Process(target=_child, args=(mode, rank, world, str(store), str(directory)), daemon=True)
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    results: dict[int, int | None] = {}
    deadline = time.monotonic() + DEADLINE_S
    try:
        for rank in wait_for if wait_for is not None else range(world):
            processes[rank].join(timeout=max(deadline - time.monotonic(), 0.1))
            results[rank] = processes[rank].exitcode
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
    return results


def _check_exits(results: dict[int, int | None], directory: Path) -> None:
    for rank, code in results.items():
        error = directory / f"error-{rank}.txt"
        details = error.read_text() if error.exists() else ""
        assert code is not None, f"rank {rank} hung (killed after {DEADLINE_S:.0f} s)"
        assert code == 0, f"rank {rank} exited with {code}:\n{details}"


# --- the cases and their single-process reference -------------------------------------------


def _layer_case(
    generator: torch.Generator,
    shape: Callable[[int], tuple[int, ...]],
    splits: list[int],
    *,
    axis: int = 1,
    steps: int = 2,
    momentum: float | None = 0.1,
    affine: bool = True,
    track: bool = True,
    nonfinite: str = "raise",
    channels_last: bool = False,
) -> dict[str, Any]:
    total = sum(splits)
    channels = shape(max(total, 1))[axis]
    return {
        "x": [torch.randn(*shape(total), generator=generator, dtype=torch.float64) * 3 + 2 for _ in range(steps)],
        "dy": [torch.randn(*shape(total), generator=generator, dtype=torch.float64) for _ in range(steps)],
        "weight": torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5,
        "bias": torch.randn(channels, generator=generator, dtype=torch.float64),
        "splits": splits,
        "axis": axis,
        "momentum": momentum,
        "affine": affine,
        "track": track,
        "nonfinite": nonfinite,
        "channels_last": channels_last,
    }


def _cases() -> dict[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(20240611)
    dense: Callable[[int], tuple[int, ...]] = lambda n: (n, 6)  # noqa: E731
    nchw: Callable[[int], tuple[int, ...]] = lambda n: (n, 4, 3, 5)  # noqa: E731
    sequence: Callable[[int], tuple[int, ...]] = lambda n: (n, 7, 5)  # noqa: E731
    cases = {
        "dense uneven 3+5+2": _layer_case(g, dense, [3, 5, 2]),
        "dense empty rank 3+0+5": _layer_case(g, dense, [3, 0, 5]),
        "dense one row on a rank 1+4+2": _layer_case(g, dense, [1, 4, 2]),
        "nchw 2+1+3": _layer_case(g, nchw, [2, 1, 3]),
        "nchw channels-last 2+3+1": _layer_case(g, nchw, [2, 3, 1], channels_last=True),
        "sequence axis=-1 3+5+0": _layer_case(g, sequence, [3, 5, 0], axis=-1),
        "cumulative momentum=None": _layer_case(g, dense, [2, 3, 4], momentum=None, steps=3),
        "no running statistics": _layer_case(g, nchw, [2, 2, 1], track=False),
        "no affine": _layer_case(g, dense, [4, 1, 3], affine=False),
    }
    for policy in ("raise", "skip"):
        case = _layer_case(g, dense, [3, 4, 2], nonfinite=policy)
        case["x"][1][4, 2] = float("nan")  # a NaN in rank 1's slice of the second batch
        cases[f"nonfinite {policy}"] = case
    cases["one value per feature in the global batch"] = _layer_case(g, dense, [0, 1, 0], steps=1)
    cases["every rank empty"] = _layer_case(g, dense, [0, 0, 0])
    return cases


CASES = _cases()
EQUAL_CASES = [name for name in CASES if not name.startswith(("nonfinite", "one value"))]


def _torch_layer(case: dict[str, Any], x: Tensor) -> nn.Module:
    """torch's own layer for the case, with the feature axis moved to 1."""
    moved = x.movedim(case["axis"], 1)
    kind = nn.BatchNorm2d if moved.dim() == 4 else nn.BatchNorm1d
    layer = kind(moved.shape[1], EPS, case["momentum"], case["affine"], case["track"], dtype=torch.float64)
    if case["affine"]:
        with torch.no_grad():
            layer.weight.copy_(case["weight"])
            layer.bias.copy_(case["bias"])
    return layer


def reference(case: dict[str, Any], steps: int | None = None) -> dict[str, Any]:
    """One process, torch's layer on the whole batch of each step: outputs, gradients, buffers, eval output."""
    xs = case["x"][:steps] if steps is not None else case["x"]
    layer = _torch_layer(case, xs[0])
    axis = case["axis"]
    result: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": []}
    for x, dy in zip(xs, case["dy"]):
        layer.zero_grad()
        inp = x.movedim(axis, 1).clone().requires_grad_()
        y = layer(inp)
        (y * dy.movedim(axis, 1)).sum().backward()
        result["y"].append(y.detach().movedim(1, axis))
        result["dx"].append(inp.grad.movedim(1, axis))  # type: ignore[union-attr]
        if case["affine"]:
            result["dw"].append(layer.weight.grad.clone())  # type: ignore[union-attr]
            result["db"].append(layer.bias.grad.clone())  # type: ignore[union-attr]
    result["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    with torch.no_grad():
        result["eval_y"] = layer(xs[-1].movedim(axis, 1)).movedim(1, axis)
    return result


class DDPNet(nn.Sequential):
    """A small BN CNN: two conv + BN + ReLU blocks, pooled, a linear head."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 5, 3, bias=False),
            nn.BatchNorm2d(5),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(5, 2),
        )


DDP_SPLITS = [3, 5, 2]
DDP_STEPS = 3
DDP_LR = 0.1


def _ddp_data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(3)
    model = DDPNet().double()
    total = sum(DDP_SPLITS)
    return {
        "state": model.state_dict(),
        "x": [torch.randn(total, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(DDP_STEPS)],
        "target": [torch.randn(total, 2, generator=g, dtype=torch.float64) for _ in range(DDP_STEPS)],
    }


def _ddp_reference(data: dict[str, Any]) -> dict[str, Tensor]:
    """One process, torch's BatchNorm2d, the whole batch, loss = mean squared error over the global batch."""
    model = DDPNet().double()
    model.load_state_dict(data["state"])
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    for x, target in zip(data["x"], data["target"]):
        optimizer.zero_grad()
        loss = ((model(x) - target) ** 2).sum() / x.shape[0]
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the worker (runs in each spawned process) ------------------------------------------------

_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)


@contextmanager
def counting_collectives() -> Iterator[list[str]]:
    """Count every ``torch.distributed`` collective called through the module (an independent count)."""
    import torch.distributed as dist

    calls: list[str] = []
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return function(*args, **kwargs)

        return counted

    for name, function in saved.items():
        setattr(dist, name, wrap(name, function))
    try:
        yield calls
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)


def _run_layer_case(case: dict[str, Any], rank: int) -> dict[str, Any]:
    import batchnorm as bn

    axis = case["axis"]
    x0 = case["x"][0]
    layer = bn.SyncBatchNorm(
        x0.shape[axis], EPS, case["momentum"], case["affine"], case["track"], axis=axis, nonfinite=case["nonfinite"]
    ).double()
    if case["affine"]:
        with torch.no_grad():
            layer.weight.copy_(case["weight"])
            layer.bias.copy_(case["bias"])
    out: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": [], "forward_calls": [], "backward_calls": []}
    out["error"] = None
    for step, (x, dy) in enumerate(zip(case["x"], case["dy"])):
        local = x.split(case["splits"])[rank].clone()
        local_dy = dy.split(case["splits"])[rank]
        if case["channels_last"]:
            local = local.contiguous(memory_format=torch.channels_last)
        local.requires_grad_()
        layer.zero_grad()
        try:
            with counting_collectives() as forward_calls:
                y = layer(local)
            with counting_collectives() as backward_calls:
                (y * local_dy).sum().backward()
        except Exception as error:  # recorded for the test to check (every rank must agree)
            out["error"] = {"step": step, "type": type(error).__name__, "message": str(error)}
            break
        out["y"].append(y.detach())
        out["dx"].append(local.grad)
        out["channels_last_kept"] = bool(y.is_contiguous(memory_format=torch.channels_last))
        if case["affine"]:
            out["dw"].append(layer.weight.grad.clone())
            out["db"].append(layer.bias.grad.clone())
        out["forward_calls"].append(len(forward_calls))
        out["backward_calls"].append(len(backward_calls))
    out["counter"] = [layer.collectives.calls, layer.collectives.forward, layer.collectives.backward]
    out["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    if out["error"] is None:
        layer.eval()
        local = case["x"][-1].split(case["splits"])[rank]
        with counting_collectives() as eval_calls, torch.no_grad():
            out["eval_y"] = layer(local)
        out["eval_calls"] = len(eval_calls)
    return out


def _run_ddp(data: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    import batchnorm as bn

    total = sum(DDP_SPLITS)
    out: dict[str, Any] = {}
    for broadcast in (True, False):
        model = DDPNet().double()
        model.load_state_dict(data["state"])
        model = bn.convert_sync(model)
        assert sum(isinstance(m, bn.SyncBatchNorm) for m in model.modules()) == 2
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
        for x, target in zip(data["x"], data["target"]):
            optimizer.zero_grad()
            local, local_target = x.split(DDP_SPLITS)[rank], target.split(DDP_SPLITS)[rank]
            # DDP averages gradients over ranks: scale so that the average is the global batch's mean loss.
            loss = ((ddp(local) - local_target) ** 2).sum() * world / total
            loss.backward()
            optimizer.step()
        out[f"broadcast_buffers={broadcast}"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _worker(mode: str, rank: int, world: int, store: str, directory: str) -> None:
    import torch.distributed as dist

    import batchnorm as bn

    torch.set_num_threads(1)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the hostname resolves to
    folder = Path(directory)
    group_timeout = datetime.timedelta(seconds=2 if mode == "absent, group timeout" else 30)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=group_timeout)
    if mode == "main":
        cases = torch.load(folder / "cases.pt", weights_only=True)
        results = {name: _run_layer_case(case, rank) for name, case in cases.items()}
        results["ddp"] = _run_ddp(torch.load(folder / "ddp.pt", weights_only=True), rank, world)
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        y = bn.SyncBatchNorm(3).double()(x)
        try:  # refused on every rank before any collective, so nobody waits
            torch.autograd.grad((y**2).sum(), x, create_graph=True)
            results["double backward"] = ""
        except RuntimeError as error:
            results["double backward"] = str(error)
        torch.save(results, folder / f"rank{rank}.pt")
        dist.destroy_process_group()
        return
    # Faults: rank 0 survives and reports; rank 1 dies or never arrives.
    timeout = 1.5 if mode == "absent, layer timeout" else None
    layer = bn.SyncBatchNorm(3, timeout=timeout)
    x = torch.randn(4, 3, requires_grad=True)
    if rank == 1:
        if mode == "dies before forward":
            os._exit(1)
        if mode.startswith("absent"):
            time.sleep(3600)  # alive, never arrives (the test kills it)
        layer(x)  # "dies before backward": takes part in the forward only
        os._exit(1)
    started = time.monotonic()
    try:
        layer(x).sum().backward()
        report = {"error": None}
    except Exception as error:
        runtime = isinstance(error, RuntimeError)
        report = {"error": type(error).__name__, "message": str(error), "is_runtime_error": runtime}
    report["seconds"] = time.monotonic() - started
    (folder / "survivor.json").write_text(json.dumps(report))
    os._exit(0)  # skip the process group's teardown, which waits for the dead peer


# --- the tests --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """One launch of 3 processes running every case; their results by rank."""
    directory = tmp_path_factory.mktemp("sync")
    torch.save(CASES, directory / "cases.pt")
    torch.save(_ddp_data(), directory / "ddp.pt")
    _check_exits(launch(directory, "main", WORLD), directory)
    return {rank: torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)}


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("name", EQUAL_CASES)
def test_equals_one_process_on_the_concatenated_batch(name: str, distributed: dict[int, dict[str, Any]]) -> None:
    case, expected = CASES[name], reference(CASES[name])
    ranks = [distributed[rank][name] for rank in range(WORLD)]
    assert all(r["error"] is None for r in ranks), [r["error"] for r in ranks]
    for step in range(len(case["x"])):
        _assert_close(torch.cat([r["y"][step] for r in ranks]), expected["y"][step])
        _assert_close(torch.cat([r["dx"][step] for r in ranks]), expected["dx"][step])
        if case["affine"]:  # local gradients; DDP's all-reduce adds them up
            _assert_close(sum(r["dw"][step] for r in ranks), expected["dw"][step])
            _assert_close(sum(r["db"][step] for r in ranks), expected["db"][step])
    for rank, r in enumerate(ranks):
        assert r["state"].keys() == expected["state"].keys()
        for key, value in expected["state"].items():
            _assert_close(r["state"][key], value)
        local = case["x"][-1].split(case["splits"])[rank]
        if case["track"]:  # eval: the running statistics, the same on every rank
            _assert_close(r["eval_y"], expected["eval_y"].split(case["splits"])[rank])
        else:  # eval without running statistics: this rank's batch statistics, unsynchronized (as torch)
            with torch.no_grad():
                moved = _torch_layer(case, local).eval()(local.movedim(case["axis"], 1))
            _assert_close(r["eval_y"], moved.movedim(1, case["axis"]))
    if case["channels_last"]:
        assert all(r["channels_last_kept"] for r in ranks if "channels_last_kept" in r)


@pytest.mark.parametrize("name", EQUAL_CASES)
def test_one_collective_forward_one_backward_none_in_eval(name: str, distributed: dict[int, dict[str, Any]]) -> None:
    steps = len(CASES[name]["x"])
    for rank in range(WORLD):
        result = distributed[rank][name]
        assert result["forward_calls"] == [1] * steps  # counted on torch.distributed itself
        assert result["backward_calls"] == [1] * steps
        assert result["eval_calls"] == 0
        assert result["counter"] == [steps, steps, steps]  # the layer's own count agrees


def test_an_empty_rank_returns_an_empty_output(distributed: dict[int, dict[str, Any]]) -> None:
    result = distributed[1]["dense empty rank 3+0+5"]
    assert result["y"][0].shape == (0, 6)
    assert result["dx"][0].shape == (0, 6)
    assert torch.equal(result["dw"][0], torch.zeros(6, dtype=torch.float64))  # a gradient DDP can reduce


def test_every_rank_empty_counts_the_batch_and_leaves_the_statistics(distributed: dict[int, dict[str, Any]]) -> None:
    for rank in range(WORLD):
        state = distributed[rank]["every rank empty"]["state"]
        assert int(state["num_batches_tracked"]) == 2
        assert torch.equal(state["running_mean"], torch.zeros(6, dtype=torch.float64))
        assert torch.equal(state["running_var"], torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nonfinite_batch_on_one_rank_is_kept_out_of_every_rank_s_statistics(
    policy: str, distributed: dict[int, dict[str, Any]]
) -> None:
    name = f"nonfinite {policy}"
    first = reference(CASES[name], steps=1)["state"]
    for rank in range(WORLD):
        result = distributed[rank][name]
        if policy == "raise":
            assert result["error"] is not None
            assert result["error"]["type"] == "NonfiniteBatchError"
            assert result["error"]["step"] == 1
        else:
            assert result["error"] is None
            assert torch.isnan(torch.cat([distributed[r][name]["y"][1] for r in range(WORLD)])).any()
        for key, value in first.items():  # the buffers after the first (finite) batch, on every rank
            _assert_close(result["state"][key], value)


def test_one_value_per_feature_in_the_global_batch_raises_on_every_rank(
    distributed: dict[int, dict[str, Any]],
) -> None:
    for rank in range(WORLD):
        error = distributed[rank]["one value per feature in the global batch"]["error"]
        assert error is not None
        assert error["type"] == "BatchNormArgumentError"
        assert "more than 1 value per feature" in error["message"]


def test_ddp_with_and_without_broadcast_buffers_equals_one_process(distributed: dict[int, dict[str, Any]]) -> None:
    expected = _ddp_reference(_ddp_data())
    for rank in range(WORLD):
        for setting in ("broadcast_buffers=True", "broadcast_buffers=False"):
            state = distributed[rank]["ddp"][setting]
            assert state.keys() == expected.keys()
            for key, value in expected.items():
                _assert_close(state[key], value)


def test_double_backward_is_refused_on_every_rank(distributed: dict[int, dict[str, Any]]) -> None:
    for rank in range(WORLD):
        assert "does not support double backward" in distributed[rank]["double backward"]


@pytest.mark.parametrize(
    ("mode", "mentions"),
    [
        ("dies before forward", "forward all_gather"),
        ("dies before backward", "backward all_reduce"),
        ("absent, layer timeout", "within 1.5 s"),
        ("absent, group timeout", "init_process_group(timeout=...)"),
    ],
)
def test_a_rank_that_dies_or_never_arrives_makes_the_others_raise(mode: str, mentions: str, tmp_path: Path) -> None:
    _check_exits(launch(tmp_path, mode, 2, wait_for=(0,)), tmp_path)
    report = json.loads((tmp_path / "survivor.json").read_text())
    assert report["error"] == "SyncBatchNormError", report
    assert report["is_runtime_error"]
    assert "on rank 0" in report["message"]
    assert "2 processes" in report["message"]
    assert mentions in report["message"]


# --- in one process -----------------------------------------------------------------------


def test_outside_a_process_group_it_is_batchnorm() -> None:
    import torch.distributed as dist

    import batchnorm as bn

    assert not dist.is_initialized()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    dy = torch.randn_like(x)
    outputs = []
    for kind in (bn.BatchNorm, bn.SyncBatchNorm):
        layer = kind(4).double()
        inp = x.clone().requires_grad_()
        y = layer(inp)
        (y * dy).sum().backward()
        layer.eval()
        outputs.append((y, inp.grad, layer.weight.grad, layer.bias.grad, *layer.state_dict().values(), layer(x)))
        if isinstance(layer, bn.SyncBatchNorm):
            assert layer.collectives.calls == 0
    for ours, plain in zip(*outputs):
        assert torch.equal(ours, plain)


@pytest.mark.parametrize("training", [True, False])
def test_the_functional_form_outside_a_group_is_torch_s_batch_norm(training: bool) -> None:
    from batchnorm.nn.sync import sync_batch_norm

    x = torch.randn(5, 7, 3, dtype=torch.float64)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    ours = (mean.clone(), var.clone())
    theirs = (mean.clone(), var.clone())
    y = sync_batch_norm(x, *ours, training=training, momentum=0.3, axis=-1)
    expected = nn.functional.batch_norm(x.movedim(-1, 1), *theirs, training=training, momentum=0.3).movedim(1, -1)
    _assert_close(y, expected)
    _assert_close(ours[0], theirs[0])
    _assert_close(ours[1], theirs[1])


def test_a_group_of_one_is_batchnorm(tmp_path: Path) -> None:
    import torch.distributed as dist

    import batchnorm as bn

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        x = torch.randn(5, 3, dtype=torch.float64)
        ours, plain = bn.SyncBatchNorm(3).double(), bn.BatchNorm(3).double()
        with counting_collectives() as calls:
            assert torch.equal(ours(x), plain(x))
        assert calls == []
        assert torch.equal(ours.running_var, plain.running_var)
    finally:
        dist.destroy_process_group()


def test_convert_sync_shares_parameters_and_buffers() -> None:
    import batchnorm as bn

    ghost = bn.GhostBatchNorm(3, virtual_batch_size=2)
    model = nn.Sequential(
        nn.BatchNorm2d(3),
        nn.SyncBatchNorm(3),
        bn.BatchNorm(3, axis=-1, nonfinite="skip"),
        bn.BatchNorm1d(3, affine=False),
        nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)),
        ghost,
    ).eval()
    originals = [model[0], model[1], model[2], model[3], model[4][0]]
    before = [(list(m.parameters()), list(m.buffers()), m.state_dict()) for m in originals]
    converted = bn.convert_sync(model)
    assert converted is model
    layers = [model[0], model[1], model[2], model[3], model[4][0]]
    for layer, (parameters, buffers, state) in zip(layers, before):
        assert type(layer) is bn.SyncBatchNorm
        assert not layer.training
        assert all(a is b for a, b in zip(layer.parameters(), parameters))
        assert all(a is b for a, b in zip(layer.buffers(), buffers))
        assert layer.state_dict().keys() == state.keys()
    assert model[2].axis == -1
    assert model[2].nonfinite == "skip"
    assert model[3].weight is None
    assert model[4][0].running_mean is None
    assert model[5] is ghost  # a variant keeps its own statistics
    single = bn.convert_sync(nn.BatchNorm3d(2), timeout=5.0)
    assert isinstance(single, bn.SyncBatchNorm)
    assert single.timeout == 5.0
    assert bn.convert_sync(single) is single


def test_it_is_a_batch_norm_but_not_torch_s_sync_layer() -> None:
    import batchnorm as bn

    layer = bn.SyncBatchNorm(3)
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(layer, nn.SyncBatchNorm)  # DDP refuses torch's SyncBatchNorm on the CPU
    assert list(layer.state_dict()) == list(nn.BatchNorm1d(3).state_dict())


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), "5", True, datetime.timedelta(0)])
def test_a_bad_timeout_is_refused(timeout: Any) -> None:
    import batchnorm as bn

    with pytest.raises(ValueError, match="timeout"):
        bn.SyncBatchNorm(3, timeout=timeout)


def test_a_process_group_passed_as_axis_is_explained(tmp_path: Path) -> None:
    import torch.distributed as dist

    import batchnorm as bn

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="by keyword"):
            bn.SyncBatchNorm(3, 1e-5, 0.1, True, True, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
