"""Which trained parameters of a model K-FAC preconditions, and why the others are not.

:func:`find_blocks` walks the model's modules (parents before children), asks each module's
adapter (:mod:`orthoptim.curvature.adapters`) for its blocks, and names every trained **matrix**
parameter (two or more dimensions of size > 1) that gets no block, with the reason users see in
the optimizer's warning:

* its layer kind has no adapter (``nn.GRU``, ``nn.ConvTranspose2d``, a positional embedding
  used directly by its module, ...);
* its adapter refuses this module (grouped convolution, ``add_bias_kv`` attention, ...);
* it is **shared** by several modules (tied weights: an LM head tied to the token embedding).
  The rule: such a weight is not preconditioned; no module's factors are applied to a gradient
  that other modules contributed to. (One module called several times is not sharing: its calls
  are extra locations, K-FAC-expand.)

Vectors (biases of unsupported layers, norm gains, class tokens) get the plain update silently;
parameters the user lists in ``exclude`` are plain by request and not named.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orthoptim.curvature.adapters import Block, LayerAdapter, adapter_for


@dataclass
class Layout:
    """What :func:`find_blocks` found.

    Attributes:
        blocks: the blocks to precondition, in module order.
        adapters: the adapters of the modules that have blocks (they install the hooks).
        plain: ``{parameter name: reason}`` of matrix parameters left to the plain update.
        diagonal: ``{block name: note}`` of blocks with a diagonal factor (``max_factor_dim``).
        excluded: names of parameters excluded on request.
    """

    blocks: list[Block] = field(default_factory=list)
    adapters: list[LayerAdapter] = field(default_factory=list)
    plain: dict[str, str] = field(default_factory=dict)
    diagonal: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def is_matrix(p: torch.Tensor) -> bool:
    """Two or more dimensions of size > 1 (a class token ``(1, 1, d)`` is a vector)."""
    return sum(s > 1 for s in p.shape) >= 2


def kind_name(module: nn.Module) -> str:
    cls = type(module)
    prefix = "nn." if cls.__module__.startswith("torch.nn") else ""
    return prefix + cls.__name__


def _excluded(name: str, p: torch.Tensor, exclude: Iterable[str | torch.Tensor]) -> bool:
    for e in exclude:
        if isinstance(e, torch.Tensor):
            if e is p:
                return True
        elif fnmatch.fnmatchcase(name, e):
            return True
    return False


def find_blocks(
    root: nn.Module,
    trained: dict[Any, str],
    *,
    max_factor_dim: int | None = None,
    exclude: Iterable[str | torch.Tensor] = (),
) -> Layout:
    """The blocks of ``root`` among ``trained`` (``{parameter: name}``), see the module docstring.

    Args:
        root: the model.
        trained: the parameters the optimizer trains, with their names.
        max_factor_dim: a factor side larger than this is kept diagonal (None: never).
        exclude: parameters (tensors) or name patterns (``fnmatch``, e.g. ``"lm_head.*"``) that
            get the plain update on purpose.
    """
    layout = Layout()
    exclude = tuple(exclude)
    owners: dict[Any, list[tuple[str, nn.Module]]] = {}
    for mname, m in root.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(p, []).append((mname, m))
    name_of = {}
    for p, n in trained.items():
        if _excluded(n, p, exclude):
            layout.excluded.append(n)
        elif len(owners.get(p, ())) > 1:
            if is_matrix(p):
                mods = ", ".join(f"{mn or '<root>'} ({kind_name(m)})" for mn, m in owners[p])
                layout.plain[n] = f"shared by {mods}: tied weights are not preconditioned"
        else:
            name_of[p] = n
    claimed: set[nn.Module] = set()
    covered: set[Any] = set()
    for _, m in root.named_modules():
        if m in claimed:
            continue
        adapter = adapter_for(m)
        if adapter is None:
            continue
        claimed.update(adapter.claims())
        reason = adapter.refuse()
        if reason is not None:
            for p in m.parameters():
                if p in name_of and is_matrix(p):
                    layout.plain[name_of[p]] = reason
                covered.add(p)
            continue
        blocks = [b for b in adapter.blocks(name_of) if b.weight.numel() > 0]
        for block in blocks:
            _size_rule(block, max_factor_dim, layout)
            layout.blocks.append(block)
            covered.update(p for p in (block.weight, block.bias) if p is not None)
        if blocks:
            layout.adapters.append(adapter)
    for p, n in name_of.items():
        if p in covered or not is_matrix(p) or n in layout.plain:
            continue
        owner = [m for _, m in owners.get(p, ())]
        if not owner:
            layout.plain[n] = "not a parameter of the model's modules"
        elif adapter_for(owner[0]) is None:
            layout.plain[n] = f"{kind_name(owner[0])} has no K-FAC adapter"
        else:
            layout.plain[n] = f"not a weight K-FAC preconditions in {kind_name(owner[0])}"
    return layout


def _size_rule(block: Block, max_factor_dim: int | None, layout: Layout) -> None:
    block.diag_a = block.ops.diag_input
    if max_factor_dim is None:
        return
    notes = []
    if not block.ops.diag_input and block.d_in > max_factor_dim:
        block.diag_a = True
        notes.append(f"A ({block.d_in})")
    if block.d_out > max_factor_dim:
        block.diag_g = True
        notes.append(f"G ({block.d_out})")
    if notes:
        layout.diagonal[block.name] = " and ".join(notes) + f" > max_factor_dim={max_factor_dim}"
