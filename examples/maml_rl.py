"""MAML for reinforcement learning (Finn, Abbeel & Levine 2017, section 5.3).

A Gaussian MLP policy is meta-trained so that one vanilla policy-gradient step on a
new task's rollouts (inner rate 0.5 for navigation, 0.1 for the cheetah, as in MAML's
code) solves that task; the outer step is TRPO on the post-update rollouts,
differentiating through the inner step. Two defaults depart from MAML's code, because
with them its pre-update policy could drift away and training stall (docs/robot-control.md):
the trust region holds the pre-update policies too (``--trust-region both``), and the
inner step is differentiated in ProMP's low-variance curvature form (``--inner-loss lvc``);
``--trust-region post --inner-loss reinforce`` is MAML's algorithm (on the cheetah it gave the
best single run, though two more seeds of it learned far more slowly). Tasks: 2D
navigation to a goal in [-0.5, 0.5]^2, or half-cheetah running forward/backward
(optional extra ``rl``).
After training it evaluates on held-out tasks the mean return after 0..3 test-time
policy-gradient steps (fresh rollouts after each), for the meta-learned policy, a
policy pretrained on the mixture of tasks and fine-tuned the same way (and, with
``--pretrained-lrs``, at other step sizes), a random initialisation, and an oracle
that sees the task in its observation.

    python examples/maml_rl.py --env navigation --minutes 30        # MAML + TRPO
    python examples/maml_rl.py --algo pretrained --out runs/nav-pretrained
    python examples/maml_rl.py --baselines runs/nav-pretrained      # reuse its baselines
    python examples/maml_rl.py --env cheetah-dir --trust-region post --inner-loss reinforce
    mpiexec -n 4 python examples/maml_rl.py --env navigation        # tasks spread over 4 ranks

Under ``mpiexec`` (tinymeta.distributed) every rank draws the same meta-batch, samples and
adapts its share of the tasks, and the meta-gradient, the Fisher-vector products, the line
search's values and the statistics are summed over ranks, so every rank takes the same
step; rank 0 alone writes and evaluates. Each task's rollouts have their own generator,
seeded by (seed, phase, iteration, task), so the result does not depend on the rank count.

Writes metrics.json, checkpoints (``--resume`` continues them) and, with matplotlib,
figures to --out.
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
from tinymeta.optim import Adam
from tinymeta.rl import make_task_family
from tinymeta.rl.maml_rl import (
    INNER_LOSSES,
    fine_tune_returns,
    meta_adam_iteration,
    meta_trpo_iteration,
)
from tinymeta.rl.policy import GaussianMLPPolicy
from tinymeta.rl.tasks import PerTaskGenerators

ALGOS = ("maml", "fomaml", "pretrained")
EVAL_STEPS = 3
INNER_LR = {"navigation": 0.5, "cheetah-dir": 0.1}  # maml_trpo_point / the cheetah scripts
PHASES = {"policy": 0, "pretrained": 1, "oracle": 2}  # seeds each phase's task stream apart


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MAML with policy gradients and TRPO (meta-RL).")
    p.add_argument("--env", choices=("navigation", "cheetah-dir"), default="navigation")
    p.add_argument(
        "--algo",
        choices=ALGOS,
        default="maml",
        help="maml (second order), fomaml (first order) or pretrained (no inner step)",
    )
    p.add_argument("--meta-batch", type=int, default=20, help="tasks per meta-iteration")
    p.add_argument("--rollouts", type=int, default=20, help="rollouts per task and step")
    p.add_argument(
        "--horizon",
        type=int,
        default=None,
        help="steps per episode (default: the environment's, 100 / 200)",
    )
    p.add_argument(
        "--inner-lr",
        type=float,
        default=None,
        help="step size of the inner (and test-time) policy-gradient steps; default MAML's "
        "code's: 0.5 for navigation, 0.1 for the cheetah",
    )
    p.add_argument("--inner-steps", type=int, default=1, help="inner PG steps in meta-training")
    p.add_argument("--iterations", type=int, default=500, help="meta-iterations at most")
    p.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="stop meta-training after this many minutes (0: no limit)",
    )
    p.add_argument("--eval-tasks", type=int, default=40, help="held-out tasks to evaluate on")
    p.add_argument("--eval-rollouts", type=int, default=None, help="default: --rollouts")
    p.add_argument(
        "--pretrained-lrs",
        type=float,
        nargs="*",
        default=[],
        help="also fine-tune the pretrained policy with these step sizes (its best rate may "
        "not be MAML's); metrics.json: pretrained_returns_at_lr",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/maml_rl"))
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument(
        "--outer",
        choices=("trpo", "adam"),
        default="trpo",
        help="outer step: TRPO, or Adam on the clipped surrogate",
    )
    p.add_argument("--max-kl", type=float, default=0.01, help="TRPO's trust region")
    p.add_argument(
        "--trust-region",
        choices=("both", "post"),
        default="both",
        help="what TRPO's KL bound holds: the pre- and post-update policies (default), or "
        "the post-update ones alone, as in MAML's paper (its pre-update policy can then run "
        "away: the inner step undoes the change, so the post-update KL does not see it)",
    )
    p.add_argument(
        "--inner-loss",
        choices=INNER_LOSSES,
        default="lvc",
        help="the inner step's loss as differentiated through: lvc (default; ProMP's "
        "pi / stop_grad(pi) A: the same step, and the meta-gradient also credits the "
        "pre-update policy for the rollouts it samples) or reinforce (log pi A, as in "
        "MAML's code; its pre-update policy can drift away)",
    )
    p.add_argument("--cg-iters", type=int, default=10)
    p.add_argument(
        "--fisher",
        choices=("first-order", "exact"),
        default="exact",
        help="TRPO's metric: the exact Hessian of the mean KL through the inner step, or "
        "the adapted policies' own Fisher (inner step held constant: each iteration about "
        "2.5x cheaper, but in both task families learning was slower and stalled lower)",
    )
    p.add_argument("--meta-lr", type=float, default=3e-4, help="Adam's rate (--outer adam)")
    p.add_argument("--epochs", type=int, default=5, help="Adam steps per batch (--outer adam)")
    p.add_argument("--clip", type=float, default=0.2, help="surrogate clipping (--outer adam)")
    p.add_argument("--hidden", type=int, nargs="+", default=[100, 100])
    p.add_argument("--activation", choices=("relu", "tanh"), default="relu")
    p.add_argument(
        "--actions",
        choices=("normalized", "raw"),
        default="normalized",
        help="normalized: the policy acts in [-1, 1], mapped onto the action bounds (MAML's "
        "code: rllab's normalize wrapper); raw: the policy's actions are clipped to the bounds",
    )
    p.add_argument(
        "--init-std",
        type=float,
        default=1.0,
        help="initial standard deviation of the Gaussian policy (MAML's code: 1)",
    )
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--gae-lambda", type=float, default=1.0)
    p.add_argument(
        "--baseline-iterations",
        type=int,
        default=100,
        help="training iterations of the pretrained and oracle baselines",
    )
    p.add_argument(
        "--baseline-minutes",
        type=float,
        default=0.0,
        help="time limit of each baseline's training (0: none)",
    )
    p.add_argument(
        "--baselines",
        type=Path,
        default=None,
        help="a previous run's --out whose pretrained/oracle policies to reuse",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)  # fmt: skip
    if args.eval_rollouts is None:
        args.eval_rollouts = args.rollouts
    if args.inner_lr is None:
        args.inner_lr = INNER_LR[args.env]
    for name in ("meta_batch", "rollouts", "eval_tasks", "eval_rollouts", "iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.inner_steps < 1 and args.algo != "pretrained":
        p.error("--inner-steps must be >= 1 for maml/fomaml")
    return args


def make_policy(family, args) -> GaussianMLPPolicy:
    return GaussianMLPPolicy(
        family.observation_dim, family.action_dim, tuple(args.hidden), args.activation,
        init_std=args.init_std,
    )  # fmt: skip


def init_params(policy, seed: int, dtype) -> dict:
    return policy.init_params(seed, dtype=np.dtype(dtype))


def sum_over_ranks(vector: np.ndarray) -> np.ndarray:
    """A flat float64 vector's sum over the ranks (the vector itself in a world of one)."""
    if dist.world_size() == 1:
        return vector
    summed = tm.tensor(np.array(vector, dtype=np.float64))
    dist.all_reduce_(summed, op="sum")
    return summed.data


