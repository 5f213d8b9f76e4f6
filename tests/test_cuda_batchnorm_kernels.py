"""The batch-norm CUDA kernels (kernels/cuda/batchnorm.cu, launched by kernels/cuda_batchnorm.py)
against kernels/reference.py, in float32 and float64.

``device="cpu"`` runs the CUDA source on the CPU under tests/cuda_emulator.py (compiled with
g++, every thread of the grid in turn, out-of-bounds writes caught); ``device="cuda"`` (marked
gpu, skipped without CuPy and a GPU) launches it on CuPy arrays. The wrappers are the same code
either way. The reference runs in float64 on the very inputs the kernels get (float32 values
upcast): the kernels sum and compute in double and round once, so their float32 results lie
within a few float32 ulps of it, closer than the reference's own float32 arithmetic.
"""

from __future__ import annotations

import contextlib
import itertools
from types import SimpleNamespace
from unittest import mock

import cuda_emulator
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tinymeta.kernels import cuda_batchnorm, reference

import tinymeta as tm
from tinymeta import kernels

DTYPES = [np.float32, np.float64]
TOL = {np.float32: {"rtol": 1e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}
EPS = 1e-5
LAYOUTS = ["contiguous", "channels_last", "strided"]

# --- running on a device, comparing on the host ---------------------------------------------


@contextlib.contextmanager
def _device(device: str):
    """Yields the function that moves a host array to where the kernels run on ``device``."""
    if device == "cpu":
        with cuda_emulator.emulate():
            yield lambda a: a
    else:
        import cupy

        yield cupy.asarray


def _host(a):
    return a.get() if hasattr(a, "get") else a  # CuPy arrays have .get(), NumPy's do not


def _wide(a):
    """The float64 reference's copy of an input (None stays None)."""
    return None if a is None else np.asarray(a, np.float64)


def _assert_close(got, want, dtype, scale=None):
    """got (kernels, in ``dtype``) against want (the float64 reference), relative to the size
    of the results: a sum of n terms is as exact as its largest terms allow."""
    got = _host(got)
    assert got.dtype == np.dtype(dtype) and got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1.0) if scale is None else scale
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


# --- Hypothesis cases -------------------------------------------------------------------------


