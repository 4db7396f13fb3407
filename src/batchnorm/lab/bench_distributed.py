r"""``batchnorm bench --distributed``: what synchronizing batch norm costs per training step.

Starts ``processes`` (default 2) worker processes on this machine, joined in
a gloo process group on loopback, and times SGD training steps of the small
BN CNN of :func:`batchnorm.lab.bench.small_cnn` (two BN layers) under
``DistributedDataParallel`` with a global batch split evenly across them:

``local BN (ours)``
    :class:`batchnorm.BatchNorm2d`: each process normalizes its own slice,
    no BN communication (DDP still all-reduces the gradients);
``SyncBatchNorm (ours)``
    :class:`batchnorm.SyncBatchNorm` (:func:`batchnorm.convert_sync`): one
    all-gather per BN layer forward, one all-reduce backward;
``torch SyncBatchNorm``
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, where it runs: on the
    CPU, DDP refuses it (``SyncBatchNorm layers only work with GPU
    modules``) and its forward raises (``expected input tensor to be on GPU``),
    so it is reported as not runnable with torch's message.

Each repeat runs every variant for ``steps`` steps in turn (the order
alternates between repeats, all processes in lockstep behind a barrier); a
block's time is the slowest process's, and the reported figure is the median
over repeats, in milliseconds per step. The number of collectives per
synchronized BN call is read from the layers' :attr:`~batchnorm.SyncBatchNorm.collectives`.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistributedOptions", "VARIANTS", "cpu_name", "run", "worker"]

VARIANTS = ("local BN (ours)", "SyncBatchNorm (ours)", "torch SyncBatchNorm")


@dataclass
class DistributedOptions:
    """What :func:`run` times; see :mod:`batchnorm.lab.bench_distributed`."""

    processes: int = 2
    batch: int = 64  # global: each process gets batch / processes samples of 1x28x28
    steps: int = 10
    repeats: int = 5
    threads: int = 1  # torch threads per process
    out: Path = field(default_factory=lambda: Path("runs/bench"))
    json_path: Path | None = None
    timeout_s: float = 600.0  # the whole run; also the process group's timeout


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _build(variant: str, model: nn.Module) -> nn.Module:
    from batchnorm.nn.batchnorm import convert
    from batchnorm.nn.sync import convert_sync

    if variant == "local BN (ours)":
        return convert(copy.deepcopy(model))
    if variant == "SyncBatchNorm (ours)":
        return convert_sync(copy.deepcopy(model))
    theirs: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))  # type: ignore[no-untyped-call]
    return theirs


def worker(rank: int, world: int, store: str, result: str, options: dict[str, Any]) -> None:
    """One process of the benchmark: join the group, time every variant, rank 0 writes ``result`` (JSON)."""
    import datetime

    import torch.distributed as dist

    from batchnorm.lab.bench import small_cnn
    from batchnorm.nn.sync import SyncBatchNorm

    torch.set_num_threads(int(options["threads"]))
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=float(options["timeout_s"])),
    )
    local_batch = int(options["batch"]) // world
    steps, repeats = int(options["steps"]), int(options["repeats"])
    torch.manual_seed(0)
    base = small_cnn()
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(local_batch, 1, 28, 28, generator=generator)
    targets = torch.randint(0, 10, (local_batch,), generator=generator)

    steppers: dict[str, Callable[[], None]] = {}
    models: dict[str, nn.Module] = {}
    not_runnable: dict[str, str] = {}
    for variant in VARIANTS:
        model = _build(variant, base)
        try:
            ddp = nn.parallel.DistributedDataParallel(model)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

            def step(ddp: nn.Module = ddp, optimizer: torch.optim.Optimizer = optimizer) -> None:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(inputs), targets).backward()  # type: ignore[no-untyped-call]
                optimizer.step()

            step()  # warm-up, and where torch's layer refuses the CPU
        except (ValueError, RuntimeError) as error:
            reason = f"DDP: {error}"
            try:  # the layer's own answer, without DDP (it raises before any collective)
                model(inputs)
            except (ValueError, RuntimeError) as layer_error:
                reason += f"; forward: {layer_error}"
            not_runnable[variant] = reason
            continue
        steppers[variant], models[variant] = step, model
    dist.barrier()

    samples: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            dist.barrier()
            started = time.perf_counter()
            for _ in range(steps):
                steppers[name]()
            elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step is as slow as the slowest process
            samples[name].append(float(elapsed) / steps * 1e3)

    per_call: dict[str, float] = {}
    if "SyncBatchNorm (ours)" in models:
        layers = [m for m in models["SyncBatchNorm (ours)"].modules() if isinstance(m, SyncBatchNorm)]
        for layer in layers:
            layer.collectives.reset()
        steppers["SyncBatchNorm (ours)"]()
        calls = sum(layer.collectives.calls for layer in layers)
        per_call = {
            "layers": len(layers),
            "forward": sum(layer.collectives.forward for layer in layers) / calls,
            "backward": sum(layer.collectives.backward for layer in layers) / calls,
        }
    if rank == 0:
        report = {
            "samples_ms": samples,
            "not_runnable": not_runnable,
            "collectives_per_bn_call": per_call,
            "threads": torch.get_num_threads(),
        }
        Path(result).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


@dataclass
class VariantResult:
    """Milliseconds per training step of one variant (median over repeats), or why it could not run."""

    variant: str
    ms_per_step: float | None
    samples_ms: list[float]
    not_runnable: str | None = None


def _environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the processes all run here: loopback
    return env


def _launch(options: DistributedOptions, directory: Path) -> dict[str, Any]:
    settings = json.dumps(
        {
            "batch": options.batch,
            "steps": options.steps,
            "repeats": options.repeats,
            "threads": options.threads,
            "timeout_s": options.timeout_s,
        }
    )
    result = directory / "rank0.json"
    command = [sys.executable, "-m", "batchnorm.lab.bench_distributed", "--worker"]
    processes = [
        subprocess.Popen(
            [*command, str(rank), str(options.processes), str(directory / "store"), str(result), settings],
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(options.processes)
    ]
    deadline = time.monotonic() + options.timeout_s
    outputs: list[str] = []
    try:
        for rank, process in enumerate(processes):
            try:
                output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"bench --distributed: process {rank} did not finish within {options.timeout_s:g} s"
                ) from None
            outputs.append(output)
            if process.returncode != 0:
                raise RuntimeError(
                    f"bench --distributed: process {rank} exited with code {process.returncode}:\n{output.strip()}"
                )
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    report: dict[str, Any] = json.loads(result.read_text())
    return report


def run(options: DistributedOptions) -> Path:
    """Run the distributed benchmark (:mod:`batchnorm.lab.bench_distributed`), print the table, write the JSON."""
    if options.processes < 2:
        raise ValueError(f"expected at least 2 processes, got {options.processes}")
    if options.batch < 2 * options.processes:
        raise ValueError(f"expected a global batch of at least {2 * options.processes}, got {options.batch}")
    cpu = cpu_name()
    print(
        f"batchnorm bench --distributed: torch {torch.__version__}, {options.processes} processes (gloo, loopback), "
        f"{options.threads} thread(s) each, CPU {cpu} ({os.cpu_count()} cores)"
    )
    print(
        f"model: small BN CNN 1x28x28 (2 BN layers) under DDP, global batch {options.batch} "
        f"({options.batch // options.processes} per process), {options.steps} steps x {options.repeats} repeats"
    )
    with tempfile.TemporaryDirectory(prefix="batchnorm-bench-") as folder:
        raw = _launch(options, Path(folder))
    results = []
    for variant in VARIANTS:
        samples = raw["samples_ms"].get(variant, [])
        results.append(
            VariantResult(
                variant=variant,
                ms_per_step=statistics.median(samples) if samples else None,
                samples_ms=samples,
                not_runnable=raw["not_runnable"].get(variant),
            )
        )
    local = results[0].ms_per_step
    rows = [("variant", "ms/step", "vs local BN", "note")]
    for r in results:
        if r.ms_per_step is None:
            rows.append((r.variant, "-", "-", "not runnable here (below)"))
        else:
            ratio = f"{r.ms_per_step / local:.2f}x" if local else "-"
            rows.append((r.variant, f"{r.ms_per_step:.2f}", ratio, ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for r in results:
        if r.not_runnable is not None:
            print(f"{r.variant}: {r.not_runnable}")
    per_call = raw["collectives_per_bn_call"]
    if per_call:
        print(
            f"\ncollectives per synchronized BN call: {per_call['forward']:g} forward (all_gather), "
            f"{per_call['backward']:g} backward (all_reduce), over {per_call['layers']} BN layers"
        )
    report = {
        "torch_version": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "backend": "gloo",
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "results": [asdict(r) for r in results],
        "collectives_per_bn_call": per_call,
    }
    path = options.json_path or options.out / "bench_distributed.json"
    from batchnorm.lab.files import write_json_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, report, indent=2, newline=True)
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], json.loads(sys.argv[6]))
