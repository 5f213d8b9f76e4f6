"""tm.capture: a replay gives bit for bit what the eager step gives, and what it cannot
replay is refused while capturing, naming the op and the line."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import function, meta
from tinymeta.capture import CaptureError, _Traced
from tinymeta.optim import SGD, Adam, AdamW

ITERATIONS = 4  # one capture, three replays


def _params(shapes: dict, seed: int = 0, dtype=np.float32, device="cpu") -> dict:
    rng = np.random.default_rng(seed)
    return {
        k: tm.tensor(
            (rng.standard_normal(s) / np.sqrt(s[-1])).astype(dtype),
            device=device,
            requires_grad=True,
        )
        for k, s in shapes.items()
    }


def _twins(make_state, make_step, batches):
    """Run the same steps eagerly and captured from equal states; assert bit-identical
    results, parameters and gradients after every iteration."""
    eager_state, captured_state = make_state(), make_state()
    eager = make_step(eager_state)
    captured = tm.capture(make_step(captured_state))
    for i, batch in enumerate(batches):
        expected = eager(*[tm.tensor(a) for a in batch])
        got = captured(*batch)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        for e, g in zip(expected, got):
            assert type(g.data) is np.ndarray
            assert np.array_equal(e.data, g.data), f"iteration {i}: results differ"
        for (k, pe), pc in zip(eager_state["params"].items(), captured_state["params"].values()):
            assert type(pc.data) is np.ndarray
            assert np.array_equal(pe.data, pc.data), f"iteration {i}: parameter {k} differs"
            if pe.grad is None:
                assert pc.grad is None
            else:
                assert type(pc.grad.data) is np.ndarray
                assert np.array_equal(pe.grad.data, pc.grad.data), f"iteration {i}: grad {k}"
    assert captured.captures == 1
    assert function._capture_hook is None
    return captured


# --- W1: sinusoid MAML (1-40-40-1 ReLU MLP), second and first order, Adam or Meta-SGD ----------


def _mlp(p, x):
    h = F.relu(F.linear(x, p["w1"], p["b1"]))
    h = F.relu(F.linear(h, p["w2"], p["b2"]))
    return F.linear(h, p["w3"], p["b3"])


W1_SHAPES = {"w1": (40, 1), "b1": (40,), "w2": (40, 40), "b2": (40,), "w3": (1, 40), "b3": (1,)}


def _sinusoid_batches(n, tasks=5, k=10, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        amp = rng.uniform(0.1, 5, (tasks, 1, 1))
        phase = rng.uniform(0, np.pi, (tasks, 1, 1))
        xs, xq = (rng.uniform(-5, 5, (tasks, k, 1)) for _ in range(2))
        out.append(
            tuple(
                a.astype(np.float32)
                for a in (xs, amp * np.sin(xs - phase), xq, amp * np.sin(xq - phase))
            )
        )
    return out


W1_OPTIMIZERS = {
    "adam": lambda params: Adam(params, lr=1e-3),
    "adamw_amsgrad": lambda params: AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adam_wd_amsgrad": lambda params: Adam(params, lr=1e-2, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize(
    "steps, first_order, vectorized, optimizer",
    [
        (1, False, True, "adam"),
        (2, False, True, "adam"),
        (1, True, True, "adam"),
        (1, False, False, "adam"),
        (1, False, True, "adamw_amsgrad"),
        (1, False, True, "adam_wd_amsgrad"),
    ],
)
def test_w1_maml_adam_replays_bit_identical(steps, first_order, vectorized, optimizer):
    def make_state():
        params = _params(W1_SHAPES)
        return {"params": params, "opt": W1_OPTIMIZERS[optimizer](list(params.values()))}

    def make_step(state):
        params, opt = state["params"], state["opt"]

        def step(xs, ys, xq, yq):
            opt.zero_grad()
            loss = meta.maml_loss(
                _mlp, params, (xs, ys), (xq, yq), F.mse_loss, 0.01, steps,
                first_order=first_order, vectorized=vectorized,
            )  # fmt: skip
            loss.backward()
            opt.step()
            return loss

        return step

    _twins(make_state, make_step, _sinusoid_batches(ITERATIONS))


def test_w1_meta_sgd_learned_rates_replay_bit_identical():
    def make_state():
        params = _params(W1_SHAPES)
        rule = meta.MetaSGD(params, init_lr=0.01)
        everything = dict(params)
        everything.update({f"lr.{k}": v for k, v in rule.named_parameters().items()})
        return {"params": everything, "model": params, "rule": rule,
                "opt": Adam(list(everything.values()), lr=1e-3)}  # fmt: skip

    def make_step(state):
        params, rule, opt = state["model"], state["rule"], state["opt"]

        def step(xs, ys, xq, yq):
            opt.zero_grad()
            loss = meta.maml_loss(_mlp, params, (xs, ys), (xq, yq), F.mse_loss, rule, 1)
            loss.backward()
            opt.step()
            return loss

        return step

    _twins(make_state, make_step, _sinusoid_batches(ITERATIONS))


# --- W2: Omniglot-size conv MAML, scaled down: conv + batch norm + ReLU + max-pool ------------


def _convnet(p, x):
    x = F.conv2d(x, p["c.w"], p["c.b"], padding=1)
    x = F.batch_norm(x, None, None, p["bn.w"], p["bn.b"], training=True)
    x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.reshape(x.shape[:-3] + (-1,)), p["fc.w"], p["fc.b"])


W2_SHAPES = {"c.w": (4, 1, 3, 3), "c.b": (4,), "bn.w": (4,), "bn.b": (4,),
             "fc.w": (3, 64), "fc.b": (3,)}  # fmt: skip


def _omniglot_batches(n, tasks=2, ways=3, seed=2):
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(ways), (tasks, 1)).astype(np.int64)
    return [
        (
            rng.standard_normal((tasks, ways, 1, 8, 8)).astype(np.float32),
            labels,
            rng.standard_normal((tasks, ways, 1, 8, 8)).astype(np.float32),
            labels,
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_w2_conv_batchnorm_maml_replays_bit_identical(first_order, vectorized):
    def make_state():
        params = _params(W2_SHAPES, seed=3)
        return {"params": params, "opt": Adam(list(params.values()), lr=1e-3)}

    def make_step(state):
        params, opt = state["params"], state["opt"]

        def xent(logits, labels):
            return F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1))

        def step(xs, ys, xq, yq):
            opt.zero_grad()
            loss = meta.maml_loss(
                _convnet, params, (xs, ys), (xq, yq), xent, 0.4, 1, first_order=first_order,
                vectorized=vectorized,
            )  # fmt: skip
            loss.backward()
            opt.step()
            return loss

        return step

    _twins(make_state, make_step, _omniglot_batches(ITERATIONS))


# --- W3: a plain training step (MLP, cross-entropy, SGD with momentum) -------------------------


def w3_case(device="cpu"):
    """W3 (an MLP step with SGD and momentum): make_state, make_step and the batches, for
    _twins here and for the same check on cuda (tests/test_capture_cuda.py)."""
    shapes = {"w1": (16, 20), "b1": (16,), "w2": (16, 16), "b2": (16,), "w3": (10, 16), "b3": (10,)}

    def make_state():
        params = _params(shapes, seed=4, device=device)
        return {"params": params, "opt": SGD(list(params.values()), lr=0.1, momentum=0.9)}

    def make_step(state):
        params, opt = state["params"], state["opt"]

        def step(x, y):
            opt.zero_grad()
            loss = F.cross_entropy(_mlp(params, x), y)
            loss.backward()
            opt.step()
            return loss

        return step

    rng = np.random.default_rng(5)
    batches = [
        (rng.standard_normal((8, 20)).astype(np.float32), rng.integers(0, 10, 8))
        for _ in range(ITERATIONS)
    ]
    return make_state, make_step, batches


def test_w3_mlp_sgd_momentum_replays_bit_identical():
    _twins(*w3_case())


# --- W4: double backward alone ---------------------------------------------------------------


def w4_case(dtype, device="cpu"):
    """W4 (a double backward alone): make_state, make_step and the batches, as w3_case."""

    def make_state():
        return {"params": _params({"W1": (10, 10), "W2": (10, 1)}, 6, dtype, device)}

    def make_step(state):
        W1, W2 = state["params"]["W1"], state["params"]["W2"]

        def step(x):
            f = (tm.tanh(x @ W1) @ W2).sum()
            (g,) = tm.grad(f, W1, create_graph=True)
            (h,) = tm.grad((g * g).sum(), W1)
            return h, f

        return step

    rng = np.random.default_rng(7)
    return make_state, make_step, [(rng.standard_normal((8, 10)).astype(dtype),) for _ in range(4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_w4_double_backward_replays_bit_identical(dtype):
    _twins(*w4_case(dtype))


# --- signatures: a new shape or dtype captures again, or raises -----------------------------


def _linear_step():
    w = tm.tensor(np.arange(6, dtype=np.float32).reshape(3, 2), requires_grad=True)

    def step(x):
        return (x @ w).sum()

    return step, w


def test_new_shape_or_dtype_recaptures():
    step, w = _linear_step()
    captured = tm.capture(step)
    for shape, dtype in [((4, 3), np.float32), ((4, 3), np.float32), ((5, 3), np.float32),
                         ((5, 3), np.float64)]:  # fmt: skip
        x = np.ones(shape, dtype)
        assert captured(x).data == step(tm.tensor(x)).data
    assert captured.captures == 3


def test_new_shape_raises_when_asked():
    step, _ = _linear_step()
    captured = tm.capture(step, on_change="raise")
    captured(np.ones((4, 3), np.float32))
    with pytest.raises(
        CaptureError, match=r"captured for inputs .*\(4, 3\).* called with .*\(5, 3\)"
    ):
        captured(np.ones((5, 3), np.float32))


def test_new_data_array_of_a_parameter_recaptures():
    step, w = _linear_step()
    captured = tm.capture(step)
    x = np.ones((4, 3), np.float32)
    captured(x)
    w.data = w.data * 2  # a new array: the replay's reference would be stale
    assert captured(x).data == step(tm.tensor(x)).data
    assert captured.captures == 2


# --- what cannot be replayed is refused, naming the op and the line ------------------------------


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _refused(step, *args, match):
    with pytest.raises(CaptureError, match=match) as info:
        tm.capture(step)(*args)
    assert function._capture_hook is None  # the capture is over, error or not
    return str(info.value)


def test_item_float_bool_numpy_are_refused_with_the_line():
    w = tm.tensor(np.ones((3, 1), np.float32), requires_grad=True)
    x = np.ones((2, 3), np.float32)

    def uses_item(x):
        loss = (x @ w).sum()
        scale = loss.item()  # the line the error names
        return loss * scale

    def uses_float(x):
        loss = (x @ w).sum()
        return loss * float(loss)

    def branches(x):
        loss = (x @ w).sum()
        if loss > 0:
            return loss
        return -loss

    def uses_numpy(x):
        loss = (x @ w).sum()
        return loss * loss.numpy()

    for fn, op, text in [
        (uses_item, "item", "loss.item()"),
        (uses_float, "__float__", "float(loss)"),
        (branches, "__bool__", "if loss > 0"),
        (uses_numpy, "numpy", "loss.numpy()"),
    ]:
        message = _refused(fn, x, match=op)
        assert f"test_capture.py:{_line_of(fn, text)}" in message, message


def test_raw_read_back_of_a_captured_array_is_refused():
    def raw(x):
        y = x * 2.0
        return y * float(y.data.sum())

    message = _refused(raw, np.ones(3, np.float32), match="__float__")
    assert f"test_capture.py:{_line_of(raw, 'float(y.data.sum())')}" in message


def test_random_numbers_inside_are_refused():
    def noisy(x):
        return x + tm.randn(*x.shape)

    def noisy_rand(x):
        return x * tm.rand(3)

    assert f":{_line_of(noisy, 'tm.randn')}" in _refused(
        noisy, np.ones(3, np.float32), match="randn"
    )
    assert f":{_line_of(noisy_rand, 'tm.rand')}" in _refused(
        noisy_rand, np.ones(3, np.float32), match="rand"
    )


def test_stale_grad_from_before_the_step_is_refused():
    w = tm.tensor(np.ones(3, np.float32), requires_grad=True)
    (w * 2.0).sum().backward()  # w.grad exists before the step; the step accumulates into it
    x = np.ones(3, np.float32)

    def accumulates(x):
        (x * w).sum().backward()
        return w.grad * 1.0

    _refused(accumulates, x, match=r"\.grad .* before the step")
    assert type(w.data) is np.ndarray and type(w.grad.data) is np.ndarray


def test_assigning_data_is_refused():
    w = tm.tensor(np.ones(3, np.float32), requires_grad=True)

    def assigns(x):
        loss = (x * w).sum()
        w.data = w.data * 0.5
        return loss

    _refused(assigns, np.ones(3, np.float32), match=r"assigned \.data")
    assert type(w.data) is np.ndarray


def test_a_copy_through_tm_tensor_is_refused():
    def copies(x):
        return tm.tensor(x * 2.0) + 1.0

    _refused(copies, np.ones(3, np.float32), match=r"tm.tensor\(\)")


# --- the replay itself -----------------------------------------------------------------------


def test_replay_runs_no_op_and_builds_no_node(monkeypatch):
    w = tm.tensor(np.ones((3, 2), np.float32), requires_grad=True)
    opt = SGD([w], lr=0.1)

    def step(x):
        opt.zero_grad()
        loss = (tm.tanh(x @ w) ** 2).sum()
        loss.backward()
        opt.step()
        return loss

    captured = tm.capture(step)
    captured(np.ones((4, 3), np.float32))
    applied = []
    monkeypatch.setattr(function, "_capture_hook", lambda fn, ts, xs: applied.append(fn))
    loss = captured(np.full((4, 3), 0.5, np.float32))
    assert applied == [] and loss.grad_fn is None
    assert len(captured.program) > 0


def test_traced_arrays_do_not_leak():
    w = tm.tensor(np.ones((3, 2), np.float32), requires_grad=True)

    def step(x):
        loss = (x @ w).sum()
        loss.backward()
        return loss, w.grad

    loss, g = tm.capture(step)(np.ones((4, 3), np.float32))
    for t in (w, w.grad, loss, g):
        assert not isinstance(t.data, _Traced)


# --- the sinusoid example: --capture gives what --no-capture gives ------------------------------


@pytest.mark.parametrize(
    "algo, extra",
    [("maml", ["--first-order-iterations", "3"]), ("fomaml", []), ("metasgd", []),
     ("anil", []), ("learned-opt", [])],
)  # fmt: skip
def test_sinusoid_example_same_with_and_without_capture(algo, extra, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "maml_sinusoid.py"
    spec = importlib.util.spec_from_file_location("maml_sinusoid", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    runs = {}
    for flag in ("--capture", "--no-capture"):
        out = tmp_path / flag
        argv = ["--algo", algo, "--iterations", "8", "--meta-batch", "5", "--eval-tasks", "4",
                "--no-baseline", "--quiet", "--out", str(out), flag, *extra]  # fmt: skip
        metrics = example.main(argv)
        runs[flag] = (metrics["mse"], tm.load(out / "checkpoint.npz"))
    (mse_c, saved_c), (mse_e, saved_e) = runs["--capture"], runs["--no-capture"]
    assert mse_c == mse_e
    for part in ("model", "rule"):
        assert set(saved_c[part]) == set(saved_e[part])
        for k in saved_c[part]:
            assert np.array_equal(saved_c[part][k], saved_e[part][k]), f"{part} {k}"


def test_in_place_updates_and_item_assignment_replay_bit_identical():
    """A hand-written SGD update (in place, under no_grad) and x[i] = v inside the step."""

    def make_state():
        return {"params": _params({"w": (4, 3), "b": (3,)}, seed=8)}

    def make_step(state):
        w, b = state["params"]["w"], state["params"]["b"]

        def step(x):
            h = x @ w + b
            h[:, 0] = (x @ w)[:, 1] * 2.0  # recorded: h is not a leaf
            loss = (tm.tanh(h) ** 2).sum()
            gw, gb = tm.grad(loss, [w, b])
            with tm.no_grad():
                w.sub_(gw * 0.1)
                b.add_(gb, alpha=-0.1)
            return loss

        return step

    rng = np.random.default_rng(9)
    batches = [(rng.standard_normal((5, 4)).astype(np.float32),) for _ in range(ITERATIONS)]
    captured = _twins(make_state, make_step, batches)
    assert "version bump" in captured.program.names


def test_a_failing_step_leaves_nothing_behind():
    w = tm.tensor(np.ones(3, np.float32), requires_grad=True)

    def fails(x):
        (x * w).sum().backward()
        raise KeyError("planted")

    with pytest.raises(KeyError, match="planted"):
        tm.capture(fails)(np.ones(3, np.float32))
    assert function._capture_hook is None
    assert type(w.data) is np.ndarray and type(w.grad.data) is np.ndarray
    assert (w * 2.0).data.tolist() == [2.0, 2.0, 2.0]  # eager again


def test_capture_inside_capture_is_refused():
    inner = tm.capture(lambda x: x * 2.0)
    with pytest.raises(CaptureError, match="inside another captured step"):
        tm.capture(lambda x: inner(x) + 1.0)(np.ones(3, np.float32))


def test_batch_norm_running_statistics_replay_bit_identical():
    """Buffers read outside ops (running mean and variance, the batch counter) follow the
    replay: every tensor's array is traced while capturing."""
    from tinymeta import nn

    def make_state():
        tm.manual_seed(10)
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
        params = dict(model.named_parameters())
        state = {"model": model, "opt": SGD(list(params.values()), lr=0.1, momentum=0.5)}
        state["params"] = {**params, **{k: b for k, b in model.named_buffers()}}
        return state

    def make_step(state):
        model, opt = state["model"], state["opt"]

        def step(x):
            opt.zero_grad()
            loss = (model(x) ** 2).mean()
            loss.backward()
            opt.step()
            return loss

        return step

    rng = np.random.default_rng(11)
    batches = [(rng.standard_normal((4, 1, 5, 5)).astype(np.float32),) for _ in range(ITERATIONS)]
    _twins(make_state, make_step, batches)


