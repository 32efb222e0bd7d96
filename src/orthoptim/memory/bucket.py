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

:class:`KroneckerBucket` answers the same three requests for ``protection="kronecker"``
(:mod:`orthoptim.memory.kronecker`); :func:`memory_for` picks the one a config asks for.

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

from orthoptim.memory import codebook, kronecker
from orthoptim.ops.sketch import gaussian_sketch_matrix, nystrom_factor
from orthoptim.ops.subspace import lift_matrix

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


def row_selector(take: Sequence[int], device: torch.device | str) -> slice | torch.Tensor:
    """What selects the rows ``take`` (increasing) of a stacked tensor: a slice when they are a
    run of consecutive indices (the usual case: a whole bucket, or one chunk of it), so that a
    step copies no index tensor to the device; an index tensor otherwise."""
    if take and take[-1] - take[0] + 1 == len(take):
        return slice(take[0], take[-1] + 1)
    return torch.tensor(list(take), dtype=torch.int64, device=device)


def rows(x: torch.Tensor, take: Sequence[int]) -> torch.Tensor:
    """``x[take]`` along dim 0 (a view when ``take`` is consecutive, see :func:`row_selector`)."""
    return x if len(take) == x.shape[0] else x[row_selector(take, x.device)]


def _commit(
    targets: list[torch.Tensor], old: torch.Tensor, new: torch.Tensor, skip: torch.Tensor | None
) -> None:
    """``targets[i] <- new[i]`` (``old`` = their stack), unless the step is dropped."""
    if skip is not None:
        new = torch.where(skip, old, new)
    torch._foreach_copy_(targets, list(new.unbind(0)))


