"""Winograd F(2x2, 3x3) convolutions (tinymeta/nn/conv.py, ``kernels.winograd_*``).

The tile transforms against plain definitions and their adjoints, the Numba kernels against
the NumPy reference (float32 and float64, any layout), the three convolution ops on the
Winograd path against the im2col path (values and derivatives of orders 1 and 2, with and
without a task axis), finite-difference checks of the Winograd path up to order 3, which
shapes take it, and argument errors that name the kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tinymeta.kernels import reference

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import kernels
from tinymeta.nn import conv
from tinymeta.testing import check_grads

numba_impl = pytest.importorskip("tinymeta.kernels.numba_impl")

DTYPES = [np.float32, np.float64]
TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}


def conv_loops(x, w, ph: int, pw: int):
    """The definition: y[n,o,i,j] = sum_{c,p,q} x_pad[n,c,i+p,j+q] w[o,c,p,q] (float64)."""
    n, c, h, wd = x.shape
    padded = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    padded[:, :, ph : ph + h, pw : pw + wd] = x
    oh, ow = h + 2 * ph - 2, wd + 2 * pw - 2
    y = np.zeros((n, w.shape[0], oh, ow))
    for p in range(3):
        for q in range(3):
            window = padded[:, :, p : p + oh, q : q + ow]
            y += np.einsum("nchw,oc->nohw", window, w[:, :, p, q].astype(np.float64))
    return y


def channels_last(a):
    """a (N, C, H, W) with the channels innermost in memory (as tinymeta's convolutions make)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@st.composite
def winograd_cases(draw):
    """x (N, C, H, W) in float32 or float64 and some layout, padding (ph, pw), a generator."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h, w = draw(st.integers(max(1, 3 - 2 * ph), 8)), draw(st.integers(max(1, 3 - 2 * pw), 8))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    x = channels_last(x) if draw(st.booleans()) else x
    return x, (ph, pw), dtype, rng


def winograd_weight_loops(w):
    """U[4u+v, c, o] = sum_{p,q} G[u,p] G[v,q] w[o,c,p,q], by definition."""
    g = np.array(reference.WINOGRAD_G)
    return np.einsum("up,vq,ocpq->uvco", g, g, w).reshape((16,) + w.shape[1::-1])


# --- the transforms -----------------------------------------------------------------------------


@given(case=winograd_cases(), o=st.integers(1, 4))
def test_winograd_transforms_compute_the_convolution(case, o):
    x, (ph, pw), dtype, rng = case
    w = rng.standard_normal((o, x.shape[1], 3, 3)).astype(dtype)
    oh, ow, th, tw = kernels.winograd_tiles(*x.shape[2:], ph, pw)
    expected = conv_loops(x, w, ph, pw)
    for impl in (reference, numba_impl):
        v = impl.winograd_input(x, ph, pw)
        assert v.shape == (16, x.shape[0], th, tw, x.shape[1]) and v.dtype == np.dtype(dtype)
        m = v.reshape(16, -1, x.shape[1]) @ winograd_weight_loops(w).astype(dtype)
        y = impl.winograd_output(m.reshape(16, x.shape[0], th, tw, o), oh, ow)
        assert y.shape == expected.shape and y.dtype == np.dtype(dtype)
        assert y.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last memory
        np.testing.assert_allclose(y, expected, rtol=1e-4 if dtype == np.float32 else 1e-12,
                                   atol=1e-4 if dtype == np.float32 else 1e-12)  # fmt: skip


@given(case=winograd_cases(), o=st.integers(1, 4))
def test_winograd_adjoint_transforms_are_the_transposes(case, o):
    """<T x, v> = <x, T* v> for the input and output transforms, in both implementations."""
    x, (ph, pw), dtype, rng = case
    n, c, h, w = x.shape
    oh, ow, th, tw = kernels.winograd_tiles(h, w, ph, pw)
    v = rng.standard_normal((16, n, th, tw, c)).astype(dtype)
    m = rng.standard_normal((16, n, th, tw, o)).astype(dtype)
    gy = rng.standard_normal((n, o, oh, ow)).astype(dtype)
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    for impl in (reference, numba_impl):
        gx = impl.winograd_input_adjoint(v, h, w, ph, pw)
        assert gx.shape == x.shape and gx.dtype == np.dtype(dtype)
        lhs = np.vdot(impl.winograd_input(x, ph, pw).astype(np.float64), v)
        np.testing.assert_allclose(lhs, np.vdot(x.astype(np.float64), gx), rtol=rtol, atol=rtol)
        mg = impl.winograd_output_adjoint(gy, th, tw)
        assert mg.shape == m.shape and mg.dtype == np.dtype(dtype)
        lhs = np.vdot(impl.winograd_output(m, oh, ow).astype(np.float64), gy)
        np.testing.assert_allclose(lhs, np.vdot(m.astype(np.float64), mg), rtol=rtol, atol=rtol)


@given(case=winograd_cases(), o=st.integers(1, 4), strided=st.booleans())
def test_winograd_numba_kernels_match_reference(case, o, strided):
    x, (ph, pw), dtype, rng = case
    n, c, h, w = x.shape
    oh, ow, th, tw = kernels.winograd_tiles(h, w, ph, pw)
    v = rng.standard_normal((16, n, th, tw, 2 * c)).astype(dtype)
    v = v[..., ::2] if strided else v[..., :c]  # any strides
    m = rng.standard_normal((16, n, th, tw, o)).astype(dtype)
    gy = rng.standard_normal((n, o, oh, ow)).astype(dtype)
    gy = channels_last(gy) if strided else gy
    pairs = [
        (numba_impl.winograd_input(x, ph, pw), reference.winograd_input(x, ph, pw)),
        (
            numba_impl.winograd_input_adjoint(v, h, w, ph, pw),
            reference.winograd_input_adjoint(v, h, w, ph, pw),
        ),
        (numba_impl.winograd_output(m, oh, ow), reference.winograd_output(m, oh, ow)),
        (
            numba_impl.winograd_output_adjoint(gy, th, tw),
            reference.winograd_output_adjoint(gy, th, tw),
        ),
    ]
    for got, want in pairs:
        assert got.dtype == want.dtype == np.dtype(dtype) and got.shape == want.shape
        np.testing.assert_allclose(got, want, **TOL[dtype])


def test_winograd_weight_transform_and_its_adjoint():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 4, 3, 3, 3))  # a task axis: (T, O, C, 3, 3)
    u = conv.winograd_weight(w)
    assert u.shape == (16, 2, 3, 4)
    for t in range(2):
        np.testing.assert_allclose(u[:, t], winograd_weight_loops(w[t]), rtol=1e-14)
    du = rng.standard_normal(u.shape)
    gw = conv.winograd_weight_adjoint(du)
    assert gw.shape == w.shape
    np.testing.assert_allclose(np.vdot(u, du), np.vdot(w, gw), rtol=1e-12)


# --- the convolution ops on the Winograd path -------------------------------------------------


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Every 3x3 stride-1 convolution takes the Winograd path (small test shapes included)."""
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "WINOGRAD_MAX_WORK", float("inf"))


