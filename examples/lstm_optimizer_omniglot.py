"""The LSTM optimizer training a small MLP classifier (Andrychowicz et al. 2016, section 3.2,
with Omniglot characters in place of MNIST).

An optimizee is a 10-way classification problem: 10 Omniglot characters (20 drawings each,
28 x 28 pixels) and an MLP 784-20-10 with a sigmoid hidden layer, trained for 100 steps on
random batches of 32 with the cross-entropy loss. ``meta.LSTMOptimizer`` is meta-trained on
problems drawn from the small1 background set (the sum of the 100 training losses,
backpropagation through the steps truncated every 20, the optimizee's gradient an input
without its second derivatives, as in the paper). It is then compared, on problems drawn from
the alphabets of small2 that small1 lacks, with SGD, Nesterov momentum, RMSprop and Adam whose
learning rates are tuned on small1 problems; and, unchanged, on a wider MLP (784-40-10) it
never saw.

    python examples/lstm_optimizer_omniglot.py --data /path/to/omniglot   # about 10 minutes

Writes metrics.json (mean training loss at steps 1, 10, 25, 50, 100 and over all steps, per
optimizer and network width) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import meta
from tinymeta.data import load_omniglot
from tinymeta.optim import Adam

WAYS, BATCH = 10, 32
REPORT_STEPS = (1, 10, 25, 50, 100)
BASELINES = ("sgd", "nesterov", "rmsprop", "adam")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LSTM optimizer on Omniglot MLP classifiers.")
    p.add_argument("--data", default=None, help="folder with the Omniglot zips")
    p.add_argument("--iterations", type=int, default=60, help="meta-training problems")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--unroll", type=int, default=20)
    p.add_argument("--hidden", type=int, default=20, help="the MLP's width in meta-training")
    p.add_argument("--wide", type=int, default=40, help="the unseen wider MLP's width")
    p.add_argument("--meta-lr", type=float, default=3e-3)
    p.add_argument("--tune-problems", type=int, default=4)
    p.add_argument("--eval-problems", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/lstm-opt-omniglot"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


class Problems:
    """10-way problems: the images (200, 784) and labels 0..9 of 10 random characters."""

    def __init__(self, dataset):
        self.images = dataset.images.reshape(len(dataset.images), -1)
        self.by_class = [np.flatnonzero(dataset.labels == c) for c in range(dataset.num_classes)]

    def sample(self, rng):
        classes = rng.choice(len(self.by_class), WAYS, replace=False)
        idx = np.concatenate([self.by_class[c] for c in classes])
        labels = np.repeat(np.arange(WAYS), [len(self.by_class[c]) for c in classes])
        return self.images[idx], labels


def init_mlp(rng, hidden: int) -> dict:
    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return {
        "w1": uniform((hidden, 784), 784),
        "b1": uniform((hidden,), 784),
        "w2": uniform((WAYS, hidden), hidden),
        "b2": uniform((WAYS,), hidden),
    }


def loss_of(params: dict, x, y):
    hidden = F.sigmoid(F.linear(x, params["w1"], params["b1"]))
    return F.cross_entropy(F.linear(hidden, params["w2"], params["b2"]), y)


def gradient(values: dict, x, y) -> dict:
    """The optimizee's gradient at ``values`` (arrays), as constants."""
    params = {k: tm.tensor(v, requires_grad=True) for k, v in values.items()}
    with tm.enable_grad():  # also when the caller evaluates under no_grad
        grads = tm.grad(loss_of(params, x, y), list(params.values()))
    return dict(zip(params, (g.numpy() for g in grads)))


def batches(problem, rng, steps: int):
    x, y = problem
    for _ in range(steps):
        idx = rng.choice(len(y), BATCH, replace=False)
        yield tm.tensor(x[idx]), y[idx]


def lstm_run(opt, problem, init: dict, rng, steps: int, unroll=None, outer=None) -> np.ndarray:
    """Training losses at steps 0..steps-1 under the LSTM optimizer; with ``outer``,
    meta-train it on their sum every ``unroll`` steps."""
    theta = {k: tm.tensor(v) for k, v in init.items()}
    state, losses, total = {}, [], None
    for t, (x, y) in enumerate(batches(problem, rng, steps)):
        loss = loss_of(theta, x, y)
        losses.append(loss.item())
        total = loss if total is None else total + loss
        grads = gradient({k: v.numpy() for k, v in theta.items()}, x, y)
        for k in theta:
            step_update, state[k] = opt.update(tm.tensor(grads[k]), state.get(k))
            theta[k] = theta[k] + step_update
        if outer is not None and (t + 1) % unroll == 0:
            outer.zero_grad()
            (total / unroll).backward()
            outer.step()
            theta = {k: tm.tensor(v.numpy()) for k, v in theta.items()}  # truncate
            state = {
                k: tuple((tm.tensor(h.numpy()), tm.tensor(c.numpy())) for h, c in s)
                for k, s in state.items()
            }
            total = None
    return np.array(losses)


