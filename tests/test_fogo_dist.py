"""Sharded FOGO on W gloo ranks (W = 2; W = 4 with ``pytest -m slow``), one spawn per W.

- Every rank holds the same gradients (what DDP's all-reduce leaves): the sharded optimizer
  (ZeRO-1: each matrix's momentum and memory on its owner) equals the replicated one bit for
  bit, and the single-process one to float tolerance with the same memory decisions, across
  memory writes, a dropped NaN step, a missing gradient and ``end_task()``; the state a rank
  holds is about 1/W of the replicated matrix state; world size 1 is the one-process optimizer.
- DDP on a model: sharded FOGO equals one process on the global batch to float32 tolerance
  (Newton-Schulz and memory in float32), the memory's discrete decisions agree.
- A rank without a gradient where the others have one does not hang, and the replicas stay
  identical (each update is its owner's).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from dist_utils import one_rank_group, run_scenarios
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from orthoptim import FOGO

KW = dict(lr=0.02, write_interval=3, min_age=2, memory_budget=0.5, weight_decay=1e-3,
          ns_dtype="float32", memory_dtype="float32")  # fmt: skip
# Buckets of 3, 2 and 1 same-shape matrices (uneven over 2 and 4 ranks), a conv kernel, vectors.
SHAPES = [(10, 12), (8, 10), (10, 12), (4, 2, 3, 3), (8, 10), (10, 12), (6,), (12,)]
STEPS, NAN_AT, NONE_AT, END_TASK_AT = 12, 4, 6, 7


def make_params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.3) for s in SHAPES]


def grads_at(step, params):
    """The gradients of step ``step``: the same on every rank (seeded), a NaN on one step and
    no gradient for parameter 1 on another."""
    g = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(p.shape, generator=g) for p in params]
    if step == NAN_AT:
        out[2][0, 0] = float("nan")
    if step == NONE_AT:
        out[1] = None
    return out


def matrix_state_bytes(opt):
    """Bytes of the FOGO matrices' state this rank holds (momentum streams, memory)."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.ndim < 2:
                continue
            for value in opt.state.get(p, {}).values():
                for t in value.values() if isinstance(value, dict) else [value]:
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
    return total


def train_synthetic(shard, steps=STEPS, params=None, opt=None, start=0):
    params = make_params() if params is None else params
    opt = FOGO(params, shard=shard, **KW) if opt is None else opt
    for step in range(start, steps):
        for p, g in zip(params, grads_at(step, params), strict=True):
            p.grad = g
        opt.step()
        if step == END_TASK_AT:
            opt.end_task()
    return params, opt


def _synthetic(rank, world, shard):
    params, opt = train_synthetic(shard)
    return {
        "params": [p.detach().clone() for p in params],
        "state": {i: opt.state[p] for i, p in enumerate(params) if opt.state.get(p)},
        "bytes": matrix_state_bytes(opt),
        "stats": opt.memory_stats(),
        "skipped": opt.skipped_steps,
    }


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))  # fmt: skip


def _batches(n=10, size=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 12, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]  # fmt: skip


def train_model(rank=0, world=1):
    """DDP when a group exists (each rank its rows of the global batch), else one process."""
    model = _model()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = FOGO(model.parameters(), **KW)
    for i, (x, y) in enumerate(_batches()):
        b = len(x) // world
        x, y = x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if i == 5:
            opt.end_task()
    return model, opt


def _ddp(rank, world):
    model, opt = train_model(rank, world)
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": {i: opt.state[p] for i, p in enumerate(model.parameters())
                      if opt.state.get(p)}}  # fmt: skip


def _missing_grad(rank, world):
    """Rank 1 has no gradient for two matrices on some steps (no hang), and a NaN that the other
    ranks do not see on another (every rank drops that step)."""
    params = make_params()
    opt = FOGO(params, **KW)
    for step in range(6):
        for p, g in zip(params, grads_at(step, params), strict=True):
            p.grad = g
        if rank == 1 and step in (2, 3):
            params[0].grad = params[4].grad = None
        if rank == 1 and step == 5:
            params[3].grad[0, 0, 0, 0] = float("nan")
        opt.step()
    return [p.detach().clone() for p in params], opt.skipped_steps


