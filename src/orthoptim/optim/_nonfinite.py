"""Non-finite gradients and loss scaling, decided on the device: shared by FOGO, KFAC and FOP.

Each optimizer takes ``nonfinite="skip" | "raise" | "proceed"`` (default ``"skip"``) and calls
:func:`begin_step` at the top of ``step()``, after the closure and before it touches any state.
``begin_step`` returns a :class:`StepGuard` whose ``found_inf`` is a float32 0-d tensor on the
gradients' device, 1.0 when this step must be dropped: the convention of torch's fused
optimizers and of ``torch.amp.GradScaler``. The host never reads it in a steady-state step.

* ``"skip"`` (default): a step whose gradients hold a NaN or an infinity is dropped. It is
  still *computed* (the host does not know), but every write is masked on the device
  (``torch.where`` on the flag, torch's fused ``adamw``/``sgd`` with ``found_inf``, or FOGO's
  factors of 0 on values kept finite, :mod:`orthoptim.optim._fogo_math`), so
  parameters and all optimizer state (momentum, Adam moments, *step counters*, FOGO's codebook,
  sketches and write counters, K-FAC/FOP factors, inverses, momentum and Monte-Carlo generator)
  are left bit for bit as they were, and the run continues exactly as if the step had never
  been taken. Step counters that scheduled work reads on the host are kept on the device too
  (FOGO) or corrected at the next scheduled event, which syncs anyway (K-FAC's factor and
  inverse steps, via :func:`unseen_skips`); see docs/reliability.md.
* ``"raise"`` (a debugging mode; it syncs every step): raise :class:`NonFiniteGradientError`
  (a ``FloatingPointError``) naming the offending parameters; nothing is changed.
* ``"proceed"``: no check, no cost; non-finite values flow into the update (torch's behaviour).

Counting. ``opt.skipped_steps`` (reading it syncs) is the number of skipped steps. The device
also counts the current run of consecutive skipped steps; every :data:`CHECK_EVERY` steps the host
reads the counters back (the only sync of the mechanism) and warns when ``CHECK_EVERY`` or more
consecutive steps were skipped: a run whose gradients stay NaN no longer looks merely stuck.
The counters are one int64 tensor on the parameters' device, ``[skipped in all, current run,
longest run since the last read-back]``, that every param group holds as
``"nonfinite_counts"`` (always current, like a tensor ``lr``): ``state_dict()`` saves it with the
groups, and ``torch.distributed.checkpoint``, which saves only ``state`` and ``param_groups``
(and, flattened, rebuilds the groups from the live optimizer's keys), carries it too.
``load_state_dict`` restores it (a state dict without it restarts from zero). The policy is a
constructor keyword and is not saved.

Loss scaling (``torch.amp.GradScaler``). Optimizers built on this module set
``_step_supports_amp_scaling``: ``scaler.step(opt)`` then calls ``opt.step()`` on every step and
hands it ``opt.grad_scale`` (the scale s, or None if ``scaler.unscale_`` already ran) and
``opt.found_inf``, instead of reading ``found_inf`` on the host. ``begin_step`` unscales the
gradients in place (``torch._amp_foreach_non_finite_check_and_unscale_``, as ``unscale_`` would;
that pass is also the finiteness check) and drops the step when the scaler found an overflow,
whatever the policy (an overflow is the scaler's business: it lowers its scale). Anything else an
optimizer derived from the scaled backward (K-FAC's captured output gradients) must be multiplied
by ``guard.inv_scale``.

The same pass rejects, with a clear ``RuntimeError``, what no orthoptim optimizer supports:
sparse gradients and complex parameters (never silent wrong math).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from orthoptim.optim._validation import check_choice

POLICIES = ("skip", "raise", "proceed")
CHECK_EVERY = 100  # steps between host read-backs of the skip counters; also the warning's streak
GROUP_KEY = "nonfinite_counts"  # the counters' tensor, held by every param group


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or infinity and the optimizer's policy is ``nonfinite="raise"``."""


