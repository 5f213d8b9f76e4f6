"""The matmul kernel (kernels/cuda/matmul.cu through kernels/cuda_matmul.py) and its dispatch
(``tinymeta.kernels.matmul``, ``cuda_matmul_choice``).

Without a GPU the kernel runs in the emulator (tests/cuda_emulator.py: its source compiled by
g++, thread after thread, on NumPy arrays through the same wrapper): against a naive loop over
k in the operands' dtype, bit for bit, and against a float64 product within the dtype's
tolerance. The dispatch is checked on shapes alone, and on the engine's CPU path, which must
stay NumPy's ``a @ b``. The tests marked ``gpu`` run the kernel on CuPy arrays.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from unittest import mock

import cuda_emulator
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_capture import W1_SHAPES, _mlp, _params, _sinusoid_batches
from tinymeta.kernels import cuda_launch, cuda_matmul

import tinymeta as tm
from tinymeta import kernels, meta
from tinymeta.nn import functional as F

HAVE_CUDA = tm.cuda.is_available()
FLOATS = (np.float32, np.float64)
# A product of float64 sums, against the dtype's own: relative, and absolute in units of
# sum_k |a_ik| |b_kj| (the bound of a sum's rounding error grows with it).
TOLERANCE = {np.dtype(np.float32): 1e-6 * 8, np.dtype(np.float64): 1e-15 * 8}


def naive_matmul(a, b):
    """a @ b as a loop over k in increasing order, in the operands' dtype: each product
    rounded, then added to the running sum (from zero); batch axes broadcast."""
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    total = np.zeros(batch + (a.shape[-2], b.shape[-1]), a.dtype)
    for t in range(a.shape[-1]):
        total = total + a[..., :, t, None] * b[..., None, t, :]
    return total


def assert_close_to_float64(c, a, b):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    bound = np.abs(a64) @ np.abs(b64)
    error = np.abs(c.astype(np.float64) - a64 @ b64)
    assert np.all(error <= TOLERANCE[c.dtype] * a.shape[-1] * bound + 1e-300), error.max()


# --- the kernel, emulated ------------------------------------------------------------------------


def _layout(rng, shape, dtype, layout: str):
    """A standard-normal array of ``shape`` laid out as ``layout`` says: "c" (C order),
    "transposed" (a swapaxes view of a C-contiguous (..., cols, rows) array) or "strided"
    (every other column of a wider array); strides never negative."""
    if layout == "transposed":
        data = rng.standard_normal(shape[:-2] + shape[-2:][::-1]).astype(dtype)
        return data.swapaxes(-1, -2)
    if layout == "strided":
        wide = rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(dtype)
        return wide[..., ::2]
    return rng.standard_normal(shape).astype(dtype)


@st.composite
def operands(draw):
    """(a, b): shapes (..., m, k) and (..., k, n) whose batch axes broadcast (size-1 axes and
    missing leading axes on either side), sizes 1 to 7 (so K = 1 too), in any layout."""
    batch = draw(st.lists(st.integers(1, 3), max_size=3))
    m, k, n = (draw(st.integers(1, 7)) for _ in range(3))

    def own_batch():
        kept = batch[draw(st.integers(0, len(batch))) :]  # leading axes may be missing
        return [1 if draw(st.booleans()) else size for size in kept]  # size-1 axes broadcast

    dtype = draw(st.sampled_from(FLOATS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layouts = st.sampled_from(("c", "transposed", "strided"))
    a = _layout(rng, tuple(own_batch()) + (m, k), dtype, draw(layouts))
    b = _layout(rng, tuple(own_batch()) + (k, n), dtype, draw(layouts))
    return a, b


@given(operands())
def test_kernel_is_the_naive_loop_bit_for_bit_and_close_to_float64(ab):
    a, b = ab
    with cuda_emulator.emulate() as emulation:
        c = cuda_matmul.matmul(a, b)
    assert emulation.launches == [f"matmul<{cuda_launch.c_type('matmul', a.dtype)}>"]
    expected = naive_matmul(a, b)
    assert c.dtype == a.dtype and c.shape == expected.shape and c.flags.c_contiguous
    np.testing.assert_array_equal(c, expected)
    assert_close_to_float64(c, a, b)
    assert np.allclose(c, a @ b, rtol=1e-4 if a.dtype == np.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
def test_kernel_reads_views_in_place(dtype):
    """A transposed operand, a broadcast batch axis (stride 0) and batch axes that merge pass
    no copy to the kernel: the arrays it gets span the operands' own memory."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 6, 5)).astype(dtype)
    x = rng.standard_normal((3, 4, 2, 5)).astype(dtype)
    spans = []
    launch = cuda_emulator.Emulation.launch

    def recording(self, source, kernel, dtype_, threads, args):
        spans.extend(args[:2])
        launch(self, source, kernel, dtype_, threads, args)

    with mock.patch.object(cuda_emulator.Emulation, "launch", recording), cuda_emulator.emulate():
        c = cuda_matmul.matmul(x, w.swapaxes(-1, -2))  # (3, 4, 2, 5) @ (4, 5, 6)
    assert np.shares_memory(spans[0], x) and np.shares_memory(spans[1], w)
    np.testing.assert_array_equal(c, naive_matmul(x, w.swapaxes(-1, -2)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_batch_axes_that_do_not_merge_are_copied_first(dtype):
    """(5, 1, 4) against (3, 1): three batch axes whose strides no two share; still right."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((5, 1, 4, 2, 3)).astype(dtype)
    b = rng.standard_normal((3, 1, 3, 2)).astype(dtype)
    with cuda_emulator.emulate():
        c = cuda_matmul.matmul(a, b)
    assert c.shape == (5, 3, 4, 2, 2)
    np.testing.assert_array_equal(c, naive_matmul(a, b))


@pytest.mark.parametrize("dtype", FLOATS)
def test_negative_strides_are_copied_first(dtype):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 4)).astype(dtype)[:, ::-1, ::-1]
    b = rng.standard_normal((4, 2)).astype(dtype)
    with cuda_emulator.emulate():
        c = cuda_matmul.matmul(a, b)
    np.testing.assert_array_equal(c, naive_matmul(a, b))


@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_and_inf_propagate_as_in_the_naive_loop(dtype):
    """NaN anywhere in row i of A makes row i of C NaN; inf times a nonzero gives inf, inf
    times zero and inf - inf give NaN, as NumPy's products do."""
    a = np.array([[1.0, np.nan, 2.0], [np.inf, 1.0, 0.0], [np.inf, 0.0, -np.inf], [1.0, 2.0, 3.0]])
    b = np.array([[1.0, 2.0], [0.0, 3.0], [1.0, 1.0]])
    a, b = a.astype(dtype), b.astype(dtype)
    with cuda_emulator.emulate():
        c = cuda_matmul.matmul(a, b)
    with np.errstate(invalid="ignore"):  # inf - inf
        np.testing.assert_array_equal(c, naive_matmul(a, b))
    assert np.isnan(c[0]).all()
    assert c[1, 0] == np.inf and c[1, 1] == np.inf
    assert np.isnan(c[2]).all()  # inf * 1 + 0 * 0 + (-inf) * 1
    np.testing.assert_array_equal(c[3], a[3] @ b)


@pytest.mark.parametrize("dtype", FLOATS)
def test_a_sum_of_negative_zeros_is_positive_zero_as_in_the_naive_loop(dtype):
    a = np.array([[0.0, 0.0], [-0.0, 1.0]], dtype)
    b = np.array([[-1.0], [-0.0]], dtype)
    with cuda_emulator.emulate():
        c = cuda_matmul.matmul(a, b)
    np.testing.assert_array_equal(np.signbit(c), np.signbit(naive_matmul(a, b)))
    assert not np.signbit(c).any()  # 0 + (-0) + (-0) = +0


@pytest.mark.parametrize("shapes", [((2, 0, 3), (3, 4)), ((2, 3, 0), (0, 4)), ((0, 3, 3), (3, 3))])
def test_empty_products_are_zeros_without_a_launch(shapes):
    a, b = (np.ones(s, np.float32) for s in shapes)
    with cuda_emulator.emulate() as emulation:
        c = cuda_matmul.matmul(a, b)
    assert emulation.launches == []
    np.testing.assert_array_equal(c, a @ b)
    assert c.dtype == np.float32


def test_bad_operands_are_refused_with_the_shapes_and_dtypes():
    f32 = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match=r"matmul: .*float32 or float64 .* float32 and float64"):
        cuda_matmul.matmul(f32, np.ones((3, 2)))
    with pytest.raises(TypeError, match="int64 and int64"):
        cuda_matmul.matmul(np.ones((2, 3), np.int64), np.ones((3, 2), np.int64))
    with pytest.raises(ValueError, match=r"matmul: expected .* got shapes \(2, 3\) and \(2, 3\)"):
        cuda_matmul.matmul(f32, f32)
    with pytest.raises(ValueError, match=r"batch axes of shapes \(2, 2, 3\) and \(3, 3, 2\)"):
        cuda_matmul.matmul(np.ones((2, 2, 3), np.float32), np.ones((3, 3, 2), np.float32))


def test_the_kernel_rounds_each_product_on_the_gpu_too(tmp_path):
    """nvcc (as NVRTC) fuses `s + x * y` into a multiply-add unless told not to: the PTX of
    the kernel has rounded multiplies and adds and no fma, so a GPU gives the naive loop's bits."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    source = (cuda_launch.SOURCE_DIR / "matmul.cu").read_text()
    program = tmp_path / "matmul.cu"
    program.write_text(source + "\nvoid* k[] = {(void*)&matmul<float>, (void*)&matmul<double>};\n")
    out = tmp_path / "matmul.ptx"
    done = subprocess.run(
        [nvcc, "-ptx", "-arch=sm_90", "-std=c++17", "-o", str(out), str(program)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ptx = out.read_text()
    assert re.search(r"\bmul\.rn\.f32\b", ptx) and re.search(r"\bmul\.rn\.f64\b", ptx)
    assert re.search(r"\badd\.f32\b", ptx) and re.search(r"\badd\.f64\b", ptx)
    assert not re.search(r"\bfma\.", ptx)


# --- the dispatch --------------------------------------------------------------------------------


class DeviceArray:
    """Stands in for a CuPy array in the dispatch: a shape and dtype, and ``@`` recorded."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __matmul__(self, other):
        return ("cublas", self.shape, other.shape)


@pytest.fixture
def setting():
    """Restores the CUDA matmul setting after the test."""
    previous = kernels.cuda_matmul_setting()
    yield kernels.set_cuda_matmul
    kernels.set_cuda_matmul(previous)


def test_numpy_arrays_take_numpys_matmul_bit_for_bit(setting):
    rng = np.random.default_rng(6)
    pairs = [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (4, 3)), ((2, 1, 3, 4), (5, 4, 2))]
    for name in ("auto", "kernel", "cublas"):
        setting(name)
        for sa, sb in pairs:
            for dtype in (np.float32, np.float64, np.int64):
                a, b = rng.standard_normal(sa).astype(dtype), rng.standard_normal(sb).astype(dtype)
                c = kernels.matmul(a, b)
                assert c.dtype == (a @ b).dtype
                np.testing.assert_array_equal(c, a @ b)


