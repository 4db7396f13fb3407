r"""Native CPU kernels: C kernels and a PyTorch operator with its autograd in C++, built on first use.

The sources lie in this package: ``_native/batchnorm.c`` and ``_native/typed.h``
(the kernels, plain C compiled with ``-O3 -march=native -fopenmp``) and
``_native/op.cpp`` (the ``batchnorm::`` operators registered with PyTorch's
dispatcher, whose backward is a C++ autograd node, so a training step
crosses from Python into C++ once forward and never backward). Building
takes 15-30 seconds with the system's compilers (``$CC``/``cc`` and
``$CXX``/``c++``) against the installed PyTorch's headers; the library is
cached under ``$BATCHNORM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/batchnorm``,
else ``~/.cache/batchnorm``), keyed by a hash of the sources, the compilers,
the flags, the CPU and the PyTorch build, written atomically under a file
lock, so concurrent processes build it once and later runs load it in
milliseconds. ``make install`` builds it ahead of time (:func:`main`).

When a compiler or PyTorch's headers are missing, compilation or loading
fails, or ``BATCHNORM_NATIVE=0`` is set, :func:`available` returns False
(:func:`failure` says why, also logged once on the ``batchnorm.kernels.native``
logger) and :func:`batchnorm.kernels.plan` never picks these kernels.

What the kernels compute (per feature ``c`` of the input's memory seen as a
dense ``(B, C, S)`` block: contiguous, or features innermost with the other
axes dense, as channels-last and ``(N, L, C)`` tensors are):

* training forward: mean and biased variance from sums of ``x - k`` and
  ``(x - k)^2``, one pass over ``x`` with ``k`` the mean of the feature's first
  16 rows (feature-last) or 64 positions (channels-first), summed again
  around the mean when ``(mean - k)^2 > 16 var``;
  ``y = (x - mean) * (inv_std * weight) + bias``; then, only when every
  statistic is finite, the running-statistics blend (PyTorch's conventions:
  unbiased variance, ``lerp`` weight ``momentum``, or ``1 / (n + 1)`` for a
  cumulative average) and the counter increment, in the same call;
* training backward: ``sum(dy)`` and ``sum(dy * (x - mean))`` in one pass
  over ``x`` and ``dy``, ``dx`` in a second; with ``create_graph=True`` a
  composite of ATen operations, so higher derivatives exist;
* eval: ``y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias``.

float32, bfloat16 and float16 accumulate in float32 within blocks of at most a
few hundred values and in float64 across blocks; float64 in float64.
Statistics and per-feature tensors are float32 (float64 for float64 inputs).
Work over at least 32,768 values is split across ``torch.get_num_threads()``
threads of PyTorch's own OpenMP runtime (the library links ``libgomp.so.1``,
which resolves to the copy PyTorch has loaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DTYPES",
    "NATIVE_ENV_VAR",
    "available",
    "build",
    "code",
    "failure",
    "grad_input",
    "grad_sums",
    "inference",
    "normalize",
    "stats",
    "library_path",
    "supports",
    "train",
]

logger = logging.getLogger(__name__)

NATIVE_ENV_VAR = "BATCHNORM_NATIVE"
_SOURCE_DIR = Path(__file__).with_name("_native")
_SOURCES = ("batchnorm.c", "typed.h", "op.cpp")
_C_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)
_CXX_STANDARDS = ("-std=c++20", "-std=c++17")

#: dtype -> the code the kernels take.
DTYPES: dict[torch.dtype, int] = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _cache_dir() -> Path:
    explicit = os.environ.get("BATCHNORM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchnorm"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(wanted))) or platform.machine()


def _compiler_command(variable: str, default: str) -> list[str] | None:
    """``$variable`` (which may carry arguments, e.g. ``ccache gcc``) or ``default``, resolved on ``PATH``."""
    words = shlex.split(os.environ.get(variable, "") or default)
    if not words:
        return None
    program = shutil.which(words[0])
    return None if program is None else [program, *words[1:]]


def _version_text(compiler: list[str]) -> str:
    try:
        result = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout


def _run(command: list[str]) -> str | None:
    """Run a compiler command; ``None`` on success, else the last lines of its error output."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.strip().splitlines() if "error" in line.lower()] or [
        f"exit status {result.returncode}"
    ]
    return " | ".join(lines[:3])


