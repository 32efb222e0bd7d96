"""K-FAC / FOP as users build them: from ``model.parameters()`` (the FOP guide's usage), after
``torch.compile``, and resumed through ``torch.distributed.checkpoint``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthoptim import FOP, KFAC

D = torch.float64
KW = dict(lr=0.1, factor_interval=2, inverse_interval=2, ema_weight=0.5, weight_decay=1e-3)


class Net(nn.Module):
    """An attention layer, a conv and linear layers: every adapter path that hooks or patches."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        h = self.norm(h + self.att(h, h, h, need_weights=False)[0])
        return self.head(torch.tanh(h).mean(1))


def batches(n=6, dtype=D):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, 5, generator=g, dtype=D).to(dtype),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]  # fmt: skip


def train(opt, model, data, mc=False):
    for x, y in data:
        out = model(x)
        opt.zero_grad()
        if mc:
            opt.sample_fisher(out)
        F.cross_entropy(out, y).backward()
        opt.step()


# ------------------------------------------------------------------------------ parameter form
@pytest.mark.parametrize("cls", [KFAC, FOP])
@pytest.mark.parametrize("form", ["parameters", "named", "groups"])
def test_parameter_form_trains_exactly_as_the_model_form(cls, form):
    """``FOP(model.parameters(), lr=...)`` (the FOP guide) finds the layers on the first forward
    and trains bit for bit as ``FOP(model, lr=...)``; two param groups (weights / the rest, a
    common weight-decay split) are preconditioned together (a weight's bias in the other
    group)."""
    data = batches()
    ref_model, model = Net().double(), Net().double()
    if form == "groups":  # weights in one group, biases and norms in another (same settings)
        named = list(model.named_parameters())
        matrices = [p for _, p in named if p.dim() > 1]
        rest = [p for _, p in named if p.dim() <= 1]
        opt = cls([{"params": matrices}, {"params": rest}], **KW)
    else:
        opt = cls(model.parameters() if form == "parameters" else model.named_parameters(), **KW)
    ref = cls(ref_model, **KW)
    assert opt._blocks == []  # nothing known before the first forward
    train(opt, model, data)
    train(ref, ref_model, data)
    assert [b.name for b in opt._blocks] == [b.name for b in ref._blocks]
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_parameter_form_names_parameters_never_seen_in_a_forward():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    unused = nn.Linear(5, 5)
    opt = KFAC([*model.parameters(), *unused.parameters()], lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.warns(UserWarning, match=r"group 0 param 4 \(5, 5\): never used in a forward"):
        opt.step()
    assert len(opt._blocks) == 2


def test_parameter_form_search_copies_with_its_optimizer_and_ends_with_it():
    """A deep copy made before the first forward finds its own (copied) model; a discarded
    optimizer leaves no global hook behind."""
    import gc

    from torch.nn.modules import module as nn_module

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = KFAC(model.parameters(), lr=0.1)
    model2, opt2 = copy.deepcopy((model, opt))
    x = torch.randn(5, 4, dtype=D)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    got = [b.weight for b in opt2._blocks]
    assert len(got) == 2 and got[0] is model2[0].weight and got[1] is model2[2].weight
    assert torch.equal(model[0].weight, model2[0].weight)
    hooks = len(nn_module._global_forward_pre_hooks)
    KFAC(nn.Linear(2, 2).parameters())  # never run, dropped at once
    gc.collect()
    model(x)  # the next module call removes the orphaned hook
    assert len(nn_module._global_forward_pre_hooks) == hooks


def test_parameter_form_without_a_module_call_raises_and_says_to_pass_the_model():
    w = nn.Parameter(torch.randn(3, 4))
    opt = KFAC([w], lr=0.1)
    (torch.randn(2, 4) @ w.T).sum().backward()
    with pytest.raises(RuntimeError, match=r"pass the model: KFAC\(model"):
        opt.step()


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_optimizer_built_after_the_first_compiled_forward_trains_like_eager(cls, backend):
    """The broken case of the issue: hooks added after a compiled model first ran never fire.
    The optimizer resets the compiled code, so the next forward is traced with the hooks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = batches(n=4, dtype=torch.float32)
    model, ref = Net(), Net()
    compiled = torch.compile(model, backend=backend)
    compiled(data[0][0])  # the first compiled forward, before the optimizer exists
    opt = cls(compiled, **KW)
    train(opt, compiled, data)
    train(cls(ref, **KW), ref, data)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    recs = opt._capture.records
    assert opt._checked and all(b.weight.grad is not None for b in recs)
    breaks = sum(counters["graph_break"].values())
    print(f"{cls.__name__}: {breaks} graph breaks")  # docs/fop.md quotes this count
    torch._dynamo.reset()


# --------------------------------------------------------------- torch.distributed.checkpoint
@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_distributed_checkpoint_round_trip_continues_bit_for_bit(cls, tmp_path):
    """get_optimizer_state_dict -> dcp.save, then into a fresh model and optimizer (another
    seed) through the template DCP loads into, set_optimizer_state_dict, continue: parameters and
    state equal the uninterrupted run bit for bit; the step counter (factor / inverse schedule,
    Monte-Carlo labels) and the skipped-step count survive."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    kw = KW | dict(fisher="mc", inverse_interval=3, seed=3)
    data = batches(n=9)
    model = Net().double()
    opt = cls(model, **kw)
    train(opt, model, data[:2], mc=True)
    model.head.weight.grad = None
    out = model(data[2][0])
    opt.zero_grad()
    opt.sample_fisher(out)
    F.cross_entropy(out, data[2][1]).backward()
    model.conv.weight.grad[0, 0, 0] = float("nan")
    opt.step()  # skipped
    train(opt, model, data[3:5], mc=True)
    assert opt.skipped_steps == 1 and opt.kfac_step == 4
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))

    torch.manual_seed(123)
    model2 = Net().double()
    for p in model2.parameters():
        p.data.normal_()
    opt2 = cls(model2, **(kw | {"seed": 99}))
    template = {"model": get_model_state_dict(model2),
                "optim": get_optimizer_state_dict(model2, opt2)}  # fmt: skip
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    set_model_state_dict(model2, template["model"])
    set_optimizer_state_dict(model2, opt2, template["optim"])
    assert opt2.kfac_step == 4 and opt2.skipped_steps == 1
    assert opt2.param_groups[0]["seed"] == 3

    train(opt, model, data[5:], mc=True)
    train(opt2, model2, data[5:], mc=True)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = opt.state_dict(), opt2.state_dict()
    flat_a = dict(_leaves(sa["state"]))
    flat_b = dict(_leaves(sb["state"]))
    assert flat_a.keys() == flat_b.keys()
    for k, v in flat_a.items():
        assert (torch.equal(v, flat_b[k]) if isinstance(v, torch.Tensor) else v == flat_b[k]), k


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}/{k}")
    else:
        yield prefix, obj


