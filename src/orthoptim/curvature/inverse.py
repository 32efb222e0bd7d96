r"""Damping, inverses and Kronecker mat-vecs for one block.

A factor is a full symmetric matrix or, when kept diagonal (``max_factor_dim``, embeddings), the
vector of its diagonal; every function here takes either.

Two damping rules:

* ``'pi'`` (Martens & Grosse 2015, as ASDL / the FOP code): with
  :math:`\pi = \sqrt{(\mathrm{tr}A/d_A)/(\mathrm{tr}G/d_G)}`, the inverse is
  :math:`(G + \delta_G I)^{-1} \otimes (A + \delta_A I)^{-1}` with
  :math:`\delta_A = \max(\sqrt\lambda\,\pi, 10^{-7})`,
  :math:`\delta_G = \max(\sqrt\lambda/\pi, 10^{-7})`. Factor inverses by Cholesky
  (``'cholesky'``, the paper's code) or eigendecomposition (``'eigen'``).
* ``'tikhonov'``: the exact inverse of :math:`G \otimes A + \lambda I` through the eigenbases of
  both factors, :math:`Q_G [(Q_G^\top M Q_A) / (d_G d_A^\top + \lambda)] Q_A^\top`
  (kfac-pytorch's eigen method; a diagonal factor is its own eigenbasis). Needs
  ``method='eigen'``.
"""

from __future__ import annotations

import torch


def left(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``X @ M`` for a full ``X``, ``diag(X) @ M`` for a vector ``X``."""
    return X[:, None] * M if X.dim() == 1 else X @ M


def right(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M @ X`` for a full ``X``, ``M @ diag(X)`` for a vector ``X``."""
    return M * X if X.dim() == 1 else M @ X


def kron_mv(G: torch.Tensor, A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    r""":math:`(G \otimes A)\,\mathrm{vec}(M)` in matrix form: ``G @ M @ A`` (A, G symmetric)."""
    return right(left(G, M), A)


def _mean_diag(X: torch.Tensor) -> torch.Tensor:
    return X.mean() if X.dim() == 1 else X.diagonal().mean()


def pi_damping(
    A: torch.Tensor, G: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(delta_A, delta_G)`` as 0-d tensors (pi = 1 when a trace is not positive)."""
    ta, tg = _mean_diag(A), _mean_diag(G)
    ok = (ta > 0) & (tg > 0)
    pi = torch.where(ok, (ta / torch.where(ok, tg, 1.0)).sqrt(), torch.ones_like(ta))
    root = damping**0.5
    return (root * pi).clamp_min(1e-7), (root / pi).clamp_min(1e-7)


def _eigh(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Eigendecomposition :math:`X = Q\,\mathrm{diag}(d)\,Q^\top` of a PSD factor, in float64.

    Returns ``(d, Q)`` in float64 with ``d`` clipped at 0 (factors are PSD; the negatives are
    round-off), so damping is always added to non-negative eigenvalues; ``Q`` is None for a
    diagonal factor (its own eigenbasis).

    Why float64 whatever the factor dtype: a nearly rank-deficient fp32 factor (``A`` after a few
    batch-1 steps has rank ~4 of 46) has a cluster of eigenvalues at fp32 round-off (±1e-7 around
    0), and fp32 LAPACK ``syevd`` then fails to converge (``LinAlgError``, found by the fuzzer).
    In float64 the same matrix decomposes. Factors are small and this runs once per inverse
    update, so the cost is amortised.
    """
    if X.dim() == 1:
        return X.to(torch.float64).clamp_min(0.0), None
    d, Q = torch.linalg.eigh(X.to(torch.float64))
    return d.clamp_min(0.0), Q


def spd_inverse(X: torch.Tensor, shift: torch.Tensor, method: str) -> torch.Tensor:
    r"""``(X + shift I)^{-1}`` (a vector for a diagonal ``X``); Cholesky falls back to ``eigh``
    if round-off breaks it.

    The eigen form is :math:`Q\,\mathrm{diag}(1/(\max(d, 0) + \mathrm{shift}))\,Q^\top`,
    computed in float64 (see :func:`_eigh`) and returned in ``X.dtype``.
    """
    if X.dim() == 1:
        return 1.0 / (X.clamp_min(0.0) + shift)
    eye = torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
    if method == "cholesky":
        L, info = torch.linalg.cholesky_ex(X + shift * eye)
        if int(info) == 0:  # one sync per inverse update (amortised), never in the hot path
            return torch.cholesky_inverse(L)
    d, Q = _eigh(X)
    assert Q is not None  # X is a matrix here
    return ((Q / (d + shift.to(d.dtype))) @ Q.T).to(X.dtype)


def compute_preconditioner(
    A: torch.Tensor, G: torch.Tensor, damping: float, damping_type: str, method: str
) -> dict[str, torch.Tensor]:
    """Damped inverse of ``G kron A`` in the form :func:`inverse_mv` consumes: ``{A_inv, G_inv}``
    (π-damping) or ``{[QA], [QG], scale}`` (Tikhonov; no ``Q`` for a diagonal side).

    Every tensor is made contiguous: LAPACK hands back column-major results, and a checkpoint
    (``torch.distributed.checkpoint``) restores row-major ones; matmuls round differently on the
    two layouts, so a resumed run would not continue bit for bit otherwise."""
    return {k: v.contiguous() for k, v in _preconditioner(A, G, damping, damping_type,
                                                          method).items()}  # fmt: skip


def _preconditioner(
    A: torch.Tensor, G: torch.Tensor, damping: float, damping_type: str, method: str
) -> dict[str, torch.Tensor]:
    if damping_type == "pi":
        dA, dG = pi_damping(A, G, damping)
        return {"A_inv": spd_inverse(A, dA, method), "G_inv": spd_inverse(G, dG, method)}
    dA, QA = _eigh(A)
    dG, QG = _eigh(G)
    pre = {"scale": (1.0 / (dG[:, None] * dA[None, :] + damping)).to(A.dtype)}
    if QA is not None:
        pre["QA"] = QA.to(A.dtype)
    if QG is not None:
        pre["QG"] = QG.to(G.dtype)
    return pre


def inverse_mv(pre: dict[str, torch.Tensor], M: torch.Tensor) -> torch.Tensor:
    """Apply the damped inverse built by :func:`compute_preconditioner` to ``M`` (a matrix, or a
    stack of matrices along dim 0)."""
    if "A_inv" in pre:
        return right(left(pre["G_inv"], M), pre["A_inv"])
    QA, QG = pre.get("QA"), pre.get("QG")
    X = M if QG is None else QG.T @ M
    X = (X if QA is None else X @ QA) * pre["scale"]
    X = X if QG is None else QG @ X
    return X if QA is None else X @ QA.T
