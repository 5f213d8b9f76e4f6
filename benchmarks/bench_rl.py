"""W6: one MAML-RL meta-iteration on 2D navigation, split into its parts, beside PyTorch.

Meta-batch 20 tasks x 20 rollouts x horizon 100, policy MLP 2-100-100-2 (tanh), one inner
policy-gradient step (lr 0.1), TRPO outer step (max KL 0.01, 10 conjugate-gradient
iterations, Fisher-vector products by double backward through the inner step). Reports:

- environment steps per second: the navigation family alone (random actions), and the
  vectorized rollout with the policy in the loop (one batched forward per time step);
- one meta-iteration: sampling (pre- and post-update rollouts, baselines, advantages),
  adaptation (the differentiable inner step, every time the objective runs it) and the
  TRPO step (gradient, CG on Fisher-vector products, line search) — with the exact
  Fisher (MAML's algorithm), with the pre-update policies in the trust region as well
  (``pre_update_kl=True``), with that and ProMP's form of the inner loss
  (``inner_loss="lvc"``: the example's defaults), and with ``fisher="first-order"``;
- the same iteration written in PyTorch (task-batched matmuls, ``autograd.grad`` with
  ``create_graph=True``), on the same rollouts and initial weights, when torch imports.
  Both compute the same TRPO direction first (checked before timing).

    python benchmarks/bench_rl.py --threads 1 --clock cpu --repeats 3 --warmup 1
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, describe_machine, setup_threads  # noqa: E402

TASKS, ROLLOUTS, HORIZON, HIDDEN, INNER_LR, MAX_KL, CG_ITERS = 20, 20, 100, 100, 0.1, 0.01, 10


def parse_args(argv=None):
    p = base_parser("W6: MAML-RL meta-iteration on 2D navigation", repeats=3, warmup=1)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-torch", action="store_true", help="tinymeta only")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    threads = setup_threads(args.threads)
    import time

    import numpy as np

    from tinymeta.rl import maml_rl
    from tinymeta.rl.episodes import sample_episodes
    from tinymeta.rl.navigation import Navigation2D
    from tinymeta.rl.policy import GaussianMLPPolicy
    from tinymeta.rl.trpo import trpo_step

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = np.dtype(args.dtype)
    print(describe_machine(threads, args.clock))
    print(f"W6: {TASKS} tasks x {ROLLOUTS} rollouts x {HORIZON} steps, 2-{HIDDEN}-{HIDDEN}-2 tanh, "
          f"{args.dtype}, median of {args.repeats} after {args.warmup} warm-up")  # fmt: skip
    family = Navigation2D(horizon=HORIZON)
    policy = GaussianMLPPolicy(2, 2, (HIDDEN, HIDDEN), "tanh")
    init = policy.init_params(0, dtype=dtype)
    tasks = family.sample_tasks(TASKS, 0)
    steps = TASKS * ROLLOUTS * HORIZON

    def env_only():
        rng = np.random.default_rng(0)
        family.reset(tasks, ROLLOUTS)
        for _ in range(HORIZON):
            family.step(rng.uniform(-0.1, 0.1, size=(TASKS, ROLLOUTS, 2)))

    def rollout():
        sample_episodes(family, policy, init, tasks, ROLLOUTS, np.random.default_rng(0))

    def median_time(fn):
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.repeats):
            start = clock()
            fn()
            times.append(clock() - start)
        return float(np.median(times))

    t_env, t_rollout = median_time(env_only), median_time(rollout)
    print(f"environment alone:     {steps / t_env:12,.0f} steps/s ({t_env * 1e3:.1f} ms)")
    print(f"rollout with policy:   {steps / t_rollout:12,.0f} steps/s ({t_rollout * 1e3:.1f} ms)")

    # Time spent in the inner step, wherever the objective runs it.
    adapt_time = [0.0]
    original_adapt = maml_rl.adapt_policy

    def timed_adapt(*a, **kw):
        start = clock()
        out = original_adapt(*a, **kw)
        adapt_time[0] += clock() - start
        return out

    maml_rl.adapt_policy = timed_adapt

    def iteration(fisher, pre_update_kl, inner_loss):
        params = {k: type(v)(v.data.copy(), requires_grad=True) for k, v in init.items()}
        adapt_time[0] = 0.0
        start = clock()
        batch = maml_rl.sample_meta_batch(
            family, policy, params, tasks, ROLLOUTS, INNER_LR, 1, np.random.default_rng(1)
        )
        sampled = clock()
        sampling = sampled - start - adapt_time[0]
        adaptation_in_sampling = adapt_time[0]
        objective = maml_rl.MetaObjective(
            policy, *batch, INNER_LR, 1, fisher=fisher, pre_update_kl=pre_update_kl,
            inner_loss=inner_loss,
        )  # fmt: skip
        info = trpo_step(params, objective, max_kl=MAX_KL, cg_iters=CG_ITERS)
        total = clock() - start
        adaptation = adapt_time[0]
        return {
            "total": total,
            "sampling": sampling,
            "adaptation": adaptation,
            "trpo": total - sampling - adaptation,
            "adapt_sampling": adaptation_in_sampling,
            "info": info,
        }

    results = {}
    variants = {
        "exact": ("exact", False, "reinforce"),
        "exact+pre": ("exact", True, "reinforce"),
        "exact+pre+lvc": ("exact", True, "lvc"),
        "first-order": ("first-order", False, "reinforce"),
    }
    for name, variant in variants.items():
        runs = [iteration(*variant) for _ in range(args.warmup + args.repeats)][args.warmup :]
        parts = {k: float(np.median([r[k] for r in runs])) for k in runs[0] if k != "info"}
        results[name] = parts
        print(
            f"meta-iteration ({name:13s}): {parts['total']:6.2f} s = sampling "
            f"{parts['sampling']:5.2f} s ({100 * parts['sampling'] / parts['total']:4.1f}%) + "
            f"adaptation {parts['adaptation']:5.2f} s "
            f"({100 * parts['adaptation'] / parts['total']:4.1f}%) + TRPO step "
            f"{parts['trpo']:5.2f} s ({100 * parts['trpo'] / parts['total']:4.1f}%)"
        )
    maml_rl.adapt_policy = original_adapt
    if args.no_torch:
        return results
    try:
        import torch
    except ImportError:
        print("torch does not import: no peer")
        return results
    torch.set_num_threads(threads)
    peer = torch_iteration_factory(torch, np, family, policy, init, tasks)
    ours = tinymeta_direction(np, maml_rl, policy, init, peer["batch"])
    theirs = peer["direction"]()
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"TRPO direction, tinymeta vs torch: max difference / max = {error:.1e}")
    t_torch = median_time(peer["iteration"])
    t_ours = results["exact"]["total"]
    print(f"torch meta-iteration (exact Fisher): {t_torch:6.2f} s; "
          f"tinymeta / torch = {t_ours / t_torch:.2f}")  # fmt: skip
    results["torch"] = t_torch
    return results


def tinymeta_direction(np, maml_rl, policy, init, batch):
    """TRPO's search direction (CG solution) from tinymeta, for the cross-check."""
    from tinymeta.autograd import grad
    from tinymeta.rl.trpo import FisherVectorProduct, conjugate_gradient, flatten

    params = {k: type(v)(v.data.copy(), requires_grad=True) for k, v in init.items()}
    objective = maml_rl.MetaObjective(policy, *batch, INNER_LR, 1, fisher="exact")
    plist = list(params.values())
    loss, kl = objective(params, create_graph=True)
    g = flatten([x.data for x in grad(loss, plist, retain_graph=True)])
    return conjugate_gradient(FisherVectorProduct(kl, plist, 1e-5), -g, CG_ITERS)


