"""examples/maml_forecasting.py: the second-order MAML meta-gradient through the LSTM
forecaster (backpropagation through time inside the inner gradient, tasks on a task axis)
against finite differences in float64, and a short run that learns to adapt."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import tinymeta as tm
from tinymeta import meta
from tinymeta.testing import check_grads

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "maml_forecasting.py"


def _example():
    spec = importlib.util.spec_from_file_location("maml_forecasting", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("vectorized", [True, False])
def test_second_order_meta_gradient_matches_finite_differences(vectorized):
    ex = _example()
    model = ex.Forecaster(3, np.random.default_rng(0)).to("cpu", "float64")
    names = [n for n, _ in model.named_parameters()]
    data, _ = ex.sample_tasks(np.random.default_rng(1), 2, 2, 3)
    data = [a.astype(np.float64) for a in data]

    def meta_loss(*values):
        params = dict(zip(names, values))
        with tm.enable_grad():  # the checker evaluates under no_grad; the inner step needs it
            xs, ys, xq, yq = (tm.tensor(a) for a in data)
            return meta.maml_loss(
                ex.forward_fn(model), params, (xs, ys), (xq, yq), ex.mse,
                meta.InnerSGD(0.05), 1, vectorized=vectorized,
            )  # fmt: skip

    assert check_grads(meta_loss, [p.numpy() for p in model.parameters()], order=1)


@pytest.mark.slow
def test_short_run_learns_to_adapt_better_than_pretraining(tmp_path):
    metrics = _example().main(
        ["--iterations", "100", "--baseline-steps", "100", "--eval-tasks", "50", "--quiet",
         "--out", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mse"] == metrics["mse"]
    mse, baseline = saved["mse"], saved["baseline_mse"]
    assert mse["1"] < 0.8 * mse["0"] and mse["10"] < mse["1"]
    assert mse["10"] < baseline["10"]
