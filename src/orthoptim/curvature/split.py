r"""The two half-batch gradients of one layer from a single backward pass.

The batch is split like ``torch.chunk(x, 2)``: the first ``b1 = ceil(B/2)`` samples, then the
rest. With a loss that is a mean over the batch, the recorded output gradient of sample ``i`` is
its per-sample gradient divided by ``B``; so the first-half contribution

.. math:: S_1 = \sum_{i \le b_1} \frac{1}{B}\, g_i a_i^\top

and, with ``g`` the full-batch gradient in ``p.grad``,

.. math:: g_1 = \tfrac{B}{b_1} S_1, \qquad g_2 = \tfrac{B}{b_2} (g - S_1).

:math:`S_1` comes at no extra cost for stock ``nn.Linear`` / ``nn.Conv2d`` layers:
:class:`HalfBatchWeightGrad` makes autograd form the layer's weight gradient as two half-batch
products, :math:`S_1 + S_2`, instead of one full-batch product (the same FLOPs). Subclasses that
override ``forward`` instead get :math:`S_1` from one extra half-size product
(:func:`first_half_pair`, in the output-gradient hook), since their weight gradient is autograd's
business.

This is exact when the layer's per-sample gradients do not interact across samples through the
layer itself. BatchNorm *before* the layer couples samples through the batch statistics: the split
then divides the full-batch-BN gradient into its sample halves, which is not the gradient of a
half-batch loss with half-batch statistics (the paper's two-pass mode). Anything else that reaches
``p.grad`` (an extra loss term on the weights) is attributed to ``g_2``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def _conv_args(module: nn.Conv2d, mask):
    return (module.stride, module.padding, module.dilation, False, [0], 1, mask)


def _weight_grad(module: nn.Module, x: torch.Tensor, gout: torch.Tensor, weight: torch.Tensor):
    """``(dW.flatten(1), db or None)`` of a stock layer from its input ``x`` and output gradient
    ``gout`` (any batch slice; sequences: rows over all positions)."""
    has_bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        # one convolution_backward call gives both the weight and the bias gradient
        sizes = [module.out_channels] if has_bias else None
        _, w, b = torch.ops.aten.convolution_backward(
            gout, x, weight, sizes, *_conv_args(module, (False, True, has_bias))
        )
        return w.flatten(1), b
    g_rows = gout.reshape(-1, gout.shape[-1])
    return g_rows.T @ x.reshape(-1, x.shape[-1]), (g_rows.sum(0) if has_bias else None)


def _put(out: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``[w | b]`` (the layer-matrix layout), written into ``out`` when given."""
    if b is None:
        return w if out is None else out.copy_(w)
    return torch.cat([w, b[:, None]], dim=1, out=out)


def first_half_grad(
    module: nn.Module, x: torch.Tensor, gout: torch.Tensor, b1: int, out: torch.Tensor | None = None
):
    """``S_1`` in the layer-matrix layout ``[dW | db]`` (see :mod:`.factors`), written into ``out``
    when given (any float dtype; saves the copy of a later stack)."""
    return _put(out, *_weight_grad(module, x[:b1], gout[:b1], module.weight))


def _pair_buffer(weight: torch.Tensor, has_bias: bool, dtype: torch.dtype) -> torch.Tensor:
    """The ``(2, d_out, d_in [+1])`` buffer whose second row receives ``S_1``."""
    cols = weight[0].numel() + has_bias
    return torch.empty((2, weight.shape[0], cols), dtype=dtype, device=weight.device)