def conv_and_two_derivatives(x, w, b, padding, gy, seed_grad):
    """y, (gx, gw) of <y, gy>, and the gradient of |gx|^2 + |gw|^2 (second order) w.r.t. x, w."""
    y = F.conv2d(x, w, b, padding=padding)
    gx, gw = tm.grad((y * gy).sum(), [x, w], create_graph=True)
    second = tm.grad((gx * seed_grad[0]).sum() + (gw * gw).sum(), [x, w])
    return [a.numpy() for a in (y, gx, gw, *second)]


@pytest.mark.parametrize(
    "x_shape, w_shape, padding",
    [
        ((2, 3, 5, 6), (4, 3, 3, 3), 1),
        ((3, 2, 3, 7, 7), (3, 4, 3, 3, 3), (1, 0)),  # per-task weights
        ((2, 2, 3, 4, 5), (4, 3, 3, 3), 2),  # a task axis, one shared weight
        ((1, 2, 2, 2), (2, 2, 3, 3), 1),
    ],
)
def test_winograd_path_equals_the_im2col_path(monkeypatch, x_shape, w_shape, padding):
    rng = np.random.default_rng(sum(x_shape))
    arrays = [rng.standard_normal(s) for s in (x_shape, w_shape, w_shape[:-4] + w_shape[-4:-3])]

    def run(min_channels, max_work):
        monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", min_channels)
        monkeypatch.setattr(conv, "WINOGRAD_MAX_WORK", max_work)
        x, w, b = (tm.tensor(a, requires_grad=True) for a in arrays)
        out_rng = np.random.default_rng(1)
        y_shape = F.conv2d(x, w, b, padding=padding).shape
        gy = tm.tensor(out_rng.standard_normal(y_shape))
        return conv_and_two_derivatives(x, w, b, padding, gy, [tm.tensor(arrays[0])])

    winograd, im2col = run(1, float("inf")), run(10**9, 0.0)
    for got, want in zip(winograd, im2col):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("padding", [1, (0, 1), 2])
