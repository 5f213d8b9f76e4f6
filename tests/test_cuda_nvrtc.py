"""Every CUDA source compiled as a GPU run compiles it: by NVRTC, through CuPy's own code.

``CudaSource.raw_module`` builds the very ``cupy.RawModule`` a launch builds (source, options,
name expressions), and CuPy's ``compile_with_cache`` compiles it for sm_90 (an H100/H200) with
the options CuPy adds itself, as ``RawModule.get_function`` does. Only the device queries (the
architecture) and the loading of the cubin, which need a driver, are replaced: so it runs
without a GPU, wherever CuPy and NVRTC (CUDA 12.x or 13.x) are installed, and is skipped
where they are not. Unlike tests/test_cuda_kernels.py's nvcc build, it sees what NVRTC alone
refuses (an #include of a host header, an option CuPy's NVRTC rejects, a name expression that
names no kernel) and checks the lowered (mangled) name of every instantiation the wrappers
launch.
"""

from __future__ import annotations

import functools
import io
import types

import numpy as np
import pytest
from tinymeta.kernels import cuda_batchnorm, cuda_impl, cuda_launch, cuda_matmul

ARCH = "90"
SOURCES = [
    v
    for m in (cuda_impl, cuda_batchnorm, cuda_matmul)
    for v in vars(m).values()
    if isinstance(v, cuda_launch.CudaSource)
]
TYPE_CODE = {"float": "f", "double": "d"}  # the template argument in a mangled name


def _cupy_with_nvrtc():
    """CuPy, or a skip saying what is missing (CuPy, or NVRTC's library)."""
    cupy = pytest.importorskip("cupy", reason="needs CuPy (pip install 'tinymeta[cuda]')")
    from cupy.cuda import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as e:  # the library is loaded on first use
        pytest.skip(f"needs NVRTC (the nvidia-cuda-nvrtc wheel or a CUDA toolkit): {e}")
    return cupy


@pytest.fixture
def nvrtc_build(monkeypatch):
    """``build(raw_module)``: its cubin, {name expression: lowered name} and NVRTC's log
    (warnings), compiled by the code path of ``RawModule.get_function`` on an sm_90 device."""
    cupy = _cupy_with_nvrtc()
    from cupy._core import core
    from cupy.cuda import compiler
    from cupy.cuda import function as cuda_function

    class Unloaded(cuda_function.Module):
        """The compiled module, kept instead of loaded (loading needs a driver)."""

        def load(self, cubin):
            self.cubin = cubin

    monkeypatch.setattr(compiler, "_get_arch", lambda: ARCH)
    monkeypatch.setattr(
        compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin")
    )
    monkeypatch.setattr(
        compiler, "function", types.SimpleNamespace(Module=Unloaded, LinkState=None)
    )
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")  # neither read nor write the disk cache

    def build(module):
        log = io.StringIO()
        compiled = core.compile_with_cache(
            module.code,
            module.options,
            prepend_cupy_headers=False,  # as RawModule compiles its code
            backend=module.backend,
            name_expressions=module.name_expressions,
            log_stream=log,
            jitify=False,
        )
        return compiled.cubin, compiled.mapping, log.getvalue()

    build.cupy = cupy
    return build


# --- what the wrappers launch ---------------------------------------------------------------


@functools.cache
def launched_by_wrappers() -> dict:
    """{source file: the instantiations "name<float|double>" that the wrappers of
    kernels/cuda_impl.py, kernels/cuda_batchnorm.py and kernels/cuda_matmul.py launch}, from
    running each of them on small NumPy inputs, in float32 and float64, with launches recorded
    instead of run."""
    launched = {}

    def record(source, kernel, dtype, threads, args):
        launched.setdefault(source.path.name, set()).add(
            f"{kernel}<{cuda_launch.c_type(kernel, dtype)}>"
        )

    original = cuda_launch.CudaSource.launch
    cuda_launch.CudaSource.launch = record
    try:
        for dtype in cuda_launch.C_TYPES:
            _call_every_wrapper(dtype)
    finally:
        cuda_launch.CudaSource.launch = original
    return launched


def _call_every_wrapper(dtype) -> None:
    rng = np.random.default_rng(0)

    def a(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x = a(2, 3, 4, 4)
    cuda_impl.relu_forward(x)
    cuda_impl.relu_backward(a(5), a(5))
    cuda_impl.sgd_update_(a(5), a(5), 0.1)
    cuda_impl.adam_update_(a(5), a(5), a(5), a(5) ** 2, a(5) ** 2, 0.9, 0.999, 1e-8, 1e-3, 1.0)
    y, argmax = cuda_impl.maxpool2d_argmax(x, 2, 2, 2, 2)
    cuda_impl.maxpool2d_scatter(y, argmax, 2, 2, 2, 2, 4, 4)
    cuda_impl.maxpool2d_gather(x, argmax, 2, 2, 2, 2)
    cols = cuda_impl.im2col(x, 3, 3, 1, 1, 1, 1)
    cuda_impl.col2im(cols, 4, 4, 1, 1, 1, 1)
    labels = np.array([0, 2, 1])
    _, probs = cuda_impl.softmax_xent_forward(a(3, 4), labels)
    cuda_impl.softmax_xent_backward(probs, labels, a(3))
    bx, per_channel = a(2, 3, 4, 5), a(2, 4)
    cuda_batchnorm.bn_stats(bx, 1e-5)
    cuda_batchnorm.bn_forward(bx, per_channel, per_channel, 1e-5)
    cuda_batchnorm.bn_backward(bx, bx, per_channel, per_channel, per_channel)
    cuda_batchnorm.bn_double_backward(
        bx, bx, per_channel, per_channel, per_channel, bx, per_channel, per_channel
    )
    cuda_matmul.matmul(a(2, 3, 4), a(5, 4).T)


def test_every_kernel_is_launched_by_a_wrapper_in_both_dtypes():
    launched = launched_by_wrappers()
    assert sorted(launched) == sorted(s.path.name for s in SOURCES)
    for source in SOURCES:
        assert launched[source.path.name] == set(source.name_expressions()), source


# --- the NVRTC build ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.path.name)
def test_source_compiles_with_cupys_nvrtc_and_lowers_every_launched_kernel(nvrtc_build, source):
    module = source.raw_module(nvrtc_build.cupy)
    cubin, lowered, log = nvrtc_build(module)
    assert log == "", f"NVRTC warns about {source.path.name}:\n{log}"
    assert cubin[:4] == b"\x7fELF", "NVRTC gave no cubin"
    assert sorted(lowered) == sorted(source.name_expressions())
    for name in launched_by_wrappers()[source.path.name]:
        kernel, c_type = name[:-1].split("<")
        # _Z <length><name> I<type>E ...: the template kernel instantiated for that type
        assert lowered[name].startswith(f"_Z{len(kernel)}{kernel}I{TYPE_CODE[c_type]}E"), (
            name,
            lowered[name],
        )
        assert lowered[name].encode() in cubin, f"{name} ({lowered[name]}) is not in the cubin"


def test_a_name_expression_that_names_no_kernel_fails_to_compile(nvrtc_build):
    from cupy.cuda.compiler import CompileException

    source = cuda_launch.CudaSource("elementwise.cu", ("relu_forwrd",))
    with pytest.raises(CompileException, match="relu_forwrd"):
        nvrtc_build(source.raw_module(nvrtc_build.cupy))
