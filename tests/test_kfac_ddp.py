"""Data-parallel K-FAC and FOP (gloo ranks spawned by the test; W = 4 with ``pytest -m slow``).

- K-FAC and FOP over W ranks, the model wrapped in DDP or not (the optimizer then averages the
  gradients itself), with owned and replicated inverses, equal single-process K-FAC / FOP on the
  same global batch to float32 tolerance over several steps, every rank's parameters and optimizer
  state bit-identical; FOP's single-process batch is [even ranks' shards | odd ranks' shards];
- ``no_sync()`` accumulation of two micro-batches per rank equals the full batch;
- a BatchNorm CNN's replicas (parameters and running statistics) stay bit-identical, with and
  without DDP;
- a rank whose layer gets no gradient does not hang the others; a NaN gradient on one rank drops
  the step on every rank;
- ``torch.distributed.checkpoint`` of owned inverses continues bit for bit;
- world size 1 equals the single process bit for bit;
- the large-batch task with K-FAC / FOP under DDP (the ``torchrun`` path) reproduces its
  single-process record (FOP at W = 2, where the rank groups are the batch's contiguous halves).
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from dist_utils import one_rank_group, run_scenarios
from test_ddp import _close, _untimed
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from orthoptim import FOP, KFAC
from orthoptim.benchmarks.ddp import DataParallel
from orthoptim.benchmarks.runner import PlannedRun, run_one
from orthoptim.distributed.curvature import inverse_cost, owners_by_cost
from orthoptim.optim.kfac import PlainUpdateWarning

STEPS = 5
BATCH = 32  # global
KW = dict(lr=0.1, damping=0.05, factor_interval=1, inverse_interval=2, factor_dtype="float64")
CLASSES = {"kfac": KFAC, "fop": FOP}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
        nn.Linear(12, 4),
    )  # fmt: skip


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 4)
    )


class TwoHeads(nn.Module):
    """Rank 1's shards never use ``extra``: its gradient exists on the other ranks only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.extra = nn.Linear(10, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h) + (self.extra(h) if use_extra else 0.0)


def batch(step: int, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 1, 6, 6, generator=g) if image else torch.randn(BATCH, 10, generator=g)
    return x, torch.randint(0, 4, (BATCH,), generator=g)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    b = len(t) // world
    return t[rank * b : (rank + 1) * b]


def parity_order(t: torch.Tensor, world: int) -> torch.Tensor:
    """The global batch as [even ranks' shards | odd ranks' shards]."""
    ranks = list(range(0, world, 2)) + list(range(1, world, 2))
    return torch.cat([shard(t, r, world) for r in ranks])


def _state(opt: torch.optim.Optimizer) -> dict:
    """The optimizer state without the owned inverses (the part every rank holds)."""
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if k == "kfac":
                for key, ls in v.items():
                    for name, t in ls.items():
                        if name != "pre":
                            out[f"{id(p)}.{key}.{name}"] = t
            else:
                out[f"{id(p)}.{k}"] = v
    return {i: v for i, v in enumerate(out.values())}


