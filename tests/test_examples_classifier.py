"""examples/train_classifier.py, shortened: it learns, writes its outputs, and resumes exactly.

The example is imported by path and its ``main`` called with an argument list. The tests
skip when the Omniglot archive ``images_background_small1.zip`` is not found; decoded images
are cached in a temporary folder, never in the user's cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.data import omniglot_root

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_classifier.py"
GREEK_CLASSES = 24


def _import_example():
    spec = importlib.util.spec_from_file_location("train_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    # The example sets OPENBLAS_NUM_THREADS for its own process; keep the test's environment.
    with mock.patch.dict(os.environ):
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    archive = omniglot_root() / "images_background_small1.zip"
    if not archive.is_file():
        pytest.skip(f"Omniglot archive {archive} not found (set TINYMETA_DATA to its folder)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYMETA_CACHE", str(tmp_path_factory.mktemp("omniglot-cache")))
        yield _import_example()


def _arrays(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array of a nested checkpoint dict, by path (Python scalars as 0-d arrays)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: np.asarray(tree.numpy() if isinstance(tree, tm.Tensor) else tree)}
    out = {}
    for k, v in items:
        out.update(_arrays(v, f"{prefix}/{k}"))
    return out


def test_learns_and_writes_metrics_and_checkpoint(example, tmp_path):
    # Narrower than the default (16 channels, not 32) and 5 epochs, not 30: 60-75% (chance 4%).
    argv = ["--alphabets", "Greek", "--epochs", "5", "--channels", "16"]
    metrics = example.main(argv + ["--out", str(tmp_path), "--quiet"])

    assert metrics["num_classes"] == GREEK_CLASSES
    assert metrics["test_accuracy"] > 3 / GREEK_CLASSES, metrics["history"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    for key in ("train_accuracy", "test_accuracy", "seconds", "history"):
        assert key in saved
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3, 4, 5]

    checkpoint = tm.load(tmp_path / "checkpoint.npz")
    assert set(checkpoint) == {"model", "optimizer", "epoch", "history", "config"}
    assert checkpoint["epoch"] == 5
    assert checkpoint["config"]["alphabets"] == ["Greek"]
    model = example.build_model(GREEK_CLASSES, 16, 28, np.random.default_rng(0))
    assert list(checkpoint["model"]) == list(model.state_dict())
    num_params = len(list(model.parameters()))
    assert len(checkpoint["optimizer"]["state"]) == num_params
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(checkpoint["optimizer"]["state"][0])


def test_resume_matches_an_uninterrupted_run(example, tmp_path):
    # Narrow layers and big batches: this checks bookkeeping, not accuracy.
    common = ["--alphabets", "Greek", "--channels", "8", "--batch-size", "64", "--quiet"]
    straight = example.main(common + ["--epochs", "2", "--out", str(tmp_path / "straight")])
    example.main(common + ["--epochs", "1", "--out", str(tmp_path / "first")])
    first_half = tmp_path / "first" / "checkpoint.npz"
    resumed = example.main(
        common + ["--epochs", "2", "--resume", str(first_half), "--out", str(tmp_path / "resumed")]
    )

    assert resumed["resumed_from_epoch"] == 1
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    assert resumed["history"] == straight["history"]
    a = _arrays(tm.load(tmp_path / "straight" / "checkpoint.npz"))
    b = _arrays(tm.load(tmp_path / "resumed" / "checkpoint.npz"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # A checkpoint cannot continue a run with other settings: it would silently diverge.
    with pytest.raises(SystemExit, match="seed"):
        example.main(
            common
            + ["--epochs", "2", "--seed", "1", "--resume", str(first_half)]
            + ["--out", str(tmp_path / "rejected")]
        )
