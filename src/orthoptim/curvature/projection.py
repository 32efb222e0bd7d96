r"""FOP's per-layer transform (Lu & Armour, AAAI-26), vectorised over layers.

Given the half-batch gradients of one layer through :math:`g_{avg} = \tfrac12(g_1+g_2)` and
:math:`g_{diff} = g_1-g_2`, the undamped Fisher :math:`F` and the damped inverse :math:`F^{-1}`:

.. math::

    s = \frac{\langle g_{diff}, F g_{avg}\rangle}{\langle g_{avg}, F g_{avg}\rangle},\quad
    g_\perp = g_{diff} - s\, g_{avg},\quad
    \beta^* = \frac{D}{E},\ D = \langle g_{avg}, F^{-1} g_\perp\rangle,\
    E = \langle g_\perp, F^{-1} g_\perp\rangle

    g_{comb} = g_{avg} + \beta g_\perp,\qquad
    \eta^* = \frac{\langle g_1+g_2, F^{-1} g_{comb}\rangle}
                  {\langle g_{comb}, F^{-1}g_{comb}\rangle},\qquad d = \eta\, F^{-1} g_{comb}

Only three mat-vecs are needed (the official code spends four), because everything is linear:
with :math:`p_{avg} = F^{-1} g_{avg}` and :math:`p_{diff} = F^{-1} g_{diff}`,
:math:`F^{-1} g_\perp = p_{diff} - s\,p_{avg}` and
:math:`d = \eta(1-\beta s)\,p_{avg} + \eta\beta\,p_{diff}`. ``D``, ``E`` and the η terms are
expanded into the five inner products of :func:`fop_dots`, so the scalar algebra of all layers runs
as a handful of batched tensor ops (:func:`fop_coefficients`), without host syncs.

Guards as in the official code: ``s = 0`` when :math:`|\langle g_{avg}, F g_{avg}\rangle| \le
10^{-12}`; adaptive :math:`\beta = \mathrm{clamp}(D/(E+10^{-12}))` only when :math:`|E| > 10^{-12}`
(else 0); adaptive :math:`\eta = \mathrm{clamp}(\mathrm{num}/(\mathrm{den}+10^{-12}))` only when
the denominator exceeds :math:`10^{-12}` (else 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_TINY = 1e-12


def fop_dots(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``(2, 3)`` inner products of the rows of ``U = [g_avg; g_diff]`` with those of
    ``V = [F g_avg; p_avg; p_diff]`` (stacks of same-shape tensors along dim 0)."""
    return U.flatten(1) @ V.flatten(1).T


def fop_terms(dots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From stacked :func:`fop_dots` (``(L, 2, 3)``) the per-layer scalars of the projection:
    ``(s, a, D, E)`` with ``a = <g_avg, F^-1 g_avg>``, ``D = <g_avg, F^-1 g_perp>`` and
    ``E = <g_perp, F^-1 g_perp>`` (``s = 0`` where ``<g_avg, F g_avg>`` is tiny)."""
    den_s, num_s = dots[:, 0, 0], dots[:, 1, 0]
    a, x, y = dots[:, 0, 1], dots[:, 0, 2], dots[:, 1, 2]  # <ga,p_avg>, <ga,p_diff>, <gd,p_diff>
    ok = den_s.abs() > _TINY
    s = torch.where(ok, num_s / torch.where(ok, den_s, 1.0), 0.0)
    return s, a, x - s * a, y - 2.0 * s * x + s * s * a


def fop_coefficients(
    dots: torch.Tensor,
    *,
    beta: float | None = None,
    eta: float | None = None,
    beta_clamp: tuple[float, float] = (-0.5, 0.5),
    eta_clamp: tuple[float, float] = (0.0, 2.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From stacked :func:`fop_dots` (``(L, 2, 3)``) return ``(c_avg, c_diff, beta, eta)``.

    Each is a length-``L`` tensor, and layer ``l``'s direction is
    ``c_avg[l] * p_avg + c_diff[l] * p_diff``. ``beta`` / ``eta``: a number fixes the coefficient
    (used as given, not clamped); ``None`` uses the adaptive, clamped value.
    """
    s, a, D, E = fop_terms(dots)
    if beta is None:
        b = torch.where(E.abs() > _TINY, (D / (E + _TINY)).clamp(*beta_clamp), 0.0)
    else:
        b = torch.full_like(a, beta)
    if eta is None:
        den_e = a + 2.0 * b * D + b * b * E  # <g_comb, F^-1 g_comb>
        e = (2.0 * (a + b * D) / (den_e + _TINY)).clamp(*eta_clamp)  # <g1+g2, F^-1 g_comb>
        e = torch.where(den_e > _TINY, e, 1.0)
    else:
        e = torch.full_like(a, eta)
    return e * (1.0 - b * s), e * b, b, e


def fop_combine(
    g1: torch.Tensor,
    g2: torch.Tensor,
    fmv: Callable[[torch.Tensor], torch.Tensor],
    imv: Callable[[torch.Tensor], torch.Tensor],
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer: return ``(direction, beta, eta)`` with ``direction = eta * F^{-1} g_comb``.

    ``fmv(v) = F v`` (undamped), ``imv(v) = F^{-1} v`` (damped); ``kwargs`` as
    :func:`fop_coefficients`.
    """
    g_avg, g_diff = (g1 + g2) * 0.5, g1 - g2
    p_avg, p_diff = imv(g_avg), imv(g_diff)
    dots = fop_dots(torch.stack([g_avg, g_diff]), torch.stack([fmv(g_avg), p_avg, p_diff]))[None]
    c_avg, c_diff, b, e = fop_coefficients(dots, **kwargs)
    return c_avg[0] * p_avg + c_diff[0] * p_diff, b[0], e[0]
