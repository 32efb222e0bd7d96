r"""The collectives of data-parallel K-FAC and FOP, and who owns which layer's inverse.

Data parallelism: ``W`` ranks, each with its shard of the global batch. Everything here is a
``torch.distributed`` collective with ``async_op=True``; the caller waits on the returned
:class:`Pending` only where the result is needed, so communication of one tensor overlaps the
computation of the next.

* :func:`sync_grads`: the gradient average that ``DistributedDataParallel`` would do, for a model
  that is not wrapped (every parameter with a gradient on any rank: norm gains, embeddings without
  an adapter, excluded layers included). Gradients are divided by ``W`` before the sum, as DDP
  does; a parameter without a gradient on some rank counts as a zero gradient there.
* :func:`average_buffers`: the floating-point buffers (BatchNorm running statistics) averaged
  over the ranks, for a model that is not wrapped (DDP broadcasts rank 0's at every forward).
* :func:`all_reduce_sum`: Kronecker-factor sums (``sum_n a a^T`` and the sample count; the caller
  divides by the global count: "sum over ranks / global batch"), FOP's signed half-gradient sums.
* :func:`broadcast`: an owner's inverse-preconditioned direction to every rank.
* :func:`owners_by_cost`: KAISA's placement (Pauloski et al., SC'21; kfac-pytorch's
  ``KAISAAssignment``): each layer's inverse is owned by one rank, the layers handed out largest
  cost first to the least loaded rank, so the ranks' inversion work is balanced.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Pending",
    "all_reduce_sum",
    "average_buffers",
    "broadcast",
    "inverse_cost",
    "owners_by_cost",
    "sync_grads",
]


@dataclass
class Pending:
    """Collectives in flight; :meth:`wait` blocks until all are done, then runs the finishers
    (unpacking a flat buffer) in order. Waiting twice is a no-op."""

    works: list[Any] = field(default_factory=list)
    finish: list[Any] = field(default_factory=list)

    def add(self, other: Pending) -> None:
        self.works += other.works
        self.finish += other.finish

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        for f in self.finish:
            f()
        self.works, self.finish = [], []


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> Pending:
    """Start summing ``tensor`` in place over the ranks of ``group``."""
    return Pending([dist.all_reduce(tensor, group=group, async_op=True)])


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> Pending:
    """Start broadcasting ``tensor`` in place from ``src`` (a rank of ``group``)."""
    src = src if group is None else dist.get_global_rank(group, src)
    return Pending([dist.broadcast(tensor, src=src, group=group, async_op=True)])


def sync_grads(
    params: Sequence[torch.Tensor], world_size: int, group: dist.ProcessGroup | None
) -> Pending:
    """Start averaging ``p.grad`` over the ranks: one flat all-reduce per (device, dtype).

    Each buffer also carries one presence flag per parameter. A rank whose every parameter has a
    gradient needs no flag (every rank's parameter then gets the average); a rank missing some
    reads the flags on the host after the wait (a sync, only then), and gives ``p.grad`` to the
    parameters that some rank had a gradient for. Every rank issues the same collectives whatever
    gradients it holds, so a parameter unused on one rank does not hang the others.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    pending = Pending()
    for (device, dtype), ps in groups.items():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
            + [torch.tensor([float(p.grad is not None) for p in ps], dtype=dtype, device=device)]
        )
        n = flat.numel() - len(ps)
        flat[:n].div_(world_size)
        pending.works.append(dist.all_reduce(flat, group=group, async_op=True))
        pending.finish.append(lambda ps=ps, flat=flat, n=n: _unflatten_grads(ps, flat, n))
    return pending


def _unflatten_grads(ps: list[torch.Tensor], flat: torch.Tensor, n: int) -> None:
    present = None
    if any(p.grad is None for p in ps):
        present = flat[n:].tolist()  # a rank missing a gradient: which ones did some rank have
    offset = 0
    for i, p in enumerate(ps):
        view = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is not None:
            p.grad.copy_(view)
        elif present is not None and present[i] > 0:
            p.grad = view.clone()


def average_buffers(modules: Iterable[nn.Module], world_size: int,
                    group: dist.ProcessGroup | None) -> Pending:  # fmt: skip
    """Start averaging every floating-point buffer of ``modules`` over the ranks (BatchNorm's
    running mean and variance: averaging the ranks' updates is updating with the average of the
    ranks' batch statistics). Integer buffers (``num_batches_tracked``) agree already."""
    bufs = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    pending = Pending()
    by: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for b in bufs:
        by.setdefault((b.device, b.dtype), []).append(b)
    for bs in by.values():
        flat = torch.cat([b.reshape(-1) for b in bs]).div_(world_size)
        pending.works.append(dist.all_reduce(flat, group=group, async_op=True))
        pending.finish.append(lambda bs=bs, flat=flat: _unflatten(bs, flat))
    return pending


def _unflatten(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def inverse_cost(d_in: int, d_out: int, diag_a: bool, diag_g: bool) -> int:
    """Cost of a block's damped inverse: ``d^3`` per full factor (a decomposition), ``d`` per
    diagonal one."""
    return (d_in if diag_a else d_in**3) + (d_out if diag_g else d_out**3)


def owners_by_cost(costs: Sequence[int], world_size: int) -> list[int]:
    """The rank that owns each item: largest cost first, each to the least loaded rank (ties: the
    lower rank; equal costs in item order), the greedy list schedule (within 4/3 of the best
    balance). The same on every rank: a pure function of ``costs``."""
    load = [0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner
