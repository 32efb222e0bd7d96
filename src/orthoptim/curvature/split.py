r"""The two half-batch gradients of one layer from a single backward pass.

The batch is split like ``torch.chunk(x, 2)``: the first ``b1 = ceil(B/2)`` samples, then the
rest. With a loss that is a mean over the batch, the recorded output gradient of sample ``i`` is
its per-sample gradient divided by ``B``; so the first-half contribution

.. math:: S_1 = \sum_{i \le b_1} \frac{1}{B}\, g_i a_i^\top

costs one half-size weight-gradient product, and, with ``g`` the full-batch gradient
already in ``p.grad``,

.. math:: g_1 = \tfrac{B}{b_1} S_1, \qquad g_2 = \tfrac{B}{b_2} (g - S_1).

This is exact when the layer's per-sample gradients do not interact across samples through the
layer itself. BatchNorm *before* the layer couples samples through the batch statistics: the split
then divides the full-batch-BN gradient into its sample halves, which is not the gradient of a
half-batch loss with half-batch statistics (the paper's two-pass mode). Anything else that reaches
``p.grad`` (an extra loss term on the weights) is attributed to ``g_2``.
"""

from __future__ import annotations

import torch
from torch import nn


def first_half_grad(
    module: nn.Module, x: torch.Tensor, gout: torch.Tensor, b1: int, out: torch.Tensor | None = None
):
    """``S_1`` in the layer-matrix layout ``[dW | db]`` (see :mod:`.factors`), written into ``out``
    when given (any float dtype; saves the copy of a later stack)."""
    x1, g1 = x[:b1], gout[:b1]
    if isinstance(module, nn.Conv2d):
        # one convolution_backward call gives both the weight and the bias gradient
        has_bias = module.bias is not None
        _, w, b = torch.ops.aten.convolution_backward(
            g1, x1, module.weight, [module.out_channels] if has_bias else None, module.stride,
            module.padding, module.dilation, False, [0], 1, (False, True, has_bias),
        )  # fmt: skip
        w = w.flatten(1)
    else:
        g_rows = g1.reshape(-1, g1.shape[-1])
        w = g_rows.T @ x1.reshape(-1, x1.shape[-1])
        b = g_rows.sum(0) if module.bias is not None else None
    if b is None:
        return w if out is None else out.copy_(w)
    return torch.cat([w, b[:, None]], dim=1, out=out)


def first_half_pair(module: nn.Module, x: torch.Tensor, gout: torch.Tensor, dtype: torch.dtype):
    """``(U, B)``: a ``(2, d_out, d_in [+1])`` buffer in ``dtype`` whose second row holds ``S_1``
    (the first row is left for the full-batch gradient, see :func:`avg_diff_`) and the batch
    size ``B``; None when the batch cannot be split (``B < 2``, or an output gradient whose
    leading size is not ``B``) or the tensors are not real floating point (complex layers are
    rejected with a clear error by ``step()``; a backward hook must not fail first).
    Meant for :attr:`orthoptim.curvature.Capture.split`.
    """
    batch = x.shape[0]
    if batch < 2 or gout.shape[0] != batch:
        return None
    if not (x.is_floating_point() and gout.is_floating_point()):
        return None
    w = module.weight
    cols = w[0].numel() + (module.bias is not None)
    U = torch.empty((2, w.shape[0], cols), dtype=dtype, device=w.device)
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
