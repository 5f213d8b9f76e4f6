"""The LSTM optimizer on random quadratics (Andrychowicz et al. 2016, section 3.1).

Each function is f(theta) = ||W theta - y||^2 with W (10 x 10), y and the starting theta drawn
from N(0, 1). ``meta.LSTMOptimizer`` (two layers of 20 units, coordinate-wise, the paper's
gradient preprocessing) is meta-trained with Adam on the sum of f over 100 optimisation steps,
by backpropagation through the unrolled steps truncated every 20 (the optimizee's gradient
enters as an input, its second derivatives dropped as in the paper). SGD, Nesterov momentum,
RMSprop and Adam get their learning rate tuned on the same training functions (the lowest
mean loss over the 100 steps on a grid). All are then run on unseen functions.

    python examples/lstm_optimizer_quadratic.py                 # about 5 minutes on 2 cores
    python examples/lstm_optimizer_quadratic.py --iterations 1000

Writes metrics.json (mean loss at steps 1, 10, 25, 50, 100 and the mean over the 100 steps
for each optimizer, the tuned rates) and, with matplotlib, the loss curves to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tinymeta as tm
from tinymeta import meta
from tinymeta.optim import Adam

DIM = 10
REPORT_STEPS = (1, 10, 25, 50, 100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LSTM optimizer on random quadratics.")
    p.add_argument("--iterations", type=int, default=300, help="meta-training iterations")
    p.add_argument("--functions", type=int, default=128, help="functions per meta-iteration")
    p.add_argument("--steps", type=int, default=100, help="optimisation steps per function")
    p.add_argument("--unroll", type=int, default=20, help="truncation of backprop through time")
    p.add_argument("--meta-lr", type=float, default=3e-3)
    p.add_argument("--eval-functions", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/lstm-opt-quadratic"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def sample_functions(rng, n: int):
    """W (n, 10, 10), y (n, 10), theta0 (n, 10), float32."""
    w = rng.standard_normal((n, DIM, DIM)).astype(np.float32)
    y = rng.standard_normal((n, DIM)).astype(np.float32)
    theta = rng.standard_normal((n, DIM)).astype(np.float32)
    return w, y, theta


def residual(w, theta, y):
    return (w @ theta[..., None])[..., 0] - y


# --- the LSTM optimizer -----------------------------------------------------------------------


def lstm_trajectory(opt, functions, steps: int, unroll: int | None = None, outer=None):
    """Mean loss over the functions at steps 0..steps-1 under ``opt``; with ``outer`` (an
    optimizer of opt's weights), meta-train on the summed losses every ``unroll`` steps."""
    w_np, y_np, theta_np = functions
    w, y = tm.tensor(w_np), tm.tensor(y_np)
    theta, state = tm.tensor(theta_np), None
    losses, total = [], None
    for t in range(steps):
        r = residual(w, theta, y)
        loss = (r * r).sum(axis=-1).mean()
        losses.append(loss.item())
        total = loss if total is None else total + loss
        # The optimizee's gradient 2 W^T r as an input: its second derivatives are dropped.
        g = tm.tensor(2.0 * (np.swapaxes(w_np, -1, -2) @ r.numpy()[..., None])[..., 0])
        step_update, state = opt.update(g, state)
        theta = theta + step_update
        if outer is not None and (t + 1) % unroll == 0:
            outer.zero_grad()
            (total / unroll).backward()
            outer.step()
            # Truncate: the next segment starts from the current values, as constants.
            theta = tm.tensor(theta.numpy())
            state = tuple((tm.tensor(h.numpy()), tm.tensor(c.numpy())) for h, c in state)
            total = None
    return np.array(losses)


# --- hand-tuned baselines ----------------------------------------------------------------------


def baseline_trajectory(name: str, lr: float, functions, steps: int) -> np.ndarray:
    """Mean loss at steps 0..steps-1 of SGD, Nesterov momentum (0.9), RMSprop (0.99) or Adam
    with learning rate ``lr`` on every function at once (float64 arrays)."""
    w, y, theta = (a.astype(np.float64) for a in functions)
    wt = np.swapaxes(w, -1, -2)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    losses = []
    for t in range(steps):
        with np.errstate(over="ignore", invalid="ignore"):
            if name == "nesterov":  # the gradient at the look-ahead point
                r_ahead = residual(w, theta + 0.9 * m, y)
                g = 2.0 * (wt @ r_ahead[..., None])[..., 0]
            r = residual(w, theta, y)
            losses.append(float((r * r).sum(axis=-1).mean()))
            if name != "nesterov":
                g = 2.0 * (wt @ r[..., None])[..., 0]
            if name == "sgd":
                theta = theta - lr * g
            elif name == "nesterov":
                m = 0.9 * m - lr * g
                theta = theta + m
            elif name == "rmsprop":
                v = 0.99 * v + 0.01 * g * g
                theta = theta - lr * g / (np.sqrt(v) + 1e-8)
            else:  # adam
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
                theta = theta - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return np.array(losses)


def tune(name: str, functions, steps: int) -> float:
    """The rate of the grid 10^-4 .. 10^0 with the lowest mean loss over the steps."""
    grid = np.logspace(-4, 0, 17)
    scores = [np.mean(baseline_trajectory(name, lr, functions, steps)) for lr in grid]
    scores = [s if np.isfinite(s) else np.inf for s in scores]
    return float(grid[int(np.argmin(scores))])


def plot(curves: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(len(curve)), curve, label=name, lw=2 if name == "LSTM" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean loss on unseen functions")
    ax.set_title("random 10-d quadratics ||W theta - y||^2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    opt = meta.LSTMOptimizer(rng=rng)
    outer = Adam(opt.parameters(), lr=args.meta_lr)
    start = time.perf_counter()
    for _ in tqdm(range(args.iterations), desc="meta-train", disable=args.quiet, mininterval=1):
        lstm_trajectory(opt, sample_functions(rng, args.functions), args.steps, args.unroll, outer)
    seconds = time.perf_counter() - start

    train_functions = sample_functions(np.random.default_rng(args.seed + 1), args.functions)
    unseen = sample_functions(np.random.default_rng(args.seed + 2), args.eval_functions)
    rates = {
        n: tune(n, train_functions, args.steps) for n in ("sgd", "nesterov", "rmsprop", "adam")
    }
    names = {"sgd": "SGD", "nesterov": "Nesterov", "rmsprop": "RMSprop", "adam": "Adam"}
    curves = {names[n]: baseline_trajectory(n, lr, unseen, args.steps) for n, lr in rates.items()}
    with tm.no_grad():
        curves["LSTM"] = lstm_trajectory(opt, unseen, args.steps)
    metrics = {
        "iterations": args.iterations,
        "meta_train_seconds": round(seconds, 1),
        "tuned_lr": rates,
        "eval_functions": args.eval_functions,
        "mean_loss_at_step": {
            name: {str(s): float(curve[s - 1]) for s in REPORT_STEPS}
            for name, curve in curves.items()
        },
        "mean_loss_over_steps": {name: float(np.mean(c)) for name, c in curves.items()},
    }
    figure = plot(curves, args.out / "quadratic.png")
    if figure is not None:
        metrics["figure"] = str(figure)
    tm.save(
        {"lstm_optimizer": {k: v for k, v in opt.named_parameters().items()}},
        args.out / "checkpoint.npz",
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"meta-trained {args.iterations} iterations in {seconds:.0f} s; tuned rates {rates}")
    print(
        "mean loss on unseen functions at step "
        + "  ".join(f"{s:>8}" for s in REPORT_STEPS)
        + "   mean"
    )
    for name, curve in curves.items():
        row = "  ".join(f"{curve[s - 1]:8.3f}" for s in REPORT_STEPS)
        print(f"  {name:<10} {row}   {np.mean(curve):8.3f}")
    return metrics


if __name__ == "__main__":
    main()
