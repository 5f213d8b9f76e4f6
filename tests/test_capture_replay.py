"""How a replay runs: what it keeps, what it drops, what it folds (tm.capture's program)."""

from __future__ import annotations

import inspect
import sys
import tracemalloc

import numpy as np
import pytest

import tinymeta as tm
from tinymeta import kernels


def _peak_bytes_of(fn) -> int:
    """The most memory traced (NumPy reports its arrays to tracemalloc) while ``fn`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def test_replay_drops_each_intermediate_after_its_last_use():
    """A chain of 16 ops on a 1 MB array: a replay that held every intermediate to its end
    would peak at 16 MB; dropping each after the op that last reads it, about 2 MB."""
    size = 1 << 18  # float32: 1 MiB

    def step(x):
        y = x
        for _ in range(16):
            y = tm.tanh(y) * 0.5
        return y.sum()

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    captured = tm.capture(step)
    captured(xs[0])
    assert len(captured.program) >= 32
    result = []
    peak = _peak_bytes_of(lambda: result.append(captured(xs[1])))
    assert peak < 4 * xs[1].nbytes, f"replay peaked at {peak / xs[1].nbytes:.1f} inputs' worth"
    assert np.array_equal(result[0].data, step(tm.tensor(xs[1])).data)


def _w1_step(params, opt):
    import tinymeta.nn.functional as F
    from tinymeta import meta

    def mlp(p, x):
        h = F.relu(F.linear(x, p["w1"], p["b1"]))
        return F.linear(h, p["w2"], p["b2"])

    def step(xs, ys, xq, yq):
        opt.zero_grad()
        loss = meta.maml_loss(mlp, params, (xs, ys), (xq, yq), F.mse_loss, 0.01, 1)
        loss.backward()
        opt.step()
        return loss

    return step


def _w1_params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (8, 1), "b1": (8,), "w2": (1, 8), "b2": (1,)}
    return {
        k: tm.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True)
        for k, s in shapes.items()
    }


def _w1_batches(n, seed=1):
    rng = np.random.default_rng(seed)
    return [
        tuple(rng.standard_normal((3, 4, 1)).astype(np.float32) for _ in range(4)) for _ in range(n)
    ]


def test_seeds_and_broadcasts_of_parameters_are_folded_and_replay_bit_identical():
    """MAML's engine seeds (ones_like of each loss, scaled and broadcast) and the parameters
    broadcast to every task are computed at capture, not on every replay; the replays still
    give the eager step's bits, while the parameters change under Adam."""
    from tinymeta.optim import Adam

    eager_params, captured_params = _w1_params(), _w1_params()
    eager = _w1_step(eager_params, Adam(list(eager_params.values()), lr=0.01))
    captured = tm.capture(_w1_step(captured_params, Adam(list(captured_params.values()), lr=0.01)))
    for batch in _w1_batches(4):
        expected = eager(*[tm.tensor(a) for a in batch])
        got = captured(*batch)
        assert np.array_equal(expected.data, got.data)
        for k in eager_params:
            assert np.array_equal(eager_params[k].data, captured_params[k].data), k
            assert np.array_equal(eager_params[k].grad.data, captured_params[k].grad.data), k
    names = captured.program.names
    assert "numpy.ones_like" not in names and "BroadcastTo" not in names
    own = {id(p.data) for p in captured_params.values()}
    folded = [a for a in captured.program.fixed.values() if id(a) not in own]
    assert folded, "nothing was folded"
    # A folded value is read-only (a write raises instead of changing the next replay); a
    # folded view of a parameter reads the parameter's memory, which Adam changes in place.
    for a in folded:
        roots = {id(_root(a))}
        if not roots & own:
            assert not a.flags.writeable


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def test_a_value_written_in_place_is_not_folded():
    """A gradient computed from the seed alone is a constant, until the step adds x to it
    in place: then every replay must compute it again."""
    w = tm.tensor(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), requires_grad=True)

    def step(x):
        (g,) = tm.grad((w * 2.0).sum(), [w])  # 2 everywhere, whatever x is
        with tm.no_grad():
            g.add_(x)
        return (g * g).sum()

    captured = tm.capture(step)
    rng = np.random.default_rng(3)
    for _ in range(4):
        x = rng.standard_normal((2, 3)).astype(np.float32)
        assert np.array_equal(captured(x).data, step(tm.tensor(x)).data)
    assert captured.captures == 1


def test_a_constant_the_step_returns_is_a_new_array_every_replay():
    """A result that depends on no input (the gradient of a linear loss) is not folded: each
    replay hands out an array of its own, which the caller may change."""
    w = tm.tensor(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), requires_grad=True)

    def step(x):
        (g,) = tm.grad((w * 3.0).sum(), [w])
        return (x * w).sum(), g

    captured = tm.capture(step)
    x = np.ones((2, 3), np.float32)
    _, first = captured(x)
    _, second = captured(x)
    assert first.data is not second.data and not np.shares_memory(first.data, second.data)
    first.data[...] = -1.0
    _, third = captured(x)
    assert np.array_equal(third.data, np.full((2, 3), 3.0, np.float32))


# A kernel called on computed arrays outside an op's forward: each must be followed, or the
# replay would hand back the capturing call's result (a compiled kernel returns a plain array).
_DIRECT_KERNEL_CALLS = {
    "winograd_input": lambda a: kernels.winograd_input(a[:576].reshape(2, 8, 6, 6), 1, 1),
    "winograd_output": lambda a: kernels.winograd_output(a.reshape(16, 2, 3, 3, 8), 6, 6),
    "winograd_output_adjoint": lambda a: kernels.winograd_output_adjoint(
        a[:576].reshape(2, 8, 6, 6), 3, 3
    ),
    "winograd_input_adjoint": lambda a: kernels.winograd_input_adjoint(
        a.reshape(16, 2, 3, 3, 8), 6, 6, 1, 1
    ),
    "relu_backward": lambda a: kernels.relu_backward(a, a - 0.5),
    "erf": lambda a: kernels.erf(a),
}


@pytest.mark.parametrize("name", sorted(_DIRECT_KERNEL_CALLS))
def test_a_kernel_called_outside_a_forward_is_replayed(name):
    call = _DIRECT_KERNEL_CALLS[name]

    def step(x):
        return tm.Tensor(call((x * 2.0).data)).sum()

    captured = tm.capture(step)
    rng = np.random.default_rng(5)
    for _ in range(3):
        x = rng.standard_normal(16 * 2 * 3 * 3 * 8).astype(np.float32)
        assert captured(x).numpy() == step(tm.tensor(x)).numpy()
    assert captured.captures == 1


def test_capture_follows_every_array_kernel():
    """Every public function of tinymeta.kernels is followed, except the few that take no
    array (so a kernel added later is followed without anyone remembering to list it)."""
    capture_module = sys.modules["tinymeta.capture"]
    public = {
        name
        for name, fn in vars(kernels).items()
        if inspect.isfunction(fn) and fn.__module__ == kernels.__name__ and name[0] != "_"
    }
    followed = set(capture_module.kernel_names(kernels))
    assert {"adam_update_", "sgd_update_", "winograd_input", "bn_double_backward"} <= followed
    assert public - followed == set(capture_module._NOT_KERNELS)
    for name in capture_module._NOT_KERNELS:  # ints and strings only
        for parameter in inspect.signature(getattr(kernels, name)).parameters.values():
            assert parameter.annotation in ("int", "str", inspect.Parameter.empty), name
