"""Which layers a K-FAC / FOP optimizer preconditions, and telling users about the rest.

:class:`LayerCoverage` is the part of :class:`~orthoptim.optim.kfac.KFAC` that finds the model's
blocks (:func:`orthoptim.curvature.find_blocks`) when it is built with the model, or on the
model's first forward when it is built with parameters (:class:`~orthoptim.curvature.owners.\
OwnerSearch`), hooks them, and says once what it does not precondition: a
:class:`PlainUpdateWarning` naming every trained matrix left to the plain outer update with the
reason, a :class:`DiagonalFactorWarning` for factors kept diagonal; a model with nothing to
precondition is a ``ValueError``, hooks that never fire while the model runs a ``RuntimeError``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from orthoptim.curvature import Block, Capture
from orthoptim.curvature.capture import broadcast_blocks
from orthoptim.curvature.discovery import find_blocks, is_matrix
from orthoptim.curvature.owners import OwnerSearch, compiled_modules, reset_compiled


class PlainUpdateWarning(UserWarning):
    """Matrix parameters that K-FAC / FOP leave to the plain outer update (named, with why)."""


class DiagonalFactorWarning(UserWarning):
    """Blocks with a factor kept diagonal because it is larger than ``max_factor_dim``."""


def check_exclude(exclude: Any) -> tuple[str | torch.Tensor, ...]:
    """Validate ``exclude`` (names, ``fnmatch`` patterns or tensors); a single one is allowed."""
    if isinstance(exclude, (str, torch.Tensor)):
        exclude = (exclude,)
    try:
        items = tuple(exclude)
    except TypeError:
        raise ValueError(f"Invalid exclude: {exclude!r}; expected names or parameters") from None
    for e in items:
        if not isinstance(e, (str, torch.Tensor)):
            raise ValueError(f"Invalid exclude: {e!r}; expected a name pattern or a parameter")
    return items


class LayerCoverage:
    """Mixin of :class:`~orthoptim.optim.kfac.KFAC`: the blocks, their hooks and the coverage
    messages. Expects ``param_groups`` (a ``torch.optim.Optimizer``) and the attributes set by
    :meth:`_init_coverage`."""

    param_groups: list[dict[str, Any]]
    _search: OwnerSearch | None = None  # parameter form: the pending OwnerSearch

    def _init_coverage(
        self, model: nn.Module | None, max_factor_dim: int | None, exclude: Any
    ) -> None:
        """Find and hook the model's blocks now (model form) or on its first forward."""
        self._model = model
        self._max_factor_dim = max_factor_dim
        self._exclude = check_exclude(exclude)
        self._roots: list[nn.Module] = []
        self._capture = Capture()
        self._blocks: list[Block] = []
        self._plain: dict[str, str] = {}
        self._diagonal: dict[str, str] = {}
        self._warned: set[str] = set()  # names already in a warning
        self._checked = False
        if model is not None:
            self._attach(model)
            if not self._blocks:
                raise ValueError(self._no_layer_message("Invalid model"))
            self._warn_coverage()
        else:
            self._search = OwnerSearch(self._trained(), self._attach)

    def _trained(self) -> list[torch.Tensor]:
        """The parameters given to the constructor (every group: a block's bias may sit in
        another group than its weight, e.g. a no-decay group; each keeps its group's outer
        hyperparameters)."""
        return [p for g in self.param_groups for p in g["params"]]

    def _names(self, root: nn.Module) -> dict[torch.Tensor, str]:
        """``{parameter: name}`` of the trained parameters: the groups' ``param_names`` when
        given, else their names in ``root``."""
        in_root = {p: n for n, p in root.named_parameters()}
        out: dict[torch.Tensor, str] = {}
        for g in self.param_groups:
            names = g.get("param_names") or [in_root.get(p, f"param {i}")
                                             for i, p in enumerate(g["params"])]  # fmt: skip
            out.update(zip(g["params"], names, strict=True))
        return out

    def _attach(self, root: nn.Module) -> None:
        """Find ``root``'s blocks among the trained parameters and hook them."""
        names = self._names(root)
        owned = {p for p in root.parameters()}
        trained = {p: n for p, n in names.items() if p in owned}
        layout = find_blocks(
            root, trained, max_factor_dim=self._max_factor_dim, exclude=self._exclude
        )
        reset_compiled(root)
        if self._search is not None or self._model is None:  # parameter form: this call counts
            self._capture.new_forward()
        self._capture.attach(layout.blocks, layout.adapters, root)
        self._roots.append(root)
        self._blocks += layout.blocks
        self._plain.update(layout.plain)
        self._diagonal.update(layout.diagonal)

    def _no_layer_message(self, head: str) -> str:
        why = "; ".join(f"{n}: {r}" for n, r in list(self._plain.items())[:5])
        return (
            f"{head}: {type(self).__name__} found no layer it can precondition"
            + (f" ({why})" if why else "")
            + "; supported: nn.Linear, nn.Conv1d/2d, Conv1D (transformers), nn.Embedding, "
            "nn.MultiheadAttention (register others with orthoptim.curvature.register_adapter); "
            "use a first-order optimizer for this model"
        )

    def _warn_coverage(self) -> None:
        """The one warning naming the matrix parameters left to the plain update (and the one
        naming diagonal factors); later calls name only what was found since (at the first
        step: hooks that never fired, inputs broadcast over the batch)."""
        name = type(self).__name__
        plain = {n: r for n, r in self._plain.items() if n not in self._warned}
        diagonal = {n: r for n, r in self._diagonal.items() if n not in self._warned}
        self._warned |= plain.keys() | diagonal.keys()
        if plain:
            lines = "\n".join(f"  {n}: {r}" for n, r in plain.items())
            outer = self.param_groups[0]["outer"]
            warnings.warn(
                f"{name}: {len(plain)} matrix parameter(s) get the plain outer update "
                f"({outer}), not {name}:\n{lines}\nPass exclude=[...] with these names to "
                "declare it intentional (silences this warning).",
                PlainUpdateWarning,
                stacklevel=_user_stacklevel(),
            )
        if diagonal:
            lines = "\n".join(f"  {n}: {r}" for n, r in diagonal.items())
            warnings.warn(
                f"{name}: factors kept diagonal (max_factor_dim):\n{lines}",
                DiagonalFactorWarning,
                stacklevel=_user_stacklevel(),
            )

    def _finish_search(self) -> None:
        """Parameter form: after the first step that saw the model run, stop searching; the
        parameters never seen in a forward are named, and no layer at all is an error."""
        if self._model is not None or self._checked:
            return
        if self._search is not None and self._search.active:
            pending = self._search.pending
            if not self._roots:
                grads = [p.grad for p in self._trained() if p.grad is not None]
                if not grads or not any(bool(g.any()) for g in grads):
                    return  # no forward yet (a checkpoint loader's zero-gradient step)
                self._search.remove()  # the global hook must not outlive this optimizer's use
                raise RuntimeError(
                    f"{type(self).__name__}: got gradients but never saw the model run (the "
                    "parameters were given as a list and no module owning them was called "
                    "through nn.Module.__call__); pass the model: "
                    f"{type(self).__name__}(model, lr=...)"
                )
            self._search.remove()
            for gi, g in enumerate(self.param_groups):
                names = g.get("param_names") or [f"group {gi} param {i} {tuple(p.shape)}"
                                                 for i, p in enumerate(g["params"])]  # fmt: skip
                for p, n in zip(g["params"], names, strict=True):
                    if p in pending and is_matrix(p):
                        self._plain[n] = "never used in a forward before the first step"
        if not self._blocks:
            raise ValueError(self._no_layer_message("Invalid params"))

    def _check_hooks(self) -> None:
        """Once, at the first step after the model ran: blocks with a gradient whose hooks saw
        nothing are named (plain update); if no block saw anything, the hooks are not firing.
        Blocks whose input is broadcast over the batch are named and dropped (plain update)."""
        self._checked = True
        recs = self._capture.records
        seen = self._seen([bool(recs[b].forwards) for b in self._blocks])
        silent = [b for b, ok in zip(self._blocks, seen, strict=True)
                  if b.weight.grad is not None and not ok]  # fmt: skip
        if silent and len(silent) == len([b for b in self._blocks if b.weight.grad is not None]):
            compiled = bool(compiled_modules(self._roots[0])) if self._roots else False
            raise RuntimeError(
                f"{type(self).__name__}: the model ran but none of its layer hooks fired"
                + (" (it is a compiled model whose compiled code was not reset)" if compiled
                   else "") +
                "; build the optimizer before the model's first forward, or with the compiled "
                "module itself so that its code is recompiled with the hooks"
            )  # fmt: skip
        for b in silent:
            self._plain[b.name] = (
                "its module's hooks never saw it run (the weight is used through the functional "
                "API, or by a compiled region): not preconditioned"
            )
        for b in broadcast_blocks(self._capture, self._blocks):
            self._plain[b.name] = (
                "its input has batch 1 where the model's layers see a batch (an input broadcast "
                "over the batch, e.g. position ids): the per-sample output gradients K-FAC needs "
                "are not observable; not preconditioned"
            )
            self._blocks.remove(b)
            self._capture.drop(b)
        self._warn_coverage()


    def _seen(self, local: list[bool]) -> list[bool]:
        """Whether each block's hooks saw it run (data parallelism: on some rank; a layer a
        rank's data never reaches is not a hook that never fires)."""
        return local


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside orthoptim and torch
    (``step`` is wrapped by torch's ``no_grad`` and hook machinery)."""
    roots = (__file__.rsplit("/optim/", 1)[0], torch.__file__.rsplit("/", 1)[0])
    here = inspect.currentframe()
    frame, level = (here.f_back if here is not None else None), 1
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    return level
