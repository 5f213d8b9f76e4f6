"""Random programs with in-place steps (tests/random_programs.py, ``inplace_programs``) against
PyTorch, finite differences and eager execution (for tm.capture).

The property: tinymeta EITHER gives PyTorch's value and derivatives (to third order, rtol 1e-9)
OR raises a RuntimeError that names the op and says why (a change of memory that a view
shares, of a tensor a graph saved or used, repeated indices); never a different number. Where
PyTorch refuses and tinymeta does not, tinymeta's derivatives are checked against finite
differences instead. Refusals must not swallow the tests: each one asserts that most of its
programs were compared, not refused.
"""

from __future__ import annotations

import collections
import importlib.util
import re

import numpy as np
import pytest
import random_programs as rp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinymeta.testing import check_grads, gradcheck

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs PyTorch (the comparison library)")
# Fast programs (under 50 ms each): 80 of them, so that the share refused is measured well.
FEW = settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# The tinymeta method each in-place step calls: a refusal at that step must name it.
CALLS = {
    "add_": "add_", "add_alpha": "add_", "iadd": "add_", "add_number": "add_",
    "iadd_number": "add_", "sub_": "sub_", "isub": "sub_", "mul_": "mul_", "imul": "mul_",
    "mul_number": "mul_", "imul_number": "mul_", "div_": "div_", "idiv": "div_",
    "div_number": "div_", "pow_": "pow_", "copy_": "copy_", "zero_": "zero_", "fill_": "fill_",
    "fill_tensor": "fill_", "setitem": "__setitem__", "setitem_number": "__setitem__",
    "setitem_array": "__setitem__", "setitem_repeated": "__setitem__",
}  # fmt: skip
# Why an in-place change is refused: at the step, or at backward (a node named first).
STEP_REASONS = ("shares memory with a view", "more than once")
BACKWARD_REASONS = ("saved for backward was modified in place", "was changed in place")


def _refusing_step(program):
    """The step at which tinymeta refuses the program's forward, or None (it runs)."""
    values = list(rp.leaves(program))
    for step in program.steps:
        try:
            rp.apply_step(step, values)
        except RuntimeError:
            return step
    return None


def assert_clear_refusal(error: RuntimeError, program) -> None:
    """The refusal names the op (the in-place method at the step, or the node whose gradient
    it would falsify at backward) and says why."""
    message = str(error)
    step = _refusing_step(program)
    if step is not None:
        assert message.startswith(f"{CALLS[step.op]}: "), (message, step)
        assert any(reason in message for reason in STEP_REASONS), message
    else:
        assert re.match(r"[A-Z]\w*: (input|output) \d+ ", message), message
        assert any(reason in message for reason in BACKWARD_REASONS), message


def _has_inplace_step(program) -> bool:
    return any(step.op in rp.ALL_INPLACE_OPS for step in program.steps)


def _assert_mostly_compared(outcomes: collections.Counter) -> None:
    """At most half of the programs with an in-place step were refused (programs whose draw
    found no target, all pure, count for nothing)."""
    with_inplace = sum(n for outcome, n in outcomes.items() if outcome != "pure")
    assert with_inplace >= 10 and outcomes["refused"] <= with_inplace / 2, outcomes


# --- PyTorch, to third order -------------------------------------------------------------------


def _torch_refusal(error: RuntimeError) -> bool:
    """PyTorch's own refusals (a saved tensor changed, memory that overlaps, a leaf's view) and
    its symbolic-zero bug (random_programs.TORCH_ZERO_TENSOR_BUG)."""
    message = str(error)
    return any(
        phrase in message
        for phrase in (
            "modified by an inplace operation",
            "single memory location",
            "leaf",
            rp.TORCH_ZERO_TENSOR_BUG,
        )
    )


def _check_finite_differences(program) -> None:
    def fn(*xs):
        return rp.run(program, xs)

    gradcheck(fn, rp.leaves(program), full=True)
    check_grads(fn, rp.leaves(program), order=2)


def compare_with_pytorch_or_refusal(program, seed: int) -> str:
    """'compared', 'refused' (a clear refusal by tinymeta), or 'pytorch refused' (then
    tinymeta's derivatives were checked against finite differences)."""
    directions = rp.random_directions(program, seed)
    try:
        ours = rp.derivatives(program, "tm", directions)
    except RuntimeError as e:
        assert_clear_refusal(e, program)
        return "refused"
    try:
        theirs = rp.derivatives(program, "torch", directions)
    except RuntimeError as e:
        # PyTorch refuses x.mul_(x) at backward (it saved x and changed it), a change of a
        # value that its op saved and tinymeta's did not (relu's output: y = x.relu(); y *= v),
        # and a write of memory into itself (y[:, [0]] = y), all of which tinymeta differentiates.
        assert _torch_refusal(e), str(e)
        _check_finite_differences(program)
        return "pytorch refused"
    rp.assert_derivatives_match(ours, theirs)
    return "compared"


