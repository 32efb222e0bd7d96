"""KFAC: reductions to torch.optim, reference oracle, state dict, schedulers, validation."""

import io

import pytest
import torch
import torch.nn.functional as F
from curvature_models import batches, cnn, mlp
from torch import nn

import orthoptim.optim.kfac as kfac_mod
from orthoptim import FOP, KFAC
from orthoptim.optim.kfac_reference import reference_train

HP = dict(lr=0.1, damping=1e-2, damping_type="pi", momentum=0.9, weight_decay=1e-3,
          factor_interval=2, inverse_interval=2, ema_weight=0.5, factor_init="batch")  # fmt: skip




def train(opt, model, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def kw(**over):
    hp = {k: v for k, v in HP.items() if k != "lr"}
    hp.update(factor_dtype="float64", max_grad_norm=None)
    hp.update(over)
    return hp


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("variant", [{}, {"factor_init": "zero"}, {"damping_type": "tikhonov"}])
def test_fast_path_matches_dense_reference(kind, variant):
    model_a, model_b = (mlp(), mlp()) if kind == "mlp" else (cnn(), cnn())
    data = batches(kind)
    extra = dict(variant)
    if variant.get("damping_type") == "tikhonov":
        extra["inverse_method"] = "eigen"
    train(KFAC(model_a, lr=HP["lr"], **kw(**extra)), model_a, data)
    reference_train(model_b, data, F.cross_entropy, {**HP, **variant})
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11)


def seq_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("cls", ["kfac", "fop"])
def test_sequences_match_the_dense_reference(approx, cls):
    """(B, T, d) inputs (weights shared over T): K-FAC-expand and K-FAC-reduce against the loops
    of the reference; FOP's one-pass halves against its two half-batch passes."""
    from orthoptim.optim.fop_reference import reference_fop_train

    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(6, 5, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=g)) for _ in range(4)]  # fmt: skip

    def loss(out, y):
        return F.cross_entropy(out.mean(1), y)

    model_a, model_b = seq_mlp(), seq_mlp()
    opt = (KFAC if cls == "kfac" else FOP)(model_a, lr=HP["lr"], **kw(kfac_approx=approx))
    for x, y in data:
        opt.zero_grad()
        loss(model_a(x), y).backward()
        opt.step()
    (reference_train if cls == "kfac" else reference_fop_train)(
        model_b, data, loss, {**HP, "kfac_approx": approx}
    )
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11)


def _identity_factors(monkeypatch):
    monkeypatch.setattr(
        kfac_mod, "a_factor", lambda b, x, dtype, approx: torch.eye(b.d_in, dtype=dtype)
    )
    monkeypatch.setattr(
        kfac_mod, "g_factor", lambda b, g, n, dtype, approx: torch.eye(b.d_out, dtype=dtype)
    )


def mixed_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(4 * 16, 3),
    ).double()  # fmt: skip


