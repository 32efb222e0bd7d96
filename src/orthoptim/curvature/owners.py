"""Finding the model of a parameter list, and making compiled models see K-FAC's hooks.

``KFAC(model.parameters(), ...)`` knows tensors, not layers. :class:`OwnerSearch` installs a
temporary *global* module forward pre-hook: the first module called that owns some of the
parameters (the outermost one: the model) is handed to ``found(module)`` before its forward runs,
so its layers are hooked in time for that very forward; the global hook is removed once every
parameter has an owner, by :meth:`OwnerSearch.remove`, or once the optimizer it reports to is
garbage (it is held weakly).

``torch.compile``: dynamo does not guard on module hooks, so hooks added after a compiled module
first ran never fire. :func:`reset_compiled` drops the compiled code of every compiled module in a
model (``torch._dynamo.reset_code`` on the code objects it compiled), so the next forward is traced
again, with the hooks. Recompiling affects every instance of those module classes once.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class OwnerSearch:
    """Calls ``found(module)`` for the first module called that owns any of ``params``."""

    def __init__(self, params: Iterable[torch.Tensor], found: Callable[[nn.Module], None]) -> None:
        self.pending = set(params)
        # a bound method is held weakly: a discarded optimizer must not live on in the global hook
        self.found: Callable[[], Callable[[nn.Module], None] | None] = (
            weakref.WeakMethod(found) if inspect.ismethod(found) else (lambda: found)
        )
        self._handle: RemovableHandle | None = nn.modules.module.register_module_forward_pre_hook(
            self._pre
        )

    def _pre(self, module: nn.Module, args: Any) -> None:
        found = self.found()
        if found is None:  # its optimizer is gone
            self.remove()
            return
        if not self.pending or not any(p in self.pending for p in module.parameters()):
            return
        self.pending -= set(module.parameters())
        if not self.pending:
            self.remove()
        found(module)

    def __deepcopy__(self, memo: dict[int, Any]) -> OwnerSearch:
        """A copied optimizer searches for the copied model with a hook of its own."""
        found = self.found()
        if found is None or not self.active or not inspect.ismethod(found):
            out = OwnerSearch.__new__(OwnerSearch)
            out.pending, out.found, out._handle = set(), (lambda: None), None
            return out
        owner = copy.deepcopy(found.__self__, memo)
        pending = copy.deepcopy(list(self.pending), memo)
        return OwnerSearch(pending, getattr(owner, found.__func__.__name__))

    @property
    def active(self) -> bool:
        return self._handle is not None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def compiled_modules(root: nn.Module) -> list[nn.Module]:
    """The ``torch.compile`` wrappers (``OptimizedModule``) in ``root``, ``root`` included."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - dynamo always ships with torch >= 2.0
        return []
    return [m for m in root.modules() if isinstance(m, OptimizedModule)]


def reset_compiled(root: nn.Module) -> int:
    """Drop the compiled code of the compiled modules in ``root`` (see the module docstring);
    returns how many were reset (0 when this torch has no ``reset_code``)."""
    reset = getattr(torch._dynamo, "reset_code", None)
    mods = compiled_modules(root)
    if reset is None:
        return 0
    for m in mods:
        orig: Any = m._orig_mod
        codes = [type(orig).forward.__code__]
        inner = getattr(m.forward, "__wrapped__", None)  # torch.nn.* modules: an inlined wrapper
        if inner is not None and hasattr(inner, "__code__"):
            codes.append(inner.__code__)
        for code in codes:
            reset(code)
    return len(mods)
