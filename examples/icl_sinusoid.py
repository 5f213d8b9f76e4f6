"""Black-box (in-context) meta-learners on sinusoid regression: no inner gradient step.

The tasks, the held-out evaluation tasks and the metrics.json keys are those of
examples/maml_sinusoid.py, so the two tables read side by side. A learner reads a task's K
support pairs (x, y) and predicts y at query points from them alone:

  lstm-icl       memory-based (in the spirit of Hochreiter et al. 2001 and Santoro et al.
                 2016): an LSTM reads the support pairs in sequence; an MLP maps its final
                 state and a query x to the prediction.
  attention-icl  a small Transformer-style encoder over the support set plus the query points
                 (pre-LayerNorm blocks of MultiheadAttention and a GELU feed-forward layer);
                 each query attends to the support tokens and itself only, so queries do not
                 see each other and any number can be asked.

Both are trained with Adam on meta-batches of tasks (K support and K query points each, the
query MSE), as MAML's meta-training sees them.

    python examples/icl_sinusoid.py --algo lstm-icl --shots 10
    python examples/icl_sinusoid.py --algo attention-icl --shots 5 --iterations 20000

In metrics.json, ``mse`` has the keys of maml_sinusoid.py's (0, 1, 5 and 10 adaptation steps)
with one value: an in-context learner takes no gradient steps ("adaptation": "in-context").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tinymeta as tm
from tinymeta import nn
from tinymeta.data import SinusoidTasks
from tinymeta.optim import Adam

ALGOS = ("lstm-icl", "attention-icl")
EVAL_STEPS = (0, 1, 5, 10)
SCALE = 0.2  # inputs and targets enter at a fifth of their size: x in [-1, 1], |y| <= 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="In-context meta-learners on sinusoid regression.")
    p.add_argument("--algo", choices=ALGOS, default="lstm-icl")
    p.add_argument("--shots", type=int, default=10, help="K support points per task")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's rate")
    p.add_argument("--iterations", type=int, default=10000)
    p.add_argument("--hidden", type=int, default=64, help="LSTM state / attention width")
    p.add_argument("--layers", type=int, default=2, help="attention blocks (attention-icl)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (attention-icl)")
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--eval-seed", type=int, default=10_000, help="as maml_sinusoid.py's")
    p.add_argument("--eval-points", type=int, default=100, help="query points per eval task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/icl-sinusoid"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


class LSTMLearner(nn.Module):
    """y(x_q) = MLP([h_K, x_q]) with h_K the LSTM's state after reading (x_1, y_1)..(x_K, y_K)."""

    def __init__(self, hidden: int, rng):
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, batch_first=True, rng=rng)
        self.head = nn.Sequential(
            nn.Linear(hidden + 1, 64, rng=rng), nn.ReLU(), nn.Linear(64, 1, rng=rng)
        )

    def forward(self, xs, ys, xq):
        """xs, ys (T, K, 1) and xq (T, Q, 1) -> predictions (T, Q, 1)."""
        _, (h, _) = self.lstm(tm.concatenate([xs, ys], axis=-1) * SCALE)
        h = h[-1]  # (T, hidden): the last layer's final state
        t, q = xq.shape[:2]
        memory = tm.broadcast_to(tm.expand_dims(h, 1), (t, q, h.shape[-1]))
        return self.head(tm.concatenate([memory, xq * SCALE], axis=-1)) / SCALE


