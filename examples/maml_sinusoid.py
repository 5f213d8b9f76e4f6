"""MAML on sinusoid regression (Finn, Abbeel & Levine 2017, section 5.1).

Each task is y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi] and
x ~ U[-5, 5]; the learner sees K points of a new task and must fit the whole
curve after a few gradient steps. A 1-40-40-1 ReLU network is meta-trained so
that one inner SGD step (lr 0.01) on K points fits well, and compared on
held-out tasks with a network pretrained on all tasks jointly and fine-tuned
the same way (the paper's baseline).

    python examples/maml_sinusoid.py                       # MAML, K=10, a few minutes
    python examples/maml_sinusoid.py --shots 5 --iterations 70000   # the paper's length
    python examples/maml_sinusoid.py --algo metasgd        # also: fomaml reptile anil learned-opt

Writes metrics.json, a checkpoint and (with matplotlib) a figure to --out.

Under MPI every meta-batch is spread over the processes (docs/distributed.md):

    mpiexec -n 2 python examples/maml_sinusoid.py

Every rank draws the same tasks from the same seed and computes the meta-gradient of its
share of them (``tinymeta.distributed.shard``); one all-reduce sums the shares, so every rank
takes the same outer step, and rank 0 alone writes the outputs. ``--dtype float64`` makes the
result the same as one process's to rounding in the last bits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tinymeta as tm
from tinymeta import distributed as dist
from tinymeta import meta, nn
from tinymeta._checks import nonnegative_float, nonnegative_int, positive_float, positive_int
from tinymeta.data import SinusoidTasks
from tinymeta.optim import Adam

ALGOS = ("maml", "fomaml", "reptile", "metasgd", "anil", "learned-opt")
EVAL_STEPS = (0, 1, 5, 10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MAML and friends on sinusoid regression.")
    p.add_argument("--algo", choices=ALGOS, default="maml")
    p.add_argument("--shots", type=positive_int, default=10, help="K support points per task")
    p.add_argument(
        "--inner-steps", type=positive_int, default=1, help="inner SGD steps in meta-training"
    )
    p.add_argument("--inner-lr", type=positive_float, default=0.01)
    p.add_argument("--meta-batch", type=positive_int, default=25, help="tasks per meta-iteration")
    p.add_argument(
        "--meta-lr", type=positive_float, default=1e-3, help="Adam's rate for the outer step"
    )
    p.add_argument("--iterations", type=positive_int, default=15000)
    p.add_argument(
        "--clip-grad", type=nonnegative_float, default=0.0,
        help="clip the meta-gradient's norm to this (0: no clipping)",
    )  # fmt: skip
    p.add_argument(
        "--first-order-iterations",
        type=nonnegative_int,
        default=0,
        help="derivative-order annealing: first-order for this many iterations",
    )
    p.add_argument(
        "--init",
        choices=("default", "paper"),
        default="default",
        help="initial weights: default (uniform, +-1/sqrt(fan_in), as nn.Linear) or paper "
        "(the MAML reference code's: normal with std 0.01 truncated at 2 std, zero biases)",
    )
    p.add_argument("--eval-tasks", type=positive_int, default=600)
    p.add_argument(
        "--eval-seed",
        type=int,
        default=10_000,
        help="seed of the held-out evaluation tasks (independent of --seed, so runs with "
        "different training seeds are scored on the same tasks)",
    )
    p.add_argument(
        "--eval-points", type=positive_int, default=100, help="query points per eval task"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the pretrained baseline")
    p.add_argument(
        "--baseline-steps",
        type=nonnegative_int,
        default=20_000,
        help="Adam steps of the pretrained baseline (each on K+K points of --meta-batch tasks)",
    )
    p.add_argument(
        "--baseline-init",
        choices=("own", "maml"),
        default="own",
        help="the baseline starts from its own random weights, or from the same initial "
        "weights as the meta-learned network",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument(
        "--capture",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the meta-gradient's first iteration and replay its array calls after "
        "(tm.capture, docs/capture.md): the same numbers, bit for bit; default: on the CPU",
    )
    p.add_argument("--out", type=Path, default=Path("runs/sinusoid"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def build_model(rng, init: str = "default") -> nn.Module:
    model = nn.Sequential(
        nn.Linear(1, 40, rng=rng), nn.ReLU(),
        nn.Linear(40, 40, rng=rng), nn.ReLU(),
        nn.Linear(40, 1, rng=rng),
    )  # fmt: skip
    if init == "paper":
        with tm.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(np.zeros(p.shape))
                else:
                    p.copy_(truncated_normal(rng, p.shape, std=0.01))
    return model


def truncated_normal(rng, shape, std: float) -> np.ndarray:
    """Normal samples with those beyond two standard deviations drawn again."""
    x = rng.standard_normal(shape)
    while (outside := np.abs(x) > 2).any():
        x[outside] = rng.standard_normal(int(outside.sum()))
    return x * std


def make_rule(algo: str, params: dict, args):
    """The inner update each algorithm adapts with."""
    if algo == "metasgd":
        return meta.MetaSGD(params, init_lr=args.inner_lr)
    if algo == "learned-opt":
        return meta.LearnedOptimizer(lr=args.inner_lr, rng=args.seed, params=params)
    return meta.InnerSGD(args.inner_lr)


def mse(pred, target):
    return ((pred - target) ** 2).mean()


def to_tensors(batch, device, dtype=None, tasks=slice(None)):
    """The batch's (xs, ys, xq, yq) as tensors, of the ``tasks`` at those indices only."""
    arrays = (batch.xs, batch.ys, batch.xq, batch.yq)
    return [tm.tensor(a[tasks], dtype=dtype, device=device) for a in arrays]