def task_generators(args, phase: str, iteration: int, indices) -> PerTaskGenerators:
    """Each task's own generator for its pre- and post-update rollouts: a task's episodes
    are the same whichever rank samples it (and however many ranks there are)."""
    base = [args.seed, PHASES[phase], iteration, 1]
    return PerTaskGenerators([np.random.default_rng(base + [int(i)]) for i in indices])


def train(phase: str, family, policy, args, inner_steps: int, first_order: bool, limits) -> dict:
    """Meta-train (or, with ``inner_steps=0``, plainly train) a policy; checkpoints to
    ``<out>/<phase>.npz`` every few iterations and at the end."""
    iterations, minutes = limits
    path = args.out / f"{phase}.npz"
    params = init_params(policy, args.seed, args.dtype)
    optimizer = Adam(list(params.values()), lr=args.meta_lr) if args.outer == "adam" else None
    state = {"iteration": 0, "seconds": 0.0, "pre": [], "post": []}
    if args.resume and path.exists():
        saved = tm.load(path)
        for k, p in params.items():
            p.data[...] = saved["params"][k]
        if optimizer is not None and "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
        state = {
            "iteration": int(saved["iteration"]),
            "seconds": float(saved["seconds"]),
            "pre": list(saved["pre"]),
            "post": list(saved["post"]),
        }

    def save():
        if dist.rank() != 0:
            return
        checkpoint = {
            "params": {k: p.data for k, p in params.items()},
            "iteration": state["iteration"],
            "seconds": state["seconds"],
            "pre": np.asarray(state["pre"], dtype=np.float64),
            "post": np.asarray(state["post"], dtype=np.float64),
        }
        if optimizer is not None:
            checkpoint["optimizer"] = optimizer.state_dict()
        tm.save(checkpoint, path)

    bar = tqdm(
        total=iterations, initial=state["iteration"], desc=phase,
        disable=args.quiet or dist.rank() != 0, mininterval=2,
    )  # fmt: skip
    last_save = time.perf_counter()
    while state["iteration"] < iterations:
        if minutes and state["seconds"] >= 60.0 * minutes:
            break
        start = time.perf_counter()
        rng = np.random.default_rng([args.seed, PHASES[phase], state["iteration"]])
        tasks = family.sample_tasks(args.meta_batch, rng)  # the same on every rank
        share = dist.shard(args.meta_batch)
        rngs = task_generators(args, phase, state["iteration"], share)
        common = (family, policy, params)
        shared = dict(total_tasks=args.meta_batch, reduce=sum_over_ranks)
        if optimizer is None:
            info = meta_trpo_iteration(
                *common, tasks[share], args.rollouts, args.inner_lr, inner_steps, rngs,
                first_order=first_order, max_kl=args.max_kl, cg_iters=args.cg_iters,
                gamma=args.gamma, lam=args.gae_lambda, fisher=args.fisher,
                pre_update_kl=args.trust_region == "both", inner_loss=args.inner_loss,
                **shared,
            )  # fmt: skip
        else:
            info = meta_adam_iteration(
                *common, optimizer, tasks[share], args.rollouts, args.inner_lr, inner_steps,
                rngs, first_order=first_order, epochs=args.epochs, clip=args.clip,
                gamma=args.gamma, lam=args.gae_lambda, inner_loss=args.inner_loss, **shared,
            )  # fmt: skip
        state["iteration"] += 1
        # rank 0's clock for everyone: --minutes and checkpoint timing agree on every rank
        seconds = time.perf_counter() - start if dist.rank() == 0 else 0.0
        state["seconds"] += float(sum_over_ranks(np.array([seconds]))[0])
        state["pre"].append(info["pre_return"])
        state["post"].append(info["post_return"])
        bar.update(1)
        bar.set_postfix(pre=f"{info['pre_return']:.1f}", post=f"{info['post_return']:.1f}")
        if dist.rank() == 0 and time.perf_counter() - last_save > 60.0:
            save()  # rank 0 alone: no collective, so only its clock decides
            last_save = time.perf_counter()
    bar.close()
    save()
    return {"params": params, **state}


