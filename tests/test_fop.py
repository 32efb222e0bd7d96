"""FOP: projection geometry, optimality of beta*/eta*, reductions to K-FAC, reference oracle."""

import pytest
import torch
import torch.nn.functional as F
from curvature_models import batches, cnn, mlp
from torch import nn

from orthoptim import FOP, KFAC
from orthoptim.curvature import fop_combine
from orthoptim.optim.fop_reference import fop_direction_dense, reference_fop_train

HP = dict(lr=0.1, damping=1e-2, damping_type="pi", momentum=0.9, weight_decay=1e-3,
          factor_interval=2, inverse_interval=2, ema_weight=0.5, factor_init="batch")  # fmt: skip
OPT_KW = {k: v for k, v in HP.items() if k != "lr"} | {
    "factor_dtype": "float64",
    "max_grad_norm": None,
}


def train(opt, model, data, two_pass=False):
    for x, y in data:
        opt.zero_grad()
        if two_pass:
            opt.backward_two_pass(x, y, F.cross_entropy)
        else:
            F.cross_entropy(model(x), y).backward()
        opt.step()


def problem(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
    Fm = X @ X.T / n
    Finv = torch.linalg.inv(Fm + 0.3 * torch.eye(n, dtype=torch.float64))  # damped
    g1, g2 = torch.randn(2, n, generator=g, dtype=torch.float64)
    return g1, g2, Fm, Finv


def combine(g1, g2, Fm, Finv, **kw):
    return fop_combine(g1, g2, lambda v: Fm @ v, lambda v: Finv @ v, **kw)


@pytest.mark.parametrize("seed", range(4))
def test_projected_component_is_F_orthogonal_to_mean(seed):
    g1, g2, Fm, Finv = problem(seed=seed)
    d, _, _ = combine(g1, g2, Fm, Finv, beta=1.0, eta=1.0)
    g_avg = (g1 + g2) / 2
    g_perp = torch.linalg.solve(Finv, d) - g_avg  # d = F^{-1}(g_avg + g_perp)
    assert abs(float(g_perp @ Fm @ g_avg)) < 1e-10 * float(g_avg @ Fm @ g_avg)
    assert float(g_perp.norm()) > 1e-3


@pytest.mark.parametrize("seed", range(4))
def test_beta_and_eta_minimise_their_quadratic_models(seed):
    g1, g2, Fm, Finv = problem(seed=seed)
    wide = dict(beta_clamp=(-1e9, 1e9), eta_clamp=(-1e9, 1e9))
    d, beta, eta = combine(g1, g2, Fm, Finv, **wide)
    g_avg, g_tot = (g1 + g2) / 2, g1 + g2
    g_perp = torch.linalg.solve(Finv, combine(g1, g2, Fm, Finv, beta=1.0, eta=1.0)[0]) - g_avg

    def argmin_on_grid(center, f):
        grid = torch.linspace(center - 1, center + 1, 20001, dtype=torch.float64)
        return float(grid[f(grid).argmin()])

    def J(b):  # surrogate of L1 + L2 along F^{-1}(g_avg + b g_perp), b a grid of values
        gc = g_avg[None] + b[:, None] * g_perp[None]
        return -(gc @ Finv @ g_tot) + 0.5 * ((gc @ Finv) * gc).sum(1)

    assert abs(argmin_on_grid(float(beta), J) - float(beta)) < 2e-4
    gc = g_avg + beta * g_perp
    u = Finv @ gc

    def q(e):  # model of L_tot(theta - e F^{-1} g_comb)
        return -e * (g_tot @ u) + 0.5 * e * e * (gc @ u)

    assert abs(argmin_on_grid(float(eta), q) - float(eta)) < 2e-4
    torch.testing.assert_close(d, eta * u)


def test_fast_combine_matches_dense_reference_and_clamps():
    for seed in range(6):
        g1, g2, Fm, Finv = problem(seed=seed)
        d, b, e = combine(g1, g2, Fm, Finv)
        d_ref, b_ref, e_ref = fop_direction_dense(g1, g2, Fm, Finv)
        torch.testing.assert_close(d, d_ref)
        assert float(b) == pytest.approx(b_ref) and -0.5 <= float(b) <= 0.5
        assert float(e) == pytest.approx(e_ref) and 0.0 <= float(e) <= 2.0


def test_eta_is_two_when_beta_is_zero():
    g1, g2, Fm, Finv = problem()
    _, _, e = combine(g1, g2, Fm, Finv, beta=0.0)
    assert float(e) == pytest.approx(2.0)
    _, b, e = combine(g1, g1.clone(), Fm, Finv)  # identical halves: no perpendicular signal
    assert float(b) == 0.0 and float(e) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kind,two_pass,damping_type",
    [("mlp", False, "pi"), ("cnn", False, "pi"), ("mlp", True, "pi"), ("cnn", True, "pi"),
     ("cnn", False, "tikhonov")],
)  # fmt: skip
def test_fop_matches_dense_reference(kind, two_pass, damping_type):
    model_a, model_b = (mlp(), mlp()) if kind == "mlp" else (cnn(), cnn())
    data = batches(kind)
    kw = OPT_KW | {"damping_type": damping_type}
    if damping_type == "tikhonov":
        kw["inverse_method"] = "eigen"
    train(FOP(model_a, lr=HP["lr"], **kw), model_a, data, two_pass=two_pass)
    reference_fop_train(model_b, data, F.cross_entropy, HP | {"damping_type": damping_type})
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11)


