"""Neural networks: modules, layers, initialisation and ``functional_call``.

import tinymeta.nn as nn
import tinymeta.nn.functional as F

model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
params = dict(model.named_parameters())
y = nn.functional_call(model, params, x)     # the same as model(x), through params
"""

from tinymeta.nn import functional, init, utils
from tinymeta.nn.activation import GELU, Dropout, Sigmoid, Tanh
from tinymeta.nn.attention import MultiheadAttention
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
from tinymeta.nn.normalization import LayerNorm
from tinymeta.nn.recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from tinymeta.nn.sparse import Embedding
from tinymeta.nn.utils import clip_grad_norm_, functional_call

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Dropout",
    "Embedding",
    "Flatten",
    "GELU",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "LayerNorm",
    "Linear",
    "MaxPool2d",
    "Module",
    "MultiheadAttention",
    "Parameter",
    "RNN",
    "RNNCell",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "clip_grad_norm_",
    "current_inner_step",
    "functional",
    "functional_call",
    "init",
    "inner_step",
    "utils",
]
