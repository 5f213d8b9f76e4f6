"""Making tensors (from data, filled, ranges, random) and reading them back."""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm


def test_dtypes_are_numpy_dtypes():
    assert tm.float32 == np.dtype(np.float32) and isinstance(tm.float32, np.dtype)
    assert tm.float64 == np.dtype(np.float64)
    assert tm.int64 == np.dtype(np.int64)
    assert tm.bool_ == np.dtype(np.bool_)


# --- tm.tensor and tm.from_numpy ------------------------------------------------------------


def test_tensor_copies_its_data():
    a = np.array([1.0, 2.0])
    t = tm.tensor(a)
    a[0] = 100.0
    assert t.numpy()[0] == 1.0
    assert not np.shares_memory(t.data, a)


def test_tensor_of_a_tensor_is_a_copy():
    t = tm.tensor([1.0, 2.0], requires_grad=True)
    u = tm.tensor(t)
    assert not np.shares_memory(u.data, t.data) and not u.requires_grad and u.is_leaf


def test_tensor_metadata():
    t = tm.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6
    assert t.dtype == tm.float32 and t.device == "cpu"
    assert not t.requires_grad and t.is_leaf and t.grad is None and t.grad_fn is None
    assert isinstance(t.data, np.ndarray)


@pytest.mark.parametrize("dtype", [tm.float32, tm.float64, tm.int64, np.float16])
def test_tensor_dtype_argument(dtype):
    t = tm.tensor([1, 2], dtype=dtype)
    assert t.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(t.numpy(), [1, 2])


def test_tensor_requires_grad():
    t = tm.tensor([1.0], requires_grad=True)
    assert t.requires_grad and t.is_leaf


def test_tensor_from_scalars_and_nested_lists():
    assert tm.tensor(2.5).shape == () and tm.tensor(2.5).dtype == tm.float32
    assert tm.tensor(7).dtype == tm.int64
    assert tm.tensor([[1, 2.5]]).dtype == tm.float32  # a float anywhere: float32
    assert tm.tensor([]).shape == (0,)


def test_from_numpy_shares_memory_both_ways():
    a = np.array([1.0, 2.0, 3.0])
    t = tm.from_numpy(a)
    assert t.dtype == tm.float64 and np.shares_memory(t.data, a)
    a[0] = 10.0
    assert t.numpy()[0] == 10.0
    with tm.no_grad():
        t.mul_(2.0)
    np.testing.assert_array_equal(a, [20.0, 4.0, 6.0])
    assert not t.requires_grad


def test_from_numpy_keeps_strides():
    a = np.arange(12.0).reshape(3, 4)[:, ::2]
    t = tm.from_numpy(a)
    assert t.data.strides == a.strides and np.shares_memory(t.data, a)


# --- filled tensors ---------------------------------------------------------------------------


@pytest.mark.parametrize("make, value", [(tm.zeros, 0.0), (tm.ones, 1.0)])
def test_zeros_ones(make, value):
    for t in (make(2, 3), make((2, 3)), make([2, 3])):
        assert t.shape == (2, 3) and t.dtype == tm.float32 and t.device == "cpu"
        assert np.all(t.numpy() == value)
    assert make().shape == ()
    t = make(4, dtype=tm.float64, requires_grad=True)
    assert t.dtype == tm.float64 and t.requires_grad and t.is_leaf
    assert make(2, dtype=tm.int64).dtype == tm.int64
    assert make(2, device="cpu").device == "cpu"


def test_full():
    t = tm.full((2, 2), 3.5)
    assert t.shape == (2, 2) and t.dtype == tm.float32
    np.testing.assert_array_equal(t.numpy(), 3.5)
    assert tm.full(3, 7).dtype == tm.int64 and tm.full(3, 7).shape == (3,)
    assert tm.full(3, 7, dtype=tm.float64).dtype == tm.float64
    assert tm.full((1,), 0.5, requires_grad=True).requires_grad


@pytest.mark.parametrize("make, value", [(tm.zeros_like, 0), (tm.ones_like, 1)])
def test_like(make, value):
    src = tm.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)  # float64
    t = make(src)
    assert t.shape == (2, 3) and t.dtype == tm.float64 and t.device == "cpu"
    assert not t.requires_grad and np.all(t.numpy() == value)
    assert make(src, dtype=tm.float32).dtype == tm.float32
    assert make(src, requires_grad=True).requires_grad
    assert make(tm.arange(3)).dtype == tm.int64


