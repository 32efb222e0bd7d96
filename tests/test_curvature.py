"""K-FAC core: factors vs explicit loops, Kronecker algebra vs dense, one-pass half-batch split."""

import pytest
import torch
import torch.nn.functional as F
from curvature_models import capture_of, layout_of
from torch import nn

from orthoptim import KFAC
from orthoptim.curvature import (
    a_factor,
    compute_preconditioner,
    ema,
    g_factor,
    halves,
    inverse_mv,
    kron_mv,
    pi_damping,
    split_from_total,
)
from orthoptim.optim.kfac_reference import (
    damped_dense_inverse,
    dense_fisher,
    factors_loop,
    forward_grads,
    patches_loop,
)


def mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).double()


def data(model_kind, batch=7):
    torch.manual_seed(1)
    x = torch.randn(batch, 4) if model_kind == "mlp" else torch.randn(batch, 2, 7, 7)
    return x.double(), torch.randint(0, 3, (batch,))


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
    return X @ X.T / n


@pytest.mark.parametrize("kind", ["mlp", "mlp_nobias", "cnn"])
def test_factors_equal_explicit_expectations(kind):
    model = cnn() if kind == "cnn" else mlp(bias=kind == "mlp")
    x, y = data("cnn" if kind == "cnn" else "mlp")
    opt = KFAC(model, lr=0.0, factor_dtype="float64", factor_interval=1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    _, inputs, gouts, _ = forward_grads(model, x, y, F.cross_entropy)
    blocks = {b.module: b for b in opt._blocks}
    for m, xin in inputs.items():
        A, G = factors_loop(m, xin, gouts[m])
        ls = opt.block_state(blocks[m])
        torch.testing.assert_close(ls["A"], A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ls["G"], G, rtol=1e-12, atol=1e-14)


def test_linear_factor_is_mean_outer_product_and_sequences_are_locations():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = KFAC(lin, lr=0.0, factor_dtype="float64")
    lin(x).sum(1).mean().backward()  # mean over the batch of a per-sample loss
    opt.step()
    a = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1)
    ls = opt.block_state(opt._blocks[0])
    torch.testing.assert_close(ls["A"], a.T @ a / 5)
    # per-sample output grads are ones; the recorded scale B undoes the batch mean
    torch.testing.assert_close(ls["G"], torch.ones(2, 2).double())
    # (B, T, d): T locations, A averaged over them, G summed
    xs = torch.randn(4, 6, 3, dtype=torch.float64)
    out = lin(xs)
    gout = torch.randn_like(out)
    A, G = factors_loop(lin, xs, gout)
    block = opt._blocks[0]
    torch.testing.assert_close(a_factor(block, [xs], torch.float64), A)
    torch.testing.assert_close(g_factor(block, [(gout, 1.0)], 4, torch.float64), G)


def test_conv_patches_follow_unfold_and_weight_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).double()
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    p = patches_loop(conv, x)
    out = p @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(out.transpose(1, 2).reshape(conv(x).shape), conv(x))


def test_kron_mv_and_inverse_equal_dense_products():
    A, G = spd(4, 0), spd(3, 1)
    M = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(kron_mv(G, A, M).reshape(-1), dense_fisher(A, G) @ M.reshape(-1))
    for damping_type, method in [("pi", "cholesky"), ("pi", "eigen"), ("tikhonov", "eigen")]:
        pre = compute_preconditioner(A, G, 0.1, damping_type, method)
        dense = damped_dense_inverse(A, G, 0.1, damping_type)
        torch.testing.assert_close(inverse_mv(pre, M).reshape(-1), dense @ M.reshape(-1))


def test_pi_damping_and_ema_conventions():
    A, G = spd(4, 0), spd(3, 1)
    dA, dG = pi_damping(A, G, 0.04)
    pi = ((A.trace() / 4) / (G.trace() / 3)).sqrt()
    torch.testing.assert_close(dA, 0.2 * pi)
    torch.testing.assert_close(dG, 0.2 / pi)
    dA0, dG0 = pi_damping(torch.zeros(2, 2), torch.zeros(2, 2), 0.0)
    assert float(dA0) == float(dG0) == pytest.approx(1e-7)
    new = torch.ones(2)
    assert torch.equal(ema(None, new, 0.25, "batch"), new)
    assert torch.equal(ema(None, new, 0.25, "zero"), 0.25 * new)
    assert torch.equal(ema(2 * new, new, 0.25, "batch"), 1.75 * new)


