r"""The four primitives as Triton GPU kernels, for inputs with the features innermost.

These kernels take one layout: the *feature-last* one, an input whose memory
is a dense ``(M, C)`` matrix with the ``C`` features innermost. Channels-last
``(N, C, H, W)``/``(N, C, D, H, W)`` tensors with ``axis=1``, ``(N, L, C)``
with ``axis=-1`` and dense ``(N, C)`` are all of this kind: ``M`` is the number
of values per feature, read in place without a copy or transpose. Outputs
have the input's shape, dtype and strides. :func:`applies` says whether a
tensor qualifies; :mod:`batchnorm.kernels` falls back to PyTorch operations
where it does not.

With ``x`` read as the ``(M, C)`` matrix ``x_{rc}``, per feature ``c``:

.. math::

    \text{stats}: &\quad \mu_c = \tfrac1M \textstyle\sum_r x_{rc}, \qquad
        M_{2,c} = \sum_r (x_{rc} - \mu_c)^2 \\
    \text{normalize}: &\quad y_{rc} = \mathrm{act}\big((x_{rc} - \mu_c)\, s_c \gamma_c + \beta_c\big) \\
    \text{grad\_sums}: &\quad \textstyle\sum_r dy_{rc}, \qquad
        \sum_r dy_{rc}\, \hat x_{rc}, \qquad \hat x_{rc} = (x_{rc} - \mu_c)\, s_c \\
    \text{grad\_input}: &\quad dx_{rc} = s_c \gamma_c \Big(dy_{rc} - \tfrac1m \textstyle\sum_r dy_{rc}
        - \hat x_{rc}\, \tfrac1m \sum_r dy_{rc} \hat x_{rc}\Big)

with ``s = invstd`` and ``m`` the number of values the statistics pooled.

Numerics: loads are widened to the accumulation dtype (float32 for
float32/float16/bfloat16 inputs, float64 for float64) and each output is
rounded once to the input's dtype. ``stats`` never forms
:math:`E[x^2] - E[x]^2`: each program reduces tiles of rows of a block of
features two-pass in registers and merges them with Chan's formula,

.. math::

    n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad \mu = \mu_a + \delta\, n_b / n,\quad
    M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n,

writes one partial ``(mean, M2)`` per program, and the partials of the ``P``
programs are merged on the device by the same formula for ``P`` parts. All
means are of ``x - k``, ``k`` the first row (one shift for every program), so
``|mean| >> std`` loses nothing; ``k`` is added back once at the end:
:math:`\mu = k + \sum_p n_p \mu_p / M`,
:math:`M_2 = \sum_p M_{2,p} + \sum_p n_p (\mu_p - (\mu - k))^2`.
``grad_sums`` reduces the same way (plain partial sums, then a sum of the
partials). Nothing here reads a result on the host: no synchronization with
the device, no branch on data.

Triton is optional: it is imported on first use (never by ``import
batchnorm``), :func:`available` is False when it cannot be imported or
``BATCHNORM_TRITON=0`` is set (:func:`failure` says why). With
``TRITON_INTERPRET=1`` set before the first use, the kernels run in Triton's
interpreter on CPU tensors (slowly: for tests).

Block sizes are fixed rules of thumb, not yet tuned or measured on a GPU.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

import torch
from torch import Tensor

__all__ = [
    "DTYPES",
    "TRITON_ENV_VAR",
    "applies",
    "available",
    "failure",
    "feature_last",
    "grad_input",
    "grad_sums",
    "interpreted",
    "normalize",
    "stats",
    "supports",
]

TRITON_ENV_VAR = "BATCHNORM_TRITON"

#: The input dtypes the kernels take.
DTYPES: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})

#: Rows are indexed with 32-bit integers inside the kernels.
_MAX_ROWS = 2**31 - 2**24
#: Elements per tile: of a reduction program's loop body, and of an elementwise program.
_REDUCE_TILE = 2048
_ELEMENTWISE_TILE = 4096
#: At most this many programs share a reduction (partials to merge): enough to fill a large GPU.
_REDUCE_PROGRAMS = 1024
_MAX_BLOCK_C = 128

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}
_failure: list[str] = []


def _kernels() -> ModuleType | None:
    """The kernel module, imported once (which fixes interpreter or GPU mode); None when Triton is unusable."""
    if "module" in _loaded:
        return _loaded["module"]
    with _lock:
        if "module" not in _loaded:
            module: ModuleType | None = None
            if os.environ.get(TRITON_ENV_VAR, "").strip() == "0":
                _failure.append(f"disabled by {TRITON_ENV_VAR}=0")
            else:
                try:
                    module = importlib.import_module("batchnorm.kernels._triton_kernels")
                except Exception as error:  # ImportError, or a Triton that fails to initialize here
                    _failure.append(f"triton cannot be imported: {type(error).__name__}: {error}")
            _loaded["module"] = module
    return _loaded["module"]


def available() -> bool:
    """Whether Triton imports here (and ``BATCHNORM_TRITON`` is not ``0``); the first call imports it."""
    return _kernels() is not None


def failure() -> str | None:
    """Why :func:`available` is False, else None."""
    return None if available() else (_failure[0] if _failure else "unknown")


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at first use): on CPU tensors."""
    module = _kernels()
    return module is not None and bool(module.INTERPRETED)


