r"""Kronecker factors of the Fisher block of one layer, and their running averages.

Conventions (stated once, used everywhere):

* The layer gradient is the matrix :math:`M = [\nabla W \;|\; \nabla b]` of shape
  ``(d_out, d_in + 1)`` (``W`` flattened to ``(d_out, d_in)``, the bias as a last column; no
  column without a bias). K-FAC approximates the Fisher of ``vec(M)`` (row-major) by
  :math:`G \otimes A`, so :math:`F\,\mathrm{vec}(M) = \mathrm{vec}(G M A)`.
* **Bias**: a constant 1 is appended to every input row (Martens & Grosse), so the bias shares the
  layer's ``A`` and ``G`` factors.
* **Linear**: with input ``(B, ..., d_in)`` every leading position after the batch dimension is a
  "location" (``L`` of them): :math:`A = \frac{1}{B L}\sum_{i,t} a_{it} a_{it}^\top`,
  :math:`G = \frac{1}{B}\sum_{i,t} g_{it} g_{it}^\top` (per-sample gradients ``g``).
  With a 2-D input ``L = 1`` and these are the usual :math:`E[a a^\top]`, :math:`E[g g^\top]`.
* **Conv2d** (KFC, Grosse & Martens 2016, same scaling as ASDL used by the FOP code): rows of
  ``A`` are im2col patches (``c_in * k_h * k_w`` in ``weight.flatten(1)`` order, plus the 1),
  averaged over the ``L`` output locations; ``G`` sums the output gradients over locations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows ``a`` of the layer input, shape ``(B * L, d_in [+1])`` (1 appended with a bias)."""
    if isinstance(module, nn.Conv2d):
        u = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = u.transpose(1, 2).reshape(-1, u.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def grad_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Rows of the output gradient, shape ``(B * L, d_out)``."""
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def a_factor(module: nn.Module, inputs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Batch estimate of ``A`` from one or more recorded inputs (samples pooled)."""
    total, n = None, 0
    for x in inputs:
        rows = input_rows(module, x.to(dtype))
        locations = rows.shape[0] // x.shape[0]
        term = (rows.T @ rows).div_(locations)
        total = term if total is None else total.add_(term)
        n += x.shape[0]
    return total.div_(n)


def g_factor(module: nn.Module, grads: list, dtype: torch.dtype) -> torch.Tensor:
    """Batch estimate of ``G`` from ``(grad, scale)`` records; ``scale`` makes per-sample grads."""
    total, n = None, 0
    for g, scale in grads:
        rows = grad_rows(module, g.to(dtype))
        term = (rows.T @ rows).mul_(scale * scale)
        total = term if total is None else total.add_(term)
        n += g.shape[0]
    return total.div_(n)


def ema(old: torch.Tensor | None, new: torch.Tensor, weight: float, init: str) -> torch.Tensor:
    r"""Running average :math:`X \leftarrow (1-\rho) X + \rho \hat X` (out of place).

    ``init='batch'``: the first estimate is taken as is (no warm-up bias).
    ``init='zero'``: starts from zero without bias correction, as ASDL / the FOP code does (the
    first factor is then :math:`\rho \hat X`).
    """
    if old is None:
        return new.clone() if init == "batch" else new * weight
    return old * (1.0 - weight) + new * weight
