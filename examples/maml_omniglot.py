r"""MAML on Omniglot one-shot classification (Finn, Abbeel & Levine 2017, section 5.2).

The standard MAML Omniglot network (4 blocks of 3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool
on 1x28x28 images, then a linear layer to ``--ways`` logits) is meta-trained on N-way K-shot
episodes of a background set, each character's four 90-degree rotations counting as four
classes (the MAML paper's augmentation). By default the background set is the five-alphabet
``small1`` set, the "minimal" setting of Lake et al.'s 2019 progress report.

Evaluation, after meta-training (the learned initialisation is adapted with
``--test-inner-steps`` SGD steps on each episode's support set, then classifies its queries):

- ``--eval-runs DIR``: the official 20-way within-alphabet one-shot runs (Lake et al. 2015;
  ``all_runs.zip`` or its extracted folder, from the Omniglot repository): adapt on each run's
  20 training images, classify its 20 test items; the error rate over all test items.
- the *small2 proxy*: 20-way and 5-way 1-shot episodes drawn from the three alphabets of
  ``small2`` that ``small1`` lacks (Japanese_(katakana), Sanskrit, Tagalog), no rotations;
  mean accuracy and 95% confidence interval over ``--eval-episodes`` episodes. It doubles as
  the validation set (``val_accuracy``, and the curve of ``--val-every``): nothing is
  selected on it during a run, and the official runs' 20 evaluation alphabets are disjoint
  from both small sets, so they stay an untouched test set. (small1 holds only five
  alphabets; holding two of them out would cost the meta-training a third of its data.)

BatchNorm always normalises with the statistics of the batch in front of it, in meta-training
and at test, as MAML's reference code does: the support set while adapting, the query set
while classifying (transductive). To keep test batches like the official runs' (20 test
items, one per class), a proxy episode's queries are classified in batches of one item per
class.

    python examples/maml_omniglot.py --eval-runs all_runs.zip      # 60 minutes of meta-training
    # the README's best run (82.3% on the small2 proxy):
    mpiexec -n 2 python examples/maml_omniglot.py --filters 64 --test-inner-steps 10 \
        --test-inner-lr 0.2
    python examples/maml_omniglot.py --algo metasgd --ways 5 --minutes 10
    python examples/maml_omniglot.py --resume --minutes 90   # 30 more minutes of the same run

Options beyond the paper's recipe: ``--test-inner-lr`` (the test-time SGD rate, default
``--inner-lr``), ``--flips`` (mirror images as extra classes) and ``--shift N`` (random
translations of up to N pixels).

Writes metrics.json, checkpoint.npz and (with matplotlib) the meta-training curve to --out.
Each meta-batch runs task-vectorized: the parameters get a leading task axis
(``meta.per_task``) and the episodes' images are stacked into (T, N, 1, 28, 28), so every layer
(batched convolutions, per-task BatchNorm) handles all tasks in one op and one backward pass
serves the whole meta-batch. ``--looped`` runs the episodes one after the other instead: the
same meta-gradient, with one episode's graph alive at a time (about half the peak memory).
The convolutions are already large matrix products, so vectorizing saves little Python
overhead, while arrays T times larger spill out of the cache and glibc would give them fresh
pages (page faults) on every iteration: run as a script, the example first tells malloc to
keep freed memory (``keep_freed_memory``), with which vectorized is the faster of the two
(docs/performance.md).

Run it with ``OPENBLAS_NUM_THREADS=1``: the matrices are small, and one BLAS thread per
process is the fastest setting.

Under MPI (``mpiexec -n R python examples/maml_omniglot.py ...``, one rank per idle core or
GPU; docs/distributed.md) every rank draws the same meta-batch from the same seed, computes
the meta-gradient of its share of the episodes (``tinymeta.distributed.shard``; vectorized or
looped), and one all-reduce of one flat buffer sums the shares, so every rank takes the same
outer step. Validation and the final evaluation are spread over the ranks too. Rank 0 alone
shows progress and writes metrics, figure and checkpoints (``--out`` must be on a filesystem
every rank sees, for ``--resume``); a checkpoint resumes with any number of ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import distributed as dist
from tinymeta import meta, nn
from tinymeta._checks import nonnegative_float, nonnegative_int, positive_float, positive_int
from tinymeta.backend import keep_freed_memory
from tinymeta.data import (
    EpisodeSampler,
    error_rate,
    load_omniglot,
    load_oneshot_runs,
)
from tinymeta.optim import Adam

ALGOS = ("maml", "fomaml", "metasgd", "anil", "reptile")
BACKGROUNDS = ("small1", "small2", "both", "full")
PROXY_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
PROXY_WAYS = (20, 5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="MAML and friends on Omniglot one-shot classification.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--algo", choices=ALGOS, default="maml")
    p.add_argument("--data", type=Path, default=None, help="folder of the Omniglot zips")
    p.add_argument("--background", choices=BACKGROUNDS, default="small1")
    p.add_argument(
        "--ways", type=positive_int, default=20, help="classes per meta-training episode"
    )
    p.add_argument("--shots", type=positive_int, default=1, help="support images per class")
    p.add_argument(
        "--queries", type=positive_int, default=1, help="query images per class in training"
    )
    p.add_argument(
        "--inner-steps", type=positive_int, default=1, help="inner SGD steps in meta-training"
    )
    p.add_argument("--test-inner-steps", type=positive_int, default=3, help="inner steps at test")
    p.add_argument("--inner-lr", type=positive_float, default=0.4)
    p.add_argument(
        "--test-inner-lr",
        type=nonnegative_float,
        default=None,
        help="SGD rate of the test-time steps (default: --inner-lr; Meta-SGD uses its learned "
        "rates)",
    )
    p.add_argument("--meta-batch", type=positive_int, default=8, help="episodes per meta-iteration")
    p.add_argument(
        "--meta-lr", type=positive_float, default=3e-3, help="Adam's rate for the outer step"
    )
    p.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="cosine: the meta-lr decays to 0 over the run (--iterations or --minutes, "
        "whichever ends it first)",
    )
    p.add_argument(
        "--iterations", type=positive_int, default=20000, help="meta-iterations (in total)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=60.0,
        help="stop meta-training once it has taken this long in total (resumed runs included; "
        "validation and checkpoints not counted; inf: no limit)",
    )
    p.add_argument(
        "--first-order-iterations",
        type=nonnegative_int,
        default=0,
        help="derivative-order annealing: first-order for this many iterations",
    )
    p.add_argument("--filters", type=positive_int, default=32, help="channels of every conv layer")
    p.add_argument("--no-rotations", action="store_true", help="no rotated classes in training")
    p.add_argument(
        "--flips", action="store_true", help="mirror images as extra classes in training"
    )
    p.add_argument(
        "--shift",
        type=nonnegative_int,
        default=0,
        help="move each training image by up to this many pixels (random, per image and axis)",
    )
    p.add_argument(
        "--looped",
        action="store_true",
        help="run a meta-batch's episodes one at a time (default: all at once, task-vectorized)",
    )
    p.add_argument("--eval-runs", type=Path, default=None, help="official one-shot runs folder/zip")
    p.add_argument(
        "--eval-episodes", type=nonnegative_int, default=600, help="small2-proxy episodes per way"
    )
    p.add_argument(
        "--eval-queries",
        type=positive_int,
        default=5,
        help="query images per class in proxy episodes",
    )
    p.add_argument(
        "--val-every", type=nonnegative_int, default=1000, help="validate every N iterations"
    )
    p.add_argument("--val-episodes", type=positive_int, default=100, help="episodes per validation")
    p.add_argument(
        "--checkpoint-minutes", type=positive_float, default=5.0, help="checkpoint interval"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from --out/checkpoint.npz if it exists"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", type=Path, default=Path("runs/omniglot"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("ways", "shots", "queries", "inner_steps", "test_inner_steps", "meta_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.test_inner_lr is None:
        args.test_inner_lr = args.inner_lr
    if not args.inner_lr > 0 or not args.test_inner_lr > 0:
        p.error("--inner-lr and --test-inner-lr must be positive")
    if args.shift < 0:
        p.error("--shift must be at least 0")
    if not args.minutes > 0:
        p.error("--minutes must be positive")
    return args


# ----------------------------------------------------------------------------- model


def build_model(filters: int, ways: int, rng=None) -> nn.Module:
    """MAML's Omniglot CNN: 28 -> 14 -> 7 -> 3 -> 1 pixels, then ``filters`` -> ``ways``."""
    layers, channels = [], 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, filters, 3, padding=1, rng=rng),
            # No running statistics: every batch is normalised with its own (also at test).
            nn.BatchNorm2d(filters, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = filters
    # Flatten(-3) merges (C, H, W) and leaves the batch axes alone: (N, ...) or (T, N, ...).
    return nn.Sequential(*layers, nn.Flatten(-3), nn.Linear(filters, ways, rng=rng))


def head_keys(model: nn.Module) -> list:
    last = f"{len(model) - 1}."
    return [k for k, _ in model.named_parameters() if k.startswith(last)]


def make_rule(algo: str, params: dict, args):
    """The inner update each algorithm adapts with."""
    if algo == "metasgd":
        return meta.MetaSGD(params, init_lr=args.inner_lr)
    return meta.InnerSGD(args.inner_lr)


def meta_parameters(model, rule) -> dict:
    """name -> tensor of everything the outer optimizer trains."""
    return {**dict(model.named_parameters()), **rule.named_parameters()}


# ----------------------------------------------------------------------------- meta-training


def episode_gradients(model, rule, episodes, args, first_order: bool, scale: float) -> tuple:
    """Accumulate ``scale`` times the meta-gradient of the episodes' summed query losses into
    ``.grad`` of the model's (and the rule's) parameters; return (summed loss, correct, count).

    ``episodes`` is (support x, support y, query x, query y), each with a leading episode axis.
    """
    run = looped_episode_gradients if args.looped else vectorized_episode_gradients
    return run(model, rule, episodes, args, first_order, scale)


def task_loss(logits, labels):
    """Mean cross-entropy over every query of every task: logits (..., N, ways)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def vectorized_episode_gradients(model, rule, episodes, args, first_order, scale) -> tuple:
    """All episodes as one batched computation: the parameters get a task axis
    (``meta.per_task``), each task adapts its own copy, and one backward pass through the
    query losses sums the tasks' meta-gradients into the shared parameters."""
    sx, sy, qx, qy = episodes
    tasks = len(sx)
    params = dict(model.named_parameters())
    keys = head_keys(model) if args.algo == "anil" else None
    xs, xq = tm.tensor(sx, device=args.device), tm.tensor(qx, device=args.device)

    def forward(p, x):
        return nn.functional_call(model, p, x)

    def support_loss(p):
        # The tasks are independent, so the gradient of the sum of their support losses
        # w.r.t. the per-task copies is each task's own gradient (mean over T*N, times T).
        return task_loss(forward(p, xs), sy) * tasks

    if args.algo == "reptile":
        # Reptile's meta-gradient: the sum over tasks of scale * (params - adapted).
        adapted = meta.adapt(
            support_loss, meta.per_task(params, tasks), rule, args.inner_steps, first_order=True
        )
        for k, p in params.items():
            g = tm.tensor(((p.data - adapted[k].data) * scale).sum(axis=0), device=args.device)
            p.grad = g if p.grad is None else p.grad + g
        with tm.no_grad():
            logits = forward(adapted, xq)
            loss = task_loss(logits, qy)
    else:
        # The mean of the tasks' mean query losses, and the query logits (T, N, ways).
        loss, logits = meta.maml_loss(
            forward, params, (xs, sy), (xq, qy), task_loss, rule, args.inner_steps,
            first_order=first_order, keys=keys, return_predictions=True,
        )  # fmt: skip
        (loss * (tasks * scale)).backward()
    correct = int((logits.numpy().argmax(axis=-1) == qy).sum())
    return loss.item() * tasks, correct, qy.size


def looped_episode_gradients(model, rule, episodes, args, first_order, scale) -> tuple:
    """One episode at a time, each with its own backward pass: the gradients add up in
    ``.grad`` and only one episode's graph is alive at once (the least memory)."""
    params = dict(model.named_parameters())
    keys = head_keys(model) if args.algo == "anil" else None
    device = args.device

    def forward(p, x):
        return nn.functional_call(model, p, x)

    loss_sum, correct, count = 0.0, 0, 0
    for sx, sy, qx, qy in zip(*episodes):
        xs, xq = tm.tensor(sx, device=device), tm.tensor(qx, device=device)
        if args.algo == "reptile":
            # Reptile's meta-gradient params - adapted (meta.reptile_grads), looped here so
            # that the adapted parameters can also score the queries.
            adapted = meta.adapt(
                lambda p, xs=xs, sy=sy: F.cross_entropy(forward(p, xs), sy),
                params, rule, args.inner_steps, first_order=True,
            )  # fmt: skip
            for k, p in params.items():
                g = tm.tensor((p.data - adapted[k].data) * scale, device=device)
                p.grad = g if p.grad is None else p.grad + g
            with tm.no_grad():
                logits = forward(adapted, xq)
                loss = F.cross_entropy(logits, qy)
        else:
            # A meta-batch of one episode: its query loss and logits (1, N, ways).
            loss, logits = meta.maml_loss(
                forward, params, (xs[None], sy[None]), (xq[None], qy[None]), F.cross_entropy,
                rule, args.inner_steps, first_order=first_order, keys=keys, vectorized=False,
                return_predictions=True,
            )  # fmt: skip
            logits = logits[0]
            (loss * scale).backward()
        loss_sum += loss.item()
        correct += int((logits.numpy().argmax(axis=1) == qy).sum())
        count += len(qy)
    return loss_sum, correct, count


def share_gradients(model, rule, batch, args, first_order: bool) -> tuple:
    """This rank's share of the meta-gradient of the mean query loss over the meta-batch, into
    ``.grad``: its episodes' summed meta-gradients over the meta-batch's size, so that the
    shares sum over the ranks to the whole meta-batch's (also when they are unequal).

    Returns (summed query loss, correct, count) of this rank's episodes."""
    for t in meta_parameters(model, rule).values():
        t.grad = None
    share = dist.shard(len(batch[0]))
    episodes = [field[share] for field in batch]
    return episode_gradients(model, rule, episodes, args, first_order, 1.0 / len(batch[0]))


def sum_over_ranks(model, rule, numbers: list) -> list:
    """Sum the ranks' meta-gradient shares, and ``numbers``, with one all-reduce.

    The numbers (statistics of the shares) ride in the same flat buffer as the gradient of
    one more tensor, so a meta-iteration costs one all-reduce."""
    tensors = list(meta_parameters(model, rule).values())
    carrier = tm.zeros(len(numbers), dtype=tensors[0].dtype, device=tensors[0].device)
    carrier.grad = tm.tensor(numbers, dtype=carrier.dtype, device=carrier.device)
    dist.all_reduce_grads_([*tensors, carrier], op="sum")
    return carrier.grad.numpy().tolist()


def sum_shards(values: np.ndarray) -> np.ndarray:
    """The sum over the ranks of arrays that each rank filled at its own shard's entries."""
    total = tm.tensor(values, dtype=np.float64)
    dist.all_reduce_(total, op="sum")
    return total.numpy()


# ----------------------------------------------------------------------------- evaluation


def eval_setup(model, rule, n: int, args):
    """An ``n``-way copy of the learned initialisation (and of the rule), cut from the graph.

    A model meta-trained for ``ways`` classes has ``ways`` head rows; since episode labels
    are shuffled in meta-training, the rows are interchangeable, so an ``n``-way task uses
    rows 0, 1, ..., ways-1, 0, 1, ... (a 20-way model drops rows for 5-way tasks, a 5-way
    model repeats its rows for 20-way tasks).
    """
    rows = np.arange(n) % args.ways
    head = set(head_keys(model))
    eval_model = model if n == args.ways else build_model(args.filters, n)
    eval_model = eval_model.to(args.device)

    def leaf(k, t):
        data = t.data[rows] if k in head else t.data
        return tm.tensor(data, device=args.device, requires_grad=True)

    params = {k: leaf(k, t) for k, t in model.named_parameters()}
    if isinstance(rule, meta.MetaSGD):
        eval_rule = meta.MetaSGD(params)
        eval_rule.lrs = {
            k: tm.tensor(lr.data[rows] if k in head else lr.data, device=args.device)
            for k, lr in rule.lrs.items()
        }
    else:
        eval_rule = meta.InnerSGD(args.test_inner_lr)
    return eval_model, params, eval_rule


def adapt_and_classify(eval_model, params, rule, support, query_batches, args) -> list:
    """Adapt on ``support = (x, y)`` with the test-time steps; predicted labels per batch."""
    keys = head_keys(eval_model) if args.algo == "anil" else None
    xs = tm.tensor(support[0], device=args.device)

    def forward(p, x):
        return nn.functional_call(eval_model, p, x)

    adapted = meta.adapt(
        lambda p: F.cross_entropy(forward(p, xs), support[1]),
        params, rule, args.test_inner_steps, first_order=True, keys=keys,
    )  # fmt: skip
    with tm.no_grad():
        return [
            forward(adapted, tm.tensor(xq, device=args.device)).numpy().argmax(axis=1)
            for xq in query_batches
        ]


def mean_ci95(values) -> tuple:
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def evaluate_episodes(model, rule, dataset, n: int, episodes: int, args, seed: int) -> list:
    """Per-episode accuracy on ``n``-way ``--shots``-shot episodes of ``dataset``.

    Each episode's queries (``--eval-queries`` per class) are classified in batches of one
    item per class, so that BatchNorm sees test batches like the official runs'. Under MPI
    each rank scores its share of the episodes (every rank draws all of them, so the
    episodes are the same for any number of ranks).
    """
    eval_model, params, eval_rule = eval_setup(model, rule, n, args)
    sampler = EpisodeSampler(dataset, n, args.shots, args.eval_queries, rng=seed)
    q = args.eval_queries
    mine = set(dist.shard(episodes).tolist())
    accuracies = np.zeros(episodes)
    for i in range(episodes):
        ep = sampler.sample()
        if i not in mine:
            continue
        # query_y is [0]*q + [1]*q + ...: the items j, j+q, j+2q, ... are one per class.
        batches = [ep.query_x[j::q] for j in range(q)]
        preds = adapt_and_classify(
            eval_model, params, eval_rule, (ep.support_x, ep.support_y), batches, args
        )
        truth = [ep.query_y[j::q] for j in range(q)]
        accuracies[i] = np.mean(np.concatenate(preds) == np.concatenate(truth))
    return sum_shards(accuracies).tolist()


def evaluate_runs(model, rule, runs, args) -> tuple:
    """Error rate on one-shot runs: adapt on each run's training images, classify its test
    items (as one batch), score with ``tinymeta.data.error_rate``. Under MPI each rank
    classifies its share of the runs."""
    ends = np.cumsum([len(run.test_y) for run in runs])
    table = np.zeros(ends[-1] if len(runs) else 0)
    for r in dist.shard(len(runs)):
        run = runs[r]
        eval_model, params, eval_rule = eval_setup(model, rule, run.ways, args)
        (pred,) = adapt_and_classify(
            eval_model, params, eval_rule, (run.train_x, run.train_y), [run.test_x], args
        )
        table[ends[r] - len(pred) : ends[r]] = pred
    predictions = np.split(sum_shards(table).astype(np.int64), ends[:-1])
    err = error_rate(predictions, runs)
    total = sum(len(run.test_y) for run in runs)
    return err, 1.96 * math.sqrt(err * (1 - err) / total), total


def load_proxy(args):
    """The small2 alphabets that small1 lacks, or None (with a warning) if small2 is absent."""
    try:
        small2 = load_omniglot("small2", root=args.data)
    except FileNotFoundError as exc:
        warnings.warn(f"small2 proxy skipped: {exc}", stacklevel=2)
        return None
    return small2.subset(alphabets=PROXY_ALPHABETS)


# ----------------------------------------------------------------------------- bookkeeping


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


CONFIG_KEYS = ("algo", "ways", "shots", "filters", "background")


def save_checkpoint(path: Path, model, rule, outer, state: dict, args) -> None:
    tm.save(
        {
            "model": model.state_dict(),
            "rule": rule.named_parameters(),
            "optimizer": outer.state_dict(),
            "iteration": state["iteration"],
            "seconds": state["seconds"],
            "history": {k: np.asarray(v, dtype=np.float64) for k, v in state["history"].items()},
            "config": {k: getattr(args, k) for k in CONFIG_KEYS},
        },
        path,
    )


def load_checkpoint(path: Path, model, rule, outer, args) -> dict:
    ckpt = tm.load(path)
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    if ckpt["config"] != config:
        raise ValueError(f"{path} was written by a run with {ckpt['config']}, not {config}")
    model.load_state_dict(ckpt["model"])
    with tm.no_grad():
        for k, t in rule.named_parameters().items():
            t.copy_(ckpt["rule"][k].numpy())
    outer.load_state_dict(ckpt["optimizer"])
    return {
        "iteration": int(ckpt["iteration"]),
        "seconds": float(ckpt["seconds"]),
        "history": {k: np.asarray(v).tolist() for k, v in ckpt["history"].items()},
    }


def new_history() -> dict:
    return {"loss": [], "accuracy": [], "val_iteration": [], "val_accuracy": []}


def meta_train(model, rule, outer, train_set, proxy, state: dict, args, checkpoint) -> dict:
    """Meta-train from ``state["iteration"]`` until ``--iterations`` or ``--minutes``."""
    start = state["iteration"]
    budget = args.minutes * 60.0
    history = state["history"]
    # Seeded by the starting iteration too: a resumed run draws fresh episodes.
    sampler = EpisodeSampler(
        train_set, args.ways, args.shots, args.queries,
        rng=np.random.default_rng([args.seed, start]), rotations=not args.no_rotations,
        flips=args.flips, max_shift=args.shift,
    )  # fmt: skip
    root = dist.rank() == 0
    bar = tqdm(
        total=args.iterations, initial=start, desc=args.algo, disable=args.quiet or not root,
        mininterval=1,
    )  # fmt: skip
    last_save = tick = time.perf_counter()
    try:
        for it in range(start, args.iterations):
            # Every rank stops at the same iteration: state["seconds"] is rank 0's clock.
            if state["seconds"] >= budget:
                break
            batch = sampler.sample_batch(args.meta_batch)  # the same on every rank
            if args.schedule == "cosine":
                progress = min(1.0, max(it / args.iterations, state["seconds"] / budget))
                for group in outer.param_groups:
                    group["lr"] = args.meta_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
            first_order = args.algo == "fomaml" or it < args.first_order_iterations
            loss, correct, count = share_gradients(model, rule, batch, args, first_order)
            # Rank 0's seconds since the last iteration's reduction travel with the gradients.
            now = time.perf_counter()
            seconds, tick = (now - tick if root else 0.0), now
            loss, correct, count, seconds = sum_over_ranks(
                model, rule, [loss, correct, count, seconds]
            )
            loss, accuracy = loss / args.meta_batch, correct / count
            outer.step()
            state["seconds"] += seconds
            state["iteration"] = it + 1
            history["loss"].append(loss)
            history["accuracy"].append(accuracy)
            bar.update(1)
            if it % 20 == 0:
                recent = history["accuracy"][-100:]
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{np.mean(recent):.3f}")
            paused = time.perf_counter()  # validation and checkpoints are not meta-training
            if proxy is not None and args.val_every > 0 and (it + 1) % args.val_every == 0:
                accs = evaluate_episodes(
                    model, rule, proxy, args.ways, args.val_episodes, args, seed=args.seed + 1
                )
                history["val_iteration"].append(it + 1)
                history["val_accuracy"].append(float(np.mean(accs)))
                if root:
                    bar.write(f"iteration {it + 1}: validation accuracy {np.mean(accs):.3f}")
            if root and time.perf_counter() - last_save > args.checkpoint_minutes * 60:
                checkpoint(state)
                last_save = time.perf_counter()
            tick += time.perf_counter() - paused
    finally:
        bar.close()
    if root:
        checkpoint(state)
    return state


def plot(history: dict, args, figure_path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    acc = np.asarray(history["accuracy"])
    if len(acc) == 0:
        return None
    window = max(1, min(100, len(acc) // 10))
    smooth = np.convolve(acc, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(window, len(acc) + 1), smooth, label=f"training queries (mean of {window})")
    if history["val_accuracy"]:
        ax.plot(
            history["val_iteration"],
            history["val_accuracy"],
            "o-",
            label="small2 proxy (validation)",
        )
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"{args.ways}-way {args.shots}-shot accuracy after adaptation")
    ax.set_title(f"{args.algo} on Omniglot ({args.background})")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure_path, dpi=100)
    plt.close(fig)
    return figure_path


def main(argv=None):
    args = parse_args(argv)
    ranks = dist.init()[1]
    if ranks > args.meta_batch:
        raise SystemExit(f"{ranks} MPI ranks need --meta-batch >= {ranks}, not {args.meta_batch}")
    root = dist.rank() == 0  # shows progress, writes metrics, figure and checkpoints
    if root:
        args.out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    train_set = load_omniglot(args.background, root=args.data)
    proxy = load_proxy(args) if args.eval_episodes > 0 or args.val_every > 0 else None
    held_out = not set(PROXY_ALPHABETS) & set(train_set.alphabets)
    if proxy is not None and not held_out and root:
        warnings.warn(
            f"the {args.background} background set contains the small2-proxy alphabets: "
            "the proxy accuracies are not held-out numbers",
            stacklevel=1,
        )

    model = build_model(args.filters, args.ways, rng).to(args.device)
    rule = make_rule(args.algo, dict(model.named_parameters()), args)
    outer = Adam(list(meta_parameters(model, rule).values()), lr=args.meta_lr)
    path = args.out / "checkpoint.npz"
    state = {"iteration": 0, "seconds": 0.0, "history": new_history()}
    if args.resume and path.is_file():
        state = load_checkpoint(path, model, rule, outer, args)
        if root:
            print(f"resumed from {path} at iteration {state['iteration']}")
    start_iteration = state["iteration"]
    first = tm.tensor([start_iteration], dtype=np.float64)
    dist.broadcast_(first)
    if first.item() != start_iteration:
        raise RuntimeError(
            f"rank {dist.rank()} starts at iteration {start_iteration}, rank 0 at "
            f"{int(first.item())}: --out must be on a filesystem that every rank sees"
        )

    def checkpoint(s):
        save_checkpoint(path, model, rule, outer, s, args)

    state = meta_train(model, rule, outer, train_set, proxy, state, args, checkpoint)
    done = state["iteration"] - start_iteration

    tick = time.perf_counter()
    metrics = {
        "algo": args.algo,
        "ways": args.ways,
        "shots": args.shots,
        "queries": args.queries,
        "background": args.background,
        "filters": args.filters,
        "inner_steps": args.inner_steps,
        "test_inner_steps": args.test_inner_steps,
        "inner_lr": args.inner_lr,
        "test_inner_lr": args.test_inner_lr,
        "meta_batch": args.meta_batch,
        "meta_lr": args.meta_lr,
        "schedule": args.schedule,
        "first_order_iterations": args.first_order_iterations,
        "rotations": not args.no_rotations,
        "flips": args.flips,
        "shift": args.shift,
        "ranks": ranks,
        "vectorized": not args.looped,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "iterations": state["iteration"],
        "seconds": round(state["seconds"], 2),
        "seconds_per_iteration": round(state["seconds"] / state["iteration"], 4)
        if state["iteration"]
        else None,
        "val_accuracy": None,
        "val_ci95": None,
        "runs_error_rate": None,
        "runs_error_ci95": None,
        "runs_total": None,
        "proxy_alphabets": list(PROXY_ALPHABETS),
        "proxy_held_out": held_out,
        "proxy_episodes": 0,
    }
    for n in PROXY_WAYS:
        metrics[f"proxy_{n}way_accuracy"] = metrics[f"proxy_{n}way_ci95"] = None
    if proxy is not None and args.eval_episodes > 0:
        metrics["proxy_episodes"] = args.eval_episodes
        for n in dict.fromkeys((*PROXY_WAYS, args.ways)):
            accs = evaluate_episodes(
                model, rule, proxy, n, args.eval_episodes, args, seed=args.seed + 10_000
            )
            mean, ci = mean_ci95(accs)
            if n in PROXY_WAYS:
                metrics[f"proxy_{n}way_accuracy"], metrics[f"proxy_{n}way_ci95"] = mean, ci
            if n == args.ways:
                metrics["val_accuracy"], metrics["val_ci95"] = mean, ci
    if args.eval_runs is not None:
        runs = load_oneshot_runs(args.eval_runs)
        err, ci, total = evaluate_runs(model, rule, runs, args)
        metrics["runs_error_rate"], metrics["runs_error_ci95"] = err, ci
        metrics["runs_total"] = total
    history = state["history"]
    if history["loss"]:
        metrics["final_train_loss"] = float(np.mean(history["loss"][-100:]))
        metrics["final_train_accuracy"] = float(np.mean(history["accuracy"][-100:]))
    metrics["eval_seconds"] = round(time.perf_counter() - tick, 2)
    metrics["wall_seconds"] = round(time.perf_counter() - wall, 2)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    metrics["checkpoint"] = str(path)
    if not root:
        return metrics
    figure = plot(history, args, args.out / "omniglot.png")
    if figure is not None:
        metrics["figure"] = str(figure)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    print(
        f"\n{args.algo}, {args.ways}-way {args.shots}-shot on {args.background}: "
        f"{state['iteration']} iterations ({done} in this run), {state['seconds']:.0f} s of "
        f"meta-training, peak RSS {metrics['peak_rss_mb']:.0f} MB"
    )
    for n in PROXY_WAYS:
        if metrics[f"proxy_{n}way_accuracy"] is not None:
            print(
                f"  small2 proxy {n:>2}-way 1-shot accuracy: "
                f"{100 * metrics[f'proxy_{n}way_accuracy']:.1f}% "
                f"+- {100 * metrics[f'proxy_{n}way_ci95']:.1f}"
            )
    if metrics["runs_error_rate"] is not None:
        print(
            f"  official one-shot runs: {100 * metrics['runs_error_rate']:.1f}% error "
            f"+- {100 * metrics['runs_error_ci95']:.1f} ({metrics['runs_total']} test items)"
        )
    print(f"wrote {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    keep_freed_memory()  # only as a script: main() called from a test leaves malloc alone
    main()