def test_the_engine_on_the_cpu_never_reaches_the_cuda_wrapper(setting):
    """MatMul's and Linear's forwards and backward rules (both orders) on NumPy arrays: with
    the wrapper and the decision replaced by failures, under every setting."""
    setting("kernel")
    rng = np.random.default_rng(7)
    x = tm.tensor(rng.standard_normal((3, 4, 5)).astype(np.float32), requires_grad=True)
    w = tm.tensor(rng.standard_normal((6, 5)).astype(np.float32), requires_grad=True)
    v = tm.tensor(rng.standard_normal((3, 6, 2)).astype(np.float32), requires_grad=True)
    fail = mock.Mock(side_effect=AssertionError("the CUDA path was taken on the cpu"))
    with (
        mock.patch.object(cuda_matmul, "matmul", fail),
        mock.patch.object(kernels, "cuda_matmul_choice", fail),
    ):
        y = tm.matmul(F.linear(x, w), v)
        (gx,) = tm.grad(y.sum(), [x], create_graph=True)
        (gx * gx).sum().backward()
    assert fail.call_count == 0
    assert w.grad is not None and v.grad is not None


SMALL_W1 = [
    ((25, 1, 10), (25, 10, 40)), ((25, 10, 40), (25, 40, 1)), ((25, 10, 40), (25, 40, 40)),
    ((25, 40, 10), (25, 10, 1)), ((25, 40, 10), (25, 10, 40)),
]  # fmt: skip


