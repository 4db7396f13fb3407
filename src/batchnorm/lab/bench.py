r"""``batchnorm bench``: our batch norm against PyTorch's, in one process, interleaved.

For every suite case (a shape, a memory layout and a feature axis) and dtype
it times three operations with both implementations:

``train-fwd``
    training forward with running statistics, no autograd;
``train-fwd+bwd``
    the same forward, then the gradients of input, weight and bias;
``eval-fwd``
    the eval-mode forward;
``eval-fwd+bwd``
    the eval-mode forward, then the gradients of input, weight and bias
    (fine-tuning on frozen statistics, or evaluation outside ``no_grad``).

The two sides alternate in every repeat (ours first in even repeats, torch's
in odd ones), each repeat runs enough calls to last a few milliseconds, and
the reported time is the median over repeats: on a shared machine only such
interleaved ratios can be trusted. PyTorch's side does what a user must for
``axis=-1`` (``movedim`` to axis 1 and back).

Each time is also put against a *roofline*: the minimum bytes the operation
must move (forward: read ``x``, write ``y``; forward+backward: that plus read
``dy`` and ``x``, write ``dx``; eval: read ``x``, write ``y``) divided by the
memory bandwidth of a large copy measured in the same run.

``--end-to-end`` times whole training steps of the paper's MLP and of a small
BN CNN, built from ``torch.nn`` layers, with torch's BN layers and with ours
(:func:`batchnorm.convert`), otherwise identical.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchnorm import functional, kernels
from batchnorm.kernels import native
from batchnorm.lab.files import write_json_atomically

__all__ = ["DTYPES", "LAYOUTS", "OPERATIONS", "SUITE", "BenchOptions", "Case", "parse_case", "run"]

LAYOUTS = ("dense", "nchw", "channels-last", "sequence")
OPERATIONS = ("train-fwd", "train-fwd+bwd", "eval-fwd", "eval-fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One benchmark input; ``layout`` is dense, nchw, channels-last or sequence (``(N, L, C)``, axis -1)."""

    layout: str
    shape: tuple[int, ...]

    @property
    def axis(self) -> int:
        return -1 if self.layout == "sequence" else 1

    @property
    def name(self) -> str:
        return f"{self.layout} {'x'.join(map(str, self.shape))}"


SUITE: tuple[Case, ...] = (
    Case("dense", (60, 100)),
    Case("dense", (256, 1024)),
    Case("dense", (4096, 512)),
    Case("nchw", (32, 64, 56, 56)),
    Case("nchw", (128, 256, 14, 14)),
    Case("nchw", (8, 32, 112, 112)),
    Case("channels-last", (32, 64, 56, 56)),
    Case("sequence", (32, 128, 768)),
)


def parse_case(text: str) -> Case:
    """``LAYOUT:AxBxC`` (e.g. ``nchw:32x64x56x56``) or a suite case's shape alone (``32x64x56x56``)."""
    layout, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a shape like 32x64x56x56, got {dims!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"expected positive sizes, got {dims!r}")
    if not layout:
        matches = [case for case in SUITE if case.shape == shape]
        if not matches:
            raise ValueError(f"{dims!r} is not a suite shape: write LAYOUT:{dims} (LAYOUT in {LAYOUTS})")
        return matches[0]
    if layout not in LAYOUTS:
        raise ValueError(f"expected a layout in {LAYOUTS}, got {layout!r}")
    if layout in ("nchw", "channels-last") and len(shape) != 4:
        raise ValueError(f"{layout} needs 4 sizes (N, C, H, W), got {dims!r}")
    if layout == "dense" and len(shape) != 2:
        raise ValueError(f"dense needs 2 sizes (N, D), got {dims!r}")
    if layout == "sequence" and len(shape) != 3:
        raise ValueError(f"sequence needs 3 sizes (N, L, C), got {dims!r}")
    return Case(layout, shape)


def parse_dtype(text: str) -> str:
    """A dtype name of :data:`DTYPES` (``ValueError`` otherwise)."""
    if text not in DTYPES:
        raise ValueError(f"expected dtypes among {', '.join(DTYPES)}, got {text!r}")
    return text


def parse_kernel(text: str) -> str:
    """One of our kernel settings (``ValueError`` otherwise)."""
    if text not in kernels.KERNELS:
        raise ValueError(f"expected kernels among {', '.join(kernels.KERNELS)}, got {text!r}")
    return text


