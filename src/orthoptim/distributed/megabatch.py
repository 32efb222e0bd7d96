"""Ownership of same-shape matrices across ranks, and the collectives of a sharded step.

A *bucket* is a list of N same-shape matrices that an optimizer processes as one batch (one
batched Newton-Schulz). Sharded over W ranks, the bucket is the unit of ownership (the
"megabatch" of microsoft/dion): it is padded to W k matrices (k = ceil(N / W)) and cut into W
contiguous chunks of k; chunk j (matrices [j k, (j + 1) k) within [0, N)) is owned by rank
``owner[j]``. The owner keeps those matrices' optimizer state and computes their updates in one
batch; the others receive the updates. Every rank computes the same :class:`Chunks` from the
same shapes, so nothing about ownership is communicated.

* :func:`assign_chunks` spreads the chunks of all buckets over the ranks so that the
  per-matrix cost (e.g. Newton-Schulz FLOPs) each rank owns is balanced: the short or empty
  last chunks of the buckets go to different ranks.
* :func:`gather_chunks` (data parallel: every rank holds whole matrices): every rank's (k, ...)
  chunk to all ranks, reassembled in matrix order: one ``all_gather_single`` per bucket.
* :func:`rows_to_owners` / :func:`rows_from_owners` (FSDP2: every rank holds a contiguous block
  of rows of every matrix): an ``all_to_all`` that assembles each owned matrix from its row
  shards at its owner, and the one that sends the owner's results back as row shards.

Everything is ``torch.distributed``'s collectives (gloo on CPU, NCCL on CUDA); the row shards
follow ``torch.chunk`` (FSDP2's ``Shard(0)``), padded to a common size for the all-to-all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "Chunks",
    "assign_chunks",
    "gather_chunks",
    "row_sizes",
    "rows_from_owners",
    "rows_to_owners",
]


@dataclass(frozen=True)
class Chunks:
    """How a bucket of ``size`` matrices is cut over ``world`` ranks.

    Attributes:
        size: N, matrices in the bucket.
        world: W, ranks.
        chunk: k = ceil(N / W), matrices per chunk (the last chunks may be short or empty).
        owner: ``owner[j]`` is the rank that owns chunk j (a permutation of the ranks).
    """

    size: int
    world: int
    chunk: int
    owner: tuple[int, ...]

    def held_by(self, rank: int) -> int:
        """The chunk ``rank`` owns."""
        return self.owner.index(rank)

    def owned(self, rank: int) -> range:
        """Indices (in the bucket) of the matrices ``rank`` owns."""
        j = self.held_by(rank)
        return range(min(j * self.chunk, self.size), min((j + 1) * self.chunk, self.size))


@functools.lru_cache(maxsize=256)
def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A constant index on ``device``, made once (a step copies nothing to the device)."""
    return torch.tensor(values, device=device)


def assign_chunks(
    buckets: Sequence[tuple[int, float]], world: int, load: list[float] | None = None
) -> list[Chunks]:
    """Chunks of every bucket, balanced over ``world`` ranks.

    Args:
        buckets: per bucket, (number of matrices, cost of one matrix).
        world: number of ranks.
        load: cost each rank already owns (updated in place): buckets planned later (another
            param group) continue the balance without moving what is already owned.

    Returns:
        One :class:`Chunks` per bucket, in order. Greedy: buckets by decreasing chunk cost,
        each bucket's chunks by decreasing size to the ranks with the least cost so far
        (ties: lower rank); deterministic, so every rank computes the same assignment.
    """
    load = [0.0] * world if load is None else load
    out: dict[int, Chunks] = {}
    order = sorted(range(len(buckets)), key=lambda b: -buckets[b][1] * math.ceil(
        buckets[b][0] / world))  # fmt: skip
    for b in order:
        size, cost = buckets[b]
        k = math.ceil(size / world)
        sizes = [max(0, min(k, size - j * k)) for j in range(world)]
        owner = [0] * world
        ranks = sorted(range(world), key=lambda r: (load[r], r))
        for j, r in zip(sorted(range(world), key=lambda j: (-sizes[j], j)), ranks, strict=True):
            owner[j] = r
            load[r] += sizes[j] * cost
        out[b] = Chunks(size, world, k, tuple(owner))
    return [out[b] for b in range(len(buckets))]


def gather_chunks(
    local: torch.Tensor, chunks: Chunks, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Every rank's chunk, in matrix order: (N, ...) from this rank's (k, ...) ``local``.

    One ``all_gather_single``; the pad matrices of short chunks are dropped.
    """
    w, k = chunks.world, chunks.chunk
    out = torch.empty((w * k, *local.shape[1:]), dtype=local.dtype, device=local.device)
    dist.all_gather_single(out, local.contiguous(), group=group)
    by_rank = out.view(w, k, *local.shape[1:])
    by_chunk = by_rank.index_select(0, _index(chunks.owner, local.device))
    return by_chunk.reshape(w * k, *local.shape[1:])[: chunks.size]


def row_sizes(rows: int, world: int) -> list[int]:
    """Rows of each rank's shard of a dim of size ``rows`` cut like ``torch.chunk`` (FSDP2's
    ``Shard(0)``): ceil(rows / W) each, the last ones shorter or empty."""
    per = math.ceil(rows / world) if rows else 0
    return [max(0, min(per, rows - r * per)) for r in range(world)]


def rows_to_owners(
    shards: torch.Tensor,
    chunks: Chunks,
    rows: Sequence[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Assemble, at each owner, the whole matrices of its chunk from every rank's row shards.

    Args:
        shards: this rank's rows of every matrix of the bucket, (N, rows[rank], n).
        chunks: the bucket's ownership.
        rows: every rank's number of rows (:func:`row_sizes`).
        group: the ranks (default: the world).

    Returns:
        (k, sum(rows), n): the owned chunk's matrices (pad matrices are zero).
    """
    w, k, pad = chunks.world, chunks.chunk, max(rows)
    n = shards.shape[-1]
    send = shards.new_zeros(w * k, pad, n)
    send[: chunks.size, : shards.shape[1]] = shards
    # To rank r goes the chunk it owns.
    held = _index(tuple(chunks.held_by(r) for r in range(w)), shards.device)
    send = send.view(w, k, pad, n).index_select(0, held)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r]: rank r's rows of my chunk
    return torch.cat([recv[r, :, : rows[r]] for r in range(w)], dim=1)


def rows_from_owners(
    full: torch.Tensor,
    chunks: Chunks,
    rows: Sequence[int],
    rank: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The reverse of :func:`rows_to_owners`: each owner's (k, m, n) results, cut into row
    shards and sent to the ranks that hold them. Returns this rank's rows of every matrix of
    the bucket, (N, rows[rank], n)."""
    w, k, pad = chunks.world, chunks.chunk, max(rows)
    n = full.shape[-1]
    send = full.new_zeros(w, k, pad, n)
    start = 0
    for r in range(w):
        send[r, :, : rows[r]] = full[:, start : start + rows[r]]
        start += rows[r]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r]: my rows of rank r's chunk
    # chunk j came from owner[j]
    by_chunk = recv.index_select(0, _index(chunks.owner, full.device)).reshape(w * k, pad, n)
    return by_chunk[: chunks.size, : rows[rank]]