def _fsdp_model(world, seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    if seed:
        for p in model.parameters():
            nn.init.normal_(p, generator=torch.Generator().manual_seed(seed))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_train(rank, world, model, opt, start, stop):
    for i, (x, y) in enumerate(_batches()[start:stop], start=start):
        b = len(x) // world
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[rank * b : (rank + 1) * b]),
                                    y[rank * b : (rank + 1) * b]).backward()  # fmt: skip
        opt.step()
        if i == 5:
            opt.end_task()


def _fsdp_result(model, opt):
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()],
            "state": {i: opt.state[p] for i, p in enumerate(model.parameters())
                      if opt.state.get(p) and p.ndim >= 2},
            "stats": opt.memory_stats()}  # fmt: skip


def _fsdp(rank, world, folder):
    """FSDP2 (fully_shard per layer and at the root, 1-D mesh): each rank its rows of the
    global batch. Also a DCP checkpoint at step 4, loaded by a fresh model and FOGO that train
    on from there."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp_model(world)
    opt = FOGO(model.parameters(), **KW)
    _fsdp_train(rank, world, model, opt, 0, 4)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
    _fsdp_train(rank, world, model, opt, 4, 10)
    again = _fsdp_model(world, seed=3)
    opt2 = FOGO(again.parameters(), **KW)
    msd, osd = get_state_dict(again, opt2)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=folder)
    set_state_dict(again, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    _fsdp_train(rank, world, again, opt2, 4, 10)
    return {"end": _fsdp_result(model, opt), "resumed": _fsdp_result(again, opt2)}


class _HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (aten ``_local_scalar_dense``: ``item()``,
    ``bool()``, ``int()``, ``float()``), what syncs with a device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _host_reads(rank, world):
    """A steady sharded step (no memory write due) reads nothing on the host."""
    params = make_params()
    opt = FOGO(params, **{**KW, "write_interval": 50})
    reads = []
    for step in range(4):
        for p, g in zip(params, grads_at(step + 20, params), strict=True):
            p.grad = g
        with _HostReads() as mode:
            opt.step()
        reads.append(mode.count)
    return reads


def _refusals(rank, world):
    """What FOGO cannot shard is refused with a ValueError naming the argument."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = []
    for placement in (Shard(1), Replicate()):  # tensor parallel, replicated DTensors
        w = nn.Parameter(distribute_tensor(torch.zeros(8, 6), mesh, [placement]))
        try:
            FOGO([w])
        except ValueError as e:
            out.append(str(e))
    w = nn.Parameter(distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0)]))
    try:
        FOGO([w], shard=False)
    except ValueError as e:
        out.append(str(e))
    return out


# Every shape once: batches of one matrix in every mode, so one process and W ranks compute the
# same kernels and a resharded run continues bit for bit.
DISTINCT = [(10, 12), (8, 10), (6, 7), (4, 2, 3, 3), (5, 9), (6,), (12,)]
CUT = 5  # the checkpoint: after the NaN step, before the missing gradient and end_task()


class Params(nn.Module):
    """A module holding the parameters (DCP names them by their module path)."""

    def __init__(self, shapes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for i, s in enumerate(shapes):
            self.register_parameter(f"p{i}", nn.Parameter(torch.randn(s, generator=g) * 0.3))


def save_and_resume(rank, world, folder, shapes):
    """Train to CUT, save (DCP), train on; then a fresh model and optimizer load and train on
    too. Returns both ends (parameters, states, skip counts)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model = Params(shapes)
    params, opt = train_synthetic(True, steps=CUT, params=list(model.parameters()))
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=folder)  # fmt: skip
    train_synthetic(True, params=params, opt=opt, start=CUT)
    resumed = load_and_resume(folder, shapes)
    return {"end": _summary(model, opt), "resumed": resumed}


def load_and_resume(folder, shapes):
    """A fresh model (other weights) and FOGO, loaded from the DCP checkpoint, trained on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = Params(shapes, seed=7)
    opt = FOGO(model.parameters(), **KW)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=folder)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    train_synthetic(True, params=list(model.parameters()), opt=opt, start=CUT)
    return _summary(model, opt)


def _summary(model, opt):
    params = list(model.parameters())
    return {"params": [p.detach().clone() for p in params],
            "state": {i: opt.state[p] for i, p in enumerate(params) if opt.state.get(p)},
            "skipped": opt.skipped_steps, "writes": opt.memory_stats()["writes"]}  # fmt: skip


