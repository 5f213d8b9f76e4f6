"""W5 of benchmarks/README.md: an LSTM, tinymeta vs PyTorch's CPU LSTM, in the same process.

nn.LSTM(32, 128), sequence 50, batch 32, float32:

  fwd+bwd   forward, then backward of the summed output (gradients of every parameter);
  maml2     a second-order MAML meta-gradient through it: 8 tasks, each one inner SGD step
            (lr 0.1) on the MSE of the last step's output against a target, then the query
            MSE after the step; the meta-gradient of the mean query loss. Both libraries loop
            over the tasks with grad(..., create_graph=True) (as learn2learn and higher do);
            tinymeta also runs the tasks as one batched computation (a leading task axis,
            ``maml2-vec``), which PyTorch's nn.LSTM has no equivalent of.

``numpy-floor`` is the fwd+bwd written by hand on arrays with the same kernels (no graph, no
tensors): how much of tinymeta's time is the framework's.

Before timing, the script checks in float64 that the two libraries compute the same output,
parameter gradients and meta-gradient from the same weights and data. Ratios are
tinymeta / PyTorch of the medians, both run with the same thread count.

    python benchmarks/bench_lstm.py --threads 1 --repeats 30 --warmup 3
    python benchmarks/bench_lstm.py --threads 1 --clock cpu       # steadier on a busy machine
    python benchmarks/bench_lstm.py --profile fwd+bwd             # where tinymeta's time goes
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    base_parser,
    describe_machine,
    matmul_gflops,
    median,
    noise_warning,
    setup_threads,
    spread,
    time_interleaved,
)

L, N, I, H = 50, 32, 32, 128  # sequence, batch, input, hidden
TASKS, INNER_LR = 8, 0.1
NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def make_data(np, dtype):
    rng = np.random.default_rng(0)
    bound = 1.0 / np.sqrt(H)
    shapes = [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]
    params = {n: rng.uniform(-bound, bound, s).astype(dtype) for n, s in zip(NAMES, shapes)}
    x = rng.standard_normal((L, N, I)).astype(dtype)
    tasks = rng.standard_normal((4, TASKS, L, N, I)).astype(dtype)  # xs, ys-source, xq, yq-src
    xs, xq = tasks[0], tasks[2]
    ys = np.tanh(tasks[1][:, -1, :, :1]) * np.ones((1, 1, H), dtype)  # (T, N, H) targets
    yq = np.tanh(tasks[3][:, -1, :, :1]) * np.ones((1, 1, H), dtype)
    return params, x, (xs, ys.astype(dtype), xq, yq.astype(dtype))


# --- tinymeta -------------------------------------------------------------------------------


class Tinymeta:
    def __init__(self, tm, params, x, tasks):
        from tinymeta import nn

        self.tm, self.nn = tm, nn
        dtype = params[NAMES[0]].dtype
        self.model = nn.LSTM(I, H, dtype=dtype)
        self.model.load_state_dict({k: tm.tensor(v) for k, v in params.items()})
        self.params = dict(self.model.named_parameters())
        self.x = tm.tensor(x)
        self.tasks = [tm.tensor(a) for a in tasks]

    def fwd_bwd(self):
        for p in self.params.values():
            p.grad = None
        out, _ = self.model(self.x)
        out.sum().backward()
        return [self.params[n].grad.numpy() for n in NAMES], out.numpy()

    def _loss(self, params, x, y):
        out, _ = self.nn.functional_call(self.model, params, x)
        d = out[..., -1, :, :] - y
        return (d * d).mean()

    def maml2(self):
        tm = self.tm
        names = list(self.params)
        xs, ys, xq, yq = self.tasks
        total = None
        for t in range(TASKS):
            support = self._loss(self.params, xs[t], ys[t])
            grads = tm.grad(support, list(self.params.values()), create_graph=True)
            fast = {n: p - INNER_LR * g for n, p, g in zip(names, self.params.values(), grads)}
            query = self._loss(fast, xq[t], yq[t])
            total = query if total is None else total + query
        meta = tm.grad(total / TASKS, list(self.params.values()))
        return [g.numpy() for g in meta]

    def maml2_vec(self):
        """All tasks at once: per-task parameter copies (T, ...) and inputs (T, L, N, I); the
        sum of the tasks' support losses has each task's own gradient for its copy."""
        tm = self.tm
        from tinymeta.meta import per_task

        xs, ys, xq, yq = self.tasks
        names = list(self.params)
        copies = per_task(self.params, TASKS)
        support = self._loss(copies, xs, ys) * TASKS
        grads = tm.grad(support, [copies[n] for n in names], create_graph=True)
        fast = {n: copies[n] - INNER_LR * g for n, g in zip(names, grads)}
        query = self._loss(fast, xq, yq)  # the mean over tasks of the query MSEs
        meta = tm.grad(query, list(self.params.values()))
        return [g.numpy() for g in meta]


# --- the NumPy floor: the same math with no framework ------------------------------------------


class NumpyFloor:
    """fwd+bwd of the summed output written by hand on arrays with tinymeta's kernels: what
    tinymeta's layer costs without its graph, tensors and ops (the framework's floor)."""

    def __init__(self, np, params, x):
        from tinymeta import kernels

        self.np, self.kernels, self.x = np, kernels, x
        self.w_ih, self.w_hh = params["weight_ih_l0"], params["weight_hh_l0"]
        self.b = params["bias_ih_l0"] + params["bias_hh_l0"]

    def fwd_bwd(self):
        np, k, x = self.np, self.kernels, self.x
        gi = (x.reshape(-1, I) @ self.w_ih.T + self.b).reshape(L, N, 4 * H)
        wt = np.ascontiguousarray(self.w_hh.T)
        h = c = np.zeros((N, H), x.dtype)
        gates, hs, cs = np.empty_like(gi), [h], [c]
        for t in range(L):
            np.matmul(h, wt, out=gates[t])
            gates[t] += gi[t]
            h, c = k.lstm_pointwise_forward(gates[t], c)
            hs.append(h)
            cs.append(c)
        dh, dc = np.zeros_like(h), np.zeros_like(c)
        dgates = np.empty_like(gates)
        for t in reversed(range(L)):
            dgates[t], dc = k.lstm_pointwise_backward(gates[t], cs[t], 1.0 + dh, dc)
            dh = dgates[t] @ self.w_hh
        dg = dgates.reshape(-1, 4 * H)
        g_ih = dg.T @ x.reshape(-1, I)
        g_hh = dg.T @ np.stack(hs[:-1]).reshape(-1, H)
        g_b = dg.sum(axis=0)
        return [g_ih, g_hh, g_b, g_b], np.stack(hs[1:])


# --- PyTorch --------------------------------------------------------------------------------


class Torch:
    def __init__(self, torch, params, x, tasks):
        self.torch = torch
        dtype = torch.float64 if params[NAMES[0]].dtype.itemsize == 8 else torch.float32
        self.model = torch.nn.LSTM(I, H).to(dtype)
        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
        self.params = dict(self.model.named_parameters())
        self.x = torch.from_numpy(x.copy())
        self.tasks = [torch.from_numpy(a.copy()) for a in tasks]

    def fwd_bwd(self):
        self.model.zero_grad(set_to_none=True)
        out, _ = self.model(self.x)
        out.sum().backward()
        return [self.params[n].grad.numpy() for n in NAMES], out.detach().numpy()

    def _loss(self, params, x, y):
        out, _ = self.torch.func.functional_call(self.model, params, (x,))
        return ((out[-1] - y) ** 2).mean()

    def maml2(self):
        torch = self.torch
        names = list(self.params)
        xs, ys, xq, yq = self.tasks
        total = None
        for t in range(TASKS):
            support = self._loss(self.params, xs[t], ys[t])
            grads = torch.autograd.grad(support, list(self.params.values()), create_graph=True)
            fast = {n: p - INNER_LR * g for n, p, g in zip(names, self.params.values(), grads)}
            query = self._loss(fast, xq[t], yq[t])
            total = query if total is None else total + query
        meta = torch.autograd.grad(total / TASKS, list(self.params.values()))
        return [g.numpy() for g in meta]


# --- checks and timing ----------------------------------------------------------------------


def check(np, tm, torch) -> None:
    """float64: the same output, gradients and meta-gradients (looped and vectorized)."""
    params, x, tasks = make_data(np, np.float64)
    ours, theirs = Tinymeta(tm, params, x, tasks), Torch(torch, params, x, tasks)
    (g_ours, out_ours), (g_theirs, out_theirs) = ours.fwd_bwd(), theirs.fwd_bwd()
    g_floor, out_floor = NumpyFloor(np, params, x).fwd_bwd()
    for out in (out_ours, out_floor):
        np.testing.assert_allclose(out, out_theirs, rtol=1e-10, atol=1e-12)
    for a, b, c in zip(g_ours, g_theirs, g_floor):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(c, b, rtol=1e-9, atol=1e-11)
    m_theirs = theirs.maml2()
    for name, m_ours in (("looped", ours.maml2()), ("vectorized", ours.maml2_vec())):
        for a, b in zip(m_ours, m_theirs):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12, err_msg=name)
    print("  check: float64 outputs, gradients and second-order meta-gradients agree with PyTorch")


def profile(tm, np, which: str, steps: int = 20) -> None:
    import cProfile
    import pstats

    params, x, tasks = make_data(np, np.float32)
    ours = Tinymeta(tm, params, x, tasks)
    fn = {"fwd+bwd": ours.fwd_bwd, "maml2": ours.maml2, "maml2-vec": ours.maml2_vec}[which]
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=30, warmup=3)
    parser.add_argument("--maml-repeats", type=int, default=None, help="repeats of maml2")
    parser.add_argument("--profile", choices=("fwd+bwd", "maml2", "maml2-vec"), default=None)
    args = parser.parse_args()
    threads = setup_threads(args.threads)

    import numpy as np

    import tinymeta as tm

    if args.profile:
        profile(tm, np, args.profile)
        return
    import torch

    torch.set_num_threads(threads)
    print(f"W5: LSTM({I}, {H}), sequence {L}, batch {N}, float32; MAML: {TASKS} tasks, 1 step")
    print(describe_machine(threads, args.clock), f"torch {torch.__version__}")
    print(f"  kernels: {tm.kernels.backend()}; numpy float32 matmul {matmul_gflops():.1f} GFLOP/s")
    check(np, tm, torch)

    params, x, tasks = make_data(np, np.float32)
    ours, theirs = Tinymeta(tm, params, x, tasks), Torch(torch, params, x, tasks)
    groups = [
        (
            "fwd+bwd",
            {
                "tinymeta": ours.fwd_bwd,
                "numpy-floor": NumpyFloor(np, params, x).fwd_bwd,
                "torch": theirs.fwd_bwd,
            },
            args.repeats,
        ),
        (
            "maml2",
            {"tinymeta": ours.maml2, "tinymeta-vec": ours.maml2_vec, "torch": theirs.maml2},
            args.maml_repeats or max(5, args.repeats // 3),
        ),
    ]
    for label, fns, repeats in groups:
        samples = time_interleaved(fns, repeats=repeats, warmup=args.warmup, clock=args.clock)
        base = median(samples["torch"])
        print(f"{label}:")
        for name, xs in samples.items():
            ratio = "" if name == "torch" else f"   {median(xs) / base:.2f}x torch"
            iqr = spread([1e3 * v for v in xs])
            print(f"  {name:13s} {median(xs) * 1e3:8.2f} ms  (IQR {iqr}){ratio}")
        warning = noise_warning(samples)
        if warning:
            print("  " + warning)


if __name__ == "__main__":
    main()
