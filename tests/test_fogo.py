"""FOGO optimizer: contract, reductions to known optimizers, reference equality, resume."""

import io
import types
import warnings

import pytest
import torch
import torch.nn as nn
from ecosystem_models import conv1d_and_linear_twins

import orthoptim
from orthoptim import FOGO, FOGOReference
from orthoptim.optim import _fogo_state

F64 = dict(ns_dtype="float64", memory_dtype="float64")


def tiny_model(seed=0, conv=False):
    torch.manual_seed(seed)
    if conv:
        return nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(),
            nn.Linear(8, 3),
        ).double()  # fmt: skip
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10), nn.Linear(10, 3)).double()


def batches(n, conv=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (16, 2, 6, 6) if conv else (16, 12)
    return [
        (
            torch.randn(*shape, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=gen),
        )
        for _ in range(n)
    ]


def train(model, opt, data, end_task_at=()):
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i in end_task_at:
            opt.end_task()


def assert_states_equal(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict):
            assert_states_equal(va, vb, exact)
        elif isinstance(va, torch.Tensor):
            if exact or not va.is_floating_point():  # discrete decisions always agree
                assert torch.equal(va, vb), k
            else:
                assert torch.allclose(va.double(), vb.double(), atol=1e-8, rtol=1e-6), k
        else:
            assert va == vb, k


def test_update_rms_equals_target():
    w = nn.Parameter(torch.randn(20, 30, dtype=torch.float64))
    opt = FOGO([w], lr=0.1, target_rms=0.2, memory=False, **F64)
    w.grad = torch.randn(20, 30, dtype=torch.float64)
    before = w.detach().clone()
    opt.step()
    rms = (w.detach() - before).square().mean().sqrt()
    assert torch.isclose(rms, torch.tensor(0.1 * 0.2, dtype=torch.float64))


def test_memory_without_entries_reduces_exactly_to_the_short_term_optimizer():
    data = batches(12)
    params = []
    for memory in (False, True):
        model = tiny_model()
        opt = FOGO(model.parameters(), lr=0.01, memory=memory, write_interval=0)
        train(model, opt, data)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(gate="sign", gate_threshold=0.05),
        dict(side="output", radius=0.8),
        dict(dual_stream=False, nesterov=True, eviction="least_used"),
        dict(fusion="lerp", weight_decay=0.1, scale="muon"),
        dict(write_source="slow", gate="sign", merge_threshold=0.9),
    ],
)
@pytest.mark.parametrize("conv", [False, True])
def test_fast_path_equals_reference(options, conv):
    data = batches(16, conv=conv)
    runs = []
    for cls in (FOGO, FOGOReference):
        model = tiny_model(conv=conv)
        opt = cls(
            model.parameters(), lr=0.02, write_interval=4, min_age=2, memory_budget=0.5,
            capacity=3, **F64, **options,
        )  # fmt: skip
        train(model, opt, data, end_task_at=(7,))
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    # The fast lift uses M = (I/rho + V^T V)^-1 cached at write time, the reference solves the
    # n x n normal equations: float64 rounding apart, amplified through the writes' range finders.
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-6)
    assert_states_equal(o1.state_dict()["state"], o2.state_dict()["state"], exact=False)
    assert o1.memory_stats()["writes"] > 0


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(dual_stream=False, nesterov=True, scale="muon", weight_decay=0.1),
        dict(fusion="lerp", weight_decay=0.1, ns_dtype="float32"),
    ],
)
def test_batched_short_term_step_equals_the_reference_bit_for_bit(options):
    """Without memory the fast step's math is the reference's (batched Newton-Schulz and norms
    reduce per matrix): equal bit for bit, across a dropped step and a missing gradient."""
    data = batches(10, conv=True)
    runs = []
    for cls in (FOGO, FOGOReference):
        model = tiny_model(conv=True)
        opt = cls(model.parameters(), lr=0.02, memory=False, **{**F64, **options})
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if i == 3:
                model[0].weight.grad[0, 0, 0, 0] = float("nan")
            if i == 5:
                model[3].weight.grad = None
            opt.step()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_states_equal(o1.state_dict()["state"], o2.state_dict()["state"])
    assert o1.skipped_steps == 1


