r"""Readable K-FAC reference: plain loops and dense Fisher blocks. A test oracle for tiny layers.

Nothing here is fast. Per-sample layer inputs and output gradients come from a manual forward of
an ``nn.Sequential`` (``retain``-style autograd on the layer outputs, no hooks), factors from
explicit loops over samples and locations, and the damped inverse from ``torch.linalg.inv`` of the
dense :math:`d_{out}(d_{in}+1)` square Fisher block. Conventions are those of
:mod:`orthoptim.curvature.factors` (bias folded into ``A``; KFC scaling for convolutions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ``direction(layer_state, g, g1, g2, hp)`` of :func:`reference_train`.
Direction = Callable[
    [dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]],
    torch.Tensor,
]
# One tensor per K-FAC layer (its input, output or output gradient).
PerLayer = dict[nn.Module, torch.Tensor]


def patches_loop(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col by explicit loops: ``(B, L, c_in*k_h*k_w)`` in ``weight.flatten(1)`` order."""
    if isinstance(conv.padding, str):
        raise ValueError(f"conv.padding must be a pair of ints, got {conv.padding!r}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    xp = F.pad(x, (pw, pw, ph, ph))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(ho):
        for j in range(wo):
            patch = xp[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(patch.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def sample_rows(
    module: nn.Module, x: torch.Tensor, gout: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample input rows (1 appended for a bias) and output-gradient rows, ``(B, L, .)``."""
    if isinstance(module, nn.Conv2d):
        a = patches_loop(module, x)
        g = gout.flatten(2).transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        g = gout.reshape(gout.shape[0], -1, gout.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a, g


def factors_loop(
    module: nn.Module, x: torch.Tensor, gout: torch.Tensor, approx: str = "expand"
) -> tuple[torch.Tensor, torch.Tensor]:
    """By explicit loops, K-FAC-expand ``A = 1/(B L) sum_i sum_t a a^T``,
    ``G = 1/B sum_i sum_t g g^T``, or K-FAC-reduce ``A = 1/B sum_i abar abar^T``,
    ``G = 1/B sum_i gsum gsum^T`` (``abar`` the mean over locations, ``gsum`` the sum).

    ``gout`` must be the per-sample output gradients (e.g. of a sum-reduced loss).
    """
    a, g = sample_rows(module, x, gout)
    B, L = a.shape[0], a.shape[1]
    A = torch.zeros(a.shape[-1], a.shape[-1], dtype=a.dtype)
    G = torch.zeros(g.shape[-1], g.shape[-1], dtype=g.dtype)
    for i in range(B):
        if approx == "reduce":
            abar, gsum = a[i].mean(0), g[i].sum(0)
            A += torch.outer(abar, abar) / B
            G += torch.outer(gsum, gsum) / B
            continue
        for t in range(L):
            A += torch.outer(a[i, t], a[i, t]) / (B * L)
            G += torch.outer(g[i, t], g[i, t]) / B
    return A, G


def dense_fisher(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The dense K-FAC block ``G kron A`` acting on the row-major ``vec([dW | db])``."""
    return torch.kron(G, A)


def damped_dense_inverse(
    A: torch.Tensor, G: torch.Tensor, damping: float, damping_type: str = "pi"
) -> torch.Tensor:
    """Dense damped inverse: π-damped Kronecker product, or ``(G kron A + damping I)^{-1}``."""
    if damping_type == "tikhonov":
        F_ = dense_fisher(A, G)
        return torch.linalg.inv(F_ + damping * torch.eye(F_.shape[0], dtype=F_.dtype))
    ta, tg = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
    pi = (ta / tg) ** 0.5 if ta > 0 and tg > 0 else 1.0
    dA, dG = max(damping**0.5 * pi, 1e-7), max(damping**0.5 / pi, 1e-7)
    eye_a, eye_g = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.inv(dense_fisher(A + dA * eye_a, G + dG * eye_g))


def layer_vec(module: nn.Module, gw: torch.Tensor, gb: torch.Tensor | None) -> torch.Tensor:
    """Row-major ``vec([dW | db])``."""
    m = gw.reshape(gw.shape[0], -1)
    if module.bias is not None:
        if gb is None:
            raise ValueError("gb must be the bias gradient: the module has a bias")
        m = torch.cat([m, gb[:, None]], dim=1)
    return m.reshape(-1)


def forward_grads(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, PerLayer, PerLayer, dict[torch.Tensor, torch.Tensor]]:
    """Manual forward; per-layer inputs, per-sample output grads and parameter gradients."""
    inputs: PerLayer = {}
    outputs: PerLayer = {}
    h = x
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            inputs[m] = h.detach()
            h = m(h)
            outputs[m] = h
        else:
            h = m(h)
    loss = loss_fn(h, y)
    layers = list(outputs)
    params: list[torch.Tensor] = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, [outputs[m] for m in layers] + params)
    gouts = {m: g * x.shape[0] for m, g in zip(layers, grads[: len(layers)], strict=True)}
    return loss, inputs, gouts, dict(zip(params, grads[len(layers) :], strict=True))


def reference_kfac_direction(
    ls: dict[str, torch.Tensor],
    g: torch.Tensor,
    g1: torch.Tensor,
    g2: torch.Tensor,
    hp: dict[str, Any],
) -> torch.Tensor:
    """K-FAC: ``F^{-1} g`` with the dense damped inverse."""
    return ls["Finv"] @ g


def reference_train(
    model: nn.Sequential,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hp: dict[str, Any],
    direction: Direction | None = None,
) -> list[float]:
    """Run ``len(batches)`` steps of K-FAC (or, with ``direction``, a variant) in plain loops.

    ``hp`` keys: ``lr, damping, damping_type, momentum, weight_decay, factor_interval,
    inverse_interval, ema_weight, factor_init``, optionally ``kfac_approx`` (plus what
    ``direction`` needs). Empirical Fisher.
    ``direction(layer_state, g, g1, g2, hp)`` maps the flat layer gradient (and the two
    half-batch gradients, from two separate half-batch backward passes) to the flat direction.
    Returns the list of losses.
    """
    direction = direction or reference_kfac_direction
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    state: dict[nn.Module, dict[str, torch.Tensor]] = {m: {} for m in layers}
    bufs: dict[torch.Tensor, torch.Tensor] = {}
    losses: list[float] = []
    for step, (x, y) in enumerate(batches):
        loss, inputs, gouts, pgrads = forward_grads(model, x, y, loss_fn)
        losses.append(float(loss.detach()))
        b1 = (x.shape[0] + 1) // 2
        half = [forward_grads(model, x[:b1], y[:b1], loss_fn)[3],
                forward_grads(model, x[b1:], y[b1:], loss_fn)[3]]  # fmt: skip
        dirs = dict(pgrads)
        for m in layers:
            ls = state[m]
            if step % hp["factor_interval"] == 0:
                A, G = factors_loop(m, inputs[m], gouts[m], hp.get("kfac_approx", "expand"))
                w = hp["ema_weight"]
                first = "A" not in ls
                if first and hp["factor_init"] == "batch":
                    ls["A"], ls["G"] = A, G
                elif first:
                    ls["A"], ls["G"] = w * A, w * G
                else:
                    ls["A"], ls["G"] = (1 - w) * ls["A"] + w * A, (1 - w) * ls["G"] + w * G
            if step % hp["inverse_interval"] == 0:
                ls["F"] = dense_fisher(ls["A"], ls["G"])
                ls["Finv"] = damped_dense_inverse(
                    ls["A"], ls["G"], hp["damping"], hp["damping_type"]
                )
            vec = [
                layer_vec(m, h[m.weight], None if m.bias is None else h.get(m.bias))
                for h in (pgrads, half[0], half[1])
            ]
            d = direction(ls, vec[0], vec[1], vec[2], hp).reshape(m.weight.shape[0], -1)
            dirs[m.weight] = d[:, : m.weight[0].numel()].reshape(m.weight.shape)
            if m.bias is not None:
                dirs[m.bias] = d[:, -1]
        with torch.no_grad():
            for p, d in dirs.items():
                d = d + hp["weight_decay"] * p
                bufs[p] = d.clone() if p not in bufs else hp["momentum"] * bufs[p] + d
                p -= hp["lr"] * bufs[p]
    return losses
