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
  share full-batch statistics (see that module).
* **two passes (the paper's code)**: ``loss = opt.backward_two_pass(x, y, loss_fn)`` runs two
  half-batch forward/backward passes (BatchNorm then sees half batches, like ghost-BN), sets
  ``p.grad = (g1 + g2) / 2`` and keeps both halves for the next ``step()``.

A layer FOP cannot split (used twice in a forward, several backwards before ``step``, batch of 1)
gets the K-FAC direction of its average gradient; parameters outside supported layers get the
plain outer update of ``p.grad``, as in K-FAC.

Note (derived, see docs/fop.md): with :math:`g_{tot} = g_1 + g_2`, :math:`\eta^* = 2` whenever
:math:`\beta = 0`, so ``KFAC`` at twice the learning rate is the fair baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from orthoptim.curvature import (
    avg_diff_,
    fop_coefficients,
    fop_dots,
    inverse_mv,
    kron_mv,
)
from orthoptim.optim import _nonfinite
from orthoptim.optim._validation import check_range
from orthoptim.optim.kfac import _DTYPES, KFAC, grad_matrix, put_direction


def _check_clamp(name: str, value) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r}; expected a pair (low, high)")
    check_range(f"{name}[0]", value[0])
    check_range(f"{name}[1]", value[1])
    if value[0] > value[1]:
        raise ValueError(f"Invalid {name}: {value!r}; low must not exceed high")


