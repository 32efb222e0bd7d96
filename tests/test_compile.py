"""``torch.compile(opt.step)`` equals the eager step (FOGO with its memory, K-FAC, FOP).

FOGO's hot path (momentum, Newton-Schulz, fusion, the memory's accumulation and correction, the
masked update) is traced; the host bookkeeping, AdamW's fused kernel and the memory writes run
eagerly (``torch.compiler.disable``). The aot_eager backend runs the traced graphs op for op, so
the compiled run equals the eager one bit for bit; inductor fuses and reorders (float tolerance,
marked slow: it compiles C++).
"""

import pytest
import torch
import torch._dynamo
from optimizer_table import BY_ID, batches, tiny_model, train_step
from torch import nn
from torch._dynamo.utils import counters

from orthoptim import FOGO

KW = dict(lr=0.02, write_interval=3, memory_budget=0.5, ns_dtype="float32", weight_decay=1e-3)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 3))  # fmt: skip


def run(compiled, steps=14, backend="aot_eager", scheduler=False, **options):
    """Writes at steps 3, 6, 9, 12, end_task() after step 8, a NaN gradient at step 5; returns
    the model, the optimizer and the number of graphs compiled after each step."""
    m = model()
    if scheduler:  # a tensor lr, which the scheduler fills in place: no recompile per value
        options = {**options, "lr": torch.tensor(KW["lr"])}
    opt = FOGO(m.parameters(), **{**KW, **options})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t) if scheduler else None
    step = torch.compile(opt.step, backend=backend) if compiled else opt.step
    g = torch.Generator().manual_seed(1)
    graphs = []
    for i in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        if i == 4:
            m[2].weight.grad[0, 0] = float("nan")
        step()
        if sched is not None:
            sched.step()
        if i == 7:
            opt.end_task()
        graphs.append(counters["stats"]["unique_graphs"])
    return m, opt, graphs


def compiled_run(**kw):
    torch._dynamo.reset()
    counters.clear()
    return run(True, **kw)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        pytest.param(dict(gate="sign", side="output", write_source="slow", nesterov=True),
                     marks=pytest.mark.slow),
        pytest.param(dict(memory=False, dual_stream=False), marks=pytest.mark.slow),
        dict(scheduler=True),
    ],
    ids=["memory", "sign-output-slow", "no-memory", "tensor-lr-scheduler"],
)
def test_compiled_step_equals_eager_across_writes_and_end_task(options):
    m1, o1, _ = run(False, **options)
    m2, o2, graphs = compiled_run(**options)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert torch.equal(s1[2]["momentum_slow"], s2[2]["momentum_slow"])
    if o1.param_groups[0]["memory"]:
        for k in s1[2]["memory"]:
            assert torch.equal(s1[2]["memory"][k], s2[2]["memory"][k]), k
        assert o2.memory_stats()["writes"] == o1.memory_stats()["writes"] > 0
    assert o2.skipped_steps == 1
    assert graphs[-1] > 0  # the step really was compiled
    assert graphs[-1] == graphs[1]  # ...and nothing recompiled after the first steps


@pytest.mark.slow
def test_inductor_step_equals_eager_to_float_tolerance():
    m1, o1, _ = run(False)
    m2, o2, graphs = compiled_run(backend="inductor")
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for k in ("owner", "used", "ready", "hits"):  # the memory's discrete decisions agree
        assert torch.equal(o1.state[m1[2].weight]["memory"][k], o2.state[m2[2].weight]["memory"][k])
    assert graphs[-1] == graphs[1]


@pytest.mark.slow
@pytest.mark.parametrize("ident", ["KFAC", "FOP"])
def test_kfac_and_fop_compiled_steps_equal_eager(ident):
    """Across factor and inverse updates (the table's short intervals)."""
    info = BY_ID[ident]
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        m = tiny_model()
        opt = info.make(m)
        if compiled:
            opt.step = torch.compile(opt.step, backend="aot_eager")
        for x, y in batches(12):
            train_step(info, opt, m, x, y)
        runs.append(m)
    for a, b in zip(*(r.parameters() for r in runs), strict=True):
        assert torch.equal(a, b)
