r"""Layer adapters: how K-FAC sees one kind of layer. The extension point for user layer classes.

K-FAC preconditions **blocks**. A block is a linear map ``y = W x (+ b)`` applied at every
*location* (sequence position, output pixel) of every sample, viewed in the **matrix layout**

.. math:: M = [\,W_{mat} \;|\; b\,] \in \mathbb R^{d_{out} \times (d_{in} + 1)}

(no bias column without a bias). A block is a whole weight (``nn.Linear``, ``nn.Conv2d``, ...)
or a row block of one (the query, key and value rows of ``nn.MultiheadAttention``'s packed
``in_proj_weight``). Its Kronecker factors come from the block's inputs ``a`` and the gradients
``g`` of its outputs (see :mod:`orthoptim.curvature.factors`).

Two classes describe a layer kind:

* :class:`LayerOps`: the math of the linear map: its inputs and output gradients as rows in the
  weight-sharing format ``(B, L, d)`` (``B`` samples, ``L`` locations), the weight-gradient matrix
  from a slice of inputs and output gradients (FOP's half-batch split), and the matrix layout of
  the weight.
* :class:`LayerAdapter`: which blocks a module has, what it refuses (with the reason users see
  in the warning), and how its blocks are hooked. The default hooks the module's forward (input
  ``inputs[0]``, output ``output``); :class:`~orthoptim.curvature.adapters.attention.\
MultiheadAttentionAdapter` replaces the module's forward instead.

Register an adapter for your own layer class with :func:`register_adapter`; subclasses of a
registered class use the closest registered base class::

    class MyLinearOps(LinearOps): ...
    class MyAdapter(LayerAdapter):
        ops_class = MyLinearOps
    register_adapter(MyLayer, MyAdapter)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

Grad = tuple[torch.Tensor, torch.Tensor | None]  # (dW in the matrix layout, db or None)


def param(module: nn.Module, name: str) -> nn.Parameter | None:
    """``module``'s parameter ``name`` (None when it has none)."""
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) else None


class LayerOps:
    """The math of one linear layer kind (the default is ``nn.Linear``'s: any leading dims).

    ``x`` is the layer input (batch first), ``g`` the gradient of its output. Subclasses override
    what differs. ``diag_input`` marks kinds whose ``A`` is diagonal by construction (one-hot
    inputs: ``nn.Embedding``); their :meth:`a_sum` returns a vector.
    """

    diag_input = False

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Weight-shaped tensor -> matrix layout ``(d_out, d_in)``."""
        return w.flatten(1)

    def unmatrix(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Matrix layout -> weight-shaped tensor of ``shape``."""
        return m.reshape(shape)

    def batched(self, x: torch.Tensor) -> bool:
        """True when dimension 0 of ``x`` is a batch dimension."""
        return x.dim() >= 2

    def rows_in(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in the weight-sharing format ``(B, L, d_in)`` (no bias column)."""
        x = x if self.batched(x) else x[None]
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def rows_out(self, g: torch.Tensor) -> torch.Tensor:
        """Output gradients as ``(B, L, d_out)``."""
        g = g if self.batched(g) else g[None]
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def a_sum(
        self, x: torch.Tensor, approx: str, bias: bool, diag: bool, dtype: torch.dtype
    ) -> tuple[torch.Tensor, int]:
        r""":math:`\sum_n \frac1L \sum_t a_{nt} a_{nt}^\top` over the ``B`` samples of ``x``
        (its diagonal if ``diag``); with ``approx='reduce'`` the rows are first averaged over the
        locations (K-FAC-reduce). Returns ``(sum, B)``."""
        r = self.rows_in(x).to(dtype)
        if approx == "reduce":
            r = r.mean(1, keepdim=True)
        if bias:
            r = torch.cat([r, r.new_ones(*r.shape[:-1], 1)], dim=-1)
        n, locations = r.shape[0], r.shape[1]
        r = r.reshape(-1, r.shape[-1])
        s = (r * r).sum(0) if diag else r.T @ r
        return s.div_(locations), n

    def g_sum(
        self,
        g: torch.Tensor,
        scale: float | torch.Tensor,
        approx: str,
        diag: bool,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, int]:
        r""":math:`\sum_n \sum_t (s\,g_{nt})(s\,g_{nt})^\top` (its diagonal if ``diag``), ``s =
        scale`` (a number or a 0-d tensor); with ``approx='reduce'`` the rows are first summed over
        the locations. Returns ``(sum, B)``."""
        r = self.rows_out(g).to(dtype) * scale
        if approx == "reduce":
            r = r.sum(1, keepdim=True)
        n = r.shape[0]
        r = r.reshape(-1, r.shape[-1])
        return ((r * r).sum(0) if diag else r.T @ r), n

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> Grad:
        """``(dW, db)`` in the matrix layout from inputs ``x`` and output gradients ``g`` (any
        batch slice); ``db`` is the gradient of a bias (the output gradients summed)."""
        xr = x.reshape(-1, x.shape[-1])
        gr = g.reshape(-1, g.shape[-1])
        return gr.T @ xr, gr.sum(0)

    def input_grad(
        self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor | None:
        """The gradient of the input (used where the adapter forms the layer's gradients itself,
        :class:`~orthoptim.curvature.split.HalfBatchWeightGrad`)."""
        return g @ weight


@dataclass(eq=False)
class Block:
    """One Kronecker-factored matrix K-FAC preconditions.

    Attributes:
        name: shown in messages: the weight's name, with ``[q]`` etc. for a row block.
        key: key of the block in its weight's K-FAC state (``"w"`` for a whole weight).
        ops: the math of the layer kind.
        module: the module whose hooks (or forward) see the block.
        weight, bias: the parameters (``bias`` None without one, or when it is not trained).
        rows: the block's rows of the weight (in the matrix layout), or None for all of them.
        bias_rows: the block's entries of the bias, or None for all of it.
        stock: the layer's output is exactly ``ops``' linear map of the hooked input, so the
            one-pass FOP split may form the weight gradient itself
            (:class:`~orthoptim.curvature.split.HalfBatchWeightGrad`); otherwise autograd forms
            it and the split costs an extra product.
        diag_a, diag_g: keep that factor diagonal (``max_factor_dim``, one-hot inputs).
    """

    name: str
    key: str
    ops: LayerOps
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None = None
    rows: slice | None = None
    bias_rows: slice | None = None
    stock: bool = False
    diag_a: bool = False
    diag_g: bool = False

    def __post_init__(self) -> None:
        rows, cols = self.ops.matrix(self.weight.detach()).shape
        self.d_out = rows if self.rows is None else len(range(rows)[self.rows])
        self.d_in = cols + (self.bias is not None)  # columns of the matrix layout

    def forward_weight(self) -> torch.Tensor:
        """The weight tensor the layer's forward uses for this block (a row view if ``rows``)."""
        return self.weight if self.rows is None else self.weight[self.rows]

    def forward_bias(self) -> torch.Tensor | None:
        """The block's part of the bias (None without a trained bias)."""
        if self.bias is None or self.bias_rows is None:
            return self.bias
        return self.bias[self.bias_rows]

    def grad_matrix(
        self,
        gw: torch.Tensor | None = None,
        gb: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block gradient ``[dW | db]`` from ``.grad`` unless ``gw`` / ``gb`` are given
        (weight- and bias-shaped), written into ``out`` when given (any float dtype)."""
        gw = self.weight.grad if gw is None else gw
        if gw is None:
            raise RuntimeError(f"block {self.name}: the weight has no gradient")
        w = self.ops.matrix(gw)
        if self.rows is not None:
            w = w[self.rows]
        b = None
        if self.bias is not None:
            b = self.bias.grad if gb is None else gb
            b = torch.zeros(self.bias.shape, dtype=w.dtype, device=w.device) if b is None else b
            if self.bias_rows is not None:
                b = b[self.bias_rows]
        if out is not None:
            out[:, : w.shape[1]].copy_(w)
            if b is not None:
                out[:, -1].copy_(b)
            return out
        return w if b is None else torch.cat([w, b[:, None].to(w.dtype)], dim=1)

    def split_direction(self, d: torch.Tensor) -> Grad:
        """A block direction in the matrix layout -> ``(weight part, bias part or None)``; the
        weight part is weight-shaped for a whole weight, the block's rows of the matrix layout
        otherwise."""
        cols = d.shape[1] - (self.bias is not None)
        w, b = d[:, :cols], (d[:, -1] if self.bias is not None else None)
        if self.rows is None:
            w = self.ops.unmatrix(w, self.weight.shape)
        return w, b


class LayerAdapter:
    """Base adapter: a module whose forward applies one linear map to its first input.

    Subclasses set ``ops_class`` (or override :meth:`ops`) and may override :meth:`refuse`,
    :meth:`stock` or, for modules with several blocks, :meth:`blocks` and :meth:`install`.
    """

    ops_class: type[LayerOps] = LayerOps
    kind = "layer"

    def __init__(self, module: nn.Module):
        self.module = module

    def ops(self) -> LayerOps:
        return self.ops_class()

    def refuse(self) -> str | None:
        """Why this module cannot be preconditioned (shown in the warning), or None."""
        return None

    def stock(self) -> bool:
        """True when the module's forward is exactly :meth:`ops`' map (see :class:`Block`)."""
        return False

    def claims(self) -> list[nn.Module]:
        """Submodules this adapter handles itself (they get no adapter of their own)."""
        return []

    def blocks(self, name_of: dict[Any, str]) -> list[Block]:
        """The module's blocks among the trained parameters ``name_of`` (parameter -> name).

        A weight that is not trained gives no block; a bias that is not trained is left out of
        the block (its layer is then preconditioned without a bias column).
        """
        w, b = param(self.module, "weight"), param(self.module, "bias")
        if w is None or w not in name_of:
            return []
        b_in = b if (b is not None and b in name_of) else None
        return [Block(name_of[w], "w", self.ops(), self.module, w, b_in, stock=self.stock())]

    def install(self, capture: Any) -> list[Any]:
        """Hook the module so ``capture.forward(block, input, output)`` sees every call;
        returns removable handles."""
        blocks = capture.blocks_of(self.module)
        if not blocks:
            return []
        return [self.module.register_forward_hook(partial(capture.module_hook, blocks[0]))]


_REGISTRY: dict[type, type[LayerAdapter]] = {}
# (predicate, adapter class): layer classes recognised without importing them
_DUCK: list[tuple[Callable[[nn.Module], bool], type[LayerAdapter]]] = []


def register_adapter(module_cls: type, adapter_cls: type[LayerAdapter]) -> None:
    """Make K-FAC / FOP precondition modules of ``module_cls`` (and its subclasses) with
    ``adapter_cls``. A later registration for the same class replaces the earlier one."""
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise ValueError(f"Invalid module_cls: {module_cls!r}; expected an nn.Module subclass")
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, LayerAdapter)):
        raise ValueError(f"Invalid adapter_cls: {adapter_cls!r}; expected a LayerAdapter subclass")
    _REGISTRY[module_cls] = adapter_cls


def register_duck_adapter(
    predicate: Callable[[nn.Module], bool], adapter_cls: type[LayerAdapter]
) -> None:
    """Recognise modules by ``predicate(module)`` (for classes of optional packages)."""
    _DUCK.append((predicate, adapter_cls))


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of ``module``'s closest registered class (then duck-typed kinds), or None."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](module)
    for predicate, adapter_cls in _DUCK:
        if predicate(module):
            return adapter_cls(module)
    return None
