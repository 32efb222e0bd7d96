r"""Kronecker factors of the Fisher block of one layer block, and their running averages.

Conventions (stated once, used everywhere):

* A block's gradient is the matrix :math:`M = [\nabla W \;|\; \nabla b]` of shape
  ``(d_out, d_in + 1)`` in the block's matrix layout (:mod:`orthoptim.curvature.adapters`; no
  column without a bias). K-FAC approximates the Fisher of ``vec(M)`` (row-major) by
  :math:`G \otimes A`, so :math:`F\,\mathrm{vec}(M) = \mathrm{vec}(G M A)`.
* **Bias**: a constant 1 is appended to every input row (Martens & Grosse), so the bias shares the
  block's ``A`` and ``G`` factors.
* **Weight sharing** (Eschenhagen et al., NeurIPS 2023): a block applied at ``L`` locations per
  sample (sequence positions, output pixels, or several calls of one module in a forward).
  ``approx='expand'`` (default; KFC for convolutions, as ASDL used by the FOP code) treats the
  locations as extra samples:
  :math:`A = \frac{1}{N L}\sum_{n,t} a_{nt} a_{nt}^\top`,
  :math:`G = \frac{1}{N}\sum_{n,t} g_{nt} g_{nt}^\top`;
  ``approx='reduce'`` aggregates per sample first, :math:`\bar a_n = \frac1L\sum_t a_{nt}`,
  :math:`\bar g_n = \sum_t g_{nt}`, :math:`A = \frac1N\sum_n \bar a_n \bar a_n^\top`,
  :math:`G = \frac1N\sum_n \bar g_n \bar g_n^\top`. Both are exact for a block without
  weight sharing (``L = 1``) and agree with the dense Fisher for a linear model in the setting
  each is derived for (expand: independent locations; reduce: one loss term per sample).
* ``g`` is a per-sample output gradient: the recorded gradient times the number ``N`` of samples
  whose mean loss was differentiated (see :mod:`.capture`).
* A factor larger than ``max_factor_dim`` is kept diagonal (a vector: :math:`\mathrm{diag}(A)`);
  ``nn.Embedding``'s ``A`` is diagonal by construction (one-hot inputs).
"""

from __future__ import annotations

import torch

from orthoptim.curvature.adapters import Block


def a_sum(
    block: Block, inputs: list[torch.Tensor], dtype: torch.dtype, approx: str = "expand"
) -> tuple[torch.Tensor, int]:
    """``(sum, n)``: the unnormalised ``A`` of one or more recorded inputs and its sample count
    (``A = sum / n``; data parallelism sums both over the ranks before dividing)."""
    total: torch.Tensor | None = None
    n = 0
    for x in inputs:
        s, b = block.ops.a_sum(x, approx, block.bias is not None, block.diag_a, dtype)
        total = s if total is None else total.add_(s)
        n += b
    if total is None:
        raise ValueError("a_factor needs at least one recorded input")
    return total, n


def a_factor(
    block: Block, inputs: list[torch.Tensor], dtype: torch.dtype, approx: str = "expand"
) -> torch.Tensor:
    """Batch estimate of ``A`` from one or more recorded inputs (samples pooled)."""
    total, n = a_sum(block, inputs, dtype, approx)
    return total.div_(n)


def g_sum(
    block: Block,
    grads: list[tuple[torch.Tensor, float | torch.Tensor]],
    dtype: torch.dtype,
    approx: str = "expand",
) -> torch.Tensor:
    """The unnormalised ``G`` of ``(grad, scale)`` records (``G = sum / n`` over ``n``
    samples); ``scale`` turns a recorded gradient into a per-sample one."""
    total: torch.Tensor | None = None
    for g, scale in grads:
        s, _ = block.ops.g_sum(g, scale, approx, block.diag_g, dtype)
        total = s if total is None else total.add_(s)
    if total is None:
        raise ValueError("g_factor needs at least one recorded gradient")
    return total


def g_factor(
    block: Block,
    grads: list[tuple[torch.Tensor, float | torch.Tensor]],
    n: int,
    dtype: torch.dtype,
    approx: str = "expand",
) -> torch.Tensor:
    """Batch estimate of ``G`` from ``(grad, scale)`` records over ``n`` samples; ``scale``
    turns a recorded gradient into a per-sample one."""
    return g_sum(block, grads, dtype, approx).div_(n)


def ema(old: torch.Tensor | None, new: torch.Tensor, weight: float, init: str) -> torch.Tensor:
    r"""Running average :math:`X \leftarrow (1-\rho) X + \rho \hat X` (out of place).

    ``init='batch'``: the first estimate is taken as is (no warm-up bias).
    ``init='zero'``: starts from zero without bias correction, as ASDL / the FOP code does (the
    first factor is then :math:`\rho \hat X`).
    """
    if old is None:
        return new.clone() if init == "batch" else new * weight
    return old * (1.0 - weight) + new * weight
