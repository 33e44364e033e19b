"""Numba kernels for the fused LSTM recurrence (NumPy and Numba only).

`cpu` holds the `njit` kernels and their NumPy host drivers `forward` and
`backward`; the CUDA kernels share the same driver signatures and the gate
math in `gates`.
"""
