"""The distributed test harness (tests/dist_utils.py): results come back from every rank, several
scenarios share one spawn, and a failing, dying or hanging rank fails the test instead of hanging
it. Each test spawns 2 gloo ranks (forked from a server that imported torch once: about a second
each after the first)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from dist_utils import RankError, run_on_ranks, run_scenarios


def _rank_sum(rank: int, world_size: int) -> dict:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    threads = torch.get_num_threads()
    return {"rank": rank, "world": dist.get_world_size(), "sum": t, "threads": threads}


def _gather_ranks(rank: int, world_size: int) -> list[int]:
    out = [None] * world_size
    dist.all_gather_object(out, rank)
    return out


def _raise_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # rank 0 waits for the rank that failed


def _die_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))  # never completes: its peer is gone


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_every_rank_returns_its_result_and_scenarios_share_one_spawn():
    out = run_scenarios(2, {"sum": _rank_sum, "gather": _gather_ranks})
    assert [r["rank"] for r in out["sum"]] == [0, 1]
    assert all(r["world"] == 2 and r["threads"] == 1 for r in out["sum"])
    assert all(torch.equal(r["sum"], torch.tensor([3.0])) for r in out["sum"])
    assert out["gather"] == [[0, 1], [0, 1]]


def test_an_exception_fails_with_the_rank_and_its_traceback():
    with pytest.raises(RankError) as info:
        run_on_ranks(_raise_on_rank_1, 2, timeout=60)
    text = str(info.value)
    first = text.index("--- rank 1 raised")  # the root cause comes first
    assert "ValueError: rank one refuses" in text[first:] and "_raise_on_rank_1" in text


def test_a_rank_that_dies_fails_the_test_instead_of_hanging():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="exit code 3"):
        run_on_ranks(_die_on_rank_1, 2, timeout=60)
    assert time.monotonic() - t0 < 50  # ended by the death, not by the timeout


def test_ranks_still_running_at_the_timeout_are_killed():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 still running after 3"):
        run_on_ranks(_sleep, 2, timeout=3)
    assert time.monotonic() - t0 < 15