def feature_last(x: Tensor, feature: int) -> bool:
    """Whether ``x``'s memory is a dense ``(M, C)`` matrix with the ``C`` features of dimension ``feature`` innermost.

    The other dimensions may be in any order in memory (channels-last, ``(N, L, C)``,
    a transposed dense matrix whose feature axis is the contiguous one); size-1
    dimensions are ignored.

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``feature`` (non-negative).
    """
    sizes, strides = x.shape, x.stride()
    channels = sizes[feature]
    if channels != 1 and strides[feature] != 1:
        return False
    others = sorted((strides[d], sizes[d]) for d in range(len(sizes)) if d != feature and sizes[d] != 1)
    expected = channels
    for stride, size in others:
        if stride != expected:
            return False
        expected *= size
    return True


def supports(x: Tensor, axis: int) -> bool:
    """Whether the kernels take ``x`` as it is, device aside: its dtype, a non-empty feature-last layout, its size.

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``axis``.
    """
    ndim = x.dim()
    if x.dtype not in DTYPES or ndim == 0 or not -ndim <= axis < ndim:
        return False
    feature = axis % ndim
    numel = x.numel()
    return numel > 0 and numel // x.shape[feature] < _MAX_ROWS and feature_last(x, feature)


def applies(x: Tensor, axis: int) -> bool:
    """Whether the kernels run on ``x`` here: Triton available, ``x`` on a CUDA device (or on the CPU
    under Triton's interpreter) and :func:`supports` it.

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``axis``.
    """
    if not supports(x, axis):
        return False
    if x.is_cuda:
        return available()
    return x.is_cpu and interpreted()


# --- launching ----------------------------------------------------------------------------


def _module() -> ModuleType:
    module = _kernels()
    if module is None:
        raise RuntimeError(f"the triton kernels are unavailable here: {failure()}")
    return module


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _language_dtype(dtype: torch.dtype) -> object:
    language = importlib.import_module("triton.language")
    return language.float64 if dtype == torch.float64 else language.float32