class Block(nn.Module):
    """x + attention(LN(x)), then x + FF(LN(x)): a pre-LayerNorm Transformer encoder block."""

    def __init__(self, width: int, heads: int, rng):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, rng=rng)
        self.ff = nn.Sequential(
            nn.Linear(width, 2 * width, rng=rng), nn.GELU(), nn.Linear(2 * width, width, rng=rng)
        )

    def forward(self, x, mask):
        z = self.norm1(x)
        x = x + self.attn(z, z, z, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class AttentionLearner(nn.Module):
    """Tokens (x, y, 1) for the support points and (x, 0, 0) for the queries, embedded, encoded
    by ``layers`` blocks; each query token's output is its prediction."""

    def __init__(self, width: int, layers: int, heads: int, rng):
        super().__init__()
        self.embed = nn.Linear(3, width, rng=rng)
        self.blocks = nn.Sequential(*[Block(width, heads, rng) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 1, rng=rng)

    def forward(self, xs, ys, xq):
        t, k, q = xs.shape[0], xs.shape[1], xq.shape[1]
        support = tm.concatenate([xs * SCALE, ys * SCALE, tm.ones(t, k, 1)], axis=-1)
        queries = tm.concatenate([xq * SCALE, tm.zeros(t, q, 2)], axis=-1)
        x = self.embed(tm.concatenate([support, queries], axis=1))
        # A query may attend to the support tokens and to itself, not to other queries.
        mask = np.ones((k + q, k + q), dtype=bool)
        mask[:, :k] = False
        mask[np.arange(k, k + q), np.arange(k, k + q)] = False
        for block in self.blocks:
            x = block(x, mask)
        return self.out(self.norm(x[:, k:])) / SCALE


def build(args, rng) -> nn.Module:
    if args.algo == "lstm-icl":
        return LSTMLearner(args.hidden, rng)
    return AttentionLearner(args.hidden, args.layers, args.heads, rng)


def mse(pred, target):
    return ((pred - target) ** 2).mean()


def train(model, args, progress=True) -> list:
    tasks = SinusoidTasks(rng=args.seed)
    opt = Adam(list(model.parameters()), lr=args.lr)
    losses = []
    for _ in tqdm(range(args.iterations), desc=args.algo, disable=not progress, mininterval=1):
        batch = tasks.sample_batch(args.meta_batch, args.shots, args.shots)
        xs, ys, xq, yq = (tm.tensor(a) for a in batch)
        opt.zero_grad()
        loss = mse(model(xs, ys, xq), yq)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def evaluate(model, args) -> dict:
    """Query MSE over the held-out tasks of maml_sinusoid.py (same seed, same points)."""
    batch = SinusoidTasks(rng=args.eval_seed).sample_batch(
        args.eval_tasks, args.shots, args.eval_points
    )
    xs, ys, xq, yq = (tm.tensor(a) for a in batch)
    with tm.no_grad():
        per_task = ((model(xs, ys, xq) - yq) ** 2).mean(axis=(1, 2)).numpy().astype(np.float64)
    n = len(per_task)
    return {
        "mean": float(per_task.mean()),
        "ci95": float(1.96 * per_task.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "median": float(np.median(per_task)),
        "outliers": int((per_task > 5.0).sum()),
        "worst": [round(float(a), 3) for a in batch.amplitudes[np.argsort(per_task)[::-1][:5]]],
    }


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    model = build(args, rng)
    start = time.perf_counter()
    losses = train(model, args, progress=not args.quiet)
    seconds = time.perf_counter() - start
    scores = evaluate(model, args)
    same = {str(s): scores["mean"] for s in EVAL_STEPS}
    metrics = {
        "algo": args.algo,
        "shots": args.shots,
        "iterations": args.iterations,
        "adaptation": "in-context (no gradient steps: one prediction for every step count)",
        "seconds": round(seconds, 2),
        "parameters": int(sum(p.size for p in model.parameters())),
        "eval_seed": args.eval_seed,
        "mse": same,
        "mse_ci95": {str(s): scores["ci95"] for s in EVAL_STEPS},
        "mse_median": {str(s): scores["median"] for s in EVAL_STEPS},
        "tasks_above_5": {str(s): scores["outliers"] for s in EVAL_STEPS},
        "diverged_tasks": {str(s): 0 for s in EVAL_STEPS},
        "worst_task_amplitudes": {str(s): scores["worst"] for s in EVAL_STEPS},
        "final_train_loss": float(np.mean(losses[-100:])) if losses else None,
    }
    tm.save({"model": model.state_dict()}, args.out / "checkpoint.npz")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\n{args.algo}, K={args.shots}, {args.iterations} iterations in {seconds:.0f} s")
    print(
        f"  query MSE {scores['mean']:.3f} (+- {scores['ci95']:.3f}), median {scores['median']:.3f}"
    )
    print(f"wrote {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
