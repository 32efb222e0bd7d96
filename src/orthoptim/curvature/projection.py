r"""FOP's per-layer transform (Lu & Armour, AAAI-26), written with two mat-vec callables.

Given the half-batch gradients :math:`g_1, g_2` of one layer, the undamped Fisher mat-vec
``fmv`` (:math:`F v`) and the damped inverse mat-vec ``imv`` (:math:`F^{-1} v`):

.. math::

    g_{avg} = \tfrac12(g_1+g_2),\quad g_{diff} = g_1-g_2,\quad
    s = \frac{\langle g_{diff}, F g_{avg}\rangle}{\langle g_{avg}, F g_{avg}\rangle},\quad
    g_\perp = g_{diff} - s\, g_{avg}

    \beta^* = \frac{D}{E},\ D = \langle g_{avg}, F^{-1} g_\perp\rangle,\
    E = \langle g_\perp, F^{-1} g_\perp\rangle,\qquad g_{comb} = g_{avg} + \beta g_\perp

    \eta^* = \frac{\langle g_1+g_2, F^{-1} g_{comb}\rangle}
                  {\langle g_{comb}, F^{-1}g_{comb}\rangle},\qquad d = \eta\, F^{-1} g_{comb}

Guards as in the official code: ``s = 0`` when :math:`|\langle g_{avg}, F g_{avg}\rangle| \le
10^{-12}`; adaptive :math:`\beta = \mathrm{clamp}(D/(E+10^{-12}))` only when :math:`|E| > 10^{-12}`
(else 0); adaptive :math:`\eta = \mathrm{clamp}(\cdot/(\mathrm{den}+10^{-12}))` only when the
denominator exceeds :math:`10^{-12}` (else 1). All branches are ``torch.where`` (no host sync).
By linearity :math:`F^{-1} g_{comb} = F^{-1} g_{avg} + \beta F^{-1} g_\perp`, so three mat-vecs
(one ``F``, two ``F^{-1}``) suffice; the official code spends four.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_TINY = 1e-12


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum()


def fop_combine(
    g1: torch.Tensor,
    g2: torch.Tensor,
    fmv: Callable[[torch.Tensor], torch.Tensor],
    imv: Callable[[torch.Tensor], torch.Tensor],
    *,
    beta: float | None = None,
    eta: float | None = None,
    beta_clamp: tuple[float, float] = (-0.5, 0.5),
    eta_clamp: tuple[float, float] = (0.0, 2.0),
):
    """Return ``(direction, beta, eta)``: ``direction = eta * F^{-1} g_comb`` and 0-d tensors.

    ``beta`` / ``eta``: a number fixes the coefficient (used as given, not clamped); ``None``
    computes the adaptive value, clamped to ``beta_clamp`` / ``eta_clamp``.
    """
    g_avg = (g1 + g2) * 0.5
    g_diff = g1 - g2
    f_avg = fmv(g_avg)
    den = _dot(g_avg, f_avg)
    ok = den.abs() > _TINY
    s = torch.where(ok, _dot(g_diff, f_avg) / torch.where(ok, den, 1.0), 0.0)
    g_perp = g_diff - s * g_avg

    p_avg = imv(g_avg)
    p_perp = imv(g_perp)
    if beta is None:
        E = _dot(g_perp, p_perp)
        b = (_dot(g_avg, p_perp) / (E + _TINY)).clamp(*beta_clamp)
        b = torch.where(E.abs() > _TINY, b, 0.0)
    else:
        b = torch.as_tensor(beta, dtype=g_avg.dtype, device=g_avg.device)
    p_comb = p_avg + b * p_perp
    if eta is None:
        g_comb = g_avg + b * g_perp
        den_e = _dot(g_comb, p_comb)
        e = (2.0 * _dot(g_avg, p_comb) / (den_e + _TINY)).clamp(*eta_clamp)
        e = torch.where(den_e > _TINY, e, 1.0)
    else:
        e = torch.as_tensor(eta, dtype=g_avg.dtype, device=g_avg.device)
    return e * p_comb, b, e
