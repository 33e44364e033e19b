"""The weights packed in panels of columns, and their products with a block of rows.

`panel_products` runs the register tile of `tile` over a range of panels and
every row tile of one product (a step's recurrent product, a time chunk's input
projection or input gradient); `panel_accumulate` adds such products into C
(the weight gradients, summed over chunks). `pack_forward` and `pack_backward`
lay a [K, 4H] weight (and its transpose) out in the panels they read;
`pack_gate_rows` does the same for a chunk's gradient rows.

The tile shapes and the panel width follow the vector target Numba compiles
for (`tile.vector_target`), fixed when this module is imported: Numba freezes
`PANEL` and the tiles into the compiled kernels, and its disk cache is keyed
on the same CPU name and features, so a kernel cached for one ISA is never
loaded for another. Three tiles per target, largest first, so that a block of
8 rows (`threads.MIN_ROWS_PER_BLOCK`) takes whole tiles.
"""

import numpy as np
from numba import njit, types

from .tile import make_tile, vector_target

# isa: (vectors per panel row, ((rows, unroll), ...) largest first, ending in 1 row).
# Accumulators per tile: rows * vectors * unroll vector registers, leaving
# room for the `vectors` B vectors and a broadcast of A.
PLANS = {
    # 16 of the 32 zmm registers: the tile the speed numbers were measured with.
    "avx512": (2, ((8, 1), (4, 2), (1, 4))),
    # 12 of the 16 ymm registers (BLIS's 6x16 Haswell shape): 6 + 2 rows per block of 8.
    "avx2": (2, ((6, 1), (2, 3), (1, 4))),
    "avx": (2, ((6, 1), (2, 3), (1, 4))),
    # 16 of the 32 NEON registers, 4 floats each.
    "neon": (4, ((4, 1), (2, 2), (1, 4))),
    # 8 of 16 registers of 4 floats (SSE2, or an architecture not known here).
    "sse": (2, ((4, 1), (2, 2), (1, 4))),
    "portable": (2, ((4, 1), (2, 2), (1, 4))),
}

TARGET = vector_target()
VECTORS, TILE_SHAPES = PLANS[TARGET.isa]
PANEL = VECTORS * TARGET.lanes
TILES = tuple(make_tile(rows, VECTORS, unroll) for rows, unroll in TILE_SHAPES)
ACCUMULATING_TILES = tuple(make_tile(rows, VECTORS, unroll, accumulate=True)
                           for rows, unroll in TILE_SHAPES)
(_ROWS_A, _), (_ROWS_B, _), _ = TILE_SHAPES
_tile_a, _tile_b, _tile_1 = TILES
_add_a, _add_b, _add_1 = ACCUMULATING_TILES

# One compiled signature each, shared by every kernel: a call with a constant
# argument (an offset of 0, 4 groups) would otherwise compile a copy of its own
# for that literal value, most of a second of first compile per copy.
_index = types.intp
_PRODUCTS_SIGNATURE = types.void(
    types.float32[:, ::1], _index, _index, _index, _index, _index, types.float32[::1], _index,
    _index, _index, _index, types.float32[:, ::1], _index, _index, _index)


@njit(_PRODUCTS_SIGNATURE, nogil=True, error_model="numpy", cache=True)
def panel_products(a, a_off, a_group_off, lda, rows, depth, packed, b_group_off, b_panel_off,
                   p0, p1, c, c_group_off, ldc, groups):
    """`c[group, m, p] = a[group, m] @ packed[group, p]` for each group, panel p in [p0, p1)
    and row m < rows.

    Row m of group g of A (2-D) starts at flat offset `a_off + g * a_group_off
    + m * lda` and has `depth` floats; its panel p starts at `g * b_group_off +
    p * b_panel_off` in `packed` (1-D); the product lands at `g * c_group_off +
    p * PANEL + m * ldc` in `c` (2-D). Panels run outermost so that each stays
    in cache across the row tiles. One compiled function serves the forward
    and backward kernels of every activation pair.
    """
    for g in range(groups):
        a_group = a_off + g * a_group_off
        for p in range(p0, p1):
            b_off = g * b_group_off + p * b_panel_off
            c_off = g * c_group_off + p * PANEL
            m = 0
            while m + _ROWS_A <= rows:
                _tile_a(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += _ROWS_A
            while m + _ROWS_B <= rows:
                _tile_b(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += _ROWS_B
            while m < rows:
                _tile_1(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += 1


@njit(_PRODUCTS_SIGNATURE, nogil=True, error_model="numpy", cache=True)
def panel_accumulate(a, a_off, a_group_off, lda, rows, depth, packed, b_group_off, b_panel_off,
                     p0, p1, c, c_group_off, ldc, groups):
    """`c[group, m, p] += a[group, m] @ packed[group, p]`: `panel_products` with the
    accumulating tiles, the same arguments."""
    for g in range(groups):
        a_group = a_off + g * a_group_off
        for p in range(p0, p1):
            b_off = g * b_group_off + p * b_panel_off
            c_off = g * c_group_off + p * PANEL
            m = 0
            while m + _ROWS_A <= rows:
                _add_a(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += _ROWS_A
            while m + _ROWS_B <= rows:
                _add_b(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += _ROWS_B
            while m < rows:
                _add_1(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += 1


@njit(error_model="numpy", cache=True)
def pack_forward(weights):
    """[4, P, K, PANEL]: each gate block of a [K, 4H] weight (the recurrent kernel,
    K = H, or the input kernel, K = C) in P panels of PANEL columns, zero-padded."""
    K, H = weights.shape[0], weights.shape[1] // 4
    panels = -(-H // PANEL)
    packed = np.zeros((4, panels, K, PANEL), np.float32)
    for g in range(4):
        for p in range(panels):
            j1 = min(PANEL, H - p * PANEL)
            for k in range(K):
                for j in range(j1):
                    packed[g, p, k, j] = weights[k, g * H + p * PANEL + j]
    return packed


@njit(error_model="numpy", cache=True)
def pack_backward(weights):
    """[P, 4H, PANEL]: the transpose [4H, K] of a [K, 4H] weight in P panels of PANEL
    columns, zero-padded."""
    K, H4 = weights.shape
    panels = -(-K // PANEL)
    packed = np.zeros((panels, H4, PANEL), np.float32)
    for p in range(panels):
        j1 = min(PANEL, K - p * PANEL)
        for j in range(j1):
            for k in range(H4):
                packed[p, k, j] = weights[p * PANEL + j, k]
    return packed


@njit(nogil=True, error_model="numpy", cache=True)
def pack_gate_rows(src, m0, rows, packed):
    """Rows [m0, m0 + rows) of `src` [M, 4H] into `packed` [4, P, M, PANEL], the layout of
    `pack_forward` with the rows as K; the padding columns are left as they are (zero)."""
    H = src.shape[1] // 4
    for g in range(4):
        for p in range(packed.shape[1]):
            j1 = min(PANEL, H - p * PANEL)
            for m in range(m0, m0 + rows):
                for j in range(j1):
                    packed[g, p, m, j] = src[m, g * H + p * PANEL + j]
