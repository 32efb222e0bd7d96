"""Which rank am I, how many are there, and the process group of a ``torchrun`` launch.

``torch.distributed`` is the transport (gloo on CPU, NCCL on CUDA); nothing here sends data. The
helpers answer the same questions with or without a process group, so an optimizer or a training
loop has one code path: without a group (or with one of size 1) it is a single process.

A ``torchrun`` launch is recognised by the variables torchrun sets for every worker
(:data:`TORCHRUN_VARS`). :func:`process_group_from_env` initialises the default group from them
(``init_method="env://"``), picks the rank's device (``cuda:LOCAL_RANK`` with the NCCL backend
when CUDA is available, else the CPU with gloo: the same code with another backend) and destroys
the group when the block ends, also when it ends with an exception.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "TORCHRUN_VARS",
    "DistInfo",
    "dist_info",
    "launched_by_torchrun",
    "rank_device",
    "backend_for",
    "process_group_from_env",
]

# What torchrun (torch.distributed.run) exports to each worker; env:// reads the first five.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a process group.

    Attributes:
        rank: rank in the group (0 without a group).
        world_size: processes in the group (1 without a group).
        initialized: whether a process group exists (a group of size 1 still counts).
    """

    rank: int
    world_size: int
    initialized: bool

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that records results and prints."""
        return self.rank == 0


def dist_info(group: dist.ProcessGroup | None = None) -> DistInfo:
    """Rank and world size in ``group`` (default: the default group); ``(0, 1)`` without one.

    Args:
        group: a process group, or None for the default (world) group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(0, 1, False)
    return DistInfo(dist.get_rank(group), dist.get_world_size(group), True)


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (default ``os.environ``) holds every variable of :data:`TORCHRUN_VARS`.

    Args:
        environ: the environment to inspect.
    """
    env = os.environ if environ is None else environ
    return all(k in env for k in TORCHRUN_VARS)


def rank_device(local_rank: int) -> torch.device:
    """``cuda:local_rank`` when CUDA is available, else the CPU.

    Args:
        local_rank: the process's index on its machine (torchrun's ``LOCAL_RANK``).
    """
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"Invalid LOCAL_RANK: {local_rank}; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s): launch at most that many processes"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on ``device``: ``"nccl"`` for CUDA, else ``"gloo"``.

    Args:
        device: the device the rank's tensors live on.
    """
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group_from_env(timeout_s: float | None = None) -> Iterator[torch.device]:
    """Initialise the default process group from a torchrun environment; yield this rank's device.

    The group is destroyed when the block exits, normally or by an exception (a rank that fails
    leaves; torchrun then stops the others). With CUDA the current device is set to the rank's.

    Args:
        timeout_s: seconds a collective may wait before failing (default: torch's).

    Raises:
        ValueError: the environment is not a torchrun worker's (a variable is missing), or a
            process group is already initialised.
    """
    missing = [k for k in TORCHRUN_VARS if k not in os.environ]
    if missing:
        raise ValueError(f"Invalid environment: {missing} not set; launch with torchrun")
    if dist.is_initialized():
        raise ValueError("Invalid state: a process group is already initialised")
    device = rank_device(int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend_for(device), init_method="env://", timeout=timeout)
    try:
        yield device
    finally:
        dist.destroy_process_group()