def parse_operation(text: str) -> str:
    """One of :data:`OPERATIONS` (``ValueError`` otherwise)."""
    if text not in OPERATIONS:
        raise ValueError(f"expected operations among {', '.join(OPERATIONS)}, got {text!r}")
    return text


# --- timing -----------------------------------------------------------------------------


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_block(function: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    sync()
    return (time.perf_counter() - start) / calls


def interleaved_medians(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    block_seconds: float,
    sync: Callable[[], None],
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating blocks of calls.

    Every function is warmed up (which also compiles what needs compiling)
    and calibrated to the number of calls that lasts ``block_seconds``.
    """
    calls: dict[str, int] = {}
    for name, function in functions.items():
        for _ in range(2):
            function()
        once = _time_block(function, 1, sync)
        calls[name] = max(1, min(10_000, round(block_seconds / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            samples[name].append(_time_block(functions[name], calls[name], sync))
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_bandwidth(device: torch.device, sync: Callable[[], None], repeats: int = 9) -> dict[str, float]:
    """Memory bandwidth in GB/s: a 64 MiB copy (bytes read + written) and a 64 MiB sum (bytes read)."""
    numel = 16 * 1024 * 1024
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    times = interleaved_medians(
        {"copy": lambda: target.copy_(source), "sum": lambda: source.sum()}, repeats, 0.02, sync
    )
    nbytes = numel * 4
    return {"copy": 2 * nbytes / times["copy"] / 1e9, "sum": nbytes / times["sum"] / 1e9}


# --- kernel suite -----------------------------------------------------------------------


def make_input(case: Case, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Tensor:
    """A standard-normal input with the case's shape and memory layout."""
    x = torch.randn(case.shape, generator=generator, device="cpu").to(device=device, dtype=dtype)
    if case.layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _torch_op(case: Case) -> Callable[..., Tensor]:
    """``F.batch_norm`` as a user calls it for this case (moving a last feature axis to 1 and back)."""
    if case.axis == 1:
        return F.batch_norm

    def moved(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return F.batch_norm(x.movedim(-1, 1), *args, **kwargs).movedim(1, -1)

    return moved


def minimum_bytes(case: Case, dtype: torch.dtype, operation: str) -> int:
    """Bytes an operation must move at the least: 2 tensor passes forward (x in, y out), 5 forward+backward."""
    tensor_bytes = math.prod(case.shape) * torch.empty((), dtype=dtype).element_size()
    return tensor_bytes * (5 if operation.endswith("+bwd") else 2)


def _operations(
    case: Case, dtype: torch.dtype, device: torch.device, kernel: str, generator: torch.Generator
) -> Iterator[tuple[str, Callable[[], object], Callable[[], object]]]:
    """Yield ``(operation, torch_call, our_call)`` for a case; both sides get their own buffers."""
    x = make_input(case, dtype, device, generator)
    features = case.shape[case.axis]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weight = (1 + 0.1 * torch.randn(features, generator=generator)).to(device=device, dtype=param_dtype)
    bias = (0.1 * torch.randn(features, generator=generator)).to(device=device, dtype=param_dtype)
    grad_output = make_input(case, dtype, device, generator)
    torch_op = _torch_op(case)
    axis = case.axis
    stats = {
        side: (
            torch.zeros(features, device=device, dtype=param_dtype),
            torch.ones(features, device=device, dtype=param_dtype),
        )
        for side in ("torch", "ours")
    }

    def setting() -> AbstractContextManager[None]:
        return kernels.use_kernel(kernel) if kernel != "auto" else nullcontext()

    def torch_forward(training: bool) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return torch_op(x, *stats["torch"], weight, bias, training, 0.1, 1e-5)

        return call

    def our_forward(training: bool) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), setting():
                return functional.batch_norm(x, *stats["ours"], weight, bias, training, 0.1, 1e-5, axis)

        return call

    xg = x.detach().clone().requires_grad_()
    wg = weight.detach().clone().requires_grad_()
    bg = bias.detach().clone().requires_grad_()

    def torch_train_step() -> object:
        y = torch_op(xg, *stats["torch"], wg, bg, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (xg, wg, bg), grad_output)

    def our_train_step() -> object:
        with setting():
            y = functional.batch_norm(xg, *stats["ours"], wg, bg, True, 0.1, 1e-5, axis)
            return torch.autograd.grad(y, (xg, wg, bg), grad_output)

    def torch_eval_step() -> object:
        y = torch_op(xg, *stats["torch"], wg, bg, False, 0.1, 1e-5)
        return torch.autograd.grad(y, (xg, wg, bg), grad_output)

    def our_eval_step() -> object:
        with setting():
            y = functional.batch_norm(xg, *stats["ours"], wg, bg, False, 0.1, 1e-5, axis)
            return torch.autograd.grad(y, (xg, wg, bg), grad_output)

    yield "train-fwd", torch_forward(True), our_forward(True)
    yield "train-fwd+bwd", torch_train_step, our_train_step
    yield "eval-fwd", torch_forward(False), our_forward(False)
    yield "eval-fwd+bwd", torch_eval_step, our_eval_step


@dataclass
class Result:
    """One timed (case, dtype, operation, kernel setting)."""

    case: str
    layout: str
    shape: list[int]
    axis: int
    dtype: str
    operation: str
    kernel: str
    plan: str
    torch_ms: float
    ours_ms: float
    ratio: float
    torch_roofline_pct: float
    ours_roofline_pct: float
    minimum_bytes: int
    first_call_s: float


def explain_case(case: Case, dtype: torch.dtype, device: torch.device, kernel: str = "auto") -> dict[str, str]:
    """The kernel plan our op picks for a case, per mode, as text."""
    x = torch.empty(case.shape, dtype=dtype, device=device)
    if case.layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    context = kernels.use_kernel(kernel) if kernel != "auto" else nullcontext()
    with context:
        return {
            "train": kernels.plan(x, True, axis=case.axis).describe(),
            "eval": kernels.plan(x, False, axis=case.axis).describe(),
            "strides": "x".join(map(str, x.stride())),
        }


def run_suite(
    cases: Sequence[Case],
    dtypes: Sequence[str],
    kernel_settings: Sequence[str],
    operations: Sequence[str],
    device: torch.device,
    repeats: int,
    block_seconds: float,
    bandwidth: float,
    progress: Callable[[str], None],
) -> list[Result]:
    """Time every (case, dtype, kernel setting, operation); see the module docstring."""
    sync = _synchronizer(device)
    results: list[Result] = []
    generator = torch.Generator().manual_seed(0)
    for case in cases:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for kernel in kernel_settings:
                explained = explain_case(case, dtype, device, kernel)
                for operation, torch_call, our_call in _operations(case, dtype, device, kernel, generator):
                    if operation not in operations:
                        continue
                    progress(f"{case.name} {dtype_name} {operation} ({kernel})")
                    start = time.perf_counter()
                    our_call()
                    sync()
                    first_call = time.perf_counter() - start
                    times = interleaved_medians({"torch": torch_call, "ours": our_call}, repeats, block_seconds, sync)
                    floor = minimum_bytes(case, dtype, operation) / (bandwidth * 1e9)
                    results.append(
                        Result(
                            case=case.name,
                            layout=case.layout,
                            shape=list(case.shape),
                            axis=case.axis,
                            dtype=dtype_name,
                            operation=operation,
                            kernel=kernel,
                            plan=explained["eval" if operation.startswith("eval") else "train"],
                            torch_ms=times["torch"] * 1e3,
                            ours_ms=times["ours"] * 1e3,
                            ratio=times["torch"] / times["ours"],
                            torch_roofline_pct=100 * floor / times["torch"],
                            ours_roofline_pct=100 * floor / times["ours"],
                            minimum_bytes=minimum_bytes(case, dtype, operation),
                            first_call_s=first_call,
                        )
                    )
    return results


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Per (operation, dtype, kernel): geometric mean and minimum of the ratios, and the worst case."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.operation, result.dtype, result.kernel), []).append(result)
    summary = []
    for (operation, dtype, kernel), members in groups.items():
        worst = min(members, key=lambda r: r.ratio)
        summary.append(
            {
                "operation": operation,
                "dtype": dtype,
                "kernel": kernel,
                "cases": len(members),
                "geometric_mean_ratio": geometric_mean([r.ratio for r in members]),
                "min_ratio": worst.ratio,
                "worst_case": worst.case,
            }
        )
    return summary


def format_table(results: Sequence[Result]) -> str:
    header = ("case", "dtype", "operation", "kernel", "torch ms", "ours ms", "torch/ours", "roof% torch", "roof% ours")
    rows = [
        (
            r.case,
            r.dtype,
            r.operation,
            r.kernel,
            f"{r.torch_ms:.3f}",
            f"{r.ours_ms:.3f}",
            f"{r.ratio:.2f}x",
            f"{r.torch_roofline_pct:.0f}",
            f"{r.ours_roofline_pct:.0f}",
        )
        for r in results
    ]
    return _render(header, rows)


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows)
    return "\n".join(lines)


# --- end to end -------------------------------------------------------------------------


def paper_mlp() -> nn.Module:
    """784-100-100-100-10 with sigmoid, BN before each nonlinearity (Ioffe & Szegedy 2015, section 4.1)."""
    layers: list[nn.Module] = []
    widths = [784, 100, 100, 100]
    for inputs, outputs in itertools.pairwise(widths):
        layers += [nn.Linear(inputs, outputs), nn.BatchNorm1d(outputs), nn.Sigmoid()]
    layers.append(nn.Linear(widths[-1], 10))
    return nn.Sequential(*layers)


def small_cnn() -> nn.Module:
    """conv3x3(16)-BN-ReLU-pool, conv3x3(32)-BN-ReLU-pool, linear(10) on 1x28x28 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


@dataclass
class EndToEnd:
    """Training steps per second of one model, torch's BN against ours."""

    model: str
    batch: int
    torch_steps_per_s: float
    ours_steps_per_s: float
    ratio: float
    layers: list[str] = field(default_factory=list)


def end_to_end(device: torch.device, repeats: int, steps: int, progress: Callable[[str], None]) -> list[EndToEnd]:
    """Time SGD steps of :func:`paper_mlp` (batch 60) and :func:`small_cnn` (batch 60) with both BN layers."""
    from batchnorm.nn.batchnorm import convert

    sync = _synchronizer(device)
    results = []
    for name, build, input_shape in (
        ("paper MLP 784-100-100-100-10 sigmoid", paper_mlp, (60, 784)),
        ("small BN CNN 28x28", small_cnn, (60, 1, 28, 28)),
    ):
        progress(f"end to end: {name}")
        torch.manual_seed(0)
        theirs = build().to(device)
        ours = convert(copy.deepcopy(theirs))
        inputs = torch.randn(input_shape, device=device)
        targets = torch.randint(0, 10, (input_shape[0],), device=device)

        def stepper(model: nn.Module, inputs: Tensor = inputs, targets: Tensor = targets) -> Callable[[], object]:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def block() -> object:
                for _ in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(inputs), targets)
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                return loss

            return block

        times = interleaved_medians({"torch": stepper(theirs), "ours": stepper(ours)}, repeats, 0.0, sync)
        results.append(
            EndToEnd(
                model=name,
                batch=input_shape[0],
                torch_steps_per_s=steps / times["torch"],
                ours_steps_per_s=steps / times["ours"],
                ratio=times["torch"] / times["ours"],
                layers=[type(m).__name__ for m in ours.modules() if "BatchNorm" in type(m).__name__],
            )
        )
    return results