def _in_layout(a, layout: str):
    """The same (T, N, C, S) values in another memory layout (see tests/test_kernels.py)."""
    if layout == "contiguous":
        return np.ascontiguousarray(a)
    if layout == "channels_last":
        return np.ascontiguousarray(a.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


@st.composite
def bn_cases(draw, n_arrays: int):
    """``n_arrays`` (T, N, C, S) arrays (x first), (T, C) parameters, a dtype and the number
    of chunks the sums are split into (small counts make chunks cross rows of the layout)."""
    shape = tuple(draw(st.integers(1, most)) for most in (3, 4, 5, 7))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = [
        (rng.standard_normal(shape) * rng.uniform(0.1, 3) + rng.uniform(-2, 2)).astype(dtype)
        for _ in range(n_arrays)
    ]
    if draw(st.booleans()):  # one constant channel: var = 0, inv_std = 1 / sqrt(eps)
        arrays[0][:, :, draw(st.integers(0, shape[2] - 1)), :] = dtype(rng.uniform(-2, 2))
    t, c = shape[0], shape[2]
    per_task = draw(st.booleans())  # (T, C) parameters, or (C,) ones broadcast as kernels does
    params = [rng.standard_normal((t, c) if per_task else (c,)).astype(dtype) for _ in range(3)]
    return SimpleNamespace(
        arrays=[_in_layout(a, layout) for a in arrays],
        params=[np.broadcast_to(p, (t, c)) for p in params],
        dtype=dtype,
        chunks=draw(st.sampled_from([1, 2, 3, 256])),
    )


def _chunks(count: int):
    return mock.patch.object(cuda_batchnorm, "_CHUNKS", count)


# --- statistics and forward -------------------------------------------------------------------


@given(case=bn_cases(n_arrays=1))
def test_bn_stats_and_forward_match_reference(device, case):
    (x,), (w, b, _), dtype = case.arrays, case.params, case.dtype
    with _device(device) as to_device, _chunks(case.chunks):
        stats = cuda_batchnorm.bn_stats(to_device(x), EPS)
        forward = cuda_batchnorm.bn_forward(to_device(x), to_device(w), to_device(b), EPS)
    want_stats = reference.bn_stats(_wide(x), EPS)
    want_forward = reference.bn_forward(_wide(x), _wide(w), _wide(b), EPS)
    for got, want in zip((*stats, *forward), (*want_stats, *want_forward)):
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channels_have_zero_variance(device, dtype):
    x = np.full((2, 3, 4, 5), 1.25, dtype)
    x[1] = -3.5
    w, b = np.full((2, 4), 2.0, dtype), np.arange(8, dtype=dtype).reshape(2, 4)
    with _device(device) as to_device:
        y, mean, inv_std = cuda_batchnorm.bn_forward(to_device(x), to_device(w), to_device(b), EPS)
    np.testing.assert_array_equal(_host(mean), [[1.25] * 4, [-3.5] * 4])
    np.testing.assert_array_equal(_host(inv_std), np.full((2, 4), dtype(1 / np.sqrt(EPS))))
    np.testing.assert_array_equal(_host(y), np.broadcast_to(b[:, None, :, None], x.shape))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_offsets_and_long_rows_stay_accurate(device, dtype, layout):
    # 19600 elements per (task, channel) in 256 chunks that cross the rows of S = 49, around a
    # mean far from zero relative to the spread: E[x^2] - E[x]^2 would cancel to nothing in
    # float32; two passes in double give inv_std to float32 rounding.
    rng = np.random.default_rng(3)
    x = _in_layout((1000 + rng.standard_normal((2, 400, 3, 49))).astype(dtype), layout)
    gy = _in_layout(rng.standard_normal(x.shape).astype(dtype), layout)
    w = rng.standard_normal((2, 3)).astype(dtype)
    with _device(device) as to_device:
        mean, inv_std = cuda_batchnorm.bn_stats(to_device(x), 0.0)
        gx, gw, gb = cuda_batchnorm.bn_backward(
            to_device(gy), to_device(x), mean, inv_std, to_device(w)
        )
    exact = np.asarray(x, np.float64)
    np.testing.assert_allclose(_host(mean), exact.mean(axis=(1, 3)), rtol=TOL[dtype]["rtol"])
    np.testing.assert_allclose(_host(inv_std), 1 / exact.std(axis=(1, 3)), rtol=TOL[dtype]["rtol"])
    want = reference.bn_backward(_wide(gy), exact, _wide(_host(mean)), _wide(_host(inv_std)), w)
    for got, r in zip((gx, gw, gb), want):
        _assert_close(got, r, dtype)


# --- backward and double backward --------------------------------------------------------


@given(case=bn_cases(n_arrays=2))
def test_bn_backward_matches_reference(device, case):
    (x, gy), (w, _, _), dtype = case.arrays, case.params, case.dtype
    mean, inv_std = reference.bn_stats(x, EPS)
    with _device(device) as to_device, _chunks(case.chunks):
        got = cuda_batchnorm.bn_backward(
            to_device(gy), to_device(x), to_device(mean), to_device(inv_std), to_device(w)
        )
    want = reference.bn_backward(*map(_wide, (gy, x, mean, inv_std, w)))
    scale = max(float(np.abs(want[0]).max()), 1.0)  # gx: a difference of O(n) terms
    for g, r in zip(got, want):
        _assert_close(g, r, dtype, scale=max(scale, float(np.abs(r).max())))


def _double_backward(device, case, missing: set, need_gy: bool, need_x: bool):
    """The kernels' and the float64 reference's bn_double_backward, with the inputs named in
    ``missing`` (of ggx, ggw, ggb, weight) left out (None)."""
    (x, gy, ggx), (w, ggw, ggb) = case.arrays, case.params
    mean, inv_std = reference.bn_stats(x, EPS)
    optional = {"ggx": ggx, "ggw": ggw, "ggb": ggb, "weight": w}
    optional = {k: None if k in missing else v for k, v in optional.items()}
    with _device(device) as to_device, _chunks(case.chunks):

        def moved(a):
            return None if a is None else to_device(a)

        got = cuda_batchnorm.bn_double_backward(
            *map(moved, (gy, x, mean, inv_std, optional["weight"], optional["ggx"])),
            moved(optional["ggw"]),
            moved(optional["ggb"]),
            need_gy=need_gy,
            need_x=need_x,
        )
    weight = np.ones_like(w) if optional["weight"] is None else w  # a missing weight is one
    want = reference.bn_double_backward(
        *map(_wide, (gy, x, mean, inv_std, weight, optional["ggx"])),
        _wide(optional["ggw"]),
        _wide(optional["ggb"]),
        need_gy=need_gy,
        need_x=need_x,
    )
    return got, want


def _assert_double_backward_close(got, want, dtype):
    assert [g is None for g in got] == [r is None for r in want]
    # Sums of O(n) terms times inv_std**2: compare against the size of all the results.
    scale = max(max(float(np.abs(r).max()) for r in want if r is not None), 1.0)
    for g, r in zip(got, want):
        if r is not None:
            _assert_close(g, r, dtype, scale=scale)


OPTIONAL_INPUTS = ("ggx", "ggw", "ggb", "weight")


@given(
    case=bn_cases(n_arrays=3),
    missing=st.sets(st.sampled_from(OPTIONAL_INPUTS)),
    need_gy=st.booleans(),
    need_x=st.booleans(),
)
def test_bn_double_backward_matches_reference(device, case, missing, need_gy, need_x):
    got, want = _double_backward(device, case, missing, need_gy, need_x)
    _assert_double_backward_close(got, want, case.dtype)


MISSING_SETS = [
    {name for name, gone in zip(OPTIONAL_INPUTS, flags) if gone}
    for flags in itertools.product((False, True), repeat=4)
]


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("missing", MISSING_SETS, ids=lambda m: "-".join(sorted(m)) or "none")
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_double_backward_every_missing_input_and_output(device, dtype, missing, needs):
    rng = np.random.default_rng(len(missing))
    shape = (2, 3, 3, 5)
    arrays = [(rng.standard_normal(shape) + 0.5).astype(dtype) for _ in range(3)]
    params = [rng.standard_normal((2, 3)).astype(dtype) for _ in range(3)]
    case = SimpleNamespace(arrays=arrays, params=params, dtype=dtype, chunks=4)
    got, want = _double_backward(device, case, missing, *needs)
    _assert_double_backward_close(got, want, dtype)


# --- on a GPU: dispatch and determinism -------------------------------------------------------

needs_gpu = pytest.mark.skipif(not tm.cuda.is_available(), reason="needs CuPy and a CUDA GPU")

# The kernel each public bn_* function must launch last.
LAST_LAUNCH = {
    "bn_stats": "bn_inv_std_finish",
    "bn_forward": "bn_normalize",
    "bn_backward": "bn_backward_input",
    "bn_double_backward": "bn_double_backward_inputs",
}


def _public_calls(cupy, dtype):
    """Each public bn_* kernel called once on CuPy arrays, as {name: thunk}."""
    rng = np.random.default_rng(5)
    x, gy, ggx = (cupy.asarray(rng.standard_normal((2, 4, 3, 6)).astype(dtype)) for _ in "abc")
    w, b = (cupy.asarray(rng.standard_normal(3).astype(dtype)) for _ in "ab")
    mean, inv_std = reference.bn_stats(x, EPS)
    return {
        "bn_stats": lambda: kernels.bn_stats(x, EPS),
        "bn_forward": lambda: kernels.bn_forward(x, w, b, EPS),
        "bn_backward": lambda: kernels.bn_backward(gy, x, mean, inv_std, w),
        "bn_double_backward": lambda: kernels.bn_double_backward(gy, x, mean, inv_std, w, ggx),
    }


@pytest.mark.parametrize("kernel", sorted(LAST_LAUNCH))
def test_cupy_dispatch_finds_these_kernels_by_name(kernel):
    assert getattr(kernels._cuda, kernel) is getattr(cuda_batchnorm, kernel)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", sorted(LAST_LAUNCH))
def test_public_kernels_dispatch_cupy_arrays_to_the_cuda_kernels(kernel, dtype):
    import cupy

    call = _public_calls(cupy, dtype)[kernel]
    source = cuda_batchnorm._SOURCE
    with mock.patch.object(source, "launch", wraps=source.launch) as spy:
        got = call()
    assert spy.call_args_list[-1].args[0] == LAST_LAUNCH[kernel]
    previous = kernels.set_backend("numpy")  # the escape hatch: the reference on CuPy arrays
    try:
        want = call()
    finally:
        kernels.set_backend(previous)
    for g, r in zip(got, want):
        if r is not None:
            assert isinstance(g, cupy.ndarray)
            _assert_close(g, _host(r).astype(np.float64), dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_are_the_same_bits_on_every_run(dtype):
    # No atomics: every sum adds the same terms in the same order, whatever the scheduling.
    import cupy

    for call in _public_calls(cupy, dtype).values():
        first, second = call(), call()
        for a, b in zip(first, second):
            if a is not None:
                np.testing.assert_array_equal(_host(a), _host(b))