def test_the_decision_on_shapes():
    choice = kernels.cuda_matmul_choice
    edge = kernels.KERNEL_MAX_PRODUCT  # 64**3
    assert choice((64, 64), (64, 64), np.float32, np.float32, "auto") == "kernel"
    assert choice((64, 64), (64, 65), np.float32, np.float32, "auto") == "cublas"
    assert choice((1, edge), (edge, 1), np.float64, np.float64, "auto") == "kernel"
    assert choice((1, edge + 1), (edge + 1, 1), np.float64, np.float64, "auto") == "cublas"
    # the batch: KERNEL_MAX_TOTAL multiply-adds in all (64 products of 64**3), not one more
    batches = kernels.KERNEL_MAX_TOTAL // edge
    assert choice((batches, 64, 64), (64, 64), np.float32, np.float32, "auto") == "kernel"
    assert choice((batches + 1, 64, 64), (64, 64), np.float32, np.float32, "auto") == "cublas"
    assert choice((2, 1, 8, 8), (3, 8, 8), np.float32, np.float32, "auto") == "kernel"
    for sa, sb in SMALL_W1:
        assert choice(sa, sb, np.float32, np.float32, "auto") == "kernel", (sa, sb)
    big = ((512, 512), (512, 512))
    assert choice(*big, np.float32, np.float32, "kernel") == "kernel"
    assert choice(*big, np.float32, np.float32, "auto") == "cublas"
    assert choice((2, 2), (2, 2), np.float32, np.float32, "cublas") == "cublas"
    # what the kernel does not take goes to cuBLAS under every setting
    for name in ("auto", "kernel", "cublas"):
        for sa, sb, da, db in (
            ((2, 3), (3, 4), np.float32, np.float64),
            ((2, 3), (3, 4), np.float16, np.float16),
            ((2, 3), (3, 4), np.int64, np.int64),
            ((3,), (3, 4), np.float32, np.float32),
            ((2, 3), (4, 4), np.float32, np.float32),
            ((2, 2, 3), (3, 3, 4), np.float32, np.float32),
        ):
            assert choice(sa, sb, da, db, name) == "cublas", (sa, sb, da, db, name)