def _torch_flags() -> tuple[list[str], list[str]]:
    """Include and link flags for PyTorch's C++ API, from the installed torch."""
    root = Path(torch.__file__).parent
    include = root / "include"
    library = root / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    compile_flags = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}", f"-I{include / 'torch/csrc/api/include'}"]
    link_flags = [f"-L{library}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{library}"]
    return compile_flags, link_flags


def _python_flags() -> list[str]:
    """Compile flags that make the library a Python extension module too, or none without Python's headers."""
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        return []
    return ["-DBATCHNORM_PYTHON", f"-I{include}"]


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory/build.lock`` (one process builds, the others wait and reuse)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    with open(directory / "build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(c_compiler: list[str], cxx_compiler: list[str], target: Path) -> str | None:
    """Compile the kernels and the operators into ``target``; the reason when that fails."""
    compile_flags, link_flags = _torch_flags()
    with tempfile.TemporaryDirectory(prefix="batchnorm-build-", dir=target.parent) as work:
        objects = Path(work) / "kernels.o"
        problems = []
        c_flags: list[str] | None = None
        for flags in _C_FLAG_SETS:
            problem = _run([*c_compiler, *flags, "-std=gnu11", "-fPIC", "-c", str(_SOURCE_DIR / "batchnorm.c"),
                            "-o", str(objects)])  # fmt: skip
            if problem is None:
                c_flags = flags
                break
            problems.append(f"{' '.join(c_compiler)} {' '.join(flags)}: {problem}")
        if c_flags is None:
            return "; ".join(problems)
        library = Path(work) / "native.so"
        openmp = ["-fopenmp"] if "-fopenmp" in c_flags else []
        # With Python's headers the library is also a Python extension module (the fast entry points);
        # without them, the torch.ops operators alone.
        module_flags = _python_flags()
        python_variants = ([module_flags] if module_flags else []) + [[]]
        for standard in _CXX_STANDARDS:
            for python_flags in python_variants:
                python_link = ["-ltorch_python"] if python_flags else []
                problem = _run([*cxx_compiler, "-O2", standard, "-fPIC", "-shared", *compile_flags, *python_flags,
                                str(_SOURCE_DIR / "op.cpp"), str(objects), "-o", str(library),
                                *link_flags, *python_link, *openmp, "-lm"])  # fmt: skip
                if problem is None:
                    os.replace(library, target)  # atomic: a reader sees no file or the whole file
                    return None
                problems.append(
                    f"{' '.join(cxx_compiler)} {standard}{' (Python module)' if python_flags else ''}: {problem}"
                )
        return "; ".join(problems)


class _Library:
    """The loaded operators, built on first use; the first failure is remembered for the process."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.problem: str | None = None
        self.tried = False
        self.loaded = False
        self.lock = threading.Lock()

    def get(self) -> bool:
        if self.tried:
            return self.loaded
        with self.lock:
            if not self.tried:
                try:
                    self.loaded = self._load()
                except Exception as error:  # any failure means: no native kernels, say why once
                    self.problem = f"{type(error).__name__}: {error}"
                    self.loaded = False
                if not self.loaded:
                    logger.info("batchnorm: native kernels unavailable (%s)", self.problem)
                self.tried = True
        return self.loaded

    def _load(self) -> bool:
        setting = os.environ.get(NATIVE_ENV_VAR, "").strip().lower()
        if setting in ("0", "no", "off", "false"):
            self.problem = f"disabled by ${NATIVE_ENV_VAR}={setting}"
            return False
        if sys.platform == "win32":
            self.problem = "the native kernels are built on Linux and macOS only"
            return False
        if hasattr(torch.ops, "batchnorm") and hasattr(torch.ops.batchnorm, "train"):
            return _bind()  # already registered in this process
        path = self._ensure_built()
        if path is None:
            return False
        torch.ops.load_library(str(path))  # type: ignore[no-untyped-call]
        self.path = path
        return _bind(_python_module(path))

    def _ensure_built(self) -> Path | None:
        c_compiler = _compiler_command("CC", "cc")
        cxx_compiler = _compiler_command("CXX", "c++")
        if c_compiler is None or cxx_compiler is None:
            missing = [name for name, found in (("CC", c_compiler), ("CXX", cxx_compiler)) if found is None]
            self.problem = f"no compiler found for {' and '.join(missing)} (cc and c++ by default)"
            return None
        if not (Path(torch.__file__).parent / "include" / "torch" / "library.h").exists():
            self.problem = "this PyTorch installation has no C++ headers"
            return None
        digest = hashlib.sha256()
        for name in _SOURCES:
            digest.update((_SOURCE_DIR / name).read_bytes())
        for part in (
            " ".join(c_compiler) + _version_text(c_compiler),
            " ".join(cxx_compiler) + _version_text(cxx_compiler),
            repr((_C_FLAG_SETS, _CXX_STANDARDS, _torch_flags(), _python_flags())),
            _cpu_signature(),
            torch.__version__,
            str(getattr(torch.version, "git_version", "")),
        ):
            digest.update(part.encode())
        directory = _cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"native-{digest.hexdigest()[:20]}.so"
        if target.exists():
            return target
        with _build_lock(directory):
            if target.exists():  # another process built it while this one waited
                return target
            logger.warning("batchnorm: compiling the native kernels once (15-30 s) into %s", target)
            problem = _compile(c_compiler, cxx_compiler, target)
        if problem is not None:
            self.problem = f"compilation failed: {problem}"
            return None
        return target


_library = _Library()


def _python_module(path: Path) -> Any:
    """The library as a Python extension module (its functions take Python arguments directly), or ``None``
    when it was built without Python's headers."""
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:  # no PyInit_batchnorm_native: the operators alone
        return None
    return module


_MODULE_NAME = "batchnorm_native"
_NAMES = ("train", "inference", "stats", "normalize", "grad_sums", "grad_input")


def _bind(module: Any = None) -> bool:
    """Look the entry points up once: the extension module's functions (about 3 us a call), else the
    operators below the ``OpOverload`` wrapper (about 7 us: torch.ops parses arguments by their schema)."""
    global _train, _inference, _stats, _normalize, _grad_sums, _grad_input, _entry
    if module is not None and all(hasattr(module, name) for name in _NAMES):
        functions = [getattr(module, name) for name in _NAMES]
        _entry = "python module"
    else:
        ops = torch.ops.batchnorm
        functions = [getattr(overload, "_op", overload) for overload in (getattr(ops, name).default for name in _NAMES)]
        _entry = "torch.ops"
    _train, _inference, _stats, _normalize, _grad_sums, _grad_input = functions
    return True


#: how the kernels are called: "python module" or "torch.ops" (``None`` before loading)
_entry: str | None = None


_train: Any = None
_inference: Any = None
_stats: Any = None
_normalize: Any = None
_grad_sums: Any = None
_grad_input: Any = None


def _require() -> None:
    """Load the operators (building them if needed) or raise ``RuntimeError`` saying why they are unavailable."""
    if not available():
        raise RuntimeError(f"native kernels unavailable: {failure()}")


def available() -> bool:
    """Whether the native kernels are built and loaded (building them on the first call)."""
    return _library.get()


def failure() -> str | None:
    """Why the native kernels are unavailable, or ``None`` (after :func:`available` was asked)."""
    return _library.problem


def library_path() -> Path | None:
    """Where the loaded library lies, or ``None``."""
    _library.get()
    return _library.path


def build() -> Path | None:
    """Build (or find) and load the library; raise ``RuntimeError`` with the reason when that fails."""
    if not available():
        raise RuntimeError(f"native kernels unavailable: {failure()}")
    return _library.path


_CODES: dict[torch.dtype, int | None] = {}


def code(dtype: torch.dtype) -> int | None:
    """The C code of ``dtype`` when the loaded library has kernels for it, else ``None`` (builds on first call)."""
    if dtype in _CODES:
        return _CODES[dtype]
    else:
        value = DTYPES.get(dtype)
        if not _library.get() or value is None or not torch.ops.batchnorm.supports(value):
            value = None  # float16 needs a compiler with _Float16 (GCC 12+, Clang 15+ on x86-64)
        _CODES[dtype] = value
        return value


def supports(dtype: torch.dtype) -> bool:
    """Whether the loaded library has kernels for ``dtype`` (float16 needs a compiler with ``_Float16``)."""
    return code(dtype) is not None


def train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    counter: Tensor | None,
    axis: int,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor | None, int]:
    """Training forward, differentiable, running statistics updated: ``(y, status)``.

    Status 0: done. 1: done, but a statistic was NaN or infinite, so neither
    the buffers nor the counter changed (``y`` is still written). -1: not
    taken, nothing done, ``y`` is ``None``: the kernels take ``x`` only when
    it is a non-empty CPU tensor of a supported dtype whose memory is a dense
    ``(B, C, S)`` block (contiguous, or features innermost and the rest
    dense) with more than one value per feature, per-feature tensors only
    when they are contiguous ``(C,)`` CPU tensors of the accumulation dtype
    (float32; float64 for float64 ``x``) and running
    statistics that need no gradient, the counter only as an int64 CPU
    scalar, ``momentum`` in ``[0, 1]`` or ``None`` (the cumulative average
    ``1 / (counter + 1)``, which needs the counter) and ``eps > 0``.
    ``y`` has ``x``'s shape and strides.

    Shape:
        - x, y: ``(*, C, *)`` with ``C`` features at ``axis``; weight, bias, running stats: ``(C,)``; counter: ``()``.
    """
    if _train is None:
        _require()
    result: tuple[Tensor | None, int] = _train(
        x, weight, bias, running_mean, running_var, counter, axis, -1.0 if momentum is None else momentum, eps
    )
    return result