SCENARIOS = {
    "sharded": functools.partial(_synthetic, shard=True),
    "replicated": functools.partial(_synthetic, shard=False),
    "ddp": _ddp,
    "missing": _missing_grad,
    "host_reads": _host_reads,
    "refusals": _refusals,
}


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"fogo{request.param}")
    dcp_runs = {
        f"dcp_{name}": functools.partial(save_and_resume, folder=str(folder / name), shapes=sh)
        for name, sh in (("buckets", SHAPES), ("distinct", DISTINCT))
    }
    dcp_runs["fsdp"] = functools.partial(_fsdp, folder=str(folder / "fsdp"))
    results = run_scenarios(request.param, {**SCENARIOS, **dcp_runs}, timeout=300)
    return request.param, results, folder


@pytest.fixture(scope="module")
def single():
    params, opt = train_synthetic(shard=True)  # no process group: one process
    return params, opt


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


DISCRETE = ("owner", "used", "ready", "fresh", "kind", "hits", "open")


def test_sharded_equals_replicated_bit_for_bit_and_one_process_to_float_tolerance(ranks, single):
    """Replicated mode runs each bucket chunk by chunk, as the sharded owners do: bit for bit
    the same. One process batches whole buckets (other batch sizes may round differently)."""
    world, results, _ = ranks
    replicated = results["replicated"][0]
    for mode in ("sharded", "replicated"):
        for r, res in enumerate(results[mode]):
            for i, (a, b) in enumerate(zip(res["params"], replicated["params"], strict=True)):
                assert torch.equal(a, b), f"{mode} rank {r} param {i}"
            for i, st in res["state"].items():  # every state a rank holds is the replicated one
                assert_same(st, replicated["state"][i], f"{mode} rank {r} state {i}")
            assert res["skipped"] == 1
    params, opt = single
    for a, b in zip(replicated["params"], params, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    for i, st in replicated["state"].items():
        for k in DISCRETE if "memory" in st else ():
            assert torch.equal(st["memory"][k], opt.state[params[i]]["memory"][k]), (i, k)
    # Sharded: each matrix's state on exactly one rank, the vectors' on every rank.
    holders = {i: [r for r, res in enumerate(results["sharded"]) if i in res["state"]]
               for i in range(len(SHAPES))}  # fmt: skip
    for i, shape in enumerate(SHAPES):
        assert len(holders[i]) == (1 if len(shape) >= 2 else world), (i, holders[i])
    assert all(len(res["state"]) == len(SHAPES) for res in results["replicated"])


def test_sharded_state_is_about_one_over_w_of_the_replicated(ranks):
    world, results, _ = ranks
    replicated = results["replicated"][0]["bytes"]
    sharded = [res["bytes"] for res in results["sharded"]]
    assert sum(sharded) == replicated  # ZeRO-1: every matrix's state is held exactly once
    assert max(sharded) <= 1.6 * replicated / world, (sharded, replicated)


def test_memory_stats_are_global_on_every_rank(ranks, single):
    world, results, _ = ranks
    expect = single[1].memory_stats()
    for res in results["sharded"]:
        assert res["stats"].keys() == expect.keys()
        for k, v in expect.items():
            assert res["stats"][k] == pytest.approx(v, rel=1e-4), k
    assert expect["writes"] > 0 and expect["entries_used"] > 0


def assert_like_one_process(per_rank):
    """Every rank's full parameters identical, equal to one process on the global batch to
    float32 tolerance (an averaged gradient rounds differently from the global batch's), each
    matrix's state on one rank with the one process's memory decisions."""
    model, opt = train_model()
    for r, res in enumerate(per_rank):
        for a, b in zip(res["params"], per_rank[0]["params"], strict=True):
            assert torch.equal(a, b), f"rank {r} differs from rank 0"
    for a, b in zip(per_rank[0]["params"], model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
    params = list(model.parameters())
    held, decisions = 0, 0
    for res in per_rank:
        for i, st in res["state"].items():
            if "memory" in st:
                held += 1
                for k in DISCRETE:
                    assert torch.equal(st["memory"][k], opt.state[params[i]]["memory"][k]), k
                decisions += int(st["memory"]["used"].sum())
    assert held == sum(p.ndim >= 2 for p in params) and decisions > 0
    return opt


def test_ddp_sharded_equals_one_process_on_the_global_batch(ranks):
    assert_like_one_process(ranks[1]["ddp"])


def test_a_rank_without_a_gradient_does_not_hang_and_replicas_agree(ranks):
    world, results, _ = ranks
    per_rank = results["missing"]
    for params, skipped in per_rank:
        for a, b in zip(params, per_rank[0][0], strict=True):
            assert torch.equal(a, b)
        assert skipped == 2  # the NaN step (all-reduced skip flag) and step 4's NaN


def test_world_size_one_is_the_one_process_optimizer(tmp_path, single):
    params, opt = single  # bit for bit: no chunks, no collective
    with one_rank_group(tmp_path):
        assert dist.get_world_size() == 1
        got, got_opt = train_synthetic(shard=True)
    for a, b in zip(got, params, strict=True):
        assert torch.equal(a, b)
    assert_same(got_opt.state_dict(), opt.state_dict())


def test_fsdp2_with_memory_equals_one_process_on_the_global_batch(ranks):
    """fully_shard'ed model (row shards, a rank with an empty shard at W = 4): each matrix's
    gradient is assembled at its owner, its update's rows sent back; equal to one process to
    float32 tolerance, the memory's decisions agree, every rank's full parameters identical."""
    per_rank = [res["end"] for res in ranks[1]["fsdp"]]
    opt = assert_like_one_process(per_rank)
    assert per_rank[0]["stats"]["writes"] == opt.memory_stats()["writes"] > 0


def test_unshardable_parameters_are_refused_clearly(ranks):
    _, results, _ = ranks
    for messages in results["refusals"]:
        assert len(messages) == 3
        assert all("Invalid" in m for m in messages)
        assert "tensor-parallel" in messages[0] and "Replicate" in messages[1]
        assert "shard=True" in messages[2]


def assert_resumed_equal(res):
    """The run resumed from the checkpoint ended as the uninterrupted one, bit for bit."""
    end, resumed = res["end"], res["resumed"]
    for a, b in zip(end["params"], resumed["params"], strict=True):
        assert torch.equal(a, b)
    assert_same(resumed["state"], end["state"])
    return end, resumed


def test_dcp_round_trip_of_sharded_fogo_continues_bit_for_bit(ranks):
    """Saved by W sharded ranks (each writes its own matrices' state), loaded by W fresh ones:
    they continue exactly as the uninterrupted run (skip counters and write counters too)."""
    _, results, _ = ranks
    for res in results["dcp_buckets"]:
        end, resumed = assert_resumed_equal(res)
        assert resumed["skipped"] == end["skipped"] == 1
        assert resumed["writes"] == end["writes"] > 0


def test_dcp_checkpoint_of_w_ranks_resumes_in_one_process_bit_for_bit(ranks):
    """Resharding W -> 1: one process loads the checkpoint the W ranks wrote and continues
    exactly as they did (and as one process that never stopped: one matrix per bucket, so the
    same kernels everywhere)."""
    world, results, folder = ranks
    end = results["dcp_distinct"][0]["end"]
    one = load_and_resume(str(folder / "distinct"), DISTINCT)
    uninterrupted = Params(DISTINCT)
    _, opt = train_synthetic(True, params=list(uninterrupted.parameters()))
    for a, b, c in zip(one["params"], end["params"], uninterrupted.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c.detach())
    held = {}
    for res in results["dcp_distinct"]:  # every rank's part of the state, now in one process
        held.update(res["end"]["state"])
    assert_same(one["state"], held)
    assert one["skipped"] == 1 and one["writes"] == end["writes"] == opt.memory_stats()["writes"]


def test_dcp_round_trip_of_fsdp2_fogo_continues_bit_for_bit(ranks):
    _, results, _ = ranks
    for res in results["fsdp"]:
        end, resumed = assert_resumed_equal(res)
        assert resumed["stats"] == end["stats"]


def test_steady_sharded_steps_read_nothing_on_the_host(ranks):
    _, results, _ = ranks
    for reads in results["host_reads"]:
        assert reads[0] > 0 and reads[2:] == [0, 0], reads  # the first step reads the counters
