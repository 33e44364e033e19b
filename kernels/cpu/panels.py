"""The recurrent kernel packed in panels of columns, and its products with a block of rows.

`panel_products` runs the register tile of `tile` over every panel and row
tile of one step's product; `pack_forward` and `pack_backward` lay the
recurrent kernel (and its transpose) out in the panels it reads.
"""

import numpy as np
from numba import njit

from .tile import LANES, make_tile

_VECTORS = 2
PANEL = _VECTORS * LANES
_tile_8 = make_tile(8, _VECTORS, 1)
_tile_4 = make_tile(4, _VECTORS, 2)
_tile_1 = make_tile(1, _VECTORS, 4)


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
            while m + 8 <= rows:
                _tile_8(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += 8
            while m + 4 <= rows:
                _tile_4(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += 4
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
