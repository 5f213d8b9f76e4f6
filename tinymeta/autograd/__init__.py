"""``tm.autograd``: the backward pass (``grad``, ``backward``) and instruments
that let you watch it work.

* ``trace()``            record every backward step (op, shapes, gradient norms, time, bytes)
* ``explain(loss)``      print the backward pass of a small graph rule by rule
* ``detect_anomaly()``   stop at the first op whose forward or backward makes a NaN/Inf
* ``graph_memory(t)``    bytes a graph saves for backward, in total and by op

Drawing graphs is ``tm.viz``. Instruments cost nothing while they are off: the
engine's hooks are None (see ``_hooks.py``).
"""

from tinymeta.autograd.anomaly import AnomalyError, detect_anomaly
from tinymeta.autograd.engine import backward, grad
from tinymeta.autograd.explain import explain
from tinymeta.autograd.memory import GraphMemory, graph_memory
from tinymeta.autograd.trace import BackwardPass, BackwardStep, Trace, trace

__all__ = [
    "AnomalyError",
    "BackwardPass",
    "BackwardStep",
    "GraphMemory",
    "Trace",
    "backward",
    "detect_anomaly",
    "explain",
    "grad",
    "graph_memory",
    "trace",
]
