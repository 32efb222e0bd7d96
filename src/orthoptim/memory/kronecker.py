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

**Shared factors** (``kron_share="model"``): every whole protected side of the same dimension d
(in a transformer: the residual stream, the smaller side of every block matrix and the feature
side of the embedding / head) uses one factor pair, whose Gram is the plain sum of the sides'
Grams,

.. math::
    A^{shared}_t = \sum_{i} \sum_k G_{i,k}^T G_{i,k}
    \qquad (G_{i,k} G_{i,k}^T \text{ for a side that is the stored matrix's rows}),

normalised as above at consolidation: 2 d^2 floats for the whole model instead of per matrix.
(Normalising each matrix's Gram before the sum would need every matrix's d x d Gram; measured on
``lm-continual`` it protects no better, docs/fogo.md section 10.8.)

**Task-agnostic boundary detection** (``kron_detect`` = g > 1, shared factors only): the
step's gradient energy e_k = sum_i ||G_ik||_F^2 = tr(step Gram) of a shared factor is followed
by a fast and a slow exponential average (betas :data:`DETECT_FAST`, :data:`DETECT_SLOW`); a
step whose fast average exceeds g times the slow one starts a new task when the running Gram
holds at least :data:`MIN_STRETCH` steps: at the start of that step, before anything is damped,
the Gram gathered *before* it is folded in (so the new task's own directions are not damped)
and the new Gram starts with the step's. Everything runs on the device with ``torch.where``
(one d x d solve per step and factor, :func:`fold`; no host read; see :func:`detect_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIDES = ("input", "output")
SIDE_CHOICES = ("smaller", "mixed", "both", "input", "output")
SHARE_CHOICES = ("none", "model")
# Boundary detection (``kron_detect``): betas of the fast and slow averages of the step's
# gradient energy, and the fewest steps a task's Gram holds before a boundary may fold it.
# Measured on lm-continual's per-step gradient energy (docs/fogo.md, section 10.8): the energy
# jumps 1.9-2.5x on the first step of a new corpus; within a corpus the fast average exceeds
# 1.5x the slow one only within 21 steps after a boundary. The threshold g is the user's: on
# permuted MNIST 1.5 also fires within tasks, and 2 misses the LM's second boundary (10.8).
DETECT_FAST = 0.5
DETECT_SLOW = 0.95
MIN_STRETCH = 50


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


def init_detector(side: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The boundary detector's state of a shared factor's ``side`` (float32): ``<side>_energy``
    (the fast and slow averages of the step's gradient energy; 0: no step yet) and
    ``<side>_since`` (steps in the running Gram since the last fold)."""
    return {
        f"{side}_energy": torch.zeros(2, device=device),
        f"{side}_since": torch.zeros((), device=device),
    }


def gram_sum(grads: torch.Tensor, side: str) -> torch.Tensor:
    """sum_i G_i^T G_i (``side="input"``) or sum_i G_i G_i^T (``"output"``) of a stack of
    gradients (N, m, n), in float32: the contribution of N matrices to a shared Gram."""
    g = grads.float()
    return (g.mT @ g if side == "input" else g @ g.mT).sum(0)


def detect_step(
    acc: torch.Tensor,
    pre: torch.Tensor,
    e: torch.Tensor,
    energy: torch.Tensor,
    since: torch.Tensor,
    kappa: float,
    growth: float,
) -> dict[str, torch.Tensor]:
    r"""The start of a step of the task-agnostic consolidation of a shared factor, out of place
    and on the device (no host read; the fold is computed every step and selected with
    ``torch.where``), before the step's Grams are added and before any update is damped.

    With e the step's gradient energy (sum of the members' ||G||_F^2, the trace of the step's
    Gram), the fast and slow averages f <- b_f f + (1 - b_f) e and s <- b_s s + (1 - b_s) e
    (both start at the first step's e), a *jump* is f > g s_prev (g = ``growth``). A jump
    *folds* when the running Gram ``acc`` holds at least :data:`MIN_STRETCH` steps (``since``)
    and is not zero:

    .. math::
        \mathrm{pre} \leftarrow (\mathrm{pre}^{-1} + \kappa\, \widehat{\mathrm{acc}})^{-1},
        \qquad \mathrm{acc} \leftarrow 0

    (the Gram gathered before the jump is the old task's; this step's Grams, added next, start
    the new one, and this step is already damped by the fold); ``since`` counts this step.
    Any jump also resets the slow average to the fast one (the new level is the baseline from
    then on), so the decaying energy after a boundary does not fire again.

    Args:
        acc: (d, d) running Gram since the last fold (float32).
        pre: (d, d) preconditioner (I + kappa P)^-1.
        e: 0-d, this step's gradient energy.
        energy: (2,) the fast and the slow average (0: no step yet).
        since: 0-d, steps in ``acc``.
        kappa: protection strength.
        growth: g > 1.

    Returns:
        The new ``acc``, ``pre``, ``energy`` and ``since`` (to commit, or not on a dropped step).
    """
    e = e.to(energy.dtype)
    fresh = energy[1] <= 0
    fast = torch.where(fresh, e, DETECT_FAST * energy[0] + (1 - DETECT_FAST) * e)
    slow = torch.where(fresh, e, energy[1])
    jump = fast > growth * slow
    fire = jump & (since >= MIN_STRETCH) & (torch.trace(acc) > 0)
    return {
        "acc": torch.where(fire, torch.zeros_like(acc), acc),
        "pre": torch.where(fire, fold(pre, acc, kappa), pre),
        "energy": torch.stack(
            [fast, torch.where(jump, fast, DETECT_SLOW * slow + (1 - DETECT_SLOW) * e)]
        ),
        "since": torch.where(fire, torch.ones_like(since), since + 1),
    }


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


def fold(
    pre: torch.Tensor, acc: torch.Tensor, kappa: float, decay: float = 1.0
) -> torch.Tensor:
    r"""A full side's preconditioner after folding in the Gram ``acc``: with P = ``pre`` and
    hat A = acc / (tr(acc) / d) (0 for a zero Gram),

    .. math::
        P_{new} = \bigl(\mathrm{decay}\,P^{-1} + (1-\mathrm{decay})\,I + \kappa \hat A\bigr)^{-1}
              = \bigl(\mathrm{decay}\,I + P\,((1-\mathrm{decay})\,I + \kappa \hat A)\bigr)^{-1} P,

    one float64 solve of a system similar to an SPD matrix with eigenvalues >= decay
    (P is never inverted), symmetrised, in ``pre``'s dtype. On the device, no host read (used
    every step by :func:`detect_step`).

    Args:
        pre: (d, d) preconditioner (I + kappa P_old)^-1.
        acc: (d, d) the task's Gram.
        kappa: protection strength.
        decay: weight of the old precision (1: a plain sum of tasks).
    """
    a, p = acc.double(), pre.double()
    d = a.shape[0]
    normalised = a / (torch.trace(a) / d).clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(d, dtype=p.dtype, device=p.device)
    system = decay * eye + p @ ((1 - decay) * eye + kappa * normalised)
    new = torch.linalg.solve_ex(system, p).result
    return (0.5 * (new + new.mT)).to(pre.dtype)


def consolidate(
    state: dict[str, torch.Tensor], kappa: float, decay: float = 1.0, rank: int = 0
) -> None:
    """End of a task: fold its normalised Gram into each side's preconditioner; reset the Gram.

    The precision becomes I + decay P_old + kappa hat A (``decay`` < 1: an online, forgetting
    sum of windows, for consolidations on a schedule). ``rank`` > 0 keeps a full side only on
    its ``rank`` least-damped directions (:func:`keep_free`). A side whose Gram is zero (no
    gradient this task) keeps its preconditioner. A full side folds with :func:`fold`. Rare and
    eager: reads the Gram's trace on the host.
    """
    for side in SIDES:
        if f"{side}_acc" not in state:
            continue
        acc = state[f"{side}_acc"].double()
        pre = state[f"{side}_pre"]
        total = float(acc.sum() if acc.ndim == 1 else torch.trace(acc))
        if total > 0:
            if acc.ndim == 1:
                normalised = acc / (total / acc.shape[0])
                pre.copy_(1 / (1 + decay * (1 / pre.double() - 1) + kappa * normalised))
            else:
                new = fold(pre, acc, kappa, decay)
                pre.copy_(keep_free(new, rank) if 0 < rank < new.shape[0] else new)
        state[f"{side}_acc"].zero_()
        if f"{side}_since" in state:  # a shared factor's detector: the new Gram is empty
            state[f"{side}_since"].zero_()
