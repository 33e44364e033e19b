"""What the tests, the benchmarks and `python -m fusedlstm check` share to measure a layer.

- `reference`: a float64 NumPy LSTM, forward and backward (BPTT).
- `parity`: outputs and gradients of a Keras layer, as NumPy arrays, on the
  active backend.
"""