@pytest.mark.filterwarnings("ignore::orthoptim.optim.kfac.PlainUpdateWarning")  # grouped conv
@pytest.mark.parametrize("outer", ["sgd", "adamw"])
def test_identity_curvature_reduces_to_outer_optimizer(monkeypatch, outer):
    """With identity factors (and no damping) K-FAC is its outer optimizer, bit for bit: the
    outer update is torch's own fused SGD / AdamW (which drop a non-finite step on the device)."""
    _identity_factors(monkeypatch)
    model_a, model_b = mixed_model(), mixed_model()
    data = batches("cnn", n=5)
    common = dict(weight_decay=1e-2)
    if outer == "sgd":
        ref = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9, fused=True, **common)
    else:
        ref = torch.optim.AdamW(model_b.parameters(), lr=0.05, fused=True, **common)
    opt = KFAC(model_a, lr=0.05, outer=outer, damping_type="tikhonov", inverse_method="eigen",
               damping=1e-30, factor_dtype="float64", factor_interval=1, max_grad_norm=None,
               **common)  # fmt: skip
    train(opt, model_a, data)
    train(ref, model_b, data)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        for key, value in ref.state[pb].items():
            assert torch.equal(opt.state[pa][key], value)


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_state_dict_roundtrip_continues_bit_for_bit(cls):
    data = batches("cnn", n=7)
    model = cnn()
    opt = cls(model, lr=0.1, fisher="mc", factor_interval=2, inverse_interval=3, seed=3)

    def run(o, m, chunk):
        for x, y in chunk:
            out = m(x)
            o.zero_grad()
            o.sample_fisher(out)
            F.cross_entropy(out, y).backward()
            o.step()

    run(opt, model, data[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = cnn()
    model2.load_state_dict(model.state_dict())
    opt2 = cls(model2, lr=0.1, fisher="mc", factor_interval=2, inverse_interval=3, seed=99)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    run(opt, model, data[3:])
    run(opt2, model2, data[3:])
    for pa, pb in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for ba, bb in zip(opt._blocks, opt2._blocks, strict=True):
        for key in ("A", "G"):
            assert torch.equal(opt.block_state(ba)[key], opt2.block_state(bb)[key])


def test_lr_scheduler_changes_the_step():
    data = batches("mlp", n=3)
    m0, m1, m2 = mlp(), mlp(), mlp()
    o0 = KFAC(m0, lr=0.1)
    o1 = KFAC(m1, lr=0.1)
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda e: 0.0)
    o2 = KFAC(m2, lr=0.1)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda e: 0.5)
    train(o0, m0, data[:1])
    train(o1, m1, data[:1])
    train(o2, m2, data[:1])
    s1.step()
    s2.step()
    init = mlp()
    for p0, p1, p2, pi in zip(m0.parameters(), m1.parameters(), m2.parameters(),
                              init.parameters(), strict=True):  # fmt: skip
        assert torch.equal(p1, pi)  # lr 0: no move
        torch.testing.assert_close(p2 - pi, 0.5 * (p0 - pi))


def test_step_returns_closure_loss_and_hooks_run():
    model = mlp()
    opt = KFAC(model, lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    x, y = batches("mlp", n=1)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == [1]
    assert opt.kfac_step == 1


def test_mc_fisher_needs_sample_call_and_is_seeded():
    x, y = batches("mlp", n=1)[0]
    model = mlp()
    opt = KFAC(model, lr=0.1, fisher="mc")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="sample_fisher"):
        opt.step()
    factors = []
    for _ in range(2):
        model = mlp()
        opt = KFAC(model, lr=0.1, fisher="mc", seed=5)
        out = model(x)
        opt.sample_fisher(out)
        F.cross_entropy(out, y).backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        factors.append(opt.block_state(opt._blocks[0])["G"])
    assert torch.equal(*factors)


@pytest.mark.parametrize(
    "name,value",
    [("lr", -1.0), ("damping", -1e-3), ("momentum", 1.0), ("weight_decay", -1.0),
     ("factor_interval", 0), ("inverse_interval", 1.5), ("ema_weight", 0.0),
     ("ema_weight", 1.5), ("factor_init", "ones"), ("damping_type", "levenberg"),
     ("inverse_method", "qr"), ("fisher", "exact"), ("factor_dtype", "bfloat16"),
     ("kl_clip", 0.0), ("max_grad_norm", -1.0), ("outer", "adam"), ("betas", (0.9, 1.0)),
     ("eps", -1.0), ("seed", -1), ("kfac_approx", "mean"), ("max_factor_dim", 0),
     ("exclude", [3])],
)  # fmt: skip
def test_invalid_arguments_raise_value_error_naming_them(name, value):
    with pytest.raises(ValueError, match=name):
        KFAC(mlp(), **{name: value})


def test_invalid_combinations_and_unknown_keys():
    with pytest.raises(ValueError, match="inverse_method"):
        KFAC(mlp(), damping_type="tikhonov", inverse_method="cholesky")
    with pytest.raises(ValueError, match="params"):
        KFAC(torch.zeros(2, requires_grad=True))
    with pytest.raises(ValueError, match="no layer"):  # a model without any supported layer
        KFAC(nn.Sequential(nn.LayerNorm(3)))
    with pytest.raises(TypeError, match="beta"):
        KFAC(mlp(), beta=0.1)
    opt = KFAC(mlp())
    with pytest.raises(ValueError, match="Unknown param-group"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lrr": 0.1})
