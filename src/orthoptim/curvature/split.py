r"""FOP's two sub-batch gradients of a block from the training backward pass(es).

**One backward** (``k = 1``): the batch is split like ``torch.chunk(x, 2)``: the first
``b1 = ceil(B/2)`` samples, then the rest. With a loss that is a mean over the batch, the recorded
output gradient of sample ``i`` is its per-sample gradient divided by ``B``; so the first-half
contribution

.. math:: S_1 = \sum_{i \le b_1} \frac{1}{B}\, g_i a_i^\top

and, with ``g`` the full-batch gradient in ``p.grad``,

.. math:: g_1 = \tfrac{B}{b_1} S_1, \qquad g_2 = \tfrac{B}{b_2} (g - S_1).

**Gradient accumulation** (``k > 1`` backward calls before ``step()``, each micro-batch loss a share
of the mean over the union of the micro-batches): the halves are the micro-batches themselves,
odd-numbered (1st, 3rd, ...) against even-numbered: with :math:`S_{odd}` the sum of the odd
micro-batches' contributions and :math:`N_{odd}` their samples, the same formulas hold with
``B -> N`` (all samples) and ``b1 -> N_odd``. So ``k = 2`` gives exactly the two micro-batches
(with BatchNorm: each with its own statistics, like the paper's two-pass mode), even ``k`` two
equal halves, odd ``k`` halves of ``(k+1)/2`` and ``(k-1)/2`` micro-batches (weighted by their
sample counts; ``g_avg`` is then the mean of the two half means, as for an odd batch).

:class:`HalfBatchWeightGrad` makes autograd form a stock layer's weight gradient as two half-batch
products, :math:`S_1 + S_2` (the same FLOPs as one product), so :math:`S_1` and the micro-batch
contribution cost nothing extra. Layers whose forward the adapter does not reproduce (subclasses
with their own forward, look-alike classes) keep autograd's gradient, and the hook forms both
halves with one extra product (:func:`halves`).

Exact when the block's per-sample gradients do not interact across samples through the block
itself. BatchNorm *before* the block couples samples through the batch statistics: the one-pass
split then divides the full-batch-BN gradient into its sample halves, which is not the gradient of
a half-batch loss with half-batch statistics (the paper's two-pass mode). Anything else that
reaches ``p.grad`` (an extra loss term on the weights) is attributed to ``g_2``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from orthoptim.curvature.adapters.base import Block, Grad


def halves(
    block: Block, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor
) -> tuple[Grad | None, Grad]:
    """``(first, total)``: the block gradients ``(dW, db)`` (matrix layout, ``db`` None without a
    bias) of the first ``ceil(B/2)`` samples and of all ``B`` (their sum); ``first`` is None for
    ``B < 2``."""
    ops, batch = block.ops, x.shape[0]
    if batch < 2:
        w, b = ops.weight_grad(x, g, weight)
        return None, (w, b if block.bias is not None else None)
    b1 = (batch + 1) // 2
    w1, c1 = ops.weight_grad(x[:b1], g[:b1], weight)
    w2, c2 = ops.weight_grad(x[b1:], g[b1:], weight)
    total = w1 + w2
    if block.bias is None or c1 is None or c2 is None:
        return (w1, None), (total, None)
    return (w1, c1), (total, c1 + c2)


def join(w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Write ``[w | b]`` (the matrix layout) into ``out`` (any float dtype)."""
    out[:, : w.shape[1]].copy_(w)
    if b is not None:
        out[:, -1].copy_(b)
    return out


def add_joined(w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out += [w | b]``."""
    out[:, : w.shape[1]].add_(w.to(out.dtype))
    if b is not None:
        out[:, -1].add_(b.to(out.dtype))
    return out


def split_from_total(
    S1: torch.Tensor, g: torch.Tensor, batch: int, b1: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(g1, g2)``, the means over the two halves, from ``S1`` and the full mean ``g``."""
    b2 = batch - b1
    return S1 * (batch / b1), (g - S1) * (batch / b2)


def avg_diff_(U: torch.Tensor, batch: int, b1: int) -> torch.Tensor:
    r"""In place, ``U = [g; S_1]`` (shape ``(2, d_out, d_in [+1])``) becomes ``[g_avg; g_diff]``.

    With :math:`c_1 = B/b_1`, :math:`c_2 = B/b_2`:
    :math:`g_{avg} = \tfrac{c_2}{2} g + \tfrac{c_1 - c_2}{2} S_1` (``= g`` for an even batch, no
    op) and :math:`g_{diff} = (c_1 + c_2) S_1 - c_2 g`. Two ops for an even batch.
    """
    c1, c2 = batch / b1, batch / (batch - b1)
    g, S1 = U.unbind()
    if c1 == c2:
        S1.mul_(c1 + c2).sub_(g, alpha=c2)
    else:
        g_avg = g.mul(0.5 * c2).add_(S1, alpha=0.5 * (c1 - c2))
        S1.mul_(c1 + c2).sub_(g, alpha=c2)
        g.copy_(g_avg)
    return U


class HalfBatchWeightGrad(torch.autograd.Function):
    """Identity on a stock block's output whose backward computes the block's gradients itself:
    the weight (and bias) gradient as two half-batch products (:func:`halves`), so FOP's split
    costs no extra product, and the input gradient as usual.

    ``apply(x, weight, bias, out, block, sink)``: ``weight`` / ``bias`` are the tensors the forward
    used (row views for a row block; ``bias`` None when the block has no bias), ``out`` is the
    *detached* output of the layer's own forward; it is marked dirty (not a view), so in-place ops
    after the layer stay legal. In backward, ``sink(first, total, batch)`` receives the
    :func:`halves`. Gradients are computed in the output gradient's dtype (autocast) and returned in
    the inputs' dtypes. Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        block: Block,
        sink: Callable[[Grad | None, Grad, int], None],
    ) -> torch.Tensor:
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, weight)
        ctx.block, ctx.sink = block, sink
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        block, dt = ctx.block, gout.dtype
        xc = x.to(dt) if x.is_floating_point() else x
        wc = weight.to(dt)
        first, total = halves(block, xc, gout, wc)
        gx = block.ops.input_grad(xc, gout, wc) if ctx.needs_input_grad[0] else None
        gx = None if gx is None else gx.to(x.dtype)
        ctx.sink(first, total, x.shape[0])
        gw = block.ops.unmatrix(total[0], weight.shape).to(weight.dtype)
        gb = None if ctx.bias_dtype is None or total[1] is None else total[1].to(ctx.bias_dtype)
        return gx, gw, gb, None, None, None
