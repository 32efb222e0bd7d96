"""Matrix geometry used by orthogonalized optimizers: spherical interpolation and RMS scaling.

All functions treat the trailing two dims as one vector (Frobenius geometry) and batch over the
leading dims; none of them syncs with the host.
"""

from __future__ import annotations

import torch


def frobenius_norm(x: torch.Tensor) -> torch.Tensor:
    """||x||_F over the trailing two dims, keepdim (shape (..., 1, 1))."""
    return x.norm(dim=(-2, -1), keepdim=True)


def _gram(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """||a||, ||b||, the same clamped at ``eps``, and cos = <a, b> / (||a|| ||b||) (clamped
    norms) of every trailing matrix: three reductions, keepdim."""
    ra, rb = frobenius_norm(a), frobenius_norm(b)
    na, nb = ra.clamp(min=eps), rb.clamp(min=eps)
    dot = (a * b).sum(dim=(-2, -1), keepdim=True)
    return ra, rb, na, nb, dot / (na * nb)


def _combine(
    a: torch.Tensor,
    b: torch.Tensor,
    wa: torch.Tensor,
    wb: torch.Tensor,
    na: torch.Tensor,
    nb: torch.Tensor,
    r: torch.Tensor,
) -> torch.Tensor:
    """r (wa a/||a|| + wb b/||b||) as ka a + kb b: the per-matrix coefficients are folded first,
    so the matrices are read once more and written once."""
    return torch.addcmul(a * (r * wa / na), b, r * wb / nb)


def _lerp_norm(
    ra: torch.Tensor,
    rb: torch.Tensor,
    na: torch.Tensor,
    nb: torch.Tensor,
    cos: torch.Tensor,
    t: float,
    eps: float,
) -> torch.Tensor:
    """||(1-t) a_hat + t b_hat||, clamped at ``eps``, for parallel or antipodal a_hat = a / na
    and b_hat = b / nb (cos = +-1: the fallback of :func:`slerp`): |(1-t) ||a_hat|| + t ||b_hat||
    cos|, a few operations on the per-matrix scalars."""
    return ((1 - t) * ra / na + t * rb / nb * cos).abs().clamp(min=eps)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between the directions of ``a`` and ``b``.

    With a_hat = a/||a||, b_hat = b/||b|| and cos(omega) = <a_hat, b_hat>_F,

        slerp(a, b; t) = r(t) * [sin((1-t) omega) a_hat + sin(t omega) b_hat] / sin(omega),
        r(t) = (1-t) ||a|| + t ||b||,

    so t = 0 gives ``a``, t = 1 gives ``b``, the direction moves at constant angular speed, and
    the norm interpolates linearly (for unit inputs the result has unit norm for every t).
    Where sin(omega) < eps (parallel or antipodal inputs, where the arc is undefined), it falls
    back to linear interpolation of the unit directions, rescaled to r(t) when that is non-zero.

    Computed as k_a a + k_b b with per-matrix coefficients from three reductions (the norms and
    <a, b>) and one combining pass: a and b are each read three times and the result written
    once, never normalised element by element.

    Args:
        a, b: tensors of the same shape (..., m, n).
        t: interpolation weight in [0, 1] (towards ``b``).
        eps: guard for the norms and for sin(omega).
    """
    ra, rb, na, nb, cos = _gram(a, b, eps)
    r = torch.lerp(ra, rb, t)
    omega = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    arc = sin > eps
    lin = _lerp_norm(ra, rb, na, nb, cos, t, eps)
    wa = torch.where(arc, torch.sin((1 - t) * omega) / sin.clamp(min=eps), (1 - t) / lin)
    wb = torch.where(arc, torch.sin(t * omega) / sin.clamp(min=eps), t / lin)
    return _combine(a, b, wa, wb, na, nb, r)


def nlerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Normalized linear interpolation of the directions (the ablation partner of ``slerp``).

    Returns lerp(a_hat, b_hat; t) rescaled to the norm r(t) = (1-t)||a|| + t||b|| (computed,
    like :func:`slerp`, as k_a a + k_b b).
    """
    ra, rb, na, nb, cos = _gram(a, b, eps)
    ha, hb = (1 - t) * ra / na, t * rb / nb  # ||(1-t) a_hat||, ||t b_hat||
    lin = (ha.square() + hb.square() + 2 * ha * hb * cos).clamp(min=0).sqrt().clamp(min=eps)
    return _combine(a, b, (1 - t) / lin, t / lin, na, nb, torch.lerp(ra, rb, t))


def rms_scale(x: torch.Tensor, target_rms: float, eps: float = 1e-7) -> torch.Tensor:
    """The factor gamma = target_rms * sqrt(m n) / ||x||_F, so that RMS(gamma x) = target_rms.

    Shape (..., 1, 1). A zero matrix gets a finite factor (its update stays zero).
    """
    numel = x.shape[-2] * x.shape[-1]
    return target_rms * numel**0.5 / frobenius_norm(x).clamp(min=eps)
