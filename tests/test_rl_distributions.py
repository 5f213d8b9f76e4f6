"""Policy distributions: closed forms, sampling, and float64 gradchecks to second order."""

import math

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.rl.distributions import Categorical, DiagGaussian
from tinymeta.testing import gradcheck, gradgradcheck

RNG = np.random.default_rng(0)


def t64(a, grad=True):
    return tm.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def gaussian_log_prob(x, mean, log_std):
    std = np.exp(log_std)
    return np.sum(-0.5 * ((x - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def test_gaussian_log_prob_entropy_kl_closed_forms():
    mean, log_std = RNG.normal(size=(4, 3)), RNG.normal(size=3) * 0.3
    mean2, log_std2 = RNG.normal(size=(4, 3)), RNG.normal(size=3) * 0.3
    x = RNG.normal(size=(4, 3))
    p, q = DiagGaussian(t64(mean), t64(log_std)), DiagGaussian(t64(mean2), t64(log_std2))
    np.testing.assert_allclose(p.log_prob(x).numpy(), gaussian_log_prob(x, mean, log_std))
    entropy = np.sum(log_std) + 1.5 * (1 + math.log(2 * math.pi))
    np.testing.assert_allclose(p.entropy().numpy(), np.full(4, entropy))
    s1, s2 = np.exp(log_std), np.exp(log_std2)
    kl = np.sum(np.log(s2 / s1) + (s1**2 + (mean - mean2) ** 2) / (2 * s2**2) - 0.5, axis=-1)
    np.testing.assert_allclose(p.kl(q).numpy(), kl)
    np.testing.assert_allclose(p.kl(p).numpy(), np.zeros(4), atol=1e-12)


def test_gaussian_kl_matches_monte_carlo_of_log_ratio():
    p = DiagGaussian(t64([[0.3, -0.2]]), t64([-0.5, 0.1]))
    q = DiagGaussian(t64([[0.0, 0.4]]), t64([0.2, -0.3]))
    rng = np.random.default_rng(1)
    x = p.mean.numpy() + np.exp(p.log_std.numpy()) * rng.standard_normal((200_000, 2))
    log_ratio = gaussian_log_prob(x, p.mean.numpy(), p.log_std.numpy()) - gaussian_log_prob(
        x, q.mean.numpy(), q.log_std.numpy()
    )
    assert abs(log_ratio.mean() - p.kl(q).item()) < 0.01


def test_gaussian_sample_moments_and_seed():
    p = DiagGaussian(t64(np.tile([0.5, -1.0], (100_000, 1))), t64([np.log(0.1), np.log(2.0)]))
    x = p.sample(np.random.default_rng(3))
    np.testing.assert_allclose(x.mean(axis=0), [0.5, -1.0], atol=0.02)
    np.testing.assert_allclose(x.std(axis=0), [0.1, 2.0], rtol=0.02)
    np.testing.assert_array_equal(x, p.sample(np.random.default_rng(3)))


def test_gaussian_task_axis_log_std_broadcasts():
    mean = RNG.normal(size=(2, 5, 3))
    log_std = RNG.normal(size=(2, 1, 3))
    x = RNG.normal(size=(2, 5, 3))
    p = DiagGaussian(t64(mean), t64(log_std))
    np.testing.assert_allclose(p.log_prob(x).numpy(), gaussian_log_prob(x, mean, log_std))
    with pytest.raises(ValueError, match="does not broadcast"):
        DiagGaussian(t64(mean), t64(np.zeros(4)))


@pytest.mark.parametrize("which", ["log_prob", "entropy", "kl"])
def test_gaussian_gradcheck_first_and_second_order(which):
    x = RNG.normal(size=(3, 2))
    mean2, log_std2 = t64(RNG.normal(size=(3, 2))), t64(RNG.normal(size=2) * 0.3)

    def fn(mean, log_std, mean2, log_std2):
        p = DiagGaussian(mean, log_std)
        if which == "log_prob":
            return p.log_prob(x)
        if which == "entropy":
            return p.entropy()
        return p.kl(DiagGaussian(mean2, log_std2))

    inputs = [t64(RNG.normal(size=(3, 2))), t64(RNG.normal(size=2) * 0.3), mean2, log_std2]
    assert gradcheck(fn, inputs, full=True)
    assert gradgradcheck(fn, inputs, full=True)


def test_categorical_closed_forms():
    logits, logits2 = RNG.normal(size=(4, 5)), RNG.normal(size=(4, 5))
    p, q = Categorical(t64(logits)), Categorical(t64(logits2))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs2 = np.exp(logits2) / np.exp(logits2).sum(-1, keepdims=True)
    actions = np.array([0, 4, 2, 2])
    np.testing.assert_allclose(p.log_prob(actions).numpy(), np.log(probs[np.arange(4), actions]))
    np.testing.assert_allclose(p.entropy().numpy(), -(probs * np.log(probs)).sum(-1))
    kl = (probs * (np.log(probs) - np.log(probs2))).sum(-1)
    np.testing.assert_allclose(p.kl(q).numpy(), kl)


def test_categorical_sample_frequencies():
    logits = np.log([[0.1, 0.6, 0.3]])
    p = Categorical(t64(np.repeat(logits, 60_000, axis=0)))
    a = p.sample(np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(a, minlength=3) / len(a), [0.1, 0.6, 0.3], atol=0.01)


def test_categorical_bad_actions_raise():
    p = Categorical(t64(np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        p.log_prob(np.array([0, 3]))
    with pytest.raises(TypeError, match="integers"):
        p.log_prob(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="batch shape"):
        p.log_prob(np.array([0, 1, 2]))


@pytest.mark.parametrize("which", ["log_prob", "entropy", "kl"])
def test_categorical_gradcheck_first_and_second_order(which):
    actions = np.array([1, 0, 3])

    def fn(logits, logits2):
        p = Categorical(logits)
        if which == "log_prob":
            return p.log_prob(actions)
        if which == "entropy":
            return p.entropy()
        return p.kl(Categorical(logits2))

    inputs = [t64(RNG.normal(size=(3, 4))), t64(RNG.normal(size=(3, 4)))]
    assert gradcheck(fn, inputs, full=True)
    assert gradgradcheck(fn, inputs, full=True)
