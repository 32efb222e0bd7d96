"""Matrix geometry used by orthogonalized optimizers: spherical interpolation and RMS scaling.

All functions treat the trailing two dims as one vector (Frobenius geometry) and batch over the
leading dims; none of them syncs with the host.
"""

from __future__ import annotations

import torch


def frobenius_norm(x: torch.Tensor) -> torch.Tensor:
    """||x||_F over the trailing two dims, keepdim (shape (..., 1, 1))."""
    return x.norm(dim=(-2, -1), keepdim=True)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between the directions of ``a`` and ``b``.

    With a_hat = a/||a||, b_hat = b/||b|| and cos(omega) = <a_hat, b_hat>_F,

        slerp(a, b; t) = r(t) * [sin((1-t) omega) a_hat + sin(t omega) b_hat] / sin(omega),
        r(t) = (1-t) ||a|| + t ||b||,

    so t = 0 gives ``a``, t = 1 gives ``b``, the direction moves at constant angular speed, and
    the norm interpolates linearly (for unit inputs the result has unit norm for every t).
    Where sin(omega) < eps (parallel or antipodal inputs, where the arc is undefined), it falls
    back to linear interpolation of the unit directions, rescaled to r(t) when that is non-zero.

    Args:
        a, b: tensors of the same shape (..., m, n).
        t: interpolation weight in [0, 1] (towards ``b``).
        eps: guard for the norms and for sin(omega).
    """
    na, nb = frobenius_norm(a), frobenius_norm(b)
    a_hat = a / na.clamp(min=eps)
    b_hat = b / nb.clamp(min=eps)
    cos = (a_hat * b_hat).sum(dim=(-2, -1), keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    arc = (torch.sin((1 - t) * omega) * a_hat + torch.sin(t * omega) * b_hat) / sin.clamp(min=eps)
    lin = torch.lerp(a_hat, b_hat, t)
    lin = lin / frobenius_norm(lin).clamp(min=eps)
    direction = torch.where(sin > eps, arc, lin)
    return direction * torch.lerp(na, nb, t)


def nlerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Normalized linear interpolation of the directions (the ablation partner of ``slerp``).

    Returns lerp(a_hat, b_hat; t) rescaled to the norm r(t) = (1-t)||a|| + t||b||.
    """
    na, nb = frobenius_norm(a), frobenius_norm(b)
    lin = torch.lerp(a / na.clamp(min=eps), b / nb.clamp(min=eps), t)
    return lin / frobenius_norm(lin).clamp(min=eps) * torch.lerp(na, nb, t)


def rms_scale(x: torch.Tensor, target_rms: float, eps: float = 1e-7) -> torch.Tensor:
    """The factor gamma = target_rms * sqrt(m n) / ||x||_F, so that RMS(gamma x) = target_rms.

    Shape (..., 1, 1). A zero matrix gets a finite factor (its update stays zero).
    """
    numel = x.shape[-2] * x.shape[-1]
    return target_rms * numel**0.5 / frobenius_norm(x).clamp(min=eps)