def meta_train(model, rule, args, progress=True):
    """Meta-train ``model`` (and the rule's own parameters) on sinusoid task batches.

    Returns the meta-losses and how many steps were skipped for a non-finite meta-gradient.
    Under MPI each rank computes the meta-gradient of its share of every meta-batch."""
    params = dict(model.named_parameters())
    head = [k for k in params if k.startswith("4.")]

    def forward(p, x):
        return nn.functional_call(model, p, x)

    tasks = SinusoidTasks(rng=args.seed)
    outer_params = list(params.values()) + rule.parameters()
    outer = Adam(outer_params, lr=args.meta_lr)
    losses, skipped = [], 0
    # This rank's tasks of every meta-batch, and their share of it: each rank's meta-gradient
    # (a mean over its tasks) times that share sums over the ranks to the meta-batch's mean,
    # also when the shares are unequal (25 tasks on 2 ranks: 13 and 12).
    share = dist.shard(args.meta_batch)
    weight = len(share) / args.meta_batch

    def meta_gradient(xs, ys, xq, yq, first_order: bool):
        loss = meta.maml_loss(
            forward, params, (xs, ys), (xq, yq), mse, rule, args.inner_steps,
            first_order=first_order, keys=head if args.algo == "anil" else None,
        )  # fmt: skip
        (loss * weight).backward()
        return loss

    # The shapes never change from one meta-iteration to the next: after the first one (and
    # the first second-order one), replay its array calls instead of running the graph.
    if args.capture if args.capture is not None else args.device == "cpu":
        meta_gradient = tm.capture(meta_gradient)
    for it in tqdm(range(args.iterations), desc=args.algo, disable=not progress, mininterval=1):
        batch = tasks.sample_batch(args.meta_batch, args.shots, args.shots)  # same on all ranks
        xs, ys, xq, yq = to_tensors(batch, args.device, args.dtype, share)
        outer.zero_grad()
        if args.algo == "reptile":
            grads = meta.reptile_grads(forward, params, (xs, ys), mse, rule, args.inner_steps)
            for k, p in params.items():
                p.grad = grads[k] * weight
        else:
            first_order = args.algo == "fomaml" or it < args.first_order_iterations
            loss = meta_gradient(xs, ys, xq, yq, first_order)
            losses.append(loss.item() * weight)
        dist.all_reduce_grads_(outer_params, op="sum")  # one flat buffer
        norm = nn.utils.clip_grad_norm_(outer_params, args.clip_grad or float("inf"))
        if not np.isfinite(norm.item()):
            # An inner loop that blew up (a learned rate grown too large) would write NaN
            # into every meta-parameter through Adam: skip the step, count it.
            skipped += 1
            continue
        outer.step()
    if losses and dist.world_size() > 1:  # the ranks' shares of each meta-loss, summed
        total = tm.tensor(losses, dtype=np.float64)
        dist.all_reduce_(total, op="sum")
        losses = total.numpy().tolist()
    return losses, skipped


