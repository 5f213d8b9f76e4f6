"""nn.LayerNorm, nn.MultiheadAttention and nn.Embedding: forward against hand-written NumPy
references, float64 gradient checks to second order, masks (bool and float, 2-D and 3-D),
batch_first both ways, the task axis against a loop over tasks, state dicts, PyTorch's
parameter layout (and PyTorch itself where torch is installed), and argument errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import nn
from tinymeta.testing import check_grads

# --- LayerNorm -----------------------------------------------------------------------------


def ref_layer_norm(x, k, w, b, eps=1e-5):
    axes = tuple(range(x.ndim - k, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_matches_the_reference_and_has_second_derivatives(lead, shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + shape)
    w, b = rng.standard_normal(shape), rng.standard_normal(shape)
    got = F.layer_norm(tm.tensor(x), shape, tm.tensor(w), tm.tensor(b))
    np.testing.assert_allclose(got.numpy(), ref_layer_norm(x, len(shape), w, b), atol=1e-12)
    if np.prod(shape) > 1:  # one element: var = 0, y = b whatever x (a flat function)
        assert check_grads(lambda x, w, b: F.layer_norm(x, shape, w, b), [x, w, b], order=2)


def test_layer_norm_module_init_task_axis_and_errors():
    ln = nn.LayerNorm(4, dtype="float64")
    assert {n: p.shape for n, p in ln.named_parameters()} == {"weight": (4,), "bias": (4,)}
    np.testing.assert_array_equal(ln.weight.numpy(), 1.0)
    np.testing.assert_array_equal(ln.bias.numpy(), 0.0)
    assert list(nn.LayerNorm(4, elementwise_affine=False).named_parameters()) == []
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4))  # (T, N, 4)
    params = {
        "weight": tm.tensor(rng.standard_normal((3, 4))),
        "bias": tm.tensor(rng.standard_normal((3, 4))),
    }
    out = nn.functional_call(ln, params, tm.tensor(x))
    for t in range(3):
        want = ref_layer_norm(x[t], 1, params["weight"].numpy()[t], params["bias"].numpy()[t])
        np.testing.assert_allclose(out.numpy()[t], want, atol=1e-12)
    with pytest.raises(ValueError, match=r"layer_norm: the input's trailing axes \(2, 3\)"):
        ln(tm.zeros(2, 3))


# --- MultiheadAttention ---------------------------------------------------------------------


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_mha(q, k, v, w, b, wo, bo, heads, mask=None):
    """Batch-first q (N, L, E), k and v (N, S, E); mask additive, (L, S) or (N, heads, L, S)."""
    e = q.shape[-1]
    hd = e // heads

    def split(x, rows):
        p = x @ w[rows].T + b[rows]
        return p.reshape(p.shape[:-1] + (heads, hd)).swapaxes(-3, -2)

    qh, kh, vh = split(q, slice(0, e)), split(k, slice(e, 2 * e)), split(v, slice(2 * e, 3 * e))
    s = qh @ kh.swapaxes(-1, -2) / np.sqrt(hd)
    if mask is not None:
        s = s + mask
    a = _softmax(s)
    o = (a @ vh).swapaxes(-3, -2)
    o = o.reshape(o.shape[:-2] + (e,)) @ wo.T + bo
    return o, a.mean(axis=-3)


def _mha_arrays(mha):
    return [
        p.numpy()
        for p in (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    ]


def _random_biases(mha, rng):
    """PyTorch starts both biases at 0; random ones test that they are used."""
    for p in (mha.in_proj_bias, mha.out_proj.bias):
        p.data[...] = rng.standard_normal(p.shape)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float", "bool3d"])
def test_mha_matches_the_reference(batch_first, mask):
    rng = np.random.default_rng(1)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype="float64")
    _random_biases(mha, rng)
    n, length, source = 3, 4, 5
    q = rng.standard_normal((n, length, 8))
    k, v = rng.standard_normal((2, n, source, 8))
    m, add = None, None
    if mask == "bool":
        m = rng.random((length, source)) < 0.3
        m[:, 0] = False  # every query keeps one key (an all-masked row is NaN, as in PyTorch)
        add = np.where(m, -np.inf, 0.0)
    elif mask == "float":
        m = add = rng.standard_normal((length, source))
    elif mask == "bool3d":
        m = rng.random((n * 2, length, source)) < 0.3
        m[..., 0] = False
        add = np.where(m, -np.inf, 0.0).reshape(n, 2, length, source)
    layout = (lambda a: a) if batch_first else (lambda a: a.swapaxes(0, 1))
    out, weights = mha(*(tm.tensor(layout(a)) for a in (q, k, v)), attn_mask=m)
    want, want_w = ref_mha(q, k, v, *_mha_arrays(mha), heads=2, mask=add)
    np.testing.assert_allclose(out.numpy(), layout(want), atol=1e-12)
    np.testing.assert_allclose(weights.numpy(), want_w, atol=1e-12)
    if mask == "bool":  # a masked key gets no weight from any head
        assert (weights.numpy()[:, m] == 0).all()


def test_mha_unbatched_per_head_weights_and_no_weights():
    rng = np.random.default_rng(2)
    mha = nn.MultiheadAttention(6, 3, dtype="float64")
    _random_biases(mha, rng)
    x = rng.standard_normal((4, 6))  # (L, E): one sequence
    out, w = mha(tm.tensor(x), tm.tensor(x), tm.tensor(x))
    want, want_w = ref_mha(x[None], x[None], x[None], *_mha_arrays(mha), heads=3)
    assert out.shape == (4, 6) and w.shape == (4, 4)
    np.testing.assert_allclose(out.numpy(), want[0], atol=1e-12)
    np.testing.assert_allclose(w.numpy(), want_w[0], atol=1e-12)
    _, per_head = mha(tm.tensor(x), tm.tensor(x), tm.tensor(x), average_attn_weights=False)
    assert per_head.shape == (3, 4, 4)
    np.testing.assert_allclose(per_head.numpy().mean(axis=0), want_w[0], atol=1e-12)
    out2, none = mha(tm.tensor(x), tm.tensor(x), tm.tensor(x), need_weights=False)
    assert none is None
    np.testing.assert_allclose(out2.numpy(), out.numpy(), atol=1e-14)


def test_mha_parameters_and_init_follow_pytorch():
    mha = nn.MultiheadAttention(8, 4, rng=np.random.default_rng(0))
    assert {n: p.shape for n, p in mha.named_parameters()} == {
        "in_proj_weight": (24, 8),
        "in_proj_bias": (24,),
        "out_proj.weight": (8, 8),
        "out_proj.bias": (8,),
    }
    np.testing.assert_array_equal(mha.in_proj_bias.numpy(), 0.0)
    np.testing.assert_array_equal(mha.out_proj.bias.numpy(), 0.0)
    bound = np.sqrt(6 / (24 + 8))  # Xavier-uniform over the stacked (3E, E) matrix
    w = mha.in_proj_weight.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    assert [n for n, _ in nn.MultiheadAttention(8, 4, bias=False).named_parameters()] == [
        "in_proj_weight",
        "out_proj.weight",
    ]


def test_mha_gradients_to_second_order_with_a_mask():
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 3, 2, 4))  # (L, N, E), self- and cross-attention inputs
    w, b = 0.5 * rng.standard_normal((12, 4)), rng.standard_normal(12)
    wo, bo = 0.5 * rng.standard_normal((4, 4)), rng.standard_normal(4)
    mask = np.array([[False, True, False], [False, False, True], [False, False, False]])

    def fn(q, k, w, b, wo, bo):
        return F.multi_head_attention(q, k, k, 2, w, b, wo, bo, attn_mask=mask)

    assert check_grads(fn, [q, k, w, b, wo, bo], order=2)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_task_axis_equals_a_loop_over_tasks(batch_first):
    rng = np.random.default_rng(4)
    mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, dtype="float64")
    params = {
        n: tm.tensor(p.numpy() + 0.1 * rng.standard_normal((3,) + p.shape))
        for n, p in mha.named_parameters()
    }
    params["out_proj.bias"] = mha.out_proj.bias  # shared next to per-task ones
    x = tm.tensor(rng.standard_normal((3, 5, 2, 4)))
    out, w = nn.functional_call(mha, params, x, x, x)
    for t in range(3):
        one = {n: p if n == "out_proj.bias" else p[t] for n, p in params.items()}
        out_t, w_t = nn.functional_call(mha, one, x[t], x[t], x[t])
        np.testing.assert_allclose(out.numpy()[t], out_t.numpy(), atol=1e-12)
        np.testing.assert_allclose(w.numpy()[t], w_t.numpy(), atol=1e-12)


def test_mha_same_as_pytorch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
    ours = nn.MultiheadAttention(8, 2, batch_first=True, dtype="float64")
    ours.load_state_dict({k: tm.tensor(v.detach().numpy()) for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(5).standard_normal((2, 5, 8))
    mask = np.triu(np.ones((5, 5), dtype=bool), 1)  # causal
    out_t, w_t = theirs(*(torch.from_numpy(x),) * 3, attn_mask=torch.from_numpy(mask))
    out, w = ours(*(tm.tensor(x),) * 3, attn_mask=mask)
    np.testing.assert_allclose(out.numpy(), out_t.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(w.numpy(), w_t.detach().numpy(), atol=1e-12)


def test_mha_errors_name_the_shapes():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="embed_dim .5. must be a positive multiple of num_heads"):
        nn.MultiheadAttention(5, 2)
    with pytest.raises(ValueError, match=r"expected key of shape \(L, N, 8\)"):
        mha(tm.zeros(3, 2, 8), tm.zeros(3, 2, 6), tm.zeros(3, 2, 8))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(3, 4\) or \(4, 3, 4\)"):
        mha(tm.zeros(3, 2, 8), tm.zeros(4, 2, 8), tm.zeros(4, 2, 8), attn_mask=np.zeros((3, 3)))
    with pytest.raises(TypeError, match="attn_mask must be bool or float"):
        mha(
            tm.zeros(3, 2, 8), tm.zeros(3, 2, 8), tm.zeros(3, 2, 8), attn_mask=np.zeros((3, 3), int)
        )


# --- Embedding ------------------------------------------------------------------------------


def test_embedding_lookup_gradient_accumulates_and_padding_gets_none():
    emb = nn.Embedding(6, 3, padding_idx=2, dtype="float64", rng=np.random.default_rng(6))
    np.testing.assert_array_equal(emb.weight.numpy()[2], 0.0)
    idx = np.array([[1, 2, 1], [5, 0, 2]])
    y = emb(idx)
    np.testing.assert_array_equal(y.numpy(), emb.weight.numpy()[idx])
    g = np.random.default_rng(7).standard_normal(y.shape)
    (y * tm.tensor(g)).sum().backward()
    want = np.zeros((6, 3))
    np.add.at(want, idx, g)
    want[2] = 0.0
    np.testing.assert_allclose(emb.weight.grad.numpy(), want, atol=1e-14)


def test_embedding_second_order_and_task_axis():
    rng = np.random.default_rng(8)
    idx = np.array([0, 3, 3, 1])
    assert check_grads(lambda w: F.embedding(idx, w) ** 3, [rng.standard_normal((4, 2))], order=2)
    emb = nn.Embedding(4, 2, dtype="float64")
    w = tm.tensor(rng.standard_normal((3, 4, 2)))
    per_task = np.array([[0, 1], [3, 3], [2, 0]])
    y = nn.functional_call(emb, {"weight": w}, per_task)
    for t in range(3):
        np.testing.assert_array_equal(y.numpy()[t], w.numpy()[t][per_task[t]])
    with pytest.raises(IndexError, match=r"embedding: indices must lie in \[0, 4\)"):
        emb(np.array([4]))
    with pytest.raises(TypeError, match="indices must be integers"):
        emb(np.array([0.5]))


def test_state_dict_round_trips_give_the_same_outputs():
    rng = np.random.default_rng(9)
    x = tm.tensor(rng.standard_normal((3, 2, 8)))
    for make, run in (
        (lambda: nn.MultiheadAttention(8, 2, dtype="float64", rng=rng), lambda m: m(x, x, x)[0]),
        (lambda: nn.LayerNorm(8, dtype="float64"), lambda m: m(x)),
        (lambda: nn.Embedding(5, 3, dtype="float64", rng=rng), lambda m: m(np.array([[0, 4]]))),
    ):
        a, b = make(), make()
        for p in a.parameters():  # distinct values (LayerNorm starts at ones and zeros)
            p.data[...] = rng.standard_normal(p.shape)
        assert not np.allclose(run(a).numpy(), run(b).numpy())
        b.load_state_dict(a.state_dict())
        assert list(b.state_dict()) == list(a.state_dict())
        np.testing.assert_array_equal(run(a).numpy(), run(b).numpy())
