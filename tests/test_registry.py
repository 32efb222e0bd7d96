"""The optimizer registry: names, hyperparameter checks, lr scaling, Muon equivalence, peers."""

import math
import warnings

import pytest
import torch
from torch import nn

from orthoptim import FOGO, FOP, KFAC, param_groups
from orthoptim.benchmarks import registry
from orthoptim.benchmarks.models import MLP

BUILTINS = ["sgd", "adamw", "muon", "muon-bf16", "fogo", "fogo-nomem", "kfac", "kfac-2x", "fop",
            "kfac-noattn", "kfac-patch-head"]  # fmt: skip


class TinyLM(nn.Module):
    """Embedding and LayerNorm (AdamW by routing), two hidden matrices (Muon), a head (AdamW).

    The LayerNorm sits before the hidden matrices: after them it would project their gradients
    onto a rank-deficient subspace, whose zero singular direction bf16 Newton-Schulz turns into
    noise of size one, which no precision argument can bound.
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.body = nn.Sequential(
            nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.Tanh()
        )
        self.head = nn.Linear(24, 20)

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def _train(model, opts, steps=10):
    """Train ``model`` on a fixed token stream; return each parameter's total update."""
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 20, (64,), generator=gen)
        y = torch.randint(0, 20, (64,), generator=gen)
        for o in opts:
            o.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for o in opts:
            o.step()
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}


HP = {"lr": 0.02, "weight_decay": 0.1}


