"""The CUDA kernels (kernels/cuda/*.cu through kernels/cuda_impl.py) against the reference.

Every comparison runs once per device: ``cpu`` runs the kernels' sources compiled by g++ in
the emulator (tests/cuda_emulator.py) on NumPy arrays, ``cuda`` on CuPy arrays on a GPU
(marked ``gpu``; skipped without CuPy or a device). Both check that the wrapper launched its
kernel (no silent fallback) and compare with ``kernels.reference`` on the same NumPy data:
exactly where the kernel does the reference's arithmetic in its order (on a GPU: where no
multiply-add can be fused either), else with tolerances scaled to the dtype and the data's
magnitude. Below them: the emulator's own checks, the launcher (with a stand-in for CuPy),
the nvcc build of every .cu file and the dispatch of CuPy arrays.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import shutil
import subprocess
import sys
import types
from unittest import mock

import cuda_emulator
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tinymeta.kernels import cuda_impl, cuda_launch, reference

import tinymeta as tm
from tinymeta import kernels

HAVE_CUDA = tm.cuda.is_available()
FLOATS = (np.float32, np.float64)
SPECIALS = (np.nan, np.inf, -np.inf, -0.0, 0.0)
# Tolerances of a kernel whose arithmetic differs from the reference's (summation order, FMA
# on the GPU): relative, and absolute in units of the data's magnitude.
TOLERANCE = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float64): (1e-12, 1e-13)}


# --- running on a device ----------------------------------------------------------------------


@contextlib.contextmanager
def running_on(device: str):
    """(array module, launches): inside, cuda_impl's kernels run on ``device``: the emulator
    on the CPU, CuPy on "cuda"; launches lists the kernels launched as "name<float|double>"."""
    if device == "cpu":
        with cuda_emulator.emulate() as emulation:
            yield np, emulation.launches
        return
    import cupy

    launches = []
    launch = cuda_launch.CudaSource.launch

    def recording(source, kernel, dtype, threads, args):
        launches.append(f"{kernel}<{cuda_launch.c_type(kernel, dtype)}>")
        launch(source, kernel, dtype, threads, args)

    with mock.patch.object(cuda_launch.CudaSource, "launch", recording):
        yield cupy, launches
        cupy.cuda.get_current_stream().synchronize()


def on_device(xp, a, layout: str = "c"):
    """A NumPy array's copy in module ``xp``, laid out in memory as ``layout`` says: "c"
    (C order), "permuted" (dense, axes reversed in memory), "channels_last" (an NCHW array
    dense as NHWC) or "strided" (not dense)."""
    if layout in ("permuted", "channels_last"):
        axes = tuple(range(a.ndim))[::-1] if layout == "permuted" else (0, 2, 3, 1)
        inverse = tuple(np.argsort(axes).tolist())
        return xp.array(xp.asarray(a).transpose(axes), order="C").transpose(inverse)
    if layout == "strided" and a.ndim:
        wide = xp.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = xp.asarray(a)
        return wide[..., ::2]
    return xp.array(a)


def to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def assert_same(actual, expected, exact: bool = False):
    """actual (any device) equals expected (NumPy) in dtype, shape and values: exactly, or
    within the dtype's tolerance relative to the data's magnitude; NaN where expected is."""
    actual = to_host(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if exact:
        np.testing.assert_array_equal(actual, expected)
        return
    rtol, atol = TOLERANCE[expected.dtype]
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


def in_memory_order_of(a, b) -> bool:
    """Whether ``a`` is dense in ``b``'s memory order (its axes by decreasing stride)."""
    order = sorted(range(b.ndim), key=lambda axis: -b.strides[axis])
    return a.transpose(tuple(order)).flags.c_contiguous


C_TYPE = {np.float32: "float", np.float64: "double"}


def expect_launch(launches: list, kernel: str, dtype):
    assert f"{kernel}<{C_TYPE[dtype]}>" in launches, launches


# --- strategies -------------------------------------------------------------------------------


def magnitude(a):
    """|a| as an array, also for a 0-d one (np.abs gives a scalar)."""
    return np.asarray(np.abs(a))


def values(dtype, specials: bool = True, bound: float = 10.0):
    # No float32 subnormals: CuPy compiles every kernel with -ftz=true, so a GPU flushes them
    # to zero where NumPy and the emulator keep them (float64 is not flushed).
    finite = st.floats(
        -bound, bound, width=np.finfo(dtype).bits, allow_subnormal=np.dtype(dtype) != np.float32
    )
    return finite | st.sampled_from(SPECIALS) if specials else finite


