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


def apply_update(
    p: Tensor, grad: Tensor, coef: Tensor, step_size: float, decay: float, ok: Tensor | None = None
) -> None:
    """p <- (p - step_size * coef * G) * (1 - decay), computed in fp32 and rounded once into p.

    `coef` is fp32 and broadcasts to p: (1, 1), (rows, 1) or (1, cols). It stays on the device (no host
    sync), and the kernel reads p and G once and writes p once. With `ok` (0-d bool on the device), p
    is written only if it is true, again with no host sync. Torch's addcmul_ with a bf16 p and G and
    an fp32 coefficient takes its slow mixed-dtype path (4x this kernel on an H200).
    """
    rows, cols = p.shape
    grid = (triton.cdiv(rows, _UPDATE_BLOCK_R), triton.cdiv(cols, _UPDATE_BLOCK_C))
    coef = coef.expand(rows, cols)
    _update_kernel[grid](
        p, grad, coef, ok.to(torch.uint8) if ok is not None else coef, rows, cols, p.stride(0), p.stride(1),
        grad.stride(0), grad.stride(1), coef.stride(0), coef.stride(1), -step_size, 1.0 - decay,
        BLOCK_R=_UPDATE_BLOCK_R, BLOCK_C=_UPDATE_BLOCK_C, HAS_OK=ok is not None,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _update_kernel(
        p_ptr, g_ptr, coef_ptr, ok_ptr, n_rows, n_cols, p_stride_r, p_stride_c, g_stride_r, g_stride_c,
        coef_stride_r, coef_stride_c, neg_step_size, keep,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_OK: tl.constexpr,
    ):  # fmt: skip
        # 2-D tiles: no integer division per element, and unit column strides load as vectors.
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        if HAS_OK:  # a masked-out parameter: nothing is stored
            flag = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32) + tl.load(ok_ptr).to(tl.int32)
            mask = mask & (flag != 0)
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


# ---------------------------------------------------------------------------------------------------
# Grouped launches: one kernel launch per pass for all matrices of a param group. At 27B (498 matrices)
# a launch per matrix and pass costs more CPU time than the GPU needs for the traffic; a program here
# finds its matrix in a table built once per set of shapes, and the addresses come from a pointer table.

_GROUP_UPDATE_ROW_TILES = 1  # row tiles of the update kernel per program: fewer, larger programs
_group_tables: dict[tuple, dict[str, Tensor]] = {}


def fits_group(params: list[Tensor], rank: int) -> bool:
    """Whether the grouped kernels handle these parameters and their gradients: rank 1, 2-D, one device,
    one parameter dtype and one gradient dtype."""
    if not params or triton is None or rank != 1:
        return False
    first = params[0]
    return all(
        p.dim() == 2
        and p.grad is not None
        and p.grad.shape == p.shape
        and p.device == first.device
        and p.dtype == first.dtype
        and p.grad.dtype == first.grad.dtype
        and _vector_friendly(p)
        and _vector_friendly(p.grad)
        for p in params
    ) and (fits(first.grad, rank) and fits_update(first, first.grad))


def _vector_friendly(t: Tensor) -> bool:
    """Rows of unit column stride, starting and ending at 16-byte boundaries: the grouped kernels read them
    as vectors (their shapes and strides come from tables, so Triton cannot see this for itself)."""
    return (
        t.stride(1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0
        and (t.shape[1] * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def _programs(blocks: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """(matrix of each program, first program of each matrix) for `blocks[i]` programs of matrix i."""
    counts = torch.tensor(blocks, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    owner = torch.repeat_interleave(torch.arange(len(blocks), dtype=torch.int32), counts)
    return owner.to(device), starts.to(device)


def _tables(shapes: tuple[tuple[int, int], ...], device: torch.device) -> dict[str, Tensor]:
    """Program tables of the grouped kernels for matrices of `shapes`, built once per set of shapes."""
    key = (shapes, str(device))
    if key in _group_tables:
        return _group_tables[key]
    rows_kind = [i for i, (r, c) in enumerate(shapes) if r >= c]
    t: dict[str, Tensor] = {}
    # First pass: each matrix's results go to one flat buffer, at an offset.
    sizes = [max(r, c) for r, c in shapes]
    t["out_offsets"] = (torch.cumsum(torch.tensor(sizes), 0) - torch.tensor(sizes)).to(device)
    t["out_size"] = torch.tensor(sum(sizes))
    t["rows"] = torch.tensor([r for r, _ in shapes], dtype=torch.int64).to(device)
    t["cols"] = torch.tensor([c for _, c in shapes], dtype=torch.int64).to(device)
    owner, starts = _programs([triton.cdiv(shapes[i][0], _ROWS_BLOCK_R) for i in rows_kind], device)
    members = torch.tensor(rows_kind, dtype=torch.int32).to(device)
    t["rows_kind_owner"] = members[owner.long()] if rows_kind else owner
    t["rows_kind_start"] = torch.zeros(len(shapes), dtype=torch.int64, device=device)
    if rows_kind:
        t["rows_kind_start"][members.long()] = starts
    # Update: tiles of _UPDATE_BLOCK_R * _GROUP_UPDATE_ROW_TILES rows by _UPDATE_BLOCK_C columns.
    tile_rows = _UPDATE_BLOCK_R * _GROUP_UPDATE_ROW_TILES
    col_tiles = [triton.cdiv(c, _UPDATE_BLOCK_C) for _, c in shapes]
    owner, starts = _programs([triton.cdiv(r, tile_rows) * n for (r, _), n in zip(shapes, col_tiles)], device)
    t["update_owner"], t["update_start"] = owner, starts
    t["col_tiles"] = torch.tensor(col_tiles, dtype=torch.int64).to(device)
    _group_tables[key] = t
    return t


def _to_device(columns: list[list[int]], device: torch.device) -> list[Tensor]:
    """Equal-length int64 columns in one host-to-device copy (each copy costs ~0.1 ms of CPU: a bucket of
    fused updates made ~9 of them), returned as views of the one device tensor."""
    packed = torch.tensor([v for column in columns for v in column], dtype=torch.int64).to(device, non_blocking=True)
    return list(packed.view(len(columns), -1).unbind(0))


def _addresses_and_strides(tensors: list[list[Tensor]]) -> list[list[int]]:
    """For each list of 2-D tensors: its data pointers and row strides (`fits_group` checked that columns
    have unit stride)."""
    columns = []
    for ts in tensors:
        columns += [[t.data_ptr() for t in ts], [t.stride(0) for t in ts]]
    return columns


_TL_DTYPES = {} if triton is None else {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def project_rank1_group(grads: list[Tensor], projs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """`project_rank1` for many gradients at once: one launch for all tall matrices; each wide one has its
    own (`project_rank1` splits its rows over programs, which a grouped launch could only do with atomics
    or a second pass)."""
    device = grads[0].device
    shapes = tuple(tuple(g.shape) for g in grads)
    t = _tables(shapes, device)
    r_all = torch.empty(int(t["out_size"]), device=device, dtype=torch.float32)
    sq_all = torch.empty_like(r_all)
    g_ptrs, g_stride_r, proj_ptrs = _to_device([*_addresses_and_strides([grads]), [p.data_ptr() for p in projs]], device)
    common = (g_ptrs, proj_ptrs, t["out_offsets"], t["rows"], t["cols"], g_stride_r, r_all, sq_all)
    g_dtype = _TL_DTYPES[grads[0].dtype]
    if (n := t["rows_kind_owner"].numel()) > 0:
        _grouped_rows_kernel[(n,)](
            *common, t["rows_kind_owner"], t["rows_kind_start"],
            G_DTYPE=g_dtype, BLOCK_R=_ROWS_BLOCK_R, BLOCK_C=_ROWS_BLOCK_C, VEC=16 // grads[0].element_size(),
        )  # fmt: skip
    out = []
    offset = 0
    for grad, proj, (rows, cols) in zip(grads, projs, shapes):
        size = max(rows, cols)
        if rows >= cols:
            out.append((r_all[offset : offset + size].reshape(rows, 1), sq_all[offset : offset + size]))
        else:
            out.append(project_rank1(grad, proj))
        offset += size
    return out


def apply_update_group(
    params: list[Tensor], grads: list[Tensor], coefs: Tensor, step_sizes: list[float], decays: list[float],
    oks: Tensor | None = None,
) -> None:
    """`apply_update` for many matrices at once, one launch; `coefs` holds one fp32 scalar per matrix.
    With `oks` (one bool per matrix, on the device), a matrix is written only where its flag is true."""
    device = params[0].device
    t = _tables(tuple(tuple(p.shape) for p in params), device)
    neg_steps, keeps = torch.tensor(
        [[-s for s in step_sizes], [1.0 - d for d in decays]], dtype=torch.float32
    ).to(device, non_blocking=True)
    oks = torch.ones(len(params), dtype=torch.int32, device=device) if oks is None else oks.to(torch.int32)
    p_ptrs, p_stride_r, g_ptrs, g_stride_r = _to_device(_addresses_and_strides([params, grads]), device)
    _grouped_update_kernel[(t["update_owner"].numel(),)](
        p_ptrs, g_ptrs, p_stride_r, g_stride_r,
        coefs.contiguous(), neg_steps, keeps, oks, t["rows"], t["cols"], t["col_tiles"],
        t["update_owner"], t["update_start"],
        P_DTYPE=_TL_DTYPES[params[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype],
        BLOCK_R=_UPDATE_BLOCK_R, BLOCK_C=_UPDATE_BLOCK_C, ROW_TILES=_GROUP_UPDATE_ROW_TILES,
        VEC=16 // max(params[0].element_size(), grads[0].element_size()),
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _grouped_rows_kernel(
        g_ptrs, proj_ptrs, out_offsets, rows_of, cols_of, row_strides, r_out, sq_out, owner, start,
        G_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        i = tl.load(owner + pid)
        block = pid - tl.load(start + i)
        g_ptr = tl.load(g_ptrs + i).to(tl.pointer_type(G_DTYPE))
        p_ptr = tl.load(proj_ptrs + i).to(tl.pointer_type(tl.float32))
        n_rows, n_cols = tl.load(rows_of + i), tl.load(cols_of + i)
        # `fits_group` checked: rows of unit column stride, starting and ending at 16-byte boundaries.
        g_ptr = tl.multiple_of(g_ptr, 16)
        stride_r = tl.multiple_of(tl.load(row_strides + i), VEC)
        n_cols = tl.multiple_of(n_cols, VEC)
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        row_offsets = rows.to(tl.int64)[:, None] * stride_r
        acc_r = tl.zeros((BLOCK_R,), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for col_start in range(0, n_cols, BLOCK_C):
            cols = tl.max_contiguous(tl.multiple_of(col_start + tl.arange(0, BLOCK_C), BLOCK_C), BLOCK_C)
            col_mask = cols < n_cols
            g = tl.load(
                g_ptr + row_offsets + cols.to(tl.int64)[None, :],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            p = tl.load(p_ptr + cols, mask=col_mask, other=0.0)
            acc_r += tl.sum(g * p[None, :], axis=1)
            acc_sq += tl.sum(g * g, axis=1)
        out = tl.load(out_offsets + i) + rows
        tl.store(r_out + out, acc_r, mask=row_mask)
        tl.store(sq_out + out, acc_sq, mask=row_mask)

    @triton.jit
    def _grouped_update_kernel(
        p_ptrs, g_ptrs, p_row_strides, g_row_strides, coefs, neg_steps, keeps, oks, rows_of, cols_of, col_tiles, owner,
        start,
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        ROW_TILES: tl.constexpr, VEC: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        i = tl.load(owner + pid)
        local = pid - tl.load(start + i)
        n_col_tiles = tl.load(col_tiles + i)
        tile_r, tile_c = local // n_col_tiles, local % n_col_tiles
        p_ptr = tl.load(p_ptrs + i).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(g_ptrs + i).to(tl.pointer_type(G_DTYPE))
        # A masked-out matrix (its flag 0) has no rows here: nothing is loaded or stored.
        n_rows, n_cols = tl.load(rows_of + i) * tl.load(oks + i), tl.load(cols_of + i)
        # `fits_group` checked: rows of unit column stride at 16-byte boundaries, so loads are vectors.
        p_ptr, g_ptr = tl.multiple_of(p_ptr, 16), tl.multiple_of(g_ptr, 16)
        p_sr = tl.multiple_of(tl.load(p_row_strides + i), VEC)
        g_sr = tl.multiple_of(tl.load(g_row_strides + i), VEC)
        n_cols = tl.multiple_of(n_cols, VEC)
        scale = tl.load(neg_steps + i) * tl.load(coefs + i)  # the same product as `apply_update`'s
        keep = tl.load(keeps + i)
        col_index = tl.max_contiguous(tl.multiple_of(tile_c * BLOCK_C + tl.arange(0, BLOCK_C), BLOCK_C), BLOCK_C)
        cols = col_index.to(tl.int64)[None, :]
        for k in range(ROW_TILES):
            rows = ((tile_r * ROW_TILES + k) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
            mask = (rows < n_rows) & (cols < n_cols)
            p_at = p_ptr + rows * p_sr + cols
            p = tl.load(p_at, mask=mask, other=0.0)
            g = tl.load(g_ptr + rows * g_sr + cols, mask=mask, other=0.0).to(tl.float32)
            updated = (p.to(tl.float32) + scale * g) * keep
            tl.store(p_at, updated.to(P_DTYPE), mask=mask)
