"""tm.capture on cuda: the step becomes CUDA graphs (tinymeta/cuda_graph.py).

The first part runs everywhere: the host-side logic (what a run of the step records, the
replay plan made from it, what is refused) on real CPU steps, as a run on cuda makes it.
The second part is marked ``gpu`` and skipped without CuPy and a GPU: each workload captured
and replayed three times against the same step run eagerly on cuda from equal states,
compared with ``array_equal`` (the same kernels in the same order: bit for bit).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

# The CPU capture's steps, checked here on cuda (tests/ is on sys.path, as for cuda_emulator).
from test_capture import _mlp, _params, w3_case, w4_case  # noqa: E402

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import cuda_graph, function, kernels, meta
from tinymeta.capture import CaptureError
from tinymeta.optim import SGD, Adam

HAVE_CUDA = tm.cuda.is_available()


def on_gpu(test):
    """A cuda case: marked gpu, skipped without CuPy and a GPU (see tests/conftest.py)."""
    skip = pytest.mark.skipif(not HAVE_CUDA, reason="needs CuPy and a CUDA GPU")
    return pytest.mark.gpu(skip(test))


ITERATIONS = 4  # the warm-up, the capture, two replays
W1_SHAPES = {"w1": (40, 1), "b1": (40,), "w2": (40, 40), "b2": (40,), "w3": (1, 40), "b3": (1,)}


def _sinusoid_batches(n, tasks=5, k=10, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        amp, phase = rng.uniform(0.1, 5, (tasks, 1, 1)), rng.uniform(0, np.pi, (tasks, 1, 1))
        xs, xq = (rng.uniform(-5, 5, (tasks, k, 1)) for _ in range(2))
        batch = (xs, amp * np.sin(xs - phase), xq, amp * np.sin(xq - phase))
        out.append(tuple(a.astype(np.float32) for a in batch))
    return out


def _maml_step(params, opt, steps=1, first_order=False, rule=0.01):
    def step(xs, ys, xq, yq):
        opt.zero_grad()
        loss = meta.maml_loss(
            _mlp, params, (xs, ys), (xq, yq), F.mse_loss, rule, steps, first_order=first_order
        )
        loss.backward()
        opt.step()
        return loss

    return step


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _host_run(step, args, mode="warm-up"):
    """Run ``step`` on CPU tensors as a run on cuda records it; returns (result, facts)."""
    facts = cuda_graph.Facts(mode, lambda a: isinstance(a, np.ndarray))
    result = cuda_graph.run(step, args, facts)
    assert function._capture_hook is None
    return result, facts


# --- host-side logic, on the CPU ------------------------------------------------------------------


def test_a_recorded_run_computes_what_the_eager_step_computes():
    batch = [tm.tensor(a) for a in _sinusoid_batches(1)[0]]
    params_a, params_b = _params(W1_SHAPES), _params(W1_SHAPES)
    eager = _maml_step(params_a, Adam(list(params_a.values()), lr=1e-3))(*batch)
    recorded, _ = _host_run(_maml_step(params_b, Adam(list(params_b.values()), lr=1e-3)), batch)
    assert np.array_equal(eager.data, recorded.data)
    for k in W1_SHAPES:
        assert np.array_equal(params_a[k].data, params_b[k].data), k
        assert np.array_equal(params_a[k].grad.data, params_b[k].grad.data), k


def test_the_plan_of_a_maml_step():
    """Watched: the parameters (read by ops, not inputs); .grad: each parameter's, as the step
    left it; the optimizer step bound to those gradients; the result's array."""
    batch = [tm.tensor(a) for a in _sinusoid_batches(1)[0]]
    params = _params(W1_SHAPES)
    opt = Adam(list(params.values()), lr=1e-3)
    loss, facts = _host_run(_maml_step(params, opt), batch, mode="capture")
    before = {k: p.data.copy() for k, p in params.items()}
    p = cuda_graph.plan(facts, loss, dict(enumerate(batch)), [b.data for b in batch])
    assert {id(ref()) for ref, _ in p.watched} == {id(t) for t in params.values()}
    assert all(a is ref()._data for ref, a in p.watched)
    grads = {id(ref()): g for ref, g in p.grads}
    assert set(grads) == {id(t) for t in params.values()}
    assert all(grads[id(t)] is t.grad._data for t in params.values())
    ((stepped, bindings),) = p.steps
    assert stepped is opt and [ref() for ref, _ in bindings] == list(params.values())
    assert all(g is ref().grad._data for ref, g in bindings)
    assert p.outputs == ("tensor", loss._data)
    # in a capture the optimizer step is recorded, not run: it runs after the graphs
    assert all(np.array_equal(before[k], params[k].data) for k in params)
    assert opt.state == {}


