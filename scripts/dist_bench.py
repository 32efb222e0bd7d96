"""Per-step time and bytes communicated per collective, for 1, 2 and 4 CPU processes (gloo).

For each world size W the script spawns W processes (one torch thread each, a ``file://``
rendezvous); W = 1 is the plain single-process loop, W > 1 wraps the model in
``DistributedDataParallel`` and gives each rank its contiguous shard of the same global batch, as
``torchrun ... -m orthoptim run`` does (:mod:`orthoptim.benchmarks.ddp`). Every optimizer trains
its own copy of the model, built from the registry with its default hyperparameters. K-FAC and
FOP reduce their own factors (and FOP its half-gradient difference); their factor and inverse
updates come every ``factor_interval`` / ``inverse_interval`` steps (10 by default), so measure
them with ``--window`` and ``--count-steps`` multiples of 10: every window then holds one update
step. ``kfac`` and ``fop`` own each layer's inverse on one rank (``inverse_placement="owner"``);
``kfac-replicated`` and ``fop-replicated`` invert every layer on every rank.

Time. After ``--warmup`` steps of each optimizer, ``--rounds`` rounds each time a window of
``--window`` steps per optimizer, the optimizers' order rotated every round, so the optimizers of
one W are measured side by side. A step is ``zero_grad``, forward, backward (DDP's gradient
all-reduce included), gradient clipping (GPT, as lm-pretrain), ``step()``. Reported: the median
per-step time over the rounds on each rank, and the slowest rank's median; the same for the time
spent inside ``opt.step()`` alone (the part a replicated optimizer repeats on every rank).

Traffic. ``--count-steps`` further steps per optimizer run under
:class:`orthoptim.distributed.count_collectives` (a dispatch mode that sees every collective,
DDP's buckets included; it slows the steps down, so they are not timed): calls and payload bytes
per collective per step (payload: the tensor a rank hands to the collective; a ring all-reduce
sends about ``2 (W - 1) / W`` of it per rank). Also: optimizer state bytes per rank (the tensors of
``state_dict()["state"]``) and parameter bytes.

FOGO's modes (docs/distributed.md): ``fogo`` is the registry's FOGO, sharded over the ranks under
DDP (ZeRO-1: each matrix's momentum and memory on one rank, the updates all-gathered);
``fogo-replicated`` the same with ``shard=False`` (every rank steps every matrix); ``fogo-fsdp2``
FOGO on a ``fully_shard``ed model (each transformer block, then the root; the CNN: the root)
instead of DDP. State bytes count a sharded tensor's local shard.

Models: ``gpt``, the lm-pretrain ``paper`` model (nanoGPT's CPU shakespeare_char GPT: 4 layers,
4 heads, 128 wide, block 64, vocabulary 65, tied embeddings) on random tokens; ``cnn``, the
large-batch-cnn ``paper`` model (two conv blocks of 8 and 16 channels, a 64-wide hidden layer) on
random 28x28 images. ``--batch`` is the global batch (sequences or images), the same for every W.

    python scripts/dist_bench.py --model gpt --batch 16 --json gpt.json
    python scripts/dist_bench.py --model cnn --batch 512 --json cnn.json
    python scripts/dist_bench.py --model cnn --batch 512 --optimizers sgd kfac fop \
        kfac-replicated fop-replicated --window 10 \
        --count-steps 10 --rounds 5 --json kfac.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from orthoptim.benchmarks import registry
from orthoptim.benchmarks.ddp import DataParallel
from orthoptim.benchmarks.gpt import GPT, GPTConfig
from orthoptim.benchmarks.models import build_model
from orthoptim.benchmarks.train import seeded
from orthoptim.distributed import count_collectives


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    clip: float  # gradient-norm clipping before the step (0: none)


_GPT = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)


def _tokens(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(_GPT.vocab_size, (batch, _GPT.block_size + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _images(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(10, (batch,), generator=gen)


MODELS = {
    "gpt": ModelSpec(lambda: GPT(_GPT), _tokens, lambda net, x, y: net(x, y)[1], 1.0),
    "cnn": ModelSpec(
        lambda: build_model("cnn", (1, 28, 28), 10, hidden=[64], width=8), _images,
        lambda net, x, y: F.cross_entropy(net(x), y), 0.0,
    ),
}  # fmt: skip


# Contenders that are not registry names: (registry name, hyperparameters, wrapper under W > 1).
VARIANTS = {
    "fogo-replicated": ("fogo", {"shard": False}, "ddp"),
    "fogo-fsdp2": ("fogo", {}, "fsdp2"),
    "kfac-replicated": ("kfac", {"inverse_placement": "replicated"}, "ddp"),
    "fop-replicated": ("fop", {"inverse_placement": "replicated"}, "ddp"),
}


def _fully_shard(model: nn.Module, world: int) -> nn.Module:
    """FSDP2 over a 1-D mesh of the ranks: each transformer block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in getattr(getattr(model, "transformer", None), "h", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tensor_bytes(obj) -> int:
    if isinstance(obj, DTensor):
        obj = obj.to_local()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _measure(world: int, args: argparse.Namespace) -> list[dict]:
    """Every optimizer's timings and traffic on this rank (see the module docstring)."""
    parallel = DataParallel.from_process_group("cpu") if world > 1 else None
    spec = MODELS[args.model]
    runs = {}
    for name in args.optimizers:
        base, hparams, wrapper = VARIANTS.get(name, (name, {}, "ddp"))
        with seeded(0):
            model = spec.build()
        if parallel is None:
            net = model
        elif wrapper == "fsdp2":
            net = model = _fully_shard(model, world)
        else:
            net = parallel.wrap(model)
        runs[name] = (model, net, registry.make_optimizer(base, model, hparams))
    x, y = spec.batch(args.batch, torch.Generator().manual_seed(0))
    if parallel is not None:
        x, y = parallel.shard(x), parallel.shard(y)

    def step(model: nn.Module, net: nn.Module, opt: torch.optim.Optimizer) -> float:
        """One training step; returns the seconds spent in ``opt.step()``."""
        opt.zero_grad(set_to_none=True)
        spec.loss(net, x, y).backward()
        if spec.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    for run in runs.values():
        for _ in range(args.warmup):
            step(*run)
    times: dict[str, list[float]] = {name: [] for name in runs}
    opt_times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            in_opt = sum(step(*runs[name]) for _ in range(args.window))
            times[name].append((time.perf_counter() - t0) / args.window)
            opt_times[name].append(in_opt / args.window)
    rows = []
    for name, (model, net, opt) in runs.items():
        with count_collectives() as traffic:
            for _ in range(args.count_steps):
                step(model, net, opt)
        per_step = {
            k: {"calls": v["calls"] / args.count_steps, "bytes": v["bytes"] / args.count_steps}
            for k, v in traffic.table().items()
        }
        rows.append({
            "optimizer": name,
            "matrix_state_bytes": sum(
                _tensor_bytes(st) for p, st in opt.state.items() if p.ndim >= 2
            ),
            "step_s": statistics.median(times[name]),
            "opt_step_s": statistics.median(opt_times[name]),
            "traffic": per_step,
            "state_bytes": _tensor_bytes(opt.state_dict()["state"]),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        })  # fmt: skip
    return rows


def _rank_main(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world
        )
    try:
        rows = _measure(world, args)
        per_rank = [rows] * world
        if world > 1:
            dist.all_gather_object(per_rank, rows)
        if rank == 0:
            with open(os.path.join(folder, "rows.json"), "w") as f:
                json.dump(per_rank, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure_world(world: int, args: argparse.Namespace) -> list[dict]:
    """Spawn ``world`` ranks; one row per optimizer, with every rank's numbers."""
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as folder:
        mp.start_processes(_rank_main, args=(world, folder, args), nprocs=world,
                           start_method="spawn")  # fmt: skip
        with open(os.path.join(folder, "rows.json")) as f:
            per_rank = json.load(f)
    out = []
    for i, row in enumerate(per_rank[0]):
        ranks = [r[i] for r in per_rank]
        out.append({
            "model": args.model, "batch": args.batch, "world_size": world,
            "optimizer": row["optimizer"],
            "step_ms_per_rank": [1e3 * r["step_s"] for r in ranks],
            "step_ms": max(1e3 * r["step_s"] for r in ranks),
            "opt_step_ms": max(1e3 * r["opt_step_s"] for r in ranks),
            "traffic_per_rank": [r["traffic"] for r in ranks],
            "state_bytes_per_rank": [r["state_bytes"] for r in ranks],
            "matrix_state_bytes_per_rank": [r["matrix_state_bytes"] for r in ranks],
            "param_bytes": row["param_bytes"],
        })  # fmt: skip
    return out


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _traffic_text(traffic: dict) -> str:
    if not traffic:
        return "none"
    return "; ".join(
        f"{k} {v['calls']:g} x, {_size(v['bytes'])}" for k, v in sorted(traffic.items())
    )


def table(rows: list[dict]) -> str:
    """Markdown: one line per (optimizer, W); time relative to the same optimizer at W = 1."""
    base = {r["optimizer"]: r["step_ms"] for r in rows if r["world_size"] == 1}
    lines = [
        "| optimizer | processes | step ms (median, slowest rank) | vs 1 process "
        "| in `opt.step()`, ms | collectives per step (rank 0: calls, payload) "
        "| optimizer state per rank | of which matrices' | parameters |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (r["optimizer"], r["world_size"])):
        ratio = r["step_ms"] / base[r["optimizer"]] if r["optimizer"] in base else float("nan")
        lines.append(
            f"| {r['optimizer']} | {r['world_size']} | {r['step_ms']:.1f} | {ratio:.2f} "
            f"| {r['opt_step_ms']:.1f} "
            f"| {_traffic_text(r['traffic_per_rank'][0])} "
            f"| {_size(max(r['state_bytes_per_rank']))} "
            f"| {_size(max(r['matrix_state_bytes_per_rank']))} | {_size(r['param_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gpt")
    p.add_argument("--batch", type=int, default=16, help="global batch (default %(default)s)")
    p.add_argument("--optimizers", nargs="+", default=["sgd", "adamw", "fogo"])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer")
    p.add_argument("--rounds", type=int, default=5, help="timed windows per optimizer")
    p.add_argument("--window", type=int, default=4, help="steps per timed window")
    p.add_argument("--count-steps", type=int, default=2, help="steps with collectives counted")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    for w in args.world_sizes:
        if w < 1 or args.batch % w:
            p.error(f"--batch {args.batch} must split evenly over {w} processes")
    rows = []
    load = [os.getloadavg()[0]]  # other processes on the machine share its cores
    for w in args.world_sizes:
        t0 = time.perf_counter()
        rows += measure_world(w, args)
        load.append(os.getloadavg()[0])
        print(f"W={w}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    command = "python scripts/dist_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"{command}\ntorch {torch.__version__}, {os.cpu_count()} CPUs, 1-minute load average "
        f"{' / '.join(f'{x:.1f}' for x in load)} (before, then after each W)\n"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "torch": torch.__version__, "load": load, "rows": rows},
                      f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