def inference(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    axis: int,
    eps: float,
) -> Tensor | None:
    """Eval: ``y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias``, ``y`` with ``x``'s strides.

    ``None`` (nothing done) when a gradient is needed (the result is not
    differentiable) or the arguments are not what the kernels take as they
    are (see :func:`train`).

    Shape:
        - x, y: ``(*, C, *)`` with ``C`` features at ``axis``; the rest: ``(C,)``.
    """
    if _inference is None:
        _require()
    y: Tensor | None = _inference(x, running_mean, running_var, weight, bias, axis, eps)
    return y


# --- the four primitives (see batchnorm.kernels); each returns None when the kernels do not take its arguments ---


def stats(x: Tensor, axis: int) -> Tensor | None:
    """Per-feature ``[mean; biased var]`` as a ``(2, C)`` tensor of the accumulation dtype, or ``None``.

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``axis`` (a dense block); output: ``(2, C)``.
    """
    if _stats is None:
        _require()
    result: Tensor | None = _stats(x, axis)
    return result


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None, axis: int
) -> Tensor | None:
    """``y = (x - mean) * (invstd * weight) + bias`` with ``x``'s strides, or ``None``.

    Shape:
        - x, y: ``(*, C, *)`` with ``C`` at ``axis``; the rest: ``(C,)``.
    """
    if _normalize is None:
        _require()
    result: Tensor | None = _normalize(x, mean, invstd, weight, bias, axis)
    return result


def grad_sums(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, axis: int) -> Tensor | None:
    """``[sum(dy); sum(dy * x_hat)]`` as a ``(2, C)`` tensor of the accumulation dtype, or ``None``.

    Shape:
        - dy, x: ``(*, C, *)`` with ``C`` at ``axis``; mean, invstd: ``(C,)``; output: ``(2, C)``.
    """
    if _grad_sums is None:
        _require()
    result: Tensor | None = _grad_sums(dy, x, mean, invstd, axis)
    return result


def grad_input(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: float,
    axis: int,
) -> Tensor | None:
    """``dx = invstd * weight * (dy - sum_dy / count - x_hat * sum_dy_xhat / count)`` with ``x``'s strides, or ``None``.

    Shape:
        - dy, x, dx: ``(*, C, *)`` with ``C`` at ``axis``; the rest: ``(C,)``.
    """
    if _grad_input is None:
        _require()
    result: Tensor | None = _grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, float(count), axis)
    return result


def main() -> int:
    """Build the library now and print where it is; 1 (with the reason on stderr) when it cannot be built."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not available():
        print(f"batchnorm: native kernels unavailable: {failure()}", file=sys.stderr)
        return 1
    print(library_path())
    return 0
