"""The Triton kernels behind :mod:`batchnorm.kernels.triton_ops` (imported on first use, never by ``import batchnorm``).

Every kernel reads its input as a dense ``(n_rows, n_cols)`` matrix with the
``n_cols`` features innermost (element ``(r, c)`` at offset ``r * n_cols + c``),
over a 2-D grid: axis 0 over blocks of rows, axis 1 over blocks of
``BLOCK_C`` features. ``ACC`` is the accumulation dtype (float32, or float64
for float64 inputs). Offsets are 64-bit, so inputs of more than ``2**31``
elements are addressed correctly; row indices are 32-bit.

Whether these are compiled for the GPU or run by Triton's interpreter
(``TRITON_INTERPRET=1``) is fixed when this module is imported:
:data:`INTERPRETED`.
"""

# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# ruff: noqa: N803
# (Triton's language is untyped, so mypy cannot check its kernels; compile-time constants are upper case.)

import os

import triton  # type: ignore[import-untyped,import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-untyped,import-not-found,unused-ignore]


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


#: True when the kernels below run in Triton's interpreter (on CPU tensors), False when they compile for a GPU.
INTERPRETED: bool = _interpreting()


@triton.jit
def _columns(n_cols, BLOCK_C: tl.constexpr):
    """This program's block of features (grid axis 1) and which of them exist."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < n_cols


@triton.jit
def _tile(rows, row_end, cols, col_mask, n_cols):
    """The mask and 64-bit element offsets of the tile ``rows x cols`` (rows at or beyond ``row_end`` masked)."""
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    return mask, rows.to(tl.int64)[:, None] * n_cols + cols[None, :]


@triton.jit
def stats_partials(
    x_ptr,
    mean_ptr,
    m2_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per program: the mean of ``x - k`` and the ``M2`` of its ``rows_per_program`` rows (fewer in the last).

    ``k`` is the matrix's first row, the same shift for every program, so that
    ``|mean| >> std`` loses nothing: the partial means are small and exact to
    a few units of their own size, and merge without cancellation. Each tile
    of ``BLOCK_M`` rows is reduced two-pass in registers (its mean, then the
    squares of the deviations from it) and merged into the running result
    with Chan's formula: ``delta = mean_b - mean_a``, ``mean += delta * n_b / n``,
    ``M2 += M2_b + delta^2 * n_a * n_b / n``.
    """
    pid_m = tl.program_id(0)
    cols, col_mask = _columns(n_cols, BLOCK_C)
    first = pid_m * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    shift = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)  # of x - shift
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for start in range(first, last, BLOCK_M):
        mask, offsets = _tile(start + tl.arange(0, BLOCK_M), last, cols, col_mask, n_cols)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        shifted = tl.where(mask, x - shift[None, :], 0.0)
        seen = (start - first).to(ACC)
        new = tl.minimum(last - start, BLOCK_M).to(ACC)
        block_mean = tl.sum(shifted, axis=0) / new
        centered = tl.where(mask, shifted - block_mean[None, :], 0.0)
        block_m2 = tl.sum(centered * centered, axis=0)
        total = seen + new
        delta = block_mean - mean
        mean += delta * (new / total)
        m2 += block_m2 + delta * delta * (seen * new / total)
    out = pid_m.to(tl.int64) * n_cols + cols
    tl.store(mean_ptr + out, mean, mask=col_mask)
    tl.store(m2_ptr + out, m2, mask=col_mask)


@triton.jit
def grad_sums_partials(
    dy_ptr,
    x_ptr,
    mean_ptr,
    sum_dy_ptr,
    sum_dy_centered_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per program: ``sum(dy)`` and ``sum(dy * (x - mean))`` over its rows, per feature."""
    pid_m = tl.program_id(0)
    cols, col_mask = _columns(n_cols, BLOCK_C)
    mu = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    first = pid_m * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dy_centered = tl.zeros([BLOCK_C], dtype=ACC)
    for start in range(first, last, BLOCK_M):
        mask, offsets = _tile(start + tl.arange(0, BLOCK_M), last, cols, col_mask, n_cols)
        g = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        sum_dy += tl.sum(g, axis=0)
        sum_dy_centered += tl.sum(g * (x - mu[None, :]), axis=0)  # g is 0 where masked
    out = pid_m.to(tl.int64) * n_cols + cols
    tl.store(sum_dy_ptr + out, sum_dy, mask=col_mask)
    tl.store(sum_dy_centered_ptr + out, sum_dy_centered, mask=col_mask)


@triton.jit
def normalize(
    x_ptr,
    y_ptr,
    mean_ptr,
    scale_ptr,
    bias_ptr,
    n_rows,
    n_cols,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """``y = relu?((x - mean) * scale + bias)``, rounded once to ``y``'s dtype."""
    cols, col_mask = _columns(n_cols, BLOCK_C)
    mask, offsets = _tile(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), n_rows, cols, col_mask, n_cols)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    y = (x - mu[None, :]) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as with torch.relu
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_input(
    dy_ptr,
    x_ptr,
    dx_ptr,
    mean_ptr,
    invstd_ptr,
    gain_ptr,
    mean_dy_ptr,
    mean_dy_xhat_ptr,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """``dx = gain * (dy - mean_dy - x_hat * mean_dy_xhat)`` with ``x_hat = (x - mean) * invstd``."""
    cols, col_mask = _columns(n_cols, BLOCK_C)
    mask, offsets = _tile(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), n_rows, cols, col_mask, n_cols)
    g = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0)
    gain = tl.load(gain_ptr + cols, mask=col_mask, other=0.0)
    mean_dy = tl.load(mean_dy_ptr + cols, mask=col_mask, other=0.0)
    mean_dy_xhat = tl.load(mean_dy_xhat_ptr + cols, mask=col_mask, other=0.0)
    x_hat = (x - mu[None, :]) * invstd[None, :]
    dx = (g - mean_dy[None, :] - x_hat * mean_dy_xhat[None, :]) * gain[None, :]
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
