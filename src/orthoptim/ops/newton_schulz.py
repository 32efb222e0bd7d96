"""Newton-Schulz orthogonalization: the one place the library computes an approximate polar factor.

For a matrix X with SVD X = U S V^T, the polar factor is U V^T. The quintic iteration

    X_0 = X / max(||X||_F, eps),   A_k = X_k X_k^T,   X_{k+1} = a X_k + (b A_k + c A_k^2) X_k

maps every singular value s in (0, 1] through p(s) = a s + b s^3 + c s^5 and drives it towards a
band around 1. With Muon's coefficients (3.4445, -4.7750, 2.0315) and 5 steps the band is about
[0.68, 1.13]: deliberately not exact, it is faster and "does not hurt" (Keller Jordan's Muon).
The ``"exact"`` preset (the classic cubic, (1.5, -0.5, 0)) converges to U V^T, more slowly.

Batched over leading dimensions; wide matrices are iterated as given, tall ones transposed so the
Gram matrix A is the small one (the result is transposed back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Muon's quintic (Keller Jordan, https://github.com/KellerJordan/Muon/blob/master/muon.py);
# also the constant in torch/optim/_muon.py.
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

NS_PRESETS: dict[str, tuple[float, float, float]] = {
    "muon": MUON_COEFFICIENTS,
    # The classic cubic Newton-Schulz step X <- 1.5 X - 0.5 X X^T X: converges to U V^T exactly.
    "cubic": (1.5, -0.5, 0.0),
}

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def resolve_coefficients(coefficients: str | tuple[float, float, float]) -> tuple[float, ...]:
    """Return the (a, b, c) tuple for a preset name or validate an explicit tuple."""
    if isinstance(coefficients, str):
        if coefficients not in NS_PRESETS:
            raise ValueError(
                f"Invalid ns_coefficients: {coefficients!r}; presets are {sorted(NS_PRESETS)}"
            )
        return NS_PRESETS[coefficients]
    coeffs = tuple(float(c) for c in coefficients)
    if len(coeffs) != 3:
        raise ValueError(f"Invalid ns_coefficients: {coefficients!r}; expected 3 numbers (a, b, c)")
    return coeffs


# Working precision of Newton-Schulz by device type: bfloat16 on accelerators (tensor cores;
# Muon's practice); float32 elsewhere. On CPUs bf16 speed depends on the chip (emulated without
# AVX512-BF16/AMX, about 2x float32 on this project's test machine, docs/performance.md) and CPU
# runs are mostly tests and small studies, where float32's exactness matters more. Chosen from
# the device *type*, never by probing the hardware, so results do not depend on the machine.
NS_DTYPE_BY_DEVICE = {"cuda": "bfloat16", "xpu": "bfloat16", "xla": "bfloat16"}


def dtype_for_device(device: torch.device | str) -> str:
    """The Newton-Schulz dtype name for a device: ``NS_DTYPE_BY_DEVICE`` or ``"float32"``."""
    return NS_DTYPE_BY_DEVICE.get(torch.device(device).type, "float32")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"bfloat16"``/``"float32"``/``"float64"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"Invalid ns_dtype: {dtype}; expected one of {sorted(_DTYPES)}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Invalid ns_dtype: {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def newton_schulz(
    g: torch.Tensor | Sequence[torch.Tensor],
    steps: int = 5,
    coefficients: str | tuple[float, float, float] = "muon",
    dtype: str | torch.dtype = "bfloat16",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate the polar factor U V^T of every trailing matrix of ``g``.

    Args:
        g: tensor of shape (..., m, n) with ndim >= 2; leading dims are a batch. Or a sequence
            of same-shape 2-D tensors, taken as their stack (on the CPU the stack is never
            made: each matrix is read where it is).
        steps: number of iterations (>= 0; 0 returns the Frobenius-normalized input).
        coefficients: preset name (``"muon"``, ``"cubic"``) or an explicit (a, b, c).
        dtype: working precision; bf16 by default as in Muon, ``"float32"`` for exactness on CPU.
        eps: lower clamp of the Frobenius norm, so a zero matrix maps to zero (never NaN).

    Returns:
        A tensor of the shape and dtype of ``g`` (of the stack, for a sequence).

    On the CPU a matrix of :data:`CPU_PER_MATRIX` elements or more is iterated on its own with
    2-D GEMMs, the last one written into the result: faster there than one batched GEMM once a
    batch outgrows the cache (15% on eight 128 x 512 matrices, 2 MB, docs/performance.md), and
    such a matrix gets the bits of a single 2-D call (torch.optim.Muon's) whatever its batch.
    Smaller matrices, and every batch on accelerators, take one batched call (fewer
    dispatches). The route depends on the matrix shape only, never on the batch.
    """
    if steps < 0:
        raise ValueError(f"Invalid ns_steps: {steps}; must be >= 0")
    a, b, c = resolve_coefficients(coefficients)
    work = resolve_dtype(dtype)
    if not isinstance(g, torch.Tensor):
        mats = list(g)
        if not mats or any(m.ndim != 2 for m in mats):
            raise ValueError("newton_schulz needs a tensor or a non-empty sequence of 2-D tensors")
        if _one_by_one(mats[0]):
            return _per_matrix(mats, steps, (a, b, c), work, eps)
        g = torch.stack(mats)
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a tensor with ndim >= 2, got shape {tuple(g.shape)}")
    if g.ndim > 2 and _one_by_one(g):
        flat = g.reshape(-1, *g.shape[-2:]).unbind(0)
        return _per_matrix(flat, steps, (a, b, c), work, eps).reshape(g.shape)
    # Contiguous first: a GEMM sums in another order on a strided operand, and the result must not
    # depend on the memory layout of the input (a non-contiguous parameter's momentum).
    x = g.to(work).contiguous()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    flat = x.reshape(-1, *x.shape[-2:]) if x.ndim > 3 else x
    x = _iterate(flat, steps, a, b, c).reshape(x.shape)
    if tall:
        x = x.mT
    return x.to(g.dtype)


