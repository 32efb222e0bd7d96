"""What K-FAC records from the blocks' forward and backward passes between two optimizer steps.

Each adapter hooks its module (:meth:`LayerAdapter.install`) so that every call of a block goes
through :meth:`Capture.forward` with the block's input and output. That stores the input (detached,
no copy) on factor steps and registers a tensor hook on the output, which stores the gradient of
the loss with respect to that output during ``backward``. Tensor hooks (rather than module
full-backward hooks) are used because they are cheaper and see the gradient of the output as
produced, even if a later in-place op (``ReLU(inplace=True)``) modifies the output tensor.

**Samples and gradient accumulation.** A forward pre-hook on the model (the *root*) numbers its
forward passes. A block's records know which forward they came from, so:

* a block called several times in one forward (weight reuse) is told apart from gradient
  accumulation (one call in each of several forwards before ``step()``);
* ``N``, the number of samples since the last step, is the sum of the batch sizes of the distinct
  forwards. The accumulated gradient is assumed to be the mean over the union of those samples
  (micro-batch losses divided by ``k`` for equal micro-batches, or any normalisation by the total
  count such as Hugging Face Trainer's token-count normalisation of causal-LM losses); then every
  recorded output gradient is ``1/N`` times a per-sample gradient, and K-FAC scales it by ``N``.
  One backward of one batch is the case ``k = 1``, ``N = B``. FOP's two-pass mode differentiates
  each half's own mean loss and uses each forward's batch instead (``per_forward_scale``). The
  Monte-Carlo records (:meth:`KFAC.sample_fisher`) are per-sample already.

Without root calls (a model whose layers are called directly) every layer call counts as part of
one forward: weight reuse is then handled, accumulation is not.

**Inputs broadcast over the batch.** A block whose input has batch 1 in a forward where other
blocks see a batch (HF GPT-2's position embedding: ``position_ids`` of shape ``(1, T)``, added to
every sequence) receives the *sum* of the samples' output gradients: the per-sample gradients the
factor ``G`` needs are not observable, and ``G`` of a sum depends on how the batch is cut into
micro-batches. :func:`broadcast_blocks` finds such blocks; the optimizer leaves them to the plain
update (named in its warning) and :meth:`Capture.drop` stops recording them.

FOP's one-pass split (``split_dtype`` set) is formed during backward, see :mod:`.split`. Under
data parallelism FOP's halves are the rank groups, and the hooks form instead each block's *local*
gradient (``local_sum``): the sum, over this rank's backward passes and calls, of the block's
weight gradient, taken before ``DistributedDataParallel`` averages it.

:attr:`Capture.ddp_forward` says whether the model ran inside a ``DistributedDataParallel``
forward since the last step (DDP then averages the gradients, so the optimizer must not).

Under ``torch.compile`` the hooks are excluded from tracing (``torch.compiler.disable``): each
hooked layer call is a graph break, the layers' own computation stays compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from orthoptim.curvature.adapters import Block, LayerAdapter
from orthoptim.curvature.adapters.base import Grad
from orthoptim.curvature.split import HalfBatchWeightGrad, add_joined, halves, join

_F = TypeVar("_F", bound=Callable[..., Any])


def _eager(fn: _F) -> _F:
    """Run ``fn`` eagerly under ``torch.compile``: it mutates Python state, which dynamo would
    otherwise guard on and recompile for at every call (a graph break at each call instead)."""
    return cast(_F, torch.compiler.disable(fn))  # type: ignore[no-untyped-call]


@dataclass
class Record:
    """What one block's hooks saw since the last ``clear``."""

    inputs: list[torch.Tensor] = field(default_factory=list)  # detached inputs (factor steps)
    # (grad of output, forward id, per_forward_scale)
    grads: list[tuple[torch.Tensor, int, bool]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)  # kept for a Monte-Carlo backward
    # per-sample Monte-Carlo output gradients, with scale 1
    mc_grads: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    forwards: dict[int, list[int]] = field(default_factory=dict)  # forward id -> [batch, calls]
    n_backward: int = 0  # backward passes through the block seen by the split
    split_ok: bool = True  # False once a call or backward rules the one-pass split out
    # split buffer: [C_1; S_1] after one backward, [-; S_odd] later; [-; local sum] (local_sum)
    U: torch.Tensor | None = None
    b_first: int | None = None  # batch of the first backward when it could be halved
    n_odd: int = 0  # samples of the odd-numbered backward passes
    n_all: int = 0  # samples of all backward passes

    def samples(self) -> int:
        """``N``: the samples of the distinct forwards since the last step."""
        return sum(batch for batch, _ in self.forwards.values())

    def grad_records(self) -> list[tuple[torch.Tensor, float]]:
        """``(grad, scale)`` with ``scale`` making per-sample gradients (see the module doc)."""
        n = self.samples()
        return [(g, self.forwards[f][0] if own else n) for g, f, own in self.grads]


