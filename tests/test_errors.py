"""Bad inputs raise errors whose message says what went wrong (the op, the shapes), and an
error leaves the tensors involved as they were."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tinymeta as tm


def f64(values, requires_grad=True) -> tm.Tensor:
    return tm.tensor(values, dtype=tm.float64, requires_grad=requires_grad)


def snapshot(*tensors) -> list:
    return [
        (t.numpy().copy(), t.requires_grad, t.grad_fn, t.grad, t._version, t.shape, t.dtype)
        for t in tensors
    ]


def assert_unchanged(before: list, *tensors) -> None:
    for (data, rg, fn, g, version, shape, dtype), t in zip(before, tensors):
        np.testing.assert_array_equal(t.numpy(), data)
        assert t.requires_grad == rg and t.grad_fn is fn and t.grad is g
        assert t._version == version and t.shape == shape and t.dtype == dtype


def shapes_pattern(*parts: str) -> str:
    """A regex matching all of ``parts`` in order, anything between them."""
    return ".*".join(re.escape(p) for p in parts)


# --- shapes --------------------------------------------------------------------------------------


def test_add_shape_mismatch_names_op_and_both_shapes():
    a, b = f64(np.ones((2, 3))), f64(np.ones(4))
    before = snapshot(a, b)
    with pytest.raises(ValueError, match=shapes_pattern("Add", "(2, 3)", "(4,)")):
        a + b
    assert_unchanged(before, a, b)


@pytest.mark.parametrize(
    "sa, sb",
    [((2, 3), (4, 5)), ((3,), (4,)), ((2, 3), (4,)), ((4,), (3, 2))],
)
def test_matmul_shape_mismatch_names_op_and_both_shapes(sa, sb):
    a, b = f64(np.ones(sa)), f64(np.ones(sb))
    before = snapshot(a, b)
    with pytest.raises(ValueError, match=shapes_pattern("matmul", str(sa), str(sb))):
        tm.matmul(a, b)
    with pytest.raises(ValueError, match=shapes_pattern("matmul", str(sa), str(sb))):
        a @ b
    assert_unchanged(before, a, b)


def test_matmul_batch_mismatch_names_op_and_shapes():
    a, b = f64(np.ones((2, 2, 3))), f64(np.ones((3, 3, 4)))
    with pytest.raises(ValueError, match=shapes_pattern("MatMul", "(2, 2, 3)", "(3, 3, 4)")):
        a @ b


def test_matmul_of_a_0d_operand():
    with pytest.raises(ValueError, match=r"matmul: operands must be at least 1-D.*\(\)"):
        tm.matmul(f64(2.0), f64([1.0]))


def test_concatenate_mismatched_shapes():
    a, b = f64(np.ones((2, 3))), f64(np.ones((2, 4)))
    before = snapshot(a, b)
    with pytest.raises(ValueError, match=shapes_pattern("Concatenate", "(2, 3)", "(2, 4)")):
        tm.concatenate([a, b], axis=0)
    with pytest.raises(ValueError, match=shapes_pattern("Concatenate", "(2, 3)", "(3,)")):
        tm.concatenate([a, f64([1.0, 2.0, 3.0])], axis=1)
    assert_unchanged(before, a, b)


def test_concatenate_of_nothing():
    with pytest.raises(ValueError, match="concatenate: need at least one tensor"):
        tm.concatenate([])


def test_stack_mismatched_shapes():
    a, b = f64(np.ones((2, 3))), f64(np.ones((2, 4)))
    before = snapshot(a, b)
    with pytest.raises(ValueError, match=shapes_pattern("stack", "(2, 3)", "(2, 4)")):
        tm.stack([a, b])
    assert_unchanged(before, a, b)


def test_reshape_to_an_impossible_shape():
    x = f64(np.ones((2, 3)))
    before = snapshot(x)
    with pytest.raises(ValueError, match=shapes_pattern("Reshape", "size 6", "(4,)", "(2, 3)")):
        x.reshape(4)
    assert_unchanged(before, x)


def test_broadcast_to_an_incompatible_shape():
    with pytest.raises(ValueError, match=r"BroadcastTo: .*\(2, ?4\).*inputs: \(3,\)"):
        f64([1.0, 2.0, 3.0]).broadcast_to((2, 4))


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda x: x.sum(axis=2), "Sum: axis 2 is out of range"),
        (lambda x: x.max(axis=-3), "Max: axis -3 is out of range"),
        (lambda x: x.squeeze(1), r"squeeze: axis 1 of shape \(2, 3\) has size 3, not 1"),
        (lambda x: x.squeeze(5), "squeeze: axis 5 is out of range"),
        (lambda x: x.expand_dims(4), "expand_dims: axis 4 is out of range"),
        (lambda x: x.swapaxes(0, 2), "swapaxes: axis 2 is out of range"),
        (lambda x: x.transpose(0), "Transpose: axes don't match"),
        (lambda x: x[5], "GetItem: index 5 is out of bounds"),
        (lambda x: tm.clip(x), "clip: give at least one of lo and hi"),
    ],
)
def test_bad_axes_and_indices(call, pattern):
    x = f64(np.ones((2, 3)))
    before = snapshot(x)
    with pytest.raises((ValueError, IndexError), match=pattern):
        call(x)
    assert_unchanged(before, x)


def test_numpy_type_errors_keep_their_message():
    # NumPy's ufunc errors cannot be rebuilt from a message; the op name is added all the same.
    with pytest.raises(TypeError, match=r"Add: .*add.*\(inputs: \(1,\) float32, \(1,\) <U1\)"):
        tm.tensor([1.0]) + np.array(["a"])


def test_einsum_errors():
    with pytest.raises(ValueError, match=r"einsum: 'ij,jk->ik' names 2 operands, got 1"):
        tm.einsum("ij,jk->ik", f64(np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"einsum: term 'ijk' .* 2 dims"):
        tm.einsum("ijk->i", f64(np.ones((2, 3))))


# --- autograd misuse ------------------------------------------------------------------------------


def test_backward_of_a_non_scalar_needs_a_gradient():
    x = f64([1.0, 2.0])
    y = x * 2
    with pytest.raises(RuntimeError, match=r"outputs\[0\] has shape \(2,\).*only for a scalar"):
        y.backward()
    with pytest.raises(RuntimeError, match="only for a scalar"):
        tm.grad(y, x)
    assert x.grad is None
    y.backward(tm.tensor([1.0, 1.0], dtype=tm.float64))  # the graph is intact
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0])


def test_gradient_argument_of_the_wrong_shape():
    x = f64([1.0, 2.0])
    y = x * 2
    with pytest.raises(ValueError, match=r"gradient for outputs\[0\] has shape \(3,\), expected"):
        y.backward(tm.ones(3, dtype=tm.float64))
    with pytest.raises(ValueError, match=r"has shape \(2, 1\), expected \(2,\)"):
        tm.grad(y, x, grad_outputs=np.ones((2, 1)))
    assert x.grad is None
    (g,) = tm.grad(y, x, grad_outputs=np.ones(2))  # nothing was consumed
    np.testing.assert_array_equal(g.numpy(), [2.0, 2.0])


def test_number_of_grad_outputs_must_match():
    x = f64([1.0])
    with pytest.raises(ValueError, match="got 2 outputs but 1 output gradients"):
        tm.grad([x * 2, x * 3], x, grad_outputs=[np.ones(1)])


def test_integer_tensor_cannot_require_grad():
    pattern = r"only floating-point tensors can require gradients, got dtype int64"
    with pytest.raises(TypeError, match=pattern):
        tm.tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match=pattern):
        tm.zeros(2, dtype=tm.int64, requires_grad=True)
    t = tm.arange(3)
    with pytest.raises(TypeError, match=pattern):
        t.requires_grad_()
    assert not t.requires_grad


def test_grad_wrt_an_unused_input_without_allow_unused():
    x, unused = f64([1.0]), f64([2.0, 3.0])
    y = (x * 2).sum()
    with pytest.raises(RuntimeError, match=r"inputs\[1\] \(shape \(2,\)\).*allow_unused=True"):
        tm.grad(y, [x, unused])
    assert unused.grad is None and x.grad is None


def test_grad_of_an_output_that_does_not_require_grad():
    x = tm.tensor([1.0, 2.0])
    y = (x * 2).sum()
    with pytest.raises(RuntimeError, match=r"outputs\[0\] .*does not require grad"):
        y.backward()
    with pytest.raises(RuntimeError, match="does not require grad"):
        tm.grad(y, f64([1.0]))
    assert x.grad is None


def test_grad_wrt_an_input_that_does_not_require_grad():
    x, c = f64([1.0]), tm.tensor([2.0], dtype=tm.float64)
    with pytest.raises(RuntimeError, match=r"inputs\[1\] \(shape \(1,\)\) does not require grad"):
        tm.grad((x * c).sum(), [x, c])


def test_grad_wrt_a_non_tensor():
    x = f64([1.0])
    with pytest.raises(TypeError, match=r"inputs\[0\] is a ndarray, expected a Tensor"):
        tm.grad((x * 2).sum(), np.ones(1))


def test_hook_returning_the_wrong_shape():
    x = f64([1.0, 2.0])
    x.register_hook(lambda g: tm.ones(3, dtype=tm.float64))
    y = (x * x).sum()
    with pytest.raises(RuntimeError, match=r"hook .*shape \(2,\) returned .*shape \(3,\)"):
        y.backward()
    assert x.grad is None
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0])


def test_hook_on_non_leaf_returning_the_wrong_shape():
    x = f64([1.0, 2.0])
    h = x * 2
    h.register_hook(lambda g: g.sum())
    with pytest.raises(RuntimeError, match=r"returned a gradient of shape \(\); expected \(2,\)"):
        (h * h).sum().backward()
    assert x.grad is None


def test_backward_through_a_freed_graph():
    x = f64([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward()
    g = x.grad.numpy().copy()
    with pytest.raises(RuntimeError, match=r"second time.*retain_graph=True"):
        y.backward()
    with pytest.raises(RuntimeError, match=r"second time.*retain_graph=True"):
        tm.grad(y, x)
    np.testing.assert_array_equal(x.grad.numpy(), g)  # the first gradient is untouched


def test_inplace_modification_of_a_saved_tensor():
    w, x = f64([1.0, 2.0]), f64([3.0, 4.0])
    y = (w.tanh() * x).sum()
    with tm.no_grad():
        x.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"Mul: input 1 \(shape \(2,\).*modified in place"):
        y.backward()
    assert w.grad is None and x.grad is None
    np.testing.assert_array_equal(x.numpy(), [6.0, 8.0])


def test_inplace_on_a_leaf_requiring_grad():
    w = f64([1.0, 2.0])
    before = snapshot(w)
    with pytest.raises(RuntimeError, match=r"add_: in-place change .*tm.no_grad"):
        w.add_(1.0)
    with pytest.raises(RuntimeError, match=r"__setitem__: in-place change"):
        w[0] = 3.0
    assert_unchanged(before, w)


def test_copy_of_a_mismatched_shape():
    t = tm.zeros(2)
    with pytest.raises(ValueError, match=r"copy_: cannot copy shape \(3,\) into \(2,\)"):
        t.copy_(np.ones(3))
    np.testing.assert_array_equal(t.numpy(), [0.0, 0.0])
    assert t._version == 0


def test_requires_grad_false_on_a_non_leaf():
    h = f64([1.0]) * 2
    with pytest.raises(RuntimeError, match=r"non-leaf tensor: use .detach\(\)"):
        h.requires_grad_(False)


# --- conversions ----------------------------------------------------------------------------------


def test_item_of_a_tensor_with_several_elements():
    with pytest.raises(ValueError, match=r"item\(\): only a tensor with one element, got shape"):
        tm.ones(2).item()
    with pytest.raises(ValueError, match="only a tensor with one element"):
        float(tm.ones(2, 2))


def test_truth_value_of_a_tensor_is_ambiguous():
    with pytest.raises(ValueError, match=r"truth value of a tensor of shape \(2,\) is ambiguous"):
        bool(tm.ones(2))


def test_len_and_iteration_of_a_0d_tensor():
    with pytest.raises(TypeError, match="len\\(\\) of a 0-d tensor"):
        len(tm.tensor(1.0))
    with pytest.raises(TypeError, match="iteration over a 0-d tensor"):
        list(tm.tensor(1.0))


@pytest.mark.parametrize("data", [[1, "a"], ["x"], [{}]])
def test_tensor_from_non_numeric_data(data):
    with pytest.raises(TypeError, match="non-numeric"):
        tm.tensor(data)


def test_from_numpy_needs_an_ndarray():
    with pytest.raises(TypeError, match="from_numpy: expected a numpy.ndarray, got list"):
        tm.from_numpy([1.0, 2.0])


def test_unknown_device():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        tm.zeros(2, device="tpu")


@pytest.mark.skipif(tm.cuda.is_available(), reason="a GPU is available")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(
        RuntimeError,
        match=r"device 'cuda' was requested but CuPy or a CUDA GPU is not available: "
        r"CuPy (is not importable|\S+ finds no)",
    ):
        tm.zeros(2, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not tm.cuda.is_available(), reason="needs CuPy and a CUDA GPU")
def test_mixing_devices_in_one_op():
    a = f64([1.0, 2.0])
    b = tm.tensor([1.0, 2.0], dtype=tm.float64, device="cuda", requires_grad=True)
    before = snapshot(a, b)
    with pytest.raises(RuntimeError, match=r"Add: inputs are on different devices: cpu .* cuda"):
        a + b
    with pytest.raises(RuntimeError, match="different devices"):
        b * a
    assert_unchanged(before, a, b)
    y = (a.to("cuda") * b).sum()  # an explicit move is fine, and differentiable
    y.backward()
    assert a.grad.device == "cpu" and b.grad.device == "cuda"


def test_backward_into_a_grad_of_another_shape_is_refused_and_changes_nothing():
    """A .grad assigned by hand with another shape: the sum used to broadcast silently (PyTorch
    refuses the assignment itself). No .grad changes, that leaf's nor another's."""
    a = tm.tensor(np.ones(3), requires_grad=True)
    b = tm.tensor(np.ones(3), requires_grad=True)
    (a * b).sum().backward()
    a.grad = tm.tensor(np.ones((2, 3)))
    held_b = b.grad.numpy().copy()
    for create_graph in (False, True):
        with pytest.raises(RuntimeError, match=r"backward: a leaf of shape \(3,\) has a \.grad "
                           r"of shape \(2, 3\)"):  # fmt: skip
            (a * b).sum().backward(create_graph=create_graph)
        np.testing.assert_array_equal(b.grad.numpy(), held_b)
        np.testing.assert_array_equal(a.grad.numpy(), np.ones((2, 3)))