def test_winograd_conv2d_gradcheck_orders_1_to_3(winograd_everywhere, padding):
    rng = np.random.default_rng(4)
    x = tm.tensor(rng.standard_normal((2, 2, 2, 4, 5)))
    w = tm.tensor(rng.standard_normal((2, 3, 2, 3, 3)))
    b = tm.tensor(rng.standard_normal((2, 3)))
    order = 3 if padding == 1 else 2
    assert check_grads(lambda x, w, b: F.conv2d(x, w, b, padding=padding), [x, w, b], order)


def test_winograd_conv2d_gradcheck_in_chunks_of_one_image_orders_1_to_3(
    winograd_everywhere, monkeypatch
):
    """Every op runs its images one chunk at a time (3 images per task, one per chunk): the
    derivatives to third order still match float64 finite differences."""
    monkeypatch.setattr(conv, "BLOCK_BYTES", 8)  # one 8-byte row: a chunk is one image
    monkeypatch.setattr(conv, "MIN_BLOCK_ROWS", 1)
    assert conv.images_per_chunk(3, 6, 2, 8) == 1
    rng = np.random.default_rng(5)
    x = tm.tensor(rng.standard_normal((2, 3, 2, 4, 5)))
    w = tm.tensor(rng.standard_normal((2, 3, 2, 3, 3)))
    assert check_grads(lambda x, w: F.conv2d(x, w, padding=1), [x, w], 3)


@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    o=st.integers(1, 3),
    hw=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    seed=st.integers(0, 2**16),
)
def test_winograd_conv2d_grads_order_2_hypothesis(n, c, o, hw, seed):
    rng = np.random.default_rng(seed)
    x = tm.tensor(rng.standard_normal((n, c) + hw))
    w = tm.tensor(rng.standard_normal((o, c, 3, 3)))
    saved = conv.WINOGRAD_MIN_CHANNELS, conv.WINOGRAD_MAX_WORK
    conv.WINOGRAD_MIN_CHANNELS, conv.WINOGRAD_MAX_WORK = 1, float("inf")
    try:
        assert check_grads(lambda x, w: F.conv2d(x, w, padding=1), [x, w], order=2)
    finally:
        conv.WINOGRAD_MIN_CHANNELS, conv.WINOGRAD_MAX_WORK = saved


def test_which_convolutions_take_winograd():
    x = np.zeros((1, 64, 14, 14), np.float32)
    assert conv.winograd_applies(x, 64, 64, (3, 3), (1, 1), (14, 14))  # W2's second layer
    assert conv.winograd_applies(x, 64, 64, (3, 3), (1, 1), (7, 7))  # its third
    assert not conv.winograd_applies(x, 64, 64, (3, 3), (1, 1), (3, 3))  # 4 tiles for 9 pixels
    assert not conv.winograd_applies(x, 1, 64, (3, 3), (1, 1), (28, 28))  # the first (1 channel)
    assert not conv.winograd_applies(x, 64, 64, (3, 3), (2, 2), (7, 7))  # strided
    assert not conv.winograd_applies(x, 64, 64, (5, 5), (1, 1), (14, 14))
    assert not conv.winograd_applies(x.tolist(), 64, 64, (3, 3), (1, 1), (14, 14))  # not NumPy


