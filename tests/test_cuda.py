"""Device checks for ``device="cuda"`` (CuPy), skipped where CuPy or a GPU is missing.

The op tables (test_ops.py, test_nn_functional.py) already run every op on cuda;
this file checks what is specific to having two devices: moving tensors and
modules, mixing devices, host constants (indices, masks, labels) next to device
data, optimizers, checkpoints and a second-order MAML meta-gradient, each
against the same computation on the cpu.

Checkpoints: ``tm.load`` always returns cpu tensors (a file says nothing about
where it will be used); ``Module.load_state_dict`` and
``Optimizer.load_state_dict`` copy the values onto the device of the tensors
they fill.

It runs under pytest (its tests are marked ``gpu``) and also as a plain script,
``python tests/test_cuda.py``, on a GPU machine where pytest is not installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import traceback

import numpy as np

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import meta, nn
from tinymeta.optim import SGD, Adam, AdamW
from tinymeta.testing import check_grads

try:
    import pytest
except ImportError:  # run as a script: see the bottom of the file
    pytest = None

HAVE_CUDA = tm.cuda.is_available()
if pytest is not None:
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(not HAVE_CUDA, reason="needs CuPy and a CUDA GPU"),
    ]


@contextlib.contextmanager
def raises(exc, match: str):
    """pytest.raises without pytest: the block must raise ``exc`` with ``match`` in its message."""
    try:
        yield
    except exc as e:
        assert re.search(match, str(e)), f"{type(e).__name__}({e}) does not match {match!r}"
    else:
        raise AssertionError(f"expected {exc.__name__} matching {match!r}")


def close(a, b, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# --- tensors ----------------------------------------------------------------------------------


def test_cuda_tensors_hold_cupy_arrays():
    import cupy

    assert tm.cuda.is_available()
    t = tm.tensor([[1.0, 2.0], [3.0, 4.0]], device="cuda")
    assert t.device == "cuda" and isinstance(t.data, cupy.ndarray) and t.dtype == tm.float32
    assert "device='cuda'" in repr(t)
    made = [
        tm.zeros(2, 3, device="cuda"),
        tm.ones(2, device="cuda", dtype=tm.float64),
        tm.full((2,), 7, device="cuda"),
        tm.arange(5, device="cuda"),
        tm.eye(3, device="cuda"),
        tm.randn(2, 3, rng=np.random.default_rng(0), device="cuda"),
        tm.rand(4, device="cuda"),
        tm.zeros_like(t),
        tm.ones_like(t, dtype=tm.float64),
    ]
    assert all(m.device == "cuda" and isinstance(m.data, cupy.ndarray) for m in made)
    assert made[3].dtype == tm.int64 and made[2].numpy().tolist() == [7, 7]
    c = cupy.arange(6.0).reshape(2, 3)
    kept = tm.tensor(c)  # a CuPy array stays on the GPU, copied
    assert kept.device == "cuda" and kept.dtype == tm.float64
    c[0, 0] = 100.0
    assert kept.numpy()[0, 0] == 0.0
    with raises(TypeError, "from_numpy: expected a numpy.ndarray"):
        tm.from_numpy(c)


def test_to_and_numpy_round_trips():
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((3, 4)).astype(np.float32),
        rng.standard_normal(5),
        np.arange(6).reshape(2, 3),
        np.array([True, False]),
        np.array(2.5),
        np.asfortranarray(rng.standard_normal((3, 2))),
    ]
    for a in arrays:
        g = tm.tensor(a).to("cuda")
        assert g.device == "cuda" and g.dtype == a.dtype and g.shape == a.shape
        back = g.numpy()
        assert isinstance(back, np.ndarray)
        np.testing.assert_array_equal(back, a)
        np.testing.assert_array_equal(np.asarray(g), a)
        assert g.to("cuda") is g  # already there: no copy
        h = g.to("cpu")
        assert h.device == "cpu" and isinstance(h.data, np.ndarray)
        np.testing.assert_array_equal(h.numpy(), a)
    s = tm.tensor(3.5, dtype=tm.float64, device="cuda")
    assert s.item() == 3.5 and float(s) == 3.5 and isinstance(s.item(), float)
    x = tm.tensor(rng.standard_normal((4, 6)), device="cuda")
    np.testing.assert_array_equal(x.T.numpy(), x.numpy().T)  # a strided view
    np.testing.assert_array_equal(x[1:, ::2].numpy(), x.numpy()[1:, ::2])

    # The move is differentiable: the gradient goes back to the device the leaf is on.
    w = tm.tensor([1.0, 2.0], dtype=tm.float64, requires_grad=True)
    y = (w.to("cuda") ** 2).sum()
    assert y.device == "cuda"
    (g,) = tm.grad(y, w, create_graph=True)
    assert g.device == "cpu"
    close(g.numpy(), [2.0, 4.0])
    (gg,) = tm.grad(g.sum(), w)  # and twice
    close(gg.numpy(), [2.0, 2.0])


def test_mixing_devices_raises_naming_both():
    import cupy

    a = tm.tensor([1.0, 2.0])
    b = tm.tensor([1.0, 2.0], device="cuda")
    mixes = {  # the op the error names -> the mix
        "Add": lambda: a + b,
        "Mul": lambda: b * a,
        "MatMul": lambda: tm.matmul(a, b),
        "Concatenate": lambda: tm.concatenate([a, b]),
        "Where": lambda: tm.where(np.array([True, False]), a, b),
        "Maximum": lambda: tm.maximum(b, a),
        "less": lambda: a < b,
        "equal": lambda: b == a,
    }
    for op, mix in mixes.items():
        with raises(
            RuntimeError, rf"{op}: inputs are on different devices: (cpu .*cuda|cuda .*cpu)"
        ):
            mix()
    with raises(RuntimeError, "cannot be mixed with cpu tensors"):
        a + cupy.ones(2, dtype=cupy.float32)
    with raises(RuntimeError, "labels are on cuda but the input is on cpu"):
        F.cross_entropy(tm.zeros(2, 3), tm.tensor([0, 1], device="cuda"))


def test_host_constants_follow_cuda_data():
    x = tm.tensor(np.arange(6.0).reshape(2, 3), device="cuda", requires_grad=True)
    assert x.dtype == tm.float64
    assert (x + np.ones(3)).device == "cuda"
    assert (np.ones(3) * x).device == "cuda"
    above = x > np.full(3, 2.0)
    assert above.device == "cuda" and above.dtype == tm.bool_
    np.testing.assert_array_equal(above.numpy(), np.arange(6.0).reshape(2, 3) > 2)
    kept = tm.where(np.array([True, False, True]), x, 0.0)
    rows = x[np.array([1, 1, 0])]
    picked = x[tm.tensor([1, 0]), 1:]  # a cpu tensor as the index
    masked = x[np.array([[True, False, True], [False, False, True]])]
    for t in (kept, rows, picked, masked):
        assert t.device == "cuda"
    loss = kept.sum() + rows.sum() + (picked * 2.0).sum() + (masked * 10.0).sum()
    (g,) = tm.grad(loss, x)
    close(g.numpy(), [[1 + 1 + 10, 1 + 2, 1 + 1 + 2 + 10], [1 + 2, 2 + 2, 1 + 2 + 2 + 10]])

    f32 = tm.zeros(3, device="cuda", requires_grad=True)  # float32 atomics for repeats
    (g32,) = tm.grad(f32[np.array([0, 0, 2, 0])].sum(), f32)
    assert g32.dtype == tm.float32
    close(g32.numpy(), [3.0, 0.0, 1.0])

    t = tm.zeros(3, device="cuda")
    t.copy_(np.arange(3.0))  # host values into a device tensor
    t[0] = np.float32(5.0)
    t[1:] = np.array([7.0, 8.0])
    close(t.numpy(), [5.0, 7.0, 8.0])
    h = tm.zeros(3)
    h.copy_(tm.tensor([1.0, 2.0, 3.0], device="cuda"))  # and device values into a host one
    close(h.numpy(), [1.0, 2.0, 3.0])


def test_gradcheck_accepts_cuda_tensors():
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((3, 4)), device="cuda")
    w = tm.tensor(rng.standard_normal((4, 2)), device="cuda")
    assert check_grads(lambda x, w: tm.tanh(x @ w).sum(), [x, w], order=3)
    assert check_grads(lambda x: tm.logsumexp(x, axis=1) * x.max(axis=1), [x], order=2)


def test_leaf_gradients_own_their_memory():
    # x.sum() hands x a broadcast view of one number; scaled first, it is not the seed.
    x = tm.tensor([1.0, 2.0, 3.0], dtype=tm.float64, device="cuda", requires_grad=True)
    (x.sum() * 3.0).backward()
    x.grad.data[0] = 7.0  # what an in-place gradient change (clip_grad_norm_) does
    close(x.grad.numpy(), [7.0, 3.0, 3.0])


# --- modules, optimizers, checkpoints ------------------------------------------------------------


def _cnn(seed: int, dtype=tm.float32) -> nn.Module:
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=dtype, rng=rng),
        nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5, dtype=dtype, rng=rng),
    )


def test_module_to_cuda_training_step_matches_cpu():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 1, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    models = {"cpu": _cnn(0), "cuda": _cnn(0)}
    before = [id(p) for p in models["cuda"].parameters()]
    assert models["cuda"].to("cuda") is models["cuda"]
    assert [id(p) for p in models["cuda"].parameters()] == before  # moved in place
    assert all(t.device == "cuda" for t in models["cuda"].state_dict(keep_vars=True).values())
    losses = {}
    for device, model in models.items():
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses[device] = []
        for _ in range(3):
            loss = F.cross_entropy(model(tm.tensor(x, device=device)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[device].append(loss.item())
        assert all(p.grad.device == device for p in model.parameters())
    close(losses["cuda"], losses["cpu"], rtol=1e-4, atol=1e-5)
    cpu, gpu = models["cpu"].state_dict(), models["cuda"].state_dict()
    for k in cpu:
        assert gpu[k].device == "cuda", k
        close(gpu[k].numpy(), cpu[k].numpy(), rtol=1e-4, atol=1e-5)
    for device, model in models.items():  # evaluation with the running statistics
        model.eval()
        losses[device] = F.cross_entropy(model(tm.tensor(x, device=device)), labels).item()
    close(losses["cuda"], losses["cpu"], rtol=1e-4, atol=1e-5)
    models["cuda"].to("cpu")
    assert all(p.device == "cpu" for p in models["cuda"].parameters())


def test_optimizers_on_cuda_match_cpu_and_resume_from_a_checkpoint():
    import cupy

    rng = np.random.default_rng(2)
    x, y, w0 = rng.standard_normal((8, 3)), rng.standard_normal(8), rng.standard_normal(3)
    makers = {
        "sgd": lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        "adam": lambda ps: Adam(ps, lr=0.05, amsgrad=True, weight_decay=0.1),
        "adamw": lambda ps: AdamW(ps, lr=0.05),
    }

    def run(make, device, steps, w=None, opt=None):
        w = w if w is not None else tm.tensor(w0, device=device, requires_grad=True)
        opt = opt if opt is not None else make([w])
        xt, yt = tm.tensor(x, device=device), tm.tensor(y, device=device)
        for _ in range(steps):
            r = xt @ w - yt
            opt.zero_grad()
            (r * r).mean().backward()
            opt.step()
        return w, opt

    with tempfile.TemporaryDirectory() as tmp:
        for name, make in makers.items():
            w_cpu, _ = run(make, "cpu", 6)
            w, opt = run(make, "cuda", 3)
            for k, v in opt.state[w].items():
                assert k == "step" or isinstance(v, cupy.ndarray), (name, k)
            path = os.path.join(tmp, f"{name}.npz")
            tm.save({"w": w, "opt": opt.state_dict()}, path)
            saved = tm.load(path)
            assert saved["w"].device == "cpu"  # tm.load always gives cpu tensors
            w2 = saved["w"].to("cuda").detach().requires_grad_()
            opt2 = make([w2])
            opt2.load_state_dict(saved["opt"])  # the state follows the parameter to the GPU
            for k, v in opt2.state[w2].items():
                assert k == "step" or isinstance(v, cupy.ndarray), (name, k)
            w2, _ = run(make, "cuda", 3, w2, opt2)
            close(w2.numpy(), w_cpu.numpy(), rtol=1e-9, atol=1e-12)


def test_save_and_load_cuda_tensors():
    import cupy

    model = _cnn(0).to("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.npz")
        w = tm.tensor([1.0, 2.0], device="cuda", requires_grad=True)
        tm.save({"model": model.state_dict(), "w": w, "raw": cupy.arange(3)}, path)
        loaded = tm.load(path)
    assert all(t.device == "cpu" for t in loaded["model"].values())
    assert loaded["w"].device == "cpu" and loaded["w"].requires_grad
    assert isinstance(loaded["raw"], np.ndarray) and loaded["raw"].tolist() == [0, 1, 2]
    other = _cnn(1).to("cuda")
    other.load_state_dict(loaded["model"])  # cpu values into cuda tensors: copied to the GPU
    for (k, a), b in zip(model.state_dict().items(), other.state_dict(keep_vars=True).values()):
        assert b.device == "cuda", k
        np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_clip_grad_norm_on_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    values = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    out = {}
    for device in ("cpu", "cuda"):
        ps = [tm.tensor(v, device=device, requires_grad=True) for v in values]
        (sum((p * p * p).sum() for p in ps)).backward()
        total = nn.clip_grad_norm_(ps, 1.0)
        out[device] = [total.numpy()] + [p.grad.numpy() for p in ps]
    for a, b in zip(out["cuda"], out["cpu"]):
        close(a, b)


# --- meta-learning ------------------------------------------------------------------------------


def _sinusoid(rng, tasks: int = 4, k: int = 5) -> list:
    amp = rng.uniform(0.1, 5.0, (tasks, 1, 1))
    phase = rng.uniform(0.0, np.pi, (tasks, 1, 1))
    xs, xq = rng.uniform(-5, 5, (tasks, k, 1)), rng.uniform(-5, 5, (tasks, k, 1))
    return [xs, amp * np.sin(xs + phase), xq, amp * np.sin(xq + phase)]


def test_second_order_maml_meta_gradient_on_cuda_equals_cpu():
    rng = np.random.default_rng(4)
    model = nn.Sequential(
        nn.Linear(1, 40, dtype=tm.float64, rng=rng),
        nn.ReLU(),
        nn.Linear(40, 40, dtype=tm.float64, rng=rng),
        nn.ReLU(),
        nn.Linear(40, 1, dtype=tm.float64, rng=rng),
    )
    batch = _sinusoid(rng)

    def forward(p, x):
        return nn.functional_call(model, p, x)

    grads = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        params = dict(model.named_parameters())
        xs, ys, xq, yq = (tm.tensor(a, device=device) for a in batch)
        for vectorized in (True, False):
            for first_order in (False, True):
                loss = meta.maml_loss(
                    forward, params, (xs, ys), (xq, yq), F.mse_loss, rule=0.01, steps=2,
                    first_order=first_order, vectorized=vectorized,
                )  # fmt: skip
                gs = tm.grad(loss, list(params.values()))
                assert loss.device == device and all(g.device == device for g in gs)
                grads[device, vectorized, first_order] = [g.numpy() for g in gs]
    reference = grads["cpu", True, False]
    for key, gs in grads.items():
        if not key[2]:
            for g, ref in zip(gs, reference):
                close(g, ref, rtol=1e-9, atol=1e-12)
    # The second-order terms are there on cuda: first-order MAML gives another gradient.
    assert not all(
        np.allclose(a, b, rtol=1e-6) for a, b in zip(grads["cuda", True, True], reference)
    )


def test_conv_batchnorm_maml_meta_gradient_on_cuda_equals_cpu():
    # The Omniglot shape in miniature: conv -> batch norm -> relu -> max-pool -> linear,
    # differentiated twice (conv, pool and batch-norm double backward on the GPU).
    rng = np.random.default_rng(5)
    model = _cnn(6, dtype=tm.float64)
    support = rng.standard_normal((2, 5, 1, 6, 6))
    query = rng.standard_normal((2, 10, 1, 6, 6))
    ys, yq = np.tile(np.arange(5), (2, 1)), np.tile(np.arange(5), (2, 2))

    def forward(p, x):
        return nn.functional_call(model, p, x)

    grads = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        params = dict(model.named_parameters())
        xs, xq = tm.tensor(support, device=device), tm.tensor(query, device=device)
        loss = meta.maml_loss(
            forward, params, (xs, ys), (xq, yq), F.cross_entropy, rule=0.4, steps=1,
            vectorized=False,
        )  # fmt: skip
        grads[device] = [g.numpy() for g in tm.grad(loss, list(params.values()))]
    for a, b in zip(grads["cuda"], grads["cpu"]):
        close(a, b, rtol=1e-8, atol=1e-10)


def test_meta_update_rules_live_on_the_parameters_device():
    rng = np.random.default_rng(7)
    params = {
        "w": tm.tensor(rng.standard_normal((3, 2)), device="cuda", requires_grad=True),
        "b": tm.tensor(np.zeros(2), device="cuda", requires_grad=True),
    }
    x = tm.tensor(rng.standard_normal((4, 3)), device="cuda")
    y = tm.tensor(rng.standard_normal((4, 2)), device="cuda")

    def loss_fn(p):
        return F.mse_loss(x @ p["w"] + p["b"], y)

    rules = [
        meta.MetaSGD(params, init_lr=0.1),
        meta.PerStepLR(params, steps=2, init_lr=0.1),
        meta.LearnedOptimizer(lr=0.1, dtype=tm.float64, device="cuda", rng=0),
        meta.LearnedOptimizer(lr=0.1, rng=0, params=params),  # device and dtype from params
    ]
    for rule in rules:
        assert all(p.device == "cuda" for p in rule.parameters())
        adapted = meta.adapt(loss_fn, params, rule, steps=2)
        outer = loss_fn(adapted)
        gs = tm.grad(outer, list(params.values()) + rule.parameters())
        assert all(g.device == "cuda" for g in gs)


def test_cross_entropy_labels_on_cuda():
    logits = tm.tensor(np.random.default_rng(8).standard_normal((3, 4)), device="cuda")
    host = F.cross_entropy(logits, np.array([3, 0, 1]))
    device = F.cross_entropy(logits, tm.tensor([3, 0, 1], device="cuda"))
    close(host.item(), device.item())
    with raises(ValueError, r"labels must lie in \[0, 4\) for 4 classes, got values in \[0, 4\]"):
        F.cross_entropy(logits, tm.tensor([4, 0, 1], device="cuda"))


# --- without pytest ------------------------------------------------------------------------------


def _run_as_script() -> int:
    """Run every test_* function here; returns the number of failures."""
    if not HAVE_CUDA:
        print("tests/test_cuda.py: skipped (needs CuPy and a CUDA GPU)")
        return 0
    failures = 0
    for name, fn in list(globals().items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        try:
            fn()
        except Exception:
            failures += 1
            print(f"FAIL  {name}")
            traceback.print_exc()
        else:
            print(f"PASS  {name}")
    print(f"tests/test_cuda.py: {failures} failure(s)")
    return failures


if __name__ == "__main__":
    sys.exit(1 if _run_as_script() else 0)
