"""``torch.distributed`` plumbing shared by the optimizers and the benchmarks.

* :func:`dist_info`: rank and world size, ``(0, 1)`` without a process group.
* :func:`process_group_from_env`: the default group of a ``torchrun`` worker (gloo on CPU, NCCL on
  CUDA), destroyed on exit.
* :class:`count_collectives`: calls and payload bytes of every collective in a block.
* :mod:`.curvature`: the collectives of data-parallel K-FAC / FOP and KAISA's layer ownership.

Nothing here implements a transport: collectives are ``torch.distributed``'s.
"""

from orthoptim.distributed.group import (
    TORCHRUN_VARS,
    DistInfo,
    backend_for,
    dist_info,
    launched_by_torchrun,
    process_group_from_env,
    rank_device,
)
from orthoptim.distributed.traffic import count_collectives

__all__ = [
    "TORCHRUN_VARS",
    "DistInfo",
    "backend_for",
    "count_collectives",
    "dist_info",
    "launched_by_torchrun",
    "process_group_from_env",
    "rank_device",
]
