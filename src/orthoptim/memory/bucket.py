"""The memory of a bucket of same-shape matrices: what FOGO's step asks of it, batched.

FOGO groups its matrices by shape (a *bucket*) and asks the memory three things:

* every step, :meth:`MemoryBucket.accumulate`: fold the bucket's gradients into the statistics
  the next write summarises (the streaming sketch sum_t G_t^T G_t Omega, the output-energy
  profile of the stretch test);
* every step, :meth:`MemoryBucket.correct`: the corrected updates of the bucket, in the general
  form U = O + ((c' - c) M) V^T with c = O V the protected coordinates, c' the gated target and M
  an R x R matrix that depends on the basis only;
* rarely and eagerly (they read the device on the host), :func:`write`: summarise the window
  into one matrix's codebook (scheduled writes and ``end_task`` consolidations).

The persistent tensors live in each parameter's state (``orthoptim.memory.codebook`` for the
codebook; ``grad_sketch``, ``row_energy``, ``last_profile``, ``last_stats``): the bucket holds
only what is derived from them (the seeded projections), rebuilt whenever the optimizer rebuilds
its buckets (construction, loading, copying).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from orthoptim.memory import codebook
from orthoptim.ops.sketch import gaussian_sketch_matrix, nystrom_factor

# A new stretch raises the window's gradient energy by at least this factor (measured at class
# shifts on split Fashion-MNIST: 1.3 to 95; converging least squares oscillates by up to 1.2).
SHIFT_GROWTH = 1.5
# Offset of the gradient sketch's random stream (the codebook uses 1 and 1_000_003).
_OMEGA_STREAM = 2


@dataclass(frozen=True)
class MemoryConfig:
    """The memory's settings for one (param group, matrix shape): built once, never per step.

    Attributes:
        codebook: the codebook's own settings (pool rank R, capacity, gate, rho, ...).
        transpose: the protected side is the stored matrix's column space (the layer's side
            and the storage layout combined): the memory works on the transposed matrix.
        side_dim: dimension of the protected side (the codebook basis is side_dim x R).
        other_dim: dimension of the other side (output-energy profiles, sign-gate sketch).
        sketch_width: columns of the gradient sketch (0: writes summarise the slow momentum).
        profile: keep the stretch test's output-energy profiles.
        stretch_threshold: the stretch test's cosine threshold.
        write_interval: steps between scheduled writes (0: none).
        min_age: steps a scheduled entry waits, after its last refresh, before it protects.
    """

    codebook: codebook.CodebookConfig
    transpose: bool
    side_dim: int
    other_dim: int
    sketch_width: int
    profile: bool
    stretch_threshold: float
    write_interval: int
    min_age: int


def omega(config: MemoryConfig, seed: int, device: torch.device | str) -> torch.Tensor:
    """The Gaussian test matrix (side_dim x width) of a matrix's gradient sketch, from its seed."""
    return gaussian_sketch_matrix(
        config.sketch_width, config.side_dim, seed * 7919 + _OMEGA_STREAM, device=device
    ).mT.contiguous()


def sign_sketch(config: MemoryConfig, seed: int, device: torch.device | str) -> torch.Tensor | None:
    """The sign gate's k x other_dim sketch of a matrix (None for the overlap gate)."""
    if config.codebook.gate != "sign":
        return None
    return codebook.sign_sketch(config.other_dim, config.codebook, seed, device)


