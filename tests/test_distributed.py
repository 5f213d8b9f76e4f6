"""tinymeta.distributed: a world of one in this process, and worlds of two under ``mpiexec``.

The multi-process checks launch this file as a script under ``mpiexec -n 2`` (``python
tests/test_distributed.py CHECK``), grouped so that few launches (about a second of imports
each) cover them; rank 0 prints its findings as one JSON line that the test reads. They are
skipped where mpi4py or ``mpiexec`` is missing (``pip install -e ".[test,mpi]"`` has both).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tinymeta as tm
from tinymeta import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# mpiexec comes with the mpich wheel, next to this interpreter when it runs in a venv.
MPIEXEC = shutil.which(
    "mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
)
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and mpiexec (pip install -e '.[mpi]')",
)


def launch(ranks: int, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks python args...`` with one BLAS thread per rank."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    command = [MPIEXEC, "-n", str(ranks), sys.executable, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def findings(run: subprocess.CompletedProcess) -> dict:
    """The JSON line rank 0 printed, after checking that every rank finished cleanly."""
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("FINDINGS ")]
    assert len(lines) == 1, run.stdout[-3000:]
    return json.loads(lines[0][len("FINDINGS ") :])


# ----------------------------------------------------------------------------- world of one


def test_without_mpiexec_a_process_is_a_world_of_one():
    assert "PMI_SIZE" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ
    assert dist.init() == (0, 1) and dist.init() == (0, 1)  # safe to call twice
    assert dist.is_initialized() and dist.rank() == 0 and dist.world_size() == 1
    np.testing.assert_array_equal(dist.shard(5), np.arange(5))
    assert dist.shard(0).size == 0
    a = tm.tensor([1.0, 2.0])
    b = tm.tensor([[3.0]], dtype=np.float64)
    dist.all_reduce_([a, b], op="mean")
    dist.all_reduce_({"a": a}, op="sum")
    dist.broadcast_(a)
    dist.barrier()
    np.testing.assert_array_equal(a.numpy(), [1.0, 2.0])
    assert b.item() == 3.0
    p, q = tm.tensor([1.0], requires_grad=True), tm.tensor([2.0], requires_grad=True)
    p.grad = tm.tensor([5.0])
    dist.all_reduce_grads_([p, q])
    assert p.grad.item() == 5.0 and q.grad is None
    assert "mpi4py.MPI" not in sys.modules  # never imported outside mpiexec


def test_import_tinymeta_does_not_import_mpi4py():
    code = "import sys, tinymeta; tinymeta.nn; print('mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_errors_name_the_call_and_what_was_expected():
    t = tm.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"all_reduce_: op must be one of \('mean', 'sum'\)"):
        dist.all_reduce_([t], op="max")
    with pytest.raises(ValueError, match="all_reduce_grads_: op must be"):
        dist.all_reduce_grads_([t], op="avg")
    with pytest.raises(TypeError, match="all_reduce_: item 1 is a ndarray, expected a Tensor"):
        dist.all_reduce_([t, np.ones(2)])
    with pytest.raises(TypeError, match='op="mean" needs floating tensors; item 0 is int64'):
        dist.all_reduce_([tm.tensor([1, 2])], op="mean")
    dist.all_reduce_([tm.tensor([1, 2])], op="sum")  # integers can be summed
    p = tm.tensor([1.0, 2.0], requires_grad=True)
    p.grad = tm.tensor([1.0])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(2,\).*\.grad has shape \(1,\)"):
        dist.all_reduce_grads_([p])
    with pytest.raises(ValueError, match=r"broadcast_: root must be a rank in \[0, 1\), got 1"):
        dist.broadcast_([t], root=1)
    with pytest.raises(ValueError, match="shard: n must be an int >= 0"):
        dist.shard(-1)


class OnGpu(tm.Tensor):
    """A host tensor that says it is on the GPU: the device check without a GPU."""

    @property
    def device(self) -> str:
        return "cuda"


def test_tensors_on_mixed_devices_are_refused():
    with pytest.raises(
        ValueError, match=r"all_reduce_: tensors on mixed devices \['cpu', 'cuda'\]"
    ):
        dist.all_reduce_([tm.tensor([1.0]), OnGpu([1.0])])
    p = tm.tensor([1.0], requires_grad=True)
    p.grad = OnGpu(np.array([1.0], np.float32))
    q = tm.tensor([1.0], requires_grad=True)
    q.grad = tm.tensor([1.0])
    with pytest.raises(ValueError, match="all_reduce_grads_: tensors on mixed devices"):
        dist.all_reduce_grads_([p, q])


def test_launched_by_mpiexec_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setattr(dist, "_initialized", False)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    with pytest.raises(ImportError, match=r"world size 2.*pip install 'tinymeta\[mpi\]'"):
        dist.init()
    assert not dist.is_initialized()


@needs_mpi
def test_a_launcher_whose_world_mpi_does_not_see_is_an_error():
    """mpiexec of one MPI with mpi4py bound to another: each process is a world of one."""
    env = {**os.environ, "PMI_SIZE": "2", "PMI_RANK": "0"}  # as if launched, but not
    code = "from tinymeta import distributed; distributed.init()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert "the launcher started 2 processes but MPI sees a world of 1" in run.stderr


# ----------------------------------------------------------------------------- under mpiexec


TASKS = 7  # a meta-batch that two ranks share unequally: 4 and 3 tasks


def mlp_problem(rng):
    """A 1-16-1 ReLU MLP on TASKS sinusoid tasks (float64), mean squared error."""
    model = tm.nn.Sequential(
        tm.nn.Linear(1, 16, rng=rng), tm.nn.ReLU(), tm.nn.Linear(16, 1, rng=rng)
    ).double()
    tasks = tm.data.SinusoidTasks(rng=rng).sample_batch(TASKS, 5, 5)
    data = [a.astype(np.float64) for a in tasks]

    def loss(pred, target):
        return ((pred - target) ** 2).mean()

    return model, data, loss


def conv_problem(rng):
    """A conv -> BatchNorm -> ReLU -> pool -> linear net on TASKS 3-way tasks of 8x8 images."""
    nn = tm.nn
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, rng=rng), nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(-3), nn.Linear(64, 3, rng=rng),
    ).double()  # fmt: skip
    images = [rng.standard_normal((TASKS, 6, 1, 8, 8)) for _ in range(2)]
    labels = [np.tile(np.arange(3), (TASKS, 2)) for _ in range(2)]
    data = [images[0], labels[0], images[1], labels[1]]

    def loss(logits, labels):
        return tm.nn.functional.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1))

    return model, data, loss


def meta_gradient(model, data, loss, tasks, vectorized: bool, weight: float = 1.0) -> list:
    """The second-order MAML meta-gradient (2 inner steps) of ``tasks``, times ``weight``."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    xs, ys, xq, yq = (a[tasks] for a in data)
    xs, xq = tm.tensor(xs), tm.tensor(xq)
    ys, yq = (tm.tensor(y) if y.dtype.kind == "f" else y for y in (ys, yq))

    def forward(p, x):
        return tm.nn.functional_call(model, p, x)

    meta_loss = tm.meta.maml_loss(
        forward, params, (xs, ys), (xq, yq), loss, 0.1, 2, vectorized=vectorized
    )
    (meta_loss * weight).backward()
    return list(params.values())


