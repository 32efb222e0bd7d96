"""Math ops: Newton-Schulz, slerp, RMS scale, sketches, range finder, proximal lift."""

import importlib
import math

import pytest
import torch

from orthoptim.ops.geometry import nlerp, rms_scale, slerp
from orthoptim.ops.newton_schulz import MUON_COEFFICIENTS, newton_schulz
from orthoptim.ops.sketch import gaussian_sketch_matrix, nystrom_factor, range_finder
from orthoptim.ops.subspace import proximal_lift, radius_from_rho, rho_from_radius


def polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (40, 40)])
def test_ns_exact_preset_converges_to_polar_factor(shape):
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, steps=60, coefficients="cubic", dtype="float64")
    # The cubic iteration converges to U V^T; condition of a random square matrix is the limit.
    assert torch.allclose(out, polar(g), atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_ns_muon_preset_is_close_to_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out = newton_schulz(g, dtype="float32")
    s = torch.linalg.svdvals(out)
    # Muon's quintic leaves singular values in a band around 1 (about [0.68, 1.13]).
    assert s.min() > 0.6 and s.max() < 1.2
    cos = (out * polar(g)).sum() / (out.norm() * polar(g).norm())
    assert cos > 0.98


def test_ns_matches_torch_muon_bitwise():
    from torch.optim._muon import _zeropower_via_newtonschulz

    for shape in [(30, 70), (70, 30)]:
        g = torch.randn(*shape)
        ours = newton_schulz(g, 5, MUON_COEFFICIENTS, "bfloat16", 1e-7)
        theirs = _zeropower_via_newtonschulz(g, MUON_COEFFICIENTS, 5, 1e-7)
        assert torch.equal(ours, theirs.to(ours.dtype))


def test_ns_batched_equals_per_slice_and_tall_equals_transposed_wide():
    g = torch.randn(2, 3, 24, 40, dtype=torch.float64)
    batched = newton_schulz(g, dtype="float64")
    for i in range(2):
        for j in range(3):
            assert torch.allclose(batched[i, j], newton_schulz(g[i, j], dtype="float64"))
    wide = torch.randn(24, 40, dtype=torch.float64)
    assert torch.allclose(
        newton_schulz(wide.T, dtype="float64"), newton_schulz(wide, dtype="float64").T
    )


@pytest.mark.parametrize("shape", [(3, 128, 256), (3, 256, 128), (5, 24, 40)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ns_on_cpu_gives_each_matrix_the_bits_of_its_own_call_and_takes_a_list(shape, dtype):
    """On the CPU a batch of large matrices runs matrix by matrix (2-D GEMMs, the last into the
    result): equal, bit for bit, to single calls (torch.optim.Muon's) and to a list of the
    matrices; small ones take one batched call (a list too); a batch iterated in one batched
    GEMM agrees to rounding."""
    ns = importlib.import_module("orthoptim.ops.newton_schulz")

    assert (shape[1] * shape[2] >= ns.CPU_PER_MATRIX) == (shape[1] > 24)
    g = torch.randn(*shape)
    batched = newton_schulz(g, dtype=dtype)
    mats = list(g.unbind(0))
    if shape[1] > 24:
        assert torch.equal(batched, torch.stack([newton_schulz(m, dtype=dtype) for m in mats]))
    assert torch.equal(batched, newton_schulz(mats, dtype=dtype))
    x = g.to(getattr(torch, dtype))
    x = x.mT if shape[1] > shape[2] else x
    x = ns._iterate(x / x.norm(dim=(-2, -1), keepdim=True), 5, *MUON_COEFFICIENTS)
    one_gemm = (x.mT if shape[1] > shape[2] else x).to(g.dtype)
    assert torch.allclose(batched, one_gemm, atol=1e-2 if dtype == "bfloat16" else 1e-5)
    with pytest.raises(ValueError, match="sequence of 2-D"):
        newton_schulz([torch.zeros(3)])
    with pytest.raises(ValueError, match="sequence of 2-D"):
        newton_schulz([])


def test_ns_zero_matrix_gives_zero_and_keeps_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        z = torch.zeros(5, 7, dtype=dtype)
        out = newton_schulz(z)
        assert out.dtype == dtype and torch.equal(out, z)


def test_ns_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ndim"):
        newton_schulz(torch.zeros(3))
    with pytest.raises(ValueError, match="ns_coefficients"):
        newton_schulz(torch.zeros(3, 3), coefficients="nope")
    with pytest.raises(ValueError, match="ns_dtype"):
        newton_schulz(torch.zeros(3, 3), dtype="float16")
    with pytest.raises(ValueError, match="ns_steps"):
        newton_schulz(torch.zeros(3, 3), steps=-1)


def test_slerp_endpoints_norm_and_constant_angle():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    b = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    au, bu = a / a.norm(), b / b.norm()
    omega = torch.acos((au * bu).sum())
    for t in (0.1, 0.25, 0.5, 0.9):
        s = slerp(au, bu, t)
        assert torch.isclose(s.norm(), torch.tensor(1.0, dtype=torch.float64))
        # The interpolant sits at angle t * omega from a.
        assert torch.isclose(torch.acos((s * au).sum()), t * omega, atol=1e-9)
    # Norm interpolates linearly.
    assert torch.isclose(slerp(a, b, 0.3).norm(), 0.7 * a.norm() + 0.3 * b.norm())


def test_slerp_parallel_inputs_fall_back_and_batch():
    a = torch.randn(3, 4, 5, dtype=torch.float64)
    s = slerp(a, 2 * a, 0.5)
    assert torch.isfinite(s).all() and torch.allclose(s, 1.5 * a)
    b = torch.randn(3, 4, 5, dtype=torch.float64)
    batched = slerp(a, b, 0.4)
    assert torch.allclose(batched[1], slerp(a[1], b[1], 0.4))
    assert torch.allclose(nlerp(a, b, 0.0), a)


def test_rms_scale_gives_target_rms():
    x = torch.randn(4, 17, 23, dtype=torch.float64)
    scaled = x * rms_scale(x, 0.2)
    rms = scaled.square().mean(dim=(-2, -1)).sqrt()
    assert torch.allclose(rms, torch.full((4,), 0.2, dtype=torch.float64))
    assert torch.isfinite(rms_scale(torch.zeros(3, 3), 0.2)).all()


def test_gaussian_sketch_preserves_inner_products_within_jl_bound():
    k, d, pairs, eps = 256, 2000, 400, 0.25
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(
        torch.randn(pairs, d, generator=gen, dtype=torch.float64), dim=1
    )
    y = torch.nn.functional.normalize(
        torch.randn(pairs, d, generator=gen, dtype=torch.float64), dim=1
    )
    y = 0.6 * x + 0.8 * y  # correlated pairs, so inner products are not all near zero
    p = gaussian_sketch_matrix(k, d, seed=3, dtype=torch.float64)
    err = ((x @ p.T) * (y @ p.T)).sum(1) - (x * y).sum(1)
    # JL for one pair: P(|<Px,Py> - <x,y>| > eps) <= 4 exp(-k (eps^2/2 - eps^3/3) / 2).
    bound = 4 * math.exp(-k * (eps**2 / 2 - eps**3 / 3) / 2)
    assert (err.abs() > eps).double().mean() <= bound
    assert err.abs().mean() < 0.1


def test_sketch_is_seeded_and_independent_of_global_rng():
    torch.manual_seed(0)
    a = gaussian_sketch_matrix(8, 10, seed=5)
    torch.manual_seed(123)
    torch.randn(100)
    assert torch.equal(a, gaussian_sketch_matrix(8, 10, seed=5))
    assert not torch.equal(a, gaussian_sketch_matrix(8, 10, seed=6))


def test_range_finder_recovers_top_right_singular_subspace():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(90, 60, generator=gen, dtype=torch.float64)).Q
    # A spectral gap after the 6th value: the range finder's error decays like (s7/s6)^(2q+1).
    s = torch.cat([torch.linspace(10, 5, 6), torch.logspace(-1, -4, 54)]).double()
    m = u @ torch.diag(s) @ v.T
    basis, sv = range_finder(m, 6, seed=1)
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-10)
    true = v[:, :6]
    # Subspace distance ||(I - B B^T) V_6|| small.
    assert (true - basis @ (basis.T @ true)).norm() < 1e-4
    assert torch.allclose(sv, s[:6], rtol=1e-4)


def _brute_force_lift(o, v, target, rho):
    """Solve min_U 1/2||U - O||^2 + rho/2 ||U V - c'||^2 by gradient descent on vec(U)."""
    u = o.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([u], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (u - o).square().sum() + 0.5 * rho * (u @ v - target).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return u.detach()


@pytest.mark.parametrize("rho", [0.3, 4.0])
def test_proximal_lift_matches_brute_force_solve(rho):
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(8, 3, generator=gen, dtype=torch.float64)  # not orthonormal on purpose
    target = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    assert torch.allclose(
        proximal_lift(o, v, target, rho), _brute_force_lift(o, v, target, rho), atol=1e-7
    )


def test_hard_lift_meets_constraint_with_least_change_and_zero_columns_are_inert():
    gen = torch.Generator().manual_seed(1)
    o = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    v = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64)).Q
    target = torch.zeros(5, 3, dtype=torch.float64)
    u = proximal_lift(o, v, target, float("inf"))
    assert torch.allclose(u @ v, target, atol=1e-12)
    assert torch.allclose(u, o - (o @ v) @ v.T)
    padded = torch.cat([v, torch.zeros(8, 2, dtype=torch.float64)], 1)
    u2 = proximal_lift(o, padded, torch.zeros(5, 5, dtype=torch.float64), float("inf"))
    assert torch.allclose(u, u2)