def test_results_of_earlier_replays_keep_their_values():
    """No array a replay hands out is reused by the next one: gradients summed by the
    engine (w is used twice) that the step returns are new arrays every time."""
    w = tm.tensor(np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2), requires_grad=True)

    def step(x):
        h = tm.tanh(x @ w) * (x @ w)  # w used twice: its gradient is a sum of two
        (gw,) = tm.grad(h.sum(), w)
        return h.sum(), gw, gw * 2.0

    def step_backward(x):
        w.grad = None
        h = tm.tanh(x @ w) * (x @ w)
        h.sum().backward()  # w.grad: the engine's sum of two gradients, handed out as it is
        return h.sum()

    rng = np.random.default_rng(12)
    xs = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
    captured = tm.capture(step)
    kept = [captured(x) for x in xs]
    assert any(name == "numpy.add.__call__" for name in captured.program.names)
    for x, got in zip(xs, kept):
        for e, g in zip(step(tm.tensor(x)), got):
            assert np.array_equal(e.data, g.data)
    captured = tm.capture(step_backward)
    grads = []
    for x in xs:
        captured(x)
        grads.append(w.grad)
    for x, got in zip(xs, grads):
        step_backward(tm.tensor(x))
        assert np.array_equal(w.grad.data, got.data)


def test_lstm_training_step_replays_bit_identical():
    """W5's layer (one fused node with an array loop forward and a BPTT backward)."""
    from tinymeta import nn

    def make_state():
        tm.manual_seed(3)
        model = nn.LSTM(4, 8)
        params = dict(model.named_parameters())
        return {"params": params, "model": model, "opt": SGD(list(params.values()), lr=0.1)}

    def make_step(state):
        model, opt = state["model"], state["opt"]

        def step(x):
            opt.zero_grad()
            out, _ = model(x)
            loss = (out**2).mean()
            loss.backward()
            opt.step()
            return loss

        return step

    rng = np.random.default_rng(13)
    batches = [(rng.standard_normal((5, 3, 4)).astype(np.float32),) for _ in range(ITERATIONS)]
    _twins(make_state, make_step, batches)
