r"""Kronecker-factored soft protection of past tasks for matrix parameters (opt-in, issue 15).

EWC (Kirkpatrick et al. 2017) with a K-FAC-style Kronecker factorisation of each past task's
Fisher, F_t ~= S_t (x) A_t (Martens & Grosse 2015), written as FOGO's proximal lift: the update
U closest to the orthogonalized direction O whose protected coordinates are damped,

.. math::
    U = (I + \kappa \sum_t \hat S_t)^{-1}\, O\, (I + \kappa \sum_t \hat A_t)^{-1}

(the product form: each side damped on its own; FOGO's RMS scale follows, so the step keeps its
size and moves into the directions the past tasks used least). The factors are the optimizer's
own statistics of a task's weight gradients G (m x n, stored layout):

    A_t = sum_k G_k^T G_k   (n x n, the stored matrix's input side),
    S_t = sum_k G_k G_k^T   (m x m, its output side),

each normalised to mean eigenvalue 1 (the hat), so that every task weighs the same whatever its
gradient scale. A side may instead be a *diagonal* (per-unit energies: the column or row sums of
squares), for a side too large to hold whole (the token rows of an embedding). Measured on
``lm-continual`` (docs/fogo.md, section 10): low-rank or diagonal versions of the block
matrices' factors lose almost all the protection, so those are kept whole.

State per protected side of dimension d (``init``): ``<side>_acc`` (d x d, or d for a diagonal;
float32), the running Gram of the current task, and ``<side>_pre`` (the same shape), the
preconditioner (I + kappa P)^-1 of the consolidated tasks (identity at first). A task is folded
in as pre <- (pre^-1 + kappa hat A)^-1, so P itself is never stored. Cost: 2 d^2 floats per
full side (47.5% of GPT-2 small's parameter bytes with the smaller side of every matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIDES = ("input", "output")
SIDE_CHOICES = ("smaller", "mixed", "both", "input", "output")


@dataclass(frozen=True)
class KroneckerConfig:
    """The Kronecker protection's settings for one (param group, matrix shape).

    Attributes:
        sides: ``(("input" | "output", "full" | "diagonal"), ...)``: the protected sides of the
            *stored* matrix (input = its columns) and how each is held.
        kappa: protection strength.
        online: gamma in [0, 1): > 0 also consolidates every ``write_interval`` steps into a
            forgetting sum (task-agnostic); 0: only at ``end_task``.
        write_interval: steps between online consolidations (0: none).
    """

    sides: tuple[tuple[str, str], ...]
    kappa: float
    online: float
    write_interval: int


def layer_sides(out_dim: int, in_dim: int, which: str) -> dict[str, str]:
    """How each side of a layer with ``out_dim`` outputs and ``in_dim`` inputs is protected,
    in the layer's terms: ``which`` is "both" (both whole), "input", "output", "smaller" (the
    smaller side whole; the input side when square: in a transformer block, the residual
    stream) or "mixed" (the smaller side whole, the other as a diagonal)."""
    if which == "both":
        return {"input": "full", "output": "full"}
    if which in ("input", "output"):
        return {which: "full"}
    small = "input" if in_dim <= out_dim else "output"
    if which == "smaller":
        return {small: "full"}
    return {small: "full", ("output" if small == "input" else "input"): "diagonal"}


def init(
    sides: dict[str, str], m: int, n: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """The state of an m x n (stored) matrix protected on ``sides`` (``{"input": "full" or
    "diagonal", ...}``): each side's running Gram ``<side>_acc`` (zeros) and preconditioner
    ``<side>_pre`` (identity), d x d when full and d when diagonal, with d = n (input side) or
    m (output side)."""
    state = {}
    for side, form in sides.items():
        d = n if side == "input" else m
        if form == "full":
            state[f"{side}_acc"] = torch.zeros(d, d, device=device)
            state[f"{side}_pre"] = torch.eye(d, device=device)
        else:
            state[f"{side}_acc"] = torch.zeros(d, device=device)
            state[f"{side}_pre"] = torch.ones(d, device=device)
    return state


def grams(state: dict[str, torch.Tensor], grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The running Grams plus one step's gradient (..., m, n) (out of place; leading dims
    batch): G^T G on the input side, G G^T on the output side; a diagonal side adds only the
    diagonal (the column or row sums of squares)."""
    g = grad.float()
    out = {}
    acc = state.get("input_acc")
    if acc is not None:
        out["input_acc"] = acc + (g.mT @ g if acc.ndim == g.ndim else g.square().sum(-2))
    acc = state.get("output_acc")
    if acc is not None:
        out["output_acc"] = acc + (g @ g.mT if acc.ndim == g.ndim else g.square().sum(-1))
    return out


