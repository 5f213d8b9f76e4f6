"""Returns, GAE and the linear feature baseline against plain loops and numpy.linalg.lstsq."""

import numpy as np
import pytest

from tinymeta.rl.returns import LinearFeatureBaseline, discounted_returns, gae, normalize

RNG = np.random.default_rng(0)


def random_mask(shape, rng=RNG):
    """Episodes of random lengths (1..H): ones then zeros along the last axis."""
    lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
    return (np.arange(shape[-1]) < lengths[..., None]).astype(float)


def loop_returns(rewards, mask, gamma):
    out = np.zeros_like(rewards)
    for idx in np.ndindex(rewards.shape[:-1]):
        running = 0.0
        for t in reversed(range(rewards.shape[-1])):
            if mask[idx + (t,)]:
                running = rewards[idx + (t,)] + gamma * running
                out[idx + (t,)] = running
    return out


def loop_gae(rewards, values, mask, gamma, lam):
    out = np.zeros_like(rewards)
    for idx in np.ndindex(rewards.shape[:-1]):
        length = int(mask[idx].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[idx + (t + 1,)] if t + 1 < length else 0.0
            delta = rewards[idx + (t,)] + gamma * next_value - values[idx + (t,)]
            running = delta + gamma * lam * running
            out[idx + (t,)] = running
    return out


def test_discounted_returns_match_a_loop():
    rewards = RNG.normal(size=(3, 4, 9))
    mask = random_mask(rewards.shape)
    expected = loop_returns(rewards, mask, 0.9)
    np.testing.assert_allclose(discounted_returns(rewards * mask, 0.9, mask), expected)


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_a_loop(lam):
    rewards, values = RNG.normal(size=(2, 5, 8)), RNG.normal(size=(2, 5, 8))
    mask = random_mask(rewards.shape)
    expected = loop_gae(rewards, values, mask, 0.97, lam)
    np.testing.assert_allclose(gae(rewards * mask, values, 0.97, lam, mask), expected)


def test_gae_with_lambda_one_is_returns_minus_values():
    rewards, values = RNG.normal(size=(3, 7)), RNG.normal(size=(3, 7))
    mask = random_mask(rewards.shape)
    got = gae(rewards * mask, values, 0.99, 1.0, mask)
    expected = (discounted_returns(rewards * mask, 0.99, mask) - values) * mask
    np.testing.assert_allclose(got, expected)


def test_normalize_per_task_over_valid_steps():
    adv = RNG.normal(size=(2, 3, 6)) * 5 + 2
    mask = random_mask(adv.shape)
    out = normalize(adv, mask, axes=(1, 2))
    for t in range(2):
        valid = out[t][mask[t] > 0]
        assert abs(valid.mean()) < 1e-10 and abs(valid.std() - 1) < 1e-6
    assert np.all(out[mask == 0] == 0)


def test_baseline_features_are_maml_code_features():
    obs = RNG.normal(size=(1, 1, 3, 2)) * 20  # some beyond the [-10, 10] clip
    f = LinearFeatureBaseline.features(obs)[0, 0]
    o = np.clip(obs[0, 0], -10, 10)
    u = np.arange(3)[:, None] / 100.0
    np.testing.assert_allclose(f, np.hstack([o, o**2, u, u**2, u**3, np.ones((3, 1))]))


def test_baseline_fit_is_per_task_ridge_regression_as_lstsq():
    obs = RNG.normal(size=(3, 4, 10, 2))
    returns = RNG.normal(size=(3, 4, 10))
    mask = random_mask(returns.shape)
    reg = 1e-3
    baseline = LinearFeatureBaseline(reg=reg).fit(obs, returns, mask)
    for t in range(3):
        valid = mask[t].ravel() > 0
        x = LinearFeatureBaseline.features(obs[t]).reshape(-1, 8)[valid]
        y = returns[t].ravel()[valid]
        # ridge = least squares on [X; sqrt(reg) I] w = [y; 0]
        augmented = np.vstack([x, np.sqrt(reg) * np.eye(8)])
        target = np.concatenate([y, np.zeros(8)])
        expected = np.linalg.lstsq(augmented, target, rcond=None)[0]
        np.testing.assert_allclose(baseline.weights[t], expected, rtol=1e-6, atol=1e-8)
    values = baseline.predict(obs)
    np.testing.assert_allclose(
        values[1], LinearFeatureBaseline.features(obs[1]) @ baseline.weights[1]
    )


def test_baseline_recovers_a_linear_value_function():
    obs = RNG.normal(size=(2, 5, 20, 1))
    w = np.array([[1.0, -2.0, 3.0, 0.5, 0.0, 4.0], [0.0, 1.0, -1.0, 0.0, 2.0, -3.0]])
    returns = np.einsum("t...f,tf->t...", LinearFeatureBaseline.features(obs), w)
    fitted = LinearFeatureBaseline(reg=1e-10).fit(obs, returns)
    np.testing.assert_allclose(fitted.predict(obs), returns, atol=1e-5)


def test_predict_before_fit_and_bad_mask_raise():
    with pytest.raises(RuntimeError, match="fit first"):
        LinearFeatureBaseline().predict(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="mask"):
        discounted_returns(np.zeros((2, 3)), 0.9, mask=np.ones((2, 4)))
