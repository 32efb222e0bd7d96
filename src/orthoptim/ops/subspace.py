"""Orthogonal correction of an update against protected input subspaces, and its proximal lift.

Let O (m x n) be an update and V (n x R) a basis of protected input directions (the row space
of past updates; an update's row space lies in the span of the inputs that produced it, so a
change U with U V = 0 leaves the layer's output on those inputs unchanged: the GPM insight).
Let c = O V be the update's coordinates in the protected subspace and c' the corrected
coordinates (c' = c with the coordinates of conflicting entries set to zero). The proximal lift
returns the full-space update closest to O whose protected coordinates agree with c':

    U* = argmin_U  1/2 ||U - O||_F^2 + rho/2 ||U V - c'||_F^2
       = (O + rho c' V^T) (I_n + rho V V^T)^{-1}
       = O + rho (c' - c) (I_R + rho V^T V)^{-1} V^T          (Woodbury; R x R solve)

For orthonormal V this is U* = O - r (c - c') V^T with the *radius* r = rho / (1 + rho) in
[0, 1): the protection operator r P_V has spectral norm r whatever the number of stored
directions, and ||U*||_F >= (1 - r) ||O||_F, so protection never freezes learning.
rho = inf (r = 1) is the hard projection O (I - V V^T).
"""

from __future__ import annotations

import torch


def lift_matrix(basis: torch.Tensor, rho: float) -> torch.Tensor:
    """The R x R matrix M of the lift U* = O + (c' - O V) M V^T: it depends on the basis only,
    so a caller that keeps V for many steps computes it once (FOGO: at each memory write).

    M = (I / rho + V^T V)^{-1}; for rho = inf, the inverse of V^T V with a unit diagonal on its
    empty (all-zero) columns, which then drop out (their rows of V^T are zero). For orthonormal
    V, M = r I with the radius r = rho / (1 + rho) (a per-direction radius would make M diagonal).
    Computed in float64 (the system is SPD, its eigenvalues 1/rho + those of V^T V) and returned
    in float64; cast it to the update's dtype.

    Args:
        basis: V, shape (..., n, R); zero columns are allowed and have no effect.
        rho: proximal weight > 0, or ``float('inf')`` for the hard constraint U V = c'.
    """
    v = basis.double()
    gram = v.mT @ v
    if rho == float("inf"):
        # Limit rho -> inf of rho (I + rho G)^{-1} = G^+ on the span; zero columns give zero rows
        # of G, which the identity on their diagonal keeps invertible without affecting others.
        empty = gram.diagonal(dim1=-2, dim2=-1) == 0
        system = gram + torch.diag_embed(empty.to(gram.dtype))
    else:
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        system = eye / rho + gram
    return torch.linalg.inv_ex(system).inverse  # no error check: no host sync


def proximal_lift(
    update: torch.Tensor,
    basis: torch.Tensor,
    target_coords: torch.Tensor,
    rho: float,
    lift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form proximal lift (Woodbury form) for any full-column-rank or zero-padded basis:
    U* = O + (c' - O V) M V^T with M = :func:`lift_matrix` (V, rho).

    Args:
        update: O, shape (..., m, n).
        basis: V, shape (..., n, R); zero columns are allowed and have no effect.
        target_coords: c', shape (..., m, R).
        rho: proximal weight > 0, or ``float('inf')`` for the hard constraint U V = c'.
        lift: M, when the caller has it (any float dtype; computed otherwise).

    Returns:
        U*, shape (..., m, n), dtype of ``update``.
    """
    v = basis.to(update.dtype)
    m = lift_matrix(basis, rho) if lift is None else lift
    delta = (target_coords.to(update.dtype) - update @ v) @ m.to(update.dtype)
    return update + delta @ v.mT


def radius_from_rho(rho: float) -> float:
    """The spectral norm r = rho / (1 + rho) of the protection operator (1 for rho = inf)."""
    return 1.0 if rho == float("inf") else rho / (1.0 + rho)


def rho_from_radius(radius: float) -> float:
    """Inverse of :func:`radius_from_rho`: rho = r / (1 - r) (inf for r = 1)."""
    return float("inf") if radius >= 1.0 else radius / (1.0 - radius)
