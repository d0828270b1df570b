"""Packaging for lgm-op: the L-GM loss as an MXNet operator with hand-written CPU and CUDA code."""
from setuptools import setup

# The GPU path: CuPy and NVRTC for CUDA 12 ("gpu"), or for CUDA 11 ("cu11"), the CUDA of MXNet's
# own GPU builds (mxnet-cu112 ... mxnet-cu117); the README says which GPUs each pairing covers.
CUDA_RUNTIME = ["cupy-cuda12x==13.6.0", "nvidia-cuda-nvrtc-cu12>=12.0,<13"]
CUDA11_RUNTIME = ["cupy-cuda11x==13.6.0", "nvidia-cuda-nvrtc-cu11>=11.2,<12"]
DEMO = ["mlxtend>=0.23", "scikit-learn>=1.0", "matplotlib>=3.7", "tqdm>=4.60"]
# cuobjdump (and the nvdisasm it runs) for benchmarks/sass_report.py, which the tests run (no GPU
# needed)
SASS_TOOLS = ["nvidia-cuda-cuobjdump>=13.0,<14", "nvidia-cuda-nvdisasm>=13.0,<14"]
# The NVRTC the recorded report was compiled with: the tests hold the kernels as compiled to the
# report's targets, and another compiler schedules them differently
REPORT_COMPILER = ["nvidia-cuda-nvrtc-cu12==12.9.86"]
# lgm_op.torch: PyTorch's CPU build, pinned to its file (the plain version on PyPI is the CUDA
# build of several GB; on a GPU machine install the matching CUDA build of torch instead)
TORCH = ["torch==2.13.0+cpu"]

setup(
    name="lgm-op",
    version="0.1.0",
    description="Large-margin Gaussian mixture (L-GM) loss for MXNet with hand-written "
                "NumPy/BLAS and CUDA forward and backward",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The CUDA sources live in the top-level kernels/ folder and are installed as the data-only
    # package lgm_op.kernels, so an installed copy finds them next to its own code.
    packages=["lgm_op", "lgm_op.cudasim", "lgm_op.demo", "lgm_op.kernels"],
    package_dir={"lgm_op.kernels": "kernels"},
    package_data={
        "lgm_op.kernels": ["*.cu", "*.cuh", "*.cpp"],
        "lgm_op.cudasim": ["*.h"],
    },
    install_requires=["mxnet==1.9.1", "numpy<1.24"],
    extras_require={
        "gpu": CUDA_RUNTIME,
        "cu11": CUDA11_RUNTIME,
        "demo": DEMO,
        "torch": TORCH,
        "test": ["pytest>=7", "pytest-timeout>=2.1"] + DEMO + CUDA_RUNTIME + REPORT_COMPILER
        + SASS_TOOLS + TORCH,
    },
)