def pretrain_baseline(model, args, progress=True):
    """The paper's baseline: one network regressing all tasks' points jointly.

    As the reference implementation: each step regresses the K + K points (support and
    query) of a meta-batch of tasks. Under MPI, spread over the ranks as meta_train is."""
    params = list(model.parameters())
    tasks = SinusoidTasks(rng=args.seed + 1)
    opt = Adam(params, lr=args.meta_lr)
    share = dist.shard(args.meta_batch)
    weight = len(share) / args.meta_batch
    steps = tqdm(range(args.baseline_steps), desc="baseline", disable=not progress, mininterval=1)
    for _ in steps:
        batch = tasks.sample_batch(args.meta_batch, args.shots, args.shots)
        xs, ys, xq, yq = to_tensors(batch, args.device, args.dtype, share)
        opt.zero_grad()
        ((mse(model(xs), ys) + mse(model(xq), yq)) * weight).backward()
        dist.all_reduce_grads_(params, op="sum")
        opt.step()


# A task whose query MSE after adaptation is above this counts as an outlier: the
# distribution of per-task MSE has a heavy tail (large-amplitude tasks where repeated SGD
# steps overshoot), so the mean is reported with the median and the outlier count.
OUTLIER_MSE = 5.0


def evaluate(model, rule, args, keys=None):
    """Query MSE over held-out tasks after 0..10 adaptation steps (all tasks at once).

    Returns a dict of per-step statistics: mean, 95% interval, median, the number of tasks
    above ``OUTLIER_MSE``, the number that diverged (non-finite), and the amplitudes of the
    five worst tasks."""
    tasks = SinusoidTasks(rng=args.eval_seed)
    batch = tasks.sample_batch(args.eval_tasks, args.shots, args.eval_points)
    xs, ys, xq, yq = to_tensors(batch, args.device, args.dtype)
    params = dict(model.named_parameters())

    def forward(p, x):
        return nn.functional_call(model, p, x)

    n = len(xs)
    path = meta.adapt(
        lambda p: mse(forward(p, xs), ys) * n,
        meta.per_task(params, n, keys), rule, max(EVAL_STEPS), first_order=True, keys=keys,
        trajectory=True,
    )  # fmt: skip
    stats = {key: {} for key in ("mean", "ci95", "median", "outliers", "diverged", "worst")}
    with tm.no_grad():
        for s in EVAL_STEPS:
            per_task = ((forward(path[s], xq) - yq) ** 2).mean(axis=(1, 2)).numpy()
            finite = np.isfinite(per_task)
            # Rates learned for one step (Meta-SGD) can blow up when applied many times:
            # say so (None, and how many tasks diverged) rather than average infinities.
            mean = float(per_task.mean()) if finite.all() else None
            ci95 = float(1.96 * per_task.std(ddof=1) / np.sqrt(n)) if finite.all() else None
            ranked = np.argsort(np.where(finite, per_task, np.inf))[::-1]
            for key, value in (
                ("mean", mean),
                ("ci95", ci95),
                ("median", float(np.median(per_task))),
                ("outliers", int((per_task[finite] > OUTLIER_MSE).sum())),
                ("diverged", int((~finite).sum())),
                ("worst", [round(float(a), 3) for a in batch.amplitudes[ranked[:5]]]),
            ):
                stats[key][str(s)] = value
    return stats