def _select(skip: torch.Tensor | None, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new``, or ``old`` where the step is dropped (``skip``: 0-d bool on the device)."""
    return new if skip is None else torch.where(skip, old, new)


class MemoryBucket:
    """The memories of N same-shape matrices (one param group, one device and dtype).

    Args:
        config: the memory settings of the bucket's shape.
        states: the N matrices' state dicts (each holds ``seed``, ``memory``, ...).
        device: where the matrices live.
    """

    def __init__(
        self, config: MemoryConfig, states: Sequence[dict[str, Any]], device: torch.device | str
    ):
        self.config = config
        self.states = list(states)
        self.omegas: list[torch.Tensor | None] = [
            omega(config, st["seed"], device) if config.sketch_width else None for st in self.states
        ]
        self.signs = [sign_sketch(config, st["seed"], device) for st in self.states]

    def _oriented(self, x: torch.Tensor) -> torch.Tensor:
        """(N, m, n) stored matrices as (N, other, side): the protected side last."""
        return x.mT if self.config.transpose else x

    def accumulate(
        self, grads: torch.Tensor, take: Sequence[int], skip: torch.Tensor | None
    ) -> None:
        """Add the gradients (N', m, n) of the matrices ``take`` to their window statistics:
        the sketch Y += G^T (G Omega) and the output-energy profile e += rowsq(G)."""
        grads = self._oriented(grads)
        for g, i in zip(grads, take, strict=True):
            state = self.states[i]
            if "grad_sketch" in state:
                sketch = state["grad_sketch"]
                new = sketch + g.mT.float() @ (g.float() @ cast(torch.Tensor, self.omegas[i]))
                sketch.copy_(_select(skip, sketch, new))
            if "row_energy" in state:
                energy = state["row_energy"]
                energy.copy_(_select(skip, energy, energy + g.float().square().sum(1)))

    def correct(
        self,
        updates: torch.Tensor,
        steps: torch.Tensor,
        take: Sequence[int],
        skip: torch.Tensor | None,
    ) -> torch.Tensor:
        """The corrected updates (N', m, n) of the matrices ``take`` at their step counters
        ``steps`` (N',); counts conflicts and records each matrix's ``last_stats``."""
        out = []
        for u, step, i in zip(self._oriented(updates), steps, take, strict=True):
            state = self.states[i]
            low = u.dtype in (torch.float16, torch.bfloat16)  # the lift needs >= float32
            corrected, stats = codebook.correct(
                u.float() if low else u, state["memory"], step, self.config.codebook,
                self.signs[i], skip=skip,
            )  # fmt: skip
            old = state["last_stats"]
            for k, v in stats.items():
                old[k].copy_(_select(skip, old[k], v))
            corrected = corrected.to(u.dtype)
            out.append(corrected.mT if self.config.transpose else corrected)
        return torch.stack(out)  # contiguous in the stored layout

    def write(self, i: int, slow: torch.Tensor, step: int, kind: int) -> str:
        """Summarise matrix ``i``'s window into its codebook (eager; reads the device).

        ``slow`` is its slow momentum (stored layout): the source with ``write_source="slow"``
        and the sign gate's past direction."""
        return write(self.states[i], self.config, slow, step, kind, self.omegas[i], self.signs[i])


def new_stretch(state: dict[str, Any], config: MemoryConfig, kind: int) -> bool:
    """Whether the window ending now starts a new stretch of training (output-side test).

    A new stretch moves the error to other output units *and* makes it grow: the window's
    profile agrees with the previous window's less than ``stretch_threshold`` (cosine) and its
    gradient energy is at least 1.5 times the previous window's. A drop counts once the previous
    stretch has held for a window (the first windows of training, and the first after a shift,
    are transients). Converging training, whose error shrinks while its profile drifts, never
    starts one. ``end_task`` is always a boundary. Resets the window's profile.
    """
    if "row_energy" not in state:
        return kind == codebook.CONSOLIDATED
    # The window's energy sum_t ||G_t||^2 is the squared norm of its profile.
    last = state["last_profile"]
    grew = bool(state["row_energy"].sum() >= SHIFT_GROWTH * last.square().sum())
    profile = state["row_energy"].sqrt()
    state["row_energy"].zero_()
    agree = codebook.profile_cosine(last, profile) >= config.stretch_threshold
    last.copy_(profile)
    if kind == codebook.CONSOLIDATED:
        state["stretch_windows"] = 0
        return True
    new = not agree and grew and state["stretch_windows"] >= 1
    state["stretch_windows"] = state["stretch_windows"] + 1 if agree else 0
    return new


def write(
    state: dict[str, Any],
    config: MemoryConfig,
    slow: torch.Tensor,
    step: int,
    kind: int,
    omega_i: torch.Tensor | None,
    sign: torch.Tensor | None,
) -> str:
    """One matrix's write: the window's summary (the Nystrom factor of its gradient sketch, or
    the slow momentum) into its codebook, as ``kind`` (``SCHEDULED`` or ``CONSOLIDATED``) at
    ``step``; returns the codebook's verdict ("insert", "merge" or "skip")."""
    if config.transpose:
        slow = slow.mT
    if "grad_sketch" in state:
        # Rows of F^T span the same space, with the same energies, as the gradients since
        # the last write: F F^T ~= sum_t G_t^T G_t.
        source = nystrom_factor(state["grad_sketch"], cast(torch.Tensor, omega_i)).mT
        state["grad_sketch"].zero_()
    else:
        source = slow
    stretch = new_stretch(state, config, kind)
    ready = step if kind == codebook.CONSOLIDATED else step + config.min_age
    seed = state["seed"] * 65_537 + state["writes"]
    state["writes"] += 1
    return codebook.write(
        state["memory"], source, step, config.codebook, seed=seed, kind=kind, ready=ready,
        sketch=sign, sign_source=slow, new_stretch=stretch,
    )  # fmt: skip
