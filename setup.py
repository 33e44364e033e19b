from setuptools import setup

setup(
    name="fusedlstm",
    version="0.1.0",
    description="A drop-in keras.layers.LSTM whose recurrence runs in one fused Numba kernel.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fusedlstm", "fusedlstm.backends", "fusedlstm.cli", "fusedlstm.testing",
              "fusedlstm.kernels", "fusedlstm.kernels.cpu", "fusedlstm.kernels.cuda"],
    package_dir={"fusedlstm": "fusedlstm", "fusedlstm.kernels": "kernels"},
    install_requires=["keras>=3.14", "numba>=0.60", "numpy", "threadpoolctl"],
    extras_require={
        "tensorflow": ["tensorflow>=2.16"],
        "tensorflow-cpu": ["tensorflow-cpu>=2.16"],
        "torch": ["torch>=2.2"],
        "torch-cpu": ["torch==2.13.0"],
        "jax": ["jax>=0.10,<0.11"],  # below the next minor: see fusedlstm/backends/xla_ffi.py
        "cuda": ["numba-cuda[cu13]>=0.30"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "h5py", "scipy", "threadpoolctl"],
        "cli": ["matplotlib", "statsmodels"],
        # What `keras.Model.export` needs for the onnx and openvino formats, and
        # onnxruntime to serve ONNX (tests/test_export_*.py).
        "export": ["onnx", "onnxruntime", "tf2onnx", "openvino"],
        "sass": ["nvidia-cuda-nvcc>=13", "nvidia-cuda-runtime>=13", "nvidia-cuda-nvdisasm>=13"],
    },
)
