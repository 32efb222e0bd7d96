r"""``nn.Conv1d`` and ``nn.Conv2d`` (KFC, Grosse & Martens 2016).

Rows of ``A`` are the im2col patches (``c_in * k_h * k_w`` in ``weight.flatten(1)`` order) at the
``L`` output locations; output gradients are rows over the same locations. Every padding works:
the input is padded first (``padding_mode`` and ``'same'`` included), then unfolded without
padding. ``Conv1d`` is a ``Conv2d`` of height 1. Grouped and depthwise convolutions
(``groups > 1``) are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orthoptim.curvature.adapters.base import Grad, LayerAdapter, LayerOps

Conv = nn.Conv1d | nn.Conv2d


class ConvOps(LayerOps):
    """An ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups == 1``."""

    def __init__(self, module: Conv) -> None:
        self.nd = 1 if isinstance(module, nn.Conv1d) else 2
        self.kernel: tuple[int, ...] = tuple(module.kernel_size)
        self.stride: tuple[int, ...] = tuple(module.stride)
        self.dilation: tuple[int, ...] = tuple(module.dilation)
        self.padding = module.padding
        self.mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        self.pads: tuple[int, ...] = tuple(module._reversed_padding_repeated_twice)
        self.bias_sizes = [module.out_channels] if module.bias is not None else None
        self.int_padding = module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def batched(self, x: torch.Tensor) -> bool:
        return x.dim() == self.nd + 2

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(x', padding)``: the input and the padding to give the convolution so that no
        padding mode or asymmetric ``'same'`` padding is left."""
        if self.int_padding:
            return x, tuple(int(p) for p in self.padding)
        return F.pad(x, self.pads, mode=self.mode), (0,) * self.nd

    def rows_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.batched(x) else x[None]
        xp, pad = self._padded(x)
        k, s, d = self.kernel, self.stride, self.dilation
        if self.nd == 1:
            xp, k, s, d, pad = xp[:, :, None], (1, *k), (1, *s), (1, *d), (0, *pad)
        u = F.unfold(xp, k, dilation=d, padding=pad, stride=s)
        return u.transpose(1, 2)

    def rows_out(self, g: torch.Tensor) -> torch.Tensor:
        g = g if self.batched(g) else g[None]
        return g.flatten(2).transpose(1, 2)

    def _backward(
        self, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: tuple[bool, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xp, pad = self._padded(x)
        zeros = (0,) * self.nd
        return torch.ops.aten.convolution_backward(
            g, xp, weight, self.bias_sizes, self.stride, pad, self.dilation, False, zeros, 1, mask
        )

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> Grad:
        # one convolution_backward call gives both the weight and the bias gradient
        _, w, b = self._backward(g, x, weight, (False, True, self.bias_sizes is not None))
        return w.flatten(1), b

    def input_grad(
        self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor | None:
        if not self.int_padding:  # only stock layers (integer zero padding) get here
            raise NotImplementedError("input_grad needs integer zero padding")
        return self._backward(g, x, weight, (True, False, False))[0]


class ConvAdapter(LayerAdapter):
    kind = "nn.Conv1d / nn.Conv2d"
    module: Conv

    def ops(self) -> LayerOps:
        return ConvOps(self.module)

    def refuse(self) -> str | None:
        if self.module.groups != 1:
            return f"grouped convolution (groups={self.module.groups}) is not supported"
        return None

    def stock(self) -> bool:
        stock = nn.Conv1d.forward if isinstance(self.module, nn.Conv1d) else nn.Conv2d.forward
        return type(self.module).forward is stock and ConvOps(self.module).int_padding
