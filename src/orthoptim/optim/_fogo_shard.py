"""FOGO sharded over ranks: who owns which matrix, and what a step exchanges.

Sharded mode (``FOGO(..., shard=True)``, the default when a process group of two or more ranks
exists, or when the parameters are FSDP2 ``DTensor``s): each param group's same-shape bucket of
matrices is cut into W chunks (:mod:`orthoptim.distributed.megabatch`); the owner of a chunk
keeps its matrices' momentum streams and memory (ZeRO-1), orthogonalizes them in one batch,
corrects them and writes their memory; every rank then applies every update:

* data parallel (DDP: every rank holds whole parameters and the averaged gradients): the owners'
  scaled updates are all-gathered, one ``all_gather_single`` per bucket (:meth:`Exchange.gather`);
* FSDP2 (``fully_shard``: parameters and gradients are ``Shard(0)`` row blocks on a 1-D mesh):
  the gradient row shards go to each matrix's owner (``all_to_all``), and the updates' row
  shards come back (``all_to_all``), batched per bucket.

With each update travels a flag (an extra element, resp. column): whether its owner stepped the
matrix (it had a gradient there), so every rank applies exactly the owners' steps and the
replicas stay identical. The skip flag of the non-finite policy is all-reduced first, so all
ranks drop the same steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Shard

from orthoptim.distributed import megabatch
from orthoptim.memory.bucket import row_selector


@dataclass(frozen=True)
class Sharding:
    """The ranks FOGO's matrices are spread over.

    Attributes:
        group: the process group.
        rank: this rank's index in it.
        world: number of ranks.
        fsdp: the parameters are FSDP2 ``DTensor`` row shards (else whole, data parallel).
        replicated: every rank steps every matrix (``shard=False``), chunk by chunk as the
            sharded step would (batched kernels may round differently for another batch size:
            this keeps the two modes bit for bit equal), and nothing is exchanged.
    """

    group: dist.ProcessGroup
    rank: int
    world: int
    fsdp: bool
    replicated: bool = False


def sharding_for(
    param_groups: list[dict[str, Any]], shard: bool, process_group: dist.ProcessGroup | None
) -> Sharding | None:
    """The sharding FOGO uses for these parameters (None: one process). Refuses what it cannot
    shard with ``ValueError``."""
    params = [p for g in param_groups for p in g["params"]]
    dtensors = [p for p in params if isinstance(p, DTensor)]
    if dtensors:
        if len(dtensors) != len(params):
            raise ValueError(
                "Invalid params: FOGO takes either all DTensor (FSDP2) parameters or none; "
                f"got {len(dtensors)} DTensors among {len(params)} parameters"
            )
        mesh = dtensors[0].device_mesh
        for p in dtensors:
            if p.device_mesh != mesh or mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"Invalid params: FOGO shards over FSDP2's 1-D mesh with Shard(0) "
                    f"placements; got a parameter on mesh {p.device_mesh} with placements "
                    f"{tuple(p.placements)} (tensor-parallel and HSDP meshes are not supported)"
                )
        if not shard:
            raise ValueError(
                "Invalid shard: False with FSDP2 (DTensor) parameters; every rank holds only "
                "row shards of the matrices, so FOGO must assemble them at their owners "
                "(shard=True)"
            )
        return Sharding(mesh.get_group(), mesh.get_local_rank(), mesh.size(), True)
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(process_group)
    if world == 1:  # world size 1 is exactly the single-process optimizer
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    assert group is not None  # a process group is initialised
    return Sharding(group, dist.get_rank(group), world, False, not shard)


def owned(chunks: megabatch.Chunks | None, sharding: Sharding | None, size: int) -> range:
    """Indices of a bucket's matrices whose state this rank holds and whose updates it
    computes (all of them unless sharded)."""
    if chunks is None or sharding is None or sharding.replicated:
        return range(size)
    return chunks.owned(sharding.rank)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (its local shard for a DTensor, itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def matrix_cost(shape: Sequence[int], streams: int) -> float:
    """Newton-Schulz FLOPs of one matrix (up to a constant): streams * min(m, n)^2 max(m, n)."""
    m, n = shape
    return float(streams * min(m, n) ** 2 * max(m, n))


@dataclass(frozen=True)
class Exchange:
    """What one bucket's sharded step sends: built per step from the bucket.

    Attributes:
        chunks: the bucket's ownership.
        sharding: the ranks.
        shape: the matrices' shape (m, n).
        dtype, device: of the parameters (their local shards).
    """

    chunks: megabatch.Chunks
    sharding: Sharding
    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def _payload(
        self, updates: torch.Tensor, take: Sequence[int], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """(k, *shape) zeros with ``updates`` at the positions ``take`` of this rank's chunk
        and, in their last column, 1: the owner stepped them."""
        payload = torch.zeros(self.chunks.chunk, *shape, dtype=self.dtype, device=self.device)
        if take:
            at = row_selector(take, self.device)
            payload[at, ..., :-1] = updates.reshape(len(take), *shape[:-1], -1).to(self.dtype)
            payload[at, ..., -1] = 1
        return payload

    def gather(
        self, updates: torch.Tensor, take: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data parallel: every owner's updates ((len(take), m, n) for the positions ``take``
        of this rank's chunk) to every rank. Returns the bucket's (N, m, n) updates and (N,)
        bool flags (the owner stepped the matrix)."""
        m, n = self.shape
        full = megabatch.gather_chunks(
            self._payload(updates, take, (m * n + 1,)), self.chunks, self.sharding.group
        )
        return full[:, : m * n].view(-1, m, n), full[:, m * n] > 0

    def owner_grads(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """FSDP2: the whole gradients (k, m, n) of this rank's chunk, assembled from every
        rank's row shards of the bucket's ``params`` (a rank without a gradient sends zeros)."""
        m, n = self.shape
        rows = megabatch.row_sizes(m, self.sharding.world)
        mine = rows[self.sharding.rank]
        shards = torch.zeros(len(params), mine, n, dtype=self.dtype, device=self.device)
        for i, p in enumerate(params):
            if p.grad is not None:
                shards[i] = local(p.grad).reshape(mine, n)
        return megabatch.rows_to_owners(shards, self.chunks, rows, self.sharding.group)

    def scatter(
        self, updates: torch.Tensor, take: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FSDP2: each owner's updates back to the ranks as row shards. Returns this rank's
        rows of the bucket's updates (N, rows, n) and the (N,) bool flags."""
        m, n = self.shape
        rows = megabatch.row_sizes(m, self.sharding.world)
        mine = megabatch.rows_from_owners(
            self._payload(updates, take, (m, n + 1)), self.chunks, rows, self.sharding.rank,
            self.sharding.group,
        )  # fmt: skip
        if rows[self.sharding.rank] == 0:  # an empty shard: nothing to update
            return mine[..., :n], torch.zeros(self.chunks.size, dtype=torch.bool,
                                              device=self.device)  # fmt: skip
        return mine[..., :n], mine[:, 0, n] > 0
