"""The outer update of K-FAC / FOP: torch's own functional SGD and AdamW on given directions.

``torch.optim.sgd.sgd`` and ``torch.optim.adamw.adamw`` are called with the directions in place of
the gradients and the per-parameter state laid out as ``torch.optim.SGD`` / ``torch.optim.AdamW``
lay it out (``momentum_buffer``; ``step`` as a CPU scalar tensor, ``exp_avg``, ``exp_avg_sq``), so
with identity curvature the parameters match those optimizers bit for bit. ``foreach=None`` lets
torch choose the implementation exactly as those optimizers do by default (the multi-tensor
``_foreach`` kernels on GPUs, the per-tensor loop on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_scalar_dtype
from torch.optim.sgd import sgd


def sgd_update(
    params: list[torch.Tensor],
    dirs: list[torch.Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    lr: float,
) -> None:
    """``torch.optim.SGD``'s step (dampening 0, coupled weight decay) on directions ``dirs``."""
    momentum = group["momentum"]
    bufs = [s.get("momentum_buffer") for s in states]
    sgd(
        params, dirs, bufs, weight_decay=group["weight_decay"], momentum=momentum, lr=lr,
        dampening=0.0, nesterov=group["nesterov"], maximize=False, foreach=None,
    )  # fmt: skip
    if momentum != 0:
        for s, b in zip(states, bufs, strict=True):
            s["momentum_buffer"] = b


def adamw_update(
    params: list[torch.Tensor],
    dirs: list[torch.Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    lr: float,
) -> None:
    """``torch.optim.AdamW``'s step (no amsgrad) on directions ``dirs``."""
    scalar = _get_scalar_dtype()  # type: ignore[no-untyped-call]
    for p, s in zip(params, states, strict=True):
        if "exp_avg" not in s:
            s["step"] = torch.tensor(0.0, dtype=scalar, device="cpu")
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    beta1, beta2 = group["betas"]
    adamw(
        params, dirs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
        [s["step"] for s in states], foreach=None, amsgrad=False, beta1=beta1, beta2=beta2,
        lr=lr, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
    )  # fmt: skip
