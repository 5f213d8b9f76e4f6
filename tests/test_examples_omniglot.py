"""examples/maml_omniglot.py end to end, tiny: 5-way, 8 filters, meta-batch 2, a few episodes.

Needs the small Omniglot background sets (found through ``omniglot_root()``: set
``$TINYMETA_DATA`` to their folder); skips, saying so, without them. The official one-shot runs
are not among them, so runs in their format are built here from small1's PNGs.
"""

from __future__ import annotations

import json
import math
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.data import load_omniglot, omniglot_root

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--ways", "5", "--filters", "8", "--meta-batch", "2", "--quiet", "--seed", "0"]


@pytest.fixture(scope="module")
def omniglot_example(tmp_path_factory, omniglot_archives):
    """The example module, with decoded archives cached in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYMETA_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.syspath_prepend(str(EXAMPLES))
        import maml_omniglot

        yield maml_omniglot
    sys.modules.pop("maml_omniglot", None)


def build_runs(folder: Path, alphabets=("Korean", "Latin")) -> Path:
    """20-way one-shot runs in the official layout (``runNN/training/classKK.png``,
    ``runNN/test/itemKK.png``, ``class_labels.txt``), zipped as ``all_runs.zip``.

    Each run takes the first 20 characters of one small1 alphabet: drawer 1 gives the
    training image, drawer 2 the test image of a class, in shuffled order.
    """
    archive = omniglot_root() / "images_background_small1.zip"
    rng = np.random.default_rng(0)
    target = folder / "all_runs.zip"
    with zipfile.ZipFile(archive) as zf, zipfile.ZipFile(target, "w") as out:
        drawings = defaultdict(dict)  # (alphabet, character) -> drawer -> member name
        for name in zf.namelist():
            if name.endswith(".png"):
                alphabet, character, filename = name.split("/")[-3:]
                drawings[alphabet, character][int(filename[:-4].split("_")[1])] = name
        for r, alphabet in enumerate(alphabets, start=1):
            run = f"run{r:02d}"
            chars = sorted(k for k in drawings if k[0] == alphabet)[:20]
            lines = []
            for j, key in enumerate(chars):
                out.writestr(f"{run}/training/class{j + 1:02d}.png", zf.read(drawings[key][1]))
            for i, j in enumerate(rng.permutation(20)):
                out.writestr(f"{run}/test/item{i + 1:02d}.png", zf.read(drawings[chars[j]][2]))
                lines.append(f"{run}/test/item{i + 1:02d}.png {run}/training/class{j + 1:02d}.png")
            out.writestr(f"{run}/class_labels.txt", "\n".join(lines) + "\n")
    return target


@pytest.fixture(scope="module")
def first_run(omniglot_example, tmp_path_factory):
    """Two meta-iterations, validation after each, proxy and runs evaluation."""
    out = tmp_path_factory.mktemp("omniglot-run")
    runs = build_runs(tmp_path_factory.mktemp("runs"))
    argv = TINY + ["--iterations", "2", "--eval-episodes", "3", "--eval-queries", "2"]
    argv += ["--val-every", "1", "--val-episodes", "2", "--eval-runs", str(runs)]
    metrics = omniglot_example.main(argv + ["--out", str(out)])
    return out, metrics


def test_metrics(first_run):
    out, metrics = first_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in (
        "algo", "ways", "shots", "background", "iterations", "seconds", "val_accuracy",
        "runs_error_rate", "runs_total", "proxy_20way_accuracy", "proxy_20way_ci95",
        "proxy_5way_accuracy", "proxy_5way_ci95", "peak_rss_mb",
    ):  # fmt: skip
        assert key in metrics, key
    assert metrics["algo"] == "maml" and metrics["background"] == "small1"
    assert (metrics["ways"], metrics["shots"], metrics["iterations"]) == (5, 1, 2)
    assert metrics["proxy_held_out"] is True and metrics["proxy_episodes"] == 3
    assert metrics["seconds"] > 0 and metrics["peak_rss_mb"] > 0
    for key in ("val_accuracy", "proxy_20way_accuracy", "proxy_5way_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["val_accuracy"] == metrics["proxy_5way_accuracy"]  # trained 5-way
    assert math.isfinite(metrics["final_train_loss"])
    # Two runs of 20 test items; the 5-way model repeats its head rows for 20 classes.
    assert metrics["runs_total"] == 40
    assert 0.0 <= metrics["runs_error_rate"] <= 1.0
    assert (out / "omniglot.png").is_file() or "figure" not in metrics


def test_checkpoint_and_resume(omniglot_example, first_run, tmp_path):
    out, _ = first_run
    ckpt = tm.load(out / "checkpoint.npz")
    assert ckpt["iteration"] == 2 and ckpt["seconds"] > 0
    assert len(ckpt["history"]["loss"]) == 2 and len(ckpt["history"]["val_accuracy"]) == 2
    model = omniglot_example.build_model(8, 5)
    model.load_state_dict(ckpt["model"])  # strict: every key, every shape
    assert set(ckpt["optimizer"]["state"]) == set(range(len(list(model.parameters()))))
    assert all(s["step"] == 2 for s in ckpt["optimizer"]["state"].values())

    # Resume in a copy of the run folder: one more iteration, the count goes on from 2.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.npz").write_bytes((out / "checkpoint.npz").read_bytes())
    argv = TINY + ["--iterations", "3", "--eval-episodes", "1", "--val-every", "0"]
    metrics = omniglot_example.main(argv + ["--resume", "--out", str(resumed)])
    assert metrics["iterations"] == 3 and metrics["runs_error_rate"] is None
    ckpt3 = tm.load(resumed / "checkpoint.npz")
    assert ckpt3["iteration"] == 3 and len(ckpt3["history"]["loss"]) == 3
    assert ckpt3["seconds"] > ckpt["seconds"]
    assert all(s["step"] == 3 for s in ckpt3["optimizer"]["state"].values())

    # A checkpoint of another configuration is refused.
    other = ["--ways", "3", "--filters", "8", "--iterations", "4", "--resume", "--quiet"]
    with pytest.raises(ValueError, match="written by a run"):
        omniglot_example.main(other + ["--out", str(resumed)])


def test_test_time_rate_has_its_own_flag(omniglot_example):
    mo = omniglot_example
    assert mo.parse_args(TINY).test_inner_lr == mo.parse_args(TINY).inner_lr == 0.4
    args = mo.parse_args(TINY + ["--test-inner-lr", "0.1"])
    model = mo.build_model(8, 5, np.random.default_rng(0))
    rule = mo.make_rule("maml", dict(model.named_parameters()), args)
    _, params, eval_rule = mo.eval_setup(model, rule, 5, args)
    ones = {k: tm.tensor(np.ones(p.shape, np.float32)) for k, p in params.items()}
    stepped = eval_rule(params, ones, 0, {})
    for k, p in params.items():
        np.testing.assert_allclose(stepped[k].numpy(), p.numpy() - 0.1, rtol=1e-6, atol=1e-7)
    with pytest.raises(SystemExit):
        mo.parse_args(TINY + ["--test-inner-lr", "0"])


@pytest.mark.parametrize("algo", ["fomaml", "metasgd", "anil", "reptile"])
def test_other_algorithms(omniglot_example, algo, tmp_path):
    argv = TINY + ["--algo", algo, "--iterations", "1", "--eval-episodes", "1", "--val-every", "0"]
    metrics = omniglot_example.main(argv + ["--out", str(tmp_path)])
    assert metrics["iterations"] == 1 and 0.0 <= metrics["proxy_20way_accuracy"] <= 1.0
    ckpt = tm.load(tmp_path / "checkpoint.npz")
    assert bool(ckpt["rule"]) == (algo == "metasgd")  # Meta-SGD's learned rates are saved


def test_workers_flag_is_gone_mpiexec_replaces_it(omniglot_example):
    with pytest.raises(SystemExit):
        omniglot_example.parse_args(TINY + ["--workers", "2"])
    assert not hasattr(omniglot_example, "Workers")


@pytest.mark.parametrize("algo", ["maml", "anil", "metasgd", "reptile"])
def test_vectorized_and_looped_meta_batches_give_the_same_meta_gradient(omniglot_example, algo):
    """The default task-vectorized meta-batch (batched convolutions, per-task BatchNorm) gives
    the looped meta-gradient, loss and accuracy."""
    mo = omniglot_example
    sampler = tm.data.EpisodeSampler(load_omniglot("small1"), 5, 1, 2, rng=1, rotations=True)
    batch = sampler.sample_batch(3)
    results = []
    for looped in ([], ["--looped"]):
        args = mo.parse_args(TINY + ["--meta-batch", "3", "--algo", algo] + looped)
        assert args.looped == bool(looped)
        model = mo.build_model(8, 5, np.random.default_rng(0))
        rule = mo.make_rule(algo, dict(model.named_parameters()), args)
        tensors = mo.meta_parameters(model, rule)
        loss, correct, count = mo.share_gradients(model, rule, batch, args, first_order=False)
        stats = (loss / 3, correct / count)
        results.append(({k: t.grad.numpy().copy() for k, t in tensors.items()}, stats))
    (gv, stats_v), (gl, stats_l) = results
    np.testing.assert_allclose(stats_v, stats_l, rtol=1e-5)
    assert set(gv) == set(gl) == set(tensors)
    for k in gl:
        np.testing.assert_allclose(gv[k], gl[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert max(np.abs(g).max() for g in gv.values()) > 1e-3
