"""Kronecker-factored protection (``protection="kronecker"``): the pure functions against brute
force, FOGO's batched path against the per-matrix reference, the whole step against a hand-made
one, the storage layouts, checkpoints and the memory-bytes report."""

import copy

import pytest
import torch
import torch.nn as nn
from ecosystem_models import conv1d_and_linear_twins

from orthoptim import FOGO, FOGOReference
from orthoptim.memory import kronecker

F64 = dict(ns_dtype="float64", memory_dtype="float64")


def add_grams(state, g):
    for name, new in kronecker.grams(state, g).items():
        state[name].copy_(new)


def test_consolidate_folds_normalised_grams_into_the_preconditioner():
    gen = torch.Generator().manual_seed(0)
    state = kronecker.init({"input": "full", "output": "full"}, 5, 4, "cpu")
    grams = {
        "input": torch.zeros(4, 4, dtype=torch.float64),
        "output": torch.zeros(5, 5, dtype=torch.float64),
    }
    precision = {
        "input": torch.eye(4, dtype=torch.float64),
        "output": torch.eye(5, dtype=torch.float64),
    }
    for task in range(2):
        for _ in range(3):
            g = torch.randn(5, 4, generator=gen, dtype=torch.float64)
            add_grams(state, g.float())
            grams["input"] += g.mT @ g
            grams["output"] += g @ g.mT
        kronecker.consolidate(state, kappa=3.0)
        for side, gram in grams.items():
            precision[side] += 3.0 * gram / (torch.trace(gram) / gram.shape[0])
            gram.zero_()
            expect = torch.linalg.inv(precision[side])
            assert torch.allclose(state[f"{side}_pre"].double(), expect, atol=1e-5), (task, side)
            assert not bool(state[f"{side}_acc"].any())
    u = torch.randn(5, 4, generator=gen)
    out = kronecker.apply(state, u)
    assert torch.allclose(out, state["output_pre"] @ u @ state["input_pre"], atol=1e-6)