def test_device_arrays_go_where_the_decision_says(setting):
    wrapper = mock.Mock(return_value="kernel")
    with mock.patch.object(cuda_matmul, "matmul", wrapper):
        small = DeviceArray((25, 10, 40)), DeviceArray((40, 40))
        big = DeviceArray((256, 256)), DeviceArray((256, 256))
        assert kernels.matmul(*small) == "kernel"
        assert kernels.matmul(*big) == ("cublas", (256, 256), (256, 256))
        setting("kernel")
        assert kernels.matmul(*big) == "kernel"
        setting("cublas")
        assert kernels.matmul(*small) == ("cublas", (25, 10, 40), (40, 40))
    assert [c.args for c in wrapper.call_args_list] == [small, big]


def test_the_setting_from_the_environment(monkeypatch, setting):
    for value, expected in (("kernel", "kernel"), (" CUBLAS ", "cublas"), ("", "auto")):
        monkeypatch.setenv("TINYMETA_CUDA_MATMUL", value)
        assert kernels._initial_cuda_matmul() == expected
    monkeypatch.setenv("TINYMETA_CUDA_MATMUL", "cudnn")
    with pytest.raises(ValueError, match="TINYMETA_CUDA_MATMUL must be one of .* 'cudnn'"):
        kernels._initial_cuda_matmul()
    assert setting("kernel") in ("auto", "kernel", "cublas")
    assert setting("cublas") == "kernel" and kernels.cuda_matmul_setting() == "cublas"
    with pytest.raises(ValueError, match="set_cuda_matmul: expected one of"):
        setting("fast")


# --- W1 through the kernel -----------------------------------------------------------------------


def _w1_meta_gradient(steps: int):
    """W1's task-vectorized second-order MAML meta-gradient (25 tasks), on the cpu, float32."""
    params = _params(W1_SHAPES)
    batch = [tm.tensor(a) for a in _sinusoid_batches(1, tasks=25)[0]]
    loss = meta.maml_loss(_mlp, params, batch[:2], batch[2:], F.mse_loss, 0.01, steps)
    loss.backward()
    return {name: p.grad.data for name, p in params.items()}