class _Counters:
    """The skip counters of one optimizer: ``counts`` = [skipped in all, current run of
    consecutive skips, longest run since the last read-back], one int64 tensor on the
    parameters' device that every param group also holds (as :data:`GROUP_KEY`), plus host
    bookkeeping."""

    def __init__(self, counts: torch.Tensor):
        self.counts = counts
        self.calls = 0  # begin_step calls since construction or load (read-back schedule)
        self.seen = int(counts[0].item())  # skips already returned by unseen_skips

    def total(self) -> int:
        return int(self.counts[0].item())  # syncs: only when asked

    def add(self, found_inf: torch.Tensor) -> None:
        """Count this step's flag on the device (no host read)."""
        counts = self.counts
        found = found_inf.to(device=counts.device, dtype=torch.int64)
        counts[0].add_(found)
        counts[1].add_(1).mul_(found)  # a finite step ends the run
        torch.maximum(counts[2], counts[1], out=counts[2])


class Guarded(torch.optim.Optimizer):
    """Base of every orthoptim optimizer: the skip count, the counters in every param group,
    and the GradScaler protocol flag."""

    # torch.amp.GradScaler hands found_inf / grad_scale to step() instead of syncing.
    _step_supports_amp_scaling = True
    # Set by install() (the policy, the counters) and by the load pre-hook (the saved counters,
    # until the post-hook takes them).
    nonfinite: str
    _nonfinite_counters: _Counters
    _loaded_counts: torch.Tensor

    @property
    def skipped_steps(self) -> int:
        """Number of steps dropped for non-finite gradients (reading it syncs with the device)."""
        return self._nonfinite_counters.total()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        counters = getattr(self, "_nonfinite_counters", None)  # None inside Optimizer.__init__
        if counters is not None:
            self.param_groups[-1][GROUP_KEY] = counters.counts


class StepGuard:
    """What one ``step()`` needs from the non-finite policy and a GradScaler.

    Attributes:
        found_inf: float32 0-d tensor (1.0 = drop this step) on the gradients' device, for
            torch's fused functional ``adamw`` / ``sgd``; None when nothing can drop the step
            (``"proceed"`` without a scaler, ``"raise"`` after its check, or no gradients).
        inv_scale: 1 / the GradScaler's scale when one was handed over (the parameter gradients
            are already unscaled in place; multiply what else came from the scaled backward);
            None otherwise.
    """

    def __init__(self, found_inf: torch.Tensor | None, inv_scale: torch.Tensor | None):
        self.found_inf = found_inf
        self.inv_scale = inv_scale
        self._skip: dict[torch.device, torch.Tensor] = {}

    def skip(self, device: torch.device) -> torch.Tensor | None:
        """This step's drop flag as a 0-d bool tensor on ``device`` (None: never dropped)."""
        if self.found_inf is None:
            return None
        if device not in self._skip:
            self._skip[device] = self.found_inf.to(device, non_blocking=True) > 0
        return self._skip[device]

    def commit_(self, dst: torch.Tensor, new: torch.Tensor) -> None:
        """``dst <- new`` unless this step is dropped (``torch.where`` on the device flag)."""
        skip = self.skip(dst.device)
        if skip is None:
            dst.copy_(new)
        else:
            torch.where(skip, dst, new, out=dst)

    def select(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """``new``, or ``old`` if this step is dropped (out of place; ``new`` when no ``old``)."""
        skip = self.skip(new.device)
        if skip is None or old is None:
            return new
        return torch.where(skip, old, new)

    def skipped(self) -> bool:
        """Whether this step is dropped, read on the host: syncs, so for rare steps only
        (K-FAC's factor and inverse updates, FOGO's memory writes)."""
        return self.found_inf is not None and bool(self.found_inf.item())


def install(optimizer: Guarded, policy: str) -> None:
    """Validate ``policy``; set up ``optimizer.nonfinite``, the skip counters (in every param
    group) and the load hooks. Call once, at the end of ``__init__``."""
    check_choice("nonfinite", policy, POLICIES)
    optimizer.nonfinite = policy
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), "cpu")
    _link(optimizer, _Counters(torch.zeros(3, dtype=torch.int64, device=device)))
    optimizer.register_load_state_dict_pre_hook(_load_pre_hook)
    optimizer.register_load_state_dict_post_hook(_load_post_hook)


