"""Conformance suite: shared behaviour tests driven by the table in tests/optimizer_table.py.

Optimizer-specific math lives in test_fogo.py / test_kfac.py / test_fop.py; this file checks the
behaviour every orthoptim optimizer must share (docs/reliability.md lists it per optimizer).
"""

from __future__ import annotations

import random

import pytest
import torch
from optimizer_table import OPTIMIZERS, batches, tiny_model, train_step

from orthoptim.optim import _nonfinite

IDS = [info.id for info in OPTIMIZERS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    model = tiny_model()
    opt = info.make(model)
    x, y = batches(1)[0]

    def corrupt(m):
        m[0].weight.grad[1, 1] = float("inf")

    train_step(info, opt, model, x, y, corrupt=corrupt)
    train_step(info, opt, model, x, y)
    assert opt.skipped_steps == 1
    sd = opt.state_dict()
    assert sd["nonfinite"] == {"policy": "skip", "skipped_steps": 1}
    fresh_model = tiny_model()
    fresh = info.make(fresh_model, nonfinite="raise")
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 1 and fresh.nonfinite == "raise"  # policy: the constructor's
    assert "nonfinite" in sd  # the caller's dict is not modified by loading


def test_finiteness_check_is_one_reduction_per_dtype_and_one_host_sync(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(6)]
    params += [torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(params, lr=0.1)
    _nonfinite.install(opt, "skip")
    calls = {"item": 0, "norm": 0}
    item, norm = torch.Tensor.item, torch._foreach_norm

    def counting_item(self):
        calls["item"] += 1
        return item(self)

    def counting_norm(*args, **kwargs):
        calls["norm"] += 1
        return norm(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch, "_foreach_norm", counting_norm)
    assert _nonfinite.skip_step(opt) is False
    assert calls == {"item": 1, "norm": 2}  # two dtype groups, one sync
    params[4].grad[0, 0] = float("nan")
    assert _nonfinite.skip_step(opt) is True and opt.skipped_steps == 1