def baseline_run(name: str, lr: float, problem, init: dict, rng, steps: int) -> np.ndarray:
    theta = {k: v.astype(np.float64) for k, v in init.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v2 = {k: np.zeros_like(v) for k, v in theta.items()}
    losses = []
    for t, (x, y) in enumerate(batches(problem, rng, steps)):
        look = {k: theta[k] + 0.9 * m[k] for k in theta} if name == "nesterov" else theta
        with tm.no_grad():
            losses.append(
                loss_of({k: tm.tensor(a.astype(np.float32)) for k, a in theta.items()}, x, y).item()
            )
        grads = gradient({k: a.astype(np.float32) for k, a in look.items()}, x, y)
        for k, g in grads.items():
            if name == "sgd":
                theta[k] = theta[k] - lr * g
            elif name == "nesterov":
                m[k] = 0.9 * m[k] - lr * g
                theta[k] = theta[k] + m[k]
            elif name == "rmsprop":
                v2[k] = 0.99 * v2[k] + 0.01 * g * g
                theta[k] = theta[k] - lr * g / (np.sqrt(v2[k]) + 1e-8)
            else:
                m[k] = 0.9 * m[k] + 0.1 * g
                v2[k] = 0.999 * v2[k] + 0.001 * g * g
                m_hat, v_hat = m[k] / (1 - 0.9 ** (t + 1)), v2[k] / (1 - 0.999 ** (t + 1))
                theta[k] = theta[k] - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return np.array(losses)


def baseline(name: str, lr: float, steps: int):
    def run(problem, init, rng):
        return baseline_run(name, lr, problem, init, rng, steps)

    return run


def mean_curve(run, problems, inits, seed: int) -> np.ndarray:
    curves = [
        run(p, i, np.random.default_rng(seed + n)) for n, (p, i) in enumerate(zip(problems, inits))
    ]
    return np.mean(curves, axis=0)


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train = load_omniglot("small1", root=args.data)
    evaluation = load_omniglot("small2", root=args.data)
    evaluation = evaluation.subset(
        alphabets=[a for a in evaluation.alphabets if a not in train.alphabets]
    )
    train, evaluation = Problems(train), Problems(evaluation)
    rng = np.random.default_rng(args.seed)

    opt = meta.LSTMOptimizer(rng=rng)
    outer = Adam(opt.parameters(), lr=args.meta_lr)
    start = time.perf_counter()
    for _ in tqdm(range(args.iterations), desc="meta-train", disable=args.quiet, mininterval=1):
        problem, init = train.sample(rng), init_mlp(rng, args.hidden)
        lstm_run(opt, problem, init, rng, args.steps, args.unroll, outer)
    seconds = time.perf_counter() - start

    tune_rng = np.random.default_rng(args.seed + 1)
    tune_set = [train.sample(tune_rng) for _ in range(args.tune_problems)]
    tune_inits = [init_mlp(tune_rng, args.hidden) for _ in tune_set]
    grid = np.logspace(-3, 1, 9)
    rates = {}
    for name in BASELINES:
        scores = [
            np.mean(mean_curve(baseline(name, lr, args.steps), tune_set, tune_inits, 0))
            for lr in grid
        ]
        rates[name] = float(grid[int(np.nanargmin(np.where(np.isfinite(scores), scores, np.inf)))])

    eval_rng = np.random.default_rng(args.seed + 2)
    problems = [evaluation.sample(eval_rng) for _ in range(args.eval_problems)]
    results = {}
    for width in (args.hidden, args.wide):
        inits = [init_mlp(np.random.default_rng(1000 + n), width) for n in range(len(problems))]
        curves = {
            name: mean_curve(baseline(name, rates[name], args.steps), problems, inits, 7)
            for name in BASELINES
        }
        with tm.no_grad():
            curves["lstm"] = mean_curve(
                lambda p, i, r: lstm_run(opt, p, i, r, args.steps), problems, inits, 7
            )
        results[f"mlp-{width}"] = {
            name: {
                **{str(s): float(c[s - 1]) for s in REPORT_STEPS if s <= len(c)},
                "mean": float(np.mean(c)),
            }
            for name, c in curves.items()
        }
    metrics = {
        "iterations": args.iterations,
        "meta_train_seconds": round(seconds, 1),
        "tuned_lr": rates,
        "eval_problems": args.eval_problems,
        "mean_training_loss": results,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"meta-trained on {args.iterations} problems in {seconds:.0f} s; tuned rates {rates}")
    for width, table in results.items():
        print(
            f"{width}: mean training loss at step "
            + "  ".join(f"{s:>6}" for s in REPORT_STEPS)
            + "    mean"
        )
        for name, row in table.items():
            print(
                f"  {name:<9} "
                + "  ".join(f"{row.get(str(s), np.nan):6.3f}" for s in REPORT_STEPS)
                + f"  {row['mean']:6.3f}"
            )
    return metrics


if __name__ == "__main__":
    main()