def test_the_plan_watches_what_the_step_reads_and_nothing_else():
    params = _params(W1_SHAPES)
    unrelated = tm.tensor(np.ones(3, np.float32), requires_grad=True)
    x = tm.tensor(np.ones((4, 1), np.float32))

    def step(x):
        return _mlp(params, x).sum()

    result, facts = _host_run(step, [x])
    p = cuda_graph.plan(facts, result, {0: x}, [x.data])
    watched = {id(ref()) for ref, _ in p.watched}
    assert id(unrelated) not in watched and id(x) not in watched
    assert watched == {id(t) for t in params.values()}
    assert cuda_graph._state_unchanged(p)
    params["w2"].data = params["w2"].data.copy()  # a new array: the graphs read the old one
    assert not cuda_graph._state_unchanged(p)


def test_label_checks_run_before_the_launch_on_input_labels():
    params = _params({"w": (3, 4)})
    opt = SGD(list(params.values()), lr=0.1)
    x = tm.tensor(np.ones((5, 4), np.float32))
    y = tm.tensor(np.array([[0, 1, 2, 0, 1]]))

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(x @ params["w"].T, y.reshape(-1))  # a view of the input
        loss.backward()
        opt.step()
        return loss

    loss, facts = _host_run(step, [x, y], mode="capture")
    p = cuda_graph.plan(facts, loss, {0: x, 1: y}, [x.data, y.data])
    ((labels, n, c, op),) = p.label_checks
    assert (n, c) == (5, 3) and cuda_graph._root(labels) is y.data


def test_labels_the_step_computes_are_refused_with_the_line():
    x = tm.tensor(np.ones((5, 4), np.float32), requires_grad=True)
    y = tm.tensor(np.array([0, 1, 2, 0, 1]))

    def step(x, y):
        return F.cross_entropy(x[:, :3], y * 1)

    loss, facts = _host_run(step, [x, y], mode="capture")
    with pytest.raises(CaptureError, match=f"labels the step computes.*:{_line_of(step, 'y * 1')}"):
        cuda_graph.plan(facts, loss, {0: x, 1: y}, [x.data, y.data])


def test_reading_a_stale_grad_is_refused_with_the_line():
    w = tm.tensor(np.ones((3, 1), np.float32), requires_grad=True)
    x = tm.tensor(np.ones((2, 3), np.float32))
    (x @ w).sum().backward()  # a .grad from before the step

    def accumulates(x):
        (x @ w).sum().backward()  # no zero_grad: adds into the old .grad

    def accumulates_differentiably(x):
        (x @ w).sum().backward(create_graph=True)

    for step, text in ((accumulates, ".backward()"), (accumulates_differentiably, "create_graph")):
        line = _line_of(step, text)
        with pytest.raises(CaptureError, match=f"before the step started.*:{line}"):
            _host_run(step, [x])


def test_reading_a_parameter_after_the_optimizer_step_is_refused():
    w = tm.tensor(np.ones((3, 1), np.float32), requires_grad=True)
    opt = SGD([w], lr=0.1)

    def step(x):
        opt.zero_grad()
        (x @ w).sum().backward()
        opt.step()
        return (x @ w).sum()  # reads w after the update

    x = tm.tensor(np.ones((2, 3), np.float32))
    with pytest.raises(CaptureError, match=f"after SGD.step.*:{_line_of(step, 'return')}"):
        _host_run(step, [x])