def _torch_muon_updates():
    torch.manual_seed(0)
    model = TinyLM()
    hidden, rest = param_groups(model, verbose=False)
    muon = torch.optim.Muon(
        hidden["params"], **HP, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    adamw = torch.optim.AdamW(rest["params"], **HP, betas=(0.9, 0.999), eps=1e-8, fused=True)
    return _train(model, [muon, adamw])


def _updates(build):
    torch.manual_seed(0)
    model = TinyLM()
    return _train(model, [build(model)])


def _max_rel_err(ours, ref):
    return max(((ours[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)


def test_muon_bf16_is_bitwise_torch_muon_plus_adamw():
    ref = _torch_muon_updates()
    ours = _updates(lambda m: registry.make_optimizer("muon-bf16", m, HP))
    assert all(torch.equal(ours[n], ref[n]) for n in ref)


# Tolerance of the float32-NS muon against torch's bf16-NS Muon, on each tensor's total update
# after 10 steps, relative (Frobenius). bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%);
# five Newton-Schulz iterations compound it to ~1.5% on a well-conditioned matrix, and to ~10% on
# one step of an ill-conditioned gradient (NS lifts its small singular directions to ~1, and bf16
# resolves them only to its noise). Momentum averages this over steps: measured 3.0% at most (the
# 32x24 matrix), so the bound is 2x that. Any wrong setting is far outside it (measured >= 13%):
# the test checks that too, so it cannot pass by being loose.
MUON_RTOL = 0.06


def test_muon_float32_matches_torch_muon_up_to_bf16_precision():
    ref = _torch_muon_updates()
    ours = _updates(lambda m: registry.make_optimizer("muon", m, HP))
    assert not all(torch.equal(ours[n], ref[n]) for n in ref)  # really another NS precision
    assert _max_rel_err(ours, ref) < MUON_RTOL
    muon_fp32 = dict(dual_stream=False, memory=False, nesterov=True, ns_dtype="float32", **HP)
    for wrong in (
        dict(scale="rms"),  # FOGO's exact RMS instead of torch's sqrt(max(m, n)) rule
        dict(scale="muon", nesterov=False),
        dict(scale="muon", beta_slow=0.9),
        dict(scale="muon", ns_steps=4),
    ):
        cfg = {**muon_fp32, **wrong}
        other = _updates(lambda m, cfg=cfg: FOGO(param_groups(m, verbose=False), **cfg))
        assert _max_rel_err(other, ref) > 2 * MUON_RTOL, wrong


def test_names_builtins_first_and_unknown_names_suggest():
    assert registry.list_optimizers(include_peers=False) == BUILTINS
    assert registry.list_optimizers()[: len(BUILTINS)] == BUILTINS
    with pytest.raises(ValueError, match=r"'fgo'.*did you mean fogo"):
        registry.get_optimizer("fgo")
    entry = registry.get_optimizer("kfac-2x")
    assert entry.kind == "builtin" and entry.lr_multiplier == 2.0
    assert all(registry.get_optimizer(n).lr_multiplier == 1.0 for n in BUILTINS if n != "kfac-2x")


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_trains_a_small_model(name):
    torch.manual_seed(0)
    model = MLP(12, (16, 16), 4)
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    opt = registry.make_optimizer(name, model, {"lr": 0.01 if "kfac" in name else 1e-3})
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_classes_and_fixed_settings():
    model = MLP(12, (16,), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the routing note is kept, not warned
        muon = registry.make_optimizer("muon", model)
        fogo = registry.make_optimizer("fogo", model)
    assert isinstance(muon, FOGO) and "head.weight (output head)" in muon.routing
    g = muon.param_groups[0]
    assert g["algorithm"] == "fogo" and g["ns_dtype"] == "float32" and g["scale"] == "muon"
    assert (g["dual_stream"], g["memory"], g["nesterov"], g["beta_slow"]) == (
        False, False, True, 0.95,
    )  # fmt: skip
    assert any(p is model.head.weight for p in muon.param_groups[1]["params"])
    assert fogo.param_groups[0]["memory"] and fogo.param_groups[0]["ns_dtype"] == "float32"
    assert not registry.make_optimizer("fogo-nomem", model).param_groups[0]["memory"]
    assert registry.make_optimizer("muon-bf16", model).param_groups[0]["ns_dtype"] == "bfloat16"
    assert type(registry.make_optimizer("kfac", model)) is KFAC
    assert type(registry.make_optimizer("fop", model)) is FOP
    assert type(registry.make_optimizer("sgd", model)) is torch.optim.SGD
    assert registry.make_optimizer("sgd", model).param_groups[0]["momentum"] == 0.9


def test_lr_is_hparam_times_multiplier_times_scale_and_kfac2x_halves_decay():
    model = MLP(12, (16,), 4)
    opt = registry.make_optimizer("adamw", model, {"lr": 0.003}, lr_scale=4.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.012)
    k2 = registry.make_optimizer("kfac-2x", model, {"lr": 0.05, "weight_decay": 0.2}, 0.5)
    assert k2.param_groups[0]["lr"] == pytest.approx(0.05)
    assert k2.param_groups[0]["weight_decay"] == pytest.approx(0.1)
    k1 = registry.make_optimizer("kfac", model, {"lr": 0.05, "weight_decay": 0.2})
    assert (k1.param_groups[0]["lr"], k1.param_groups[0]["weight_decay"]) == (0.05, 0.2)
    fogo = registry.make_optimizer("fogo", model, {"lr": 0.002}, lr_scale=2.0)
    assert all(g["lr"] == pytest.approx(0.004) for g in fogo.param_groups)
    # JSON lists become the tuples the constructors expect.
    adamw = registry.make_optimizer("adamw", model, {"betas": [0.8, 0.99]})
    assert adamw.param_groups[0]["betas"] == (0.8, 0.99)


def test_bad_hparams_and_scales_name_the_problem():
    model = MLP(12, (16,), 4)
    with pytest.raises(ValueError, match=r"\['momentum'\] for optimizer 'muon'"):
        registry.make_optimizer("muon", model, {"momentum": 0.9})  # it is beta_slow
    with pytest.raises(ValueError, match=r"\['memory'\] for optimizer 'fogo-nomem'"):
        registry.make_optimizer("fogo-nomem", model, {"memory": True})
    with pytest.raises(ValueError, match=r"'wieght_decay': did you mean 'weight_decay'"):
        registry.make_optimizer("adamw", model, {"wieght_decay": 0.1})
    for bad in (0, -1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="lr_scale"):
            registry.make_optimizer("adamw", model, lr_scale=bad)
    with pytest.raises(ValueError, match="Invalid lr"):
        registry.make_optimizer("sgd", model, {"lr": "fast"})
    with pytest.raises(ValueError, match="Invalid model"):
        registry.make_optimizer("sgd", [nn.Parameter(torch.zeros(2))])


PAPER_PEERS = ["lion", "adabelief", "adan", "adamp", "spam"]


@pytest.mark.parametrize("name", PAPER_PEERS)
def test_paper_peers_build_take_hparams_and_train(name):
    pytest.importorskip("pytorch_optimizer")
    entry = registry.get_optimizer(name)
    assert entry.kind == "peer" and name in registry.list_optimizers()
    assert name not in registry.list_optimizers(include_peers=False)
    torch.manual_seed(0)
    model = MLP(12, (16,), 4)
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    opt = registry.make_optimizer(name, model, {"lr": 1e-3, "weight_decay": 1e-4}, lr_scale=2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # The classes swallow unknown kwargs; the registry does not.
    with pytest.raises(ValueError, match=rf"\['bogus'\] for optimizer '{name}'"):
        registry.make_optimizer(name, model, {"bogus": 1})


def test_peer_extra_kwargs_and_builtins_win_clashes():
    pytest.importorskip("pytorch_optimizer")
    model = MLP(12, (16,), 4)
    lion = registry.make_optimizer("lion", model, {"betas": [0.95, 0.98]})
    assert lion.param_groups[0]["betas"] == (0.95, 0.98)
    for name in ("sgd", "adamw", "muon"):  # also pytorch_optimizer names
        assert registry.get_optimizer(name).kind == "builtin"
    assert (
        "needs loss.backward(create_graph=True)" in registry.get_optimizer("adahessian").description
    )
