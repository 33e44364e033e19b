"""Numba kernels for the fused LSTM recurrence (NumPy and Numba only).

`cpu` holds the `njit` kernels and their NumPy host drivers `forward` and
`backward`; the CUDA kernels share the same driver signatures and the gate
math in `gates`.
"""

if __name__ != "fusedlstm.kernels":
    raise ImportError(
        "Import the kernels as `fusedlstm.kernels` (install the package with "
        "`pip install -e .`), not as `kernels`: Numba's on-disk cache of the "
        f"compiled kernels is keyed on that module name. Received: {__name__!r}"
    )
