r"""``nn.MultiheadAttention``: the query, key and value projections and ``out_proj`` as blocks.

The module's own forward calls ``F.multi_head_attention_forward``, which reads the projection
weights directly: no hook sees the q/k/v outputs or their gradients, and ``out_proj``'s hooks never
fire. So the adapter replaces the module's ``forward`` (an instance attribute, removed with the
optimizer's hooks) by the same computation written out:

1. the inputs are made batch first (``batch_first`` either way; an unbatched ``(L, E)`` input is a
   batch of one);
2. the projections ``q = F.linear(query, W_q, b_q)``, ``k``, ``v`` are computed separately and
   shown to the capture as three blocks, each with the ``A`` of its own input (query vs
   key/value in cross-attention) and its own ``G``: the packed ``in_proj_weight`` as three row
   blocks (``[q]``, ``[k]``, ``[v]``), or the separate ``q/k/v_proj_weight`` (``kdim`` /
   ``vdim``); ``in_proj_bias`` follows its rows;
3. scaled dot-product attention with the module's masks (``attn_mask`` 2-D or 3-D, bool or
   float, ``key_padding_mask``, ``is_causal`` as a hint next to the mask, as torch requires),
   dropout in training, and attention weights when ``need_weights`` (averaged over heads unless
   ``average_attn_weights=False``), exactly as torch's slow path computes them;
4. ``self.out_proj(...)`` called as a module, so its ``nn.Linear`` hooks see it.

The output equals the module's own to float rounding (tested). Refused (the module's matrices then
get the plain outer update, named in the warning): ``add_bias_kv``, ``add_zero_attn`` and
subclasses that override ``forward``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orthoptim.curvature.adapters.base import Block, LayerAdapter
from orthoptim.curvature.adapters.linear import LinearAdapter, LinearOps

_QKV = ("q", "k", "v")


class MultiheadAttentionAdapter(LayerAdapter):
    kind = "nn.MultiheadAttention"
    module: nn.MultiheadAttention

    def refuse(self) -> str | None:
        m = self.module
        if type(m).forward is not nn.MultiheadAttention.forward:
            return "a subclass of nn.MultiheadAttention with its own forward"
        if m.bias_k is not None or m.bias_v is not None:
            return "nn.MultiheadAttention(add_bias_kv=True) is not reproduced"
        if m.add_zero_attn:
            return "nn.MultiheadAttention(add_zero_attn=True) is not reproduced"
        return None

    def claims(self) -> list[nn.Module]:
        return [self.module.out_proj]

    def _projection(self, key: str) -> tuple[nn.Parameter, slice | None]:
        """``(weight, rows)`` of the projection ``key`` ('q', 'k' or 'v')."""
        return projection(self.module, key)

    def _same_projection(self, key: str, block: Block) -> bool:
        w, rows = self._projection(key)
        return w is block.weight and rows == block.rows

    def blocks(self, name_of: dict[Any, str]) -> list[Block]:
        m = self.module
        bias = m.in_proj_bias if m.in_proj_bias is not None and m.in_proj_bias in name_of else None
        out = []
        for i, key in enumerate(_QKV):
            w, rows = self._projection(key)
            if w not in name_of:
                continue
            brows = slice(i * m.embed_dim, (i + 1) * m.embed_dim)
            name = name_of[w] if rows is None else f"{name_of[w]}[{key}]"
            block_key = "w" if rows is None else key
            out.append(Block(name, block_key, LinearOps(), m, w, bias, rows, brows, stock=True))
        return out + LinearAdapter(m.out_proj).blocks(name_of)

    def install(self, capture: Any) -> list[Any]:
        m = self.module
        sites: dict[str, Block] = {}
        for block in capture.blocks_of(m):
            key = next(k for k in _QKV if self._same_projection(k, block))
            sites[key] = block
        # an instance attribute shadows the class's forward (removed by the handle)
        object.__setattr__(m, "forward", partial(attention_forward, capture, sites, m))
        return [_ForwardPatch(m), *LinearAdapter(m.out_proj).install(capture)]


def projection(m: nn.MultiheadAttention, key: str) -> tuple[nn.Parameter, slice | None]:
    """``(weight, rows)`` of ``m``'s projection ``key`` ('q', 'k' or 'v')."""
    i = _QKV.index(key)
    if m.in_proj_weight is not None:
        e = m.embed_dim
        return m.in_proj_weight, slice(i * e, (i + 1) * e)
    w = getattr(m, f"{key}_proj_weight")
    assert isinstance(w, nn.Parameter)
    return w, None