def test_read_backs_and_random_draws_are_refused_with_the_line():
    def uses_item(x):
        return x * (x.sum().item())

    def draws(x):
        return x + tm.randn(*x.shape)

    def draws_numpy(x):
        return x + tm.tensor(np.random.randn(3).astype(np.float32))

    x = tm.tensor(np.ones(3, np.float32))
    for step, text, what in (
        (uses_item, "item()", "item"),
        (draws, "randn", "randn"),
        (draws_numpy, "np.random", "randn"),
    ):
        with pytest.raises(CaptureError, match=f"{what}.*:{_line_of(step, text)}"):
            _host_run(step, [x])


def test_a_step_returning_an_array_is_refused():
    x = tm.tensor(np.ones(3, np.float32))
    result, facts = _host_run(lambda x: (x * 2).data, [x])
    with pytest.raises(CaptureError, match="returns an array"):
        cuda_graph.plan(facts, result, {0: x}, [x.data])


def test_a_library_refusal_while_capturing_names_the_user_line():
    def refuses():
        raise NotImplementedError(
            "calling cuBLAS API during stream capture is currently unsupported"
        )

    def step():
        refuses()

    try:
        step()
    except NotImplementedError as e:
        error = cuda_graph._explained(e)
    assert isinstance(error, CaptureError)
    assert f":{_line_of(refuses, 'raise')}" in str(error) and "cuBLAS" in str(error)
    assert cuda_graph._explained(ValueError("a user's error")).__class__ is ValueError
    # CuPy's compiled frames name relative .pyx files: never taken for the user's line
    assert cuda_graph._is_library("cupy/_core/core.pyx") and not cuda_graph._is_library(__file__)


def test_a_forward_run_between_graphs_takes_the_matmul_setting_of_its_capture():
    """A product run eagerly between two graphs (cuBLAS, captured under "cublas") is done so on
    every replay, even after the setting changed (the kernel's bits would differ); its result
    is copied into the array the capture made, and the setting is left as it was."""

    class Node:
        def forward(self, a, b):
            self.setting = kernels.cuda_matmul_setting()
            return a @ b

    node, static = Node(), np.zeros((2, 2))
    a, b = np.arange(4.0).reshape(2, 2), np.ones((2, 2))
    run = cuda_graph._eager_forward(np, node, [a, b], (static,), {}, "cublas")
    previous = kernels.set_cuda_matmul("kernel")
    try:
        run()
        assert node.setting == "cublas" and kernels.cuda_matmul_setting() == "kernel"
    finally:
        kernels.set_cuda_matmul(previous)
    assert np.array_equal(static, a @ b)


def test_cpu_inputs_take_the_cpu_path():
    x = np.ones(3, np.float32)
    assert not cuda_graph.on_cuda([x, tm.tensor(x), 2.0, "flag"])
    step = tm.capture(lambda x: x * 2)
    step(x)
    assert not isinstance(step.program, cuda_graph.GraphProgram)


# The CuPy calls of the cuda path (tinymeta/cuda_graph.py, kernels/cuda_launch.py) as CuPy's
# compiled classes state them: the first line of their docstrings (Cython's embedded signature).
CUPY_SIGNATURES = {
    "cuda.Stream.__init__": "(self, null=False, non_blocking=False, ptds=False, priority=None)",
    "cuda.Stream.begin_capture": "begin_capture(self, mode=None)",
    "cuda.Stream.end_capture": "end_capture(self)",
    "cuda.Stream.is_capturing": "is_capturing(self)",
    "cuda.Stream.wait_event": "wait_event(self, event)",
    "cuda.Stream.record": "record(self, event=None)",
    "cuda.graph.Graph.launch": "launch(self, stream=None)",
    "RawModule": "RawModule(str code=None, *, str path=None, tuple options=(),",
    "RawModule.get_function": "get_function(self, str name)",
    "RawKernel.__call__": "__call__(self, grid, block, args, **kwargs)",
}
CUPY_FUNCTIONS = (
    "cuda.MemoryPool.malloc", "cuda.MemoryPool.free_all_blocks", "cuda.MemoryPool.used_bytes",
    "cuda.using_allocator", "cuda.get_current_stream", "copyto", "asnumpy", "asarray", "zeros",
    "empty",
)  # fmt: skip


def _cupy_attribute(cupy, dotted: str):
    for name in dotted.split("."):
        cupy = getattr(cupy, name)
    return cupy


