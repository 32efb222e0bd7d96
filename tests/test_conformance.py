"""Conformance suite: shared behaviour tests driven by the table in tests/optimizer_table.py.

Optimizer-specific math lives in test_fogo.py / test_kfac.py / test_fop.py; this file checks the
behaviour every orthoptim optimizer must share (docs/reliability.md lists it per optimizer).
"""

from __future__ import annotations

import collections
import copy
import os
import pathlib
import random
import subprocess
import sys

import pytest
import torch
from optimizer_table import BY_ID, D_IN, OPTIMIZERS, PRIMARY, batches, tiny_model, train_step
from torch.utils._python_dispatch import TorchDispatchMode

from orthoptim import FOGOReference
from orthoptim.optim import _nonfinite

IDS = [info.id for info in OPTIMIZERS]
# State that keeps its own dtype (documented): step counters, FOGO's codebook (bf16 bases,
# bool/int64 metadata), its float32 gradient sketch and statistics.
OWN_DTYPE = ("step", "memory", "last_stats", "grad_sketch", "row_energy", "last_profile")


def flatten(obj, prefix=""):
    """``{path: leaf}`` of a nested state (dicts, lists, tuples, tensors, scalars)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def assert_identical(a, b):
    """Bit-for-bit equality of two nested states (same keys, dtypes, values)."""
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for key, va in fa.items():
        vb = fb[key]
        if isinstance(va, torch.Tensor):
            assert isinstance(vb, torch.Tensor) and va.dtype == vb.dtype, key
            assert va.shape == vb.shape and torch.equal(va, vb), key
        else:
            assert va == vb or (va != va and vb != vb), key


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------ non-finite gradients
def _poison(rng: random.Random):
    value = rng.choice([float("nan"), float("inf"), float("-inf")])

    def corrupt(model):
        params = [p for p in model.parameters() if p.grad is not None]
        p = rng.choice(params)
        p.grad.view(-1)[rng.randrange(p.numel())] = value

    return corrupt


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_nan_injection_equals_run_without_those_steps(info):
    """Acceptance: 200 steps, NaN/inf injected at random steps, skip policy: final parameters and
    state equal, bit for bit, the run in which those steps were never taken."""
    steps = 200
    data = batches(steps)
    rng = random.Random(info.id)
    bad = set(rng.sample(range(steps), 20)) | {0, 1, steps - 1}  # incl. before state exists
    model, ref_model = tiny_model(), tiny_model()
    opt, ref = info.make(model), info.make(ref_model)
    for i, (x, y) in enumerate(data):
        train_step(info, opt, model, x, y, corrupt=_poison(rng) if i in bad else None)
        if i not in bad:
            train_step(info, ref, ref_model, x, y)
    assert opt.skipped_steps == len(bad) and ref.skipped_steps == 0
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_identical(opt.state_dict()["state"], ref.state_dict()["state"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_nonfinite_raise_policy_names_the_parameter_and_changes_nothing(info):
    model = tiny_model()
    opt = info.make(model, nonfinite="raise")
    x, y = batches(1)[0]
    train_step(info, opt, model, x, y)
    before, state = params_of(model), opt.state_dict()

    def corrupt(m):
        m[2].weight.grad[0, 0] = float("nan")

    with pytest.raises(_nonfinite.NonFiniteGradientError, match=r"2\.weight"):
        train_step(info, opt, model, x, y, corrupt=corrupt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert_identical(state["state"], opt.state_dict()["state"])
    assert isinstance(_nonfinite.NonFiniteGradientError("x"), FloatingPointError)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_nonfinite_proceed_policy_lets_nan_through_without_counting(info):
    model = tiny_model()
    opt = info.make(model, nonfinite="proceed")
    x, y = batches(1)[0]

    def corrupt(m):
        m[0].bias.grad.fill_(float("nan"))

    before = params_of(model)
    train_step(info, opt, model, x, y, corrupt=corrupt)
    assert opt.skipped_steps == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    if not info.two_pass:  # two-pass FOP preconditions its own clean halves, not p.grad
        assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_skipped_steps_counter_is_saved_and_restored(info):
    """The count travels in every saved param group (where torch.distributed.checkpoint carries
    it), is restored on load and kept out of the live groups; the policy is the constructor's."""
    model = tiny_model()
    opt = info.make(model)
    x, y = batches(1)[0]

    def corrupt(m):
        m[0].weight.grad[1, 1] = float("inf")

    train_step(info, opt, model, x, y, corrupt=corrupt)
    train_step(info, opt, model, x, y)
    assert opt.skipped_steps == 1
    sd = opt.state_dict()
    saved = sd["param_groups"][0][_nonfinite.GROUP_KEY]
    assert saved.tolist() == [1, 0, 1]  # skipped in all, current run, longest run
    assert all(g[_nonfinite.GROUP_KEY] is saved for g in opt.param_groups)  # live, shared
    fresh_model = tiny_model()
    fresh = info.make(fresh_model, nonfinite="raise")
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 1 and fresh.nonfinite == "raise"  # policy: the constructor's
    assert all(g[_nonfinite.GROUP_KEY] is fresh._nonfinite_counters.counts
               for g in fresh.param_groups)  # fmt: skip
    again_model = tiny_model()
    again = info.make(again_model)
    again.load_state_dict(sd)
    train_step(info, again, again_model, x, y, corrupt=corrupt)  # it counts on from there
    assert again.skipped_steps == 2 and saved.tolist() == [1, 0, 1]  # the caller's dict as it was
    bad = copy.deepcopy(sd)
    for g in bad["param_groups"]:
        g[_nonfinite.GROUP_KEY] = torch.tensor([-1, 0, 0])
    with pytest.raises(ValueError, match=_nonfinite.GROUP_KEY):
        info.make(tiny_model()).load_state_dict(bad)