# --- the verb ---------------------------------------------------------------------------


def keep_freed_memory() -> str:
    """Ask glibc's allocator to keep freed memory instead of returning it to the OS; describe the outcome.

    A large tensor freed at the end of one call and allocated again by the next
    otherwise goes back to the OS (``munmap`` or a heap trim) and comes back as
    fresh pages, whose first-touch page faults cost about as much as batch
    norm's own memory traffic (a 25 MB output: ~4 ms here) and vary from call
    to call with the allocator's adaptive thresholds. Both sides allocate
    through the same allocator, so this removes noise, not a difference;
    jemalloc and tcmalloc, which PyTorch recommends for CPU training, behave
    like this by default.
    """
    if not sys.platform.startswith("linux"):
        return "allocator: system default"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return "allocator: system default (glibc mallopt unavailable)"
    return "allocator: glibc, freed memory kept (mallopt)" if ok else "allocator: system default (mallopt refused)"


@dataclass
class BenchOptions:
    """What :func:`run` times; each field is the ``batchnorm bench`` option of the same name.

    ``None`` means the default, which ``quick`` makes smaller: ``shapes`` the
    whole :data:`SUITE`, ``dtype`` float32 and bfloat16 (float32 only),
    ``repeats`` 9 (5), ``block_ms`` 20 (8), ``steps`` 20 (10). The report
    goes to ``json_path`` (``--json``), by default ``out / "bench.json"``.
    """

    quick: bool = False
    shapes: list[Case] | None = None
    dtype: list[str] | None = None
    kernel: list[str] = field(default_factory=lambda: ["auto"])
    operations: list[str] = field(default_factory=lambda: list(OPERATIONS))
    repeats: int | None = None
    block_ms: float | None = None
    device: str = "cpu"
    explain: bool = False
    explain_only: bool = False
    end_to_end: bool = False
    steps: int | None = None
    out: Path = Path("runs/bench")
    json_path: Path | None = None


