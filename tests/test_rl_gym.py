"""The Gymnasium adapter and the half-cheetah direction task family (needs the ``rl`` extra)."""

import sys

import numpy as np
import pytest

from tinymeta.rl import PerTaskGenerators, make_task_family

pytestmark = pytest.mark.filterwarnings("ignore:MuJoCo:RuntimeWarning")

CTRL_COST = 0.5 * 0.1  # MAML's rllab half-cheetah: 1e-1 * 0.5 * sum(square(clip(a)))


@pytest.fixture(scope="module")
def gymnasium():
    pytest.importorskip("mujoco")
    return pytest.importorskip("gymnasium")


@pytest.fixture(scope="module", params=["mujoco", "gymnasium"])
def cheetah(request, gymnasium):
    family = make_task_family("cheetah-dir", stepper=request.param)
    yield family
    family.close()


def _run(family, tasks, rollouts, steps, seed, action_seed=0, scale=1.5):
    """Observations, rewards, x-velocities and actions of ``steps`` steps with random actions."""
    rng = np.random.default_rng(action_seed)
    obs, _ = family.reset(tasks, rollouts, seed=seed)
    trace = {"obs": [obs], "reward": [], "x_velocity": [], "actions": []}
    for _ in range(steps):
        actions = scale * rng.standard_normal((len(tasks), rollouts, family.action_dim))
        obs, reward, _, _, info = family.step(actions)
        for key, value in (("obs", obs), ("reward", reward), ("actions", actions)):
            trace[key].append(value)
        trace["x_velocity"].append(info["x_velocity"])
    return {key: np.stack(value) for key, value in trace.items()}


def test_deterministic_under_a_seed(cheetah):
    tasks = np.array([[1.0], [-1.0]])
    a = _run(cheetah, tasks, rollouts=3, steps=5, seed=7)
    b = _run(cheetah, tasks, rollouts=3, steps=5, seed=7)
    c = _run(cheetah, tasks, rollouts=3, steps=5, seed=8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a["obs"][0], c["obs"][0])
    # every episode starts from its own noisy initial state
    assert not np.allclose(a["obs"][0, 0, 0], a["obs"][0, 0, 1])


def test_per_task_generators_give_a_task_its_own_initial_states(cheetah):
    """With one generator per task, a task's initial states depend on its generator alone,
    not on the tasks reset beside it (what makes a distributed run's rollouts independent
    of the rank count); the reset does not replace the family's own generator."""
    tasks = np.array([[1.0], [-1.0], [1.0]])

    def gens(seeds):
        return PerTaskGenerators([np.random.default_rng(s) for s in seeds])

    together, _ = cheetah.reset(tasks, 2, seed=gens([10, 11, 12]))
    alone, _ = cheetah.reset(tasks[2:], 2, seed=gens([12]))
    np.testing.assert_array_equal(together[2], alone[0])
    swapped, _ = cheetah.reset(tasks, 2, seed=gens([11, 10, 12]))
    np.testing.assert_array_equal(swapped[0], together[1])
    assert not np.allclose(together[0], together[1])
    cheetah.reset(tasks, 2, seed=5)
    after_seed, _ = cheetah.reset(tasks, 2)
    cheetah.reset(tasks, 2, seed=5)
    cheetah.reset(tasks, 2, seed=gens([1, 2, 3]))  # must not touch the family's generator
    np.testing.assert_array_equal(cheetah.reset(tasks, 2)[0], after_seed)
    with pytest.raises(ValueError, match="2 per-task generators for 3 tasks"):
        cheetah.reset(tasks, 2, seed=gens([1, 2]))


def test_reward_matches_gymnasium_halfcheetah(cheetah, gymnasium, tmp_path, monkeypatch):
    """Against plain ``gymnasium.make`` environments seeded as the family documents."""
    monkeypatch.chdir(tmp_path)  # MuJoCo appends its warnings to ./MUJOCO_LOG.TXT
    tasks = np.array([[1.0], [-1.0]])
    rollouts, steps, seed = 2, 6, 3
    trace = _run(cheetah, tasks, rollouts, steps, seed)
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=len(tasks) * rollouts)
    for k, env_seed in enumerate(seeds):
        t, r = divmod(k, rollouts)
        env = gymnasium.make("HalfCheetah-v5")
        obs, _ = env.reset(seed=int(env_seed))
        np.testing.assert_allclose(trace["obs"][0, t, r], obs, rtol=0, atol=1e-12)
        for s in range(steps):
            action = np.clip(trace["actions"][s, t, r], -1.0, 1.0)
            obs, _, _, _, info = env.step(action)
            expected = tasks[t, 0] * info["x_velocity"] - CTRL_COST * np.sum(action**2)
            np.testing.assert_allclose(trace["obs"][s + 1, t, r], obs, rtol=0, atol=1e-9)
            np.testing.assert_allclose(trace["reward"][s, t, r], expected, rtol=0, atol=1e-9)
        env.close()
    # the actions were often outside [-1, 1], so the clipping was exercised
    assert (np.abs(trace["actions"]) > 1).mean() > 0.2