def plot(model, rule, baseline, args, figure_path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    task = SinusoidTasks(rng=args.seed + 20_000).sample_task()
    x_support, y_support = task.sample(args.shots, rng=args.seed)
    grid = np.linspace(-5, 5, 200, dtype=np.float32)[:, None]
    fig, axes = plt.subplots(1, 2 if baseline is not None else 1, figsize=(11, 4), squeeze=False)
    nets = [("MAML" if args.algo == "maml" else args.algo, model, rule)]
    if baseline is not None:
        nets.append(("pretrained", baseline, meta.InnerSGD(args.inner_lr)))
    xs, ys = tm.tensor(x_support), tm.tensor(y_support)
    for ax, (name, net, net_rule) in zip(axes[0], nets):
        params = dict(net.named_parameters())
        fits = meta.adapt(
            lambda p, net=net: mse(nn.functional_call(net, p, xs), ys),
            params,
            net_rule,
            10,
            first_order=True,
            trajectory=True,
        )
        ax.plot(grid, task(grid), "r", label="ground truth")
        ax.plot(x_support, y_support, "^", color="purple", label="used for grad")
        with tm.no_grad():
            for s, style in ((0, ":"), (1, "--"), (10, "-")):
                fit = nn.functional_call(net, fits[s], tm.tensor(grid)).numpy()
                ax.plot(grid, fit, style, color="g", label=f"after {s} steps")
        ax.set_title(f"{name}, K={args.shots}")
        ax.set_ylim(-6, 6)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure_path, dpi=100)
    plt.close(fig)
    return figure_path


def _cell(value) -> str:
    return f"{value:8.3f}" if value is not None else "diverged"


def main(argv=None):
    args = parse_args(argv)
    ranks = dist.init()[1]
    if ranks > args.meta_batch:
        raise SystemExit(f"{ranks} MPI ranks need --meta-batch >= {ranks}, not {args.meta_batch}")
    root = dist.rank() == 0  # writes the outputs and shows progress
    if root:
        args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()

    model = build_model(rng, args.init).to(args.device, args.dtype)
    rule = make_rule(args.algo, dict(model.named_parameters()), args)
    progress = not args.quiet and root
    train_losses, skipped = meta_train(model, rule, args, progress=progress)
    seconds = time.perf_counter() - start
    keys = [k for k, _ in model.named_parameters() if k.startswith("4.")]
    scores = evaluate(model, rule, args, keys=keys if args.algo == "anil" else None)
    mse_after = scores["mean"]

    metrics = {
        "algo": args.algo,
        "shots": args.shots,
        "iterations": args.iterations,
        "inner_steps": args.inner_steps,
        "inner_lr": args.inner_lr,
        "init": args.init,
        "seconds": round(seconds, 2),
        "ranks": ranks,
        "dtype": args.dtype,
        "eval_seed": args.eval_seed,
        "mse": mse_after,
        "mse_ci95": scores["ci95"],
        "mse_median": scores["median"],
        "tasks_above_5": scores["outliers"],
        "diverged_tasks": scores["diverged"],
        "worst_task_amplitudes": scores["worst"],
    }
    baseline = None
    if not args.no_baseline:
        baseline_seed = args.seed if args.baseline_init == "maml" else args.seed + 1
        baseline = build_model(np.random.default_rng(baseline_seed), args.init)
        baseline.to(args.device, args.dtype)
        pretrain_baseline(baseline, args, progress=progress)
        base = evaluate(baseline, meta.InnerSGD(args.inner_lr), args)
        metrics["baseline_mse"], metrics["baseline_mse_ci95"] = base["mean"], base["ci95"]
        metrics["baseline_mse_median"] = base["median"]
    if train_losses:
        metrics["final_train_loss"] = float(np.nanmean(train_losses[-100:]))
        metrics["skipped_steps"] = skipped
    if not root:
        return metrics

    checkpoint = {
        "model": model.state_dict(),
        "rule": rule.named_parameters(),
        "iterations": args.iterations,
    }
    tm.save(checkpoint, args.out / "checkpoint.npz")
    figure = plot(model, rule, baseline, args, args.out / "sinusoid.png")
    if figure is not None:
        metrics["figure"] = str(figure)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    print(f"\n{args.algo}, K={args.shots}, {args.iterations} iterations in {seconds:.0f} s")
    print("query MSE after   " + "  ".join(f"{s:>2} steps" for s in EVAL_STEPS))
    row = "  ".join(_cell(mse_after[str(s)]) for s in EVAL_STEPS)
    print(f"  {args.algo:<15} {row}")
    row = "  ".join(_cell(scores["median"][str(s)]) for s in EVAL_STEPS)
    print(f"  {'(median)':<15} {row}")
    if baseline is not None:
        row = "  ".join(_cell(metrics["baseline_mse"][str(s)]) for s in EVAL_STEPS)
        print(f"  {'pretrained':<15} {row}")
    print(f"wrote {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
