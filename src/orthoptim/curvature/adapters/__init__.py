"""Layer adapters (the extension point): which layers K-FAC / FOP precondition, and how.

Built in: ``nn.Linear`` (any leading dims), ``nn.Conv1d`` and ``nn.Conv2d`` (``groups == 1``, any
padding), the transposed-weight ``Conv1D`` of Hugging Face GPT-2 (duck-typed), ``nn.Embedding``
(diagonal ``A``: token counts) and ``nn.MultiheadAttention`` (q/k/v projections and ``out_proj``).
Register your own layer class with :func:`register_adapter` (see :mod:`.base`).
"""

from torch import nn

from orthoptim.curvature.adapters.attention import MultiheadAttentionAdapter
from orthoptim.curvature.adapters.base import (
    Block,
    LayerAdapter,
    LayerOps,
    adapter_for,
    register_adapter,
    register_duck_adapter,
)
from orthoptim.curvature.adapters.conv import ConvAdapter, ConvOps
from orthoptim.curvature.adapters.embedding import EmbeddingAdapter, EmbeddingOps
from orthoptim.curvature.adapters.linear import (
    Conv1DAdapter,
    Conv1DOps,
    LinearAdapter,
    LinearOps,
    is_hf_conv1d,
)

register_adapter(nn.Linear, LinearAdapter)
register_adapter(nn.Conv1d, ConvAdapter)
register_adapter(nn.Conv2d, ConvAdapter)
register_adapter(nn.Embedding, EmbeddingAdapter)
register_adapter(nn.MultiheadAttention, MultiheadAttentionAdapter)
register_duck_adapter(is_hf_conv1d, Conv1DAdapter)

__all__ = [
    "Block",
    "Conv1DAdapter",
    "Conv1DOps",
    "ConvAdapter",
    "ConvOps",
    "EmbeddingAdapter",
    "EmbeddingOps",
    "LayerAdapter",
    "LayerOps",
    "LinearAdapter",
    "LinearOps",
    "MultiheadAttentionAdapter",
    "adapter_for",
    "register_adapter",
    "register_duck_adapter",
]
