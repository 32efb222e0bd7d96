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
  the batch. The hooks already hold each layer's input and output gradient, so
  :mod:`orthoptim.curvature.split` forms the first-half gradient with a half-size product and the
  second from ``p.grad``. Exact without cross-sample coupling; with BatchNorm the halves share
  full-batch statistics (see that module).
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
    avg_diff_from_total,
    first_half_grad,
    fop_coefficients,
    fop_dots,
    inverse_mv,
    kron_mv,
)
from orthoptim.optim._validation import check_range
from orthoptim.optim.kfac import KFAC, grad_matrix, put_direction


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
        self._halves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stacks: dict[str, tuple] = {}  # derived from the state, rebuilt when it changes
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

    def _needs_split(self) -> bool:
        return True

    def _discard_step(self) -> None:
        super()._discard_step()
        self._halves = {}  # a skipped step also drops backward_two_pass's halves

    # -- sources of g1, g2 --------------------------------------------------------------------
    def _one_pass_halves(self, name: str, module: nn.Module, M: torch.Tensor):
        rec = self._capture.records[name]
        if rec.n_forward != 1 or len(rec.inputs) != 1 or len(rec.grads) != 1:
            return None  # reused layer or accumulated backwards: not splittable
        x, (gout, _) = rec.inputs[0], rec.grads[0]
        batch = x.shape[0]
        if batch < 2 or gout.shape[0] != batch:
            return None
        b1 = (batch + 1) // 2
        return avg_diff_from_total(first_half_grad(module, x, gout, b1), M, batch, b1)

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
        with torch.enable_grad():
            for x, y in zip(xs, ys, strict=True):
                out = self._model(x)
                loss = loss_fn(out, y)
                self.sample_fisher(out)
                halves.append(torch.autograd.grad(loss, params, allow_unused=True))
                losses.append(loss.detach())
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
                    self._halves[name] = ((g1 + g2) * 0.5, g1 - g2)
        return (losses[0] + losses[1]) * 0.5

    # -- directions ---------------------------------------------------------------------------
    def _three_matvecs(self, name: str, ls: dict, g_avg, g_diff):
        """``F g_avg``, ``F^-1 g_avg``, ``F^-1 g_diff`` and the :func:`fop_dots` matrix.

        With Kronecker-form inverses the three products are two batched matmuls against
        ``[G, G^-1, G^-1]`` / ``[A, A^-1, A^-1]``, stacked once per factor/inverse update.
        """
        pre = ls["pre"]
        if "A_inv" not in pre:  # eigenbasis (Tikhonov) form
            p_avg, p_diff = inverse_mv(pre, g_avg), inverse_mv(pre, g_diff)
            f_avg = kron_mv(ls["G"], ls["A"], g_avg)
            return f_avg, p_avg, p_diff, fop_dots(g_avg, g_diff, f_avg, p_avg, p_diff)
        cached = self._stacks.get(name)
        if cached is None or cached[0] is not ls["A"] or cached[1] is not pre:
            Gs = torch.stack([ls["G"], pre["G_inv"], pre["G_inv"]])
            As = torch.stack([ls["A"], pre["A_inv"], pre["A_inv"]])
            cached = self._stacks[name] = (ls["A"], pre, Gs, As)
        X = torch.stack([g_avg, g_avg, g_diff])
        Y = cached[2] @ X @ cached[3]
        f_avg, p_avg, p_diff = Y.unbind()
        return f_avg, p_avg, p_diff, X[1:].flatten(1) @ Y.flatten(1).T

    def _directions(self, hp: dict) -> dict:
        """FOP directions; the scalar algebra of all layers is batched (no host sync)."""
        dirs, dots, todo = {}, [], []
        layers = self.state["kfac"]["layers"]
        for name, m in self._layers.items():
            ls = layers[name]
            if "pre" not in ls or m.weight.grad is None:
                continue
            M = grad_matrix(m)
            halves = self._halves.get(name) or self._one_pass_halves(name, m, M)
            if halves is None:  # not splittable: K-FAC on the mean gradient
                put_direction(dirs, m, self._precondition(ls, M))
                continue
            g_avg, g_diff = (h.to(ls["A"].dtype) for h in halves)
            _, p_avg, p_diff, d = self._three_matvecs(name, ls, g_avg, g_diff)
            dots.append(d)
            todo.append((ls, m, p_avg, p_diff, M.dtype))
        self._halves = {}
        if todo:
            coef = fop_coefficients(
                torch.stack(dots), beta=hp["beta"], eta=hp["eta"],
                beta_clamp=hp["beta_clamp"], eta_clamp=hp["eta_clamp"],
            )  # fmt: skip
            for (ls, m, p_avg, p_diff, dtype), c_avg, c_diff, b, e in zip(
                todo, *(c.unbind() for c in coef), strict=True
            ):
                ls["beta"], ls["eta"] = b, e
                put_direction(dirs, m, torch.addcmul(p_avg * c_avg, p_diff, c_diff).to(dtype))
        return dirs
