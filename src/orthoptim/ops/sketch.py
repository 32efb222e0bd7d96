"""Random projections from explicit seeds (never the global RNG), and what is built on them.

* ``gaussian_sketch_matrix``: P with i.i.d. N(0, 1/k) entries, so E[P^T P] = I and, by
  Johnson-Lindenstrauss, <P x, P y> = <x, y> +- eps ||x|| ||y|| with probability
  >= 1 - 4 exp(-k (eps^2/2 - eps^3/3) / 2) for one pair (used for conflict tests in sketch space).
* ``range_finder``: the randomized range finder of Halko, Martinsson & Tropp (2011): a Gaussian
  test matrix Omega applied to M^T captures the dominant row space of M; one small SVD then
  gives approximate top right singular vectors. This is how past update directions are
  summarised into a protected subspace.
"""

from __future__ import annotations

import torch


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: identical draws on every device and every rank."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) % (2**63 - 1))
    return gen


def gaussian_sketch_matrix(
    k: int,
    d: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A k x d matrix with i.i.d. N(0, 1/k) entries, drawn on the CPU from ``seed``."""
    if k < 1 or d < 1:
        raise ValueError(f"Invalid sketch shape ({k}, {d}); both dims must be >= 1")
    p = torch.randn(k, d, generator=seeded_generator(seed), dtype=torch.float64) / k**0.5
    return p.to(dtype=dtype, device=device)


def range_finder(
    m: torch.Tensor, rank: int, seed: int, *, oversample: int = 8, power_iters: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` right singular vectors and singular values of a matrix.

    Y = M^T Omega (Omega: m x (rank + oversample), Gaussian from ``seed``), ``power_iters``
    rounds of Y <- M^T (M Y) with re-orthonormalisation, Q = qr(Y), then the SVD of the small
    matrix M Q = U_B S V_B^T gives V ~= Q V_B and S.

    Args:
        m: matrix of shape (rows, cols), any float dtype (computed in float32 or float64).
        rank: number of directions wanted (capped at min(rows, cols)).
        seed: seed of the Gaussian test matrix.
        oversample: extra test vectors; improves accuracy at small cost.
        power_iters: power iterations; sharpen the spectrum when it decays slowly.

    Returns:
        (V, S): V of shape (cols, r) with orthonormal columns, S of shape (r,), descending,
        r = min(rank, rows, cols).
    """
    work = m if m.dtype == torch.float64 else m.float()
    rows, cols = work.shape
    r = min(rank, rows, cols)
    width = min(r + oversample, rows, cols)
    omega = gaussian_sketch_matrix(rows, width, seed, dtype=work.dtype, device=work.device)
    q = torch.linalg.qr(work.mT @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(work.mT @ (work @ q)).Q
    _, s, vh = torch.linalg.svd(work @ q, full_matrices=False)
    return q @ vh[:r].mT, s[:r]


def nystrom_factor(y: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """A factor F with F F^T ~= C from the streaming sketch Y = C Omega of a PSD matrix C.

    Stable Nystrom approximation (Tropp, Yurtsever, Udell & Cevher, "Fixed-rank approximation of
    a positive-semidefinite matrix from streaming data", NeurIPS 2017): shift nu = eps ||Y||,
    Y_nu = Y + nu Omega, B = Omega^T Y_nu, F = Y_nu B^{-1/2}; then C + nu I ~= F F^T.
    The small shift is not removed: the caller only needs F's dominant directions and energies.

    Args:
        y: the sketch C Omega, shape (d, l).
        omega: the test matrix, shape (d, l), the one the sketch was accumulated with.

    Returns:
        F of shape (d, l) (zeros when the sketch is zero).
    """
    y = y.double()
    omega = omega.double()
    scale = y.norm()
    if not bool(scale > 0):
        return torch.zeros_like(y)
    nu = torch.finfo(torch.float64).eps * y.shape[0] ** 0.5 * scale
    y_nu = y + nu * omega
    b = omega.mT @ y_nu
    # B^{-1/2} by eigendecomposition with a pseudo-inverse: robust when C has rank < l (the
    # Cholesky form of the paper fails there in floating point).
    evals, evecs = torch.linalg.eigh(0.5 * (b + b.mT))
    keep = evals > evals.max() * 1e-12
    inv_sqrt = torch.where(keep, evals.clamp(min=1e-300).rsqrt(), torch.zeros_like(evals))
    return y_nu @ (evecs * inv_sqrt)
