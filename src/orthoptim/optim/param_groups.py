"""Build FOGO/Muon-style param groups from a model, by module type and name, and say so."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

__all__ = ["param_groups", "HEAD_NAMES", "EMBEDDING_NAMES"]

# Attribute names that, by convention, hold a model's output head: ours and nanoGPT's `head` /
# `lm_head` (HF causal LMs), `classifier` (HF, torchvision VGG / EfficientNet / MobileNet),
# `heads` (torchvision ViT), `score` (HF sequence classification), `output` (Meta's Llama).
HEAD_NAMES = (
    "head", "lm_head", "classifier", "heads", "score", "fc_out", "output", "out_proj_head",
)  # fmt: skip

# Names of token and position tables, as module or parameter names: HF GPT-2 (`wte`, `wpe`),
# Llama / BART (`embed_tokens`, `embed_positions`), BERT / HF ViT (`word_embeddings`,
# `position_embeddings`, `token_type_embeddings`), timm ViT (`cls_token`, `pos_embed`,
# `dist_token`, `reg_token`), torchvision ViT (`class_token`, `pos_embedding`), Swin
# (`absolute_pos_embed`), BEiT / HF ViT (`mask_token`).
EMBEDDING_NAMES = (
    "wte", "wpe", "embed_tokens", "embed_positions", "word_embeddings", "position_embeddings",
    "token_type_embeddings", "tok_embeddings", "cls_token", "class_token", "dist_token",
    "reg_token", "mask_token", "pos_embed", "pos_embedding", "absolute_pos_embed",
)  # fmt: skip

# Modules that hold weight matrices directly *and* have sub-modules (MHA's fused in-projection).
_LAYERS_WITH_CHILDREN = (nn.MultiheadAttention,)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules holding a parameter of ndim >= 2 themselves, in registration order."""
    for name, module in model.named_modules():
        if any(p.ndim >= 2 for p in module.parameters(recurse=False)):
            yield name, module


def _is_embedding(name: str, module: nn.Module, names: tuple[str, ...]) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or (
        bool(name) and _leaf(name) in names
    )


def _find_head(model: nn.Module, names: tuple[str, ...], emb: tuple[str, ...]) -> set[str]:
    """Module names of the output head (see :func:`param_groups` for the rule)."""
    layers = [(n, m) for n, m in _weight_layers(model) if not _is_embedding(n, m, emb)]
    named = {n for n, _ in layers if n and _leaf(n) in names}
    if named:
        return named
    if not layers:
        return set()
    last = layers[-1][0]
    if isinstance(model, nn.Sequential):  # registration order is the forward order
        return {last}
    containers = [n for n, _ in model.named_modules() if n and _leaf(n) in names]
    if any(last.startswith(c + ".") for c in containers):
        return {last}
    warnings.warn(
        f"param_groups: no layer named one of {names}; treating the last layer with a weight "
        f"matrix, '{last}', as the output head (AdamW). Pass head_names=... to choose.",
        stacklevel=3,
    )
    return {last}


def param_groups(
    model: nn.Module,
    *,
    head_names: tuple[str, ...] | None = None,
    embedding_names: tuple[str, ...] | None = None,
    verbose: bool = True,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into an orthogonalized group and an AdamW group.

    Muon practice (Keller Jordan's Muon, modded-nanogpt, Moonlight): the hidden weight matrices
    of layers are orthogonalized; embeddings, the output head, biases, norm gains and every other
    tensor that is not a layer's weight matrix go to AdamW. Shape alone cannot tell these apart
    (a ViT's class token (1, 1, d) and position table (1, T, d) look like Conv1d kernels), so this
    helper uses module types and names. In order, a trainable parameter goes to AdamW when:

    1. **embedding**: its module is an ``nn.Embedding`` / ``nn.EmbeddingBag``, or its module's or
       its own name is in ``embedding_names`` (HF ``wte``, ``wpe``, ``embed_tokens``; timm
       ``cls_token``, ``pos_embed``; torchvision ``class_token``, ``pos_embedding``; see
       :data:`EMBEDDING_NAMES`);
    2. **output head**: it belongs to the output head (below);
    3. it has ndim < 2 (biases, norm gains, scalars);
    4. **not a layer weight**: it is set directly on a module that has sub-modules (a model's or
       block's own ``nn.Parameter``, e.g. a scale or a learned query), except
       ``nn.MultiheadAttention``'s in-projection, which is a layer weight.

    Everything else (``nn.Linear``, convolution, HF ``Conv1D``, RNN and attention weights, and
    the matrices of any leaf module) is orthogonalized.

    The output head is, first, every layer whose name is in ``head_names`` (``lm_head``, ``head``,
    ``classifier``, ...; a *layer* is a module holding a parameter of ndim >= 2 itself). Else it
    is the last layer registered, without a warning when that is certain: the model is an
    ``nn.Sequential`` (registration order is the forward order) or the layer sits inside a module
    named in ``head_names`` (torchvision's ``classifier`` ``Sequential``, timm's ``head.fc``).
    Otherwise that last layer is a guess, and a warning says so (once per call site).

    Args:
        model: the model.
        head_names: layer / module names that identify the output head (default
            :data:`HEAD_NAMES`).
        embedding_names: module or parameter names of token and position tables (default
            :data:`EMBEDDING_NAMES`).
        verbose: warn with the chosen routing (which tensors of ndim >= 2 go to AdamW and why).
        **group_options: extra keys copied into both groups (e.g. ``lr=...``).

    Returns:
        ``[{"params": hidden, "algorithm": "fogo"}, {"params": rest, "algorithm": "adamw"}]``
        plus ``group_options`` (a group is omitted when empty). Tied parameters (an LM head
        sharing the embedding matrix) appear once, routed by their first module.
    """
    names = tuple(head_names) if head_names is not None else HEAD_NAMES
    emb = tuple(embedding_names) if embedding_names is not None else EMBEDDING_NAMES
    head = _find_head(model, names, emb)
    ortho: list[torch.Tensor] = []
    adamw: list[torch.Tensor] = []
    reasons: list[str] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        container = next(module.children(), None) is not None and not isinstance(
            module, _LAYERS_WITH_CHILDREN
        )
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if _is_embedding(mod_name, module, emb) or p_name in emb:
                reason = "embedding"
            elif mod_name in head:
                reason = "output head"
            elif p.ndim < 2:
                adamw.append(p)
                continue
            elif container:
                owner = f"'{mod_name}'" if mod_name else "the model"
                reason = f"not a layer weight: set on {owner} ({type(module).__name__})"
            else:
                ortho.append(p)
                continue
            adamw.append(p)
            reasons.append(f"{full} ({reason})")
    if verbose and reasons:
        warnings.warn("param_groups: AdamW for " + ", ".join(reasons), stacklevel=2)
    groups: list[dict[str, Any]] = []
    if ortho:
        groups.append({"params": ortho, "algorithm": "fogo", **group_options})
    if adamw:
        groups.append({"params": adamw, "algorithm": "adamw", **group_options})
    return groups
