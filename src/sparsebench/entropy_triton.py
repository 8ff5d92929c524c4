"""Configuration entropy's sums and closed-form gradient as two Triton kernels (CUDA).

What :mod:`sparsebench.regularizers.configuration_entropy` runs on GPU tensors: one pass
over ``W`` for the sums ``S_raw = |32 Cx W|^2 + |32 Cy W|^2`` and ``A = sum |W|`` of every
stacked matrix, and one pass that adds ``c1 P_raw - c2 sign(W)`` to the gradient, with
``P_raw = 1024 (Cx^T Cx + Cy^T Cy) W`` (the formulas, the stencils and their border
corrections are in that module's notes). Each program takes one tile of one matrix; the
neighbours a tile needs are read again from the cache, not from memory. The sums are
reduced per tile and then over the tiles in a fixed order, so the results do not depend on
scheduling, and neither kernel synchronises with the host: a training step that uses them
can be captured in a CUDA graph.

Triton comes with PyTorch's Linux wheels and compiles the kernels on first use (about a
second; cached on disk after). ``TRITON_INTERPRET=1`` runs them on CPU tensors, which is how
the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# A program's tile. The gradient keeps 21 neighbours of each of its elements live: compiled
# for sm_90 (ptxas -v), 8 x 64 takes 86 registers a thread in float32 and 140 in float64,
# without spills, where 16 x 128 spilled (255 registers).
BLOCK_ROWS = 8
BLOCK_COLS = 64
# Multiply-adds fused, as in the CPU kernels (numba's fastmath), said explicitly: Triton
# 3.9 warns that its default turns to unfused in 3.10, which would change the rounding.
FP_FUSION = True


@triton.jit
def _load(base, rows, cols, n, m):
    """W at (rows, cols), zero outside the matrix (the convolutions' zero padding)."""
    inside = (rows >= 0) & (rows < n) & (cols >= 0) & (cols < m)
    return tl.load(base + rows * m + cols, mask=inside, other=0.0)


@triton.jit
def _sums_kernel(w_ptr, s_ptr, a_ptr, n, m, tiles_c, BR: tl.constexpr, BC: tl.constexpr):
    tile = tl.program_id(0)
    k = tl.program_id(1)
    tiles = tl.num_programs(0)
    r = (tile // tiles_c) * BR + tl.arange(0, BR)[:, None]
    c = (tile % tiles_c) * BC + tl.arange(0, BC)[None, :]
    base = w_ptr + k.to(tl.int64) * n * m
    ul = _load(base, r - 1, c - 1, n, m)
    uc = _load(base, r - 1, c, n, m)
    ur = _load(base, r - 1, c + 1, n, m)
    cl = _load(base, r, c - 1, n, m)
    x = _load(base, r, c, n, m)
    cr = _load(base, r, c + 1, n, m)
    dl = _load(base, r + 1, c - 1, n, m)
    dc = _load(base, r + 1, c, n, m)
    dr = _load(base, r + 1, c + 1, n, m)
    # 32 Cx W: vertical smoothing [3, 10, 3], then the horizontal difference [1, 0, -1];
    # 32 Cy W: vertical difference, then horizontal smoothing.
    ex = (3 * (ul + dl) + 10 * cl) - (3 * (ur + dr) + 10 * cr)
    ey = 3 * ((ul - dl) + (ur - dr)) + 10 * (uc - dc)
    inside = (r < n) & (c < m)
    squares = tl.where(inside, ex * ex + ey * ey, 0.0)
    tl.store(s_ptr + k * tiles + tile, tl.sum(tl.sum(squares, axis=1), axis=0))
    tl.store(a_ptr + k * tiles + tile, tl.sum(tl.sum(tl.abs(x), axis=1), axis=0))


@triton.jit
def _vertical(base, r, c, n, m, v1c, v2c):
    """``(V1 W, V2 W)`` at (r, c): V1 = [9, 60, v1c, 60, 9], V2 = [-1, 0, v2c, 0, -1]."""
    up2 = _load(base, r - 2, c, n, m)
    down2 = _load(base, r + 2, c, n, m)
    centre = _load(base, r, c, n, m)
    t1 = 9 * (up2 + down2) + 60 * (_load(base, r - 1, c, n, m) + _load(base, r + 1, c, n, m))
    return t1 + v1c * centre, v2c * centre - (up2 + down2)


@triton.jit
def _vertical_difference(base, r, c, n, m, v2c):
    """``V2 W`` at (r, c) alone (the columns where H1 is zero)."""
    outer = _load(base, r - 2, c, n, m) + _load(base, r + 2, c, n, m)
    return v2c * _load(base, r, c, n, m) - outer


@triton.jit
def _grad_kernel(w_ptr, g_ptr, c1_ptr, c2_ptr, n, m, tiles_c, BR: tl.constexpr, BC: tl.constexpr):
    tile = tl.program_id(0)
    k = tl.program_id(1)
    r = (tile // tiles_c) * BR + tl.arange(0, BR)[:, None]
    c = (tile % tiles_c) * BC + tl.arange(0, BC)[None, :]
    offset = k.to(tl.int64) * n * m
    base = w_ptr + offset
    x = _load(base, r, c, n, m)
    # Centre taps: one term fewer on a border row (column), two on a matrix of one row.
    row_ends = (r == 0).to(x.dtype) + (r == n - 1).to(x.dtype)
    col_ends = (c == 0).to(x.dtype) + (c == m - 1).to(x.dtype)
    v1c = 118 - 9 * row_ends
    v2c = 2 - row_ends
    h1c = 2 - col_ends
    h2c = 118 - 9 * col_ends
    # P_raw = sum over columns dx of H1[dx] (V1 W) + H2[dx] (V2 W), with
    # H1 = [-1, 0, h1c, 0, -1] and H2 = [9, 60, h2c, 60, 9].
    t1_l2, t2_l2 = _vertical(base, r, c - 2, n, m, v1c, v2c)
    t1_c, t2_c = _vertical(base, r, c, n, m, v1c, v2c)
    t1_r2, t2_r2 = _vertical(base, r, c + 2, n, m, v1c, v2c)
    t2_l1 = _vertical_difference(base, r, c - 1, n, m, v2c)
    t2_r1 = _vertical_difference(base, r, c + 1, n, m, v2c)
    p = 9 * (t2_l2 + t2_r2) - (t1_l2 + t1_r2) + 60 * (t2_l1 + t2_r1) + h1c * t1_c + h2c * t2_c
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)
    c1 = tl.load(c1_ptr + k)
    c2 = tl.load(c2_ptr + k)
    inside = (r < n) & (c < m)
    where = g_ptr + offset + r * m + c
    g = tl.load(where, mask=inside, other=0.0)
    tl.store(where, g + c1 * p - c2 * sign, mask=inside)


def _grid(w: Tensor) -> tuple[tuple[int, int], int]:
    """((tiles per matrix, matrices), tiles per row of tiles) for a stack ``(K, n, m)``."""
    kk, n, m = w.shape
    tiles_c = triton.cdiv(m, BLOCK_COLS)
    return (triton.cdiv(n, BLOCK_ROWS) * tiles_c, kk), tiles_c


def _launch(kernel: triton.JITFunction, w: Tensor, *pointers: Tensor) -> None:
    """``kernel`` over the tiles of the stack ``w``, given ``w`` and ``pointers``."""
    grid, tiles_c = _grid(w)
    n, m = w.shape[1], w.shape[2]
    kernel[grid](
        w, *pointers, n, m, tiles_c, BR=BLOCK_ROWS, BC=BLOCK_COLS, enable_fp_fusion=FP_FUSION
    )


def entropy_sums(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(S_raw, A)`` of every matrix of a C-contiguous stack ``(K, n, m)``, float64 ``(K,)``."""
    (tiles, matrices), _ = _grid(w)
    s = torch.empty(matrices, tiles, dtype=torch.float64, device=w.device)
    a = torch.empty_like(s)
    _launch(_sums_kernel, w, s, a)
    return s.sum(1), a.sum(1)


def add_gradient(w: Tensor, out: Tensor, c1: Tensor, c2: Tensor) -> None:
    """``out[k] += c1[k] P_raw(w[k]) - c2[k] sign(w[k])``; C-contiguous ``w`` and ``out``,
    ``c1`` and ``c2`` of shape ``(K,)`` in ``w``'s dtype."""
    _launch(_grad_kernel, w, out, c1, c2)