def apply(state: dict[str, torch.Tensor], update: torch.Tensor) -> torch.Tensor:
    """(I + kappa P_out)^-1 U (I + kappa P_in)^-1 on the protected sides of ``update``
    (..., m, n), in float32 or the update's dtype if wider (leading dims batch)."""
    dtype = torch.promote_types(update.dtype, torch.float32)
    out = update.to(dtype)
    pre = state.get("input_pre")
    if pre is not None:
        pre = pre.to(dtype)
        out = out @ pre if pre.ndim == out.ndim else out * pre.unsqueeze(-2)
    pre = state.get("output_pre")
    if pre is not None:
        pre = pre.to(dtype)
        out = pre @ out if pre.ndim == out.ndim else out * pre.unsqueeze(-1)
    return out.to(update.dtype)


def keep_free(pre: torch.Tensor, rank: int) -> torch.Tensor:
    """The preconditioner kept on its ``rank`` least-damped directions (the directions the
    past tasks used least, largest eigenvalues of (I + kappa P)^-1), the rest replaced by its
    mean eigenvalue: what a memory of d x rank numbers (plus one) can hold. A diagnostic
    (scripts/fogo_lm_diagnosis.py), not an option: it measured what such a memory loses."""
    ev, evec = torch.linalg.eigh(pre.double())
    free = evec[:, -rank:]
    rest = ev[:-rank].mean() if ev.numel() > rank else ev.new_zeros(())
    eye = torch.eye(pre.shape[0], dtype=ev.dtype, device=ev.device)
    return (free * (ev[-rank:] - rest)) @ free.mT + rest * eye


def consolidate(
    state: dict[str, torch.Tensor], kappa: float, decay: float = 1.0, rank: int = 0
) -> None:
    """End of a task: fold its normalised Gram into each side's preconditioner; reset the Gram.

    The precision becomes I + decay P_old + kappa hat A (``decay`` < 1: an online, forgetting
    sum of windows, for consolidations on a schedule). ``rank`` > 0 keeps a full side only on
    its ``rank`` least-damped directions (:func:`keep_free`). A side whose Gram is zero (no
    gradient this task) keeps its preconditioner. Rare and eager: inverts d x d matrices in
    float64 and reads the Gram's trace on the host.
    """
    for side in SIDES:
        if f"{side}_acc" not in state:
            continue
        acc = state[f"{side}_acc"].double()
        pre = state[f"{side}_pre"]
        total = float(acc.sum() if acc.ndim == 1 else torch.trace(acc))
        if total > 0:
            normalised = acc / (total / acc.shape[0])
            if acc.ndim == 1:
                pre.copy_(1 / (1 + decay * (1 / pre.double() - 1) + kappa * normalised))
            else:
                eye = torch.eye(acc.shape[0], dtype=acc.dtype, device=acc.device)
                precision = eye + decay * (torch.linalg.inv(pre.double()) - eye)
                precision = precision + kappa * normalised
                new = torch.linalg.inv(0.5 * (precision + precision.mT))
                pre.copy_(keep_free(new, rank) if 0 < rank < new.shape[0] else new)
        state[f"{side}_acc"].zero_()
