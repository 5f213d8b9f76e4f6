"""How the instruments plug into the engine.

The engine has two hook points, both None unless an instrument is active, so
that watching costs one ``is not None`` check when nobody watches:

* ``tinymeta.function._forward_hook(fn, outputs)``, called after every op's
  forward. ``detect_anomaly()`` uses it to check the outputs for NaN/Inf and
  to remember where in user code each node was created.
* ``tinymeta.autograd.engine._backward_hook``: an object whose
  ``begin_pass(create_graph=, retain_graph=)`` the engine calls when a
  backward pass starts and whose ``run_rule(fn, gys)`` it calls *instead of*
  ``fn.backward(*gys)``. ``trace()`` times the rule and records what went in
  and out; ``detect_anomaly()`` checks the gradients it returns.

Several instruments can be active at once (and nested); this module keeps
the list and sets the two hooks from it. ``refresh()`` runs on every enter
and exit, so the hooks are None again as soon as the last instrument exits,
exception or not. The instruments import this module, never the reverse: an
instrument hands in what the hooks should call when it is entered.
"""

from __future__ import annotations

import time

from tinymeta import function as _function
from tinymeta.autograd import engine as _engine

# Active Trace objects (tinymeta.autograd.trace), outermost first.
tracers: list = []
# One (check_forward, check_backward) pair per open detect_anomaly() block
# (tinymeta.autograd.anomaly), innermost last.
anomaly_checks: list = []
# The Functions whose backward rule is running now, innermost last: an op
# applied while this is not empty is part of a backward rule.
rules_running: list = []


class _Watcher:
    """The object the engine sees as ``_backward_hook``."""

    def begin_pass(self, *, create_graph: bool, retain_graph: bool) -> None:
        for tr in tracers:
            tr._begin_pass(create_graph, retain_graph)

    def run_rule(self, fn, gys):
        rules_running.append(fn)
        start = time.perf_counter()
        try:
            gxs = fn.backward(*gys)
        finally:
            rules_running.pop()
        seconds = time.perf_counter() - start
        # Record first, so that a trace also holds the step that anomaly mode rejects.
        for tr in tracers:
            tr._record(fn, gys, gxs, seconds)
        if anomaly_checks:
            anomaly_checks[-1][1](fn, gys, gxs)
        return gxs


WATCHER = _Watcher()


def refresh() -> None:
    """Set the engine's hooks from what is active now (None when nothing is)."""
    _engine._backward_hook = WATCHER if (tracers or anomaly_checks) else None
    _function._forward_hook = anomaly_checks[-1][0] if anomaly_checks else None