class _ForwardPatch:
    """Removes the replaced forward (the class's forward is used again)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _project(
    capture: Any, sites: dict[str, Block], m: nn.MultiheadAttention, key: str, x: torch.Tensor
) -> torch.Tensor:
    """One projection: ``F.linear`` on the block's weight rows, shown to the capture."""
    e, i = m.embed_dim, _QKV.index(key)
    weight, rows = projection(m, key)
    w = weight if rows is None else weight[rows]
    b = None if m.in_proj_bias is None else m.in_proj_bias[i * e : (i + 1) * e]
    y = F.linear(x, w, b)
    block = sites.get(key)
    return y if block is None else capture.forward(block, x, y)


def _masks(
    m: nn.MultiheadAttention,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    query: torch.Tensor,
    bsz: int,
    tgt: int,
    src: int,
) -> torch.Tensor | None:
    """The additive mask broadcastable to ``(B, H, L, S)`` (or None), as torch builds it."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype,
    )  # fmt: skip
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
        target_type=query.dtype, check_other=False,
    )  # fmt: skip
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt, src):
                raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {(tgt, src)}.")  # fmt: skip
            mask = attn_mask[None, None]
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * m.num_heads, tgt, src):
                raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {(bsz * m.num_heads, tgt, src)}.")  # fmt: skip
            mask = attn_mask.view(bsz, m.num_heads, tgt, src)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(bsz, 1, 1, src)
        mask = kpm if mask is None else mask + kpm
    return mask


def attention_forward(
    capture: Any, sites: dict[str, Block], m: nn.MultiheadAttention, query: torch.Tensor,
    key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True, attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True, is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``nn.MultiheadAttention.forward`` with hookable projections (see the module docstring)."""
    if query.is_nested or key.is_nested or value.is_nested:
        raise NotImplementedError("K-FAC's nn.MultiheadAttention adapter takes no NestedTensor")
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
            "method `generate_square_subsequent_mask` to create this mask."
        )
    batched = query.dim() == 3
    if not batched:  # (L, E) -> a batch of one
        query, key, value = query[None], key[None], value[None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    elif not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    bsz, tgt, e = query.shape
    src, heads = key.shape[1], m.num_heads
    hd = e // heads
    mask = _masks(m, attn_mask, key_padding_mask, query, bsz, tgt, src)
    q = _project(capture, sites, m, "q", query)
    k = _project(capture, sites, m, "k", key)
    v = _project(capture, sites, m, "v", value)
    q, k, v = (t.view(bsz, -1, heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
    dropout_p = m.dropout if m.training else 0.0
    weights = None
    if need_weights:  # torch's explicit path: scaled q, baddbmm with the mask, softmax, dropout
        q3 = q.reshape(bsz * heads, tgt, hd) * math.sqrt(1.0 / float(hd))
        k3, v3 = k.reshape(bsz * heads, src, hd), v.reshape(bsz * heads, src, hd)
        if mask is not None:
            mask3 = mask.expand(bsz, heads, tgt, src).reshape(bsz * heads, tgt, src)
            scores = torch.baddbmm(mask3, q3, k3.transpose(-2, -1))
        else:
            scores = torch.bmm(q3, k3.transpose(-2, -1))
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v3).view(bsz, heads, tgt, hd)
        weights = weights.view(bsz, heads, tgt, src)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p)
    out = m.out_proj(out.transpose(1, 2).reshape(bsz, tgt, e))
    if not batched:
        out = out.squeeze(0)
    elif not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights
