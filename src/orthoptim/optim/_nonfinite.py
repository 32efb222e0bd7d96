"""Non-finite gradient policy shared by every orthoptim optimizer (FOGO, KFAC, FOP).

Each optimizer takes ``nonfinite="skip" | "raise" | "proceed"`` (default ``"skip"``) and calls
:func:`skip_step` at the top of ``step()``, after the closure and before touching any state:

* ``"skip"`` (default, as ``torch.amp.GradScaler``): if any gradient holds a NaN or an infinity,
  the whole step is dropped. Parameters and *all* optimizer state (momentum, step counters,
  codebook, gradient sketch, K-FAC factors and inverses, the Monte-Carlo generator) are left
  untouched and the step does not count, so the run continues exactly, bit for bit, as if that
  step had never been taken. ``opt.skipped_steps`` (an int) counts the skipped steps.
* ``"raise"``: raise :class:`NonFiniteGradientError` (a ``FloatingPointError``) naming the
  offending parameters; nothing is changed.
* ``"proceed"``: no check, no cost; non-finite values flow into the update (torch's behaviour).

Cost of the check (``"skip"`` / ``"raise"``): one fused reduction per (device, dtype) group of
gradients (``torch._foreach_norm(grads, inf)``, the max-abs, which cannot overflow on finite
input and propagates NaN), one tiny stack, and ONE host sync (``.item()``) per step.

The policy is a constructor keyword, not a param-group key. ``state_dict()`` carries a small extra
entry ``state_dict["nonfinite"] = {"policy": ..., "skipped_steps": n}``; ``load_state_dict``
restores ``skipped_steps`` from it (the policy stays the one given to the constructor).

The same pass rejects, with a clear ``RuntimeError``, what no orthoptim optimizer supports:
sparse gradients and complex parameters (never silent wrong math).
"""

from __future__ import annotations

import math

import torch

from orthoptim.optim._validation import check_choice

POLICIES = ("skip", "raise", "proceed")
STATE_KEY = "nonfinite"


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or infinity and the optimizer's policy is ``nonfinite="raise"``."""


def _save_hook(optimizer, state_dict):
    state_dict[STATE_KEY] = {
        "policy": optimizer.nonfinite,
        "skipped_steps": int(optimizer.skipped_steps),
    }
    return state_dict


def _load_hook(optimizer, state_dict):
    entry = state_dict.pop(STATE_KEY, None) or {}
    skipped = entry.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"Invalid state_dict['{STATE_KEY}']['skipped_steps']: {skipped!r}")
    optimizer.skipped_steps = skipped
    return state_dict


def install(optimizer: torch.optim.Optimizer, policy: str) -> None:
    """Validate ``policy`` and set up ``optimizer.nonfinite``, ``optimizer.skipped_steps`` and the
    state-dict hooks that save / restore the counter. Call once, in ``__init__``."""
    check_choice("nonfinite", policy, POLICIES)
    optimizer.nonfinite = policy
    optimizer.skipped_steps = 0
    optimizer.register_state_dict_post_hook(_save_hook)
    optimizer.register_load_state_dict_pre_hook(_load_hook)


def _named_grads(optimizer):
    """``(name, grad)`` of every parameter with a gradient; rejects sparse / complex."""
    cls = type(optimizer).__name__
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = names[i] if names is not None else f"group {gi}, param {i}"
            if p.grad.is_sparse:
                raise RuntimeError(f"{cls} does not support sparse gradients (parameter {name})")
            if torch.is_complex(p):
                raise RuntimeError(f"{cls} does not support complex parameters (parameter {name})")
            out.append((name, p.grad))
    return out


def all_finite(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """A 0-d bool tensor, True iff every gradient is finite (no host sync); None if no grads."""
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return None
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    device = grads[0].device
    flags = [
        torch.stack(torch._foreach_norm(gs, math.inf)).isfinite().all().to(device)
        for gs in groups.values()
    ]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def skip_step(optimizer) -> bool:
    """Apply ``optimizer.nonfinite`` to the current gradients; True means: drop this step.

    Call at the top of ``step()``, before any state is touched. Under ``"skip"`` a True return
    has already incremented ``optimizer.skipped_steps``.
    """
    named = _named_grads(optimizer)
    if optimizer.nonfinite == "proceed":
        return False
    flag = all_finite([g for _, g in named])
    if flag is None or bool(flag.item()):  # the one host sync
        return False
    if optimizer.nonfinite == "raise":
        bad = [name for name, g in named if g.numel() and not bool(g.isfinite().all())]
        raise NonFiniteGradientError(
            f"{type(optimizer).__name__}: non-finite gradient (NaN or inf) in {bad}; "
            "nonfinite='raise' (use 'skip' to drop such steps)"
        )
    optimizer.skipped_steps += 1
    return True
