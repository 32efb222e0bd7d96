"""FOGO's short-term step as pure functions over a bucket of N same-shape matrices.

Inputs are stacked (N, m, n) tensors or lists of the N per-parameter tensors; every write of
optimizer state is masked by ``skip`` (a 0-d bool tensor on the device: the step is dropped,
see :mod:`orthoptim.optim._nonfinite`), so a dropped step changes nothing, without a host sync.
Element-wise and per-matrix operations only: each matrix's result does not depend on the others
in its bucket (batched Newton-Schulz and norms reduce per matrix), which is what lets a
sharded step compute any slice of a bucket and get the bits a replicated step gets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from orthoptim.ops.geometry import nlerp, rms_scale, slerp
from orthoptim.ops.newton_schulz import newton_schulz


def commit_(
    targets: list[torch.Tensor],
    new: torch.Tensor,
    skip: torch.Tensor | None,
    old: torch.Tensor | None = None,
) -> torch.Tensor:
    """``targets[i] <- new[i]`` for the N per-parameter tensors, unless the step is dropped
    (``old``: ``torch.stack(targets)`` when the caller has it). Returns what was stored."""
    if skip is not None:
        new = torch.where(skip, torch.stack(targets) if old is None else old, new)
    torch._foreach_copy_(targets, list(new.unbind(0)))
    return new


def keep(skip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 for a step that is taken, 0 for a dropped one: a 0-d ``dtype`` tensor."""
    return (~skip).to(dtype)


def count_steps_(steps: list[torch.Tensor], skip: torch.Tensor | None) -> None:
    """Add one to each matrix's step counter (float32 0-d) unless dropped (adds 0: exact)."""
    if skip is None:
        torch._foreach_add_(steps, 1.0)
    else:  # a list: a lone tensor would be read as a Scalar (a host read)
        torch._foreach_add_(steps, [keep(skip, torch.float32)] * len(steps))


def finite_grads(grads: list[torch.Tensor], skip: torch.Tensor | None) -> list[torch.Tensor]:
    """The gradients as the step uses them: themselves, or zeros on a dropped step (G * 0 with
    NaN and infinities zeroed, per tensor: nothing is stacked), so that every value derived
    from them stays finite and the step can be dropped by factors (:func:`momentum_`,
    :func:`scaled`) rather than by ``torch.where`` over the matrices."""
    if skip is None:
        return grads
    out = list(torch._foreach_mul(grads, [keep(skip, grads[0].dtype)] * len(grads)))
    for g in out:
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return out


