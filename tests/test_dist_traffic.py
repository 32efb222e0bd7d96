"""orthoptim.distributed: the collective counter sees DDP's gradient buckets, explicit and object
collectives, barriers and functional collectives with their payload bytes; dist_info and the
torchrun helpers answer with and without a process group. One 2-rank spawn."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from dist_utils import run_scenarios
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from orthoptim.distributed import (
    DistInfo,
    backend_for,
    count_collectives,
    dist_info,
    launched_by_torchrun,
)


def _ddp_traffic(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    ddp = DistributedDataParallel(nn.Linear(4, 3))  # 15 float32 parameters: 60 bytes
    x = torch.randn(2, 4)
    for _ in range(2):  # DDP rebuilds its buckets (a broadcast) in the second iteration
        ddp(x).sum().backward()
    with count_collectives() as traffic:
        ddp(x).sum().backward()
    return traffic.table()


def _explicit_traffic(rank: int, world: int) -> dict:
    with count_collectives() as traffic:
        dist.all_reduce(torch.ones(5, dtype=torch.float64))  # 40 bytes
        dist.all_gather_into_tensor(torch.empty(2 * world), torch.ones(2))  # an 8-byte shard
        dist.broadcast_object_list([rank], src=0)  # a size, then the pickled bytes
        dist.barrier()
        funcol.wait_tensor(funcol.all_reduce(torch.ones(7), "sum", dist.group.WORLD))  # 28 bytes
    return {"table": traffic.table(), "total": traffic.total_bytes, "info": dist_info()}


@pytest.fixture(scope="module")
def two():
    return run_scenarios(2, {"ddp": _ddp_traffic, "explicit": _explicit_traffic})


def test_ddp_gradient_buckets_are_counted(two):
    for table in two["ddp"]:
        assert table == {"allreduce": {"calls": 1, "bytes": 60}}


def test_explicit_object_barrier_and_functional_collectives_are_counted(two):
    for rank, out in enumerate(two["explicit"]):
        table = out["table"]
        assert table["allreduce"] == {"calls": 1, "bytes": 40}
        assert table["_allgather_base"] == {"calls": 1, "bytes": 8}
        assert table["barrier"] == {"calls": 1, "bytes": 0}
        assert table["all_reduce"] == {"calls": 1, "bytes": 28}
        assert table["broadcast"]["calls"] == 2  # broadcast_object_list: size, then payload
        assert out["total"] == sum(v["bytes"] for v in table.values())
        assert out["info"] == DistInfo(rank, 2, True)


def test_helpers_without_a_process_group():
    assert not dist.is_initialized()
    assert dist_info() == DistInfo(0, 1, False) and dist_info().is_main
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "LOCAL_RANK": "0"}  # fmt: skip
    assert launched_by_torchrun(env)
    assert not launched_by_torchrun({k: v for k, v in env.items() if k != "MASTER_PORT"})
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    with count_collectives() as traffic:  # no group, no collective: nothing counted
        torch.ones(3).sum()
    assert traffic.table() == {} and traffic.total_bytes == 0
