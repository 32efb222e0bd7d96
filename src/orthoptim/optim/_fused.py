"""AdamW and SGD steps over lists of tensors: torch's fused functional kernels, written once.

orthoptim's element-wise updates (FOGO's AdamW parameters, K-FAC/FOP's outer update) call
``torch.optim.adamw.adamw`` / ``torch.optim.sgd.sgd`` with ``fused=True``: one kernel per
(device, dtype) group, and the only torch implementation that takes the device-side skip flag
``found_inf`` (:mod:`orthoptim.optim._nonfinite`): a dropped step leaves parameters, moments,
momentum buffers *and* step counters untouched without a host sync (the foreach and single-tensor
paths cannot; torch's GradScaler syncs for them). The results equal
``torch.optim.AdamW(fused=True)`` / ``torch.optim.SGD(fused=True)`` bit for bit (tests check
AdamW); AdamW's step counters are float32 0-d tensors on the parameter's device, as there.

torch's CPU fused kernels walk memory linearly: on a strided view (a K-FAC direction sliced
from ``[dW | db]``, a transposed parameter) they silently compute garbage (torch 2.13). Every
tensor therefore goes in contiguous; a non-contiguous one that is updated in place is staged
through a contiguous copy and written back (nothing is copied when all are contiguous).
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

Lists = list[list[torch.Tensor]]


def _contiguous(
    updated: Lists, read: Lists
) -> tuple[Lists, Lists, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Contiguous stand-ins for the lists, and the (original, stand-in) pairs to write back."""
    staged = []

    def stage(t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            return t
        copy = t.contiguous()
        staged.append((t, copy))
        return copy

    updated = [[stage(t) for t in ts] for ts in updated]
    return updated, [[t.contiguous() for t in ts] for ts in read], staged


def adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW step in place (``steps``: float32 0-d tensors on the parameters' devices):

        p <- p (1 - lr wd);   m <- lerp(m, g, 1 - b1);   v <- b2 v + (1 - b2) g^2;   t <- t + 1
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    unless ``found_inf`` (float32 0-d) is 1.0: then nothing changes.
    """
    if not params:
        return
    (params, exp_avgs, exp_avg_sqs), (grads,), staged = _contiguous(
        [params, exp_avgs, exp_avg_sqs], [grads]
    )
    adamw(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, found_inf=found_inf,
        amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay,
        eps=eps, maximize=False,
    )  # fmt: skip
    for original, copy in staged:
        original.copy_(copy)


def sgd_(
    params: list[torch.Tensor],
    directions: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One SGD step in place on ``directions`` (``torch.optim.SGD``, dampening 0):

        d <- d + wd p;   b <- mu b + d;   p <- p - lr (d + mu b if nesterov else b)

    unless ``found_inf`` is 1.0. ``momentum_buffers`` (ignored when ``momentum == 0``) must be
    allocated by the caller, zero on the first step (mu 0 + d = d: torch's first step), so a
    dropped first step leaves them zero instead of uninitialised.
    """
    if not params:
        return
    buffers = momentum_buffers if momentum else []
    (params, buffers), (directions,), staged = _contiguous([params, buffers], [directions])
    # torch reads no buffer at all when momentum == 0 (it wants one None per parameter)
    slots: list[torch.Tensor | None] = list(buffers) if momentum else [None] * len(params)
    sgd(
        params, directions, slots, fused=True,
        found_inf=found_inf, weight_decay=weight_decay, momentum=momentum, lr=lr,
        dampening=0.0, nesterov=nesterov, maximize=False,
    )  # fmt: skip
    for original, copy in staged:
        original.copy_(copy)