def test_finiteness_check_is_one_pass_per_tensor_and_no_host_sync(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(6)]
    params += [torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(params, lr=0.1)
    _nonfinite.install(opt, "skip")
    aminmax = torch.aminmax
    calls = []
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or aminmax(*a, **k))
    with HostReads() as reads:
        guard = _nonfinite.begin_step(opt)
    assert len(calls) == 9 and reads.count == 0  # one pass per gradient, nothing read on the host
    assert guard.found_inf.dtype == torch.float32 and float(guard.found_inf) == 0.0
    for value in (float("nan"), float("inf"), -float("inf")):
        for i in (4, 7):  # a float32 and a float64 gradient
            before = params[i].grad[0].clone()
            params[i].grad[0] = value
            assert float(_nonfinite.begin_step(opt).found_inf) == 1.0, (value, i)
            params[i].grad[0] = before
    assert float(_nonfinite.begin_step(opt).found_inf) == 0.0
    assert opt._nonfinite_counters.total() == 6


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host inside the block: every ``item()`` /
    ``bool()`` / ``int()`` / ``float()`` (aten ``_local_scalar_dense``, which is what syncs with a
    device) and ``tolist()`` (which reads memory directly), step counters included."""

    def __init__(self):
        super().__init__()
        self.count, self.seen = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
            self.seen.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(t):
            self.count += 1
            self.seen.append(("tolist", tuple(t.shape)))
            return self._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


STEADY = [  # memory on (a write every 50 steps), factors and inverses every 10 steps
    ("FOGO", dict(write_interval=50)),
    ("FOGO-sign-output-slow", dict(write_interval=50)),
    ("KFAC", dict(factor_interval=10, inverse_interval=10)),
    ("KFAC-mc-adamw-tikhonov", dict(factor_interval=10, inverse_interval=10)),
    ("FOP", dict(factor_interval=10, inverse_interval=10)),
    ("FOP-mc-two-pass", dict(factor_interval=10, inverse_interval=10)),
]


@pytest.mark.parametrize("ident,over", STEADY, ids=[i for i, _ in STEADY])
@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan"])
def test_steady_state_step_reads_nothing_on_the_host(ident, over, poisoned):
    """Acceptance (speed issue): a step that is not a memory write, a factor or an inverse
    update reads no tensor value on the host (nothing that would sync with a device), also
    when its gradients are NaN and it is dropped."""
    info = BY_ID[ident]
    model = tiny_model()
    opt = info.make(model, **over)
    data = batches(4)
    for x, y in data[:3]:  # state exists, inverses computed, first write not due
        train_step(info, opt, model, x, y)
    if info.kwargs.get("fisher") == "mc":  # sampling is a factor-step event; not this step
        assert not opt._is_factor_step()
    with HostReads() as reads:
        train_step(info, opt, model, *data[3], corrupt=_nan_grad if poisoned else None)
    assert reads.count == 0, reads.seen
    assert opt.skipped_steps == int(poisoned)


@pytest.mark.parametrize("ident", ["FOGO", "KFAC"])
@pytest.mark.parametrize("streak", [99, 150])
def test_warning_after_a_long_run_of_skipped_steps(ident, streak):
    """The device counters are read back every CHECK_EVERY (100) steps; a run of CHECK_EVERY or
    more consecutive skipped steps is then reported once, with its length and the total."""
    import warnings

    assert _nonfinite.CHECK_EVERY == 100
    info = BY_ID[ident]
    model = tiny_model()
    opt = info.make(model)
    data = batches(1)
    bad = range(10, 10 + streak)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(250):
            train_step(info, opt, model, *data[0], corrupt=_nan_grad if i in bad else None)
    found = [str(w.message) for w in caught if "consecutive" in str(w.message)]
    if streak < 100:
        assert found == []
    else:
        assert len(found) == 1 and f"a run of {streak} consecutive" in found[0], found
        assert f"{streak} skipped in all" in found[0]
    assert opt.skipped_steps == streak


# ------------------------------------------------------------------------ construction validation
INVALID = [(info, case) for info in PRIMARY for case in info.invalid]


@pytest.mark.parametrize("info,case", INVALID, ids=[f"{i.id}-{c[0]}={c[1]!r}" for i, c in INVALID])
def test_invalid_hyperparameter_raises_value_error_naming_it(info, case):
    name, value = case[0], case[1]
    shown = case[2] if len(case) > 2 else repr(value)
    with pytest.raises(ValueError) as err:
        info.make(tiny_model(), **{name: value})
    assert name in str(err.value) and shown in str(err.value), str(err.value)


@pytest.mark.parametrize("info", PRIMARY, ids=lambda i: i.id)
def test_unknown_keys_are_rejected(info):
    model = tiny_model()
    with pytest.raises(TypeError, match="lr_decay"):  # a constructor keyword typo
        info.make(model, lr_decay=0.1)
    opt = info.make(model)
    extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="moomentum"):  # a param-group key typo
        opt.add_param_group({"params": [extra], "param_names": ["extra"], "moomentum": 0.9})
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [extra], "param_names": ["extra"], "weight_decay": -1.0})
    assert len(opt.param_groups) == 1
    if not info.model_based:
        with pytest.raises(ValueError, match="beta_sloww"):
            info.make_params([{"params": list(model.parameters()), "beta_sloww": 0.9}])


@pytest.mark.parametrize("info", PRIMARY, ids=lambda i: i.id)
def test_model_based_optimizers_take_the_model_or_its_parameters(info):
    """K-FAC / FOP take the model or an iterable of its parameters (the layers are then found on
    the first forward; tests/test_kfac_integration.py checks both train identically); a bare
    tensor is neither."""
    if not info.model_based:
        pytest.skip("param-based: takes tensors")
    with pytest.raises(ValueError, match="params"):
        info.cls(torch.nn.Parameter(torch.zeros(2, 2)))
    model = tiny_model()
    opt = info.make_params(model.parameters())
    train_step(info, opt, model, *batches(1)[0])
    assert len(opt._blocks) == 2


# ------------------------------------------------------------------------ param groups & grads
def _changed(before, model):
    return [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_param_groups_with_different_hyperparameters(info):
    """A group with lr=0 keeps its parameters; the other group moves. KFAC/FOP: the model is
    group 0 (its curvature settings are read from it); an extra group takes the plain update."""
    model = tiny_model()
    x, y = batches(1)[0]
    if info.model_based:
        opt = info.make(model)
        extra = torch.nn.Parameter(torch.ones(3))
        opt.add_param_group(
            {"params": [extra], "param_names": ["extra"], "lr": 0.0, "weight_decay": 0.0}
        )
        before = params_of(model) + [extra.detach().clone()]
        extra.grad = torch.ones(3)
        out = model(x) + extra
        opt.zero_grad(set_to_none=False)
        opt.sample_fisher(out)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        assert torch.equal(extra, before[-1]) and all(_changed(before[:-1], model))
    else:
        layers = list(model.parameters())
        opt = info.make_params(
            [{"params": layers[:2], "lr": 0.0, "weight_decay": 0.0},
             {"params": layers[2:], "beta_slow": 0.95, "algorithm": "adamw"}]
        )  # fmt: skip
        before = params_of(model)
        train_step(info, opt, model, x, y)
        assert _changed(before, model) == [False, False, True, True]
        assert "exp_avg" in opt.state[layers[2]]  # the group's algorithm choice is honoured


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_parameters_without_gradients_and_frozen_layers(info):
    model = tiny_model()
    model[0].requires_grad_(False)  # frozen layer
    opt = info.make(model)
    before = params_of(model)
    x, y = batches(1)[0]

    def drop_bias_grad(m):
        m[2].bias.grad = None  # a parameter without gradient

    for _ in range(3):
        train_step(info, opt, model, x, y, corrupt=drop_bias_grad)
    assert _changed(before, model) == [False, False, True, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_non_contiguous_parameters_match_contiguous(info):
    runs = []
    for non_contiguous in (False, True):
        model = tiny_model()
        if non_contiguous:
            w = model[0].weight.detach()
            model[0].weight = torch.nn.Parameter(w.t().contiguous().t())
            assert not model[0].weight.is_contiguous()
        opt = info.make(model)
        for x, y in batches(4):
            train_step(info, opt, model, x, y)
        runs.append(params_of(model))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class WithExtra(torch.nn.Module):
    """The tiny model plus an extra module whose output is added (as a scalar) to the logits."""

    def __init__(self, extra):
        super().__init__()
        self.net, self.extra = tiny_model(), extra

    def forward(self, x, idx=None):
        side = self.extra(x if idx is None else idx).sum()
        return self.net(x) + side


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_zero_size_parameters(info):
    model = WithExtra(torch.nn.Linear(D_IN, 0).double())  # a zero-width layer
    opt = info.make(model)
    before = params_of(model)
    for x, y in batches(3):
        out = model(x)
        opt.zero_grad()
        if info.model_based:
            opt.sample_fisher(out)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
    assert all(_changed(before, model)[:4])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_closure_returns_the_loss_and_matches_the_plain_step(info):
    if info.two_pass:
        pytest.skip("two-pass FOP computes its gradients in backward_two_pass, not a closure")
    runs = []
    for use_closure in (False, True):
        model = tiny_model()
        opt = info.make(model)
        for x, y in batches(4):
            if use_closure:

                def closure(x=x, y=y, model=model, opt=opt):
                    out = model(x)
                    opt.zero_grad()
                    if info.model_based:
                        opt.sample_fisher(out)
                    loss = torch.nn.functional.cross_entropy(out, y)
                    loss.backward()
                    return loss

                loss = opt.step(closure)
                assert isinstance(loss, torch.Tensor) and loss.ndim == 0
            else:
                train_step(info, opt, model, x, y)
        runs.append(params_of(model))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_lr_scheduler_and_tensor_lr(info):
    model = tiny_model()
    opt = info.make(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    data = batches(3)
    train_step(info, opt, model, *data[0])
    sched.step()
    if not info.model_based:  # decoupled weight decay also scales with lr
        before = params_of(model)
        train_step(info, opt, model, *data[1])
        assert not any(_changed(before, model))
    runs = []
    for lr in (info.kwargs["lr"], torch.tensor(info.kwargs["lr"], dtype=torch.float64)):
        model = tiny_model()
        opt = info.make(model, lr=lr)
        for x, y in data:
            train_step(info, opt, model, x, y)
        runs.append(params_of(model))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_dtypes_state_follows_the_parameters(info, dtype):
    if info.cls is FOGOReference and dtype == torch.bfloat16:
        pytest.skip("FOGOReference is a float32/float64 test oracle (pinv has no bf16 kernel)")
    model = tiny_model(dtype=dtype)
    opt = info.make(model)
    before = params_of(model)
    for x, y in batches(5, dtype=dtype):
        train_step(info, opt, model, x, y)
    assert all(_changed(before, model))
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for name, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and name not in OWN_DTYPE:
                assert value.dtype == dtype, name
            for t in flatten(value).values():
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    assert torch.isfinite(t).all(), name


# ------------------------------------------------------------------------ copies, repr, hooks
@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_deepcopy_trains_identically_and_repr_names_the_settings(info):
    model = tiny_model()
    opt = info.make(model)
    data = batches(6)
    for x, y in data[:3]:
        train_step(info, opt, model, x, y)
    model2, opt2 = copy.deepcopy((model, opt))
    for x, y in data[3:]:
        train_step(info, opt, model, x, y)
        train_step(info, opt2, model2, x, y)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_identical(opt.state_dict(), opt2.state_dict())
    text = repr(opt)
    assert type(opt).__name__ in text and "lr" in text


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_user_state_dict_hooks_run(info):
    model = tiny_model()
    opt = info.make(model)
    train_step(info, opt, model, *batches(1)[0])
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "user": 7})
    sd = opt.state_dict()
    assert sd["user"] == 7 and _nonfinite.GROUP_KEY in sd["param_groups"][0]
    assert seen == ["save-pre"]
    fresh = info.make(tiny_model())
    fresh.register_load_state_dict_pre_hook(lambda o, sd: seen.append(sd["user"]))
    fresh.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    fresh.load_state_dict(sd)
    assert seen == ["save-pre", 7, "load-post"]


# ------------------------------------------------------------------------ unsupported input
@pytest.mark.parametrize("info", PRIMARY, ids=lambda i: i.id)
def test_sparse_gradients_and_complex_parameters_give_a_clear_error(info):
    model = WithExtra(torch.nn.Embedding(5, 3, sparse=True).double())
    opt = info.make(model)
    x, y = batches(1)[0]
    out = model(x, idx=torch.tensor([1, 2]))
    torch.nn.functional.cross_entropy(out, y).backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    cmodel = torch.nn.Linear(3, 2).to(torch.complex64)
    copt = info.make(cmodel) if info.model_based else info.make_params(cmodel.parameters())
    cmodel(torch.randn(4, 3, dtype=torch.complex64)).abs().sum().backward()
    with pytest.raises(RuntimeError, match="complex parameters"):
        copt.step()


def test_unsupported_layers_get_the_plain_outer_update_and_are_named():
    """Layers K-FAC cannot precondition (here a grouped conv with padding='same') get the plain
    outer update of p.grad, never an approximate Kronecker factor, and the warning names them."""
    from orthoptim import KFAC
    from orthoptim.optim.kfac import PlainUpdateWarning

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, groups=2, padding="same").double()
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(32, 3).double())
    with pytest.warns(PlainUpdateWarning, match=r"0\.weight: grouped convolution"):
        opt = KFAC(model, lr=0.1, momentum=0.0, max_grad_norm=None, factor_interval=1)
    assert [b.name for b in opt._blocks] == ["2.weight"]
    ref = copy.deepcopy(model)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for m, o in ((model, opt), (ref, sgd)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(conv.parameters(), ref[0].parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ exact resume
RESUME_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from optimizer_table import BY_ID, batches, tiny_model, train_step
k, n = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(12345)  # another global RNG state must not matter
for ident, path in zip(sys.argv[4::2], sys.argv[5::2]):
    info = BY_ID[ident]
    saved = torch.load(path, weights_only=True)
    model = tiny_model(seed=7)  # fresh weights, overwritten by the checkpoint
    model.load_state_dict(saved["model"])
    opt = info.make(model, seed=99) if "seed" in info.kwargs else info.make(model)
    opt.load_state_dict(saved["opt"])
    for x, y in batches(n)[k:]:
        train_step(info, opt, model, x, y)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path + ".out")
"""
RESUME_K, RESUME_N = 5, 12