def mpi_collectives() -> dict:
    """Run on every rank of ``mpiexec -n 2``; rank 0's findings go back to the test."""
    rank, size = dist.init()
    found = {"rank_size": [rank, size], "shards": [len(dist.shard(25)), len(dist.shard(1))]}
    # Two dtypes: two flat buffers.
    a = tm.tensor(np.arange(3.0) + 10 * rank)
    b = tm.tensor(np.full((2, 2), rank + 1.0, np.float32))
    dist.all_reduce_([a, b], op="mean")
    found["mean"] = [a.numpy().tolist(), b.numpy().ravel().tolist(), str(b.dtype)]
    dist.all_reduce_({"a": a}, op="sum")
    found["sum"] = a.numpy().tolist()
    c = tm.tensor([float(rank)] * 2, requires_grad=True)
    dist.broadcast_([c], root=1)
    found["broadcast"] = c.numpy().tolist()
    # Gradients: everywhere, on rank 1 only, nowhere.
    params = [tm.tensor(np.zeros(2), requires_grad=True) for _ in range(3)]
    params[0].grad = tm.tensor(np.array([rank + 1.0, 2.0]))
    if rank == 1:
        params[1].grad = tm.tensor(np.broadcast_to(np.float64(4.0), (2,)))  # read-only
    dist.all_reduce_grads_(params, op="mean")
    found["grads"] = [None if p.grad is None else p.grad.numpy().tolist() for p in params]
    try:
        dist.all_reduce_([tm.tensor(np.zeros(2 + rank))])
    except ValueError as exc:
        found["mismatch"] = str(exc)
    dist.barrier()

    # Meta-gradients of the whole meta-batch (every rank alone) and of the shards (summed).
    worst = {}
    for name, problem in (("mlp", mlp_problem), ("conv_bn", conv_problem)):
        model, data, loss = problem(np.random.default_rng(0))
        everything = np.arange(TASKS)
        for vectorized in (True, False):
            alone = [
                p.grad.numpy().copy()
                for p in meta_gradient(model, data, loss, everything, vectorized)
            ]
            share = dist.shard(TASKS)
            params = meta_gradient(model, data, loss, share, vectorized, len(share) / TASKS)
            dist.all_reduce_grads_(params, op="sum")
            scale = max(np.abs(g).max() for g in alone)
            gap = max(np.abs(p.grad.numpy() - g).max() for p, g in zip(params, alone))
            worst[f"{name}_{'vectorized' if vectorized else 'looped'}"] = [gap, scale]
    found["meta_gradient"] = worst
    return found