@pytest.mark.parametrize("gate", ["overlap", "sign"])
def test_state_dict_round_trip_continues_bit_for_bit(gate):
    data = batches(20)
    model = tiny_model()
    opt = FOGO(model.parameters(), lr=0.02, write_interval=3, memory_budget=0.5, gate=gate)
    train(model, opt, data[:10], end_task_at=(5,))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[10:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(999)  # a different global RNG must not matter
    fresh_model = tiny_model(seed=1)
    fresh_model.load_state_dict(saved["model"])
    fresh = FOGO(fresh_model.parameters(), lr=0.02, write_interval=3, memory_budget=0.5, gate=gate)
    fresh.load_state_dict(saved["opt"])
    train(fresh_model, fresh, data[10:])
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_states_equal(opt.state_dict()["state"], fresh.state_dict()["state"])


def test_lr_scheduler_changes_the_step():
    w = nn.Parameter(torch.zeros(8, 8))
    opt = FOGO([w], lr=1.0, memory=False, ns_dtype="float32")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sizes = []
    for _ in range(3):
        before = w.detach().clone()
        w.grad = torch.ones(8, 8) + torch.eye(8)
        opt.step()
        sched.step()
        sizes.append((w.detach() - before).square().mean().sqrt().item())
    assert sizes[1] == pytest.approx(sizes[0] / 2, rel=1e-5)
    assert sizes[2] == pytest.approx(sizes[0] / 4, rel=1e-5)


def test_non_matrix_params_follow_adamw_exactly():
    """FOGO's AdamW parameters take torch's fused AdamW step (the torch path that drops a step on
    the device): bitwise torch.optim.AdamW(fused=True)."""
    torch.manual_seed(0)
    b1 = nn.Parameter(torch.randn(7))
    b2 = nn.Parameter(b1.detach().clone())
    ours = FOGO([b1], lr=0.01, weight_decay=0.1, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    ref = torch.optim.AdamW(
        [b2], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, fused=True
    )
    for _ in range(10):
        g = torch.randn(7)
        b1.grad, b2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(b1, b2)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(ours.state[b1][key], ref.state[b2][key]), key


def test_single_stream_without_memory_is_torch_muon():
    """FOGO(dual_stream=False, nesterov=True, scale="muon", memory=False) == torch.optim.Muon
    with adjust_lr_fn="match_rms_adamw", bitwise (same bf16 Newton-Schulz, same momentum)."""
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(16, 24))
    w2 = nn.Parameter(w1.detach().clone())
    ours = FOGO(
        [w1], lr=0.02, weight_decay=0.1, dual_stream=False, beta_slow=0.95, nesterov=True,
        scale="muon", memory=False, ns_dtype="bfloat16",
    )  # fmt: skip
    ref = torch.optim.Muon([w2], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")  # fmt: skip
    for _ in range(5):
        g = torch.randn(16, 24)
        w1.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(w1, w2)


def test_default_construction_routes_by_ndim_and_groups_may_choose():
    model = tiny_model(conv=True)
    opt = FOGO(model.parameters(), lr=0.01)
    train(model, opt, batches(2, conv=True))
    for p in model.parameters():
        keys = set(opt.state[p])
        assert ("momentum_slow" in keys) == (p.ndim >= 2)
        assert ("exp_avg" in keys) == (p.ndim < 2)
    conv_state = opt.state[model[0].weight]
    assert conv_state["momentum_slow"].shape == (4, 2 * 3 * 3)
    lin = nn.Linear(4, 4)
    opt = FOGO([{"params": [lin.weight], "algorithm": "adamw"}, {"params": [lin.bias]}])
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert "exp_avg" in opt.state[lin.weight]
    with pytest.raises(ValueError, match="ndim >= 2"):
        opt = FOGO([{"params": [lin.bias], "algorithm": "fogo"}])
        opt.step()


def test_param_groups_routes_embeddings_and_head_to_adamw():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.body = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)
            self.lm_head = nn.Linear(16, 50, bias=False)

    model = LM()
    with pytest.warns(
        UserWarning, match="embed.weight \\(embedding\\).*lm_head.weight \\(output head\\)"
    ):
        groups = orthoptim.param_groups(model, lr=3e-3)
    fogo, adamw = groups
    assert fogo["algorithm"] == "fogo" and [id(p) for p in fogo["params"]] == [
        id(model.body.weight)
    ]
    assert {id(p) for p in adamw["params"]} == {
        id(model.embed.weight), id(model.body.bias), id(model.norm.weight), id(model.norm.bias),
        id(model.lm_head.weight),
    }  # fmt: skip
    assert fogo["lr"] == 3e-3
    FOGO(groups)  # the groups are valid FOGO groups (the head rule: tests/test_param_groups.py)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(beta_slow=1.0), "beta_slow"),
        (dict(beta_fast=0.995), "beta_fast"),
        (dict(mix=1.5), "mix"),
        (dict(fusion="cubic"), "fusion"),
        (dict(target_rms=0.0), "target_rms"),
        (dict(ns_steps=-1), "ns_steps"),
        (dict(ns_coefficients="bogus"), "ns_coefficients"),
        (dict(ns_dtype="int8"), "ns_dtype"),
        (dict(memory_budget=0.0), "memory_budget"),
        (dict(capacity=0), "capacity"),
        (dict(write_interval=-5), "write_interval"),
        (dict(gate="always"), "gate"),
        (dict(radius=0.0), "radius"),
        (dict(eviction="random"), "eviction"),
        (dict(side="both"), "side"),
        (dict(adamw_betas=(0.9, 1.0)), "adamw_betas"),
        (dict(weight_decay=float("nan")), "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        FOGO([nn.Parameter(torch.zeros(3, 3))], **kwargs)


def test_unknown_group_key_is_rejected():
    with pytest.raises(ValueError, match="Unknown param-group key.*'betaslow'"):
        FOGO([{"params": [nn.Parameter(torch.zeros(3, 3))], "betaslow": 0.9}])


def test_memory_budget_for_gpt2_small_shapes_is_at_most_five_percent():
    d = 768
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * 12
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = FOGO(params, ns_steps=0)  # memory sizing does not depend on Newton-Schulz
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    stats = opt.memory_stats()
    assert stats["matrices"] == 48
    assert stats["memory_fraction"] <= 0.05
    momentum = sum(2 * p.numel() * 4 for p in params)
    assert sum(
        v.numel() * v.element_size() for p in params for k, v in opt.state[p].items()
        if k.startswith("momentum")
    ) == momentum  # fmt: skip


def test_memory_stats_and_end_task_report_the_mechanism():
    model = tiny_model()
    opt = FOGO(model.parameters(), lr=0.02, write_interval=0, memory_budget=0.5)
    data = batches(10)
    train(model, opt, data[:5])
    assert opt.memory_stats()["entries_used"] == 0
    opt.end_task()
    train(model, opt, data[5:])
    stats = opt.memory_stats()
    assert stats["entries_used"] == stats["matrices"] == 3
    assert 0 < stats["correction_ratio"] < 1
    assert stats["conflict_rate"] == 1.0  # the overlap gate with tau = 0 is always active
    assert 0 < stats["occupancy"] <= 1


def test_trajectory_does_not_depend_on_the_global_rng():
    runs = []
    for global_seed in (0, 1):
        model = tiny_model()
        opt = FOGO(model.parameters(), lr=0.02, write_interval=2, memory_budget=0.5, gate="sign")
        torch.manual_seed(global_seed)
        train(model, opt, batches(8), end_task_at=(3,))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_closure_and_grad_none_params():
    w = nn.Parameter(torch.randn(4, 4))
    unused = nn.Parameter(torch.randn(4, 4))
    opt = FOGO([w, unused], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    fresh = {k: v.clone() for k, v in opt.state[unused].items() if isinstance(v, torch.Tensor)}
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    # State exists from construction (torch.distributed.checkpoint needs every key); a
    # parameter without a gradient leaves it untouched.
    assert int(opt.state[unused]["step"]) == 0 and int(opt.state[w]["step"]) == 1
    assert all(torch.equal(opt.state[unused][k], v) for k, v in fresh.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)


def _scaled_run(scaler_mode, poison, steps=12):
    """FOGO on a float32 model: plain fp32 steps without the ``poison`` step, or GradScaler steps
    (power-of-two scales, so unscaling is exact) with an inf injected at ``poison``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
    opt = FOGO(model.parameters(), lr=0.02, write_interval=3, memory_budget=0.5, ns_dtype="float32")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scales = []
    for i, (x, y) in enumerate(batches(steps)):
        loss = nn.functional.cross_entropy(model(x.float()), y)
        opt.zero_grad()
        if scaler_mode is None:
            if i != poison:
                loss.backward()
                opt.step()
            continue
        scaler.scale(loss).backward()
        if i == poison:
            model[2].weight.grad[0, 0] = float("inf")
        if scaler_mode == "unscale_first":  # the user unscales (e.g. to clip) before step
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


@pytest.mark.parametrize("scaler_mode", ["step", "unscale_first"])
def test_grad_scaler_runs_equal_fp32_runs_without_the_skipped_step(scaler_mode):
    """GradScaler's protocol (_step_supports_amp_scaling): the scaler hands FOGO its scale and
    found_inf instead of syncing; FOGO unscales, drops the overflow step on the device, and the
    run equals, bit for bit, the fp32 run that never took that step."""
    ref_model, ref, _ = _scaled_run(None, poison=5)
    model, opt, scales = _scaled_run(scaler_mode, poison=5)
    assert opt.skipped_steps == 1 and ref.skipped_steps == 0
    assert scales[5] == scales[4] / 2  # the scaler saw the overflow and backed off
    assert max(scales) > 2.0**10  # and grew its scale on the other steps
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_states_equal(opt.state_dict()["state"], ref.state_dict()["state"])
    assert opt.memory_stats()["writes"] > 0


def test_one_cycle_lr_cycles_the_slow_stream_beta_and_adamw_beta1():
    """OneCycleLR(cycle_momentum=True) writes `momentum` into every group: the slow stream's beta
    for FOGO tensors, AdamW's beta1 for the others. Each step uses the value it wrote."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5))
    b = nn.Parameter(torch.randn(5))
    b_ref = nn.Parameter(b.detach().clone())
    opt = FOGO([w, b], lr=0.01, memory=False, ns_dtype="float32")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=8)
    used, slow = [], torch.zeros(6, 5)
    for _ in range(6):
        m = opt.param_groups[0]["momentum"]
        used.append(m)
        gw, gb = torch.randn(6, 5), torch.randn(5)
        w.grad, b.grad = gw, gb.clone()
        ref = torch.optim.AdamW([b_ref], lr=opt.param_groups[0]["lr"], betas=(m, 0.999),
                                weight_decay=0.0, fused=True)  # fmt: skip
        if len(used) > 1:  # continue the reference from FOGO's AdamW state with this beta1
            ref.state[b_ref] = {k: v.clone() for k, v in opt.state[b].items()}
        b_ref.data.copy_(b.detach())
        b_ref.grad = gb.clone()
        opt.step()
        ref.step()
        slow = slow.lerp(gw, 1 - m)
        assert torch.equal(opt.state[w]["momentum_slow"], slow)
        assert torch.equal(b, b_ref)
        sched.step()
    assert len(set(used)) >= 4 and max(used) == 0.95 and min(used) < 0.86  # it really cycled
    assert opt.param_groups[0]["base_momentum"] == 0.85


def test_momentum_below_beta_fast_warns_once_and_is_used_as_given():
    w = nn.Parameter(torch.randn(4, 4))
    opt = FOGO([w], lr=0.01, memory=False, ns_dtype="float32", beta_fast=0.8)
    opt.param_groups[0]["momentum"] = 0.7  # as a scheduler would write it
    with pytest.warns(UserWarning, match="momentum 0.7 .* not above beta_fast 0.8"):
        w.grad = torch.ones(4, 4)
        opt.step()
    assert torch.allclose(opt.state[w]["momentum_slow"], torch.full((4, 4), 0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    opt.param_groups[0]["momentum"] = 1.5
    with pytest.raises(ValueError, match="Invalid momentum"):
        opt.step()


def test_newton_schulz_dtype_follows_the_device_type_and_is_recorded():
    from orthoptim.ops.newton_schulz import NS_DTYPE_BY_DEVICE, dtype_for_device

    assert dtype_for_device("cpu") == "float32" and dtype_for_device("meta") == "float32"
    assert NS_DTYPE_BY_DEVICE["cuda"] == "bfloat16" and dtype_for_device("cuda:1") == "bfloat16"
    w, v = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3, 3))
    opt = FOGO([w], lr=0.1)
    assert opt.defaults["ns_dtype"] == "auto" and opt.param_groups[0]["ns_dtype"] == "float32"
    opt.add_param_group({"params": [v], "ns_dtype": "bfloat16"})
    assert opt.param_groups[1]["ns_dtype"] == "bfloat16"  # an explicit choice stays
    assert opt.state_dict()["param_groups"][0]["ns_dtype"] == "float32"  # saved as it ran
    on = [types.SimpleNamespace(device=torch.device(d)) for d in ("cpu", "cuda:0")]
    # (no GPU here: the devices are stand-ins)
    assert _fogo_state.ns_dtype_for(on[1:]) == "bfloat16"
    with pytest.raises(ValueError, match="ns_dtype.*devices \\['cpu', 'cuda'\\]"):
        _fogo_state.ns_dtype_for(on)



def test_in_out_layout_protects_the_input_side_as_nn_linear_does():
    """A Conv1D stack with layout="in_out" follows the transposed nn.Linear stack step for
    step, memory writes and end_task included (the default layout would protect the wrong
    side); the layout is for 2-D parameters only."""
    torch.manual_seed(0)
    convs, linears = conv1d_and_linear_twins(12, 10, 3)
    hp = dict(lr=0.05, write_interval=3, **F64)
    opt_conv = FOGO([{"params": [convs[0].weight, convs[2].weight], "layout": "in_out"},
                     {"params": [convs[0].bias, convs[2].bias]}], **hp)  # fmt: skip
    opt_lin = FOGO([{"params": [linears[0].weight, linears[2].weight]},
                    {"params": [linears[0].bias, linears[2].bias]}], **hp)  # fmt: skip
    data = batches(8)
    train(convs, opt_conv, data, end_task_at=(4,))
    train(linears, opt_lin, data, end_task_at=(4,))
    for conv, lin in ((convs[0], linears[0]), (convs[2], linears[2])):
        assert torch.allclose(conv.weight.mT, lin.weight, atol=1e-12)
        book = opt_conv.state[conv.weight]["memory"]["basis"]
        assert book.shape[0] == conv.weight.shape[0]  # the input dimension
    assert opt_conv.memory_stats()["entries_used"] > 0
    with pytest.raises(ValueError, match="Invalid layout"):
        FOGO([{"params": [nn.Parameter(torch.zeros(2, 3, 4))], "layout": "in_out"}])
