r"""FOP (Fisher-Orthogonal Projection, Lu & Armour, AAAI-26) on the shared K-FAC core.

FOP is :class:`~orthoptim.optim.kfac.KFAC` with one change: a preconditioned layer's direction is
built from the two half-batch gradients :math:`g_1, g_2` (see :mod:`orthoptim.curvature.projection`
for the math) instead of from their mean:

.. math:: d_\ell = \eta^*_\ell\, F_\ell^{-1}\big(g_{avg} + \beta^*_\ell\, g_\perp\big)

with the projection in the *undamped* :math:`F = G\otimes A` and :math:`\beta^*, \eta^*` in the
*damped* inverse. The outer update (SGD-momentum / AdamW), factors, damping and intervals are
K-FAC's.

Sources of :math:`g_1, g_2`:

* **one pass (default)**: ``opt.zero_grad(); loss.backward(); opt.step()`` with ``loss`` a mean over
  the batch. The hooks make autograd form each layer's weight gradient as two half-batch products
  (:mod:`orthoptim.curvature.split`; the same FLOPs as one full product), keep the first half and
  take the second from ``p.grad``. Exact without cross-sample coupling; with BatchNorm the halves
  share full-batch statistics (see that module). With gradient accumulation (``k`` backward calls
  before ``step()``) the halves are the odd- and even-numbered micro-batches (``k = 2``: the two
  micro-batches).
* **two passes (the paper's code)**: ``loss = opt.backward_two_pass(x, y, loss_fn)`` runs two
  half-batch forward/backward passes (BatchNorm then sees half batches, like ghost-BN), sets
  ``p.grad = (g1 + g2) / 2`` and keeps both halves for the next ``step()``.

A block FOP cannot split (called twice in a forward, more backward passes than forwards, one
unaccumulated sample) gets the K-FAC direction of its average gradient; parameters outside
preconditioned layers get the plain outer update of ``p.grad``, as in K-FAC.

**Data parallelism** (``W`` ranks, ``W`` even): the halves are the rank groups, as in the paper's
distributed design: :math:`g_1` is the mean of the even ranks' gradients, :math:`g_2` of the odd
ranks'. The hooks form each rank's own gradient of every block (before DDP averages it); one
all-reduce per block of :math:`\tfrac{2}{W}(\pm)` those gives :math:`g_1 - g_2`, while
:math:`g_{avg}` is the averaged ``.grad``. So FOP on ``W`` ranks equals single-process FOP on the
global batch ordered [even ranks' shards | odd ranks' shards] (one backward; the same under
``no_sync()`` accumulation: the halves stay the rank groups). An odd ``W > 1`` has no two equal
rank groups and raises ``ValueError``; ``backward_two_pass`` is single-process only.

Note (derived, see docs/fop.md): with :math:`g_{tot} = g_1 + g_2`, :math:`\eta^* = 2` whenever
:math:`\beta = 0`, so ``KFAC`` at twice the learning rate is the fair baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from orthoptim.curvature import Block, avg_diff_, fop_coefficients, fop_dots, inverse_mv, kron_mv
from orthoptim.distributed.curvature import Pending, all_reduce_sum
from orthoptim.optim import _nonfinite
from orthoptim.optim._validation import check_range
from orthoptim.optim.kfac import _DTYPES, KFAC


def _check_clamp(name: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r}; expected a pair (low, high)")
    check_range(f"{name}[0]", value[0])
    check_range(f"{name}[1]", value[1])
    if value[0] > value[1]:
        raise ValueError(f"Invalid {name}: {value!r}; low must not exceed high")


class FOP(KFAC):
    r"""Fisher-Orthogonal Projection natural gradient; a drop-in ``torch.optim.Optimizer``.

    Args:
        params: the model or its parameters (``FOP(model.parameters(), lr=0.1)``, as the FOP
            guide writes it). ``lr``, ``damping`` and every keyword of
            :class:`~orthoptim.optim.kfac.KFAC` (outer update, intervals, EMA, damping rule,
            inverse method, Fisher type, clipping, seed, ``max_factor_dim``, ``exclude``,
            ``process_group``, ``inverse_placement``) are K-FAC's, with the same defaults.
        beta: ``None`` (default) for the adaptive :math:`\beta^* = D/E`; a number fixes β
            (used as given).
        eta: ``None`` (default) for the adaptive layer step :math:`\eta^*`; a number fixes it
            (``eta=1, beta=0`` is exactly K-FAC on the mean gradient).
        beta_clamp: clamp of the adaptive β (default ``(-0.5, 0.5)``, the official code).
        eta_clamp: clamp of the adaptive η (default ``(0.0, 2.0)``, the official code).

    After each step :meth:`block_state` of a block that took the FOP path holds ``beta`` and
    ``eta`` (0-d tensors).
    """

    _EXTRA_KEYS = ("beta", "eta", "beta_clamp", "eta_clamp")
    _SHARED_KEYS = ("beta", "eta")

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        *,
        damping: float = 1e-2,
        beta: float | None = None,
        eta: float | None = None,
        beta_clamp: tuple[float, float] = (-0.5, 0.5),
        eta_clamp: tuple[float, float] = (0.0, 2.0),
        **kfac_kwargs: Any,
    ) -> None:
        self._halves: dict[Block, torch.Tensor] = {}  # [g_avg; g_diff] from backward_two_pass
        super().__init__(
            params, lr, damping=damping, beta=beta, eta=eta, beta_clamp=beta_clamp,
            eta_clamp=eta_clamp, **kfac_kwargs,
        )  # fmt: skip
        if self._ranks is not None:
            if self._ranks.world_size % 2:
                self._capture.remove()
                raise ValueError(
                    f"Invalid world size: {self._ranks.world_size}; distributed FOP takes its two "
                    "half-batch gradients from the even and the odd ranks, so it needs an even "
                    "number of processes (or one)"
                )
            self._capture.local_sum = True  # the hooks form each rank's own block gradients

    def _check_args(self, args: dict[str, Any]) -> None:
        super()._check_args(args)
        for name in ("beta", "eta"):
            if args[name] is not None:
                check_range(name, args[name], high_open=True)  # finite
        _check_clamp("beta_clamp", args["beta_clamp"])
        _check_clamp("eta_clamp", args["eta_clamp"])

    def _split_dtype(self) -> torch.dtype | None:
        # the sub-batch gradients are formed in backward, into buffers in the factor dtype
        return _DTYPES[self.param_groups[0]["factor_dtype"]]

    def _new_block_state(self, block: Block, hp: dict[str, Any]) -> dict[str, Any]:
        ls = super()._new_block_state(block, hp)
        zero = torch.zeros((), dtype=ls["A"].dtype, device=ls["A"].device)
        ls["beta"], ls["eta"] = zero, zero.clone()
        return ls

    def _discard_step(self) -> None:
        super()._discard_step()
        self._halves = {}  # a skipped step also drops backward_two_pass's halves

    # -- sources of g1, g2 --------------------------------------------------------------------
    def _one_pass_halves(self, block: Block) -> torch.Tensor | None:
        """``[g_avg; g_diff]`` (``(2, d_out, d_in [+1])``) from the sub-batch gradients the hooks
        formed and ``.grad``, in place in the hook's buffer; None when the block cannot be split
        (see :meth:`~orthoptim.curvature.Capture.halves_of`)."""
        got = self._capture.halves_of(block)
        if got is None:
            return None
        U, batch, b1 = got
        if self._inv_scale is not None:  # S_1 / S_odd came from the scaled backward
            U[1].mul_(self._inv_scale.to(U.device, U.dtype))
        return avg_diff_(U, batch, b1)

    def _model_for_two_pass(self) -> nn.Module:
        if self._model is not None:
            return self._model
        if len(self._roots) == 1:
            return self._roots[0]
        raise ValueError(
            "backward_two_pass needs the model: build FOP(model, ...), or run one forward of the "
            "model first so that FOP(model.parameters(), ...) has found it"
        )

    def backward_two_pass(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The paper's mode: two half-batch forward/backward passes instead of ``loss.backward()``.

        Splits ``inputs`` / ``targets`` with ``chunk(2)``, computes
        ``g_k = grad(loss_fn(model(x_k), y_k))`` (mean losses) without touching ``.grad``, then sets
        every parameter's ``.grad`` to ``(g1 + g2) / 2`` (replacing any value) and keeps the halves
        of the preconditioned blocks for the next :meth:`step`. With ``fisher='mc'`` it samples
        the Fisher on each half itself. Returns the mean of the two half losses (detached). Not
        combinable with gradient accumulation (each call replaces ``.grad``).
        """
        if self._ranks is not None:
            raise ValueError(
                "backward_two_pass is single-process: under data parallelism the two halves are "
                "the even and the odd ranks' shards; call loss.backward() (through DDP or not)"
            )
        model = self._model_for_two_pass()
        xs, ys = inputs.chunk(2), targets.chunk(2)
        if len(xs) != 2 or len(ys) != 2:
            raise ValueError(f"Invalid inputs: batch of {inputs.shape[0]}; need at least 2")
        params = [p for g in self.param_groups for p in g["params"]]
        halves: list[tuple[torch.Tensor | None, ...]] = []
        losses: list[torch.Tensor] = []
        cap = self._capture
        split, cap.split_dtype, cap.per_forward_scale = cap.split_dtype, None, True
        try:
            with torch.enable_grad():
                for x, y in zip(xs, ys, strict=True):
                    out = model(x)
                    loss = loss_fn(out, y)
                    self.sample_fisher(out)
                    halves.append(torch.autograd.grad(loss, params, allow_unused=True))
                    losses.append(loss.detach())
        finally:
            cap.split_dtype, cap.per_forward_scale = split, False
        grads: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for p, a, b in zip(params, *halves, strict=True):
                if a is None and b is None:
                    continue
                a = torch.zeros_like(p) if a is None else a
                b = torch.zeros_like(p) if b is None else b
                grads[p] = (a, b)
                p.grad = (a + b) * 0.5
            for blk in self._blocks:
                if blk.weight in grads:
                    gb = grads.get(blk.bias) if blk.bias is not None else None
                    g1, g2 = (blk.grad_matrix(grads[blk.weight][k], None if gb is None else gb[k])
                              for k in range(2))  # fmt: skip
                    self._halves[blk] = torch.stack([(g1 + g2) * 0.5, g1 - g2])
        return (losses[0] + losses[1]) * 0.5

    # -- directions ---------------------------------------------------------------------------
    def _products(
        self, ls: dict[str, Any], U: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``V = [F g_avg; F^-1 g_avg; F^-1 g_diff]`` and the ``(2, 3)`` inner products of
        ``U = [g_avg; g_diff]`` with ``V`` (the :func:`~orthoptim.curvature.fop_dots` layout).

        Three Kronecker products. With full π-damped factors, four matmuls written into one
        buffer: ``F g_avg``, then the damped inverse applied to both rows of ``U`` at once (the
        right factor as one matmul of the stacked ``(2 d_out, d_in)`` rows, the left one broadcast
        over the two); otherwise the same through :func:`~orthoptim.curvature.inverse_mv`.
        """
        pre, V = ls["pre"], U.new_empty((3, *U.shape[1:]))
        if "A_inv" in pre and ls["A"].dim() == 2 and ls["G"].dim() == 2:
            torch.mm(ls["G"], U[0] @ ls["A"], out=V[0])
            torch.matmul(pre["G_inv"], U @ pre["A_inv"], out=V[1:])
        else:
            V[0] = kron_mv(ls["G"], ls["A"], U[0])
            V[1:] = inverse_mv(pre, U)
        return V, fop_dots(U, V)

    def _prepare(self, ready: list[Block]) -> None:
        """Data parallelism: ``[g_avg; g_diff]`` of every ready block, on every rank. ``g_avg``
        is the averaged ``.grad``; ``g_diff = g_1 - g_2`` is the sum over the ranks of
        ``±(2/W)`` times each rank's own gradient (``+`` on even ranks), one asynchronous
        all-reduce per block, waited once all are started."""
        ranks = self._ranks
        if ranks is None:
            return
        sign = (2.0 if ranks.rank % 2 == 0 else -2.0) / ranks.world_size
        pending = Pending()
        for b in ready:
            ls = self.block_state(b)
            U = self._capture.local_grad(b)
            if U is None:  # no backward through the block on this rank: its gradient is 0
                U = torch.zeros((2, b.d_out, b.d_in), dtype=ls["A"].dtype, device=ls["A"].device)
            if self._inv_scale is not None:  # formed in the scaled backward
                U[1].mul_(self._inv_scale.to(U.device, U.dtype))
            U[1].mul_(sign)
            b.grad_matrix(out=U[0])
            pending.add(all_reduce_sum(U[1], ranks.group))
            self._halves[b] = U
        pending.wait()

    def _block_directions(
        self, blocks: list[Block], hp: dict[str, Any], guard: _nonfinite.StepGuard
    ) -> dict[Block, torch.Tensor]:
        """FOP directions of ``blocks``; the scalar algebra of all of them is batched (no host
        sync)."""
        out: dict[Block, torch.Tensor] = {}
        dots: list[torch.Tensor] = []
        todo: list[tuple[dict[str, Any], Block, torch.Tensor]] = []
        for b in blocks:
            ls = self.block_state(b)
            U = self._halves.get(b)
            if U is None:
                U = self._one_pass_halves(b)
            if U is None:  # not splittable: K-FAC on the mean gradient
                out[b] = self._precondition(ls, b.grad_matrix())
                continue
            V, d = self._products(ls, U.to(ls["A"].dtype))  # no-op cast unless state was reloaded
            dots.append(d)
            todo.append((ls, b, V))
        self._halves = {}
        if todo:
            c_avg, c_diff, beta, eta = fop_coefficients(
                torch.stack(dots), beta=hp["beta"], eta=hp["eta"],
                beta_clamp=hp["beta_clamp"], eta_clamp=hp["eta_clamp"],
            )  # fmt: skip
            coef = torch.stack([c_avg, c_diff], dim=1)  # d = c_avg F^-1 g_avg + c_diff F^-1 g_diff
            for (ls, b, V), c, be, e in zip(todo, coef, beta.unbind(), eta.unbind(), strict=True):
                ls["beta"] = guard.select(ls["beta"], be)  # a dropped step keeps them
                ls["eta"] = guard.select(ls["eta"], e)
                D = (c @ V[1:].flatten(1)).view(V.shape[1:])
                out[b] = D.to(b.weight.dtype)
        return out
