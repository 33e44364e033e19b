"""One module per Keras backend (`tensorflow`, `torch`, `jax`), each exposing the
same `lstm_sequence` op (`fusedlstm.ops` dispatches to it), and what they share:
the op contract (`contract`), the projection math around the kernels
(`projection`), the XLA FFI binding of the JAX custom calls (`xla_ffi`) and
the CPU/GPU policy of `use_fused="auto"` (`gpu_policy`).
"""