def test_the_cupy_calls_of_the_cuda_path_exist_as_called():
    """Runs wherever CuPy imports (a GPU is not needed): the installed CuPy has each call with
    the parameters the cuda path passes, and a capture's default mode is the relaxed one."""
    cupy = pytest.importorskip("cupy", reason="needs CuPy (pip install 'tinymeta[cuda]')")
    for dotted, signature in CUPY_SIGNATURES.items():
        doc = _cupy_attribute(cupy, dotted).__doc__ or ""
        assert signature in doc.split("\n")[0], (dotted, doc.split("\n")[0])
    for dotted in CUPY_FUNCTIONS:
        assert callable(_cupy_attribute(cupy, dotted)), dotted
    assert "streamCaptureModeRelaxed" in cupy.cuda.Stream.begin_capture.__doc__


# --- on a GPU ------------------------------------------------------------------------------------


def _cuda_twins(make_state, make_step, batches):
    """The same steps eagerly on cuda and captured on cuda, from equal states: equal results,
    parameters and gradients after every iteration (the warm-up, the capture, replays)."""
    import cupy

    eager_state, captured_state = make_state(), make_state()
    eager, captured = make_step(eager_state), tm.capture(make_step(captured_state))
    for i, batch in enumerate(batches):
        expected = eager(*[tm.tensor(a, device="cuda") for a in batch])
        got = captured(*[cupy.asarray(a) for a in batch])
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        for e, g in zip(expected, got):
            assert isinstance(g.data, cupy.ndarray) and g.grad_fn is None
            _assert_equal(e.data, g.data, f"iteration {i}: result")
        pairs = zip(eager_state["params"].items(), captured_state["params"].values())
        for (k, pe), pc in pairs:
            _assert_equal(pe.data, pc.data, f"iteration {i}: parameter {k}")
            if pe.grad is None:
                assert pc.grad is None
            else:
                _assert_equal(pe.grad.data, pc.grad.data, f"iteration {i}: grad {k}")
    assert captured.captures == 1
    assert captured.program.replay_list is not None
    assert function._capture_hook is None
    return captured


def _assert_equal(a, b, what):
    a, b = tm.backend.to_numpy(a), tm.backend.to_numpy(b)
    diff = np.max(np.abs(a.astype(np.float64) - b)) if a.size else 0.0
    assert np.array_equal(a, b), f"{what} differs (max abs diff {diff:.3g})"


@on_gpu
@pytest.mark.parametrize("steps, first_order", [(1, False), (2, False), (1, True)])
def test_cuda_w1_maml_adam(steps, first_order):
    def make_state():
        params = _params(W1_SHAPES, device="cuda")
        return {"params": params, "opt": Adam(list(params.values()), lr=1e-3)}

    def make_step(state):
        return _maml_step(state["params"], state["opt"], steps, first_order)

    _cuda_twins(make_state, make_step, _sinusoid_batches(ITERATIONS))


@on_gpu
@pytest.mark.parametrize("setting", ["auto", "kernel", "cublas"])
def test_cuda_w1_is_one_graph_when_its_matmuls_take_the_kernel(setting):
    """With the matmul kernel (W1's products are all small: "auto" takes it) the whole
    meta-iteration is one CUDA graph, nothing run eagerly between graphs; with cuBLAS a chain
    of graphs with the matmuls between. Either way bit for bit the eager step's."""

    def make_state():
        params = _params(W1_SHAPES, device="cuda")
        return {"params": params, "opt": Adam(list(params.values()), lr=1e-3)}

    def make_step(state):
        return _maml_step(state["params"], state["opt"], steps=2)

    previous = kernels.set_cuda_matmul(setting)
    try:
        program = _cuda_twins(make_state, make_step, _sinusoid_batches(ITERATIONS)).program
    finally:
        kernels.set_cuda_matmul(previous)
    if setting == "cublas":
        assert program.graphs > 1 and program.eager_forwards == program.graphs - 1
    else:
        assert (program.graphs, program.eager_forwards) == (1, 0)
    assert program.names[0] == f"{program.graphs} CUDA graph(s)"