def arrays(dtype, shape, elements):
    """Arrays of ``elements`` each drawn on its own (Hypothesis' default fills most of an
    array with one value: ties everywhere, which hide a wrong arg-max or a wrong order)."""
    return hnp.arrays(dtype, shape, elements=elements, fill=st.nothing())


def float_arrays(shape, dtype, specials: bool = True, bound: float = 10.0):
    return arrays(dtype, shape, values(dtype, specials, bound))


shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=5)
layouts = st.sampled_from(("c", "permuted", "strided"))


# --- elementwise ------------------------------------------------------------------------------


@given(data=st.data(), dtype=st.sampled_from(FLOATS), shape=shapes, layout=layouts)
def test_relu_forward(device, data, dtype, shape, layout):
    x = data.draw(float_arrays(shape, dtype))
    with running_on(device) as (xp, launches):
        y = cuda_impl.relu_forward(on_device(xp, x, layout))
    expect_launch(launches, "relu_forward", dtype)
    assert_same(y, reference.relu_forward(x), exact=True)
    assert np.array_equal(np.signbit(to_host(y)), np.signbit(reference.relu_forward(x)))


@given(
    data=st.data(), dtype=st.sampled_from(FLOATS), shape=shapes, layouts=st.tuples(layouts, layouts)
)
def test_relu_backward(device, data, dtype, shape, layouts):
    gy, x = data.draw(float_arrays(shape, dtype)), data.draw(float_arrays(shape, dtype))
    with running_on(device) as (xp, launches):
        gx = cuda_impl.relu_backward(on_device(xp, gy, layouts[0]), on_device(xp, x, layouts[1]))
        if layouts[0] != "strided":  # gx is laid out like gy
            assert in_memory_order_of(gx, on_device(xp, gy, layouts[0]))
    expect_launch(launches, "relu_backward", dtype)
    with np.errstate(invalid="ignore"):  # inf * 0
        expected = reference.relu_backward(gy, x)
    assert_same(gx, expected, exact=True)


def test_relu_other_dtypes_take_the_reference(device):
    with running_on(device) as (xp, launches):
        x = xp.asarray(np.array([-1.5, 0.0, 2.5], np.float16))
        assert to_host(cuda_impl.relu_forward(x)).tolist() == [0.0, 0.0, 2.5]
        gy = xp.asarray(np.array([1.0, 2.0, 3.0], np.float32))
        assert to_host(cuda_impl.relu_backward(gy, x)).tolist() == [0.0, 0.0, 3.0]
    assert launches == []


def in_place(device, layout, function, arrays: dict, **scalars):
    """Runs ``function`` (a cuda_impl in-place kernel) on ``device`` copies of ``arrays`` (grad
    in C order, the others laid out as ``layout``; None stays None) and the reference on NumPy
    copies; asserts that both return param and leave every array equal: exactly in the
    emulator (the reference's operations in its order, no fused multiply-add), within
    tolerances on a GPU. Returns the launches."""
    expected = {name: None if a is None else a.copy() for name, a in arrays.items()}
    with np.errstate(all="ignore"):
        returned = getattr(reference, function.__name__)(*expected.values(), **scalars)
    assert returned is expected["param"]
    with running_on(device) as (xp, launches), np.errstate(all="ignore"):
        given = {
            name: None if a is None else on_device(xp, a, "c" if name == "grad" else layout)
            for name, a in arrays.items()
        }
        assert function(*given.values(), **scalars) is given["param"]
    for name, a in given.items():
        if a is not None:  # grad left alone; the others as the reference's rounding gives them
            assert_same(a, expected[name], exact=name == "grad" or device == "cpu")
    return launches


@given(data=st.data(), dtype=st.sampled_from(FLOATS), shape=shapes, layout=layouts)
def test_sgd_update(device, data, dtype, shape, layout):
    arrays = {name: data.draw(float_arrays(shape, dtype)) for name in ("param", "grad")}
    lr = data.draw(st.floats(1e-4, 2.0))
    launches = in_place(device, layout, cuda_impl.sgd_update_, arrays, lr=lr)
    dense = in_memory_order_of(*[on_device(np, arrays["param"], layout)] * 2)
    assert launches == ([f"sgd_update<{C_TYPE[dtype]}>"] if dense else [])  # else the reference