def _property_over(strategy, examples: settings):
    outcomes = collections.Counter()

    @examples
    @given(strategy, st.integers(0, 2**16))
    def check(program, seed):
        outcome = compare_with_pytorch_or_refusal(program, seed)
        outcomes[outcome if _has_inplace_step(program) else "pure"] += 1

    check()
    _assert_mostly_compared(outcomes)


@needs_torch
def test_inplace_programs_match_pytorch_to_third_order_or_are_refused_clearly():
    _property_over(rp.inplace_programs(), FEW)


@pytest.mark.slow
@needs_torch
def test_many_inplace_programs_match_pytorch_to_third_order_or_are_refused_clearly():
    _property_over(rp.inplace_programs(), MANY)


@needs_torch
def test_inplace_programs_of_fresh_targets_are_compared_with_pytorch():
    """Targets that own their memory and that nothing read since their last change: only a
    creator that saved its output (exp, tanh, ...) may refuse, as PyTorch does."""
    _property_over(rp.inplace_programs(fresh_only=True), FEW)


# --- finite differences (no PyTorch) -----------------------------------------------------------


def test_inplace_programs_match_finite_differences_or_are_refused_clearly():
    outcomes = collections.Counter()

    @FEW
    @given(rp.inplace_programs())
    def check(program):
        try:
            _check_finite_differences(program)
        except RuntimeError as e:
            assert_clear_refusal(e, program)
            outcomes["refused"] += 1
        else:
            outcomes["checked" if _has_inplace_step(program) else "pure"] += 1

    check()
    _assert_mostly_compared(outcomes)


@FEW
@given(rp.inplace_programs(inplace_ops=["setitem_repeated"], fresh_only=True))
def test_assignment_with_repeated_integer_indices_is_refused_naming_the_op(program):
    """Which value lands at a repeated index is undefined (in NumPy and in PyTorch), and so
    would be its gradient: tinymeta refuses at the assignment, naming it."""
    repeated = [s for s in program.steps if s.op == "setitem_repeated"]
    if not repeated:  # no computed value to assign into was drawn
        rp.run(program, rp.leaves(program))  # pure steps: it runs
        return
    with pytest.raises(RuntimeError, match=r"^__setitem__: .*more than once") as error:
        rp.run(program, rp.leaves(program))
    assert _refusing_step(program) == repeated[0]
    assert "more than once" in str(error.value)


# --- tm.capture against eager ------------------------------------------------------------------


def test_captured_training_steps_with_inplace_changes_are_bit_identical_to_eager():
    """Three SGD or Adam steps on the program's loss (or a MAML-like meta-loss), captured
    and replayed, against the same steps run eagerly."""
    outcomes = collections.Counter()

    @SOME
    @given(rp.inplace_programs(), st.sampled_from(["sgd", "adam"]), st.booleans())
    def check(program, optimizer, second_order):
        rng = np.random.default_rng(0)
        batches = [[0.3 * rng.standard_normal(x.shape) for x in program.inputs] for _ in range(3)]
        with np.errstate(all="ignore"):  # values may leave the domain: bit-identity is the point
            try:
                eager, _ = rp.train(program, optimizer, second_order, batches, captured=False)
            except RuntimeError as e:
                assert_clear_refusal(e, program)
                outcomes["refused"] += 1
                return
            replayed, run = rp.train(program, optimizer, second_order, batches, captured=True)
        assert run.captures == 1  # calls 2 and 3 were replays
        rp.assert_same_history(eager, replayed)
        outcomes["compared" if _has_inplace_step(program) else "pure"] += 1

    check()
    _assert_mostly_compared(outcomes)


# --- the engine's speed paths against its op nodes ---------------------------------------------


@FEW
@given(rp.inplace_programs())
def test_speed_paths_give_bit_identical_gradients_through_inplace_changes(program):
    """The recorded in-place changes, with the backward's array-only speed paths and with every
    backward rule built from op nodes (detect_anomaly): the same first-order gradients, or the
    same refusal."""
    outcomes = []
    for forced_nodes in (False, True):
        try:
            outcomes.append(rp.backward_grads(program, forced_nodes))
        except RuntimeError as e:
            assert_clear_refusal(e, program)
            outcomes.append(str(e))
    if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
        assert outcomes[0] == outcomes[1]
    else:
        rp.assert_same_grads(*outcomes)