def test_identical_sub_batches_reduce_to_kfac_at_twice_the_lr():
    data = [(torch.cat([x[:4], x[:4]]), torch.cat([y[:4], y[:4]])) for x, y in batches("cnn")]
    m_fop, m_kfac, m_fix, m_k1 = cnn(), cnn(), cnn(), cnn()
    # eta* = 2 doubles the preconditioned gradient, not the coupled decay: halve it for K-FAC
    train(FOP(m_fop, lr=0.05, **OPT_KW), m_fop, data)
    train(KFAC(m_kfac, lr=0.1, **(OPT_KW | {"weight_decay": HP["weight_decay"] / 2})), m_kfac, data)
    train(FOP(m_fix, lr=0.05, beta=0.0, eta=1.0, **OPT_KW), m_fix, data)
    train(KFAC(m_k1, lr=0.05, **OPT_KW), m_k1, data)
    for a, b, c, d in zip(m_fop.parameters(), m_kfac.parameters(), m_fix.parameters(),
                          m_k1.parameters(), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)


def test_unsplittable_layer_falls_back_to_kfac_on_the_mean():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    model_a = nn.Sequential(lin, nn.Tanh(), lin)  # same layer used twice
    model_b = nn.Sequential(lin, nn.Tanh(), lin)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    opt = FOP(model_a, lr=0.1, **OPT_KW)
    train(opt, model_a, [(x, y)] * 2)
    after_fop = {k: v.clone() for k, v in lin.state_dict().items()}
    lin.load_state_dict(sd)
    train(KFAC(model_b, lr=0.1, **OPT_KW), model_b, [(x, y)] * 2)
    for k, v in lin.state_dict().items():
        torch.testing.assert_close(after_fop[k], v, rtol=1e-12, atol=1e-14)
    assert float(opt.block_state(opt._blocks[0])["eta"]) == 0.0  # never took the FOP path


def test_two_pass_sets_mean_gradient_and_returns_loss():
    model = mlp()
    x, y = batches("mlp", n=1)[0]
    opt = FOP(model, lr=0.1)
    loss = opt.backward_two_pass(x, y, F.cross_entropy)
    ref = mlp()
    F.cross_entropy(ref(x), y).backward()
    torch.testing.assert_close(loss, F.cross_entropy(ref(x), y).detach())
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match="inputs"):
        opt.backward_two_pass(x[:1], y[:1], F.cross_entropy)


@pytest.mark.parametrize(
    "name,value",
    [("beta_clamp", (0.5, -0.5)), ("beta_clamp", 0.5), ("eta_clamp", (0.0, float("nan"))),
     ("beta", float("inf")), ("eta", "one"), ("damping", -1.0), ("lr", -0.1)],
)  # fmt: skip
def test_invalid_fop_arguments(name, value):
    with pytest.raises(ValueError, match=name):
        FOP(mlp(), **{name: value})


@pytest.mark.parametrize("two_pass", [False, True])
def test_mc_fisher_with_batchnorm_and_sequences_trains(two_pass):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Unflatten(1, (4, 16)), nn.Linear(16, 8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3),
    )  # fmt: skip
    x, y = torch.randn(16, 2, 4, 4), torch.randint(0, 3, (16,))
    opt = FOP(model, lr=0.05, fisher="mc", factor_interval=2, inverse_interval=2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        if two_pass:
            losses.append(float(opt.backward_two_pass(x, y, F.cross_entropy)))
        else:
            out = model(x)
            opt.sample_fisher(out)
            loss = F.cross_entropy(out, y)
            loss.backward()
            losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < losses[0]
    etas = [opt.block_state(b)["eta"] for b in opt._blocks]
    assert len(etas) == 3 and all(0.0 < float(e) <= 2.0 for e in etas)


def test_one_pass_split_runs_in_the_backward_hook_and_keeps_no_activations():
    """Between factor updates the hooks keep neither inputs nor output gradients: the first-half
    product is computed in the gradient hook. backward_two_pass computes no such product."""
    model = cnn()
    data = batches("cnn")
    opt = FOP(model, lr=0.1, **(OPT_KW | {"factor_interval": 10}))
    train(opt, model, data[:1])  # step 0 updates the factors
    x, y = data[1]
    F.cross_entropy(model(x), y).backward()
    recs = opt._capture.records.values()
    assert all(not r.inputs and not r.grads and r.n_backward == 1 for r in recs)
    assert all(r.U is not None and r.b_first == x.shape[0] for r in recs)
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)  # a second micro-batch ...
    assert all(opt._capture.halves_of(b) is not None for b in opt._blocks)
    loss.backward()  # ... backpropagated twice: more backward passes than forwards, not split
    assert all(r.n_backward == 3 and len(r.forwards) == 2 for r in recs)
    assert all(opt._capture.halves_of(b) is None for b in opt._blocks)
    opt.step()
    opt.zero_grad()
    opt.backward_two_pass(x, y, F.cross_entropy)
    assert all(r.U is None for r in opt._capture.records.values())