def test_w2_layer_on_winograd_matches_float64_im2col():
    """W2's second layer in float32 on the Winograd path against the float64 convolution."""
    rng = np.random.default_rng(5)
    x = channels_last(rng.standard_normal((10, 64, 14, 14)).astype(np.float32))
    w = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
    assert conv.winograd_applies(x, 64, 64, (3, 3), (1, 1), (14, 14))
    y = F.conv2d(tm.tensor(x), tm.tensor(w), padding=1).numpy()
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, conv_loops(x, w, 1, 1), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kernels.winograd_input(np.zeros((2, 3, 4)), 1, 1), r"winograd_input: expected"),
        (lambda: kernels.winograd_input(np.zeros((1, 1, 4, 4), np.int64), 1, 1), "float32"),
        (
            lambda: kernels.winograd_input_adjoint(np.zeros((16, 1, 2, 3, 2)), 4, 4, 1, 1),
            r"winograd_input_adjoint: expected v of shape \(16, 1, 2, 2, 2\)",
        ),
        (
            lambda: kernels.winograd_output(np.zeros((16, 1, 2, 2, 3)), 5, 4),
            r"winograd_output: expected m of shape \(16, 1, 3, 2, 3\)",
        ),
        (
            lambda: kernels.winograd_output_adjoint(np.zeros((1, 3, 4, 4)), 3, 2),
            r"winograd_output_adjoint: expected an \(N, O, oh, ow\) gradient with \(3, 2\)",
        ),
    ],
)
def test_winograd_kernel_errors_name_the_kernel_and_shapes(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# --- capture: the tiles shared between ops replay bit for bit ---------------------------------


def _two_layer_convnet(p, x):
    """1 -> 16 channels (im2col), then 16 -> 16 on 8x8 images (Winograd), batch norm, ReLU."""
    x = F.relu(F.conv2d(x, p["c1.w"], p["c1.b"], padding=1))
    x = F.conv2d(x, p["c2.w"], p["c2.b"], padding=1)
    x = F.batch_norm(x, None, None, p["bn.w"], p["bn.b"], training=True)
    x = F.max_pool2d(F.relu(x), 4)
    return F.linear(x.reshape(x.shape[:-3] + (-1,)), p["fc.w"], p["fc.b"])


TWO_LAYER_SHAPES = {"c1.w": (16, 1, 3, 3), "c1.b": (16,), "c2.w": (16, 16, 3, 3), "c2.b": (16,),
                    "bn.w": (16,), "bn.b": (16,), "fc.w": (3, 64), "fc.b": (3,)}  # fmt: skip


@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_winograd_maml_step_replays_bit_identical(first_order, vectorized):
    from test_capture import _omniglot_batches, _params, _twins

    from tinymeta.optim import Adam

    assert conv.winograd_applies(np.zeros(1), 16, 16, (3, 3), (1, 1), (8, 8))

    def make_state():
        params = _params(TWO_LAYER_SHAPES, seed=4)
        return {"params": params, "opt": Adam(list(params.values()), lr=1e-3)}

    def make_step(state):
        def step(*batch):
            state["opt"].zero_grad()
            loss = _meta_loss(state["params"], batch, first_order, vectorized)
            loss.backward()
            state["opt"].step()
            return loss

        return step

    _twins(make_state, make_step, _omniglot_batches(3))


def _meta_loss(params, batch, first_order=False, vectorized=True):
    """MAML's meta-loss of ``_two_layer_convnet``: 3-way tasks, one inner step."""
    from tinymeta import meta

    xs, ys, xq, yq = batch

    def xent(logits, labels):
        return F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1))

    return meta.maml_loss(
        _two_layer_convnet, params, (xs, ys), (xq, yq), xent, 0.4, 1,
        first_order=first_order, vectorized=vectorized,
    )  # fmt: skip