def momentum_(
    grads: list[torch.Tensor],
    buffers: Sequence[list[torch.Tensor]],
    betas: Sequence[float],
    nesterov: bool,
    skip: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Update each momentum stream M <- lerp(M, G, 1 - beta) and return the directions.

    Args:
        grads: the N gradients G (m, n), from :func:`finite_grads`.
        buffers: per stream, the N momentum buffers (updated in place unless dropped).
        betas: per stream, its beta.
        nesterov: direction G + beta (M - G) instead of M.
        skip: the step's drop flag (None: never dropped).

    Returns:
        The N * S directions (m, n), streams interleaved per matrix (the input of
        :func:`orthogonalize`; without ``nesterov`` the buffers themselves), finite on a
        dropped step whenever the buffers are.

    float32/float64 buffers are updated in place (``_foreach_lerp_``); a dropped step lerps
    towards the zeroed gradients with weight 0 (0-d device tensors: a lerp with a tensor weight
    has the bits of one with the Python float), which leaves M as it was (a -0.0 entry becomes
    +0.0, the same value). In half precision a tensor weight would be rounded to the buffer's
    dtype where a Python float is not: the new values are stacked and masked there.
    """
    n, dtype = len(grads), grads[0].dtype
    directions = []
    for bufs, beta in zip(buffers, betas, strict=True):
        if skip is not None and dtype not in (torch.float32, torch.float64):
            old = torch.stack(bufs)
            commit_(bufs, torch.lerp(old, torch.stack(grads), 1 - beta), skip, old)
        elif skip is None:
            torch._foreach_lerp_(bufs, grads, 1 - beta)
        else:  # 0-d tensor weights (the List overload): 0 on a dropped step
            weights = [keep(skip, dtype) * (1 - beta)] * n
            torch._foreach_lerp_(bufs, grads, weights)
        directions.append(torch._foreach_lerp(grads, bufs, beta) if nesterov else bufs)
    return [d for per in zip(*directions, strict=True) for d in per]


def orthogonalize(
    directions: list[torch.Tensor],
    streams: int,
    steps: int,
    coefficients: str | tuple[float, float, float],
    dtype: str,
    eps: float,
) -> torch.Tensor:
    """Newton-Schulz polar factors of the N * S directions of :func:`momentum_`, as
    (N, S, m, n): one call for all (batched on accelerators; on the CPU matrix by matrix,
    without stacking them, :func:`orthoptim.ops.newton_schulz.newton_schulz`)."""
    out = newton_schulz(directions, steps, coefficients, dtype, eps)
    return out.view(-1, streams, *out.shape[1:])


def fuse(ortho: torch.Tensor, fusion: str, mix: float, eps: float) -> torch.Tensor:
    """Fuse the two streams of (N, S, m, n) polar factors (slerp or nlerp; S = 1: the stream)."""
    if ortho.shape[1] == 1:
        return ortho[:, 0]
    interp = slerp if fusion == "slerp" else nlerp
    return interp(ortho[:, 0], ortho[:, 1], mix, eps)


Scalar = float | torch.Tensor


def coefficient(scale: str, target_rms: float, lr: Scalar, shape: Sequence[int]) -> Scalar:
    """alpha of the parameter update p <- p (1 - lr wd) + alpha u (see :func:`scaled`)."""
    if scale == "muon":
        return -(lr * (target_rms * math.sqrt(max(shape[-2:]))))
    return -lr


def scaled(
    direction: torch.Tensor,
    scale: str,
    target_rms: float,
    eps: float,
    lr: Scalar,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Scalar]:
    """The update sent to the parameters and its coefficient: p <- p (1 - lr wd) + alpha u.

    ``scale="rms"``: u = gamma D with gamma = sigma sqrt(mn) / ||D||_F (RMS of u = sigma),
    alpha = -lr. ``scale="muon"``: u = D, alpha = -lr sigma sqrt(max(m, n)) (torch's
    ``match_rms_adamw``). Returns (u, alpha); u is (N, m, n). A dropped step (``skip``)
    multiplies u by 0 (by 1 otherwise: the same bits), which zeroes it as D is finite then
    (:func:`momentum_`); cheaper than a ``torch.where`` over the matrices.
    """
    alpha = coefficient(scale, target_rms, lr, direction.shape)
    gamma = None if scale == "muon" else rms_scale(direction, target_rms, eps)
    if skip is not None:
        factor = keep(skip, direction.dtype)
        gamma = factor if gamma is None else gamma * factor
    return (direction if gamma is None else direction * gamma), alpha


def apply_(
    params: list[torch.Tensor],
    updates: torch.Tensor,
    lr: Scalar,
    weight_decay: float,
    alpha: Scalar,
    skip: torch.Tensor | None,
    stepped: torch.Tensor | None = None,
    zeroed: bool = False,
) -> None:
    """p <- p (1 - lr wd) + alpha u for every parameter, in place, unless the step is dropped
    (then p * 1 + alpha * 0: exactly p). ``updates``: (N, m, n), the parameters' matrices.
    ``stepped``: (N,) bool, which parameters take the update (a sharded step's owners' flags);
    the others stay exactly as they are. ``zeroed``: the updates are already zero on a dropped
    step (:func:`scaled`), only the weight decay is masked here.

    With a tensor ``lr`` (``alpha`` a tensor) the update is p + (alpha u): one more rounding
    than the fused p + alpha u of a Python ``lr``, and no host read."""
    drop = skip
    if stepped is not None:
        drop = ~stepped if skip is None else skip | ~stepped
        drop = drop.view(-1, 1, 1)
    if drop is not None and not zeroed:
        updates = torch.where(drop, torch.zeros((), dtype=updates.dtype, device=drop.device),
                              updates)  # fmt: skip
    if weight_decay != 0:
        decay = 1 - lr * weight_decay
        factor: Scalar | list[torch.Tensor] = decay
        if drop is not None:  # float64 0-d: p * decay rounds as with a Python float
            if isinstance(decay, torch.Tensor):  # a tensor lr
                value = decay.to(device=drop.device, dtype=torch.float64)
            else:  # a fill, not a copy to the device
                value = torch.full((), decay, dtype=torch.float64, device=drop.device)
            one = torch.ones((), dtype=torch.float64, device=drop.device)
            per = torch.where(drop.view(-1), one, value)
            factor = per[0] if stepped is None else list(per.unbind(0))
        torch._foreach_mul_(params, factor)
    if isinstance(alpha, torch.Tensor):
        updates = updates * alpha.to(updates.dtype)
        alpha = 1
    views = [u.reshape(p.shape) for u, p in zip(updates.unbind(0), params, strict=True)]
    torch._foreach_add_(params, views, alpha=alpha)
