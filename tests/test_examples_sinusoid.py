"""The README's main job, shortened: MAML on sinusoids learns to adapt, and beats the
pretrained baseline after one step; the outputs are what the README promises."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import tinymeta as tm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "maml_sinusoid.py"


def _example():
    spec = importlib.util.spec_from_file_location("maml_sinusoid", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_maml_run_adapts_and_beats_the_baseline(tmp_path):
    metrics = _example().main(
        ["--iterations", "600", "--baseline-steps", "600", "--eval-tasks", "60", "--quiet",
         "--out", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mse"] == metrics["mse"]
    keys = ("algo", "shots", "iterations", "seconds", "mse", "mse_ci95", "mse_median")
    keys += ("tasks_above_5", "diverged_tasks", "baseline_mse", "baseline_mse_median")
    for key in keys:
        assert key in saved
    assert set(saved["mse"]) == {"0", "1", "5", "10"}
    mse, baseline = saved["mse"], saved["baseline_mse"]
    assert mse["1"] < 0.9 * mse["0"]  # one step on 10 points helps a lot
    assert mse["10"] < mse["1"]
    assert mse["1"] < baseline["1"]  # the meta-learned start adapts better than pretraining
    checkpoint = tm.load(tmp_path / "checkpoint.npz")
    assert set(checkpoint["model"]) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}


@pytest.mark.parametrize("algo", ["fomaml", "reptile", "metasgd", "anil", "learned-opt"])
def test_every_algorithm_runs_and_improves_with_adaptation(algo, tmp_path):
    metrics = _example().main(
        ["--algo", algo, "--iterations", "150", "--eval-tasks", "30", "--no-baseline",
         "--quiet", "--out", str(tmp_path)]
    )  # fmt: skip
    assert metrics["algo"] == algo
    assert metrics["mse"]["1"] < metrics["mse"]["0"]
    rule_params = tm.load(tmp_path / "checkpoint.npz")["rule"]
    assert bool(rule_params) == (algo in ("metasgd", "learned-opt"))


def test_a_meta_step_that_blows_up_is_skipped_not_applied(tmp_path):
    """An inner rate of 50 makes the 3-step inner loop overflow on some batches: those steps
    must be counted and skipped, leaving every meta-parameter finite."""
    metrics = _example().main(
        ["--algo", "metasgd", "--inner-lr", "50", "--inner-steps", "3", "--iterations", "20",
         "--eval-tasks", "10", "--no-baseline", "--quiet", "--out", str(tmp_path)]
    )  # fmt: skip
    assert metrics["skipped_steps"] > 0
    checkpoint = tm.load(tmp_path / "checkpoint.npz")
    for group in ("model", "rule"):
        for name, value in checkpoint[group].items():
            assert np.isfinite(np.asarray(value)).all(), f"{group}.{name}"


def test_clipping_bounds_the_first_meta_step(tmp_path):
    """With Adam the first step moves each coordinate by about lr whatever the gradient's
    scale, so clipping is checked through the gradient itself: the clipped norm is <= max."""
    example = _example()
    args = example.parse_args(["--iterations", "1", "--clip-grad", "1e-3", "--quiet"])
    model = example.build_model(np.random.default_rng(0))
    rule = example.make_rule("maml", dict(model.named_parameters()), args)
    example.meta_train(model, rule, args, progress=False)
    norm = np.sqrt(sum(float((p.grad.numpy() ** 2).sum()) for p in model.parameters()))
    assert norm <= 1e-3 * (1 + 1e-4)


def test_paper_init_is_small_truncated_normal_with_zero_biases():
    example = _example()
    model = example.build_model(np.random.default_rng(0), init="paper")
    weights = np.concatenate(
        [p.numpy().ravel() for k, p in model.named_parameters() if k.endswith("weight")]
    )
    assert np.abs(weights).max() <= 0.02  # truncated at two standard deviations
    assert 0.007 < weights.std() < 0.01  # 0.01 before truncation (0.88 of it after)
    for k, p in model.named_parameters():
        if k.endswith("bias"):
            assert not p.numpy().any(), k
    default = example.build_model(np.random.default_rng(0))
    assert np.abs(default.state_dict()["0.weight"]).max() > 0.1  # uniform +-1 for fan-in 1
    assert example.parse_args(["--init", "paper"]).init == "paper"


def test_evaluation_statistics_are_those_of_the_per_task_errors():
    """The held-out tasks come from --eval-seed alone (two training seeds are scored on the
    same tasks), and the reported mean, median and outlier count are those of the per-task
    query MSE, computed here by hand before any adaptation step."""
    example = _example()
    model = example.build_model(np.random.default_rng(3))
    rule = example.make_rule("maml", dict(model.named_parameters()), example.parse_args([]))
    runs = [
        example.evaluate(model, rule, example.parse_args(
            ["--seed", str(seed), "--eval-seed", "7", "--eval-tasks", "40", "--eval-points", "20"]
        ))
        for seed in (0, 1)
    ]  # fmt: skip
    assert runs[0] == runs[1]

    batch = example.SinusoidTasks(rng=7).sample_batch(40, 10, 20)
    with tm.no_grad():
        per_task = ((model(tm.tensor(batch.xq)).numpy() - batch.yq) ** 2).mean(axis=(1, 2))
    stats = runs[0]
    assert stats["mean"]["0"] == pytest.approx(per_task.mean(), rel=1e-5)
    assert stats["median"]["0"] == pytest.approx(np.median(per_task), rel=1e-5)
    assert stats["outliers"]["0"] == int((per_task > example.OUTLIER_MSE).sum())
    assert stats["diverged"]["0"] == 0
    worst = batch.amplitudes[np.argsort(per_task)[::-1][:5]]
    np.testing.assert_allclose(stats["worst"]["0"], worst, atol=1e-3)