def mpi_cuda() -> dict:
    """CuPy tensors (both ranks on the same GPU): reduced through the host, back on the GPU."""
    rank, _ = dist.init()
    a = tm.tensor(np.arange(3.0) + 10 * rank, device="cuda")
    dist.all_reduce_([a], op="mean")
    params = [tm.tensor(np.zeros(2), device="cuda", requires_grad=True) for _ in range(2)]
    params[0].grad = tm.tensor(np.array([rank + 1.0, 2.0]), device="cuda")
    dist.all_reduce_grads_(params, op="sum")
    b = tm.tensor([float(rank)], device="cuda")
    dist.broadcast_([b], root=1)
    return {
        "mean": a.numpy().tolist(),
        "grad": params[0].grad.numpy().tolist(),
        "none": params[1].grad is None,
        "broadcast": b.numpy().tolist(),
        "devices": [a.device, params[0].grad.device, b.device],
    }


def mpi_raise() -> dict:
    """Rank 1 raises while rank 0 waits for it in a barrier."""
    rank, _ = dist.init()
    if rank == 1:
        print(f"RAISING AT {time.time()}", flush=True)
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()
    time.sleep(60)  # never reached: the abort ends this rank too
    return {}


def mpi_early() -> dict:
    """Rank 1 is done at once; rank 0 still works for a second, then reports."""
    rank, _ = dist.init()
    if rank == 0:
        time.sleep(1.0)
    return {"rank_0_finished": True}


@needs_mpi
def test_collectives_and_meta_gradients_under_mpiexec():
    found = findings(launch(2, __file__, "collectives"))
    assert found["rank_size"] == [0, 2]
    assert found["shards"] == [13, 1]  # rank 0's share of 25 and of 1 (rank 1's: 12 and 0)
    assert found["mean"] == [[5.0, 6.0, 7.0], [1.5] * 4, "float32"]
    assert found["sum"] == [10.0, 12.0, 14.0]
    assert found["broadcast"] == [1.0, 1.0]
    # Rank 1's gradient of the second parameter counts with zeros from rank 0 (mean of 2);
    # the third has none anywhere and stays None.
    assert found["grads"] == [[1.5, 2.0], [2.0, 2.0], None]
    assert "all_reduce_: the ranks hold different tensors" in found["mismatch"]
    assert "rank 0 holds 1: [((2,), 'float64')]" in found["mismatch"]
    assert set(found["meta_gradient"]) == {
        "mlp_vectorized", "mlp_looped", "conv_bn_vectorized", "conv_bn_looped"
    }  # fmt: skip
    for name, (gap, scale) in found["meta_gradient"].items():
        assert scale > 1e-3, name  # not a comparison of zeros
        assert gap <= 1e-12 * scale, (name, gap, scale)