def splittable(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """True when the layer input ``x`` and its output (or output gradient) ``y`` have a batch
    dimension of at least 2 samples (an unbatched ``(C, H, W)`` or 1-D input has none) and are real
    floating point (complex layers are rejected with a clear error by ``step()``; a hook must not
    fail first)."""
    batched = x.dim() == 4 if isinstance(module, nn.Conv2d) else x.dim() >= 2
    if not batched or x.shape[0] < 2 or y.shape[0] != x.shape[0]:
        return False
    return x.is_floating_point() and y.is_floating_point()


def first_half_pair(module: nn.Module, x: torch.Tensor, gout: torch.Tensor, dtype: torch.dtype):
    """``(U, B)``: a ``(2, d_out, d_in [+1])`` buffer in ``dtype`` whose second row holds ``S_1``
    (the first row is left for the full-batch gradient, see :func:`avg_diff_`) and the batch
    size ``B``; None unless :func:`splittable`. The fallback of
    :class:`~orthoptim.curvature.Capture` for layers without a stock forward (one extra
    half-size product).
    """
    if not splittable(module, x, gout):
        return None
    batch = x.shape[0]
    U = _pair_buffer(module.weight, module.bias is not None, dtype)
    first_half_grad(module, x, gout, (batch + 1) // 2, out=U[1])
    return U, batch


def split_from_total(S1: torch.Tensor, g: torch.Tensor, batch: int, b1: int):
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


def has_stock_forward(module: nn.Module) -> bool:
    """True when ``module`` computes exactly ``nn.Linear`` / ``nn.Conv2d``'s forward (so its weight
    gradient may be formed by :class:`HalfBatchWeightGrad`)."""
    return type(module).forward in (nn.Linear.forward, nn.Conv2d.forward)


def halves_weight_grad(module, x, gout, weight, b1: int, out: torch.Tensor):
    """The full-batch ``(grad_weight, grad_bias)`` of a stock layer formed as ``S_1 + S_2`` (two
    half-batch products, the FLOPs of one full product), with ``S_1`` written into ``out`` in the
    layer-matrix layout ``[dW | db]``; ``grad_bias`` is None without a bias."""
    w1, c1 = _weight_grad(module, x[:b1], gout[:b1], weight)
    w2, c2 = _weight_grad(module, x[b1:], gout[b1:], weight)
    _put(out, w1, c1)
    gw = w1.add_(w2).view_as(weight)
    return gw, (None if c1 is None else c1.add_(c2))


def input_grad(module, x, gout, weight) -> torch.Tensor:
    """The gradient of a stock layer's input (what autograd's own backward computes)."""
    if isinstance(module, nn.Conv2d):
        args = _conv_args(module, (True, False, False))
        return torch.ops.aten.convolution_backward(gout, x, weight, None, *args)[0]
    return gout @ weight


class HalfBatchWeightGrad(torch.autograd.Function):
    """Identity on a stock layer's output whose backward computes the layer's gradients itself:
    the weight (and bias) gradient as two half-batch products (:func:`halves_weight_grad`), so FOP's
    one-pass split costs no extra product, and the input gradient as usual.

    ``apply(x, weight, bias, out, module, sink, dtype)``: ``out`` is the *detached* output of the
    layer's own forward; it is marked dirty (not a view), so in-place ops after the layer stay
    legal. In backward, ``sink((U, B))`` receives the ``(2, d_out, d_in [+1])`` buffer in ``dtype``
    whose second row holds ``S_1`` (as :func:`first_half_pair`). Gradients are computed in the
    output gradient's dtype (autocast) and returned in the inputs' dtypes. Not twice
    differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, out, module, sink, dtype):
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.sink, ctx.dtype = module, sink, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        x, weight = ctx.saved_tensors
        m, dt, batch = ctx.module, gout.dtype, x.shape[0]
        xc, wc = x.to(dt), weight.to(dt)
        U = _pair_buffer(weight, ctx.bias_dtype is not None, ctx.dtype)
        gw, gb = halves_weight_grad(m, xc, gout, wc, (batch + 1) // 2, out=U[1])
        gx = input_grad(m, xc, gout, wc).to(x.dtype) if ctx.needs_input_grad[0] else None
        ctx.sink((U, batch))
        gb = None if gb is None else gb.to(ctx.bias_dtype)
        return gx, gw.to(weight.dtype), gb, None, None, None, None
