"""Build FOGO/Muon-style param groups from a model, by module type and name, and say so."""

from __future__ import annotations

import warnings

import torch.nn as nn

# Module names that, by convention, hold a model's output head.
HEAD_NAMES = ("head", "lm_head", "classifier", "fc_out", "output", "out_proj_head")


def _is_head(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in HEAD_NAMES


def param_groups(
    model: nn.Module,
    *,
    head_names: tuple[str, ...] | None = None,
    verbose: bool = True,
    **group_options,
) -> list[dict]:
    """Split ``model``'s trainable parameters into an orthogonalized group and an AdamW group.

    Muon practice (Keller Jordan's Muon, modded-nanogpt, Moonlight): hidden weight matrices are
    orthogonalized; embeddings (``nn.Embedding``), the output head, biases, norm gains and every
    other tensor with ndim < 2 go to AdamW. Shape alone cannot tell an embedding or a head from a
    hidden matrix, so this helper uses module types and names: a module whose attribute name is
    one of ``head_names`` (default: head, lm_head, classifier, fc_out, output) is the head. If no
    such module exists, the last ``nn.Linear`` registered is taken as the head, with a warning.

    Args:
        model: the model.
        head_names: attribute names that identify the output head.
        verbose: warn with the chosen routing (which tensors go to AdamW and why).
        **group_options: extra keys copied into both groups (e.g. ``lr=...``).

    Returns:
        ``[{"params": hidden, "algorithm": "fogo"}, {"params": rest, "algorithm": "adamw"}]``
        plus ``group_options`` (a group is omitted when empty).
    """
    names = tuple(head_names) if head_names is not None else HEAD_NAMES
    head_modules = {n for n, m in model.named_modules() if n and n.rsplit(".", 1)[-1] in names}
    if not head_modules:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            head_modules = {linears[-1]}
            warnings.warn(
                f"param_groups: no module named one of {names}; treating the last nn.Linear "
                f"'{linears[-1]}' as the output head (AdamW). Pass head_names=... to choose.",
                stacklevel=2,
            )
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    ortho, adamw, reasons = [], [], []
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if mod_name in embeddings:
                adamw.append(p)
                reasons.append(f"{full} (embedding)")
            elif mod_name in head_modules:
                adamw.append(p)
                reasons.append(f"{full} (output head)")
            elif p.ndim < 2:
                adamw.append(p)
            else:
                ortho.append(p)
    if verbose and reasons:
        warnings.warn("param_groups: AdamW for " + ", ".join(reasons), stacklevel=2)
    groups = []
    if ortho:
        groups.append({"params": ortho, "algorithm": "fogo", **group_options})
    if adamw:
        groups.append({"params": adamw, "algorithm": "adamw", **group_options})
    return groups