@pytest.mark.parametrize("kind,batch", [("mlp", 7), ("mlp", 8), ("cnn", 5)])
def test_one_pass_split_equals_half_batch_autograd(kind, batch):
    model = cnn() if kind == "cnn" else mlp()
    x, y = data(kind, batch)
    records = {}

    def fwd(m, inp, out):
        records[m] = [inp[0].detach()]
        out.register_hook(lambda g: records[m].append(g))

    blocks = {b.module: b for b in layout_of(model).blocks}
    handles = [m.register_forward_hook(fwd) for m in blocks]
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    b1 = (batch + 1) // 2
    half_grads = [forward_grads(model, x[s], y[s], F.cross_entropy)[3]
                  for s in (slice(0, b1), slice(b1, None))]  # fmt: skip
    for m, b in blocks.items():
        xin, gout = records[m]
        (w1, c1), (w, c) = halves(b, xin, gout, m.weight)
        S1 = w1 if c1 is None else torch.cat([w1, c1[:, None]], 1)
        total = w if c is None else torch.cat([w, c[:, None]], 1)
        torch.testing.assert_close(total, b.grad_matrix())
        g1, g2 = split_from_total(S1, b.grad_matrix(), batch, b1)
        for got, h in ((g1, half_grads[0]), (g2, half_grads[1])):
            torch.testing.assert_close(got, b.grad_matrix(h[m.weight], h.get(m.bias)))


def test_sequence_linear_split():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    w = torch.randn(6, 4, 2, dtype=torch.float64)
    out = lin(x)
    gout = torch.autograd.grad((out * w).mean(0).sum(), out)[0]
    (out * w).mean(0).sum().backward()
    block = layout_of(lin).blocks[0]
    (w1, c1), _ = halves(block, x, gout, lin.weight)
    g1, g2 = split_from_total(torch.cat([w1, c1[:, None]], 1), block.grad_matrix(), 6, 3)
    for got, s in ((g1, slice(0, 3)), (g2, slice(3, 6))):
        gw, gb = torch.autograd.grad((lin(x[s]) * w[s]).mean(0).sum(), [lin.weight, lin.bias])
        torch.testing.assert_close(got, block.grad_matrix(gw, gb))


class _OwnForwardLinear(nn.Linear):
    """A subclass with its own forward (same math): its weight gradient stays autograd's."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _fused_model(kind):
    torch.manual_seed(0)
    if kind == "cnn":  # stride, dilation, a bias-free conv, in-place ReLU right after a layer
        return cnn()[:2].append(nn.Conv2d(3, 2, 2, bias=False)).append(
            nn.ReLU(inplace=True)).append(nn.Flatten()).append(nn.Linear(8, 3)).double()
    if kind == "subclass":
        return nn.Sequential(_OwnForwardLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("kind,batch", [("mlp", 7), ("cnn", 6), ("subclass", 5)])
def test_capture_split_keeps_autograd_gradients_and_equals_half_batch_autograd(kind, batch):
    """FOP's one-pass capture: stock layers get their weight gradient as two half-batch products
    (HalfBatchWeightGrad), a subclass with its own forward one extra product; either way ``.grad``
    equals plain autograd's and ``S_1`` gives the half-batch gradients."""
    model = _fused_model(kind)
    plain = _fused_model(kind)
    x, y = data("cnn" if kind == "cnn" else "mlp", batch)
    cap, blocks = capture_of(model, torch.float64)
    assert [b.stock for b in blocks.values()] == [kind != "subclass", True, True][: len(blocks)]
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    b1 = (batch + 1) // 2
    halves = [forward_grads(plain, x[s], y[s], F.cross_entropy)[3]
              for s in (slice(0, b1), slice(b1, None))]  # fmt: skip
    pp = dict(plain.named_parameters())
    for name, b in blocks.items():
        U, B, b1_ = cap.halves_of(b)
        assert B == batch and b1_ == b1 and U.dtype == torch.float64
        g1, g2 = split_from_total(U[1], U[0], batch, b1)
        bias = name.replace("weight", "bias")
        for got, h in ((g1, halves[0]), (g2, halves[1])):
            ref = b.grad_matrix(h[pp[name]], h.get(pp.get(bias)))
            torch.testing.assert_close(got, ref)


def test_capture_split_sequences_and_unbatched_inputs():
    """(B, T, d) inputs split over B; an unbatched conv input (C, H, W) is not split."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    cap, blocks = capture_of(lin, torch.float64)
    x, w = torch.randn(6, 4, 3).double(), torch.randn(6, 4, 2).double()
    (lin(x) * w).mean(0).sum().backward()
    U = cap.halves_of(blocks["weight"])[0].clone()  # the hooks keep recording below
    gw, gb = torch.autograd.grad((lin(x[:3]) * w[:3]).mean(0).sum(), [lin.weight, lin.bias])
    torch.testing.assert_close(U[1] * 2.0, blocks["weight"].grad_matrix(gw, gb))
    conv = nn.Conv2d(3, 3, 3).double()  # C_in == C_out: the channel dim must not pass for a batch
    cap, blocks = capture_of(conv, torch.float64)
    conv(torch.randn(3, 5, 5).double()).sum().backward()
    assert cap.halves_of(blocks["weight"]) is None


def test_capture_split_under_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    plain = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    plain.load_state_dict(model.state_dict())
    cap, blocks = capture_of(model, torch.float32)
    x, y = data("mlp", 8)
    for net in (model, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x.float()), y)
        loss.backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)
    assert all(cap.halves_of(b) is not None for b in blocks.values())