class MemoryBucket:
    """The memories of N same-shape matrices (one param group, one device and dtype).

    Keeps, stacked over the bucket, what the per-step work reads and only writes change: the
    seeded projections, and a copy of each codebook's basis (in the correction's dtype), owners'
    column-to-entry map, entry flags and lift matrix M (:func:`orthoptim.ops.subspace.lift_matrix`)
    (refreshed by :meth:`write`, :meth:`consolidate` and :meth:`refresh`).

    Args:
        config: the memory settings of the bucket's shape.
        states: the N matrices' state dicts (each holds ``seed``, ``memory``, ...).
        device: where the matrices live.
        dtype: the correction's dtype (float32 for half-precision parameters).
    """

    def __init__(
        self,
        config: MemoryConfig,
        states: Sequence[dict[str, Any]],
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        self.config = config
        self.states = list(states)
        self.dtype = dtype
        seeds = [st["seed"] for st in self.states]
        self.omega = (
            torch.stack([omega(config, s, device) for s in seeds]) if config.sketch_width else None
        )
        signs = [sign_sketch(config, s, device) for s in seeds]
        self.sign = torch.stack(cast(list[torch.Tensor], signs)) if signs[0] is not None else None
        books = [st["memory"] for st in self.states]
        self.cache = {
            name: torch.stack([b[name] for b in books])
            for name in (
                "basis",
                "used",
                "ready",
                "owner",
                *(("sign_dir",) if self.sign is not None else ()),
            )
        }
        self.cache["basis"] = self.cache["basis"].to(dtype)
        self.col2entry = codebook.entry_of_columns(self.cache, config.codebook.capacity).to(dtype)
        self.lift = lift_matrix(torch.stack([b["basis"] for b in books]), config.codebook.rho)
        self.lift = self.lift.to(dtype)

    def refresh(self, i: int) -> None:
        """Re-read matrix ``i``'s codebook into the stacked copies (after it changed)."""
        book = self.states[i]["memory"]
        for name, stacked in self.cache.items():
            stacked[i].copy_(book[name])
        self.col2entry[i].copy_(codebook.entry_of_columns(book, self.config.codebook.capacity))
        self.lift[i].copy_(lift_matrix(book["basis"], self.config.codebook.rho))

    def _oriented(self, x: torch.Tensor) -> torch.Tensor:
        """(N, m, n) stored matrices as (N, other, side): the protected side last."""
        return x.mT if self.config.transpose else x

    def accumulate(
        self, grads: torch.Tensor, take: Sequence[int], skip: torch.Tensor | None
    ) -> None:
        """Add the gradients (N', m, n) of the matrices ``take`` to their window statistics:
        the sketch Y += G^T (G Omega) and the output-energy profile e += rowsq(G)."""
        g = self._oriented(grads).float()
        states = [self.states[i] for i in take]
        if self.omega is not None:
            sketches = [st["grad_sketch"] for st in states]
            old = torch.stack(sketches)
            _commit(sketches, old, old + g.mT @ (g @ rows(self.omega, take)), skip)
        if self.config.profile:
            energies = [st["row_energy"] for st in states]
            old = torch.stack(energies)
            _commit(energies, old, old + g.square().sum(-1), skip)

    def correct(
        self,
        updates: torch.Tensor,
        steps: torch.Tensor,
        take: Sequence[int],
        skip: torch.Tensor | None,
    ) -> torch.Tensor:
        """The corrected updates (N', m, n) of the matrices ``take`` at their step counters
        ``steps`` (N',): U = O + ((c' - c) M) V^T, gated on the device. Counts conflicts and
        records each matrix's ``last_stats``."""
        states = [self.states[i] for i in take]
        u = self._oriented(updates).to(self.dtype)
        book = {name: rows(t, take) for name, t in self.cache.items()}
        hits = [st["memory"]["hits"] for st in states]
        book["hits"] = torch.stack(hits)
        sign = rows(self.sign, take) if self.sign is not None else None
        corrected, stats = codebook.correct(
            u, book, steps, self.config.codebook, sign, skip,
            lift=rows(self.lift, take), col2entry=rows(self.col2entry, take),
        )  # fmt: skip
        torch._foreach_copy_(hits, list(book["hits"].unbind(0)))
        for name, value in stats.items():
            targets = [st["last_stats"][name] for st in states]
            _commit(targets, torch.stack(targets), value, skip)
        return self._oriented(corrected.to(updates.dtype))

    def write(self, i: int, slow: torch.Tensor, step: int, kind: int) -> str:
        """Summarise matrix ``i``'s window into its codebook (eager; reads the device).

        ``slow`` is its slow momentum (stored layout): the source with ``write_source="slow"``
        and the sign gate's past direction."""
        omega_i = self.omega[i] if self.omega is not None else None
        sign_i = self.sign[i] if self.sign is not None else None
        out = write(self.states[i], self.config, slow, step, kind, omega_i, sign_i)
        self.refresh(i)
        return out

    def consolidate(self, i: int, slow: torch.Tensor, step: int) -> str:
        """``end_task`` for matrix ``i``: a consolidating write, then every stored entry
        protects from now on."""
        out = self.write(i, slow, step, codebook.CONSOLIDATED)
        self.states[i]["memory"]["ready"].clamp_(max=step)
        self.refresh(i)
        return out


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


class SharedFactor:
    """One side's Kronecker factor shared by several matrices (``kron_share="model"``): a view
    of the tensors its owner's state holds (``<side>_acc``, ``<side>_pre`` and, with boundary
    detection, ``<side>_energy``, ``<side>_since``; :mod:`orthoptim.memory.kronecker`).

    With detection (``growth`` > 0) :meth:`begin_step` runs first in a step: the boundary test
    on the members' gradient energy, and the fold (:func:`kronecker.detect_step`); then every
    member adds its step's Gram (:meth:`add`) and is damped by :attr:`pre`.

    Args:
        state: the owner's ``kron`` state dict.
        side: ``"input"`` or ``"output"`` (of the owner's stored matrix; its dimension d is the
            factor's).
        kappa: protection strength.
        growth: boundary detection's g (``kron_detect``); 0: none.
        members: the parameters that share the factor (their gradients are the step's energy).
    """

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        side: str,
        kappa: float,
        growth: float,
        members: Sequence[torch.Tensor] = (),
    ):
        self.state, self.side, self.kappa, self.growth = state, side, kappa, growth
        self.acc, self.pre = state[f"{side}_acc"], state[f"{side}_pre"]
        self.members = list(members)
        self.names = {k: f"{side}_{k}" for k in ("acc", "pre", "energy", "since")}

    def add(self, gram: torch.Tensor, skip: torch.Tensor | None) -> None:
        """Add a (d, d) Gram to the running Gram (not if the step is dropped)."""
        new = self.acc + gram
        if skip is not None:
            new = torch.where(skip, self.acc, new)
        self.acc.copy_(new)

    def begin_step(self, skip: torch.Tensor | None) -> None:
        """With detection: this step's boundary test and fold, before its Grams are added and
        its updates damped (:func:`kronecker.detect_step`), unless the step is dropped."""
        grads = [p.grad for p in self.members if p.grad is not None]
        if self.growth <= 0 or not grads:
            return
        e = torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum()
        st, names = self.state, self.names
        new = kronecker.detect_step(
            st[names["acc"]], st[names["pre"]], e, st[names["energy"]], st[names["since"]],
            self.kappa, self.growth,
        )  # fmt: skip
        for key, value in new.items():
            dst = st[names[key]]
            dst.copy_(value if skip is None else torch.where(skip, dst, value))

    def consolidate(self) -> None:
        """``end_task``: fold the running Gram in (:func:`kronecker.consolidate`)."""
        view = {k: v for k, v in self.state.items() if k.startswith(self.side + "_")}
        kronecker.consolidate(view, self.kappa)


def own_view(state: dict[str, torch.Tensor], shared: Sequence[str]) -> dict[str, torch.Tensor]:
    """A ``kron`` state without the ``shared`` sides (those a :class:`SharedFactor` handles)."""
    return {k: v for k, v in state.items() if k.split("_")[0] not in shared}