@on_gpu
def test_cuda_w1_meta_sgd_learned_rates():
    def make_state():
        params = _params(W1_SHAPES, device="cuda")
        rule = meta.MetaSGD(params, init_lr=0.01)
        everything = dict(params)
        everything.update({f"lr.{k}": v for k, v in rule.named_parameters().items()})
        return {"params": everything, "model": params, "rule": rule,
                "opt": Adam(list(everything.values()), lr=1e-3)}  # fmt: skip

    def make_step(state):
        return _maml_step(state["model"], state["opt"], rule=state["rule"])

    _cuda_twins(make_state, make_step, _sinusoid_batches(ITERATIONS))


@on_gpu
def test_cuda_w3_mlp_sgd_momentum():
    _cuda_twins(*w3_case(device="cuda"))


@on_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_w4_double_backward(dtype):
    _cuda_twins(*w4_case(dtype, device="cuda"))


def _cuda_linear_step():
    w = tm.tensor(np.ones((3, 1), np.float32), device="cuda", requires_grad=True)
    opt = SGD([w], lr=0.1)

    def step(x):
        opt.zero_grad()
        loss = ((x @ w) * (x @ w)).mean()
        loss.backward()
        opt.step()
        return loss

    return step, w


@on_gpu
def test_cuda_new_shape_captures_again_or_raises():
    import cupy

    step, _ = _cuda_linear_step()
    captured = tm.capture(step)
    for n in (4, 4, 4, 6, 6, 6):
        captured(cupy.ones((n, 3), np.float32))
    assert captured.captures == 2 and captured.program.key[0][1] == (6, 3)
    strict = tm.capture(_cuda_linear_step()[0], on_change="raise")
    strict(cupy.ones((4, 3), np.float32))
    with pytest.raises(CaptureError, match="captured for inputs"):
        strict(cupy.ones((5, 3), np.float32))


@on_gpu
def test_cuda_mixed_devices_are_refused():
    import cupy

    with pytest.raises(CaptureError, match="different devices"):
        tm.capture(lambda a, b: a + b)(cupy.ones(3), np.ones(3))


@on_gpu
def test_cuda_item_and_random_draws_are_refused_with_the_line():
    import cupy

    def uses_item(x):
        return x * x.sum().item()

    def draws(x):
        return x + tm.tensor(cupy.random.rand(3), device="cuda")

    x = cupy.ones(3)
    for step, text in ((uses_item, "item()"), (draws, "cupy.random")):
        with pytest.raises(CaptureError, match=f":{_line_of(step, text)}"):
            tm.capture(step)(x)
    assert function._capture_hook is None


@on_gpu
def test_cuda_host_synchronisation_is_refused_when_capturing():
    """float() of a raw CuPy array syncs with the device: eagerly (the warm-up) it works, in a
    capture the driver refuses it, and the error names the line; the stream stays usable."""
    import cupy

    def syncs(x):
        return x * float(x.data.sum())

    captured = tm.capture(syncs)
    captured(cupy.ones(3))
    with pytest.raises(CaptureError, match=f":{_line_of(syncs, 'float(')}"):
        captured(cupy.ones(3))
    assert not cupy.cuda.get_current_stream().is_capturing()
    assert float((cupy.ones(3) * 2).sum()) == 6.0


@on_gpu
def test_cuda_replays_leave_other_arrays_and_earlier_results_alone():
    """The graphs write only memory of their own pool: an array made between replays keeps
    its values, and so do the results and .grad handed out by earlier replays."""
    import cupy

    step, w = _cuda_linear_step()
    captured = tm.capture(step)
    rng = np.random.default_rng(8)
    xs = [cupy.asarray(rng.standard_normal((64, 3)).astype(np.float32)) for _ in range(6)]
    captured(xs[0])
    captured(xs[1])  # captured here
    outsiders = [cupy.arange(n, dtype=np.float32) for n in (1, 3, 64, 192, 4096)]
    expected = [a.get() for a in outsiders]
    loss, grad = captured(xs[2]), w.grad
    kept_loss, kept_grad = loss.data.get(), grad.data.get()
    for x in xs[3:]:
        captured(x)
    for a, e in zip(outsiders, expected):
        assert np.array_equal(a.get(), e)
    assert np.array_equal(loss.data.get(), kept_loss)
    assert np.array_equal(grad.data.get(), kept_grad)
    assert w.grad is not grad