def torch_iteration_factory(torch, np, family, policy, init, tasks):
    """The W6 iteration in PyTorch: the same math as tinymeta.rl, with torch tensors."""
    from tinymeta.rl.episodes import compute_advantages
    from tinymeta.rl.maml_rl import sample_meta_batch
    from tinymeta.rl.trpo import conjugate_gradient

    keys = list(init)
    dtype = getattr(torch, str(next(iter(init.values())).dtype))
    log_2pi = float(np.log(2 * np.pi))

    def forward(p, obs):
        h = obs
        for i in range(3):
            w, b = p[f"l{i}.weight"], p[f"l{i}.bias"]
            h = torch.matmul(h, w.transpose(-1, -2)) + (b[:, None, :] if b.dim() == 2 else b)
            if i < 2:
                h = torch.tanh(h)
        log_std = p["log_std"]
        return h, log_std[:, None, :] if log_std.dim() == 2 else log_std

    def log_prob(mean, log_std, a):
        return (-0.5 * ((a - mean) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * log_2pi).sum(-1)

    def sample(p, rng):
        obs, _ = family.reset(tasks, ROLLOUTS)
        out = {"obs": [], "act": [], "rew": [], "mask": []}
        alive = np.ones((TASKS, ROLLOUTS))
        with torch.no_grad():
            for _ in range(HORIZON):
                mean, log_std = forward(p, torch.as_tensor(obs, dtype=dtype))
                noise = rng.standard_normal(mean.shape)
                action = mean.numpy() + np.exp(log_std.numpy()) * noise
                nxt, reward, term, trunc, _ = family.step(action)
                for k, v in zip(out, (obs, action, reward * alive, alive)):
                    out[k].append(v)
                alive = alive * ~(term | trunc)
                obs = nxt
        from tinymeta.rl.episodes import Episodes

        stack = {k: np.stack(v, axis=2) for k, v in out.items()}
        return Episodes(tasks, stack["obs"], stack["act"], stack["rew"], stack["mask"])

    def flat(ep):
        t = ep.num_tasks
        obs = torch.as_tensor(ep.observations.reshape(t, -1, 2), dtype=dtype)
        act = torch.as_tensor(ep.actions.reshape(t, -1, 2), dtype=dtype)
        w = ep.mask.reshape(t, -1)
        return obs, act, torch.as_tensor(w / w.sum(1, keepdims=True), dtype=dtype)

    def objective_factory(p, train, train_adv, valid, valid_adv):
        tr_obs, tr_act, tr_w = flat(train)
        va_obs, va_act, va_w = flat(valid)
        tr_w = tr_w * torch.as_tensor(train_adv.reshape(TASKS, -1), dtype=dtype)
        va_adv = torch.as_tensor(valid_adv.reshape(TASKS, -1), dtype=dtype)
        old = {}

        def objective(p, create_graph):
            task_p = {k: v.expand((TASKS,) + v.shape) for k, v in p.items()}
            inner = -(log_prob(*forward(task_p, tr_obs), tr_act) * tr_w).sum()
            grads = torch.autograd.grad(inner, [task_p[k] for k in keys], create_graph=True)
            adapted = {k: task_p[k] - INNER_LR * g for k, g in zip(keys, grads)}
            mean, log_std = forward(adapted, va_obs)
            if not old:
                old.update(mean=mean.detach(), log_std=log_std.detach())
            ratio = torch.exp(
                log_prob(mean, log_std, va_act) - log_prob(old["mean"], old["log_std"], va_act)
            )
            loss = -(ratio * va_adv * va_w).sum() / TASKS
            var_ratio = torch.exp(2 * (old["log_std"] - log_std))
            diff = (old["mean"] - mean) * torch.exp(-log_std)
            kl_terms = (log_std - old["log_std"]) + 0.5 * (var_ratio + diff**2 - 1)
            kl = (kl_terms.sum(-1) * va_w).sum() / TASKS
            return loss, kl

        return objective

    def flat_np(ts):
        return np.concatenate([t.detach().numpy().ravel().astype(np.float64) for t in ts])

    def direction_and_objective(p, batch):
        objective = objective_factory(p, *batch)
        plist = [p[k] for k in keys]
        loss, kl = objective(p, True)
        g = flat_np(torch.autograd.grad(loss, plist, retain_graph=True))
        gkl = torch.autograd.grad(kl, plist, create_graph=True)

        def fvp(v):
            vs, start = [], 0
            for q in plist:
                vs.append(torch.as_tensor(v[start : start + q.numel()], dtype=dtype).view_as(q))
                start += q.numel()
            gv = sum((a * b).sum() for a, b in zip(gkl, vs))
            return flat_np(torch.autograd.grad(gv, plist, retain_graph=True)) + 1e-5 * v

        direction = conjugate_gradient(fvp, -g, CG_ITERS)
        return direction, fvp, objective, loss.item()

    def fresh():
        return {k: torch.tensor(v.numpy(), requires_grad=True) for k, v in init.items()}

    batch = sample_meta_batch(
        family, policy, init, tasks, ROLLOUTS, INNER_LR, 1, np.random.default_rng(1)
    )

    def iteration():
        p = fresh()
        rng = np.random.default_rng(1)
        train = sample(p, rng)
        train_adv = compute_advantages(train)
        task_p = {k: v.expand((TASKS,) + v.shape) for k, v in p.items()}
        tr_obs, tr_act, tr_w = flat(train)
        tr_w = tr_w * torch.as_tensor(train_adv.reshape(TASKS, -1), dtype=dtype)
        inner = -(log_prob(*forward(task_p, tr_obs), tr_act) * tr_w).sum()
        grads = torch.autograd.grad(inner, [task_p[k] for k in keys])
        adapted = {k: (task_p[k] - INNER_LR * g).detach() for k, g in zip(keys, grads)}
        valid = sample(adapted, rng)
        valid_adv = compute_advantages(valid)
        direction, fvp, objective, loss0 = direction_and_objective(
            p, (train, train_adv, valid, valid_adv)
        )
        step = np.sqrt(2 * MAX_KL / (direction @ fvp(direction))) * direction
        start = [q.detach().clone() for q in p.values()]
        fraction = 1.0
        for _ in range(15):
            with torch.no_grad():
                offset = 0
                for q, q0 in zip(p.values(), start):
                    n = q.numel()
                    q.copy_(q0 + fraction * torch.as_tensor(step[offset : offset + n]).view_as(q))
                    offset += n
            loss, kl = objective(p, False)
            if loss.item() < loss0 and kl.item() <= MAX_KL:
                break
            fraction *= 0.8

    return {
        "batch": batch,
        "direction": lambda: direction_and_objective(fresh(), batch)[0],
        "iteration": iteration,
    }


if __name__ == "__main__":
    main()