@needs_mpi
@pytest.mark.gpu
def test_cuda_tensors_are_reduced_through_the_host():
    if not tm.cuda.is_available():
        pytest.skip("needs CuPy and a CUDA device")
    found = findings(launch(2, __file__, "cuda"))
    assert found["mean"] == [5.0, 6.0, 7.0]
    assert found["grad"] == [3.0, 4.0] and found["none"] is True
    assert found["broadcast"] == [1.0]
    assert found["devices"] == ["cuda"] * 3


@needs_mpi
def test_a_rank_that_raises_ends_the_whole_job_with_its_error():
    run = launch(2, __file__, "raise", timeout=120)
    ended = time.time()
    output = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode != 0, output
    assert "RuntimeError: rank 1 fails on purpose" in run.stderr, output
    assert "uncaught exception on rank 1" in run.stderr, output
    (raised,) = (float(line.split()[-1]) for line in run.stdout.splitlines() if "RAISING" in line)
    assert ended - raised < 10, output  # an abort, not the barrier's endless wait


@needs_mpi
def test_a_rank_that_finishes_first_does_not_end_the_others():
    """A rank that returns early exits normally (MPI_Finalize), and the others go on."""
    assert findings(launch(2, __file__, "early")) == {"rank_0_finished": True}


def load_example(name: str):
    """An example script as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_mpi
def test_sinusoid_example_with_two_ranks_ends_where_one_process_does(tmp_path):
    """20 meta-iterations, 25 tasks per meta-batch (13 and 12 per rank), float64."""
    argv = ["--iterations", "20", "--eval-tasks", "10", "--no-baseline", "--quiet"]
    argv += ["--dtype", "float64", "--algo", "metasgd"]
    run = launch(2, EXAMPLES / "maml_sinusoid.py", *argv, "--out", tmp_path / "two")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # rank 0 alone reports
    one = load_example("maml_sinusoid").main(argv + ["--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-10)
    ckpt1, ckpt2 = (
        tm.load(tmp_path / "one" / "checkpoint.npz"),
        tm.load(tmp_path / "two" / "checkpoint.npz"),
    )
    for group in ("model", "rule"):  # Meta-SGD's learned rates are reduced too
        assert set(ckpt1[group]) == set(ckpt2[group]) and ckpt1[group]
        for k in ckpt1[group]:
            a, b = np.asarray(ckpt1[group][k]), np.asarray(ckpt2[group][k])
            assert a.dtype == np.float64
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-10, err_msg=f"{group}.{k}")
    start = load_example("maml_sinusoid").build_model(np.random.default_rng(0))
    moved = max(
        np.abs(np.asarray(ckpt1["model"][k]) - v).max() for k, v in start.state_dict().items()
    )
    assert moved > 1e-3  # the 20 steps did move the parameters


@needs_mpi
def test_omniglot_checkpoint_of_two_ranks_resumes_with_one_and_with_two(
    tmp_path, omniglot_archives
):
    tiny = ["--ways", "5", "--filters", "8", "--meta-batch", "3", "--quiet", "--seed", "0"]
    tiny += ["--eval-episodes", "0", "--val-every", "0"]  # no evaluation: small1 alone
    example = EXAMPLES / "maml_omniglot.py"
    run = launch(2, example, *tiny, "--iterations", "2", "--out", tmp_path / "first")
    assert run.returncode == 0, run.stderr[-3000:]
    first = tm.load(tmp_path / "first" / "checkpoint.npz")
    assert first["iteration"] == 2 and len(first["history"]["loss"]) == 2
    for ranks in (1, 2):
        out = tmp_path / f"resumed{ranks}"
        out.mkdir()
        shutil.copy(tmp_path / "first" / "checkpoint.npz", out)
        run = launch(ranks, example, *tiny, "--iterations", "3", "--resume", "--out", out)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("resumed from") == 1
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["ranks"] == ranks and metrics["iterations"] == 3
    one, two = (tm.load(tmp_path / f"resumed{r}" / "checkpoint.npz") for r in (1, 2))
    assert one["iteration"] == two["iteration"] == 3
    np.testing.assert_allclose(two["history"]["loss"], one["history"]["loss"], rtol=1e-5)
    np.testing.assert_array_equal(two["history"]["accuracy"], one["history"]["accuracy"])
    for k, a in one["model"].items():
        a, b = np.asarray(a), np.asarray(two["model"][k])
        if k.endswith("bias") and int(k.split(".")[0]) % 4 == 0:
            # A conv bias in front of BatchNorm has an exactly-zero meta-gradient: Adam scales
            # its rounding noise up to steps of about the meta-lr, in any direction.
            continue
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=k)


@needs_mpi
@pytest.mark.parametrize(
    "env, outer", [("navigation", "trpo"), ("navigation", "adam"), ("cheetah-dir", "trpo")]
)
def test_rl_example_with_two_ranks_ends_where_one_process_does(tmp_path, env, outer):
    """2 meta-iterations of 3 tasks (2 and 1 per rank), float64: the same policy as one
    process. The tasks' rollouts (actions and, for the cheetah, initial states) have their
    own generators, so they are the same on either rank count, and the sums over ranks
    differ from one process's sums in rounding alone (about 1e-16 relative; 1e-10 leaves
    room for conjugate gradient and a line search that amplify it, yet is far below the
    steps' size of about 0.1). The cheetah's contact dynamics amplify rounding further: the
    policy after one iteration agrees to 4e-16, but the second iteration's rollouts, sampled
    by it through 50 MuJoCo steps each, differ in their returns by about 1e-8 relative and the
    final policies by about 2e-9 (measured), so its tolerances are 1e-6 and 1e-7."""
    if env == "cheetah-dir":
        pytest.importorskip("gymnasium")
        pytest.importorskip("mujoco")
    argv = ["--env", env, "--meta-batch", "3", "--rollouts", "2", "--horizon", "10"]
    argv += ["--iterations", "2", "--baseline-iterations", "1", "--eval-tasks", "3"]
    argv += ["--hidden", "8", "8", "--dtype", "float64", "--quiet", "--outer", outer]
    run = launch(2, EXAMPLES / "maml_rl.py", *argv, "--out", tmp_path / "two")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(f"{env} maml:") == 1  # rank 0 alone evaluates and reports
    example = load_example("maml_rl")
    one = example.main(argv + ["--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["iterations"] == two["iterations"] == 2
    from tinymeta.rl import make_task_family

    family = make_task_family(env, True, horizon=10)
    policy = example.make_policy(family, example.parse_args(argv))
    start = example.init_params(policy, 0, np.float64)
    returns_rtol, params_atol = (1e-6, 1e-7) if env == "cheetah-dir" else (1e-10, 1e-10)
    for phase in ("policy", "pretrained", "oracle"):
        a, b = (tm.load(tmp_path / r / f"{phase}.npz") for r in ("one", "two"))
        np.testing.assert_allclose(b["post"], a["post"], rtol=returns_rtol, err_msg=phase)
        np.testing.assert_allclose(b["pre"], a["pre"], rtol=returns_rtol, err_msg=phase)
        for k, v in a["params"].items():
            assert np.asarray(v).dtype == np.float64
            np.testing.assert_allclose(b["params"][k], v, rtol=0, atol=params_atol, err_msg=k)
    final = tm.load(tmp_path / "one" / "policy.npz")["params"]
    assert max(np.abs(np.asarray(final[k]) - v.data).max() for k, v in start.items()) > 1e-3


CHECKS = {
    "collectives": mpi_collectives,
    "cuda": mpi_cuda,
    "raise": mpi_raise,
    "early": mpi_early,
}

if __name__ == "__main__":
    result = CHECKS[sys.argv[1]]()
    if dist.rank() == 0:
        print("FINDINGS " + json.dumps(result), flush=True)
