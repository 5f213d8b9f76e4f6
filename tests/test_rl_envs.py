"""The task-family interface and 2D navigation: dynamics, seeding, episode ends, errors."""

import numpy as np
import pytest

from tinymeta.rl import make_task_family, task_family_names
from tinymeta.rl.navigation import Navigation2D


def run(family, tasks, rollouts, actions_fn, seed=None):
    obs, _ = family.reset(tasks, rollouts, seed=seed)
    trace = [obs]
    rewards = []
    for _ in range(family.horizon):
        obs, reward, terminated, truncated, _ = family.step(actions_fn(obs))
        trace.append(obs)
        rewards.append(reward)
    return np.stack(trace), np.stack(rewards), terminated, truncated


def test_navigation_spec():
    nav = Navigation2D()
    assert (nav.observation_dim, nav.action_dim, nav.horizon, nav.task_dim) == (2, 2, 100, 2)
    goals = np.array([[0.3, -0.2], [-0.5, 0.5]])
    obs, info = nav.reset(goals, 3)
    assert obs.shape == (2, 3, 2) and np.all(obs == 0)  # everyone starts at the origin
    obs, reward, terminated, truncated, info = nav.step(np.full((2, 3, 2), [0.5, -0.04]))
    np.testing.assert_allclose(obs, np.broadcast_to([0.1, -0.04], (2, 3, 2)))  # clipped to 0.1
    expected = -np.linalg.norm(np.array([0.1, -0.04]) - goals, axis=-1)
    np.testing.assert_allclose(reward, np.repeat(expected[:, None], 3, axis=1))
    np.testing.assert_allclose(info["distance"], -reward)
    assert reward.shape == terminated.shape == truncated.shape == (2, 3)
    assert terminated.dtype == bool and not terminated.any() and not truncated.any()


def test_sample_tasks_uniform_in_square_and_seeded():
    nav = Navigation2D()
    goals = nav.sample_tasks(5000, 0)
    assert goals.shape == (5000, 2) and np.all(np.abs(goals) <= 0.5)
    np.testing.assert_allclose(goals.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(goals.var(axis=0), 1 / 12, rtol=0.05)
    np.testing.assert_array_equal(goals, nav.sample_tasks(5000, np.random.default_rng(0)))
    assert not np.array_equal(goals, nav.sample_tasks(5000, 1))


def test_deterministic_under_a_seed():
    nav = make_task_family("navigation")
    goals = nav.sample_tasks(4, 7)

    def episode(seed):
        noise = np.random.default_rng(seed)
        return run(nav, goals, 3, lambda obs: noise.normal(0, 0.1, obs.shape), seed=seed)

    first, again, other = episode(11), episode(11), episode(12)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_terminates_near_the_goal_and_freezes():
    nav = Navigation2D(horizon=10)
    goals = np.array([[0.2, 0.0]])
    nav.reset(goals, 2)
    go = np.array([[[0.1, 0.0], [0.0, 0.1]]])  # rollout 0 heads for the goal, 1 away
    nav.step(go)
    obs, reward, terminated, truncated, _ = nav.step(go)
    assert terminated.tolist() == [[True, False]]
    np.testing.assert_allclose(obs[0, 0], [0.2, 0.0])
    obs, reward, terminated, _, _ = nav.step(go)
    np.testing.assert_allclose(obs[0, 0], [0.2, 0.0])  # done: actions ignored
    assert reward[0, 0] == 0.0 and reward[0, 1] < 0
    assert terminated.tolist() == [[True, False]]


def test_truncated_at_the_horizon_then_step_raises():
    nav = Navigation2D(horizon=5)
    trace, rewards, terminated, truncated = run(
        nav, np.array([[0.5, 0.5]]), 2, lambda o: np.zeros((1, 2, 2))
    )
    assert len(rewards) == 5 and truncated.all() and not terminated.any()
    with pytest.raises(RuntimeError, match="horizon"):
        nav.step(np.zeros((1, 2, 2)))


def test_oracle_appends_the_goal():
    nav = make_task_family("navigation", oracle=True)
    assert nav.observation_dim == 4
    goals = np.array([[0.1, 0.2], [-0.3, 0.4]])
    obs, _ = nav.reset(goals, 2)
    np.testing.assert_array_equal(obs[..., 2:], np.repeat(goals[:, None], 2, axis=1))
    obs, *_ = nav.step(np.full((2, 2, 2), 0.05))
    np.testing.assert_allclose(obs[..., :2], 0.05)
    np.testing.assert_array_equal(obs[..., 2:], np.repeat(goals[:, None], 2, axis=1))


def test_wrong_action_shape_names_the_expected_shape():
    nav = Navigation2D()
    nav.reset(np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match=r"\(3, 4, 2\).*got \(3, 4\)"):
        nav.step(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"got \(4, 3, 2\)"):
        nav.step(np.zeros((4, 3, 2)))


def test_nan_actions_name_the_index():
    nav = Navigation2D()
    nav.reset(np.zeros((2, 2)), 2)
    actions = np.zeros((2, 2, 2))
    actions[1, 0, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\(1, 0, 1\)"):
        nav.step(actions)
    actions[1, 0, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        nav.step(actions)


def test_unknown_task_parameters_raise():
    nav = Navigation2D()
    with pytest.raises(ValueError, match=r"goal 1 = \[0.7, 0.0\] is not in"):
        nav.reset(np.array([[0.0, 0.0], [0.7, 0.0]]), 2)
    with pytest.raises(ValueError, match="goal 0"):
        nav.reset(np.array([[np.nan, 0.0]]), 2)
    with pytest.raises(ValueError, match=r"shape \(T, 2\)"):
        nav.reset(np.array([0.1, 0.2]), 2)  # one task is tasks[None], not a vector
    with pytest.raises(ValueError, match="rollouts_per_task"):
        nav.reset(np.zeros((1, 2)), 0)
    with pytest.raises(RuntimeError, match="reset"):
        Navigation2D().step(np.zeros((1, 1, 2)))


def test_registry():
    assert "navigation" in task_family_names() and "cheetah-dir" in task_family_names()
    with pytest.raises(ValueError, match="unknown task family 'maze'.*navigation"):
        make_task_family("maze")
    assert make_task_family("navigation", horizon=7).horizon == 7
    with pytest.raises(ValueError, match="horizon"):
        make_task_family("navigation", horizon=0)


def test_environments_import_nothing_from_the_engine():
    import ast
    import inspect

    from tinymeta.rl import navigation, tasks

    for module in (tasks, navigation):
        tree = ast.parse(inspect.getsource(module))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
        }
        engine = {m for m in imported if m and m.startswith("tinymeta") and ".rl." not in m}
        assert not engine, f"{module.__name__} imports {engine}"


def test_normalized_actions_map_minus_one_one_onto_the_bounds():
    raw = make_task_family("navigation")
    scaled = make_task_family("navigation", normalized_actions=True)
    goals = np.array([[0.3, 0.3]])
    raw.reset(goals, 1)
    scaled.reset(goals, 1)
    action = np.array([[[0.5, -2.0]]])
    obs, *_ = scaled.step(action)
    np.testing.assert_allclose(obs, [[[0.05, -0.1]]])  # 0.1 * a, then clipped
    obs_raw, *_ = raw.step(action * 0.1)
    np.testing.assert_allclose(obs, obs_raw)
