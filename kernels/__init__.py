"""Triton kernels of zokern (installed as `zokern.kernels`); launched by zokern/backends/triton.py."""
from .philox import INTERPRET, fill_random_kernel, philox_words_kernel
from .mezo import BFLOAT16, FLOAT16, FLOAT32, mezo_kernel

__all__ = ["INTERPRET", "fill_random_kernel", "philox_words_kernel", "mezo_kernel",
           "FLOAT32", "BFLOAT16", "FLOAT16"]
