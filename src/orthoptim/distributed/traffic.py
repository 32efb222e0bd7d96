"""Count the collectives a block of code runs, and the bytes each one carries.

:class:`count_collectives` is a ``TorchDispatchMode``: every ``torch.distributed`` collective
reaches the dispatcher as a ``c10d`` op (``dist.all_reduce``, the object collectives through their
tensor ops, DDP's gradient buckets and buffer broadcasts, FSDP2's all-gathers and reduce-scatters)
or as a functional collective (``_c10d_functional``, DTensor's redistributions), so one mode sees
them all, whoever calls them. Checked on CPU with gloo (tests/test_dist_traffic.py); a dispatch
mode is thread-local, which covers DDP's backward on CPU, where the autograd engine runs in the
calling thread.

Bytes are the **payload** a rank hands to the collective, counted once per call on that rank: the
tensor of an in-place collective (all-reduce, broadcast, reduce), the input shard of a gather, the
whole input of a scatter, reduce-scatter or all-to-all, the tensor of a send or receive. What
crosses the wire depends on the algorithm: a ring all-reduce sends about ``2 (W - 1) / W`` times
its payload per rank, a ring all-gather ``W - 1`` times its shard. Barriers count as calls with
zero bytes.

The mode intercepts every op in its block, so it slows the block down: time steps outside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_collectives"]

_NAMESPACES = ("c10d", "_c10d_functional")
# c10d / functional ops that move no data of their own.
_NOT_COLLECTIVES = frozenset(("wait_tensor", "_wrap_tensor_autograd", "check_for_nan"))
_BARRIERS = frozenset(("barrier", "monitored_barrier_"))
# Schema argument names that hold what this rank sends (or, for recv, receives).
_PAYLOAD_ARGS = frozenset(
    ("tensors", "tensor", "input", "inputs", "input_tensor", "input_tensors", "input_list")
)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _payload(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    total = 0
    for i, arg in enumerate(func._schema.arguments):
        if arg.name not in _PAYLOAD_ARGS:
            continue
        if i < len(args):
            total += _nbytes(args[i])
        elif arg.name in kwargs:
            total += _nbytes(kwargs[arg.name])
    return total


class count_collectives(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Context manager counting collective calls and payload bytes by collective name.

    Names are the dispatcher's op names without the trailing underscore: ``allreduce``,
    ``broadcast``, ``allgather``, ``_allgather_base``, ``_reduce_scatter_base``, ``alltoall_base``
    for ``torch.distributed``'s ops; functional collectives keep their names (``all_reduce``,
    ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ...).

    Usage: ``with count_collectives() as traffic:`` around ``loss.backward()`` (where DDP
    all-reduces its buckets) and ``optimizer.step()``, then read ``traffic.bytes["allreduce"]``
    and ``traffic.calls["allreduce"]``.

    Attributes:
        calls: collective name -> number of calls.
        bytes: collective name -> payload bytes summed over the calls (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __enter__(self) -> count_collectives:
        super().__enter__()  # type: ignore[no-untyped-call]
        return self

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name
        namespace, _, op = name.partition("::")
        if namespace in _NAMESPACES and op not in _NOT_COLLECTIVES:
            key = op[:-1] if op.endswith("_") else op
            self.calls[key] += 1
            self.bytes[key] += 0 if op in _BARRIERS else _payload(func, args, kwargs)
        return func(*args, **kwargs)

    @property
    def total_bytes(self) -> int:
        """Payload bytes of every collective counted."""
        return sum(self.bytes.values())

    def table(self) -> dict[str, dict[str, int]]:
        """``{name: {"calls": n, "bytes": b}}``, names sorted (JSON-ready)."""
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k]} for k in sorted(self.calls)}
