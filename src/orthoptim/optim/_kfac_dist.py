"""The data-parallel side of :class:`~orthoptim.optim.kfac.KFAC` / FOP: which group, which rank,
and which rank owns each block's inverse (the collectives are in
:mod:`orthoptim.distributed.curvature`).

``inverse_placement``:

* ``"owner"`` (default; KAISA's memory-optimal placement, kfac-pytorch's ``MEM-OPT``): each block's
  damped inverse lives on one rank, chosen by :func:`~orthoptim.distributed.curvature.\
owners_by_cost` to balance the inversion work. The owner inverts, preconditions the block (FOP: the
  projection, β* and η* too) and broadcasts the direction every step: per-rank inverse memory and
  inversion time shrink about ``W`` times, for one broadcast of the preconditioned gradient per
  step.
* ``"replicated"``: every rank inverts and preconditions every block from the same all-reduced
  factors: no communication beyond the factors (and FOP's half-gradient difference), the whole
  inversion work and inverse memory on every rank.

Factors are all-reduced in both placements (every rank keeps identical running averages, which
keeps ``state_dict()`` and ``torch.distributed.checkpoint`` rank-independent except for the owned
inverses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from orthoptim.curvature import Block
from orthoptim.distributed.curvature import inverse_cost, owners_by_cost
from orthoptim.optim._validation import check_choice

PLACEMENTS = ("owner", "replicated")


@dataclass
class Ranks:
    """This rank's place in the data-parallel group of a K-FAC / FOP optimizer.

    Attributes:
        group: the process group (the default group's ``dist.group.WORLD`` when none was
            given).
        rank, world_size: within ``group``.
        placement: ``inverse_placement``.
        owner: block -> the rank owning its inverse (filled once the blocks are known).
    """

    group: Any
    rank: int
    world_size: int
    placement: str
    owner: dict[Block, int] = field(default_factory=dict)

    def assign(self, blocks: list[Block]) -> None:
        """Give every block not yet placed an owner (``"replicated"``: every rank)."""
        new = [b for b in blocks if b not in self.owner]
        if not new:
            return
        costs = [inverse_cost(b.d_in, b.d_out, b.diag_a, b.diag_g) for b in new]
        for b, r in zip(new, owners_by_cost(costs, self.world_size), strict=True):
            self.owner[b] = r

    def owns(self, block: Block) -> bool:
        """Whether this rank computes ``block``'s inverse and direction."""
        return self.placement == "replicated" or self.owner[block] == self.rank

    @property
    def owner_mode(self) -> bool:
        return self.placement == "owner"


def resolve(process_group: Any, placement: str) -> Ranks | None:
    """The :class:`Ranks` of ``process_group`` (None: the default group, when one exists), or
    None for a single process (no group, or a group of one rank: no collective at all)."""
    check_choice("inverse_placement", placement, PLACEMENTS)
    if process_group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"Invalid process_group: {process_group!r}; no process group exists")
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(process_group)
    if world == 1:
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return Ranks(group, dist.get_rank(group), world, placement)