def _matrix(x: Tensor, axis: int) -> tuple[int, int, int]:
    """``(feature, rows, cols)`` of a feature-last ``x``; raises when :func:`applies` is False."""
    if not applies(x, axis):
        raise ValueError(
            f"the triton kernels take a non-empty {sorted(str(d) for d in DTYPES)} tensor whose memory is a dense "
            f"(rows, features) matrix with the features innermost, on a CUDA device; got shape {tuple(x.shape)}, "
            f"strides {x.stride()}, {x.dtype} on {x.device}, axis {axis}"
        )
    feature = axis % x.dim()
    cols = x.shape[feature]
    return feature, x.numel() // cols, cols


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _blocks(cols: int, tile: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_C)``: powers of two, ``BLOCK_C`` covering up to 128 features, ``BLOCK_M * BLOCK_C = tile``."""
    block_c = min(_next_power_of_2(cols), _MAX_BLOCK_C)
    return max(tile // block_c, 1), block_c


def _reduction_grid(rows: int, cols: int) -> tuple[int, int, int, int, int]:
    """``(programs_m, programs_c, rows_per_program, BLOCK_M, BLOCK_C)`` of a reduction over ``rows``."""
    block_m, block_c = _blocks(cols, _REDUCE_TILE)
    programs_c = -(-cols // block_c)
    row_blocks = -(-rows // block_m)
    programs_m = min(row_blocks, max(_REDUCE_PROGRAMS // programs_c, 1))
    rows_per_program = -(-row_blocks // programs_m) * block_m
    programs_m = -(-rows // rows_per_program)
    return programs_m, programs_c, rows_per_program, block_m, block_c


def _vector(v: Tensor, x: Tensor, acc: torch.dtype) -> Tensor:
    """A per-feature tensor as the kernels read it: contiguous, of the accumulation dtype, on ``x``'s device."""
    return v.detach().to(device=x.device, dtype=acc).contiguous()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (``x``'s shape) with ``x``'s strides: ``t`` itself when it has them, else a copy."""
    if all(a == b for a, b, size in zip(t.stride(), x.stride(), x.shape) if size != 1) and t.device == x.device:
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def _part_counts(programs: int, rows: int, rows_per_program: int, acc: torch.dtype, device: torch.device) -> Tensor:
    """The number of rows each reduction program covered, ``(P, 1)``: all full but the last (no host sync)."""
    counts = torch.full((programs, 1), float(rows_per_program), dtype=acc, device=device)
    counts[-1] = float(rows - (programs - 1) * rows_per_program)
    return counts


# --- the primitives -----------------------------------------------------------------------


def stats(x: Tensor, axis: int) -> tuple[int, Tensor, Tensor]:
    """Per-feature ``(count, mean, m2)`` of a feature-last ``x``: ``m2 = sum((x - mean)^2)``.

    Shape:
        - x: ``(*, C, *)`` with ``C`` at ``axis``, feature-last (:func:`applies`); mean, m2: ``(C,)`` in the
          accumulation dtype (float32; float64 for float64 inputs). ``count``: the values per feature, ``M``.
    """
    _, rows, cols = _matrix(x, axis)
    kernels = _module()
    acc = _accumulation(x.dtype)
    programs_m, programs_c, rows_per_program, block_m, block_c = _reduction_grid(rows, cols)
    part_mean = torch.empty((programs_m, cols), dtype=acc, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    kernels.stats_partials[(programs_m, programs_c)](
        x.detach(),
        part_mean,
        part_m2,
        rows,
        cols,
        rows_per_program,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        ACC=_language_dtype(x.dtype),
    )
    # The kernels' shift: the matrix's first row (the features at the first ``cols`` elements of memory).
    shift = torch.as_strided(x.detach(), (cols,), (1,)).to(acc)
    if programs_m == 1:
        return rows, shift + part_mean[0], part_m2[0]
    counts = _part_counts(programs_m, rows, rows_per_program, acc, x.device)
    shifted_mean = (part_mean * counts).sum(0) / rows
    deviation = part_mean - shifted_mean
    m2 = part_m2.sum(0) + (deviation * deviation * counts).sum(0)
    return rows, shift + shifted_mean, m2


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    axis: int,
    activation: str | None = None,
) -> Tensor:
    """``y = act((x - mean) * (invstd * weight) + bias)`` in ``x``'s dtype, shape and strides.

    ``activation``: None (the identity) or ``"relu"``, fused into the kernel.

    Shape:
        - x, y: ``(*, C, *)`` with ``C`` at ``axis``, feature-last; mean, invstd, weight, bias: ``(C,)``.
    """
    if activation not in (None, "relu"):
        raise ValueError(f"expected activation to be None or 'relu', got {activation!r}")
    _, rows, cols = _matrix(x, axis)
    kernels = _module()
    acc = _accumulation(x.dtype)
    scale = _vector(invstd, x, acc)
    if weight is not None:
        scale = scale * _vector(weight, x, acc)
    mu = _vector(mean, x, acc)
    shift = mu if bias is None else _vector(bias, x, acc)
    y = torch.empty_like(x, memory_format=torch.preserve_format)
    block_m, block_c = _blocks(cols, _ELEMENTWISE_TILE)
    kernels.normalize[(-(-rows // block_m), -(-cols // block_c))](
        x.detach(),
        y,
        mu,
        scale,
        shift,
        rows,
        cols,
        HAS_BIAS=bias is not None,
        RELU=activation == "relu",
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        ACC=_language_dtype(x.dtype),
    )
    return y


def grad_sums(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """``(sum(dy), sum(dy * x_hat))`` per feature, ``x_hat = (x - mean) * invstd``, in the accumulation dtype.

    ``dy`` is read in ``x``'s layout (copied into it when its strides differ).

    Shape:
        - dy, x: ``(*, C, *)`` with ``C`` at ``axis``, x feature-last; mean, invstd and both sums: ``(C,)``.
    """
    _, rows, cols = _matrix(x, axis)
    kernels = _module()
    acc = _accumulation(x.dtype)
    dy = _like(dy.detach(), x)
    programs_m, programs_c, rows_per_program, block_m, block_c = _reduction_grid(rows, cols)
    part_dy = torch.empty((programs_m, cols), dtype=acc, device=x.device)
    part_dy_centered = torch.empty_like(part_dy)
    kernels.grad_sums_partials[(programs_m, programs_c)](
        dy,
        x.detach(),
        _vector(mean, x, acc),
        part_dy,
        part_dy_centered,
        rows,
        cols,
        rows_per_program,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        ACC=_language_dtype(x.dtype),
    )
    return part_dy.sum(0), part_dy_centered.sum(0) * _vector(invstd, x, acc)


def grad_input(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    axis: int,
) -> Tensor:
    """``dx = invstd * weight * (dy - sum_dy / count - x_hat * sum_dy_xhat / count)``.

    In ``dy``'s dtype (as :func:`batchnorm.kernels.torch_ops.grad_input`) with ``x``'s strides.

    Shape:
        - dy, x, dx: ``(*, C, *)`` with ``C`` at ``axis``, x feature-last; the per-feature tensors: ``(C,)``.
    """
    _, rows, cols = _matrix(x, axis)
    kernels = _module()
    acc = _accumulation(x.dtype)
    dy = _like(dy.detach(), x)
    inv = _vector(invstd, x, acc)
    gain = inv if weight is None else inv * _vector(weight, x, acc)
    dx = torch.empty_like(x, dtype=dy.dtype, memory_format=torch.preserve_format)
    block_m, block_c = _blocks(cols, _ELEMENTWISE_TILE)
    kernels.grad_input[(-(-rows // block_m), -(-cols // block_c))](
        dy,
        x.detach(),
        dx,
        _vector(mean, x, acc),
        inv,
        gain,
        _vector(sum_dy, x, acc) / count,
        _vector(sum_dy_xhat, x, acc) / count,
        rows,
        cols,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        ACC=_language_dtype(x.dtype),
    )
    return dx