@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    shape=shapes,
    layout=layouts,
    amsgrad=st.booleans(),
    decay=st.sampled_from(("none", "adam", "adamw")),
)
def test_adam_update(device, data, dtype, shape, layout, amsgrad, decay):
    draw = data.draw
    arrays = {
        "param": draw(float_arrays(shape, dtype)),
        "grad": draw(float_arrays(shape, dtype)),
        "exp_avg": draw(float_arrays(shape, dtype, specials=False)),
        "exp_avg_sq": magnitude(draw(float_arrays(shape, dtype, specials=False))),
        "max_exp_avg_sq": magnitude(draw(float_arrays(shape, dtype))) if amsgrad else None,
    }
    t = draw(st.integers(1, 1000))
    beta1, beta2 = draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))
    lr = draw(st.floats(1e-4, 1e-1))
    scalars = dict(
        beta1=beta1,
        beta2=beta2,
        eps=draw(st.sampled_from((0.0, 1e-8, 1e-3))),
        step_size=-lr / (1 - beta1**t),
        bias_correction2_sqrt=(1 - beta2**t) ** 0.5,
        weight_decay=0.01 if decay == "adam" else 0.0,
        param_decay=1 - lr * 0.01 if decay == "adamw" else 1.0,
    )
    launches = in_place(device, layout, cuda_impl.adam_update_, arrays, **scalars)
    dense = in_memory_order_of(*[on_device(np, arrays["param"], layout)] * 2)
    assert launches == ([f"adam_update<{C_TYPE[dtype]}>"] if dense else [])  # else the reference


# --- max-pooling ------------------------------------------------------------------------------