def test_radius_bounds_the_correction():
    gen = torch.Generator().manual_seed(2)
    o = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    v = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64)).Q  # protects all
    for radius in (0.25, 0.5, 0.9):
        u = proximal_lift(o, v, torch.zeros(6, 10, dtype=torch.float64), rho_from_radius(radius))
        # Whole space protected: the lift scales the update by exactly 1 - r, never to zero.
        assert torch.allclose(u, (1 - radius) * o)
        assert math.isclose(radius_from_rho(rho_from_radius(radius)), radius)


def test_nystrom_factor_recovers_a_low_rank_psd_matrix_from_its_sketch():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    c = a @ a.T
    omega = gaussian_sketch_matrix(50, 10, seed=1, dtype=torch.float64)
    f = nystrom_factor(c @ omega, omega)
    assert torch.allclose(f @ f.T, c, atol=1e-9 * c.norm())
    # Streaming: summing sketches of G_t^T G_t equals the sketch of the sum.
    inputs = torch.randn(4, 50, generator=gen, dtype=torch.float64)  # a rank-4 input space
    grads = [torch.randn(6, 4, generator=gen, dtype=torch.float64) @ inputs for _ in range(3)]
    y = sum(g.T @ (g @ omega) for g in grads)
    total = sum(g.T @ g for g in grads)
    f = nystrom_factor(y, omega)
    assert torch.allclose(f @ f.T, total, atol=1e-9 * total.norm())
    assert torch.equal(
        nystrom_factor(torch.zeros(50, 10), omega), torch.zeros(50, 10, dtype=torch.float64)
    )
