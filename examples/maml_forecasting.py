"""MAML with a recurrent base learner: few-shot forecasting of sinusoidal time series.

A task is a series y_t = A sin(w t dt + phase) with A ~ U[0.1, 5], phase ~ U[0, pi],
w ~ U[0.5, 2] and dt = 0.3. An example is a window of ``--window`` consecutive observations
and the value that follows it; a task shows K such windows (the support set) and is scored on
K other windows (the query set). The base learner is an LSTM(1, 40) that reads the window
and a Linear head on its last state. It is meta-trained with second-order MAML (one inner SGD
step on the support MSE, backpropagation through time inside the inner gradient), all tasks of
a meta-batch as one task-axis computation.

    python examples/maml_forecasting.py                          # a few minutes on 2 cores
    python examples/maml_forecasting.py --iterations 5000 --shots 5

Writes metrics.json (query MSE on 600 held-out tasks after 0, 1, 5 and 10 inner steps, for
the meta-learned start and for the same network trained jointly on all tasks) and, with
matplotlib, a before/after figure: a held-out task's series and the network's forecasts
(rolled out from the last support window) before and after adapting on the support windows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tinymeta as tm
from tinymeta import meta, nn
from tinymeta.optim import Adam

EVAL_STEPS = (0, 1, 5, 10)
DT = 0.3
SCALE = 0.2  # series values enter the network at a fifth of their size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Second-order MAML through an LSTM forecaster.")
    p.add_argument("--shots", type=int, default=10, help="K support (and query) windows")
    p.add_argument("--window", type=int, default=10, help="observations per window")
    p.add_argument("--hidden", type=int, default=40)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--baseline-steps", type=int, default=1500)
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--eval-seed", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/forecasting"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


class Forecaster(nn.Module):
    """The next value of a window (..., N, L, 1): Linear(LSTM's last h)."""

    def __init__(self, hidden: int, rng):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True, rng=rng)
        self.head = nn.Linear(hidden, 1, rng=rng)

    def forward(self, x):
        out, _ = self.lstm(x * SCALE)
        return self.head(out[..., -1, :]) / SCALE


def sample_tasks(rng, tasks: int, shots: int, window: int):
    """Support and query windows (T, K, L, 1) with their next values (T, K, 1), float32, and
    the tasks' (amplitude, phase, frequency)."""
    amp = rng.uniform(0.1, 5.0, tasks)
    phase = rng.uniform(0.0, np.pi, tasks)
    freq = rng.uniform(0.5, 2.0, tasks)
    starts = rng.uniform(0.0, 10.0, (tasks, 2 * shots))  # window start times
    t = starts[..., None] + DT * np.arange(window + 1)  # (T, 2K, L + 1)
    y = amp[:, None, None] * np.sin(freq[:, None, None] * t + phase[:, None, None])
    x, target = y[..., :window, None], y[..., window, None]
    arrays = [a.astype(np.float32) for a in (x[:, :shots], target[:, :shots],
                                              x[:, shots:], target[:, shots:])]  # fmt: skip
    return arrays, np.stack([amp, phase, freq], axis=1)


def mse(pred, target):
    return ((pred - target) ** 2).mean()


def forward_fn(model):
    def forward(p, x):
        return nn.functional_call(model, p, x)

    return forward


def meta_train(model, args, progress=True) -> list:
    rng = np.random.default_rng(args.seed)
    params = dict(model.named_parameters())
    outer = Adam(list(params.values()), lr=args.meta_lr)
    rule = meta.InnerSGD(args.inner_lr)
    losses = []
    for _ in tqdm(range(args.iterations), desc="maml", disable=not progress, mininterval=1):
        data, _ = sample_tasks(rng, args.meta_batch, args.shots, args.window)
        xs, ys, xq, yq = (tm.tensor(a) for a in data)
        outer.zero_grad()
        loss = meta.maml_loss(forward_fn(model), params, (xs, ys), (xq, yq), mse, rule, 1)
        loss.backward()
        outer.step()
        losses.append(loss.item())
    return losses


def pretrain(model, args, progress=True) -> None:
    """The baseline: the same network trained on all tasks' windows jointly."""
    rng = np.random.default_rng(args.seed + 1)
    opt = Adam(list(model.parameters()), lr=args.meta_lr)
    for _ in tqdm(range(args.baseline_steps), desc="baseline", disable=not progress):
        data, _ = sample_tasks(rng, args.meta_batch, args.shots, args.window)
        x = tm.tensor(np.concatenate([data[0], data[2]], axis=1).reshape(-1, args.window, 1))
        y = tm.tensor(np.concatenate([data[1], data[3]], axis=1).reshape(-1, 1))
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()