class KroneckerBucket:
    """The Kronecker-factored protection (:mod:`orthoptim.memory.kronecker`) of N same-shape
    matrices, behind the same interface as :class:`MemoryBucket`: ``accumulate`` adds the
    step's gradient Grams, ``correct`` damps the updates on the protected sides, ``write`` is
    an online consolidation (``online`` > 0), ``consolidate`` folds the task in (``end_task``).

    The state lives in each matrix's ``state["kron"]``; the bucket keeps a stacked copy of the
    preconditioners (what every step reads), refreshed when a consolidation changes them. A
    side in ``shared`` is a :class:`SharedFactor` (``kron_share="model"``): the bucket adds the
    sum of its matrices' Grams to it and damps with its one preconditioner; the factor's own
    consolidation (``end_task``) is the optimizer's, once per factor.

    Args:
        config: the protection's settings for the bucket's shape.
        states: the N matrices' state dicts (each holds ``kron``).
        device: where the matrices live (unused: the state is already there).
        dtype: the update's dtype (the damping runs in float32).
        shared: ``{side: SharedFactor}`` for the sides the matrices share (default none).
    """

    def __init__(
        self,
        config: kronecker.KroneckerConfig,
        states: Sequence[dict[str, Any]],
        device: torch.device | str,
        dtype: torch.dtype,
        shared: dict[str, SharedFactor] | None = None,
    ):
        self.config = config
        self.states = list(states)
        self.shared = dict(shared or {})
        own = [side for side, _ in config.sides if side not in self.shared]
        self.accs = [f"{side}_acc" for side in own]
        pres = [f"{side}_pre" for side in own]
        self.pre = {name: torch.stack([st["kron"][name] for st in self.states]) for name in pres}

    def refresh(self, i: int) -> None:
        """Re-read matrix ``i``'s preconditioners into the stacked copies."""
        for name, stacked in self.pre.items():
            stacked[i].copy_(self.states[i]["kron"][name])

    def accumulate(
        self, grads: torch.Tensor, take: Sequence[int], skip: torch.Tensor | None
    ) -> None:
        """Add the gradients (N', m, n) of the matrices ``take`` to their running Grams."""
        states = [self.states[i]["kron"] for i in take]
        accs = {name: torch.stack([st[name] for st in states]) for name in self.accs}
        for name, new in kronecker.grams(accs, grads).items():
            _commit([st[name] for st in states], accs[name], new, skip)
        for side, factor in self.shared.items():
            factor.add(kronecker.gram_sum(grads, side), skip)

    def correct(
        self,
        updates: torch.Tensor,
        steps: torch.Tensor,
        take: Sequence[int],
        skip: torch.Tensor | None,
    ) -> torch.Tensor:
        """The damped updates (N', m, n) of the matrices ``take``:
        (I + kappa P_out)^-1 U (I + kappa P_in)^-1 (a shared side's P broadcast over them)."""
        pres = {name: rows(t, take) for name, t in self.pre.items()}
        for side, factor in self.shared.items():
            pres[f"{side}_pre"] = factor.pre.unsqueeze(0)
        return kronecker.apply(pres, updates)

    def write(self, i: int, slow: torch.Tensor, step: int, kind: int) -> str:
        """A scheduled (online) consolidation of matrix ``i``: precision <- I + gamma P_old +
        (1 - gamma) kappa hat A_window. Eager (reads the device)."""
        gamma = self.config.online
        kronecker.consolidate(self.own(i), (1 - gamma) * self.config.kappa, gamma)
        self.refresh(i)
        return "consolidate"

    def consolidate(self, i: int, slow: torch.Tensor, step: int) -> str:
        """``end_task`` for matrix ``i``: fold the task's Grams into its own preconditioners
        (not the shared ones: see the class docstring)."""
        kronecker.consolidate(self.own(i), self.config.kappa)
        self.refresh(i)
        return "consolidate"

    def own(self, i: int) -> dict[str, torch.Tensor]:
        """Matrix ``i``'s ``kron`` state without the shared sides."""
        return own_view(self.states[i]["kron"], list(self.shared))


def memory_for(
    config: MemoryConfig | kronecker.KroneckerConfig,
    states: Sequence[dict[str, Any]],
    device: torch.device | str,
    dtype: torch.dtype,
    shared: dict[str, SharedFactor] | None = None,
) -> MemoryBucket | KroneckerBucket:
    """The memory of a bucket under ``config``: the codebook (``MemoryConfig``, the default
    ``protection="subspace"``) or the Kronecker protection (``KroneckerConfig``; ``shared``:
    its shared factors by side)."""
    if isinstance(config, kronecker.KroneckerConfig):
        return KroneckerBucket(config, states, device, dtype, shared)
    return MemoryBucket(config, states, device, dtype)