@st.composite
def pooling(draw, big_windows=False):
    """(x shape, (kh, kw, sh, sw)): windows that fit, strides below, equal to or above them;
    windows of 128+ elements (an int32 arg-max) when ``big_windows``."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    if big_windows:
        h, w = draw(st.integers(12, 13)), draw(st.integers(11, 13))
        kh, kw = draw(st.integers(12, h)), draw(st.integers(11, w))  # 132+ elements
    else:
        h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
        kh, kw = draw(st.integers(1, h)), draw(st.integers(1, w))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (n, c, h, w), (kh, kw, sh, sw)


def tied_values():
    """Few distinct values, so that windows have ties (the first offset wins), and specials."""
    return st.integers(-2, 2).map(float) | st.sampled_from(SPECIALS)


pool_layouts = st.sampled_from(("c", "channels_last"))


@given(data=st.data(), dtype=st.sampled_from(FLOATS), big=st.booleans(), layout=pool_layouts)
def test_maxpool2d_argmax(device, data, dtype, big, layout):
    shape, window = data.draw(pooling(big))
    x = data.draw(arrays(dtype, shape, tied_values()))
    with running_on(device) as (xp, launches):
        y, argmax = cuda_impl.maxpool2d_argmax(on_device(xp, x, layout), *window)
    expected_y, expected_argmax = reference.maxpool2d_argmax(x, *window)
    expect_launch(launches, "maxpool2d_argmax", dtype)
    assert_same(y, expected_y, exact=True)
    assert_same(argmax, expected_argmax, exact=True)


def _rng(data):
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def _argmax_for(data, out_shape, window):
    """Offsets drawn uniformly (Hypothesis favours 0, the first offset) in the reference's
    dtype: int8, int32 for windows of 128+ elements."""
    kh, kw = window[:2]
    offsets = _rng(data).integers(0, kh * kw, out_shape)
    return offsets.astype(np.int8 if kh * kw < 128 else np.int32)


def _distinct_values(data, shape, dtype):
    """Distinct values (a value read from the wrong pixel shows), with specials in some
    examples (Hypothesis' own arrays repeat a few values)."""
    rng = _rng(data)
    x = rng.standard_normal(shape).astype(dtype)
    if data.draw(st.booleans(), label="specials"):
        where = rng.random(shape) < 0.2
        x[where] = rng.choice(SPECIALS, size=int(where.sum()))
    return x


def _out_shape(shape, window):
    (n, c, h, w), (kh, kw, sh, sw) = shape, window
    return n, c, (h - kh) // sh + 1, (w - kw) // sw + 1


@given(data=st.data(), dtype=st.sampled_from(FLOATS), big=st.booleans(), layout=pool_layouts)
def test_maxpool2d_scatter(device, data, dtype, big, layout):
    shape, window = data.draw(pooling(big))
    out_shape = _out_shape(shape, window)
    gy = data.draw(float_arrays(out_shape, dtype))
    argmax = _argmax_for(data, out_shape, window)
    with running_on(device) as (xp, launches):
        gx = cuda_impl.maxpool2d_scatter(
            on_device(xp, gy, layout), on_device(xp, argmax, layout), *window, *shape[2:]
        )
    expect_launch(launches, "maxpool2d_scatter", dtype)
    with np.errstate(invalid="ignore"):
        expected = reference.maxpool2d_scatter(gy, argmax, *window, *shape[2:])
    assert_same(gx, expected, exact=True)  # the reference's sums, in its order


@given(data=st.data(), dtype=st.sampled_from(FLOATS), big=st.booleans(), layout=pool_layouts)
def test_maxpool2d_gather(device, data, dtype, big, layout):
    shape, window = data.draw(pooling(big))
    x = _distinct_values(data, shape, dtype)
    argmax = _argmax_for(data, _out_shape(shape, window), window)
    with running_on(device) as (xp, launches):
        y = cuda_impl.maxpool2d_gather(
            on_device(xp, x, layout), on_device(xp, argmax, layout), *window
        )
    expect_launch(launches, "maxpool2d_gather", dtype)
    with np.errstate(invalid="ignore"):
        expected = reference.maxpool2d_gather(x, argmax, *window)
    assert_same(y, expected, exact=True)


# --- convolution windows ----------------------------------------------------------------------


@st.composite
def conv_windows(draw):
    """(x shape (N, C, H, W), (kh, kw, sh, sw, ph, pw)): windows that fit the padded image."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w, ph, pw = (draw(st.integers(lo, hi)) for lo, hi in ((1, 6), (1, 6), (0, 2), (0, 2)))
    kh, kw = draw(st.integers(1, h + 2 * ph)), draw(st.integers(1, w + 2 * pw))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (n, c, h, w), (kh, kw, sh, sw, ph, pw)


@given(data=st.data(), dtype=st.sampled_from(FLOATS), layout=pool_layouts)
def test_im2col(device, data, dtype, layout):
    shape, window = data.draw(conv_windows())
    x = data.draw(float_arrays(shape, dtype))
    with running_on(device) as (xp, launches):
        cols = cuda_impl.im2col(on_device(xp, x, layout), *window)
        assert cols.flags.c_contiguous
    expect_launch(launches, "im2col", dtype)
    assert_same(cols, reference.im2col(x, *window), exact=True)


@given(data=st.data(), dtype=st.sampled_from(FLOATS))
def test_col2im(device, data, dtype):
    (n, c, h, w), (kh, kw, sh, sw, ph, pw) = data.draw(conv_windows())
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    cols = data.draw(float_arrays((n, oh, ow, kh, kw, c), dtype))
    with running_on(device) as (xp, launches):
        gx = cuda_impl.col2im(on_device(xp, cols), h, w, sh, sw, ph, pw)
    expect_launch(launches, "col2im", dtype)
    with np.errstate(invalid="ignore"):
        expected = reference.col2im(cols, h, w, sh, sw, ph, pw)
    assert_same(gx, expected, exact=True)  # the reference's sums, in its order


# --- softmax cross-entropy --------------------------------------------------------------------


@st.composite
def classification(draw, dtype):
    """(logits-shaped floats (N, C) with specials, labels (N,) of some integer dtype)."""
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    values = draw(float_arrays((n, c), dtype, bound=50.0))
    label_dtype = draw(st.sampled_from((np.int64, np.int32, np.uint8)))
    return values, draw(arrays(label_dtype, n, st.integers(0, c - 1)))


@given(data=st.data(), dtype=st.sampled_from(FLOATS), layout=st.sampled_from(("c", "permuted")))
def test_softmax_xent_forward(device, data, dtype, layout):
    logits, labels = data.draw(classification(dtype))
    with running_on(device) as (xp, launches):
        loss, probs = cuda_impl.softmax_xent_forward(on_device(xp, logits, layout), labels)
    expect_launch(launches, "softmax_xent_forward", dtype)
    with np.errstate(invalid="ignore"):
        expected_loss, expected_probs = reference.softmax_xent_forward(logits, labels)
    assert_same(loss, expected_loss)
    assert_same(probs, expected_probs)


@given(data=st.data(), dtype=st.sampled_from(FLOATS))
def test_softmax_xent_backward(device, data, dtype):
    probs, labels = data.draw(classification(dtype))
    gloss = data.draw(float_arrays(probs.shape[:1], dtype))
    with running_on(device) as (xp, launches):
        glogits = cuda_impl.softmax_xent_backward(
            on_device(xp, probs), on_device(xp, labels), on_device(xp, gloss, "strided")
        )
    expect_launch(launches, "softmax_xent_backward", dtype)
    with np.errstate(invalid="ignore"):
        expected = reference.softmax_xent_backward(probs, labels, gloss)
    assert_same(glogits, expected, exact=device == "cpu")  # a GPU may fuse * and -


# --- the emulator's own checks ----------------------------------------------------------------


def _relu_args(n=5, dtype=np.float32):
    return np.linspace(-1, 1, n).astype(dtype), np.empty(n, dtype), np.int64(n)


@pytest.mark.parametrize("scalar, got", [(5, "int"), (np.int32(5), "int32 scalar"), (5.0, "float")])
def test_emulator_refuses_a_scalar_of_the_wrong_type(scalar, got):
    x, y, _ = _relu_args()
    with cuda_emulator.emulate(), pytest.raises(TypeError) as error:
        cuda_impl._ELEMENTWISE.launch("relu_forward", np.float32, 5, (x, y, scalar))
    assert "relu_forward<float>: parameter n (long long)" in str(error.value)
    assert f"expects a NumPy int64 scalar, got {got}" in str(error.value)


def test_emulator_refuses_arrays_of_the_wrong_dtype_or_layout():
    x, y, n = _relu_args()
    with cuda_emulator.emulate():
        with pytest.raises(
            TypeError,
            match=r"relu_forward<double>: parameter x expects a "
            r"C-contiguous float64 array, got a C-contiguous float32 array",
        ):
            cuda_impl._ELEMENTWISE.launch(
                "relu_forward", np.float64, 5, (x, y.astype(np.float64), n)
            )
        wide = np.zeros(10, np.float32)
        with pytest.raises(
            TypeError,
            match=r"relu_forward<float>: parameter y expects a "
            r"C-contiguous float32 array, got a non-contiguous float32 array",
        ):
            cuda_impl._ELEMENTWISE.launch("relu_forward", np.float32, 5, (x, wide[::2], n))
        with pytest.raises(TypeError, match=r"relu_forward<float>: expects 3 arguments, got 2"):
            cuda_impl._ELEMENTWISE.launch("relu_forward", np.float32, 5, (x, y))
        cuda_impl._ELEMENTWISE.launch("relu_forward", np.float32, 5, (x, y, n))  # all correct
    assert np.array_equal(y, np.maximum(x, 0))


OUT_OF_BOUNDS = """
// y[i] = x[i] for i <= n: one element too many (the test's deliberate bug).
template <typename T>
__global__ void copy_one_too_many(const T* x, T* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i <= n;
         i += (long long)blockDim.x * gridDim.x) {
        y[i] = x[i < n ? i : 0];
    }
}