def evaluate(model, args) -> dict:
    """Mean query MSE (and 95% interval) over the held-out tasks after 0..10 inner steps."""
    data, _ = sample_tasks(
        np.random.default_rng(args.eval_seed), args.eval_tasks, args.shots, args.window
    )
    xs, ys, xq, yq = (tm.tensor(a) for a in data)
    forward = forward_fn(model)
    n = len(data[0])
    path = meta.adapt(
        lambda p: mse(forward(p, xs), ys) * n,
        meta.per_task(dict(model.named_parameters()), n),
        meta.InnerSGD(args.inner_lr), max(EVAL_STEPS), first_order=True, trajectory=True,
    )  # fmt: skip
    out = {"mean": {}, "ci95": {}}
    with tm.no_grad():
        for s in EVAL_STEPS:
            per_task = ((forward(path[s], xq) - yq) ** 2).mean(axis=(1, 2)).numpy()
            out["mean"][str(s)] = float(per_task.mean())
            out["ci95"][str(s)] = float(1.96 * per_task.std(ddof=1) / np.sqrt(n))
    return out


def plot(model, args, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rng = np.random.default_rng(args.seed + 20_000)
    data, task = sample_tasks(rng, 1, args.shots, args.window)
    amp, phase, freq = task[0]
    xs, ys = tm.tensor(data[0][0]), tm.tensor(data[1][0])
    forward = forward_fn(model)
    params = dict(model.named_parameters())
    adapted = meta.adapt(
        lambda p: mse(forward(p, xs), ys), params, meta.InnerSGD(args.inner_lr), 10,
        first_order=True, trajectory=True,
    )  # fmt: skip
    start = 10.0
    grid = np.linspace(0, start + 25 * DT, 400)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(grid, amp * np.sin(freq * grid + phase), "r", lw=1, label="the task's series")
    seed_window = amp * np.sin(freq * (start - DT * np.arange(args.window)[::-1]) + phase)
    ax.plot(start - DT * np.arange(args.window)[::-1], seed_window, "k.", label="last observed")
    with tm.no_grad():
        for steps, style in ((0, ":"), (1, "--"), (10, "-")):
            window, forecast = list(seed_window), []
            for _ in range(25):  # roll the one-step forecast forward
                x = tm.tensor(np.array(window[-args.window :], np.float32)[None, :, None])
                forecast.append(float(forward(adapted[steps], x).numpy()[0, 0]))
                window.append(forecast[-1])
            times = start + DT * np.arange(1, 26)
            ax.plot(times, forecast, style, color="g", label=f"forecast after {steps} steps")
    ax.set_xlabel("t")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"MAML LSTM forecaster, K={args.shots} support windows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = Forecaster(args.hidden, np.random.default_rng(args.seed))
    start = time.perf_counter()
    losses = meta_train(model, args, progress=not args.quiet)
    seconds = time.perf_counter() - start
    scores = evaluate(model, args)
    metrics = {
        "shots": args.shots,
        "window": args.window,
        "iterations": args.iterations,
        "inner_lr": args.inner_lr,
        "seconds": round(seconds, 1),
        "mse": scores["mean"],
        "mse_ci95": scores["ci95"],
        "final_train_loss": float(np.mean(losses[-100:])) if losses else None,
    }
    if args.baseline_steps:
        baseline = Forecaster(args.hidden, np.random.default_rng(args.seed + 1))
        pretrain(baseline, args, progress=not args.quiet)
        base = evaluate(baseline, args)
        metrics["baseline_mse"], metrics["baseline_mse_ci95"] = base["mean"], base["ci95"]
    figure = plot(model, args, args.out / "forecasting.png")
    if figure is not None:
        metrics["figure"] = str(figure)
    tm.save({"model": model.state_dict()}, args.out / "checkpoint.npz")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\nK={args.shots}, {args.iterations} iterations in {seconds:.0f} s")
    print("query MSE after  " + "  ".join(f"{s:>2} steps" for s in EVAL_STEPS))
    print("  MAML          " + "  ".join(f"{scores['mean'][str(s)]:8.3f}" for s in EVAL_STEPS))
    if args.baseline_steps:
        row = "  ".join(f"{metrics['baseline_mse'][str(s)]:8.3f}" for s in EVAL_STEPS)
        print(f"  pretrained    {row}")
    return metrics


if __name__ == "__main__":
    main()
