"""Fuzzing with hypothesis: shapes (incl. 1-row / 1-column matrices, conv kernels, zero-size),
dtypes and hyperparameters. From finite input no optimizer may crash or produce NaN/inf in its
parameters or state. docs/reliability.md records the number of cases (FUZZ_EXAMPLES per test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from orthoptim import FOGO, FOP, KFAC

FUZZ_EXAMPLES = 150
SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # reproducible in CI
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def assert_finite(opt, params):
    for p in params:
        assert torch.isfinite(p).all()
    for state in opt.state.values():
        stack = [state]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v).all()


dims = st.integers(1, 6)
shapes = st.one_of(
    st.tuples(dims, dims),  # matrices, incl. 1 x n and m x 1
    st.tuples(dims),  # vectors (AdamW path)
    st.tuples(dims, st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),  # conv kernels
    st.just((0, 3)),  # zero-size
)


@SETTINGS
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    grad_scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
    hp=st.fixed_dictionaries(
        {
            "lr": st.floats(1e-4, 0.5),
            "weight_decay": st.sampled_from([0.0, 1e-2]),
            "beta_slow": st.sampled_from([0.95, 0.99]),
            "beta_fast": st.sampled_from([0.0, 0.9]),
            "mix": st.floats(0.0, 1.0),
            "fusion": st.sampled_from(["slerp", "lerp"]),
            "nesterov": st.booleans(),
            "scale": st.sampled_from(["rms", "muon"]),
            "ns_dtype": st.sampled_from(["bfloat16", "float32"]),
            "memory": st.booleans(),
            "memory_budget": st.sampled_from([0.05, 0.5, 1.0]),
            "write_interval": st.sampled_from([0, 1, 2]),
            "gate": st.sampled_from(["overlap", "sign"]),
            "radius": st.sampled_from([0.5, 1.0]),
            "side": st.sampled_from(["input", "output"]),
            "write_source": st.sampled_from(["gradients", "slow"]),
            "eviction": st.sampled_from(["oldest", "least_used"]),
        }
    ),
)
def test_fogo_fuzz(shape_list, dtype, seed, grad_scale, hp):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shape_list]
    opt = FOGO(params, capacity=2, **hp)
    for step in range(4):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * grad_scale).to(dtype)
        opt.step()
        if step == 1:
            opt.end_task()
    assert_finite(opt, params)
    assert opt.skipped_steps == 0


@SETTINGS
@given(
    cls=st.sampled_from([KFAC, FOP]),
    conv=st.booleans(),
    width=st.integers(1, 5),
    classes=st.integers(2, 4),
    batch=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    hp=st.fixed_dictionaries(
        {
            "lr": st.floats(1e-4, 0.5),
            "damping": st.sampled_from([1e-4, 1e-2, 1.0]),
            "momentum": st.sampled_from([0.0, 0.9]),
            "weight_decay": st.sampled_from([0.0, 1e-3]),
            "outer": st.sampled_from(["sgd", "adamw"]),
            "factor_interval": st.integers(1, 3),
            "inverse_interval": st.integers(1, 3),
            "ema_weight": st.sampled_from([0.05, 0.5, 1.0]),
            "factor_init": st.sampled_from(["batch", "zero"]),
            "curvature": st.sampled_from(
                [("pi", "cholesky"), ("pi", "eigen"), ("tikhonov", "eigen")]
            ),
            "fisher": st.sampled_from(["empirical", "mc"]),
            "kl_clip": st.sampled_from([None, 1e-3]),
            "max_grad_norm": st.sampled_from([None, 1.0, 10.0]),
        }
    ),
)
def test_kfac_fop_fuzz(cls, conv, width, classes, batch, dtype, seed, hp):
    run_kfac_case(cls, conv, width, classes, batch, dtype, seed, hp)


def run_kfac_case(cls, conv, width, classes, batch, dtype, seed, hp):
    torch.manual_seed(seed)
    hp = dict(hp)
    hp["damping_type"], hp["inverse_method"] = hp.pop("curvature")
    if conv:
        conv_layer = nn.Conv2d(2, width, 3, padding=1)
        model = nn.Sequential(conv_layer, nn.ReLU(), nn.Flatten(), nn.Linear(width * 9, classes))
        x = torch.randn(batch, 2, 3, 3)
    else:
        model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, classes))
        x = torch.randn(batch, 3)
    model, x = model.to(dtype), x.to(dtype)
    y = torch.randint(0, classes, (batch,))
    opt = cls(model, **hp)
    for _ in range(4):
        out = model(x)
        opt.zero_grad()
        opt.sample_fisher(out)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
    assert_finite(opt, list(model.parameters()))
    assert opt.skipped_steps == 0


def test_kfac_tiny_damping_conv_batch_one_stays_finite():
    """Regression (found by the fuzzer): fp32 ``eigh`` of a nearly rank-deficient factor failed
    to converge (``LinAlgError``); eigendecompositions now run in float64 (curvature.inverse)."""
    hp = dict(
        lr=0.5, damping=1e-4, momentum=0.0, weight_decay=0.0, outer="sgd", factor_interval=1,
        inverse_interval=1, ema_weight=0.5, factor_init="batch", curvature=("pi", "eigen"),
        fisher="empirical", kl_clip=1e-3, max_grad_norm=None,
    )  # fmt: skip
    run_kfac_case(KFAC, True, 5, 2, 1, torch.float32, 0, hp)