def test_winograd_maml_meta_gradient_matches_the_im2col_path(monkeypatch):
    """Second-order MAML through the shared tiles against the same net on im2col (float64)."""
    batch = [tm.tensor(a.astype(np.float64)) if a.dtype.kind == "f" else a
             for a in _omniglot_batch()]  # fmt: skip

    def meta_gradient(min_channels):
        monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", min_channels)
        rng = np.random.default_rng(6)
        params = {k: tm.tensor(rng.standard_normal(s) / np.sqrt(np.prod(s[1:])),
                               requires_grad=True)
                  for k, s in TWO_LAYER_SHAPES.items()}  # fmt: skip
        loss = _meta_loss(params, batch)
        return [g.numpy() for g in tm.grad(loss, list(params.values()))]

    for got, want in zip(meta_gradient(16), meta_gradient(10**9)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def _omniglot_batch(tasks=2, ways=3):
    rng = np.random.default_rng(7)
    labels = np.tile(np.arange(ways), (tasks, 1)).astype(np.int64)
    images = [rng.standard_normal((tasks, ways, 1, 8, 8)).astype(np.float32) for _ in range(2)]
    return images[0], labels, images[1], labels


@pytest.mark.parametrize("path", ["winograd", "im2col"])
def test_products_in_row_blocks_equal_the_whole_products(monkeypatch, path):
    """The convolution products run in blocks of rows (a limit of 4 rows here, so that small
    shapes are split) give the same convolution and derivatives as unsplit ones."""
    rng = np.random.default_rng(9)
    arrays = [rng.standard_normal((2, 3, 16, 5, 6)), rng.standard_normal((2, 16, 16, 3, 3)) / 12]
    assert conv.winograd_applies(arrays[0], 16, 16, (3, 3), (1, 1), (5, 6))
    if path == "im2col":
        monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 10**9)

    def run(block_bytes):
        monkeypatch.setattr(conv, "BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(conv, "MIN_BLOCK_ROWS", 1)
        x, w = (tm.tensor(a, requires_grad=True) for a in arrays)
        y = F.conv2d(x, w, padding=1)
        gx, gw = tm.grad((y * y).sum(), [x, w], create_graph=True)
        second = tm.grad((gx * gx).sum() + (gw * gw).sum(), [x, w])
        return [a.numpy() for a in (y, gx, gw, *second)]

    blocked = run(4 * 8 * 16)  # 4 rows of 16 float64 values
    assert conv.row_blocks(np.zeros((27, 16)), 16) == 9  # 3 images of 9 tiles: 3-row blocks
    for got, want in zip(blocked, run(None)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_row_blocks_fit_the_narrow_side_in_the_block_size():
    def blocks(rows, width, dtype=np.float32):
        return conv.row_blocks(np.zeros((rows, width), dtype), width)

    # 200 rows of 64 float32 values: W2's Winograd products (1225 rows per task: 7 blocks);
    # 245 rows would split into blocks of 49, too small: none.
    assert [blocks(r, 64) for r in (80, 200, 245, 400, 1225)] == [1, 1, 1, 2, 7]
    assert blocks(2000, 64) == 10 and blocks(2000, 64, np.float64) == 20  # 100 float64 rows
    assert blocks(19600, 9) == 14  # the first layer's 9-wide products: 1400-row blocks
    assert blocks(211, 64) == 1  # prime: blocks of one row would be slower, none instead
    assert conv.row_blocks(np.zeros((1225, 64)).tolist(), 64) == 1  # not NumPy: no blocking


def test_images_per_chunk_fit_the_tiles_in_the_block_size():
    # W2 (float32, 64 channels, 200-row chunks): 4 images of 49 tiles (14x14), 12 of 16 (7x7).
    assert conv.images_per_chunk(25, 49, 64, 4) == 4
    assert conv.images_per_chunk(25, 16, 64, 4) == 12
    assert conv.images_per_chunk(5, 16, 64, 4) == 5  # never more than there are
    assert conv.images_per_chunk(25, 400, 64, 4) == 1  # an image bigger than a chunk: one
    assert conv.images_per_chunk(25, 49, 64, 8) == 2  # float64: half the rows


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
def test_winograd_chunks_equal_one_pass_to_second_order(monkeypatch, dtype, tol):
    """The three Winograd ops transform and multiply their images chunk by chunk (2 of 5 per
    task here, the last chunk short): the convolution and its derivatives equal those of one
    pass over all images, and the transforms really ran per chunk."""
    rng = np.random.default_rng(10)
    arrays = [rng.standard_normal((2, 5, 16, 6, 5)), rng.standard_normal((2, 16, 16, 3, 3)) / 12]
    arrays = [a.astype(dtype) for a in arrays]
    assert conv.winograd_applies(arrays[0], 16, 16, (3, 3), (1, 1), (6, 5))
    monkeypatch.setattr(conv, "MIN_BLOCK_ROWS", 1)
    calls = []
    original = kernels.winograd_input

    def counted(x, *args):
        calls.append(len(x))
        return original(x, *args)

    monkeypatch.setattr(kernels, "winograd_input", counted)

    def run(block_bytes):
        monkeypatch.setattr(conv, "BLOCK_BYTES", block_bytes)
        calls.clear()
        x, w = (tm.tensor(a, requires_grad=True) for a in arrays)
        y = F.conv2d(x, w, padding=1)
        gx, gw = tm.grad((y * y).sum(), [x, w], create_graph=True)
        second = tm.grad((gx * gx).sum() + (gw * gw).sum(), [x, w])
        return [a.numpy() for a in (y, gx, gw, *second)], list(calls)

    itemsize = np.dtype(dtype).itemsize
    chunked, chunk_sizes = run(2 * 9 * 16 * itemsize)  # 2 images of 9 tiles, 16 channels
    whole, whole_sizes = run(None)
    # Every op, in every order, transforms chunks of 2, 2 and 1 images per task, or all 5.
    assert set(chunk_sizes) == {1, 2} and set(whole_sizes) == {5}
    for got, want in zip(chunked, whole):
        assert got.dtype == dtype
        # Other summation orders: float rounding relative to the result's scale.
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