def load_phase(path: Path, dtype) -> tuple[dict, tuple]:
    """A saved policy's parameters and its learning curve (pre, post)."""
    saved = tm.load(path)
    params = {k: tm.tensor(np.asarray(v, dtype=dtype)) for k, v in saved["params"].items()}
    return params, (list(saved["pre"]), list(saved["post"]))


def summarize(per_task: np.ndarray) -> tuple[dict, dict]:
    """Mean and 95% half-interval (1.96 standard errors over tasks) after each step."""
    n = len(per_task)
    means = {str(s): float(per_task[:, s].mean()) for s in range(per_task.shape[1])}
    ci = {
        str(s): float(1.96 * per_task[:, s].std(ddof=1) / np.sqrt(n))
        for s in range(per_task.shape[1])
    }
    return means, ci


def direction_success(family, episodes) -> float | None:
    """Share of tasks whose mean forward velocity has the asked direction (cheetah only)."""
    velocity = episodes.infos.get("x_velocity")
    if velocity is None or family.task_dim != 1:
        return None
    mask = episodes.mask
    mean_velocity = (velocity * mask).sum(axis=(1, 2)) / np.maximum(mask.sum(axis=(1, 2)), 1)
    return float(np.mean(np.sign(mean_velocity) == np.sign(episodes.tasks[:, 0])))