def _train(
    which: str,
    wrap: bool,
    placement: str,
    accumulate: int = 1,
    order_world: int = 1,
    param_list: bool = False,
) -> dict:
    """``STEPS`` steps of the MLP on this rank's shard, or in one process on the whole batch
    (FOP: in the parity order of ``order_world`` ranks); ``param_list``: the optimizer gets
    ``model.parameters()`` and finds the model (under DDP: the wrapper) at the first forward."""
    info = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = mlp()
    net = DDP(model) if wrap else model
    opt = CLASSES[which](model.parameters() if param_list else model, **KW,
                         inverse_placement=placement)  # fmt: skip
    for step in range(STEPS):
        x, y = batch(step)
        if info[1] > 1:
            x, y = shard(x, *info), shard(y, *info)
        elif which == "fop":
            x, y = parity_order(x, order_world), parity_order(y, order_world)
        opt.zero_grad()
        xs, ys = x.chunk(accumulate), y.chunk(accumulate)
        for i, (xm, ym) in enumerate(zip(xs, ys, strict=True)):
            last = i == accumulate - 1
            ctx = net.no_sync() if wrap and not last else _null()
            with ctx:
                (F.cross_entropy(net(xm), ym) / accumulate).backward()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "state": _state(opt)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _bn(which: str, wrap: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = cnn()
    net = DDP(model) if wrap else model
    opt = CLASSES[which](model, **KW)
    for step in range(STEPS):
        x, y = batch(step, image=True)
        opt.zero_grad()
        F.cross_entropy(net(shard(x, rank, world)), shard(y, rank, world)).backward()
        opt.step()
    if wrap:  # DDP hands rank 0's running statistics to every rank at the start of a forward
        model.eval()
        with torch.no_grad():
            net(shard(x, rank, world))
    return {"params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()]}  # fmt: skip


def _unused(which: str, wrap: bool = False) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = TwoHeads()
    net = DDP(model, find_unused_parameters=True) if wrap else model
    opt = CLASSES[which](model, **KW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            x, y = batch(step)
            opt.zero_grad()
            out = net(shard(x, rank, world), use_extra=rank != 1)
            F.cross_entropy(out, shard(y, rank, world)).backward()
            opt.step()
    plain = [str(w.message) for w in caught if issubclass(w.category, PlainUpdateWarning)]
    return {"params": [p.detach().clone() for p in model.parameters()], "plain": plain}


def _nan_on_one_rank(which: str) -> dict:
    """Rank 1's gradient holds a NaN at step 2 (model not in DDP): every rank drops that step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = mlp()
    opt = CLASSES[which](model, **KW)
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(shard(x, rank, world)), shard(y, rank, world)).backward()
        if step == 2 and rank == 1:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()],
            "skipped": opt.skipped_steps}  # fmt: skip


def _checkpoint(which: str, folder: str) -> dict:
    """Owned inverses: 3 steps, DCP save, 3 steps; a fresh replica loads and takes the same 3."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def steps(model, opt, start):
        for step in range(start, start + 3):
            x, y = batch(step)
            opt.zero_grad()
            F.cross_entropy(model(shard(x, rank, world)), shard(y, rank, world)).backward()
            opt.step()

    model = mlp()
    opt = CLASSES[which](model, **{**KW, "inverse_interval": 3})
    steps(model, opt, 0)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    owned = sum("pre" in ls for st in opt.state.values() for ls in st.get("kfac", {}).values())
    steps(model, opt, 3)
    model2 = mlp()
    model2.load_state_dict(model_state)
    opt2 = CLASSES[which](model2, **{**KW, "inverse_interval": 3})
    sd = {"optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=folder)
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    steps(model2, opt2, 3)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(),
                                                  strict=True))  # fmt: skip
    return {"same": same, "owned": owned}


def _rank0_state_dict(which: str) -> dict:
    """Rank 0's plain ``state_dict()`` (owning some inverses) loaded on every rank: each rank
    drops the inverses it does not own and recomputes the ones it owns from the factors, exact
    here since factors and inverses are updated at the same steps."""
    rank, world = dist.get_rank(), dist.get_world_size()
    kw = {**KW, "factor_interval": 2, "inverse_interval": 2}  # step 3 uses step 2's inverses

    def steps(model, opt, start, n):
        for step in range(start, start + n):
            x, y = batch(step)
            opt.zero_grad()
            F.cross_entropy(model(shard(x, rank, world)), shard(y, rank, world)).backward()
            opt.step()

    model = mlp()
    opt = CLASSES[which](model, **kw)
    steps(model, opt, 0, 3)
    box = [copy.deepcopy(opt.state_dict()) if rank == 0 else None]  # as saved to disk
    dist.broadcast_object_list(box, src=0)
    model2 = mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = CLASSES[which](model2, **kw)
    opt2.load_state_dict(box[0])
    steps(model, opt, 3, 2)
    steps(model2, opt2, 3, 2)
    return {"same": all(torch.equal(a, b) for a, b in zip(model.parameters(),
                                                          model2.parameters(), strict=True))}


def _scenarios(folder: Path) -> dict:
    p = functools.partial
    out = {
        "kfac-ddp-owner": p(_run, which="kfac", wrap=True, placement="owner"),
        "kfac-plain-replicated": p(_run, which="kfac", wrap=False, placement="replicated"),
        "kfac-plain-owner": p(_run, which="kfac", wrap=False, placement="owner"),
        "fop-ddp-replicated": p(_run, which="fop", wrap=True, placement="replicated"),
        "fop-plain-owner": p(_run, which="fop", wrap=False, placement="owner"),
        "fop-ddp-owner": p(_run, which="fop", wrap=True, placement="owner"),
        "kfac-nosync": p(_run, which="kfac", wrap=True, placement="owner", accumulate=2),
        "fop-nosync": p(_run, which="fop", wrap=True, placement="owner", accumulate=2),
        "bn-fop-ddp": p(_bn_run, which="fop", wrap=True),
        "bn-kfac-plain": p(_bn_run, which="kfac", wrap=False),
        "bn-fop-plain": p(_bn_run, which="fop", wrap=False),
        "unused-kfac": p(_unused_run, which="kfac"),
        "unused-fop": p(_unused_run, which="fop"),
        "unused-fop-ddp": p(_unused_run, which="fop", wrap=True),
        "fop-ddp-params": p(_run, which="fop", wrap=True, placement="owner", param_list=True),
        "nan-fop": p(_nan_run, which="fop"),
        "dcp-fop": p(_dcp_run, which="fop", folder=str(folder / "fop")),
        "dcp-kfac": p(_dcp_run, which="kfac", folder=str(folder / "kfac")),
        "rank0-sd-fop": p(_sd_run, which="fop"),
        "task-kfac": p(_task_run, plan=_task("kfac")),
        "task-fop": p(_task_run, plan=_task("fop")),
    }
    return out


def _run(rank: int, world: int, **kw) -> dict:
    return _train(**kw)


def _bn_run(rank: int, world: int, **kw) -> dict:
    return _bn(**kw)


def _unused_run(rank: int, world: int, **kw) -> dict:
    return _unused(**kw)


def _nan_run(rank: int, world: int, **kw) -> dict:
    return _nan_on_one_rank(**kw)


def _sd_run(rank: int, world: int, **kw) -> dict:
    return _rank0_state_dict(**kw)


def _dcp_run(rank: int, world: int, **kw) -> dict:
    return _checkpoint(**kw)


def _task(optimizer: str) -> tuple:
    hp = {"lr": 0.05, "factor_dtype": "float64"}
    return ("large-batch", "tiny", optimizer, 0, hp, "test", {"max_steps": 6, "eval_every": 3})


def _task_run(rank: int, world: int, plan: tuple) -> dict:
    return _untimed(run_one(PlannedRun(*plan, world_size=world),
                            parallel=DataParallel.from_process_group("cpu")))  # fmt: skip


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"kfacddp{request.param}")
    return request.param, run_scenarios(request.param, _scenarios(folder), timeout=300)


@functools.cache
def _reference(which: str, world: int) -> dict:
    return _train(which, wrap=False, placement="owner", order_world=world)


def _identical(per_rank: list[dict], key: str = "params") -> None:
    for r, other in enumerate(per_rank[1:], start=1):
        for i, (a, b) in enumerate(zip(per_rank[0][key], other[key], strict=True)):
            assert torch.equal(a, b), f"rank {r} differs at {key} {i}"


@pytest.mark.parametrize(
    "name",
    ["kfac-ddp-owner", "kfac-plain-replicated", "kfac-plain-owner", "fop-ddp-replicated",
     "fop-plain-owner", "fop-ddp-owner", "kfac-nosync", "fop-nosync", "fop-ddp-params"],
)  # fmt: skip
def test_data_parallel_equals_one_process_on_the_global_batch(ranks, name):
    world, results = ranks
    per_rank = results[name]
    _identical(per_rank)
    for r in per_rank[1:]:  # factors, momentum, step counter, FOP's beta / eta
        st0, st = per_rank[0]["state"], r["state"]
        assert st0.keys() == st.keys()
        for k, v in st0.items():
            assert torch.equal(v, st[k]) if isinstance(v, torch.Tensor) else v == st[k], k
    ref = _reference(name.split("-")[0], world)
    for i, (a, b) in enumerate(zip(per_rank[0]["params"], ref["params"], strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"param {i}")


@pytest.mark.parametrize("name", ["bn-fop-ddp", "bn-kfac-plain", "bn-fop-plain"])
def test_batchnorm_replicas_stay_identical(ranks, name):
    _, results = ranks
    _identical(results[name])
    _identical(results[name], "buffers")


@pytest.mark.parametrize("name", ["unused-kfac", "unused-fop", "unused-fop-ddp"])
def test_a_rank_without_a_gradient_does_not_hang(ranks, name):
    _, results = ranks
    _identical(results[name])
    assert all(r["plain"] == [] for r in results[name])  # preconditioned: nothing to name
    first = TwoHeads()  # the unused-on-rank-1 layer still trained from the other ranks
    assert not torch.equal(results[name][0]["params"][-2], first.extra.weight)


def test_a_non_finite_gradient_on_one_rank_drops_the_step_everywhere(ranks):
    _, results = ranks
    per_rank = results["nan-fop"]
    _identical(per_rank)
    assert [r["skipped"] for r in per_rank] == [1] * len(per_rank)
    assert all(torch.isfinite(p).all() for p in per_rank[0]["params"])


@pytest.mark.parametrize("which", ["kfac", "fop"])
def test_checkpoint_of_owned_inverses_continues_bit_for_bit(ranks, which):
    world, results = ranks
    per_rank = results[f"dcp-{which}"]
    assert all(r["same"] for r in per_rank)
    assert 0 < per_rank[0]["owned"] < sum(r["owned"] for r in per_rank)  # inverses are sharded


def test_rank0_state_dict_loaded_on_every_rank_continues_exactly(ranks):
    _, results = ranks
    assert all(r["same"] for r in results["rank0-sd-fop"])


@pytest.mark.parametrize("which", ["kfac", "fop"])
def test_world_size_one_equals_one_process_bit_for_bit(tmp_path, which):
    with one_rank_group(tmp_path):
        one = _train(which, wrap=True, placement="owner")
    ref = _reference(which, 1)
    for a, b in zip(one["params"], ref["params"], strict=True):
        assert torch.equal(a, b)


def test_fop_refuses_an_odd_world_size(tmp_path, monkeypatch):
    with one_rank_group(tmp_path):
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
        with pytest.raises(ValueError, match="Invalid world size: 3"):
            FOP(mlp())
        KFAC(mlp())  # K-FAC has no halves: any world size


def test_owners_balance_the_inversion_cost():
    costs = [inverse_cost(d, d, False, False) for d in (64, 8, 32, 32, 16, 8)]
    owner = owners_by_cost(costs, 2)
    load = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(2)]
    assert owner[0] == 0 and set(owner[1:]) == {1}  # the 64-wide block outweighs the rest
    assert owners_by_cost([5, 5, 5, 5], 4) == [0, 1, 2, 3]
    assert load[0] == 2 * 64**3
    with pytest.raises(ValueError, match="inverse_placement"):
        KFAC(mlp(), inverse_placement="sharded")


@pytest.mark.parametrize("optimizer", ["kfac", "fop"])
def test_large_batch_task_under_ddp_reproduces_the_single_process_record(ranks, optimizer):
    world, results = ranks
    per_rank = results[f"task-{optimizer}"]
    ref = _untimed(run_one(PlannedRun(*_task(optimizer))))
    rec = per_rank[0]
    assert len({json.dumps(r, sort_keys=True) for r in per_rank}) == 1  # NaN: a missed target
    if optimizer == "fop" and world > 2:
        # FOP's halves are [ranks 0, 2, ... | ranks 1, 3, ...]; the single-process task splits its
        # batch in contiguous halves, the rank groups' order only for W = 2
        return
    assert rec["extra"].pop("world_size") == world and rec["extra"].pop("device") == "cpu"
    for key in ("label", "key"):
        rec.pop(key), ref.pop(key)
    assert _close(rec, ref)



def test_fsdp2_sharded_parameters_are_refused(tmp_path):
    from torch.distributed.fsdp import fully_shard

    with one_rank_group(tmp_path):
        model = mlp()
        fully_shard(model)
        with pytest.raises(ValueError, match="DTensor.*DistributedDataParallel"):
            KFAC(model)
