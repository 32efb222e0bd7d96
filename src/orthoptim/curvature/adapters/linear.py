"""``nn.Linear`` (any leading dims) and the transposed-weight ``Conv1D`` of Hugging Face GPT-2.

``Conv1D`` computes ``y = x @ W + b`` with ``W`` of shape ``(in, out)``: the same map as an
``nn.Linear`` whose weight is ``W.T``, so its matrix layout is ``W.T`` and everything else is the
Linear's. It is recognised by duck typing (class name ``Conv1D``, a 2-D weight, a bias of the
weight's second size), so ``transformers`` is never imported. Only the class shipped by
``transformers`` counts as having the stock forward (its ``addmm``); a look-alike elsewhere keeps
autograd's weight gradient (FOP's one-pass split then costs an extra product).
"""

from __future__ import annotations

import torch
from torch import nn

from orthoptim.curvature.adapters.base import LayerAdapter, LayerOps


class LinearOps(LayerOps):
    """``y = x W^T + b`` over any leading dims (every position after the batch is a location)."""


class LinearAdapter(LayerAdapter):
    ops_class = LinearOps
    kind = "nn.Linear"

    def stock(self) -> bool:
        return type(self.module).forward is nn.Linear.forward


class Conv1DOps(LinearOps):
    """HF ``Conv1D``: weight ``(in, out)``; matrix layout ``W.T``."""

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.T

    def unmatrix(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return m.T.reshape(shape)

    def input_grad(
        self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor | None:
        return g @ weight.T


def is_hf_conv1d(module: nn.Module) -> bool:
    """Duck-typed Hugging Face ``Conv1D``."""
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    if type(module).__name__ != "Conv1D" or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return False
    return b is None or (isinstance(b, torch.Tensor) and b.shape == (w.shape[1],))


class Conv1DAdapter(LayerAdapter):
    ops_class = Conv1DOps
    kind = "Conv1D (transformers)"

    def stock(self) -> bool:
        return type(self.module).__module__.startswith("transformers.")