def _link(optimizer: Guarded, counters: _Counters) -> None:
    optimizer._nonfinite_counters = counters
    for group in optimizer.param_groups:
        group[GROUP_KEY] = counters.counts


def _guarded(optimizer: Optimizer) -> Guarded:
    """``optimizer`` as the :class:`Guarded` that registered the hook (torch types hooks for any
    Optimizer)."""
    if not isinstance(optimizer, Guarded):
        raise TypeError(f"optimizer must be an orthoptim optimizer, got {type(optimizer).__name__}")
    return optimizer


def _load_pre_hook(optimizer_: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Take the saved counters (group 0's; every group holds the same) before torch replaces
    the groups; a state dict without them (another optimizer's) restarts from zero."""
    optimizer = _guarded(optimizer_)
    groups = state_dict.get("param_groups", [])
    saved = groups[0].get(GROUP_KEY) if groups else None
    device = optimizer._nonfinite_counters.counts.device
    if saved is None:
        optimizer._loaded_counts = torch.zeros(3, dtype=torch.int64, device=device)
        return state_dict
    valid = isinstance(saved, torch.Tensor) and saved.shape == (3,)
    if not (valid and not saved.is_floating_point() and bool((saved >= 0).all())):
        raise ValueError(f"Invalid '{GROUP_KEY}' in the saved param groups: {saved!r}")
    optimizer._loaded_counts = saved.to(device=device, dtype=torch.int64, copy=True)
    return state_dict


def _load_post_hook(optimizer_: Optimizer) -> None:
    optimizer = _guarded(optimizer_)
    _link(optimizer, _Counters(optimizer.__dict__.pop("_loaded_counts")))


def _named_grads(optimizer: Optimizer) -> list[tuple[str, torch.Tensor]]:
    """``(name, grad)`` of every parameter with a gradient; rejects sparse / complex."""
    cls = type(optimizer).__name__
    out: list[tuple[str, torch.Tensor]] = []
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
            grad = p.grad
            # A sharded (DTensor) gradient: this rank's shard; the ranks' flags are then
            # combined by begin_step's process_group.
            out.append((name, grad.to_local() if isinstance(grad, DTensor) else grad))
    return out


_DeviceAndDtype = tuple[torch.device, torch.dtype]


def _by_device_and_dtype(grads: list[torch.Tensor]) -> dict[_DeviceAndDtype, list[torch.Tensor]]:
    groups: dict[_DeviceAndDtype, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        if g.numel() > 0:
            groups[(g.device, g.dtype)].append(g)
    return groups


def _extremes(device: torch.device, grads: list[torch.Tensor]) -> torch.Tensor:
    """Values that are all finite iff every gradient is: per tensor its largest magnitude (a
    reduction that cannot overflow on finite input and propagates NaN).

    On accelerators one fused multi-tensor max-abs (``_foreach_norm(ord=inf)``); on the CPU,
    where that kernel is a scalar loop (about 9x slower than ``aminmax`` on the char-GPT's
    gradients, docs/performance.md), each tensor's minimum and maximum in one vectorised pass."""
    if device.type == "cpu":
        return torch.stack([torch.stack(torch.aminmax(g)) for g in grads])
    return torch.stack(torch._foreach_norm(grads, math.inf))


def found_nonfinite(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """A float32 0-d tensor, 1.0 iff some gradient holds NaN/inf (no host sync); None if there
    is nothing to check. A max-abs (or min-max) reduction per tensor, fused per (device, dtype)
    group where the device has a fused kernel (:func:`_extremes`)."""
    groups = _by_device_and_dtype(grads)
    if not groups:
        return None
    device = next(iter(groups))[0]
    flags = [_extremes(dev, gs).isfinite().all().to(device) for (dev, _), gs in groups.items()]
    return (~torch.stack(flags).all()).float()


def _unscale_(
    grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor
) -> torch.Tensor:
    """Multiply the gradients by ``inv_scale`` in place and raise ``found_inf`` to 1.0 where one
    is not finite (GradScaler's own kernel, per device and dtype)."""
    per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    for (device, _), gs in _by_device_and_dtype(grads).items():
        if device not in per_device:
            per_device[device] = (
                torch.zeros((), dtype=torch.float32, device=device),
                inv_scale.to(device, non_blocking=True),
            )
        torch._amp_foreach_non_finite_check_and_unscale_(gs, *per_device[device])
    for flag, _ in per_device.values():
        found_inf = torch.maximum(found_inf, flag.to(found_inf.device, non_blocking=True))
    return found_inf


def begin_step(optimizer: Guarded, process_group: dist.ProcessGroup | None = None) -> StepGuard:
    """Apply the policy (and a GradScaler's protocol) to the current gradients.

    Call at the top of ``step()``, before any state is touched. No host sync, except under
    ``nonfinite="raise"`` and once every :data:`CHECK_EVERY` calls (the counters' read-back).
    ``process_group``: the ranks of a sharded step, which must drop the same steps: the flag
    is all-reduced (max) over them, every rank taking part (one with no gradient too).
    """
    named = _named_grads(optimizer)
    grads = [g for _, g in named]
    counters = optimizer._nonfinite_counters
    scale = getattr(optimizer, "grad_scale", None)
    scaler_inf = getattr(optimizer, "found_inf", None)
    inv_scale = None
    found = None
    if scaler_inf is not None:
        found = (scaler_inf.float() > 0).float()  # the scaler's tensor stays untouched
    if scale is not None:
        # Same reciprocal as GradScaler.unscale_ (in float64: exact for powers of two).
        inv_scale = scale.double().reciprocal().float()
        if found is None:
            found = torch.zeros((), dtype=torch.float32, device=scale.device)
        found = _unscale_(grads, found, inv_scale)
    elif found is None and optimizer.nonfinite != "proceed":
        found = found_nonfinite(grads)
        if found is not None and optimizer.nonfinite == "raise":
            if bool(found.item()):  # the debugging mode syncs every step
                bad = [n for n, g in named if g.numel() and not bool(g.isfinite().all())]
                raise NonFiniteGradientError(
                    f"{type(optimizer).__name__}: non-finite gradient (NaN or inf) in {bad}; "
                    "nonfinite='raise' (use 'skip' to drop such steps)"
                )
            found = None  # checked: nothing to drop
    if process_group is not None and (
        found is not None or optimizer.nonfinite == "skip" or scaler_inf is not None
    ):
        if found is None:  # no gradient on this rank
            found = torch.zeros((), dtype=torch.float32, device=counters.counts.device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=process_group)
    if found is not None:
        if counters.counts.device != found.device:  # the model moved after construction
            _link(optimizer, _Counters(counters.counts.to(found.device)))
            counters = optimizer._nonfinite_counters
        counters.add(found)
    _tick(optimizer, counters, found is not None)
    return StepGuard(found, inv_scale)


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _tick(optimizer: Optimizer, counters: _Counters, counted: bool) -> None:
    """Host bookkeeping of a step: the call count, and the periodic read-back of the counters.
    Eager under ``torch.compile`` (a Python int that changes every step would recompile)."""
    counters.calls += 1
    if counted and counters.calls % CHECK_EVERY == 0:
        _read_back(optimizer, counters)


def _read_back(optimizer: Optimizer, counters: _Counters) -> None:
    """The periodic host read of the counters: warn about a long run of skipped steps."""
    total, streak, longest = counters.counts.tolist()
    counters.counts[2].fill_(streak)  # a run still going on is reported again
    if longest >= CHECK_EVERY:
        now = "the last" if streak == longest else "a run of"
        warnings.warn(
            f"{type(optimizer).__name__}: {now} {longest} consecutive steps were skipped "
            f"because of non-finite gradients (NaN or inf); {total} skipped in all. The model "
            "is not learning: check the loss, the learning rate and the data "
            "(nonfinite='raise' names the parameter).",
            RuntimeWarning,
            stacklevel=4,
        )


def unseen_skips(optimizer: Guarded) -> int:
    """Skipped steps (the current one included) not returned by an earlier call: what a host-side
    step clock that counted every ``step()`` call must subtract to be exact. Syncs."""
    counters = optimizer._nonfinite_counters
    total = counters.total()
    new, counters.seen = total - counters.seen, total
    return new