def test_arange():
    t = tm.arange(5)
    assert t.dtype == tm.int64
    np.testing.assert_array_equal(t.numpy(), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(tm.arange(2, 8, 3).numpy(), [2, 5])
    f = tm.arange(0, 1, 0.25)
    assert f.dtype == tm.float32
    np.testing.assert_array_equal(f.numpy(), [0.0, 0.25, 0.5, 0.75])
    assert tm.arange(3, dtype=tm.float64).dtype == tm.float64
    assert tm.arange(3.0, requires_grad=True).requires_grad


def test_eye():
    t = tm.eye(3)
    assert t.dtype == tm.float32
    np.testing.assert_array_equal(t.numpy(), np.eye(3))
    r = tm.eye(2, 4, dtype=tm.float64)
    assert r.shape == (2, 4) and r.dtype == tm.float64
    np.testing.assert_array_equal(r.numpy(), np.eye(2, 4))


# --- random tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tm.randn, tm.rand])
def test_random_shapes_and_dtypes(make):
    for t in (make(2, 3), make((2, 3))):
        assert t.shape == (2, 3) and t.dtype == tm.float32 and t.device == "cpu"
    assert make(4, dtype=tm.float64).dtype == tm.float64
    t = make(3, requires_grad=True)
    assert t.requires_grad and t.is_leaf


@pytest.mark.parametrize("make", [tm.randn, tm.rand])
def test_rng_generator_is_reproducible(make):
    a = make(5, rng=np.random.default_rng(42))
    b = make(5, rng=np.random.default_rng(42))
    c = make(5, rng=np.random.default_rng(43))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_rng_generator_is_the_stream_that_is_used():
    rng = np.random.default_rng(7)
    expected = np.random.default_rng(7).standard_normal((2, 2))
    np.testing.assert_allclose(tm.randn(2, 2, rng=rng, dtype=tm.float64).numpy(), expected)


@pytest.mark.parametrize("make", [tm.randn, tm.rand])
def test_manual_seed(make):
    tm.manual_seed(123)
    a = make(6)
    b = make(6)
    tm.manual_seed(123)
    a2 = make(6, rng=np.random.default_rng(0))  # an explicit rng does not draw from the seed
    a3 = make(6)
    b3 = make(6)
    np.testing.assert_array_equal(a.numpy(), a3.numpy())
    np.testing.assert_array_equal(b.numpy(), b3.numpy())
    assert not np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), a2.numpy())


def test_rand_is_in_unit_interval_and_randn_is_normal():
    r = tm.rand(10_000, rng=np.random.default_rng(0)).numpy()
    assert r.min() >= 0.0 and r.max() < 1.0
    n = tm.randn(10_000, rng=np.random.default_rng(0), dtype=tm.float64).numpy()
    assert abs(n.mean()) < 0.05 and abs(n.std() - 1.0) < 0.05


# --- reading values back --------------------------------------------------------------------------


def test_item_float_int_len():
    t = tm.tensor([[2.5]])
    assert t.item() == 2.5 and isinstance(t.item(), float)
    assert float(tm.tensor(1.5)) == 1.5
    assert int(tm.tensor(3)) == 3 and isinstance(tm.tensor(3).item(), int)
    assert len(tm.zeros(4, 2)) == 4


def test_numpy():
    t = tm.tensor([1.0, 2.0])
    a = t.numpy()
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    np.testing.assert_array_equal(a, [1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(t), [1.0, 2.0])
    assert np.asarray(t, dtype=np.float64).dtype == np.float64


def test_iteration_gives_rows():
    rows = list(tm.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert len(rows) == 2 and all(isinstance(r, tm.Tensor) for r in rows)
    np.testing.assert_array_equal(rows[1].numpy(), [3.0, 4.0])


def test_to_cpu_is_a_no_op():
    t = tm.tensor([1.0])
    assert t.to("cpu") is t


def test_repr():
    assert repr(tm.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    assert repr(tm.tensor([1.0, 2.0], dtype=tm.float64)) == "tensor([1., 2.], dtype=float64)"
    assert repr(tm.tensor([1, 2])) == "tensor([1, 2], dtype=int64)"
    assert repr(tm.tensor([1.0], requires_grad=True)) == "tensor([1.], requires_grad=True)"
    x = tm.tensor([1.0], requires_grad=True)
    assert repr(x * 2) == "tensor([2.], grad_fn=Scale)"  # times a number: the Scale op
    assert repr(tm.tensor(0.5)) == "tensor(0.5)"
    assert repr(tm.ones(2, 2)) == "tensor([[1., 1.],\n        [1., 1.]])"
