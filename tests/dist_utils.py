"""Run a function on W gloo ranks spawned by the test, and bring every rank's result back.

    per_rank = run_on_ranks(fn, 2, args=(...,))          # [result of rank 0, result of rank 1]
    by_name = run_scenarios(2, {"sgd": f, "fogo": g})    # {"sgd": [r0, r1], "fogo": [r0, r1]}

``fn(rank, world_size, *args)`` runs in each of ``world_size`` fresh processes
(``torch.multiprocessing.start_processes``, the API behind ``spawn``, with the ``forkserver``
start method: see :data:`START_METHOD`) after
``init_process_group("gloo", init_method="file://<temp dir>/init")``, with one torch thread per
rank; its return value (anything ``torch.save`` writes: tensors, dicts, lists) comes back through a
file per rank. ``fn`` and its arguments must be picklable: module-level functions of an importable
module (a test module or this one), or ``functools.partial`` of them.

Failures end the run instead of hanging it:

- a rank that raises or exits without returning (an exception, ``os._exit``, a kill): the other
  ranks are terminated and :class:`RankError` is raised, with the traceback of every rank that
  raised, the first to fail first (a peer's "connection closed" that follows the root cause comes
  after it), or the exit code of a rank that died without one;
- ranks still running after ``timeout`` seconds (a collective that never completes): every rank
  is killed and ``TimeoutError`` names the ranks that were still running. Collectives also time
  out on their own after ``timeout`` seconds (the group's timeout).

A spawn still costs a process start and a rendezvous per rank, so a test module runs all its
scenarios of one world size in one spawn (:func:`run_scenarios`, typically from a module-scoped
fixture).
"""

from __future__ import annotations

import datetime
import glob
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankError", "run_on_ranks", "run_scenarios", "one_rank_group"]

# forkserver: one server process imports torch once per test session and forks every rank from
# it, so a spawn costs a fork instead of a torch import per rank. Ranks are fresh processes all
# the same (the server runs no torch op: no thread pool is forked).
START_METHOD = "forkserver"
mp.get_context(START_METHOD).set_forkserver_preload(["torch", "torch.distributed"])


class RankError(RuntimeError):
    """One or more ranks failed; the message holds their tracebacks, the first failure first."""


def _entry(rank: int, fn: Callable, world_size: int, folder: str, args: tuple, timeout: float):
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )  # fmt: skip
        try:
            result = fn(rank, world_size, *args)
            torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        finally:
            dist.destroy_process_group()
    except BaseException:
        path = os.path.join(folder, f"rank{rank}.err")
        with open(path + ".tmp", "w") as f:  # renamed when complete: the parent reads whole files
            f.write(f"{time.time()!r}\n{traceback.format_exc()}")
        os.replace(path + ".tmp", path)
        raise


def _failure_report(folder: str, error: BaseException) -> str:
    """A dead rank's exit code (torch's message), then every rank's traceback, earliest first."""
    found = []
    for path in glob.glob(os.path.join(folder, "rank*.err")):
        with open(path) as f:
            stamp, _, text = f.read().partition("\n")
        rank = os.path.basename(path)[4:-4]
        found.append((float(stamp), rank, text))
    lines = [str(error)] if isinstance(error, mp.ProcessExitedException) or not found else []
    lines += [f"--- rank {rank} raised:\n{text}" for _, rank, text in sorted(found)]
    return "\n".join(lines)


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), timeout: float = 60.0
) -> list[Any]:
    """``[fn(r, world_size, *args) for r in ranks]``, each computed on its own gloo rank.

    Args:
        fn: a picklable function ``fn(rank, world_size, *args)``.
        world_size: number of ranks (processes).
        args: further arguments of ``fn`` (picklable).
        timeout: seconds before the ranks are killed and ``TimeoutError`` is raised.
    """
    with tempfile.TemporaryDirectory(prefix="orthoptim-dist-") as folder:
        ctx = mp.start_processes(
            _entry, args=(fn, world_size, folder, tuple(args), timeout), nprocs=world_size,
            join=False, start_method=START_METHOD,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:  # join() raises as soon as a rank fails, after terminating the others
                if ctx.join(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                    break
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                raise RankError(_failure_report(folder, e)) from None
            if time.monotonic() >= deadline:
                running = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                for p in ctx.processes:
                    p.kill()
                for p in ctx.processes:
                    p.join()
                raise TimeoutError(
                    f"ranks {running} of {world_size} still running after {timeout} s"
                )
        return [
            torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]


def _scenarios(rank: int, world_size: int, scenarios: list[tuple[str, Callable]]) -> dict:
    out = {}
    for name, fn in scenarios:
        out[name] = fn(rank, world_size)
        dist.barrier()  # the next scenario starts together on every rank
    return out


def run_scenarios(
    world_size: int, scenarios: Mapping[str, Callable[[int, int], Any]], timeout: float = 120.0
) -> dict[str, list[Any]]:
    """Run several scenarios, in order, in ONE spawn of ``world_size`` ranks.

    Args:
        world_size: number of ranks.
        scenarios: name -> picklable ``fn(rank, world_size)``; the first failure ends them all.
        timeout: seconds for all scenarios together.

    Returns:
        name -> the per-rank results of that scenario.
    """
    per_rank = run_on_ranks(_scenarios, world_size, (list(scenarios.items()),), timeout)
    return {name: [r[name] for r in per_rank] for name in scenarios}


class one_rank_group:
    """A gloo process group of one rank in THIS process (``with one_rank_group(tmp_path):``),
    destroyed on exit: world size 1 without the cost of a spawn.

    Args:
        folder: an empty temporary folder for the ``file://`` rendezvous.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.init = f"file://{os.fspath(folder)}/init"

    def __enter__(self) -> one_rank_group:
        dist.init_process_group("gloo", init_method=self.init, rank=0, world_size=1)
        return self

    def __exit__(self, *exc: object) -> None:
        dist.destroy_process_group()
