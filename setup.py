"""Package layout: every package under zokern/, the Triton kernels in kernels/ as zokern.kernels and the C++/CUDA
sources in csrc/ as zokern._csrc, from which the extensions are compiled on first use
(zokern/backends/_extension.py)."""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["zokern", "zokern.*"]), "zokern.kernels", "zokern._csrc"],
    package_dir={"zokern.kernels": "kernels", "zokern._csrc": "csrc"},
    package_data={"zokern._csrc": ["include/zokern/*.h", "cpu/*.cpp", "cpu/*.h", "cpu/*.inc", "cuda/*.cu", "cuda/*.cuh"]},
)