def _nan_grad(m):
    m[0].weight.grad.fill_(float("nan"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Per optimizer: the uninterrupted run, and the run resumed from step k in ONE fresh
    process (started once for all optimizers to keep the suite fast)."""
    root = tmp_path_factory.mktemp("resume")
    data, runs, args = batches(RESUME_N), {}, []
    for info in OPTIMIZERS:
        model = tiny_model()
        opt = info.make(model)
        path = root / f"{info.id}.pt"
        for i, (x, y) in enumerate(data):
            if i == RESUME_K:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
            train_step(info, opt, model, x, y, corrupt=_nan_grad if i == 2 else None)
        runs[info.id] = (model, opt, path)
        args += [info.id, str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tests_dir = str(pathlib.Path(__file__).parent)
    cmd = [sys.executable, "-c", RESUME_SCRIPT, tests_dir, str(RESUME_K), str(RESUME_N), *args]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    return runs


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_exact_resume_in_a_fresh_process(info, resumed):
    """Save at step k (torch.save), load with weights_only=True in a new process into a fresh
    model and optimizer (other seed, other global RNG), continue: parameters and state equal
    the uninterrupted run bit for bit (one NaN step skipped before k: the counter resumes too)."""
    model, opt, path = resumed[info.id]
    out = torch.load(str(path) + ".out", weights_only=True)
    assert_identical(out["model"], model.state_dict())
    assert_identical(out["opt"], opt.state_dict())
    assert out["opt"]["param_groups"][0][_nonfinite.GROUP_KEY][0] == 1


# ------------------------------------------------------------------------ loading elsewhere
@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_loading_onto_another_dtype_reconciles_state(info):
    model = tiny_model(dtype=torch.float32)
    opt = info.make(model)
    for x, y in batches(4, dtype=torch.float32):
        train_step(info, opt, model, x, y)
    model64 = tiny_model(seed=3, dtype=torch.float64)
    model64.load_state_dict(model.state_dict())
    opt64 = info.make(model64)
    opt64.load_state_dict(opt.state_dict())
    for p in model64.parameters():
        for name, value in opt64.state[p].items():
            if isinstance(value, torch.Tensor) and name not in OWN_DTYPE:
                assert value.dtype == torch.float64, name
    for x, y in batches(4, seed=2):
        train_step(info, opt64, model64, x, y)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float64 for p in model64.parameters())


def _renamed_model():
    torch.manual_seed(0)
    layers = [
        ("fc1", torch.nn.Linear(D_IN, 6)),
        ("act", torch.nn.Tanh()),
        ("fc2", torch.nn.Linear(6, 3)),
    ]
    return torch.nn.Sequential(collections.OrderedDict(layers)).double()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_state_dict_from_an_incompatible_configuration_fails_clearly(info):
    model = tiny_model()
    opt = info.make(model)
    for x, y in batches(2):
        train_step(info, opt, model, x, y)
    sd = opt.state_dict()
    if info.model_based:  # same shapes, other layer names: another model
        with pytest.raises(ValueError, match="different model"):
            info.make(_renamed_model()).load_state_dict(sd)
        return
    torch.manual_seed(0)  # same number of tensors, other shapes
    other = torch.nn.Sequential(
        torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()
    with pytest.raises(ValueError, match="shape"):
        info.make(other).load_state_dict(sd)
    source = "slow" if sd["param_groups"][0]["write_source"] == "gradients" else "gradients"
    edits = (
        dict(write_source=source),
        dict(capacity=3),
        dict(memory_budget=1.0, stretch_threshold=0.0),
    )
    for edit in edits:  # another write source (sketch or none); fewer entries; no profiles, rank
        edited = copy.deepcopy(sd)  # a memory configuration that does not fit the saved codebook
        edited["param_groups"][0].update(edit)
        with pytest.raises(ValueError, match="memory"):
            info.make(tiny_model()).load_state_dict(edited)
    adamw = torch.optim.AdamW(model.parameters())  # another optimizer's state
    model(batches(1)[0][0]).sum().backward()
    adamw.step()
    with pytest.raises(ValueError, match="momentum_slow"):
        info.make(tiny_model()).load_state_dict(adamw.state_dict())


# ------------------------------------------------------------------------ convergence
def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 3, generator=g, dtype=torch.float64)
    W = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    return X, X @ W.T + b, W, b


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_converges_on_a_quadratic(info):
    """Least squares ||X W^T + b - Y||^2 / n (optimum W*, b*, loss 0): FOGO's matrix path runs on
    W (and AdamW on b) with a decaying lr, tolerance 5e-3; K-FAC/FOP on the Linear layer,
    tolerance 1e-3 (max abs error of W and b)."""
    if info.two_pass:
        pytest.skip("the sampled (MC) categorical Fisher does not apply to a regression loss")
    X, Y, W, b = _regression()
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    over = dict(lr=0.5, weight_decay=0.0) if not info.model_based else {}
    if info.model_based:
        over = dict(lr=0.5, weight_decay=0.0, fisher="empirical", kl_clip=None)
        if info.kwargs.get("outer") == "adamw":
            over["lr"] = 0.05
    opt = info.make(lin, **over)
    steps = 400
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 - t / steps) ** 2)
    for _ in range(steps):
        opt.zero_grad()
        ((lin(X) - Y) ** 2).mean().backward()
        opt.step()
        sched.step()
    tol = 1e-3 if info.model_based else 5e-3  # FOGO: fixed-RMS steps, lr-limited accuracy
    assert (lin.weight - W).abs().max() < tol and (lin.bias - b).abs().max() < tol


class _Point(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.x, self.y = (
            torch.nn.Parameter(torch.tensor([-1.5])),
            torch.nn.Parameter(torch.tensor([2.0])),
        )


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_converges_on_rosenbrock(info):
    """(1 - x)^2 + 100 (y - x^2)^2 from (-1.5, 2), optimum (1, 1), tolerance 1e-2. Its two
    parameters are 1-D, so FOGO updates them with its AdamW path. K-FAC/FOP have no layer to
    precondition here and refuse the model (no silent first-order fallback)."""
    if info.model_based:
        with pytest.raises(ValueError, match="no layer"):
            info.make(_Point().double())
        return
    pt = _Point().double()
    lr = 0.05 if (not info.model_based or info.kwargs.get("outer") == "adamw") else 1e-3
    opt = info.make(pt, lr=lr, weight_decay=0.0)
    steps = 3000
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        ((1 - pt.x) ** 2 + 100 * (pt.y - pt.x**2) ** 2).sum().backward()
        opt.step()
        sched.step()
    assert abs(pt.x.item() - 1) < 1e-2 and abs(pt.y.item() - 1) < 1e-2
