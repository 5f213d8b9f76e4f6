"""examples/icl_sinusoid.py, shortened: the in-context learners learn from the support set
alone, and metrics.json has maml_sinusoid.py's keys on the same held-out tasks."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tinymeta.data import SinusoidTasks

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "icl_sinusoid.py"


def _example():
    spec = importlib.util.spec_from_file_location("icl_sinusoid", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _zero_prediction_mse(tasks: int) -> float:
    """The MSE of predicting 0 on the same held-out tasks (E[A^2] / 2 in the limit)."""
    batch = SinusoidTasks(rng=10_000).sample_batch(tasks, 10, 100)
    return float((batch.yq.astype(np.float64) ** 2).mean())


def _run(tmp_path, algo, iterations):
    metrics = _example().main(
        ["--algo", algo, "--iterations", str(iterations), "--eval-tasks", "60", "--quiet",
         "--hidden", "32", "--lr", "3e-3", "--out", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mse"] == metrics["mse"]
    for key in ("algo", "shots", "iterations", "seconds", "mse", "mse_ci95", "mse_median",
                "tasks_above_5", "diverged_tasks", "eval_seed"):  # fmt: skip
        assert key in saved
    assert set(saved["mse"]) == {"0", "1", "5", "10"}
    assert len(set(saved["mse"].values())) == 1  # no adaptation steps: one prediction
    return saved["mse"]["0"]


@pytest.mark.slow
def test_lstm_learner_beats_predicting_zero_after_a_short_run(tmp_path):
    assert _run(tmp_path, "lstm-icl", 600) < 0.75 * _zero_prediction_mse(60)


@pytest.mark.slow
def test_attention_learner_beats_predicting_zero_after_a_short_run(tmp_path):
    assert _run(tmp_path, "attention-icl", 200) < 0.8 * _zero_prediction_mse(60)


def test_attention_queries_do_not_see_each_other():
    """A query's prediction depends on the support set and its own x only."""
    import tinymeta as tm

    module = _example()
    args = module.parse_args(["--algo", "attention-icl", "--hidden", "16", "--layers", "1"])
    model = module.build(args, np.random.default_rng(0))
    batch = SinusoidTasks(rng=1).sample_batch(2, 5, 6)
    xs, ys, xq, _ = (tm.tensor(a) for a in batch)
    full = model(xs, ys, xq).numpy()
    alone = model(xs, ys, xq[:, 2:3]).numpy()
    np.testing.assert_allclose(full[:, 2:3], alone, rtol=1e-5, atol=1e-6)
    moved = model(xs, ys, tm.tensor(batch.xq[:, ::-1].copy())).numpy()[:, ::-1]
    np.testing.assert_allclose(full, moved, rtol=1e-5, atol=1e-6)
