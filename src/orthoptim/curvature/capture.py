"""Hooks that record what K-FAC needs from ``nn.Linear`` and ``nn.Conv2d`` layers.

A forward hook stores the layer input (detached, no copy) and registers a tensor hook on the
output, which stores the gradient of the loss with respect to that output during ``backward``.
Tensor hooks (rather than module full-backward hooks) are used because they are cheaper and see
the gradient of the output as produced, even if a later in-place op (``ReLU(inplace=True)``)
modifies the output tensor.

Every gradient record carries ``scale``, the number that turns it into a per-sample gradient: the
leading (batch) size ``B`` of the forward that produced it, because the training loss is assumed
to be a mean over that dimension; Monte-Carlo records (sum-reduced sampled loss) use 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from orthoptim.curvature.split import (
    HalfBatchWeightGrad,
    first_half_pair,
    has_stock_forward,
    splittable,
)


def is_supported(module: nn.Module) -> bool:
    """True for layers K-FAC preconditions; everything else gets the plain outer update.

    Supported: ``nn.Linear`` (any leading dims) and ``nn.Conv2d`` with ``groups == 1``, zero padding
    given as integers (im2col needs explicit padding), trainable weight and (if any) trainable bias.
    Grouped/depthwise convolutions, ``padding='same'`` and non-zero padding modes are rejected here
    (they are not preconditioned), not silently approximated.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return False
        if isinstance(module.padding, str):
            return False
    elif not isinstance(module, nn.Linear):
        return False
    if not module.weight.requires_grad:
        return False
    return module.bias is None or module.bias.requires_grad


@dataclass
class Record:
    """What one layer's hooks saw since the last ``clear``."""

    inputs: list = field(default_factory=list)  # detached layer inputs
    grads: list = field(default_factory=list)  # (grad of output, scale)
    outputs: list = field(default_factory=list)  # outputs kept for a Monte-Carlo backward
    mc_grads: list = field(default_factory=list)  # (grad of sampled loss wrt output, scale)
    splits: list = field(default_factory=list)  # (S_1 buffer, batch) per backward (one-pass FOP)
    n_forward: int = 0
    n_backward: int = 0


class Capture:
    """Owns the hooks of a set of named layers and their :class:`Record` s.

    The flags ``save_inputs``, ``save_grads`` and ``save_outputs`` are set by the optimizer before
    each step, so that steps which need nothing (K-FAC between factor updates) keep no references.

    ``split_dtype``, when not None (FOP's one-pass mode), asks for the first-half weight gradient
    ``S_1`` of every layer seen by exactly one forward and one backward since the last ``clear``,
    as a ``(2, d_out, d_in [+1])`` buffer in that dtype (see :mod:`.split`), appended to
    ``Record.splits``; a reused layer or a second backward clears it instead. For stock layers the
    forward hook wraps the output in :class:`~orthoptim.curvature.split.HalfBatchWeightGrad`, so
    autograd forms the weight gradient as two half-batch products and ``S_1`` costs nothing extra;
    other layers get one half-size product in the gradient hook. Either way no layer input or
    output gradient is kept until ``step()``.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = dict(modules)
        self.records = {name: Record() for name in self.modules}
        self.save_inputs = self.save_grads = self.save_outputs = False
        self.split_dtype: torch.dtype | None = None
        self.paused = False
        self._handles = [
            m.register_forward_hook(partial(self._forward, n)) for n, m in self.modules.items()
        ]

    def _forward(self, name, module, inputs, output):
        if self.paused or not (torch.is_grad_enabled() and output.requires_grad):
            return None
        rec = self.records[name]
        x = inputs[0].detach()
        rec.n_forward += 1
        dtype, fused = self.split_dtype, False
        if dtype is not None and rec.n_forward > 1:
            rec.splits.clear()  # a reused layer will not be split
        if dtype is not None and has_stock_forward(module):
            # only a layer's first forward can be split; later ones mark it unsplittable
            fused = rec.n_forward == 1 and splittable(module, x, output)
            if fused:
                sink = partial(self._split_done, rec)
                w, b = module.weight, module.bias
                output = HalfBatchWeightGrad.apply(inputs[0], w, b, output.detach(), module, sink,
                                                   dtype)  # fmt: skip
            dtype = None  # no extra product in the gradient hook
        if self.save_inputs:
            rec.inputs.append(x)
        if self.save_outputs:
            rec.outputs.append(output)
        if self.save_grads or self.split_dtype is not None:
            output.register_hook(partial(self._grad, rec, module, x, self.save_grads, dtype))
        return output if fused else None

    def _split_done(self, rec: Record, split) -> None:
        if self.paused:
            return
        if rec.n_forward != 1 or rec.n_backward != 1:
            rec.splits.clear()  # reused layer or a further backward: it will not be split
        else:
            rec.splits.append(split)

    def _grad(self, rec: Record, module, x, save_grad: bool, split_dtype, grad: torch.Tensor):
        if self.paused:
            return
        rec.n_backward += 1
        grad = grad.detach()
        if save_grad:
            rec.grads.append((grad, float(x.shape[0])))
        if split_dtype is not None:
            if rec.n_forward != 1 or rec.n_backward != 1:
                rec.splits.clear()
                return
            with torch.no_grad():
                out = first_half_pair(module, x, grad, split_dtype)
            if out is not None:
                rec.splits.append(out)

    def clear(self) -> None:
        """Drop every stored tensor (called after each optimizer step)."""
        for name in self.records:
            self.records[name] = Record()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
