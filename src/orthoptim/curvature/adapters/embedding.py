r"""``nn.Embedding``: a linear map of one-hot token vectors, with the standard diagonal ``A``.

Token ``i`` is the one-hot input :math:`e_i` of a map whose matrix layout is the transposed
weight (``(dim, num_embeddings)``), so

.. math:: A = \mathrm{diag}(\text{token frequencies}), \qquad G = E[g g^\top]\ (dim \times dim)

(frequencies per location, averaged like any other input rows; K-FAC-reduce does not apply, the
expand form is always used). ``A`` is kept as a vector whatever ``max_factor_dim``: a 50k
vocabulary costs 50k numbers. ``padding_idx`` works (its row gets no gradient). Refused:
``sparse=True`` (sparse gradients), ``max_norm`` (the forward rewrites the weight) and
``scale_grad_by_freq`` (the gradient is no longer the Fisher's).
"""

from __future__ import annotations

import torch
from torch import nn

from orthoptim.curvature.adapters.base import Grad, LayerAdapter, LayerOps


class EmbeddingOps(LayerOps):
    diag_input = True

    def __init__(self, module: nn.Embedding) -> None:
        self.num, self.padding_idx = module.num_embeddings, module.padding_idx

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.T

    def unmatrix(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return m.T.reshape(shape)

    def rows_out(self, g: torch.Tensor) -> torch.Tensor:
        g = g if g.dim() >= 3 else g[None]
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def a_sum(
        self, x: torch.Tensor, approx: str, bias: bool, diag: bool, dtype: torch.dtype
    ) -> tuple[torch.Tensor, int]:
        x = x if self.batched(x) else x[None]
        counts = torch.bincount(x.flatten(), minlength=self.num).to(dtype)
        locations = x[0].numel()
        return counts.div_(locations), x.shape[0]

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> Grad:
        g = g.reshape(-1, g.shape[-1])
        dw = torch.zeros(weight.shape, dtype=g.dtype, device=g.device)
        dw.index_add_(0, x.flatten(), g)
        if self.padding_idx is not None:
            dw[self.padding_idx] = 0
        return dw.T, None

    def input_grad(
        self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor | None:
        return None  # token indices have no gradient


class EmbeddingAdapter(LayerAdapter):
    kind = "nn.Embedding"
    module: nn.Embedding

    def ops(self) -> LayerOps:
        return EmbeddingOps(self.module)

    def refuse(self) -> str | None:
        m = self.module
        if m.sparse:
            return "nn.Embedding(sparse=True) has sparse gradients"
        if m.max_norm is not None:
            return "nn.Embedding(max_norm=...) rewrites its weight in forward"
        if m.scale_grad_by_freq:
            return "nn.Embedding(scale_grad_by_freq=True) rescales its gradient"
        return None

    def stock(self) -> bool:
        return type(self.module).forward is nn.Embedding.forward
