"""Small models with the module layout and attribute names of ecosystem models, built locally.

torchvision cannot be installed beside the CPU torch wheel (its index wheels fail to import), so
:class:`TorchvisionStyleViT` mirrors ``torchvision.models.vision_transformer.VisionTransformer``:
``conv_proj``, a ``class_token`` (1, 1, d) on the model, ``encoder.pos_embedding`` (1, T, d) on
the encoder, ``encoder.layers.encoder_layer_i`` blocks with an ``nn.MultiheadAttention``
(``self_attention``) and an ``MLPBlock`` (an ``nn.Sequential``), and ``heads.head``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class MLPBlock(nn.Sequential):
    def __init__(self, d: int, hidden: int):
        super().__init__(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, d),
                         nn.Dropout(0.0))  # fmt: skip


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLPBlock(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, layers: int, d: int, heads: int, hidden: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, d).normal_(std=0.02))
        blocks = [(f"encoder_layer_{i}", EncoderBlock(d, heads, hidden)) for i in range(layers)]
        self.layers = nn.Sequential(OrderedDict(blocks))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionStyleViT(nn.Module):
    def __init__(self, image_size=8, patch=4, d=16, layers=2, heads=2, hidden=32, classes=10):
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = Encoder((image_size // patch) ** 2 + 1, layers, d, heads, hidden)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(d, classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


class Conv1D(nn.Module):
    """HF transformers' GPT-2 ``Conv1D`` (float64): y = x @ W + b with W stored as (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def conv1d_and_linear_twins(d_in: int, hidden: int, d_out: int) -> tuple[nn.Sequential, ...]:
    """A Conv1D MLP and the nn.Linear MLP with the same function (weights transposed)."""
    convs = nn.Sequential(Conv1D(hidden, d_in), nn.Tanh(), Conv1D(d_out, hidden))
    linears = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()
    with torch.no_grad():
        for conv, lin in ((convs[0], linears[0]), (convs[2], linears[2])):
            lin.weight.copy_(conv.weight.mT)
            lin.bias.copy_(conv.bias)
    return convs, linears