def run(options: BenchOptions) -> Path | None:
    """Time what ``options`` asks for, print the tables, write the JSON report; return its path.

    Runs on torch's current thread count. Returns None when
    ``options.explain_only`` stops after the kernel choices.
    """
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch.cuda.is_available() is False")
    cases = options.shapes or list(SUITE)
    dtypes = options.dtype or (["float32"] if options.quick else ["float32", "bfloat16"])
    repeats = options.repeats or (5 if options.quick else 9)
    block_seconds = (options.block_ms or (8.0 if options.quick else 20.0)) / 1e3
    sync = _synchronizer(device)

    allocator = keep_freed_memory() if device.type == "cpu" else "allocator: PyTorch's CUDA caching allocator"
    native_kernels = (
        f"native kernels: {native.library_path()}"
        if native.available()
        else (f"native kernels: unavailable ({native.failure()})")
    )
    print(f"batchnorm bench: torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s)")
    print(f"{allocator}; {native_kernels}")
    if options.explain or options.explain_only:
        rows = []
        for case in cases:
            for dtype_name in dtypes:
                for kernel in options.kernel:
                    explained = explain_case(case, DTYPES[dtype_name], device, kernel)
                    rows.append(
                        (case.name, dtype_name, explained["strides"], kernel, explained["train"], explained["eval"])
                    )
        print(_render(("case", "dtype", "strides", "setting", "train", "eval"), rows))
        if options.explain_only:
            return None

    bandwidth = measure_bandwidth(device, sync)
    print(f"memory bandwidth: copy {bandwidth['copy']:.1f} GB/s (read+write), sum {bandwidth['sum']:.1f} GB/s (read)")

    progress = _progress(len(cases) * len(dtypes) * len(options.kernel) * len(options.operations))
    results = run_suite(
        cases, dtypes, options.kernel, options.operations, device, repeats, block_seconds, bandwidth["copy"], progress
    )
    progress("")
    print(format_table(results))
    summary = summarize(results)
    print()
    print(
        _render(
            ("operation", "dtype", "kernel", "cases", "geomean torch/ours", "min", "worst case"),
            [
                (
                    s["operation"],
                    s["dtype"],
                    s["kernel"],
                    str(s["cases"]),
                    f"{s['geometric_mean_ratio']:.2f}x",
                    f"{s['min_ratio']:.2f}x",
                    s["worst_case"],
                )
                for s in summary
            ],
        )
    )
    end_to_end_results: list[EndToEnd] = []
    if options.end_to_end:
        steps = options.steps or (10 if options.quick else 20)
        end_to_end_results = end_to_end(device, repeats, steps, _progress(2))
        print()
        print(
            _render(
                ("model", "batch", "torch steps/s", "ours steps/s", "torch/ours"),
                [
                    (
                        e.model,
                        str(e.batch),
                        f"{e.torch_steps_per_s:.0f}",
                        f"{e.ours_steps_per_s:.0f}",
                        f"{e.ratio:.2f}x",
                    )
                    for e in end_to_end_results
                ],
            )
        )
    report = {
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        "native_kernels": native_kernels,
        "repeats": repeats,
        "block_ms": block_seconds * 1e3,
        "bandwidth_gbps": bandwidth,
        "results": [asdict(r) for r in results],
        "summary": summary,
        "end_to_end": [asdict(e) for e in end_to_end_results],
        "explain": {
            f"{case.name} {dtype_name}": explain_case(case, DTYPES[dtype_name], device)
            for case in cases
            for dtype_name in dtypes
        },
    }
    path = options.json_path or options.out / "bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, report, indent=2, newline=True)
    print(f"\nwrote {path}")
    return path


def _progress(total: int) -> Callable[[str], None]:
    """A one-line progress indicator on stderr (``done/total: what``); an empty message ends the line."""
    state = {"done": 0}
    interactive = sys.stderr.isatty()

    def report(message: str) -> None:
        if not message:
            if interactive:
                sys.stderr.write("\n")
            return
        state["done"] += 1
        line = f"[{state['done']}/{total}] {message}"
        if interactive:
            sys.stderr.write("\r" + line.ljust(70)[:100])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return report
