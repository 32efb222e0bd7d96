"""torch.distributed.checkpoint round trips (single process): get/set_optimizer_state_dict with
parameter names as state keys, dcp.save / dcp.load to disk, then training continues bit for bit.
"""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from orthoptim import FOGO
from orthoptim.optim import _nonfinite

FOGO_KW = dict(lr=0.02, write_interval=3, memory_budget=0.5, weight_decay=1e-3)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]  # fmt: skip


def train(m, opt, data, nan_at=()):
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        if i in nan_at:
            m[2].weight.grad[0, 0] = float("nan")
        opt.step()


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("options", [dict(), dict(gate="sign", side="output", write_source="slow")])
def test_fogo_dcp_save_load_continues_bit_for_bit(tmp_path, flatten, options):
    data = batches(14)
    opts = StateDictOptions(flatten_optimizer_state_dict=flatten)
    m = model()
    opt = FOGO(m.parameters(), **FOGO_KW, **options)
    train(m, opt, data[:7], nan_at=(4,))  # writes at steps 3 and 6, one dropped step
    opt.end_task()
    sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt, options=opts)}
    state_keys = [k for k in sd["optim"] if str(k).startswith("state.")] if flatten else list(
        sd["optim"]["state"]
    )  # fmt: skip
    assert state_keys and all(isinstance(k, str) for k in state_keys)  # names, not integers
    dcp.save(sd, checkpoint_id=tmp_path)
    train(m, opt, data[7:])  # crosses two more writes

    torch.manual_seed(5)
    m2 = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    opt2 = FOGO(m2.parameters(), **FOGO_KW, **options)
    sd2 = {
        "model": get_model_state_dict(m2),
        "optim": get_optimizer_state_dict(m2, opt2, options=opts),
    }
    dcp.load(sd2, checkpoint_id=tmp_path)
    set_model_state_dict(m2, sd2["model"])
    set_optimizer_state_dict(m2, opt2, sd2["optim"], options=opts)
    assert opt2.skipped_steps == 1  # the counters travel in the param groups
    assert opt2.param_groups[0][_nonfinite.GROUP_KEY] is opt2._nonfinite_counters.counts
    train(m2, opt2, data[7:])
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same(opt.state_dict(), opt2.state_dict())
    assert opt2.memory_stats()["writes"] == opt.memory_stats()["writes"] > 3
