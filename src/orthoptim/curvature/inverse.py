r"""Damping, inverses and Kronecker mat-vecs for one layer.

Two damping rules:

* ``'pi'`` (Martens & Grosse 2015, as ASDL / the FOP code): with
  :math:`\pi = \sqrt{(\mathrm{tr}A/d_A)/(\mathrm{tr}G/d_G)}`, the inverse is
  :math:`(G + \delta_G I)^{-1} \otimes (A + \delta_A I)^{-1}` with
  :math:`\delta_A = \max(\sqrt\lambda\,\pi, 10^{-7})`,
  :math:`\delta_G = \max(\sqrt\lambda/\pi, 10^{-7})`. Factor inverses by Cholesky
  (``'cholesky'``, the paper's code) or eigendecomposition (``'eigen'``).
* ``'tikhonov'``: the exact inverse of :math:`G \otimes A + \lambda I` through the eigenbases of
  both factors, :math:`Q_G [(Q_G^\top M Q_A) / (d_G d_A^\top + \lambda)] Q_A^\top`
  (kfac-pytorch's eigen method). Needs ``method='eigen'``.
"""

from __future__ import annotations

import torch


def kron_mv(G: torch.Tensor, A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    r""":math:`(G \otimes A)\,\mathrm{vec}(M)` in matrix form: ``G @ M @ A`` (A, G symmetric)."""
    return G @ M @ A


def pi_damping(A: torch.Tensor, G: torch.Tensor, damping: float):
    """Return ``(delta_A, delta_G)`` as 0-d tensors (pi = 1 when a trace is not positive)."""
    ta = A.diagonal().mean()
    tg = G.diagonal().mean()
    ok = (ta > 0) & (tg > 0)
    pi = torch.where(ok, (ta / torch.where(ok, tg, 1.0)).sqrt(), torch.ones_like(ta))
    root = damping**0.5
    return (root * pi).clamp_min(1e-7), (root / pi).clamp_min(1e-7)


def _eigh(X: torch.Tensor):
    r"""Eigendecomposition :math:`X = Q\,\mathrm{diag}(d)\,Q^\top` of a PSD factor, in float64.

    Returns ``(d, Q)`` in float64 with ``d`` clipped at 0 (factors are PSD; the negatives are
    round-off), so damping is always added to non-negative eigenvalues.

    Why float64 whatever the factor dtype: a nearly rank-deficient fp32 factor (``A`` after a few
    batch-1 steps has rank ~4 of 46) has a cluster of eigenvalues at fp32 round-off (±1e-7 around
    0), and fp32 LAPACK ``syevd`` then fails to converge (``LinAlgError``, found by the fuzzer).
    In float64 the same matrix decomposes. Factors are small and this runs once per inverse
    update, so the cost is amortised.
    """
    d, Q = torch.linalg.eigh(X.to(torch.float64))
    return d.clamp_min(0.0), Q


def spd_inverse(X: torch.Tensor, shift: torch.Tensor, method: str) -> torch.Tensor:
    r"""``(X + shift I)^{-1}``; Cholesky falls back to ``eigh`` if round-off breaks it.

    The eigen form is :math:`Q\,\mathrm{diag}(1/(\max(d, 0) + \mathrm{shift}))\,Q^\top`,
    computed in float64 (see :func:`_eigh`) and returned in ``X.dtype``.
    """
    eye = torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
    if method == "cholesky":
        L, info = torch.linalg.cholesky_ex(X + shift * eye)
        if int(info) == 0:  # one sync per inverse update (amortised), never in the hot path
            return torch.cholesky_inverse(L)
    d, Q = _eigh(X)
    return ((Q / (d + shift.to(d.dtype))) @ Q.T).to(X.dtype)


def compute_preconditioner(
    A: torch.Tensor, G: torch.Tensor, damping: float, damping_type: str, method: str
) -> dict:
    """Damped inverse of ``G kron A`` in the form :func:`inverse_mv` consumes."""
    if damping_type == "pi":
        dA, dG = pi_damping(A, G, damping)
        return {"A_inv": spd_inverse(A, dA, method), "G_inv": spd_inverse(G, dG, method)}
    dA, QA = _eigh(A)
    dG, QG = _eigh(G)
    scale = 1.0 / (dG[:, None] * dA[None, :] + damping)
    return {"QA": QA.to(A.dtype), "QG": QG.to(G.dtype), "scale": scale.to(A.dtype)}


def inverse_mv(pre: dict, M: torch.Tensor) -> torch.Tensor:
    """Apply the damped inverse built by :func:`compute_preconditioner` to the matrix ``M``."""
    if "A_inv" in pre:
        return pre["G_inv"] @ M @ pre["A_inv"]
    QA, QG = pre["QA"], pre["QG"]
    return QG @ ((QG.T @ M @ QA) * pre["scale"]) @ QA.T
