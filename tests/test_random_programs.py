"""Random programs (tests/random_programs.py) against finite differences, PyTorch, the engine's
own slow path, and eager execution (for tm.capture).

Each program reuses values (gradients accumulate), takes views, broadcasts into reductions and
runs through the speed paths that engage when nothing records (function.arrays_only_on_host).
The default run draws few programs; ``-m slow`` draws thousands.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import random_programs as rp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymeta as tm
from tinymeta.testing import check_grads, gradcheck

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs PyTorch (the comparison library)")
# Drawing a program evaluates its steps; a step outside its op's domain is skipped, not the program.
FEW = settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])


# --- finite differences (no PyTorch) ---------------------------------------------------------


@FEW
@given(rp.programs())
def test_first_and_second_derivatives_match_finite_differences(program):
    def fn(*xs):
        return rp.run(program, xs)

    gradcheck(fn, rp.leaves(program), full=True)
    check_grads(fn, rp.leaves(program), order=2)


# --- PyTorch, to third order -----------------------------------------------------------------


def _compare_with_pytorch(program, seed: int) -> None:
    directions = rp.random_directions(program, seed)
    ours = rp.derivatives(program, "tm", directions)
    try:
        theirs = rp.derivatives(program, "torch", directions)
    except RuntimeError as e:
        if rp.TORCH_ZERO_TENSOR_BUG not in str(e):
            raise
        # PyTorch's bug at third order: compare to second order, check the third against
        # finite differences of tinymeta's own second derivatives
        theirs = rp.derivatives(program, "torch", directions[:-1])
        ours = ours[:-1]
        check_grads(lambda *xs: rp.run(program, xs), rp.leaves(program), order=3)
    rp.assert_derivatives_match(ours, theirs)


@needs_torch
@FEW
@given(rp.programs(), st.integers(0, 2**16))
def test_value_and_derivatives_to_third_order_match_pytorch(program, seed):
    _compare_with_pytorch(program, seed)


@pytest.mark.slow
@needs_torch
@MANY
@given(rp.programs(), st.integers(0, 2**16))
def test_many_programs_match_pytorch_to_third_order(program, seed):
    _compare_with_pytorch(program, seed)


@needs_torch
def test_a_program_pytorch_cannot_differentiate_three_times_is_compared_to_second_order():
    # out = |mse_loss(x, x + x)|: PyTorch 2.13's third derivative raises its ZeroTensor error;
    # tinymeta's (0: the loss is mean(x**2)) is checked against finite differences instead.
    x = np.array([[0.03, 0.55, -0.74, -0.16]])
    steps = [rp.Step("add", (0, 0)), rp.Step("mse_loss", (0, 1), ("mean",)), rp.Step("abs", (2,))]
    program = rp.Program(inputs=[x], steps=steps, ends=(3,), weights=[np.array(0.17)])
    with pytest.raises(RuntimeError, match=rp.TORCH_ZERO_TENSOR_BUG):
        rp.derivatives(program, "torch", rp.random_directions(program, 0))
    _compare_with_pytorch(program, 0)
    third = rp.derivatives(program, "tm", rp.random_directions(program, 0))[3]
    assert not np.any(third[0])


def _vector_jacobian_products(program, lib: str, grad_outputs) -> list:
    """tm.grad / torch.autograd.grad of the program's ends at once (non-scalar outputs that
    share their graph), with the given grad_outputs."""
    if lib == "tm":
        xs = rp.leaves(program)
        values = rp.run_values(program, xs)
        outs = [values[i] for i in program.ends]
        gs = tm.grad(outs, xs, grad_outputs=[tm.tensor(g) for g in grad_outputs], allow_unused=True)
    else:
        torch = rp.import_torch()
        xs = [torch.tensor(x, requires_grad=True) for x in program.inputs]
        values = rp.run_values(program, xs, lib)
        outs = [values[i] for i in program.ends]
        gos = [torch.tensor(g) for g in grad_outputs]
        gs = torch.autograd.grad(outs, xs, grad_outputs=gos, allow_unused=True)
    return [np.zeros(x.shape) if g is None else rp.to_numpy(g) for x, g in zip(program.inputs, gs)]


@needs_torch
@FEW
@given(rp.programs())
def test_gradients_of_several_non_scalar_outputs_match_pytorch(program):
    grad_outputs = program.weights  # one random array per output, of its shape
    ours = _vector_jacobian_products(program, "tm", grad_outputs)
    theirs = _vector_jacobian_products(program, "torch", grad_outputs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        scale = 1.0 + np.max(np.abs(b), initial=0.0)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11 * scale, err_msg=f"input {i}")


def _gradients_wrt_every_value(program, lib: str) -> list:
    """d scalar / d v for every value v of the program (inputs and intermediates) at once:
    the backward stops at intermediates and must still add up every path through them.
    SAME_TENSOR for a value that is an earlier value's tensor itself: PyTorch's flatten of a
    1-D tensor returns its input, whose gradient counts every use of it (tinymeta's flatten
    makes a view, whose gradient counts the uses of the view)."""
    if lib == "tm":
        values = rp.run_values(program, rp.leaves(program))
        gs = tm.grad(rp.scalar_of(program, values), values, allow_unused=True)
    else:
        torch = rp.import_torch()
        values = rp.run_values(
            program, [torch.tensor(x, requires_grad=True) for x in program.inputs], lib
        )
        gs = torch.autograd.grad(rp.scalar_of(program, values, lib), values, allow_unused=True)
    grads = [None if g is None else rp.to_numpy(g) for g in gs]
    for i, v in enumerate(values):
        if any(v is earlier for earlier in values[:i]):
            grads[i] = SAME_TENSOR
    return grads


SAME_TENSOR = "the tensor of an earlier value"


@needs_torch
@FEW
@given(rp.programs())
def test_gradients_with_respect_to_intermediate_values_match_pytorch(program):
    ours = _gradients_wrt_every_value(program, "tm")
    theirs = _gradients_wrt_every_value(program, "torch")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if b is SAME_TENSOR:  # not comparable: see _gradients_wrt_every_value
            continue
        if a is None or b is None:  # unused: one library may say None where the other says 0
            assert not np.any(a if b is None else b), f"value {i}"
            continue
        scale = 1.0 + np.max(np.abs(b), initial=0.0)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11 * scale, err_msg=f"value {i}")


# --- the engine's speed paths against its op nodes -------------------------------------------


@FEW
@given(rp.programs())
def test_speed_paths_give_bit_identical_gradients(program):
    rp.assert_same_grads(rp.backward_grads(program, False), rp.backward_grads(program, True))


@FEW
@given(rp.programs())
def test_backward_through_a_retained_graph_accumulates_exactly_then_the_freed_one_refuses(program):
    xs = rp.leaves(program)
    out = rp.run(program, xs)
    out.backward(retain_graph=True)
    once = [None if x.grad is None else x.grad.numpy().copy() for x in xs]
    out.backward()
    for x, g in zip(xs, once):
        if g is not None:
            assert np.array_equal(x.grad.numpy(), 2 * g)
    # A third backward, through the graph that the second freed: a clear error where a node
    # needs what was freed; otherwise (no node saved anything) exactly 3x, as in PyTorch.
    try:
        out.backward()
    except RuntimeError as e:
        assert "backward" in str(e) and "retain_graph" in str(e), str(e)
    else:
        for x, g in zip(xs, once):
            if g is not None:
                assert np.array_equal(x.grad.numpy(), 3 * g)


# --- tm.capture against eager ----------------------------------------------------------------


@FEW
@given(rp.programs(), st.sampled_from(["sgd", "adam"]), st.booleans())
def test_captured_training_steps_are_bit_identical_to_eager(program, optimizer, second_order):
    rng = np.random.default_rng(0)
    # Batches big enough to move values across relu/abs/max kinks between calls: the replay
    # must recompute masks and arg-maxes, not reuse the captured ones.
    batches = [[0.3 * rng.standard_normal(x.shape) for x in program.inputs] for _ in range(3)]
    # (The batches and the updates may take values out of the program's domain: inf and nan
    # compare equal here; bit-identity is the point, not the values.)
    with np.errstate(all="ignore"):
        eager, _ = rp.train(program, optimizer, second_order, batches, captured=False)
        replayed, run = rp.train(program, optimizer, second_order, batches, captured=True)
    assert run.captures == 1  # calls 2 and 3 were replays
    rp.assert_same_history(eager, replayed)
