"""The recurrent kernel packed in panels of columns, and its products with a block of rows.

`panel_products` runs the register tile of `tile` over every panel and row
tile of one step's product; `pack_forward` and `pack_backward` lay the
recurrent kernel (and its transpose) out in the panels it reads.

The tile shapes and the panel width follow the vector target Numba compiles
for (`tile.vector_target`), fixed when this module is imported: Numba freezes
`PANEL` and the tiles into the compiled kernels, and its disk cache is keyed
on the same CPU name and features, so a kernel cached for one ISA is never
loaded for another. Three tiles per target, largest first, so that a block of
8 rows (`threads.MIN_ROWS_PER_BLOCK`) takes whole tiles.
"""

import numpy as np
from numba import njit

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
(_ROWS_A, _), (_ROWS_B, _), _ = TILE_SHAPES
_tile_a, _tile_b, _tile_1 = TILES


@njit(nogil=True, error_model="numpy", cache=True)
def panel_products(a, a_off, a_group_off, lda, rows, depth, packed, b_group_off, b_panel_off,
                    panels, c, c_group_off, ldc, groups):
    """`c[group, m, p] = a[group, m] @ packed[group, p]` for each group, panel p and row m < rows.

    Row m of group g of A (2-D) starts at flat offset `a_off + g * a_group_off
    + m * lda` and has `depth` floats; its panel p starts at `g * b_group_off +
    p * b_panel_off` in `packed` (1-D); the product lands at `g * c_group_off +
    p * PANEL + m * ldc` in `c` (2-D). Panels run outermost so that each stays
    in cache across the row tiles. One compiled function serves the forward
    and backward kernels of every activation pair.
    """
    for g in range(groups):
        a_group = a_off + g * a_group_off
        for p in range(panels):
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


@njit(error_model="numpy", cache=True)
def pack_forward(recurrent_kernel):
    """[4, P, H, PANEL]: each gate block of [H, 4H] in panels of PANEL columns, zero-padded."""
    H = recurrent_kernel.shape[0]
    panels = -(-H // PANEL)
    packed = np.zeros((4, panels, H, PANEL), np.float32)
    for g in range(4):
        for p in range(panels):
            j1 = min(PANEL, H - p * PANEL)
            for k in range(H):
                for j in range(j1):
                    packed[g, p, k, j] = recurrent_kernel[k, g * H + p * PANEL + j]
    return packed


@njit(error_model="numpy", cache=True)
def pack_backward(recurrent_kernel):
    """[P, 4H, PANEL]: the transpose [4H, H] in panels of PANEL columns, zero-padded."""
    H = recurrent_kernel.shape[0]
    panels = -(-H // PANEL)
    packed = np.zeros((panels, 4 * H, PANEL), np.float32)
    for p in range(panels):
        j1 = min(PANEL, H - p * PANEL)
        for j in range(j1):
            for k in range(4 * H):
                packed[p, k, j] = recurrent_kernel[p * PANEL + j, k]
    return packed
