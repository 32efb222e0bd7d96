"""Where data-parallel K-FAC / FOP spend a step: the collectives in a profile, and the time the
step waits on them.

Spawns W CPU processes (gloo, one torch thread each), trains the large-batch CNN (the
``large-batch-cnn`` paper model, ``dist_bench.py``'s ``cnn``) in DDP on each rank's shard of a
global batch, with factor and inverse updates at every step (so every step carries every
collective), and profiles ``--steps`` steps with ``torch.profiler`` on every rank. Printed for
rank 0: the collective ops of the profile (calls, host time: for an asynchronous op the time to
enqueue it, since gloo runs it on its own thread), and per step the time the optimizer spent
blocked in :meth:`orthoptim.distributed.curvature.Pending.wait` against the whole ``opt.step()``.

What it cannot show on this machine: how much communication hides behind computation. Every
collective is started with ``async_op=True`` and waited only where its result is needed, but two
CPU cores shared by W processes have no spare core for gloo's threads, so the waits measure
contention more than the network. Measure overlap on GPUs (NCCL streams).

    python scripts/profile_kfac_dist.py --optimizer fop --world-size 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from orthoptim.benchmarks import registry
from orthoptim.benchmarks.ddp import DataParallel
from orthoptim.benchmarks.models import build_model
from orthoptim.benchmarks.train import seeded
from orthoptim.distributed import curvature

_COLLECTIVE_WORDS = ("all_reduce", "allreduce", "broadcast", "gloo")


def _rank_main(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        parallel = DataParallel.from_process_group("cpu")
        with seeded(0):
            model = build_model("cnn", (1, 28, 28), 10, hidden=[64], width=8)
        net = parallel.wrap(model)
        hp = {"factor_interval": 1, "inverse_interval": 1,
              "inverse_placement": args.placement}  # fmt: skip
        opt = registry.make_optimizer(args.optimizer, model, hp)
        g = torch.Generator().manual_seed(0)
        x = parallel.shard(torch.randn(args.batch, 1, 28, 28, generator=g))
        y = parallel.shard(torch.randint(10, (args.batch,), generator=g))
        waited: list[float] = []
        wait = curvature.Pending.wait

        def timed_wait(self: curvature.Pending) -> None:
            t0 = time.perf_counter()
            wait(self)
            waited.append(time.perf_counter() - t0)

        curvature.Pending.wait = timed_wait  # type: ignore[method-assign]

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            t0 = time.perf_counter()
            opt.step()
            return time.perf_counter() - t0

        for _ in range(3):
            step()
        waited.clear()
        step_s, wait_s = [], []
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                n = len(waited)
                step_s.append(step())
                wait_s.append(sum(waited[n:]))
        if rank == 0:
            rows = [e for e in prof.key_averages()
                    if any(w in e.key.lower() for w in _COLLECTIVE_WORDS)]  # fmt: skip
            print(f"{args.optimizer}, inverse_placement={args.placement}, {world} ranks, "
                  f"global batch {args.batch}, {args.steps} profiled steps (rank 0)\n")  # fmt: skip
            print("| op | calls per step | host ms per step |\n| --- | ---: | ---: |")
            for e in sorted(rows, key=lambda e: -e.cpu_time_total):
                print(f"| `{e.key}` | {e.count / args.steps:g} | "
                      f"{e.cpu_time_total / 1e3 / args.steps:.2f} |")  # fmt: skip
            print(f"\nopt.step(): median {1e3 * statistics.median(step_s):.1f} ms, of which "
                  f"blocked in Pending.wait: median {1e3 * statistics.median(wait_s):.1f} ms")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=["kfac", "fop"], default="fop")
    p.add_argument("--placement", choices=["owner", "replicated"], default="owner")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch", type=int, default=512, help="global batch (default %(default)s)")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    if args.batch % args.world_size:
        p.error(f"--batch {args.batch} must split evenly over {args.world_size} processes")
    print(f"python scripts/profile_kfac_dist.py {' '.join(argv or sys.argv[1:])}\n"
          f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kfac-profile-") as folder:
        mp.start_processes(_rank_main, args=(args.world_size, folder, args),
                           nprocs=args.world_size, start_method="spawn")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