// y[i - 1] = x[i]: one element before y.
template <typename T>
__global__ void copy_shifted_left(const T* x, T* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        y[i - 1] = x[i];
    }
}
"""


@pytest.mark.parametrize(
    "kernel, side", [("copy_one_too_many", "after"), ("copy_shifted_left", "before")]
)
def test_emulator_catches_writes_out_of_bounds(tmp_path, kernel, side):
    (tmp_path / "bad.cu").write_text(OUT_OF_BOUNDS)
    source = cuda_launch.CudaSource(
        str(tmp_path / "bad.cu"), ("copy_one_too_many", "copy_shifted_left")
    )
    x, y, n = _relu_args(7, np.float64)
    with cuda_emulator.emulate(), pytest.raises(IndexError) as error:
        source.launch(kernel, np.float64, 7, (x, y, n))
    message = f"{kernel}<double>: wrote outside array parameter y (float64 (7,)): into the bytes"
    assert f"{message} {side} it" in str(error.value)


# --- the launcher, as it runs on a GPU ------------------------------------------------------


class FakeRawModule:
    """Stands in for cupy.RawModule: records the build and the launches of its functions."""

    builds: list = []

    def __init__(self, code, options, name_expressions):
        self.builds.append((code, options, tuple(name_expressions)))
        self.launches = []

    def get_function(self, name):
        return lambda grid, block, args: self.launches.append((name, grid, block, args))


def test_launch_builds_the_source_once_and_covers_the_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=FakeRawModule))
    FakeRawModule.builds = []
    source = cuda_launch.CudaSource("elementwise.cu", ("relu_forward", "relu_backward"))
    args = (np.zeros(3), np.zeros(3), np.int64(3))
    for threads in (1, 256, 257, 10**9):
        source.launch("relu_forward", np.float64, threads, args)
    source.launch("relu_backward", np.float32, 0, args)  # no work: nothing launched
    ((code, _, names),) = FakeRawModule.builds  # one build for all launches
    assert code == (cuda_launch.SOURCE_DIR / "elementwise.cu").read_text()
    assert set(names) == {
        f"relu_{d}<{t}>" for d in ("forward", "backward") for t in C_TYPE.values()
    }
    blocks = [1, 1, 2, cuda_launch.MAX_BLOCKS]  # the grid-stride loops cover the rest
    assert source._module.launches == [
        ("relu_forward<double>", (b,), (cuda_launch.BLOCK,), args) for b in blocks
    ]
    with pytest.raises(TypeError, match="relu_forward: expected float32 or float64 arrays"):
        source.launch("relu_forward", np.float16, 3, args)
    with pytest.raises(ValueError, match="sgd_update is not one of the kernels of CudaSource"):
        source.launch("sgd_update", np.float32, 3, args)


def test_each_cuda_source_lists_exactly_its_kernels_and_names_are_unique():
    defined = {p.name: list(cuda_emulator.kernel_parameters(p.read_text())) for p in _cu_files()}
    everywhere = [name for names in defined.values() for name in names]
    assert len(everywhere) == len(set(everywhere)), defined
    modules = [
        importlib.import_module(f"tinymeta.kernels.{m}") for m in kernels._CudaKernels._CUDA_MODULES
    ]
    sources = [
        v for m in modules for v in vars(m).values() if isinstance(v, cuda_launch.CudaSource)
    ]
    assert sorted(s.path.name for s in sources) == sorted(defined)  # every file, used once
    for source in sources:
        assert sorted(source.kernels) == sorted(defined[source.path.name]), source


# --- every source compiles for the GPU ----------------------------------------------------------


def _cu_files():
    return sorted(cuda_launch.SOURCE_DIR.glob("*.cu"))


@pytest.mark.parametrize("path", _cu_files(), ids=lambda p: p.name)
def test_source_compiles_with_nvcc(tmp_path, path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc (the CUDA toolkit) to compile the kernels for a GPU")
    names = list(cuda_emulator.kernel_parameters(path.read_text()))
    assert names, f"{path.name} defines no templated __global__ kernel"
    # Host code taking each kernel's address instantiates it for float and double.
    instances = ", ".join(f"(void*)&{k}<{t}>" for k in names for t in ("float", "double"))
    program = tmp_path / path.name
    program.write_text(f"{path.read_text()}\nvoid* all_kernels[] = {{{instances}}};\n")
    done = subprocess.run(
        [nvcc, "-ptx", "-arch=sm_90", "-std=c++17", "-o", str(tmp_path / "out.ptx"), str(program)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    entries = re.findall(r"^\.visible \.entry (\w+)\(", (tmp_path / "out.ptx").read_text(), re.M)
    assert len(entries) == 2 * len(names), entries


# --- dispatch ---------------------------------------------------------------------------------


def test_cuda_kernels_are_looked_up_by_name():
    assert kernels._cuda.relu_backward is cuda_impl.relu_backward
    assert kernels._cuda.erf is reference.erf  # no CUDA version: the reference on the device


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs CuPy and a CUDA GPU")
def test_cupy_arrays_take_the_cuda_kernels_unless_the_backend_is_numpy():
    gy, x = np.linspace(-1, 1, 9), np.linspace(1, -1, 9)
    expected = reference.relu_backward(gy, x)
    for backend, launched in (("numba", ["relu_backward<double>"]), ("numpy", [])):
        previous = kernels.set_backend(backend)
        try:
            with running_on("cuda") as (xp, launches):
                gx = kernels.relu_backward(xp.asarray(gy), xp.asarray(x))
        finally:
            kernels.set_backend(previous)
        assert launches == launched, backend
        assert_same(gx, expected, exact=True)
