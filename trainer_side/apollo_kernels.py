"""One read of the gradient for APOLLO-Mini's first pass: its rank-1 projection and its channel norms.

APOLLO's first pass needs two reductions of the gradient G: the projection R (G @ P.T when rows >= cols,
P.T @ G otherwise) and the squared norm of each channel. Done with torch ops, G is upcast to fp32 in
chunks and read three times (copy, matmul, norm). These Triton kernels read each bf16/fp32 element of G
once, accumulate both reductions in fp32 registers, and write only the small results, so the optimizer
step approaches its memory floor (reading G twice in all and reading and writing the parameter once).

Used for rank 1 on CUDA (`fits`); everything else takes the torch path in `apollo.py`. The second pass,
`apply_update`, is a kernel too: torch's mixed-dtype addcmul_ (bf16 weights, fp32 coefficient) runs at a
quarter of the bandwidth. The kernels also
run under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, which is how CPU machines test them.

Tests: .venv/bin/python -m pytest tests/test_apollo_kernels.py
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: `fits` is then always False.
    triton = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Rows of G per program of the row kernel, and columns per loop iteration.
_ROWS_BLOCK_R, _ROWS_BLOCK_C = 4, 512
# Column kernel: columns per program and rows per loop iteration. Each program sums a run of rows and
# the runs' partial sums are added afterwards, with enough runs for about `_TARGET_PROGRAMS` programs,
# so short-and-wide matrices still fill the GPU.
_COLS_BLOCK_C, _COLS_BLOCK_R = 1024, 2
_TARGET_PROGRAMS = 2048
# Tile of the parameter per program of the update kernel.
_UPDATE_BLOCK_R, _UPDATE_BLOCK_C = 4, 1024


def fits(grad: Tensor, rank: int) -> bool:
    """Whether the kernels handle this gradient: rank 1, 2-D, on CUDA (or any device when interpreted)."""
    return (
        triton is not None
        and rank == 1
        and grad.dim() == 2
        and grad.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and (grad.is_cuda or _INTERPRETED)
    )


def fits_update(p: Tensor, grad: Tensor) -> bool:
    """Whether `apply_update` handles this 2-D parameter and gradient (any rank, on CUDA or interpreted)."""
    return (
        triton is not None
        and p.dim() == 2
        and p.shape == grad.shape
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and grad.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and (p.is_cuda or _INTERPRETED)
    )


def project_rank1(grad: Tensor, proj: Tensor) -> tuple[Tensor, Tensor]:
    """(R, channel_sq) of a (rows, cols) gradient for a rank-1 projection, both float32.

    `proj` is (1, cols) when rows >= cols (R = G @ P.T, (rows, 1); channel_sq (rows,): row norms^2)
    and (rows, 1) otherwise (R = P.T @ G, (1, cols); channel_sq (cols,): column norms^2), as
    `apollo.projection` draws it.
    """
    rows, cols = grad.shape
    p = proj.reshape(-1).float().contiguous()
    if rows >= cols:
        r = torch.empty(rows, device=grad.device, dtype=torch.float32)
        sq = torch.empty(rows, device=grad.device, dtype=torch.float32)
        grid = (triton.cdiv(rows, _ROWS_BLOCK_R),)
        _rows_kernel[grid](
            grad,
            p,
            r,
            sq,
            rows,
            cols,
            grad.stride(0),
            grad.stride(1),
            BLOCK_R=_ROWS_BLOCK_R,
            BLOCK_C=_ROWS_BLOCK_C,
        )
        return r.reshape(rows, 1), sq
    col_blocks = triton.cdiv(cols, _COLS_BLOCK_C)
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, col_blocks), triton.cdiv(rows, _COLS_BLOCK_R)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, splits), _COLS_BLOCK_R) * _COLS_BLOCK_R
    splits = triton.cdiv(rows, rows_per_program)
    r_parts = torch.empty(splits, cols, device=grad.device, dtype=torch.float32)
    sq_parts = torch.empty(splits, cols, device=grad.device, dtype=torch.float32)
    grid = (col_blocks, splits)
    _cols_kernel[grid](
        grad,
        p,
        r_parts,
        sq_parts,
        rows,
        cols,
        grad.stride(0),
        grad.stride(1),
        rows_per_program,
        BLOCK_R=_COLS_BLOCK_R,
        BLOCK_C=_COLS_BLOCK_C,
    )
    if splits == 1:
        return r_parts, sq_parts[0]
    return r_parts.sum(0, keepdim=True), sq_parts.sum(0)


def apply_update(p: Tensor, grad: Tensor, coef: Tensor, step_size: float, decay: float) -> None:
    """p <- (p - step_size * coef * G) * (1 - decay), computed in fp32 and rounded once into p.

    `coef` is fp32 and broadcasts to p: (1, 1), (rows, 1) or (1, cols). It stays on the device (no host
    sync), and the kernel reads p and G once and writes p once. Torch's addcmul_ with a bf16 p and G and
    an fp32 coefficient takes its slow mixed-dtype path (4x this kernel on an H200).
    """
    rows, cols = p.shape
    grid = (triton.cdiv(rows, _UPDATE_BLOCK_R), triton.cdiv(cols, _UPDATE_BLOCK_C))
    coef = coef.expand(rows, cols)
    _update_kernel[grid](
        p, grad, coef, rows, cols, p.stride(0), p.stride(1), grad.stride(0), grad.stride(1),
        coef.stride(0), coef.stride(1), -step_size, 1.0 - decay,
        BLOCK_R=_UPDATE_BLOCK_R, BLOCK_C=_UPDATE_BLOCK_C,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _update_kernel(
        p_ptr, g_ptr, coef_ptr, n_rows, n_cols, p_stride_r, p_stride_c, g_stride_r, g_stride_c,
        coef_stride_r, coef_stride_c, neg_step_size, keep,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # 2-D tiles: no integer division per element, and unit column strides load as vectors.
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        p_at = p_ptr + rows * p_stride_r + cols * p_stride_c
        p = tl.load(p_at, mask=mask, other=0.0)
        g = tl.load(g_ptr + rows * g_stride_r + cols * g_stride_c, mask=mask, other=0.0).to(tl.float32)
        coef = tl.load(coef_ptr + rows * coef_stride_r + cols * coef_stride_c, mask=mask, other=0.0)
        updated = (p.to(tl.float32) + neg_step_size * coef * g) * keep
        tl.store(p_at, updated.to(p.dtype), mask=mask)

    @triton.jit
    def _rows_kernel(
        g_ptr,
        p_ptr,
        r_ptr,
        sq_ptr,
        n_rows,
        n_cols,
        stride_r,
        stride_c,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        row_offsets = rows.to(tl.int64)[:, None] * stride_r
        acc_r = tl.zeros((BLOCK_R,), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            col_mask = cols < n_cols
            g = tl.load(
                g_ptr + row_offsets + cols.to(tl.int64)[None, :] * stride_c,
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            p = tl.load(p_ptr + cols, mask=col_mask, other=0.0)
            acc_r += tl.sum(g * p[None, :], axis=1)
            acc_sq += tl.sum(g * g, axis=1)
        tl.store(r_ptr + rows, acc_r, mask=row_mask)
        tl.store(sq_ptr + rows, acc_sq, mask=row_mask)

    @triton.jit
    def _cols_kernel(
        g_ptr,
        p_ptr,
        r_parts_ptr,
        sq_parts_ptr,
        n_rows,
        n_cols,
        stride_r,
        stride_c,
        rows_per_program,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        col_offsets = cols.to(tl.int64)[None, :] * stride_c
        split = tl.program_id(1)
        acc_r = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for offset in range(0, rows_per_program, BLOCK_R):
            rows = split * rows_per_program + offset + tl.arange(0, BLOCK_R)
            row_mask = rows < n_rows
            g = tl.load(
                g_ptr + rows.to(tl.int64)[:, None] * stride_r + col_offsets,
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            p = tl.load(p_ptr + rows, mask=row_mask, other=0.0)
            acc_r += tl.sum(g * p[:, None], axis=0)
            acc_sq += tl.sum(g * g, axis=0)
        out = split.to(tl.int64) * n_cols + cols
        tl.store(r_parts_ptr + out, acc_r, mask=col_mask)
        tl.store(sq_parts_ptr + out, acc_sq, mask=col_mask)
