"""Neural networks: modules, layers, initialisation and ``functional_call``.

import tinymeta.nn as nn
import tinymeta.nn.functional as F

model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
params = dict(model.named_parameters())
y = nn.functional_call(model, params, x)     # the same as model(x), through params
"""

from tinymeta.nn import functional, init, utils
from tinymeta.nn.inner_step import current_inner_step, inner_step
from tinymeta.nn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
)
from tinymeta.nn.module import Module, Parameter
from tinymeta.nn.recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from tinymeta.nn.utils import clip_grad_norm_, functional_call

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Flatten",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "Linear",
    "MaxPool2d",
    "Module",
    "Parameter",
    "RNN",
    "RNNCell",
    "ReLU",
    "Sequential",
    "clip_grad_norm_",
    "current_inner_step",
    "functional",
    "functional_call",
    "init",
    "inner_step",
    "utils",
]