def test_direction_flips_the_velocity_term(cheetah):
    forward = _run(cheetah, np.array([[1.0]]), rollouts=2, steps=8, seed=5)
    backward = _run(cheetah, np.array([[-1.0]]), rollouts=2, steps=8, seed=5)
    np.testing.assert_array_equal(forward["obs"], backward["obs"])
    velocity = forward["x_velocity"]
    ctrl = CTRL_COST * np.sum(np.clip(forward["actions"], -1, 1) ** 2, axis=-1)
    assert np.abs(velocity).max() > 0.05  # the velocity term is not trivially zero
    np.testing.assert_allclose(forward["reward"], velocity - ctrl, rtol=0, atol=1e-12)
    np.testing.assert_allclose(backward["reward"], -velocity - ctrl, rtol=0, atol=1e-12)


def test_steppers_agree_bit_for_bit(gymnasium):
    tasks = np.array([[-1.0], [1.0], [1.0]])
    fast = make_task_family("cheetah-dir", stepper="mujoco")
    plain = make_task_family("cheetah-dir", stepper="gymnasium")
    a = _run(fast, tasks, rollouts=2, steps=10, seed=11)
    b = _run(plain, tasks, rollouts=2, steps=10, seed=11)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_shapes_horizon_and_oracle(gymnasium):
    family = make_task_family("cheetah-dir", horizon=3, oracle=True)
    assert family.default_horizon == 200 and family.horizon == 3
    tasks = family.sample_tasks(4, rng=0)
    assert tasks.shape == (4, 1)
    obs, info = family.reset(tasks, rollouts_per_task=5, seed=0)
    assert obs.shape == (4, 5, 18) and obs.dtype == np.float64
    np.testing.assert_array_equal(obs[..., -1], np.broadcast_to(tasks, (4, 5)))
    for step in range(3):
        obs, reward, terminated, truncated, info = family.step(np.zeros((4, 5, 6), np.float32))
        assert obs.shape == (4, 5, 18) and reward.shape == (4, 5)
        assert info["x_velocity"].shape == (4, 5)
        assert not terminated.any()
        assert truncated.all() == (step == 2)
    with pytest.raises(RuntimeError, match="horizon"):
        family.step(np.zeros((4, 5, 6)))


def test_sample_tasks(gymnasium):
    family = make_task_family("cheetah-dir")
    tasks = family.sample_tasks(200, rng=1)
    assert set(np.unique(tasks)) == {-1.0, 1.0}
    assert 0.35 < (tasks == 1).mean() < 0.65
    np.testing.assert_array_equal(tasks, family.sample_tasks(200, rng=1))
    assert not np.array_equal(tasks, family.sample_tasks(200, rng=2))


def test_errors_name_the_problem(gymnasium):
    family = make_task_family("cheetah-dir", horizon=5)
    with pytest.raises(ValueError, match=r"unknown task parameter \[0.5\] \(task 1\).*\+1"):
        family.reset(np.array([[1.0], [0.5]]), 2)
    with pytest.raises(ValueError, match="unknown task parameter"):
        family.reset(np.array([[np.nan]]), 2)
    with pytest.raises(ValueError, match=r"shape \(T, 1\)"):
        family.reset(np.array([1.0, -1.0]), 2)
    family.reset(np.array([[1.0], [-1.0]]), 2, seed=0)
    with pytest.raises(ValueError, match=r"\(2, 2, 6\).*\(2, 2, 5\)"):
        family.step(np.zeros((2, 2, 5)))
    bad = np.zeros((2, 2, 6))
    bad[1, 0, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\(1, 0, 3\)"):
        family.step(bad)
    with pytest.raises(ValueError, match="stepper"):
        make_task_family("cheetah-dir", stepper="threads")


def test_missing_gymnasium_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    from tinymeta.rl.gym_tasks import HalfCheetahDirection

    with pytest.raises(ImportError, match=r'pip install -e "\.\[rl\]"'):
        HalfCheetahDirection()


def test_missing_mujoco_says_which_extra(gymnasium, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[rl\]"'):
        make_task_family("cheetah-dir")


def test_no_mujoco_log_in_the_working_directory(gymnasium, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_task_family("cheetah-dir").reset(np.array([[1.0]]), 1, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_mujoco_deprecations_are_deprecation_warnings_and_others_runtime_warnings(gymnasium):
    import mujoco

    from tinymeta.rl.gym_tasks import _mujoco_warnings_as_python_warnings

    with pytest.warns() as record, _mujoco_warnings_as_python_warnings():
        mujoco.get_mju_user_warning()("compiler attribute 'x' is deprecated")
        mujoco.get_mju_user_warning()("Nan, Inf or huge value in QACC at DOF 0")
    categories = {str(w.message): w.category for w in record}
    assert categories == {
        "MuJoCo: compiler attribute 'x' is deprecated": DeprecationWarning,
        "MuJoCo: Nan, Inf or huge value in QACC at DOF 0": RuntimeWarning,
    }