# Matrices of at least this many elements are iterated one by one on the CPU (above); at
# 128 x 128 (16k) the two routes took the same time on the char-GPT's buckets, and small
# matrices gain from the batch's fewer dispatches (20% on the ``tiny`` speed case).
CPU_PER_MATRIX = 1 << 15


def _one_by_one(g: torch.Tensor) -> bool:
    """Whether the matrices of ``g`` (trailing two dims) take the CPU's one-by-one route."""
    return g.device.type == "cpu" and g.shape[-2] * g.shape[-1] >= CPU_PER_MATRIX


def _per_matrix(
    mats: Sequence[torch.Tensor],
    steps: int,
    coefficients: tuple[float, float, float],
    work: torch.dtype,
    eps: float,
) -> torch.Tensor:
    """:func:`newton_schulz` of same-shape 2-D matrices one at a time, into one (N, m, n)."""
    first = mats[0]
    tall = first.size(-2) > first.size(-1)
    short, long = sorted(first.shape)
    out = torch.empty(len(mats), short, long, dtype=work, device=first.device)
    for i, g in enumerate(mats):
        x = g.to(work).contiguous()  # as in newton_schulz: the layout must not matter
        if tall:
            x = x.mT
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        _iterate(x, steps, *coefficients, out=out[i])
    return (out.mT if tall else out).to(first.dtype)


def _iterate(
    x: torch.Tensor, steps: int, a: float, b: float, c: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``steps`` quintic iterations of a normalised (m <= n) matrix or batch of them (3-D); the
    last result written into ``out`` when given."""
    # addmm/baddbmm in the same order as torch.optim.Muon, so the "muon" preset matches it bitwise.
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm
    if steps == 0:
        return x if out is None else out.copy_(x)
    for i in range(steps):
        gram = x @ x.mT
        poly = mm(gram, gram, gram, beta=b, alpha=c)
        x = mm(x, poly, x, beta=a, out=out if i == steps - 1 else None)
    return x
