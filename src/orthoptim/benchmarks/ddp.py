"""Data parallelism of one benchmark run: the training-loop side of a ``torchrun`` launch.

With ``W`` processes every rank draws the **same global batch** from the same seeded generator
as a single-process run and keeps its contiguous shard, rows ``[r B/W, (r+1) B/W)`` (:meth:`shard`;
``B`` must be a multiple of ``W``). The model is wrapped in ``DistributedDataParallel``, whose
gradient all-reduce averages the shard means into the global-batch mean, so with the same seed a
distributed run trains on exactly the data of the single-process run and every optimizer sees the
global-batch gradient (equal to the single-process one up to float rounding).

Evaluation runs once, on rank 0, on the unwrapped model, and its value is broadcast
(:meth:`from_main`): every rank takes the same decisions (early stopping at a target) without
evaluating, and the numbers are those of the single-process evaluation code on the same
parameters. The per-step training loss is averaged over the ranks (:meth:`mean`), so recorded loss
curves are global-batch losses.

Limits: BatchNorm layers normalise with per-rank statistics (DDP broadcasts rank 0's running
statistics every forward, so replicas stay identical, but a BatchNorm model's run is not the
single-process run); dropout would draw the same masks on every rank (the LM tasks refuse
``dropout > 0`` under data parallelism).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import dist_info

__all__ = ["DataParallel", "once"]

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """The process group a run is split over, and this rank's place in it.

    Build it with :meth:`from_process_group` once the default group exists.

    Attributes:
        rank: this process's rank.
        world_size: number of processes.
        device: where this rank's model and batches live.
    """

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_process_group(cls, device: torch.device | str = "cpu") -> DataParallel:
        """The default process group's rank and size, with ``device`` for this rank.

        Args:
            device: the rank's device (``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo).
        """
        info = dist_info()
        if not info.initialized:
            raise ValueError("Invalid state: no process group; call init_process_group first")
        return cls(info.rank, info.world_size, torch.device(device))

    @property
    def is_main(self) -> bool:
        """Rank 0: evaluates, records, prints."""
        return self.rank == 0

    def local_size(self, batch_size: int, name: str = "batch_size") -> int:
        """Rows per rank of a global batch of ``batch_size``; ValueError unless ``W`` divides it.

        Args:
            batch_size: the global batch.
            name: the setting to name in the error.
        """
        if batch_size % self.world_size:
            raise ValueError(
                f"Invalid {name}: {batch_size}; the global batch is split evenly over "
                f"{self.world_size} processes, so it must be a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows of the global ``batch`` (first dimension).

        Args:
            batch: the global batch (indices, inputs or targets).
        """
        b = self.local_size(len(batch))
        return batch[self.rank * b : (self.rank + 1) * b]

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        """``model`` moved to :attr:`device` and wrapped in ``DistributedDataParallel``.

        Build the optimizer on ``model`` itself (parameter names without DDP's ``module.``
        prefix); run the training forward through the wrapper, evaluation through ``model``
        (a forward of the wrapper on one rank only would wait for the others).

        Args:
            model: the replica of this rank, identical on every rank.
        """
        model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of ``value`` over the ranks (a new tensor; for logging losses).

        Args:
            value: a tensor on :attr:`device`, the same shape on every rank.
        """
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size

    def from_main(self, fn: Callable[[], float]) -> float:
        """``fn()`` computed on rank 0 only and broadcast: every rank returns rank 0's value.

        Args:
            fn: a computation that needs no collective (e.g. evaluating the unwrapped model).
        """
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.is_main:
            value.fill_(fn())
        dist.broadcast(value, src=0)
        return float(value)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects).

        Args:
            obj: the value (only rank 0's is used).
        """
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def once(parallel: DataParallel | None, fn: Callable[[], float]) -> float:
    """``fn()`` in a single process, :meth:`DataParallel.from_main` under data parallelism.

    Args:
        parallel: the run's data parallelism, or None.
        fn: the computation (an evaluation of the unwrapped model).
    """
    return fn() if parallel is None else parallel.from_main(fn)
