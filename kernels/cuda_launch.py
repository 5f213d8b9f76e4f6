"""Launching the CUDA kernels of ``kernels/cuda/*.cu`` on CuPy arrays.

Each .cu file holds ``template <typename T> __global__`` kernels, compiled for float and double
by NVRTC (through ``cupy.RawModule``) the first time one of them is launched: CuPy is imported
then, never with this module. Every kernel walks its elements with a grid-stride loop, so any
grid is correct; ``launch`` picks a fixed block size and enough blocks for the work, capped.

Arguments are C-contiguous device arrays (passed as pointers) and scalars given as NumPy
scalars of the exact C type of the kernel's parameter: ``np.float32`` / ``np.float64`` for
``T`` (the arrays' dtype), ``np.int64`` for ``long long``. CuPy passes a NumPy scalar with its
own size; a Python int or float would go as 8 bytes whatever the parameter's type.

The CPU test suite runs the same sources and the same wrappers without a GPU:
tests/cuda_emulator.py replaces ``CudaSource.launch`` by a g++ build of the source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
BLOCK = 256  # threads per block
MAX_BLOCKS = 8192  # enough to fill any current GPU; the grid-stride loops cover the rest
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# NVRTC options of every .cu file. CuPy adds its own after them (-ftz=true, -arch=sm_XY, ...)
# and NVRTC takes the last of a repeated option: float32 kernels flush subnormals to zero, as
# CuPy's own kernels do.
OPTIONS = ("-std=c++17",)


def blocks_for(threads: int) -> int:
    """The number of BLOCK-thread blocks launched for ``threads`` threads of work."""
    return max(1, min(MAX_BLOCKS, -(-threads // BLOCK)))


def c_type(kernel: str, dtype) -> str:
    """The C type of the template parameter T for arrays of ``dtype``, or a TypeError."""
    try:
        return C_TYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"{kernel}: expected float32 or float64 arrays, got {dtype}") from None


class CudaSource:
    """One .cu file of kernels/cuda/ (``filename``; an absolute path is taken as it is) and
    the templated kernels it defines.

    ``kernels``: the names of its ``template <typename T> __global__`` kernels; each is
    compiled as name<float> and name<double>, all in one NVRTC build on the first launch.
    """

    def __init__(self, filename: str, kernels):
        self.path = SOURCE_DIR / filename
        self.kernels = tuple(kernels)
        self._module = None
        self._functions: dict = {}

    def __repr__(self):
        return f"CudaSource({self.path.name!r}, {self.kernels})"

    def name_expressions(self) -> list:
        """name<float> and name<double> of each kernel: the instantiations NVRTC compiles."""
        return [f"{k}<{t}>" for k in self.kernels for t in C_TYPES.values()]

    def raw_module(self, cupy):
        """The ``cupy.RawModule`` of this file; NVRTC compiles it on its first use."""
        return cupy.RawModule(
            code=self.path.read_text(), options=OPTIONS, name_expressions=self.name_expressions()
        )

    def _function(self, kernel: str, dtype):
        key = (kernel, c_type(kernel, dtype))
        function = self._functions.get(key)
        if function is None:
            if kernel not in self.kernels:
                raise ValueError(f"{kernel} is not one of the kernels of {self!r}")
            if self._module is None:
                import cupy

                self._module = self.raw_module(cupy)
            function = self._functions[key] = self._module.get_function(f"{key[0]}<{key[1]}>")
        return function

    def launch(self, kernel: str, dtype, threads: int, args: tuple):
        """Run kernel<T> (T = float for float32, double for float64) over ``threads``
        threads of work on CuPy's current stream. ``args``: device arrays (C-contiguous) and
        NumPy scalars of the parameters' exact C types, in the kernel's parameter order."""
        function = self._function(kernel, dtype)
        if threads > 0:  # an empty grid is an error in CUDA; no work is no launch
            function((blocks_for(threads),), (BLOCK,), args)
