"""examples/lstm_optimizer_omniglot.py and examples/lstm_optimizer_quadratic.py, tiny: a few
meta-iterations, few steps, small networks. metrics.json has the documented keys, the LSTM
optimizer's losses are finite and fall over the optimisation steps, the wider unseen network is
evaluated, and the meta-trained weights round-trip through ``tm.save``/``tm.load``.

The Omniglot tests need the small Omniglot background sets (found through ``omniglot_root()``:
set ``$TINYMETA_DATA`` to their folder); they skip, saying so, without them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import tinymeta as tm
from tinymeta import meta
from tinymeta.data import load_omniglot

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASELINES = ("sgd", "nesterov", "rmsprop", "adam")


def _example(stem: str):
    spec = importlib.util.spec_from_file_location(stem, EXAMPLES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_into_fresh(path: Path, key: str) -> meta.LSTMOptimizer:
    """A new LSTMOptimizer (other random weights) given the weights saved under ``key``."""
    saved = tm.load(path)[key]
    fresh = meta.LSTMOptimizer(rng=12345)
    assert set(saved) == set(fresh.named_parameters())
    for name, value in saved.items():
        fresh.weights[name.removeprefix("lstm_opt.")] = tm.tensor(np.asarray(value.numpy()))
    return fresh


# --- Omniglot: an MLP classifier as the optimizee ------------------------------------------------


@pytest.fixture(scope="module")
def omniglot_example(tmp_path_factory, omniglot_archives):
    """The example module, with decoded archives cached in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYMETA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield _example("lstm_optimizer_omniglot")


def test_omniglot_tiny_run_writes_the_documented_metrics(omniglot_example, tmp_path):
    argv = ["--iterations", "2", "--steps", "10", "--unroll", "5", "--hidden", "4",
            "--wide", "8", "--meta-lr", "1e-2", "--tune-problems", "1", "--eval-problems", "2",
            "--quiet", "--out", str(tmp_path)]  # fmt: skip
    metrics = omniglot_example.main(argv)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved) == {
        "iterations", "meta_train_seconds", "tuned_lr", "eval_problems", "mean_training_loss",
    }  # fmt: skip
    assert saved["iterations"] == 2 and saved["eval_problems"] == 2
    assert set(saved["tuned_lr"]) == set(BASELINES)
    assert all(1e-3 <= lr <= 10 for lr in saved["tuned_lr"].values())  # on the grid
    # Both widths, the meta-training one and the wider unseen one, are evaluated.
    assert set(saved["mean_training_loss"]) == {"mlp-4", "mlp-8"}
    for width, table in saved["mean_training_loss"].items():
        assert set(table) == {*BASELINES, "lstm"}, width
        for name, row in table.items():
            # Steps past --steps are left out; the reported ones are finite.
            assert set(row) == {"1", "10", "mean"}, (width, name)
            assert all(np.isfinite(v) for v in row.values()), (width, name)
        # Same problems and initialisations for every optimizer: the same first loss, near
        # log(10) for a 10-way classifier at initialisation.
        first = {row["1"] for row in table.values()}
        assert max(first) - min(first) < 1e-5, width
        assert abs(table["lstm"]["1"] - np.log(10)) < 0.3, width
        # The LSTM optimizer lowers the training loss, also on the network it never saw.
        assert table["lstm"]["mean"] < table["lstm"]["1"] - 0.01, width


def test_omniglot_lstm_curve_falls_and_weights_round_trip(omniglot_example, tmp_path):
    ex = omniglot_example
    train = ex.Problems(load_omniglot("small1"))
    rng = np.random.default_rng(0)
    opt = meta.LSTMOptimizer(rng=rng)
    outer = tm.optim.Adam(opt.parameters(), lr=1e-2)
    for _ in range(2):
        ex.lstm_run(opt, train.sample(rng), ex.init_mlp(rng, 4), rng, 10, 5, outer)

    problem, init = train.sample(np.random.default_rng(1)), ex.init_mlp(np.random.default_rng(2), 4)
    with tm.no_grad():
        curve = ex.lstm_run(opt, problem, init, np.random.default_rng(3), 10)
    assert curve.shape == (10,) and np.isfinite(curve).all()
    assert curve[-3:].mean() < curve[:3].mean()

    tm.save({"lstm_optimizer": opt.named_parameters()}, tmp_path / "checkpoint.npz")
    fresh = _load_into_fresh(tmp_path / "checkpoint.npz", "lstm_optimizer")
    with tm.no_grad():
        again = ex.lstm_run(fresh, problem, init, np.random.default_rng(3), 10)
    np.testing.assert_array_equal(again, curve)


# --- random quadratics ---------------------------------------------------------------------------


def test_quadratic_tiny_run_metrics_and_checkpoint(tmp_path):
    ex = _example("lstm_optimizer_quadratic")
    metrics = ex.main(
        ["--iterations", "3", "--functions", "8", "--eval-functions", "16", "--quiet",
         "--out", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    names = {"SGD", "Nesterov", "RMSprop", "Adam", "LSTM"}
    assert set(saved["tuned_lr"]) == set(BASELINES)
    assert set(saved["mean_loss_at_step"]) == names == set(saved["mean_loss_over_steps"])
    for name, row in saved["mean_loss_at_step"].items():
        assert set(row) == {"1", "10", "25", "50", "100"}, name
        assert all(np.isfinite(v) for v in row.values()), name
        assert row["100"] < 0.2 * row["1"], name  # every optimizer makes progress
    if "figure" in saved:
        assert Path(saved["figure"]).is_file()

    # The checkpoint holds the meta-trained weights: loaded into a new optimizer, they give
    # the reported LSTM curve on the same unseen functions (seed + 2).
    fresh = _load_into_fresh(tmp_path / "checkpoint.npz", "lstm_optimizer")
    unseen = ex.sample_functions(np.random.default_rng(0 + 2), 16)
    with tm.no_grad():
        curve = ex.lstm_trajectory(fresh, unseen, 100)
    lstm = saved["mean_loss_at_step"]["LSTM"]
    np.testing.assert_allclose([curve[int(s) - 1] for s in lstm], list(lstm.values()), rtol=1e-6)
    np.testing.assert_allclose(curve.mean(), saved["mean_loss_over_steps"]["LSTM"], rtol=1e-6)