def test_the_state_is_keyed_by_parameter_and_holds_every_block():
    model = Net().double()
    opt = FOP(model, **KW)
    train(opt, model, batches(n=1))
    sd = opt.state_dict()
    assert all(isinstance(k, int) for k in sd["state"])  # no string keys: DCP maps ids to FQNs
    in_proj = [i for i, p in enumerate(model.parameters()) if p is model.att.in_proj_weight][0]
    assert set(sd["state"][in_proj]["kfac"]) == {"q", "k", "v"}
    assert sd["state"][0]["kfac_step"] == 1
    fresh = copy.deepcopy(opt)
    assert fresh.kfac_step == 1


# ------------------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("cls", [KFAC, FOP])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_runs_equal_fp32_runs(cls, unscale_first):
    """torch.amp.GradScaler (on CPU): factors and FOP's halves are unscaled, a step the scaler
    skips (an overflow) leaves no capture behind, and the run equals the fp32 run without that
    step, with or without scaler.unscale_ (gradient clipping) before scaler.step."""
    data = batches(n=6)
    model, ref_model = Net().double(), Net().double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    kw = KW | dict(factor_interval=1, inverse_interval=1)
    opt = cls(model, **kw, grad_scaler=scaler if unscale_first else None)
    ref = cls(ref_model, **kw)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if i == 2:  # an overflow: the scaler skips this step and halves its scale
            model.head.weight.grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)
        scaler.step(opt)
        scaler.update()
        if i != 2:
            train(ref, ref_model, [(x, y)])
    assert scaler.get_scale() != 2.0**12  # the scale moved: grew, and halved at the overflow
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for b, c in zip(opt._blocks, ref._blocks, strict=True):
        for key in ("A", "G"):
            torch.testing.assert_close(opt.block_state(b)[key], ref.block_state(c)[key])
    assert opt.kfac_step == ref.kfac_step == 5


def test_unscale_before_step_without_the_scaler_is_a_clear_error():
    model = Net().double()
    opt = KFAC(model, **KW)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches(n=1)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"grad_scaler=scaler"):
        scaler.step(opt)