def test_online_consolidation_is_a_forgetting_sum():
    gen = torch.Generator().manual_seed(1)
    state = kronecker.init({"input": "full"}, 3, 4, "cpu")
    precision = torch.eye(4, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        add_grams(state, g.float())
        kronecker.consolidate(state, kappa=0.5 * 10, decay=0.5)
        gram = g.mT @ g
        eye = torch.eye(4, dtype=torch.float64)
        precision = eye + 0.5 * (precision - eye) + 5 * gram / (torch.trace(gram) / 4)
        assert torch.allclose(state["input_pre"].double(), torch.linalg.inv(precision), atol=1e-5)


def test_batched_grams_and_apply_equal_one_matrix_at_a_time():
    gen = torch.Generator().manual_seed(2)
    sides = {"input": "full", "output": "diagonal"}
    g = torch.randn(3, 5, 4, generator=gen)
    one = [kronecker.init(sides, 5, 4, "cpu") for _ in range(3)]
    stacked = {k: torch.stack([s[k] for s in one]) for k in one[0]}
    new = kronecker.grams(stacked, g)
    for i, state in enumerate(one):
        add_grams(state, g[i])
        kronecker.consolidate(state, kappa=2.0)
        for name in ("input_acc", "output_acc"):
            assert torch.allclose(new[name][i], kronecker.grams(
                kronecker.init(sides, 5, 4, "cpu"), g[i])[name])  # fmt: skip
    pre = {k: torch.stack([s[k] for s in one]) for k in ("input_pre", "output_pre")}
    out = kronecker.apply(pre, g)
    for i, state in enumerate(one):
        assert torch.allclose(out[i], kronecker.apply(state, g[i]), atol=1e-6)


def test_layer_sides():
    assert kronecker.layer_sides(384, 128, "smaller") == {"input": "full"}
    assert kronecker.layer_sides(128, 512, "smaller") == {"output": "full"}
    assert kronecker.layer_sides(64, 64, "smaller") == {"input": "full"}
    assert kronecker.layer_sides(3, 4, "both") == {"input": "full", "output": "full"}
    assert kronecker.layer_sides(384, 128, "mixed") == {"input": "full", "output": "diagonal"}


def test_a_diagonal_side_damps_each_unit_by_its_normalised_energy():
    state = kronecker.init({"output": "diagonal"}, 3, 2, "cpu")
    add_grams(state, torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    kronecker.consolidate(state, kappa=2.0)
    rows = torch.tensor([1.0, 4.0, 0.0])
    expect = 1 / (1 + 2.0 * rows / rows.mean())
    assert torch.allclose(state["output_pre"], expect)
    u = torch.ones(3, 2)
    assert torch.allclose(kronecker.apply(state, u), expect[:, None] * u)


class Net(nn.Module):
    """A token embedding (AdamW), two hidden matrices of different shapes (FOGO) and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.fc1 = nn.Linear(6, 9)
        self.fc2 = nn.Linear(9, 9)
        self.fc3 = nn.Linear(9, 5)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(self.embed(x))))))


def groups(model):
    return [
        {"params": [model.fc1.weight, model.fc2.weight, model.fc3.weight]},
        {"params": [model.embed.weight, model.fc1.bias, model.fc2.bias, model.fc3.bias],
         "algorithm": "adamw"},
    ]  # fmt: skip


def data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 11, (24,), generator=gen), torch.randint(0, 5, (24,), generator=gen))
        for _ in range(n)
    ]


def train(model, opt, batches, end_task_at=()):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i in end_task_at:
            opt.end_task()


@pytest.mark.parametrize(
    "options", [dict(kron_sides="mixed"), dict(kron_sides="both", kron_online=0.5)]
)
def test_fogo_kronecker_equals_the_per_matrix_reference(options):
    runs = []
    for cls in (FOGO, FOGOReference):
        torch.manual_seed(0)
        model = Net().double()
        opt = cls(groups(model), lr=0.05, protection="kronecker", write_interval=3,
                  **F64, **options)  # fmt: skip
        train(model, opt, data(10), end_task_at=(4,))
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_fogo_kronecker_step_equals_the_hand_made_one():
    """Before ``end_task`` the preconditioners are the identity: plain FOGO. After
    it they are (I + kappa hat Gram)^-1 of the task's own gradients (collected here), and the
    next step is plain FOGO's direction damped by them and rescaled (matrices), or AdamW's step
    damped by them (the embedding)."""
    twins = PlainAndProtected(protection="kronecker", kron_sides="both")
    grads, protected, opt = twins.grads, twins.protected, twins.opt
    pres = {}
    for name, p in protected.named_parameters():
        if p.ndim < 2:
            continue
        a = sum(g.mT @ g for g in grads[name])
        s = sum(g @ g.mT for g in grads[name])
        a, s = a / (torch.trace(a) / a.shape[0]), s / (torch.trace(s) / s.shape[0])
        pres[name] = (torch.linalg.inv(torch.eye(len(s), dtype=s.dtype) + 10 * s),
                      torch.linalg.inv(torch.eye(len(a), dtype=a.dtype) + 10 * a))  # fmt: skip
        state = opt.state[p]["kron"]
        assert torch.allclose(state["output_pre"].double(), pres[name][0], atol=1e-6)
        assert torch.allclose(state["input_pre"].double(), pres[name][1], atol=1e-6)
    twins.check_next_step(pres)


class PlainAndProtected:
    """Plain FOGO (memory off) and the Kronecker-protected one (``options``) from the same
    start, 4 steps on the same batches (equal: the preconditioners are the identity), then
    ``end_task``; ``grads``: the protected model's gradients by parameter name."""

    def __init__(self, **options):
        torch.manual_seed(0)
        self.plain, self.protected = Net().double(), Net().double()
        self.protected.load_state_dict(self.plain.state_dict())
        self.opt_plain = FOGO(groups(self.plain), lr=0.05, memory=False, **F64)
        self.opt = FOGO(groups(self.protected), lr=0.05, **options, **F64)
        self.grads = {name: [] for name, _ in self.protected.named_parameters()}
        for x, y in data(4):
            self._step(x, y)
            for name, p in self.protected.named_parameters():
                self.grads[name].append(p.grad.clone())
            for a, b in zip(self.plain.parameters(), self.protected.parameters(), strict=True):
                assert torch.allclose(a, b, rtol=0, atol=1e-15)  # AdamW's W_0 + (W - W_0)
        self.opt.end_task()

    def _step(self, x, y):
        for model, o in ((self.plain, self.opt_plain), (self.protected, self.opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()

    def check_next_step(self, pres):
        """The next step of every parameter in ``pres`` (``name: (output-side, input-side
        preconditioner)``) is plain FOGO's direction damped by them and rescaled (matrices),
        or AdamW's step damped by them (the embedding); the others' is plain."""
        named = dict(self.protected.named_parameters())
        before = {name: p.detach().clone() for name, p in named.items()}
        self._step(*data(1, seed=1)[0])
        for (name, p), q in zip(named.items(), self.plain.parameters(), strict=True):
            step = q.detach() - before[name]  # plain FOGO's (or AdamW's) step from there
            if name in pres:
                out_pre, in_pre = (t.float().double() for t in pres[name])
                damped = out_pre @ step @ in_pre
                if name != "embed.weight":  # FOGO: the RMS scale restores the step's size
                    damped = damped * step.norm() / damped.norm()
                step = damped
            assert torch.allclose(p.detach() - before[name], step, atol=1e-6, rtol=1e-4), name



@pytest.mark.parametrize("kron_sides", ["smaller", "mixed", "input"])
def test_in_out_layout_protects_the_same_sides_as_nn_linear(kron_sides):
    """With layout="in_out" a Conv1D stack follows the transposed nn.Linear stack (the
    "smaller" side is the layer's smaller side, whatever the storage)."""
    torch.manual_seed(0)
    convs, linears = conv1d_and_linear_twins(5, 16, 3)
    hp = dict(lr=0.05, protection="kronecker", kron_sides=kron_sides, **F64)
    opt_conv = FOGO([{"params": [convs[0].weight, convs[2].weight], "layout": "in_out"},
                     {"params": [convs[0].bias, convs[2].bias]}], **hp)  # fmt: skip
    opt_lin = FOGO(linears.parameters(), **hp)
    gen = torch.Generator().manual_seed(0)
    for i in range(8):
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=gen)
        for model, o in ((convs, opt_conv), (linears, opt_lin)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
            if i == 3:
                o.end_task()
    for conv, lin in ((convs[0], linears[0]), (convs[2], linears[2])):
        assert torch.allclose(conv.weight.mT, lin.weight, atol=1e-10)
    small = opt_conv.state[convs[0].weight]["kron"]
    if kron_sides == "smaller":  # the layer's 5 inputs, stored as rows
        assert set(small) == {"output_acc", "output_pre"} and small["output_pre"].shape == (5, 5)


def test_checkpoint_round_trip_and_memory_bytes():
    torch.manual_seed(0)
    model = Net().double()
    hp = dict(lr=0.05, protection="kronecker", kron_sides="mixed", **F64)
    opt = FOGO(groups(model), **hp)
    train(model, opt, data(5), end_task_at=(2,))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())
    kron = [opt.state[p]["kron"] for p in model.parameters() if p.ndim == 2]
    assert len(kron) == 4 and all(t.dtype == torch.float32 for k in kron for t in k.values())
    stats = opt.memory_stats()
    assert stats["matrices"] == 4
    assert stats["memory_bytes"] == sum(t.numel() * 4 for k in kron for t in k.values())
    train(model, opt, data(3, seed=2))
    opt_twin = assert_resumes_like(model, saved_model, saved, lambda g: FOGO(g, **hp))
    assert opt_twin.state[opt_twin.param_groups[0]["params"][0]]["kron"]["input_pre"].dtype == (
        torch.float32
    )


def assert_resumes_like(model, saved_model, saved, make_opt):
    """A fresh ``Net`` and optimizer (``make_opt(param groups)``) loaded from the checkpoint
    train the next 3 batches exactly as ``model`` did; returns the optimizer."""
    twin = Net().double()
    twin.load_state_dict(saved_model)
    opt = make_opt(groups(twin))
    opt.load_state_dict(copy.deepcopy(saved))  # torch's load may share the saved tensors
    train(twin, opt, data(3, seed=2))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    return opt


def test_invalid_kronecker_settings_raise():
    w = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="protection"):
        FOGO([w], protection="fisher")
    with pytest.raises(ValueError, match="kron_sides"):
        FOGO([w], protection="kronecker", kron_sides="left")
    with pytest.raises(ValueError, match="kron_online"):
        FOGO([w], protection="kronecker", kron_online=1.0)
    with pytest.raises(ValueError, match="kron_strength"):
        FOGO([w], protection="kronecker", kron_strength=0.0)


def test_a_dropped_step_leaves_the_kronecker_state_and_parameters_untouched():
    torch.manual_seed(0)
    model = Net().double()
    opt = FOGO(groups(model), lr=0.05, protection="kronecker", kron_sides="mixed", **F64)
    train(model, opt, data(3), end_task_at=(1,))
    before = copy.deepcopy(opt.state_dict()["state"])
    params = [p.detach().clone() for p in model.parameters()]
    x, y = data(1, seed=3)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc2.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(params, model.parameters(), strict=True):
        assert torch.equal(a, b)
    after = opt.state_dict()["state"]
    for key, state in before.items():
        for name, t in state.get("kron", {}).items():
            assert torch.equal(t, after[key]["kron"][name]), (key, name)


def test_kronecker_is_refused_under_data_parallel_sharding(monkeypatch):
    from orthoptim.optim import _fogo_shard

    fake = _fogo_shard.Sharding(None, 0, 2, False, False)
    monkeypatch.setattr(_fogo_shard, "sharding_for", lambda *args: fake)
    with pytest.raises(ValueError, match="Invalid protection: 'kronecker' with data-parallel"):
        FOGO([nn.Parameter(torch.zeros(3, 4))], protection="kronecker")


# ------------------------------------------------------------------ shared factors (kron_share)
SHARED = dict(protection="kronecker", kron_share="model")


@pytest.mark.parametrize(
    "options", [dict(), dict(kron_sides="both"), dict(kron_detect=1.5)], ids=str
)
def test_shared_factors_equal_the_per_matrix_reference(options):
    """The batched shared factor (one Gram sum per bucket) against the reference, which adds
    each matrix's Gram one at a time (float32 sums in another order: 1e-6)."""
    runs = []
    for cls in (FOGO, FOGOReference):
        torch.manual_seed(0)
        model = Net().double()
        opt = cls(groups(model), lr=0.05, **SHARED, **F64, **options)
        train(model, opt, data(10), end_task_at=(4,))
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_shared_factor_is_the_normalised_sum_of_every_sides_grams():
    """Brute force: with kron_sides="both" the embedding's 6 features and fc1's 6 inputs share
    one factor, fc1's 9 outputs, both sides of fc2 and fc3's 9 inputs another; after
    ``end_task`` each shared preconditioner is (I + kappa hat(sum of the sides' Grams))^-1,
    only the first parameter of each factor holds it, and the next step of every member is
    plain FOGO's (or AdamW's) step damped by it."""
    twins = PlainAndProtected(kron_sides="both", **SHARED)
    grads, protected, opt = twins.grads, twins.protected, twins.opt
    gram = {name: (sum(g.mT @ g for g in gs), sum(g @ g.mT for g in gs))
            for name, gs in grads.items() if gs[0].ndim == 2}  # fmt: skip
    sums = {6: gram["fc1.weight"][0] + gram["embed.weight"][0],
            9: gram["fc1.weight"][1] + gram["fc2.weight"][0] + gram["fc2.weight"][1]
            + gram["fc3.weight"][0],
            5: gram["fc3.weight"][1], 11: gram["embed.weight"][1]}  # fmt: skip
    pre = {}
    for d, a in sums.items():
        pre[d] = torch.linalg.inv(torch.eye(d, dtype=a.dtype) + 10 * a / (torch.trace(a) / d))
    kron = {name: opt.state[p]["kron"] for name, p in protected.named_parameters() if p.ndim == 2}
    assert set(kron["fc1.weight"]) == {"input_acc", "input_pre", "output_acc", "output_pre"}
    assert kron["fc2.weight"] == {}  # both its sides are fc1's output factor
    assert set(kron["embed.weight"]) == {"output_acc", "output_pre"}  # its 11 token rows
    assert set(kron["fc3.weight"]) == {"output_acc", "output_pre"}  # its 5 outputs
    assert torch.allclose(kron["fc1.weight"]["input_pre"].double(), pre[6], atol=1e-6)
    assert torch.allclose(kron["fc1.weight"]["output_pre"].double(), pre[9], atol=1e-6)
    assert torch.allclose(kron["fc3.weight"]["output_pre"].double(), pre[5], atol=1e-6)
    assert torch.allclose(kron["embed.weight"]["output_pre"].double(), pre[11], atol=1e-6)
    twins.check_next_step({
        "fc1.weight": (pre[9], pre[6]), "fc2.weight": (pre[9], pre[9]),
        "fc3.weight": (pre[5], pre[9]), "embed.weight": (pre[11], pre[6]),
    })  # fmt: skip


def test_detect_step_folds_the_gram_before_the_jump():
    """Brute force of the boundary detector: a task of steady energy, then a jump to 3x: no
    fold before MIN_STRETCH steps, then, at the start of the jump step, exactly the Gram
    gathered before it is folded and the running Gram restarts (the step's own Gram is added
    after); the energy decaying after it does not fire."""
    gen = torch.Generator().manual_seed(4)
    d, kappa = 4, 10.0
    state = {"acc": torch.zeros(d, d), "pre": torch.eye(d), "energy": torch.zeros(2),
             "since": torch.zeros(())}  # fmt: skip
    old, folds = torch.zeros(d, d, dtype=torch.float64), []
    energies = [1.0] * 70 + [3.0] + [2.5 - 0.02 * k for k in range(40)]
    early = [1.0] * 10 + [5.0]  # a jump in the first MIN_STRETCH steps does not fold
    for k, level in enumerate(early + energies):
        g = torch.randn(3, d, generator=gen, dtype=torch.float64)
        g = g * (level / g.square().sum()).sqrt()
        step = g.mT @ g
        pre_before = state["pre"].clone()
        state = kronecker.detect_step(state["acc"], state["pre"], g.square().sum().float(),
                                      state["energy"], state["since"], kappa, 1.5)  # fmt: skip
        if not torch.equal(state["pre"], pre_before):
            folds.append(k)
            expect = torch.linalg.inv(torch.eye(d, dtype=torch.float64)
                                      + kappa * old / (torch.trace(old) / d))  # fmt: skip
            assert torch.allclose(state["pre"].double(), expect, atol=1e-5)
            assert not bool(state["acc"].any())
            old = torch.zeros_like(old)
        state["acc"] = state["acc"] + step.float()  # the members' Grams, after the test
        old = old + step
    assert folds == [len(early) + 70]
    assert kronecker.MIN_STRETCH == 50 and float(state["since"]) == 41  # the jump step, 40 more


def test_shared_factors_round_trip():
    torch.manual_seed(0)
    model = Net().double()
    hp = dict(lr=0.05, kron_detect=1.5, **SHARED, **F64)
    opt = FOGO(groups(model), **hp)
    train(model, opt, data(5), end_task_at=(2,))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())
    stats = opt.memory_stats()
    held = [t for p in model.parameters() for t in opt.state[p].get("kron", {}).values()]
    assert stats["memory_bytes"] == sum(t.numel() * t.element_size() for t in held)
    train(model, opt, data(3, seed=2))
    assert_resumes_like(model, saved_model, saved, lambda g: FOGO(g, **hp))
    # As in torch, the saved groups' settings win: a per-matrix optimizer loads the sharing.
    per_matrix = assert_resumes_like(model, saved_model, saved, lambda g: FOGO(
        g, lr=0.05, protection="kronecker", **F64))  # fmt: skip
    assert per_matrix.param_groups[0]["kron_share"] == "model"


def test_invalid_shared_settings_raise():
    w = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="kron_share"):
        FOGO([w], protection="kronecker", kron_share="layer")
    with pytest.raises(ValueError, match="kron_detect"):
        FOGO([w], **SHARED, kron_detect=1.0)
    with pytest.raises(ValueError, match="kron_detect"):
        FOGO([w], **SHARED, kron_detect=-1.0)
    with pytest.raises(ValueError, match="kron_detect: 1.5 needs shared factors"):
        FOGO([w], protection="kronecker", kron_detect=1.5)
    with pytest.raises(ValueError, match="kron_online"):
        FOGO([w], **SHARED, kron_online=0.5)


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan"])
def test_boundary_detection_reads_nothing_on_the_host(poisoned):
    """kron_detect's test and fold run on the device every step: a steady step (finite, or
    dropped for a NaN) reads no tensor value on the host; a dropped step changes nothing."""
    from test_conformance import HostReads

    torch.manual_seed(0)
    model = Net()
    opt = FOGO(groups(model), lr=0.05, kron_detect=1.5, write_interval=0, **SHARED)
    batches = data(4)
    train(model, opt, batches[:3])
    before = copy.deepcopy(opt.state_dict()["state"])
    x, y = batches[3]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if poisoned:
        model.fc2.weight.grad[0, 0] = float("nan")
    with HostReads() as reads:
        opt.step()
    assert reads.count == 0, reads.seen
    if poisoned:
        after = opt.state_dict()["state"]
        for key, state in before.items():
            for name, t in state.get("kron", {}).items():
                assert torch.equal(t, after[key]["kron"][name]), (key, name)