def evaluate(family, policy, params: dict, tasks, args, steps: int = EVAL_STEPS, lr=None):
    """Every policy meets each held-out task with the same generator (initial states and
    action noise), so the comparisons between policies are paired. ``lr``: the step size
    of the test-time steps (default: the inner rate)."""
    rng = PerTaskGenerators([np.random.default_rng([args.seed, 99, i]) for i in range(len(tasks))])
    lr = args.inner_lr if lr is None else lr
    return fine_tune_returns(
        family, policy, params, tasks, args.eval_rollouts, lr, steps, rng,
        args.gamma, args.gae_lambda,
    )  # fmt: skip


def save_figures(args, family, history, curves) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, (pre, post) in curves.items():
        x = np.arange(1, len(post) + 1)
        if name in ("pretrained", "oracle") or pre == post:  # trained without an inner step
            ax.plot(x, post, label=name)
            continue
        line = ax.plot(x, post, label=f"{name}: after the inner step")[0]
        ax.plot(x, pre, "--", color=line.get_color(), label=f"{name}: before")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("mean return (training tasks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(args.out / "learning_curve.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if args.env == "navigation":
        before, after = history[0], history[1]
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
        for t, ax in enumerate(axes):
            for episodes, style, label in ((before, ":", "pre-update"), (after, "-", "1 step")):
                for r in range(2):
                    steps = int(episodes.mask[t, r].sum())
                    xy = np.vstack([np.zeros(2), episodes.observations[t, r, 1:steps]])
                    color = "tab:blue" if label == "pre-update" else "tab:green"
                    ax.plot(*xy.T, style, color=color, label=label if r == 0 else None)
            ax.plot(*episodes.tasks[t], "r*", markersize=12, label="goal")
            ax.set_xlim(-0.6, 0.6)
            ax.set_ylim(-0.6, 0.6)
            ax.set_aspect("equal")
            ax.set_title(f"goal ({episodes.tasks[t][0]:.2f}, {episodes.tasks[t][1]:.2f})")
        axes[0].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"2D navigation, {args.algo}: before and after one policy-gradient step")
        fig.tight_layout()
        paths.append(args.out / "trajectories.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv=None):
    args = parse_args(argv)
    rank, ranks = dist.init()
    if args.meta_batch < ranks:  # the same check on every rank: all raise together
        raise ValueError(f"--meta-batch {args.meta_batch} must be >= the {ranks} ranks")
    if args.baselines is not None:  # fail before training, not after it
        for name in ("pretrained", "oracle"):
            if not (args.baselines / f"{name}.npz").exists():
                raise SystemExit(
                    f"--baselines: {args.baselines / f'{name}.npz'} does not exist "
                    "(run with --algo pretrained --out DIR first)"
                )
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    normalized = args.actions == "normalized"
    family = make_task_family(args.env, normalized, horizon=args.horizon)
    oracle_family = make_task_family(args.env, normalized, horizon=args.horizon, oracle=True)
    policy = make_policy(family, args)
    oracle_policy = make_policy(oracle_family, args)
    dtype = np.dtype(args.dtype)

    inner = 0 if args.algo == "pretrained" else args.inner_steps
    phase = "pretrained" if args.algo == "pretrained" else "policy"
    main_run = train(
        phase, family, policy, args, inner, args.algo == "fomaml", (args.iterations, args.minutes)
    )
    curves = {args.algo: (main_run["pre"], main_run["post"])}
    baseline_limits = (args.baseline_iterations, args.baseline_minutes)
    if args.baselines is not None:
        pretrained, curves["pretrained"] = load_phase(args.baselines / "pretrained.npz", dtype)
        if args.algo == "pretrained":
            pretrained = main_run["params"]
            del curves["pretrained"]
        oracle, curves["oracle"] = load_phase(args.baselines / "oracle.npz", dtype)
    else:
        if args.algo == "pretrained":
            pretrained = main_run["params"]
        else:
            run = train("pretrained", family, policy, args, 0, False, baseline_limits)
            pretrained = run["params"]
            curves["pretrained"] = (run["pre"], run["post"])
        run = train("oracle", oracle_family, oracle_policy, args, 0, False, baseline_limits)
        oracle = run["params"]
        curves["oracle"] = (run["pre"], run["post"])

    if rank != 0:  # training done: rank 0 alone evaluates and writes
        return None
    tasks = family.sample_tasks(args.eval_tasks, np.random.default_rng([args.seed, 12345]))
    returns, history = evaluate(family, policy, main_run["params"], tasks, args)
    pre_returns, pre_history = evaluate(family, policy, pretrained, tasks, args)
    pre_at_lr = {}
    for lr in args.pretrained_lrs:
        lr_means, lr_ci = summarize(evaluate(family, policy, pretrained, tasks, args, lr=lr)[0])
        pre_at_lr[str(lr)] = {"returns": lr_means, "returns_ci95": lr_ci}
    random_params = init_params(policy, args.seed + 1, dtype)
    rand_returns, rand_history = evaluate(family, policy, random_params, tasks, args)
    oracle_returns, _ = evaluate(oracle_family, oracle_policy, oracle, tasks, args, steps=0)

    means, ci = summarize(returns)
    pre_means, pre_ci = summarize(pre_returns)
    rand_means, rand_ci = summarize(rand_returns)
    oracle_mean, oracle_ci = summarize(oracle_returns)
    gap = oracle_mean["0"] - pre_means["1"]
    metrics = {
        "env": args.env,
        "algo": args.algo,
        "iterations": main_run["iteration"],
        "seconds": round(main_run["seconds"], 1),
        "returns": means,
        "returns_ci95": ci,
        "pretrained_returns": pre_means,
        "pretrained_returns_ci95": pre_ci,
        "pretrained_returns_at_lr": pre_at_lr,
        "random_returns": rand_means,
        "random_returns_ci95": rand_ci,
        "oracle_return": oracle_mean["0"],
        "oracle_return_ci95": oracle_ci["0"],
        "fraction_to_oracle_after_1_step": (means["1"] - pre_means["1"]) / gap if gap else None,
        "eval_tasks": args.eval_tasks,
        "eval_rollouts": args.eval_rollouts,
        "seed": args.seed,
        "ranks": dist.world_size(),
        "direction_success_after_1_step": direction_success(family, history[1]),
        "pretrained_direction_success_after_1_step": direction_success(family, pre_history[1]),
        "random_direction_success_after_1_step": direction_success(family, rand_history[1]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figures = save_figures(args, family, history, curves)

    print(f"{args.env} {args.algo}: {metrics['iterations']} iterations, {metrics['seconds']:.0f} s")
    print(f"mean return over {args.eval_tasks} held-out tasks (+- 95% CI) after k steps:")
    rows = [(args.algo, means, ci), ("pretrained", pre_means, pre_ci)]
    rows += [(f"pre lr {lr}", r["returns"], r["returns_ci95"]) for lr, r in pre_at_lr.items()]
    for name, m, c in rows + [("random", rand_means, rand_ci)]:
        cells = "  ".join(f"{k}: {m[k]:8.2f} +- {c[k]:5.2f}" for k in m)
        print(f"  {name:10s} {cells}")
    print(f"  {'oracle':10s} {oracle_mean['0']:8.2f} +- {oracle_ci['0']:.2f}")
    for path in figures:
        print(f"figure: {path}")
    return metrics


if __name__ == "__main__":
    main()