@pytest.mark.parametrize("steps", [1, 2])
def test_every_product_of_w1_takes_the_kernel_so_a_capture_is_one_graph(monkeypatch, steps):
    """The products W1's meta-iteration asks kernels.matmul for (from MatMul and Linear, both
    orders), as CuPy arrays of those shapes would ask: all of them the kernel's."""
    asked = []
    matmul = kernels.matmul

    def recording(a, b):
        asked.append((a.shape, b.shape, a.dtype, b.dtype))
        return matmul(a, b)

    monkeypatch.setattr(kernels, "matmul", recording)
    _w1_meta_gradient(steps)
    assert len(asked) >= 10 * steps
    choices = {kernels.cuda_matmul_choice(*shapes, "auto") for shapes in asked}
    assert choices == {"kernel"}, asked


def test_w1_with_every_product_in_the_emulated_kernel(monkeypatch):
    """W1's meta-gradient with its products run by the kernel (emulated on NumPy arrays, in
    every layout the engine hands it): within float32 rounding of NumPy's."""
    expected = _w1_meta_gradient(1)

    def through_the_kernel(a, b):
        return cuda_matmul.matmul(a, b)

    monkeypatch.setattr(kernels, "matmul", through_the_kernel)
    with cuda_emulator.emulate() as emulation:
        got = _w1_meta_gradient(1)
    assert len(emulation.launches) >= 10
    for name in W1_SHAPES:
        scale = np.abs(expected[name]).max()
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5 * scale)


# --- on a GPU ------------------------------------------------------------------------------------


def on_gpu(test):
    skip = pytest.mark.skipif(not HAVE_CUDA, reason="needs CuPy and a CUDA GPU")
    return pytest.mark.gpu(skip(test))


def _same_layout_on_device(cupy, a):
    """A CuPy copy of a NumPy array made by _layout, laid out as it is (a view, not a copy)."""
    if a.flags.c_contiguous:
        return cupy.asarray(a)
    if a.swapaxes(-1, -2).flags.c_contiguous:  # "transposed"
        return cupy.asarray(a.swapaxes(-1, -2)).swapaxes(-1, -2)
    wide = cupy.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)  # "strided"
    wide[..., ::2] = cupy.asarray(a)
    return wide[..., ::2]


@on_gpu
@given(operands())
def test_cuda_kernel_is_the_naive_loop_and_near_cublas(ab):
    import cupy

    a, b = ab
    da, db = _same_layout_on_device(cupy, a), _same_layout_on_device(cupy, b)
    c = cuda_matmul.matmul(da, db)
    assert isinstance(c, cupy.ndarray) and c.flags.c_contiguous
    np.testing.assert_array_equal(c.get(), naive_matmul(a, b))
    assert_close_to_float64(c.get(), a, b)
    np.testing.assert_allclose(
        c.get(), (da @ db).get(), rtol=1e-4 if a.dtype == np.float32 else 1e-12, atol=1e-5
    )


@on_gpu
@pytest.mark.parametrize("name", ["kernel", "cublas"])
def test_cuda_engine_products_follow_the_setting(setting, name):
    import cupy

    setting(name)
    rng = np.random.default_rng(10)
    a = rng.standard_normal((4, 8, 16)).astype(np.float32)
    b = rng.standard_normal((16, 8)).astype(np.float32)
    launched = []
    launch = cuda_launch.CudaSource.launch

    def recording(source, kernel, dtype, threads, args):
        launched.append(kernel)
        launch(source, kernel, dtype, threads, args)

    with mock.patch.object(cuda_launch.CudaSource, "launch", recording):
        y = tm.matmul(tm.tensor(a, device="cuda"), tm.tensor(b, device="cuda"))
    assert (launched == ["matmul"]) == (name == "kernel")
    if name == "kernel":
        np.testing.assert_array_equal(y.data.get(), naive_matmul(a, b))
    cupy.testing.assert_allclose(y.data, cupy.asarray(a) @ cupy.asarray(b), rtol=1e-5, atol=1e-5)
