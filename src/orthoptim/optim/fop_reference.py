r"""Readable FOP reference: the paper's formulas on flat vectors with dense Fisher blocks.

A test oracle. ``F`` is the dense undamped K-FAC block, ``Finv`` the dense damped inverse (see
:mod:`orthoptim.optim.kfac_reference`); the guards are those of the official code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from orthoptim.optim.kfac_reference import reference_train


def fop_direction_dense(
    g1: torch.Tensor,
    g2: torch.Tensor,
    F: torch.Tensor,
    Finv: torch.Tensor,
    *,
    beta: float | None = None,
    eta: float | None = None,
    beta_clamp: tuple[float, float] = (-0.5, 0.5),
    eta_clamp: tuple[float, float] = (0.0, 2.0),
) -> tuple[torch.Tensor, float, float]:
    """Return ``(d, beta, eta)`` for one layer, step by step as in the paper."""
    g_avg = (g1 + g2) / 2
    g_diff = g1 - g2
    den = float(g_avg @ F @ g_avg)
    s = float(g_diff @ F @ g_avg) / den if abs(den) > 1e-12 else 0.0
    g_perp = g_diff - s * g_avg  # F-orthogonal to g_avg
    if beta is None:
        D = float(g_avg @ Finv @ g_perp)
        E = float(g_perp @ Finv @ g_perp)
        beta = min(max(D / (E + 1e-12), beta_clamp[0]), beta_clamp[1]) if abs(E) > 1e-12 else 0.0
    g_comb = g_avg + beta * g_perp
    if eta is None:
        g_tot = g1 + g2
        den = float(g_comb @ Finv @ g_comb)
        num = float(g_tot @ Finv @ g_comb)
        eta = min(max(num / (den + 1e-12), eta_clamp[0]), eta_clamp[1]) if den > 1e-12 else 1.0
    return eta * (Finv @ g_comb), beta, eta


def reference_fop_direction(
    ls: dict[str, Any], g: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, hp: dict[str, Any]
) -> torch.Tensor:
    """FOP layer direction for :func:`~orthoptim.optim.kfac_reference.reference_train`."""
    d, _, _ = fop_direction_dense(
        g1, g2, ls["F"], ls["Finv"], beta=hp.get("beta"), eta=hp.get("eta"),
        beta_clamp=hp.get("beta_clamp", (-0.5, 0.5)), eta_clamp=hp.get("eta_clamp", (0.0, 2.0)),
    )  # fmt: skip
    return d


def reference_fop_train(
    model: nn.Sequential,
    batches: Iterable[Any],
    loss_fn: Callable[..., torch.Tensor],
    hp: dict[str, Any],
) -> list[float]:
    """FOP in plain loops: two half-batch backward passes, dense blocks, SGD-momentum."""
    return reference_train(model, batches, loss_fn, hp, direction=reference_fop_direction)
