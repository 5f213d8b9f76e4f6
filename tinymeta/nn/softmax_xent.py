"""Softmax cross-entropy from logits, fused: one kernel forward, one kernel backward, any order.

For logits z (N, C), integer labels l (N,), p = softmax(z) per row and one-hot rows e_l:

    loss_n = logsumexp(z_n) - z_n[l_n]                        SoftmaxCrossEntropy(z)
    gz     = gloss_n * (p_n - e_l)                            SoftmaxCrossEntropyGrad(z, gloss)
    ggloss = sum(ggz_n * (p_n - e_l)),  gz' = gloss_n * p_n * (ggz_n - sum(ggz_n * p_n))

The forward and the first backward are one ``tinymeta.kernels`` call each (instead of
log_softmax, gather, negate and their backward rules); the second derivatives are written with
the differentiable ``softmax`` op, so the third and higher orders are exact too.
"""

from __future__ import annotations

from tinymeta import kernels
from tinymeta.function import Function
from tinymeta.ops.reductions import sum as _sum
from tinymeta.ops.shape import reshape
from tinymeta.ops.softmax import softmax
from tinymeta.tensor import constant


class SoftmaxCrossEntropy(Function):
    """loss_n = logsumexp(z_n) - z_n[l_n] (max-shifted: exp never overflows);
    gz = SoftmaxCrossEntropyGrad(z, gloss) = gloss_n * (softmax(z_n) - onehot(l_n))."""

    def __init__(self, labels):
        self.labels = labels  # int64 (N,), checked to lie in [0, C) by the caller

    def forward(self, z):
        loss, self.probs = kernels.softmax_xent_forward(z, self.labels)
        return loss

    def backward(self, gloss):
        (z,) = self.inputs
        return SoftmaxCrossEntropyGrad.apply(z, gloss, labels=self.labels, probs=self.probs)


class SoftmaxCrossEntropyGrad(Function):
    """gz = gloss_n * (p_n - onehot(l_n)), p = softmax(z);
    gz' = gloss_n * p_n * (ggz_n - sum(ggz_n * p_n)),  ggloss = sum(ggz_n * (p_n - onehot(l_n)))."""

    def __init__(self, labels, probs):
        # probs: softmax(z) from the forward kernel, reused for this node's value only; the
        # backward recomputes it with the differentiable op.
        self.labels, self.probs = labels, probs

    def forward(self, z, gloss):
        return kernels.softmax_xent_backward(
            self.probs, self.labels, gloss.astype(z.dtype, copy=False)
        )

    def backward(self, ggz):
        z, gloss = self.inputs
        p = softmax(z, axis=1)
        need_z, need_gloss = self.needs_input_grad
        gz = ggloss = None
        if need_z:
            gz = reshape(gloss, (-1, 1)) * p * (ggz - _sum(ggz * p, 1, keepdims=True))
        if need_gloss:
            onehot = self.xp.zeros(z.shape, dtype=z.dtype)
            onehot[self.xp.arange(z.shape[0]), self.labels] = 1
            ggloss = _sum(ggz * (p - constant(onehot)), 1)
        return gz, ggloss


def softmax_cross_entropy(logits, labels):
    """Per-example loss (N,) of (N, C) float32/float64 logits and checked int64 labels (N,)."""
    return SoftmaxCrossEntropy.apply(logits, labels=labels)
