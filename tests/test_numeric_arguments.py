"""Every public entry point that takes a number rejects what is not one (issue 11).

Booleans (``True`` would be a learning rate of 1), strings, None, nan and inf, and values out
of range raise a TypeError or ValueError naming the function and the argument. One shared
helper (tinymeta._checks) makes the rule and the wording the same everywhere.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn as nn
from tinymeta._checks import (
    check_int,
    check_nonnegative,
    check_positive,
    nonnegative_int,
    positive_float,
    positive_int,
)
from tinymeta.data import EpisodeSampler, SinusoidTasks, split_by_character
from tinymeta.meta import (
    MAML,
    InnerSGD,
    LearnedOptimizer,
    MetaSGD,
    PerStepLR,
    adapt,
    annealed_step_weights,
    as_update_rule,
    maml_loss,
    per_task,
)
from tinymeta.nn.utils import clip_grad_norm_
from tinymeta.optim import SGD, Adam, AdamW
from tinymeta.optim.lr_scheduler import CosineAnnealingLR, StepLR

nan, inf = float("nan"), float("inf")


def _w():
    return tm.randn(3, requires_grad=True)


def _params():
    return {"w": _w()}


def _opt():
    return SGD([_w()], lr=0.1)


def _mse(p):
    return (p["w"] * p["w"]).sum()


# (id, call with the bad value, bad value, exception, substring of the message)
CASES = [
    # the case of the issue: a bool is not a learning rate
    (
        "as_update_rule",
        lambda v: as_update_rule(v),
        True,
        TypeError,
        "as_update_rule: learning rate",
    ),
    ("as_update_rule", lambda v: as_update_rule(v), "0.1", TypeError, "as_update_rule"),
    ("as_update_rule", lambda v: as_update_rule(v), nan, ValueError, "must be finite"),
    ("as_update_rule", lambda v: as_update_rule(v), inf, ValueError, "must be finite"),
    ("as_update_rule", lambda v: as_update_rule(v), -0.1, ValueError, "positive"),
    ("MAML lr", lambda v: MAML(nn.Linear(2, 1), lr=v), True, TypeError, "learning rate"),
    ("adapt rule", lambda v: adapt(_mse, _params(), v), np.bool_(True), TypeError, "learning"),
    ("InnerSGD", lambda v: InnerSGD(v), False, TypeError, "InnerSGD: lr"),
    ("MetaSGD", lambda v: MetaSGD(_params(), init_lr=v), True, TypeError, "MetaSGD: init_lr"),
    ("MetaSGD", lambda v: MetaSGD(_params(), init_lr=v), -1.0, ValueError, "MetaSGD: init_lr"),
    ("PerStepLR", lambda v: PerStepLR(_params(), steps=v), 0, ValueError, "PerStepLR: steps"),
    ("PerStepLR", lambda v: PerStepLR(_params(), steps=v), 2.0, TypeError, "PerStepLR: steps"),
    ("PerStepLR", lambda v: PerStepLR(_params(), 2, init_lr=v), nan, ValueError, "init_lr"),
    ("LearnedOptimizer", lambda v: LearnedOptimizer(lr=v), inf, ValueError, "LearnedOptimizer: lr"),
    ("LearnedOptimizer", lambda v: LearnedOptimizer(hidden=v), 0, ValueError, "hidden"),
    ("adapt steps", lambda v: adapt(_mse, _params(), 0.1, steps=v), -1, ValueError, "adapt: steps"),
    (
        "adapt steps",
        lambda v: adapt(_mse, _params(), 0.1, steps=v),
        True,
        TypeError,
        "adapt: steps",
    ),
    (
        "maml_loss steps",
        lambda v: maml_loss(None, _params(), ([], []), ([], []), None, 0.1, steps=v),
        0,
        ValueError,
        "maml_loss: steps",
    ),
    ("per_task", lambda v: per_task(_params(), v), 0, ValueError, "per_task: num_tasks"),
    ("annealed_step_weights", lambda v: annealed_step_weights(v, 0, 10), 0, ValueError, "steps"),
    # optimizers and schedulers
    ("SGD lr", lambda v: SGD([_w()], lr=v), True, TypeError, "lr must be a real number"),
    ("SGD lr", lambda v: SGD([_w()], lr=v), inf, ValueError, "invalid learning rate"),
    ("SGD momentum", lambda v: SGD([_w()], lr=0.1, momentum=v), nan, ValueError, "momentum"),
    ("Adam eps", lambda v: Adam([_w()], eps=v), inf, ValueError, "invalid epsilon"),
    ("Adam betas", lambda v: Adam([_w()], betas=(v, 0.9)), True, TypeError, "betas[0]"),
    ("Adam wd", lambda v: Adam([_w()], weight_decay=v), "0", TypeError, "weight_decay"),
    ("StepLR step_size", lambda v: StepLR(_opt(), step_size=v), True, TypeError, "StepLR"),
    ("StepLR gamma", lambda v: StepLR(_opt(), 2, gamma=v), nan, ValueError, "StepLR: gamma"),
    ("StepLR gamma", lambda v: StepLR(_opt(), 2, gamma=v), True, TypeError, "StepLR: gamma"),
    ("Cosine T_max", lambda v: CosineAnnealingLR(_opt(), T_max=v), 2.5, TypeError, "T_max"),
    (
        "Cosine eta_min",
        lambda v: CosineAnnealingLR(_opt(), 5, eta_min=v),
        inf,
        ValueError,
        "eta_min",
    ),
    (
        "clip max_norm",
        lambda v: clip_grad_norm_([_w()], v),
        -1.0,
        ValueError,
        "clip_grad_norm_: max_norm",
    ),
    (
        "clip max_norm",
        lambda v: clip_grad_norm_([_w()], v),
        nan,
        ValueError,
        "clip_grad_norm_: max_norm",
    ),
    (
        "clip max_norm",
        lambda v: clip_grad_norm_([_w()], v),
        "1",
        TypeError,
        "clip_grad_norm_: max_norm",
    ),
    ("clip norm_type", lambda v: clip_grad_norm_([_w()], 1.0, v), 0.0, ValueError, "norm_type"),
    # data samplers
    (
        "EpisodeSampler ways",
        lambda v: EpisodeSampler(None, ways=v, shots=1, queries=1),
        True,
        TypeError,
        "EpisodeSampler: ways",
    ),
    (
        "EpisodeSampler shots",
        lambda v: EpisodeSampler(None, ways=5, shots=v, queries=1),
        0,
        ValueError,
        "EpisodeSampler: shots",
    ),
    (
        "EpisodeSampler queries",
        lambda v: EpisodeSampler(None, 5, 1, queries=v),
        1.0,
        TypeError,
        "queries",
    ),
    (
        "EpisodeSampler max_shift",
        lambda v: EpisodeSampler(None, 5, 1, 1, max_shift=v),
        -1,
        ValueError,
        "max_shift",
    ),
    (
        "SinusoidTasks amplitude",
        lambda v: SinusoidTasks(amplitude=(0.1, v)),
        inf,
        ValueError,
        "amplitude[1]",
    ),
    (
        "SinusoidTasks amplitude",
        lambda v: SinusoidTasks(amplitude=(v, 5.0)),
        True,
        TypeError,
        "amplitude[0]",
    ),
    ("SinusoidTasks phase", lambda v: SinusoidTasks(phase=(v, 1.0)), "0", TypeError, "phase[0]"),
    (
        "sample_batch num_tasks",
        lambda v: SinusoidTasks(rng=0).sample_batch(v, 5, 5),
        0,
        ValueError,
        "num_tasks",
    ),
    (
        "sample_batch k_query",
        lambda v: SinusoidTasks(rng=0).sample_batch(2, 5, v),
        True,
        TypeError,
        "k_query",
    ),
    (
        "SinusoidTask.sample k",
        lambda v: SinusoidTasks(rng=0).sample_task().sample(v),
        -1,
        ValueError,
        "k",
    ),
    (
        "split_by_character",
        lambda v: split_by_character(SimpleNamespace(num_classes=5), v),
        True,
        TypeError,
        "split_by_character: num_train",
    ),
    (
        "split_by_character",
        lambda v: split_by_character(SimpleNamespace(num_classes=5), v),
        6,
        ValueError,
        "num_train must be an integer in [0, 5]",
    ),
    # layers
    ("Linear in_features", lambda v: nn.Linear(v, 2), 2.0, TypeError, "Linear: in_features"),
    ("Linear out_features", lambda v: nn.Linear(2, v), -1, ValueError, "Linear: out_features"),
    ("Conv2d in_channels", lambda v: nn.Conv2d(v, 2, 3), 0, ValueError, "Conv2d: in_channels"),
    ("Conv2d kernel_size", lambda v: nn.Conv2d(1, 2, v), 0, ValueError, "Conv2d: kernel_size"),
    ("Conv2d kernel_size", lambda v: nn.Conv2d(1, 2, (3, v)), True, TypeError, "kernel_size"),
    ("Conv2d stride", lambda v: nn.Conv2d(1, 2, 3, stride=v), 0, ValueError, "Conv2d: stride"),
    ("Conv2d padding", lambda v: nn.Conv2d(1, 2, 3, padding=v), -1, ValueError, "padding"),
    ("MaxPool2d kernel_size", lambda v: nn.MaxPool2d(v), 0, ValueError, "MaxPool2d: kernel_size"),
    ("MaxPool2d stride", lambda v: nn.MaxPool2d(2, stride=v), 1.5, TypeError, "MaxPool2d: stride"),
    (
        "BatchNorm num_features",
        lambda v: nn.BatchNorm2d(v),
        0,
        ValueError,
        "BatchNorm2d: num_features",
    ),
    ("BatchNorm eps", lambda v: nn.BatchNorm1d(3, eps=v), -1e-5, ValueError, "BatchNorm1d: eps"),
    ("BatchNorm eps", lambda v: nn.BatchNorm1d(3, eps=v), nan, ValueError, "BatchNorm1d: eps"),
    ("BatchNorm momentum", lambda v: nn.BatchNorm1d(3, momentum=v), 1.5, ValueError, "momentum"),
    ("BatchNorm momentum", lambda v: nn.BatchNorm1d(3, momentum=v), True, TypeError, "momentum"),
    ("Flatten start_dim", lambda v: nn.Flatten(v), 1.0, TypeError, "Flatten: start_dim"),
]


def _recurrent_cases() -> list:
    """Sizes of the recurrent layers and cells: positive ints, not bools, not floats."""
    # (bad value, error, what the message says of it: the op, the argument and the value)
    bad_sizes = [
        (0, ValueError, "must be a positive integer, got 0"),
        (-2, ValueError, "must be a positive integer, got -2"),
        (2.0, TypeError, "must be an int, got 2.0 (float)"),
        (True, TypeError, "must be an int, got True (bool)"),
    ]
    cases = []
    for layer in (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell):
        name = layer.__name__
        calls = {
            "input_size": lambda v, layer=layer: layer(v, 3),
            "hidden_size": lambda v, layer=layer: layer(2, v),
        }
        if not name.endswith("Cell"):
            calls["num_layers"] = lambda v, layer=layer: layer(2, 3, num_layers=v)
        for argument, call in calls.items():
            for bad, error, said in bad_sizes:
                message = f"{name}: {argument} {said}"
                cases.append((f"{name} {argument}", call, bad, error, message))
    return cases


CASES += _recurrent_cases()


@pytest.mark.parametrize(
    ("call", "bad", "error", "message"),
    [c[1:] for c in CASES],
    ids=[f"{c[0]}={c[2]!r}" for c in CASES],
)
def test_bad_numbers_are_rejected(call, bad, error, message):
    with pytest.raises(error) as info:
        call(bad)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("call", "good", "stored"),
    [
        (lambda v: as_update_rule(v).lr, 0.5, 0.5),
        (lambda v: as_update_rule(v).lr, np.float32(0.5), 0.5),
        (lambda v: InnerSGD(v).lr, 2, 2.0),
        (lambda v: nn.Linear(v, 2).in_features, np.int64(3), 3),
        (lambda v: nn.LSTM(2, v).hidden_size, np.int64(3), 3),
        (lambda v: nn.GRU(2, 3, num_layers=v).num_layers, np.int32(2), 2),
        (lambda v: nn.RNNCell(v, 3).input_size, 4, 4),
        (lambda v: nn.BatchNorm1d(3, momentum=v).momentum, None, None),
        (lambda v: StepLR(_opt(), step_size=v).step_size, 3, 3),
        (lambda v: clip_grad_norm_([_w()], 1.0, v).shape, inf, ()),  # the max-norm
        (lambda v: clip_grad_norm_([_w()], v).shape, inf, ()),  # measures, clips nothing
    ],
)
def test_good_numbers_pass_through(call, good, stored):
    assert call(good) == stored


def test_the_helpers_return_plain_python_numbers():
    assert type(check_positive("lr", np.float32(0.25), "f")) is float
    assert type(check_nonnegative("wd", 0, "f")) is float
    assert type(check_int("n", np.int32(4), "f")) is int
    with pytest.raises(ValueError, match=r"^f: n must be an integer in \[1, 3\], got 4$"):
        check_int("n", 4, "f", low=1, high=3)


@pytest.mark.parametrize(
    ("convert", "text", "ok"),
    [
        (positive_int, "3", 3),
        (positive_int, "0", None),
        (positive_int, "2.5", None),
        (nonnegative_int, "0", 0),
        (nonnegative_int, "-1", None),
        (positive_float, "1e-3", 1e-3),
        (positive_float, "nan", None),
        (positive_float, "inf", None),
        (positive_float, "0", None),
    ],
)
def test_argparse_types(convert, text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{text}'"):
            convert(text)
    else:
        assert convert(text) == ok


# --- flags: True or False, nothing that only looks like one -----------------------------------
# bool("False") is True, so a flag spelled as a string used to mean the opposite of what it
# said (LSTM(batch_first="False") read its input batch first).

_x3 = tm.zeros(2, 3)
FLAGS = [
    ("Linear", "bias", lambda v: nn.Linear(2, 3, bias=v)),
    ("Conv2d", "bias", lambda v: nn.Conv2d(1, 2, 3, bias=v)),
    ("BatchNorm2d", "affine", lambda v: nn.BatchNorm2d(3, affine=v)),
    ("BatchNorm1d", "track_running_stats", lambda v: nn.BatchNorm1d(3, track_running_stats=v)),
    ("LayerNorm", "elementwise_affine", lambda v: nn.LayerNorm(3, elementwise_affine=v)),
    ("LayerNorm", "bias", lambda v: nn.LayerNorm(3, bias=v)),
    ("MultiheadAttention", "batch_first", lambda v: nn.MultiheadAttention(4, 2, batch_first=v)),
    ("MultiheadAttention", "bias", lambda v: nn.MultiheadAttention(4, 2, bias=v)),
    ("Sequential.train", "mode", lambda v: nn.Sequential(nn.Linear(2, 2)).train(v)),
    (
        "SGD (the constructor's settings)",
        "nesterov",
        lambda v: SGD([_w()], lr=0.1, momentum=0.9, nesterov=v),
    ),
    ("dropout", "training", lambda v: nn.functional.dropout(_x3, 0.5, training=v)),
    ("Adam (the constructor's settings)", "amsgrad", lambda v: Adam([_w()], lr=0.1, amsgrad=v)),
    ("AdamW (the constructor's settings)", "amsgrad", lambda v: AdamW([_w()], lr=0.1, amsgrad=v)),
]
for _layer in (nn.RNN, nn.LSTM, nn.GRU):
    _name = _layer.__name__
    FLAGS.append((_name, "batch_first", lambda v, layer=_layer: layer(2, 3, batch_first=v)))
    FLAGS.append((_name, "bias", lambda v, layer=_layer: layer(2, 3, bias=v)))
for _cell in (nn.RNNCell, nn.LSTMCell, nn.GRUCell):
    FLAGS.append((_cell.__name__, "bias", lambda v, cell=_cell: cell(2, 3, bias=v)))


@pytest.mark.parametrize("bad", ["False", 0, 1, None])
@pytest.mark.parametrize(("where", "name", "call"), FLAGS, ids=[f"{w} {n}" for w, n, _ in FLAGS])
def test_flags_must_be_bools(where, name, call, bad):
    with pytest.raises(TypeError) as info:
        call(bad)
    said = f"{where}: {name} must be True or False, got {bad!r} ({type(bad).__name__})"
    assert said in str(info.value)


@pytest.mark.parametrize(("where", "name", "call"), FLAGS, ids=[f"{w} {n}" for w, n, _ in FLAGS])
def test_numpy_bools_are_flags(where, name, call):
    call(np.bool_(False))  # accepted: what a comparison of arrays gives
    call(True)


def test_a_string_flag_no_longer_flips_the_layout():
    x = tm.randn(5, 2, 2)  # (L, N, I) sequence first
    with pytest.raises(TypeError, match="LSTM: batch_first must be True or False"):
        nn.LSTM(2, 3, batch_first="False")
    lstm = nn.LSTM(2, 3, batch_first=np.bool_(False))
    with pytest.raises(TypeError, match="lstm: batch_first must be True or False"):
        nn.functional.lstm(x, None, lstm._weights(), batch_first="no")
    assert lstm.batch_first is False and lstm(x)[0].shape == (5, 2, 3)
    assert nn.Linear(2, 3, bias=np.bool_(False)).bias is None