class Capture:
    """Owns the hooks of a set of blocks and their :class:`Record` s.

    The flags ``save_inputs``, ``save_grads`` and ``save_outputs`` are set by the optimizer before
    each step, so that steps which need nothing (K-FAC between factor updates) keep no references.

    ``split_dtype``, when not None (FOP's one-pass mode), asks for the sub-batch gradients of
    every block (:mod:`.split`) in buffers of that dtype. For stock blocks the output is wrapped in
    :class:`~orthoptim.curvature.split.HalfBatchWeightGrad`, so autograd forms the weight gradient
    as two half-batch products and the split costs nothing extra; other blocks get one extra
    product in the gradient hook. Either way no block input or output gradient is kept until
    ``step()``.

    ``local_sum`` (FOP under data parallelism) changes what the split buffers hold: ``U[1]`` of a
    block is the sum of its weight gradients (matrix layout) over every call and backward pass of
    this rank, whatever the calls (:meth:`local_grad`).
    """

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.records: dict[Block, Record] = {}
        self._of_module: dict[nn.Module, list[Block]] = {}
        self.save_inputs = self.save_grads = self.save_outputs = False
        self.split_dtype: torch.dtype | None = None
        self.per_forward_scale = False
        self.local_sum = False
        self.ddp_forward = False  # a root forward since the last clear ran inside DDP
        self.paused = False
        self.forward_id = 0
        self.root_calls = 0  # root forwards since the last clear
        self.dropped: set[Block] = set()  # blocks no longer recorded (see drop)
        self._handles: list[Any] = []

    def attach(
        self, blocks: list[Block], adapters: list[LayerAdapter], root: nn.Module | None
    ) -> None:
        """Hook ``blocks`` (through their ``adapters``) and number ``root``'s forwards."""
        for b in blocks:
            self.blocks.append(b)
            self.records[b] = Record()
            self._of_module.setdefault(b.module, []).append(b)
        self._handles += [h for a in adapters for h in a.install(self)]
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(self._root_forward))

    def blocks_of(self, module: nn.Module) -> list[Block]:
        return self._of_module.get(module, [])

    def _root_forward(self, module: nn.Module, args: Any) -> None:
        self.new_forward()
        # DDP sets _active_ddp_module around the wrapped module's forward; a parameter-list
        # optimizer may have found the wrapper itself as its root
        if isinstance(module, DistributedDataParallel) or (
            getattr(DistributedDataParallel, "_active_ddp_module", None) is not None
        ):
            self.ddp_forward = True

    def new_forward(self) -> None:
        """Start a new forward pass of the model (the root's forward pre-hook calls this)."""
        self.forward_id += 1
        self.root_calls += 1

    @_eager
    def module_hook(self, block: Block, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Forward hook of a module with one block (``LayerAdapter.install``)."""
        return self.forward(block, inputs[0], output)

    @_eager
    def forward(self, block: Block, x: torch.Tensor, out: Any) -> Any:
        """Record one call of ``block`` with input ``x`` and output ``out``; returns the output the
        model should use (``out``, or its split wrapper)."""
        if self.paused or block in self.dropped or not isinstance(out, torch.Tensor):
            return out
        if not (torch.is_grad_enabled() and out.requires_grad):
            return out
        rec = self.records[block]
        batched = block.ops.batched(x)
        entry = rec.forwards.setdefault(self.forward_id, [x.shape[0] if batched else 1, 0])
        entry[1] += 1
        split = self.split_dtype is not None
        plain = entry[1] == 1 and batched and out.is_floating_point()
        if split and not plain and not self.local_sum:
            rec.split_ok = False  # a reused block or an unbatched input is not split
        wrap = split and rec.split_ok and block.stock and plain
        if wrap:
            sink = partial(self._split_done, rec, block)
            w, b = block.forward_weight(), block.forward_bias()
            out = HalfBatchWeightGrad.apply(  # type: ignore[no-untyped-call]
                x, w, b, out.detach(), block, sink
            )
        xd = x.detach()
        if self.save_inputs:
            rec.inputs.append(xd)
        if self.save_outputs:
            rec.outputs.append(out)
        extra = split and rec.split_ok and not wrap  # the split needs one extra product
        if self.save_grads or extra:
            out.register_hook(partial(self._grad, rec, block, xd, self.forward_id,
                                      self.save_grads, extra, self.per_forward_scale))  # fmt: skip
        return out

    def _grad(
        self,
        rec: Record,
        block: Block,
        x: torch.Tensor,
        fwd: int,
        save: bool,
        extra: bool,
        own_scale: bool,
        grad: torch.Tensor,
    ) -> None:
        if self.paused:
            return
        grad = grad.detach()
        if save:
            rec.grads.append((grad, fwd, own_scale))
        if extra and rec.split_ok:
            dt = self.split_dtype
            with torch.no_grad():
                w = block.forward_weight().detach().to(dt)
                xc = x.to(dt) if x.is_floating_point() else x
                if self.local_sum:  # the whole call's gradient, whatever its shape
                    dw, db = block.ops.weight_grad(xc, grad.to(dt), w)
                    first, total = None, (dw, db if block.bias is not None else None)
                else:
                    first, total = halves(block, xc, grad.to(dt), w)
            self._split_done(rec, block, first, total, x.shape[0])

    def _split_done(
        self, rec: Record, block: Block, first: Grad | None, total: Grad, batch: int
    ) -> None:
        """One backward pass through ``block``: keep ``S_1`` of the first and the running sum of
        the odd-numbered passes' contributions (:mod:`.split`)."""
        if self.paused or not rec.split_ok:
            return
        if self.local_sum:
            if rec.U is None:
                shape = (2, block.d_out, block.d_in)
                rec.U = torch.zeros(shape, dtype=self.split_dtype, device=block.weight.device)
            add_joined(total[0], total[1], rec.U[1])
            return
        rec.n_backward += 1
        j = rec.n_backward
        if j == 1:  # U = [C_1; S_1 of this pass]
            shape = (2, block.d_out, block.d_in)
            U = rec.U = torch.empty(shape, dtype=self.split_dtype, device=block.weight.device)
            join(total[0], total[1], U[0])
            if first is not None:
                join(first[0], first[1], U[1])
                rec.b_first = batch
        elif rec.U is not None and j == 2:  # accumulation: U[1] becomes the running S_odd
            rec.U[1].copy_(rec.U[0])
        elif rec.U is not None and j % 2 == 1:
            add_joined(total[0], total[1], rec.U[1])
        if j % 2 == 1:
            rec.n_odd += batch
        rec.n_all += batch

    def halves_of(self, block: Block) -> tuple[torch.Tensor, int, int] | None:
        """``(U, batch, b1)`` with ``U = [g; S_1]`` (``g`` from ``.grad``, ``S_1`` the first
        half's share) for :func:`~orthoptim.curvature.split.avg_diff_`, or None when the block
        cannot be split this step (reused, more backward passes than forwards, a batch of 1)."""
        rec = self.records[block]
        k = rec.n_backward
        if not rec.split_ok or k == 0 or k != len(rec.forwards):
            return None
        if rec.U is None or (k == 1 and rec.b_first is None):
            return None
        block.grad_matrix(out=rec.U[0])
        if rec.b_first is not None and k == 1:
            return rec.U, rec.b_first, (rec.b_first + 1) // 2
        return rec.U, rec.n_all, rec.n_odd

    def drop(self, block: Block) -> None:
        """Stop recording ``block`` (its hooks stay installed and pass the output through)."""
        self.dropped.add(block)
        self.records[block] = Record()

    def local_grad(self, block: Block) -> torch.Tensor | None:
        """``local_sum`` mode: ``U`` with ``U[1]`` this rank's gradient of ``block`` (matrix
        layout, the ``split_dtype``); None when the block took no backward pass here."""
        return self.records[block].U

    def saw_forward(self) -> bool:
        """True when the model (or any block) ran since the last ``clear``."""
        return self.root_calls > 0 or any(r.forwards for r in self.records.values())

    def clear(self) -> None:
        """Drop every stored tensor (called after each optimizer step)."""
        for b in self.records:
            self.records[b] = Record()
        self.root_calls = 0
        self.ddp_forward = False

    def remove(self) -> None:
        """Remove the hooks (and restore replaced forwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def broadcast_blocks(capture: Capture, blocks: list[Block]) -> list[Block]:
    """The blocks whose input had batch 1 in a forward where another block saw a batch > 1 (an
    input broadcast over the batch; see the module doc), from the records since the last clear."""
    wide = {f for b in blocks for f, (batch, _) in capture.records[b].forwards.items() if batch > 1}
    return [
        b for b in blocks
        if any(f in wide and batch == 1 for f, (batch, _) in capture.records[b].forwards.items())
    ]  # fmt: skip
