"""Optimizers: ``SGD``, ``Adam``, ``AdamW`` and learning-rate schedulers.

An optimizer updates leaf tensors in place from their ``.grad``, following
PyTorch's update rules and its ``state_dict`` layout::

    opt = tm.optim.SGD([w, b], lr=0.1, momentum=0.9)
    opt.zero_grad()
    loss.backward()
    opt.step()

The update is arithmetic on arrays, outside any graph; the parameters change
through their in-place methods, so their version counters record the change
and a graph that saved the old values refuses to backward through them.
"""

from tinymeta.optim import lr_scheduler
from tinymeta.optim.adam import Adam, AdamW
from tinymeta.optim.optimizer import Optimizer
from tinymeta.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "Optimizer", "SGD", "lr_scheduler"]
