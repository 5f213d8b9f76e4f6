"""Runs the CUDA kernels of kernels/cuda/*.cu on the CPU, for machines without a GPU.

Inside ``with cuda_emulator.emulate():`` every ``CudaSource.launch`` compiles the kernel's .cu
file with g++ (after a prelude that defines CUDA's qualifiers, threadIdx / blockIdx / blockDim
/ gridDim and the math functions) and runs the kernel on NumPy arrays, one (block, thread) of
the grid after another: the same source, the same Python wrapper and the same grid as on a
GPU, so the wrappers' tests check both without one.

Each launch is checked as a GPU would not: the arguments must match the kernel's parameter
list (an array of T's dtype or the pointer's fixed type, C-contiguous; a NumPy scalar of the
parameter's exact C type), else TypeError naming the kernel and the parameter; each array runs
in a copy with guard bytes before and after it, and a write into them raises IndexError.

``emulate()`` skips the calling test (pytest.skip) where g++ is missing. The context's
``launches`` lists the kernels launched, as "name<float>" / "name<double>", so a test can tell
that its wrapper launched the kernel instead of taking a fallback.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
from tinymeta.kernels import cuda_launch

# No contraction of a * b + c into a fused multiply-add (GCC's default where the CPU has one):
# each operation rounds as NumPy's do, so kernels doing the reference's arithmetic match it.
GXX_FLAGS = ("-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off")
GUARD_BYTES = 4096  # on each side of every array: a multiple of any alignment

PRELUDE = r"""
#include <cmath>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
using std::exp; using std::log; using std::sqrt; using std::tanh;
using std::fabs; using std::fmax; using std::fmin; using std::floor;
struct EmuDim3 { unsigned int x, y, z; };
static EmuDim3 threadIdx, blockIdx, blockDim, gridDim;
// A kernel argument from the launcher's void* table: a pointer converts to any pointer
// parameter, a scalar is read as the parameter's own type.
struct EmuPointer { void* p; template <class U> operator U*() const { return (U*)p; } };
struct EmuScalar { void* p; template <class U> operator U() const { return *(U*)p; } };
"""

LAUNCHER = r"""
extern "C" void emu_{name}_{t}(void** args, unsigned int grid, unsigned int block) {{
    gridDim = EmuDim3{{grid, 1, 1}};
    blockDim = EmuDim3{{block, 1, 1}};
    for (unsigned int b = 0; b < grid; ++b) {{
        for (unsigned int t = 0; t < block; ++t) {{
            blockIdx = EmuDim3{{b, 0, 0}};
            threadIdx = EmuDim3{{t, 0, 0}};
            {name}<{t}>({args});
        }}
    }}
}}
"""

# Fixed C types of parameters (T is the launch's dtype).
C_DTYPES = {
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
    "long long": np.dtype(np.int64),
    "int": np.dtype(np.int32),
    "signed char": np.dtype(np.int8),
}

_KERNEL = re.compile(r"template\s*<\s*typename\s+T\s*>\s*__global__\s+void\s+(\w+)\s*\(([^)]*)\)")


@dataclass(frozen=True)
class Parameter:
    name: str
    c_type: str  # without const / __restrict__: "T", "long long", ...
    pointer: bool

    def dtype(self, t_dtype) -> np.dtype:
        return np.dtype(t_dtype) if self.c_type == "T" else C_DTYPES[self.c_type]


def _parse_parameter(kernel: str, text: str) -> Parameter:
    words = text.replace("*", " * ").split()
    pointer = "*" in words
    words = [w for w in words if w not in ("const", "__restrict__", "*")]
    name, c_type = words[-1], " ".join(words[:-1])
    if c_type != "T" and c_type not in C_DTYPES:
        raise TypeError(f"{kernel}: the emulator does not know the type of parameter {text!r}")
    return Parameter(name, c_type, pointer)


def kernel_parameters(source: str) -> dict:
    """{kernel name: [Parameter]} for every templated __global__ kernel of a .cu source."""
    source = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source, flags=re.S)
    return {
        name: [_parse_parameter(name, p) for p in params.split(",") if p.strip()]
        for name, params in _KERNEL.findall(source)
    }


def find_compiler():
    return shutil.which(os.environ.get("CXX", "g++"))


class _Build:
    """The g++ build of one .cu file: its kernels' parameters and the loaded library."""

    _cache_dir = None
    _loaded: dict = {}  # source hash -> _Build, for the whole session

    def __init__(self, path: Path, kernels: tuple):
        text = path.read_text()
        self.parameters = kernel_parameters(text)
        missing = [k for k in kernels if k not in self.parameters]
        if missing:
            raise ValueError(f"{path.name} defines no templated __global__ kernel {missing}")
        launchers = "".join(
            LAUNCHER.format(name=k, t=t, args=", ".join(self._arg(i, p) for i, p in enumerate(ps)))
            for k, ps in self.parameters.items()
            for t in ("float", "double")
        )
        program = (
            f'{PRELUDE}\n#line 1 "{path.name}"\n{text}\n#line 1 "emulator launchers"\n{launchers}'
        )
        self.library = ctypes.CDLL(str(self._compile(path, program)))

    @staticmethod
    def _arg(index: int, parameter: Parameter) -> str:
        kind = "EmuPointer" if parameter.pointer else "EmuScalar"
        return f"{kind}{{args[{index}]}}"

    @classmethod
    def _compile(cls, path: Path, program: str) -> Path:
        if cls._cache_dir is None:
            cls._cache_dir = tempfile.mkdtemp(prefix="tinymeta-cuda-emulator-")
            atexit.register(shutil.rmtree, cls._cache_dir, True)
        digest = hashlib.sha256((program + " ".join(GXX_FLAGS)).encode()).hexdigest()[:16]
        source = Path(cls._cache_dir, f"{path.stem}-{digest}.cpp")
        library = source.with_suffix(".so")
        if not library.exists():
            source.write_text(program)
            done = subprocess.run(
                [find_compiler(), *GXX_FLAGS, "-o", str(library), str(source)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"g++ could not compile {path.name}:\n{done.stderr[-4000:]}")
        return library

    @classmethod
    def of(cls, source: cuda_launch.CudaSource) -> _Build:
        text = source.path.read_bytes()
        key = hashlib.sha256(text).hexdigest()
        build = cls._loaded.get(key)
        if build is None:
            build = cls._loaded[key] = cls(source.path, source.kernels)
        return build


def _check_argument(kernel: str, parameter: Parameter, t_dtype, arg):
    expected = parameter.dtype(t_dtype)
    if parameter.pointer:
        if not isinstance(arg, np.ndarray):
            raise TypeError(
                f"{kernel}: parameter {parameter.name} expects a {expected} array, got "
                f"{type(arg).__name__}"
            )
        if arg.dtype != expected or not arg.flags.c_contiguous:
            layout = "C-contiguous" if arg.flags.c_contiguous else "non-contiguous"
            raise TypeError(
                f"{kernel}: parameter {parameter.name} expects a C-contiguous {expected} "
                f"array, got a {layout} {arg.dtype} array"
            )
    elif not (isinstance(arg, np.generic) and arg.dtype == expected):
        got = f"{arg.dtype} scalar" if isinstance(arg, np.generic) else type(arg).__name__
        raise TypeError(
            f"{kernel}: parameter {parameter.name} ({parameter.c_type}) expects a NumPy "
            f"{expected} scalar, got {got}"
        )


_GUARD = np.random.default_rng(2024).integers(0, 256, GUARD_BYTES, dtype=np.uint8)


@dataclass
class _Guarded:
    """An array's bytes between two guard regions, as the kernel sees them."""

    array: np.ndarray
    names: list = field(default_factory=list)

    def __post_init__(self):
        size = self.array.nbytes
        self.buffer = np.empty(2 * GUARD_BYTES + size, np.uint8)
        self.buffer[:GUARD_BYTES] = _GUARD
        self.buffer[GUARD_BYTES + size :] = _GUARD
        self.interior = self.buffer[GUARD_BYTES : GUARD_BYTES + size]
        self.interior[:] = self.array.reshape(-1).view(np.uint8)

    def pointer(self) -> int:
        return self.buffer.ctypes.data + GUARD_BYTES

    def check_and_copy_back(self, kernel: str):
        size = self.array.nbytes
        for side, guard in (("before", self.buffer[:GUARD_BYTES]),
                            ("after", self.buffer[GUARD_BYTES + size :])):  # fmt: skip
            if not np.array_equal(guard, _GUARD):
                raise IndexError(
                    f"{kernel}: wrote outside array parameter {' / '.join(self.names)} "
                    f"({self.array.dtype} {self.array.shape}): into the bytes {side} it"
                )
        if self.array.flags.writeable:
            self.array.reshape(-1).view(np.uint8)[:] = self.interior


def _guarded_arrays(kernel: str, parameters, args) -> dict:
    """One guarded copy per distinct array (an array passed twice is one copy, as on a GPU);
    arrays that overlap without being the same memory are refused."""
    guarded: dict = {}
    for parameter, arg in zip(parameters, args):
        if not parameter.pointer:
            continue
        start = arg.__array_interface__["data"][0]
        key = (start, arg.nbytes)
        if key not in guarded:
            for (other, other_size), g in guarded.items():
                if start < other + other_size and other < start + arg.nbytes:
                    raise TypeError(
                        f"{kernel}: parameters {g.names[0]} and {parameter.name} overlap in "
                        f"memory without being the same array"
                    )
            guarded[key] = _Guarded(arg)
        guarded[key].names.append(parameter.name)
    return guarded


class Emulation:
    """The state of one ``emulate()`` block: the kernels it launched, in order."""

    def __init__(self):
        self.launches: list = []

    def launch(self, source: cuda_launch.CudaSource, kernel: str, dtype, threads: int, args):
        t = cuda_launch.c_type(kernel, dtype)
        name = f"{kernel}<{t}>"
        if kernel not in source.kernels:
            raise ValueError(f"{kernel} is not one of the kernels of {source!r}")
        build = _Build.of(source)
        if kernel not in build.parameters:
            raise ValueError(f"{source.path.name} defines no templated __global__ kernel {kernel}")
        parameters = build.parameters[kernel]
        if len(args) != len(parameters):
            raise TypeError(f"{name}: expects {len(parameters)} arguments, got {len(args)}")
        for parameter, arg in zip(parameters, args):
            _check_argument(name, parameter, dtype, arg)
        self.launches.append(name)
        if threads <= 0:
            return
        guarded = _guarded_arrays(name, parameters, args)
        scalars = []  # kept alive until the call returns
        pointers = (ctypes.c_void_p * max(1, len(args)))()
        for index, (parameter, arg) in enumerate(zip(parameters, args)):
            if parameter.pointer:
                start = arg.__array_interface__["data"][0]
                pointers[index] = guarded[(start, arg.nbytes)].pointer()
            else:
                scalars.append(np.array(arg))
                pointers[index] = scalars[-1].ctypes.data
        run = getattr(build.library, f"emu_{kernel}_{t}")
        run.restype = None
        run(
            pointers,
            ctypes.c_uint(cuda_launch.blocks_for(threads)),
            ctypes.c_uint(cuda_launch.BLOCK),
        )
        for g in guarded.values():
            g.check_and_copy_back(name)


@contextlib.contextmanager
def emulate():
    """Within the block, CudaSource.launch runs kernels on the CPU (NumPy arrays)."""
    if find_compiler() is None:
        import pytest

        pytest.skip("needs g++ to run the CUDA kernels on the CPU (the emulator)")
    emulation = Emulation()

    def launch(source, kernel, dtype, threads, args):
        emulation.launch(source, kernel, dtype, threads, args)

    with mock.patch.object(cuda_launch.CudaSource, "launch", launch):
        yield emulation