class FOP(KFAC):
    r"""Fisher-Orthogonal Projection natural gradient; a drop-in ``torch.optim.Optimizer``.

    Args:
        model, lr, damping, and every keyword of :class:`~orthoptim.optim.kfac.KFAC` (outer
            update, intervals, EMA, damping rule, inverse method, Fisher type, clipping, seed),
            with the same defaults.
        beta: ``None`` (default) for the adaptive :math:`\beta^* = D/E`; a number fixes β
            (used as given).
        eta: ``None`` (default) for the adaptive layer step :math:`\eta^*`; a number fixes it
            (``eta=1, beta=0`` is exactly K-FAC on the mean gradient).
        beta_clamp: clamp of the adaptive β (default ``(-0.5, 0.5)``, the official code).
        eta_clamp: clamp of the adaptive η (default ``(0.0, 2.0)``, the official code).

    After each step ``opt.state['kfac']['layers'][name]`` holds ``beta`` and ``eta`` (0-d tensors)
    of layers that took the FOP path.
    """

    _EXTRA_KEYS = ("beta", "eta", "beta_clamp", "eta_clamp")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        *,
        damping: float = 1e-2,
        beta: float | None = None,
        eta: float | None = None,
        beta_clamp: tuple[float, float] = (-0.5, 0.5),
        eta_clamp: tuple[float, float] = (0.0, 2.0),
        **kfac_kwargs,
    ):
        self._halves: dict[str, torch.Tensor] = {}  # name -> [g_avg; g_diff] from two passes
        super().__init__(
            model, lr, damping=damping, beta=beta, eta=eta, beta_clamp=beta_clamp,
            eta_clamp=eta_clamp, **kfac_kwargs,
        )  # fmt: skip

    def _check_args(self, args: dict) -> None:
        super()._check_args(args)
        for name in ("beta", "eta"):
            if args[name] is not None:
                check_range(name, args[name], high_open=True)  # finite
        _check_clamp("beta_clamp", args["beta_clamp"])
        _check_clamp("eta_clamp", args["eta_clamp"])

    def _split_dtype(self):
        # the first-half gradient is formed in backward, into a buffer in the factor dtype
        return _DTYPES[self.param_groups[0]["factor_dtype"]]

    def _discard_step(self) -> None:
        super()._discard_step()
        self._halves = {}  # a skipped step also drops backward_two_pass's halves

    # -- sources of g1, g2 --------------------------------------------------------------------
    def _one_pass_halves(self, name: str, module: nn.Module):
        """``[g_avg; g_diff]`` (``(2, d_out, d_in [+1])``) from the first-half product the gradient
        hook computed and ``.grad``, in place in the hook's buffer; None when the layer cannot be
        split (not exactly one forward and one backward since the last step, or batch < 2)."""
        rec = self._capture.records[name]
        if rec.n_forward != 1 or rec.n_backward != 1 or len(rec.splits) != 1:
            return None  # reused layer or accumulated backwards: not splittable
        U, batch = rec.splits[0]
        grad_matrix(module, out=U[0])
        return avg_diff_(U, batch, (batch + 1) // 2)

    def backward_two_pass(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn):
        """The paper's mode: two half-batch forward/backward passes instead of ``loss.backward()``.

        Splits ``inputs`` / ``targets`` with ``chunk(2)``, computes
        ``g_k = grad(loss_fn(model(x_k), y_k))`` (mean losses) without touching ``.grad``, then sets
        every parameter's ``.grad`` to ``(g1 + g2) / 2`` (replacing any value) and keeps the halves
        of the preconditioned layers for the next :meth:`step`. With ``fisher='mc'`` it samples
        the Fisher on each half itself. Returns the mean of the two half losses (detached).
        """
        xs, ys = inputs.chunk(2), targets.chunk(2)
        if len(xs) != 2 or len(ys) != 2:
            raise ValueError(f"Invalid inputs: batch of {inputs.shape[0]}; need at least 2")
        params = [p for g in self.param_groups for p in g["params"]]
        halves, losses = [], []
        split, self._capture.split_dtype = self._capture.split_dtype, None  # halves from autograd
        try:
            with torch.enable_grad():
                for x, y in zip(xs, ys, strict=True):
                    out = self._model(x)
                    loss = loss_fn(out, y)
                    self.sample_fisher(out)
                    halves.append(torch.autograd.grad(loss, params, allow_unused=True))
                    losses.append(loss.detach())
        finally:
            self._capture.split_dtype = split
        grads = {}
        with torch.no_grad():
            for p, a, b in zip(params, *halves, strict=True):
                if a is None and b is None:
                    continue
                a = torch.zeros_like(p) if a is None else a
                b = torch.zeros_like(p) if b is None else b
                grads[p] = (a, b)
                p.grad = (a + b) * 0.5
            for name, m in self._layers.items():
                if m.weight in grads:
                    gb = grads.get(m.bias, (None, None)) if m.bias is not None else (None, None)
                    g1, g2 = (grad_matrix(m, grads[m.weight][k], gb[k]) for k in range(2))
                    self._halves[name] = torch.stack([(g1 + g2) * 0.5, g1 - g2])
        return (losses[0] + losses[1]) * 0.5

    # -- directions ---------------------------------------------------------------------------
    def _products(self, ls: dict, U: torch.Tensor):
        """``V = [F g_avg; F^-1 g_avg; F^-1 g_diff]`` and the ``(2, 3)`` inner products of
        ``U = [g_avg; g_diff]`` with ``V`` (the :func:`~orthoptim.curvature.fop_dots` layout).

        Three Kronecker products, as four matmuls written into one buffer: ``F g_avg``, then the
        damped inverse applied to both rows of ``U`` at once (the right factor as one matmul of
        the stacked ``(2 d_out, d_in)`` rows, the left one broadcast over the two).
        """
        pre, V = ls["pre"], U.new_empty((3, *U.shape[1:]))
        if "A_inv" in pre:
            torch.mm(ls["G"], U[0] @ ls["A"], out=V[0])
            torch.matmul(pre["G_inv"], U @ pre["A_inv"], out=V[1:])
        else:  # eigenbasis (Tikhonov) form, broadcast over the two rows
            V[0] = kron_mv(ls["G"], ls["A"], U[0])
            V[1:] = inverse_mv(pre, U)
        return V, fop_dots(U, V)

    def _directions(self, hp: dict, guard: _nonfinite.StepGuard) -> dict:
        """FOP directions; the scalar algebra of all layers is batched (no host sync)."""
        dirs, dots, todo = {}, [], []
        layers = self.state["kfac"]["layers"]
        for name, m in self._layers.items():
            ls = layers[name]
            if "pre" not in ls or m.weight.grad is None:
                continue
            U = self._halves.get(name)
            if U is None:
                U = self._one_pass_halves(name, m)
            if U is None:  # not splittable: K-FAC on the mean gradient
                put_direction(dirs, m, self._precondition(ls, grad_matrix(m)))
                continue
            V, d = self._products(ls, U.to(ls["A"].dtype))  # no-op cast unless state was reloaded
            dots.append(d)
            todo.append((ls, m, V))
        self._halves = {}
        if todo:
            c_avg, c_diff, beta, eta = fop_coefficients(
                torch.stack(dots), beta=hp["beta"], eta=hp["eta"],
                beta_clamp=hp["beta_clamp"], eta_clamp=hp["eta_clamp"],
            )  # fmt: skip
            coef = torch.stack([c_avg, c_diff], dim=1)  # d = c_avg F^-1 g_avg + c_diff F^-1 g_diff
            for (ls, m, V), c, b, e in zip(todo, coef, beta.unbind(), eta.unbind(), strict=True):
                ls["beta"] = guard.select(ls.get("beta"), b)  # a dropped step keeps them
                ls["eta"] = guard.select(ls.get("eta"), e)
                D = (c @ V[1:].flatten(1)).view(V.shape[1:])
                put_direction(dirs, m, D.to(m.weight.grad.dtype))
        return dirs
