"""nn.RNN / LSTM / GRU and their cells: forward against hand-written NumPy references in
PyTorch's gate order, float64 gradient checks (second order for every layer, third for the
LSTM cell), state dicts, batch_first, initial states, the task axis against a loop over tasks,
functional_call, the fused graph (a few nodes per step) and a 200-step backward whose graph is
freed. A comparison with PyTorch itself runs only where torch is installed."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import nn
from tinymeta.autograd import graph_memory
from tinymeta.testing import check_grads

# --- NumPy references (PyTorch's equations and gate order) --------------------------------


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i, f, g, o = np.split(gates, 4, axis=-1)
    c = _sig(f) * c + _sig(i) * np.tanh(g)
    return _sig(o) * np.tanh(c), c


def ref_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    gi, gh = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh
    (ir, iz, in_), (hr, hz, hn) = np.split(gi, 3, axis=-1), np.split(gh, 3, axis=-1)
    r, z = _sig(ir + hr), _sig(iz + hz)
    n = np.tanh(in_ + r * hn)
    return (1 - z) * n + z * h


def ref_rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, act=np.tanh):
    return act(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)


def ref_sequence(kind, x, params, num_layers, h0=None, c0=None, act=np.tanh):
    """Time-major x (L, N, I); params keyed as PyTorch's state dict; zeros for missing states."""
    n, hidden = x.shape[1], params["weight_hh_l0"].shape[1]
    h_n, c_n = [], []
    for k in range(num_layers):
        w = [params[f"{name}_l{k}"] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h = np.zeros((n, hidden)) if h0 is None else h0[k]
        c = np.zeros((n, hidden)) if c0 is None else c0[k]
        out = []
        for xt in x:
            if kind == "lstm":
                h, c = ref_lstm_cell(xt, h, c, *w)
            elif kind == "gru":
                h = ref_gru_cell(xt, h, *w)
            else:
                h = ref_rnn_cell(xt, h, *w, act=act)
            out.append(h)
        x = np.stack(out)
        h_n.append(h)
        c_n.append(c)
    return x, np.stack(h_n), np.stack(c_n)


LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _numpy_params(module) -> dict:
    return {k: v.numpy() for k, v in module.state_dict().items()}


# --- forward against the references --------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_layer_forward_matches_the_numpy_reference(kind, batch_first, num_layers):
    rng = np.random.default_rng(0)
    layer = LAYERS[kind](3, 4, num_layers=num_layers, batch_first=batch_first, dtype="float64")
    x = rng.standard_normal((5, 2, 3))  # time-major
    h0, c0 = rng.standard_normal((2, num_layers, 2, 4))
    state = (tm.tensor(h0), tm.tensor(c0)) if kind == "lstm" else tm.tensor(h0)
    xin = x.swapaxes(0, 1) if batch_first else x
    out, hn = layer(tm.tensor(xin), state)
    ref_out, ref_h, ref_c = ref_sequence(kind, x, _numpy_params(layer), num_layers, h0, c0)
    ref_out = ref_out.swapaxes(0, 1) if batch_first else ref_out
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-12, atol=1e-13)
    if kind == "lstm":
        np.testing.assert_allclose(hn[0].numpy(), ref_h, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(hn[1].numpy(), ref_c, rtol=1e-12, atol=1e-13)
    else:
        np.testing.assert_allclose(hn.numpy(), ref_h, rtol=1e-12, atol=1e-13)


def test_rnn_relu_and_no_bias_and_unbatched_inputs():
    rng = np.random.default_rng(1)
    layer = nn.RNN(3, 4, nonlinearity="relu", bias=False, dtype="float64")
    assert [k for k, _ in layer.named_parameters()] == ["weight_ih_l0", "weight_hh_l0"]
    x = rng.standard_normal((6, 3))
    out, hn = layer(tm.tensor(x))  # (L, I): one sequence, no batch axis
    params = _numpy_params(layer)
    params.update(bias_ih_l0=np.zeros(4), bias_hh_l0=np.zeros(4))
    ref, ref_h, _ = ref_sequence("rnn", x[:, None], params, 1, act=lambda v: np.maximum(v, 0))
    assert out.shape == (6, 4) and hn.shape == (1, 4)
    np.testing.assert_allclose(out.numpy(), ref[:, 0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(hn.numpy(), ref_h[:, 0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cells_match_the_numpy_reference_batched_and_unbatched(kind):
    rng = np.random.default_rng(2)
    cell = CELLS[kind](3, 5, dtype="float64")
    w = [p.numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
    x, h, c = rng.standard_normal((4, 3)), rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    if kind == "lstm":
        got = cell(tm.tensor(x), (tm.tensor(h), tm.tensor(c)))
        want = ref_lstm_cell(x, h, c, *w)
        one = cell(tm.tensor(x[0]), (tm.tensor(h[0]), tm.tensor(c[0])))
        np.testing.assert_allclose(one[1].numpy(), want[1][0], rtol=1e-12)
        got, want = got[0], want[0]
    else:
        ref = ref_gru_cell if kind == "gru" else ref_rnn_cell
        got, want = cell(tm.tensor(x), tm.tensor(h)), ref(x, h, *w)
        one = cell(tm.tensor(x[0]), tm.tensor(h[0]))
        np.testing.assert_allclose(one.numpy(), want[0], rtol=1e-12)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-13)
    # No state: zeros.
    zero = cell(tm.tensor(x))
    zero = zero[0] if kind == "lstm" else zero
    ref_zero = (
        ref_lstm_cell(x, 0 * h, 0 * c, *w)[0]
        if kind == "lstm"
        else (ref_gru_cell if kind == "gru" else ref_rnn_cell)(x, 0 * h, *w)
    )
    np.testing.assert_allclose(zero.numpy(), ref_zero, rtol=1e-12, atol=1e-13)


# --- parameters, initialisation, state dicts -------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_parameter_names_shapes_and_init_follow_pytorch(kind):
    layer = LAYERS[kind](3, 8, num_layers=2, rng=np.random.default_rng(0))
    k = GATES[kind]
    expected = {
        "weight_ih_l0": (k * 8, 3),
        "weight_hh_l0": (k * 8, 8),
        "bias_ih_l0": (k * 8,),
        "bias_hh_l0": (k * 8,),
        "weight_ih_l1": (k * 8, 8),
        "weight_hh_l1": (k * 8, 8),
        "bias_ih_l1": (k * 8,),
        "bias_hh_l1": (k * 8,),
    }
    assert {n: p.shape for n, p in layer.named_parameters()} == expected
    assert list(layer.state_dict()) == list(expected)  # PyTorch's order too
    bound = 1 / np.sqrt(8)
    values = np.concatenate([p.numpy().ravel() for p in layer.parameters()])
    assert values.dtype == np.float32
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
    cell = CELLS[kind](3, 8)
    assert {n: p.shape for n, p in cell.named_parameters()} == {
        "weight_ih": (k * 8, 3),
        "weight_hh": (k * 8, 8),
        "bias_ih": (k * 8,),
        "bias_hh": (k * 8,),
    }


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_state_dict_round_trip_gives_the_same_outputs(kind):
    rng = np.random.default_rng(3)
    a = LAYERS[kind](3, 4, num_layers=2, rng=rng, dtype="float64")
    b = LAYERS[kind](3, 4, num_layers=2, rng=rng, dtype="float64")
    x = tm.tensor(rng.standard_normal((5, 2, 3)))
    assert not np.allclose(a(x)[0].numpy(), b(x)[0].numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(x)[0].numpy(), b(x)[0].numpy())


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_same_outputs_and_gradients_as_pytorch(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind](
        3, 4, num_layers=2, batch_first=True
    ).double()
    ours = LAYERS[kind](3, 4, num_layers=2, batch_first=True, dtype="float64")
    ours.load_state_dict({k: tm.tensor(v.detach().numpy()) for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(4).standard_normal((2, 6, 3))
    out_t, _ = theirs(torch.from_numpy(x))
    (out_t**2).sum().backward()
    out, _ = ours(tm.tensor(x))
    (out**2).sum().backward()
    np.testing.assert_allclose(out.numpy(), out_t.detach().numpy(), rtol=1e-12, atol=1e-13)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(
            p.grad.numpy(), getattr(theirs, name).grad.numpy(), rtol=1e-10, atol=1e-12
        )


# --- gradients -------------------------------------------------------------------------------


def _cell_inputs(kind, rng, n=2, i=3, h=2):
    k = GATES[kind]
    return [
        rng.standard_normal((n, i)),
        rng.standard_normal((n, h)),
        rng.standard_normal((n, h)),
        0.5 * rng.standard_normal((k * h, i)),
        0.5 * rng.standard_normal((k * h, h)),
        0.5 * rng.standard_normal(k * h),
        0.5 * rng.standard_normal(k * h),
    ]


def test_lstm_cell_gradients_to_third_order():
    inputs = _cell_inputs("lstm", np.random.default_rng(5))

    def fn(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return F.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)

    assert check_grads(fn, inputs, order=3)


@pytest.mark.parametrize("kind", ["gru", "rnn_tanh", "rnn_relu"])
def test_gru_and_rnn_cell_gradients_to_second_order(kind):
    x, h, _, *w = _cell_inputs("gru" if kind == "gru" else "rnn", np.random.default_rng(6))
    cell = {"gru": F.gru_cell, "rnn_tanh": F.rnn_tanh_cell, "rnn_relu": F.rnn_relu_cell}[kind]
    assert check_grads(cell, [x, h, *w], order=2)


@given(
    n=st.integers(1, 3),
    hidden=st.integers(1, 3),
    lead=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 2**16),
)
def test_fused_pointwise_ops_to_second_order_on_drawn_shapes(n, hidden, lead, seed):
    from tinymeta.nn.recurrent_ops import GRUPointwise, LSTMPointwise

    rng = np.random.default_rng(seed)
    gates = 2 * rng.standard_normal(lead + (n, 4 * hidden))
    c = rng.standard_normal(lead + (n, hidden))
    assert check_grads(lambda a, b: LSTMPointwise.apply(a, b), [gates, c], order=2)
    gi, gh = (2 * rng.standard_normal(lead + (n, 3 * hidden)) for _ in range(2))
    assert check_grads(lambda a, b, s: GRUPointwise.apply(a, b, s), [gi, gh, c], order=2)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_layer_gradients_to_second_order(kind):
    """Two layers, three steps, every input: x, the initial states and all weights."""
    rng = np.random.default_rng(7)
    k, hidden = GATES[kind], 2
    weights = [
        [0.5 * rng.standard_normal(s) for s in ((k * 2, n_in), (k * 2, 2), (k * 2,), (k * 2,))]
        for n_in in (3, hidden)
    ]
    x, h0, c0 = rng.standard_normal((3, 2, 3)), *rng.standard_normal((2, 2, 2, hidden))

    def fn(x, h0, c0, *flat):
        layers = [flat[:4], flat[4:]]
        if kind == "lstm":
            out, (h, c) = F.lstm(x, (h0, c0), layers)
            return out, c
        run = F.gru if kind == "gru" else F.rnn
        return run(x, h0, layers)

    assert check_grads(fn, [x, h0, c0, *weights[0], *weights[1]], order=2)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_layer_is_one_node_and_its_backward_is_differentiable(kind):
    layer = LAYERS[kind](3, 4)
    x = tm.tensor(np.random.default_rng(8).standard_normal((20, 2, 3)).astype(np.float32))
    out, _ = layer(x)
    from tinymeta.autograd import graph

    names = [type(fn).__name__ for fn in graph.functions(out)]
    assert names.count("LSTMLayer" if kind == "lstm" else "GRULayer") == 1
    assert len(names) <= 5  # the input projection, the layer, the split of its output
    (g,) = tm.grad(out.sum(), layer.weight_hh_l0, create_graph=True)
    fused = "LSTMPointwiseGrad" if kind == "lstm" else "GRUPointwiseGrad"
    step_names = [type(fn).__name__ for fn in graph.functions(g)]
    assert step_names.count(fused) == 20  # backprop through time: one fused node per step


# --- task axis and functional_call -------------------------------------------------------------


def _per_task_params(module, tasks, rng) -> dict:
    return {
        n: tm.tensor(p.numpy() + 0.1 * rng.standard_normal((tasks,) + p.shape), requires_grad=True)
        for n, p in module.named_parameters()
    }


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_task_axis_equals_a_loop_over_tasks(kind, batch_first):
    rng = np.random.default_rng(9)
    layer = LAYERS[kind](3, 4, num_layers=2, batch_first=batch_first, dtype="float64")
    params = _per_task_params(layer, 3, rng)
    x = tm.tensor(rng.standard_normal((3, 5, 2, 3)))  # (T, L, N, I) or (T, N, L, I)
    out, _ = nn.functional_call(layer, params, x)
    (out * out).sum().backward()
    batched = {n: p.grad.numpy().copy() for n, p in params.items()}
    for t in range(3):
        one = {n: tm.tensor(p.numpy()[t], requires_grad=True) for n, p in params.items()}
        out_t, _ = nn.functional_call(layer, one, tm.tensor(x.numpy()[t]))
        np.testing.assert_allclose(out.numpy()[t], out_t.numpy(), rtol=1e-12, atol=1e-13)
        (out_t * out_t).sum().backward()
        for n, p in one.items():
            np.testing.assert_allclose(batched[n][t], p.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cell_task_axis_with_shared_and_per_task_parameters(kind):
    rng = np.random.default_rng(10)
    cell = CELLS[kind](3, 4, dtype="float64")
    params = _per_task_params(cell, 2, rng)
    params["bias_hh"] = cell.bias_hh  # one shared parameter next to per-task ones
    x = tm.tensor(rng.standard_normal((2, 5, 3)))
    out = nn.functional_call(cell, params, x)
    out = out[0] if kind == "lstm" else out
    for t in range(2):
        one = {n: (p if p.ndim == 1 and n == "bias_hh" else p[t]) for n, p in params.items()}
        ref = nn.functional_call(cell, one, x[t])
        ref = ref[0] if kind == "lstm" else ref
        np.testing.assert_allclose(out.numpy()[t], ref.numpy(), rtol=1e-12, atol=1e-13)


def test_functional_call_uses_the_given_parameters():
    rng = np.random.default_rng(11)
    a, b = nn.LSTM(3, 4, rng=rng), nn.LSTM(3, 4, rng=rng)
    x = tm.tensor(rng.standard_normal((4, 2, 3)).astype(np.float32))
    out, (h, c) = nn.functional_call(a, dict(b.named_parameters()), x)
    out_b, (h_b, c_b) = b(x)
    np.testing.assert_array_equal(out.numpy(), out_b.numpy())
    np.testing.assert_array_equal(c.numpy(), c_b.numpy())


def test_second_order_maml_meta_gradient_through_an_lstm_matches_finite_differences():
    """The decisive meta test: d/dtheta of the query loss after one inner SGD step, float64."""
    rng = np.random.default_rng(12)
    layer = nn.LSTM(2, 2, dtype="float64", rng=rng)
    names = [n for n, _ in layer.named_parameters()]
    xs, xq = rng.standard_normal((2, 4, 3, 2))
    ys, yq = rng.standard_normal((2, 3, 2))

    def meta_loss(*theta):
        params = dict(zip(names, theta))

        def loss(p, x, y):
            out, _ = nn.functional_call(layer, p, tm.tensor(x))
            return ((out[-1] - tm.tensor(y)) ** 2).mean()

        with tm.enable_grad():  # the checker evaluates under no_grad; the inner step needs it
            grads = tm.grad(loss(params, xs, ys), list(theta), create_graph=True)
            fast = {n: p - 0.5 * g for n, p, g in zip(names, theta, grads)}
            return loss(fast, xq, yq)

    assert check_grads(meta_loss, [p.numpy() for p in layer.parameters()], order=1)


# --- memory ----------------------------------------------------------------------------------


def _node_and_array_refs(roots):
    from tinymeta.autograd import graph

    nodes = graph.functions(roots)
    arrays = [t.data for fn in nodes for t in fn.inputs if not t.is_leaf]
    arrays += [fn.gates for fn in nodes if hasattr(fn, "gates")]  # LSTMLayer's gate buffer
    return [weakref.ref(fn) for fn in nodes], [weakref.ref(a) for a in arrays]


@pytest.mark.parametrize("order", [1, 2])
def test_200_step_backward_frees_the_graph(order):
    """After backward nothing of the graph survives (no reference cycles: gc is off), at first
    order (one LSTMLayer node holding its gates) and at second order (the per-step backward
    graph of create_graph)."""
    layer = nn.LSTM(4, 8, rng=np.random.default_rng(13))
    x = tm.tensor(np.random.default_rng(14).standard_normal((200, 3, 4)).astype(np.float32))
    gc.collect()
    gc.disable()
    try:
        out = layer(x)[0]  # (h_n, c_n) not kept: they would keep the graph's nodes alive
        loss = (out * out).sum()
        if order == 2:
            (g,) = tm.grad(loss, layer.weight_hh_l0, create_graph=True)
            loss = (g * g).sum()
        # At least the 200 steps' gates (3 x 32 float32 each) are kept for backward.
        assert graph_memory(loss).total_bytes >= 200 * 3 * 32 * 4
        node_refs, array_refs = _node_and_array_refs(loss)
        del out
        loss.backward()
        del loss
        if order == 2:
            del g
        alive_nodes = sum(r() is not None for r in node_refs)
        alive_arrays = sum(r() is not None for r in array_refs)
    finally:
        gc.enable()
    assert len(node_refs) > (1000 if order == 2 else 3)
    assert alive_nodes == 0 and alive_arrays == 0
    grad = layer.weight_hh_l0.grad.numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


# --- errors ----------------------------------------------------------------------------------


def test_bad_inputs_raise_errors_naming_the_layer_and_shapes():
    layer = nn.LSTM(3, 4)
    with pytest.raises(
        ValueError, match=r"lstm: expected an input of shape \(L, N, 3\).*\(5, 2, 7\)"
    ):
        layer(tm.zeros(5, 2, 7))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(1, 2, 4\), got \(1, 3, 4\)"):
        layer(tm.zeros(5, 2, 3), (tm.zeros(1, 3, 4), tm.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="GRU: expected an input"):
        nn.GRU(3, 4)(tm.zeros(3))
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        nn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        nn.LSTM(3, 4, num_layers=0)
    with pytest.raises(ValueError, match=r"gru_cell: w_hh must be \(3 \* hidden, hidden\)"):
        F.gru_cell(tm.zeros(2, 3), None, tm.zeros(12, 3), tm.zeros(10, 4))
    with pytest.raises(ValueError, match="the input has 3 tasks .* the weights have 2"):
        F.lstm_cell(tm.zeros(3, 2, 3), None, tm.zeros(2, 16, 3), tm.zeros(2, 16, 4))
