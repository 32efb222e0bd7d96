r"""FOGO: Forgetting-aware Orthogonalization Optimizer (Nguyen et al., arXiv 2606.10406).

For every matrix parameter W (m x n; conv kernels as out x in*kh*kw) with gradient G:

.. math::
    \begin{aligned}
    M_s &\leftarrow \beta_s M_s + (1-\beta_s) G, \qquad M_f \leftarrow \beta_f M_f + (1-\beta_f) G
        && \text{slow and fast momentum}\\
    O_s &= \mathrm{NS}(M_s), \qquad O_f = \mathrm{NS}(M_f) && \text{Newton-Schulz polar factors}\\
    \hat O &= \mathrm{slerp}(O_s, O_f;\ \xi) && \text{fuse the streams}\\
    c &= \hat O V,\quad c' = c \odot (1 - \text{conflict}) && \text{protected coordinates}\\
    U &= \arg\min_U \tfrac12\|U-\hat O\|^2 + \tfrac{\rho}{2}\|UV - c'\|^2 && \text{proximal lift}\\
    W &\leftarrow (1-\eta\lambda) W - \eta\, \sigma \sqrt{mn}\, U / \|U\|_F
        && \text{RMS of the step} = \eta\sigma
    \end{aligned}

V is the codebook memory of protected input subspaces (``orthoptim.memory.codebook``), written
every ``write_interval`` steps from a sketch of the gradients since the last write (task-agnostic;
an entry protects ``min_age`` steps after its last write within its stretch of training, a
stretch ending when the output-energy profile of the gradients changes) and at ``end_task()``.
With ``protection="kronecker"`` (opt-in, beyond the memory budget) the memory is instead
Kronecker-factored soft protection, U = (I + kappa S)^-1 O (I + kappa A)^-1 from each past
task's gradient Grams (``orthoptim.memory.kronecker``; docs/fogo.md, section 10).
(The EMA form of the momentum differs from the paper's sum form M = beta M + G only by a scale
that Newton-Schulz removes.) Every other parameter (ndim < 2, or a group with
``algorithm="adamw"``) is updated by AdamW with the group's lr and weight decay.

The step runs per *bucket* of same-shape matrices: pure functions over stacked tensors
(``orthoptim.optim._fogo_math``) and the memory's bucket interface (``orthoptim.memory.bucket``);
the state layout lives in ``orthoptim.optim._fogo_state``. FOGOReference
(``orthoptim.optim.fogo_reference``) is the same optimizer written as a plain per-matrix loop.

The design of the memory is orthoptim's (the paper's text and code are not public): see
docs/fogo.md for what is from the paper, what is ours, and the ablations behind the defaults.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from orthoptim.distributed import megabatch
from orthoptim.memory import codebook, kronecker
from orthoptim.memory.bucket import (
    KroneckerBucket,
    MemoryBucket,
    SharedFactor,
    memory_for,
    own_view,
    rows,
)
from orthoptim.optim import _fogo_math, _fogo_shard, _fogo_state, _fused, _nonfinite
from orthoptim.optim._validation import check_choice, check_group_keys, check_range


class FOGO(_nonfinite.Guarded, Optimizer):
    """Forgetting-aware Orthogonalization Optimizer.

    Args:
        params: iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts. Groups
            may set ``algorithm="fogo"`` or ``"adamw"``; by default tensors with ndim >= 2 use
            FOGO and the rest AdamW. Use :func:`orthoptim.param_groups` to send embeddings and
            the output head to AdamW as Muon practice recommends.
        lr: learning rate, shared by both algorithms (the FOGO step has RMS ``lr * target_rms``,
            AdamW's scale, so AdamW learning rates transfer). Default 1e-3.
        weight_decay: decoupled weight decay lambda (``p *= 1 - lr * lambda``). Default 0.
        beta_slow: decay of the slow momentum stream (persistent directions). Default 0.95.
        beta_fast: decay of the fast stream (recent change); must be < ``beta_slow``.
            Default 0.8. (Chosen by evidence: (0.99, 0.9) forgot far more on permuted MNIST,
            see docs/fogo.md.)
        mix: slerp weight xi towards the fast stream (0 = slow only, 1 = fast only). Default 0.5.
        dual_stream: keep both streams; ``False`` keeps one buffer with ``beta_slow`` (with
            ``memory=False``, ``nesterov=True`` and ``scale="muon"`` this is exactly
            ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")``). Default True.
        fusion: ``"slerp"`` or ``"lerp"`` (normalized linear interpolation). Default "slerp".
        nesterov: use G + beta (M - G) (Nesterov look-ahead) as each stream's direction.
            Default False.
        target_rms: sigma, the RMS of the update before the lr. Default 0.2.
        scale: ``"rms"`` (exact RMS sigma, gamma = sigma sqrt(mn)/||U||_F) or ``"muon"``
            (sigma sqrt(max(m, n)), torch's ``match_rms_adamw``). Default "rms".
        ns_steps, ns_coefficients, ns_dtype: Newton-Schulz settings (see
            :func:`orthoptim.ops.newton_schulz`). Defaults 5, "muon", "auto": ``"auto"`` is
            chosen per param group from its parameters' device type when the group is added
            (:data:`orthoptim.ops.newton_schulz.NS_DTYPE_BY_DEVICE`: bfloat16 on CUDA, XPU and
            XLA devices, float32 elsewhere, e.g. on CPU: see that table) and
            recorded in the group, so ``param_groups[i]["ns_dtype"]`` (and a checkpoint) says
            what ran. Never chosen by probing the hardware.
        eps: norm guard. Default 1e-7.
        adamw_betas, adamw_eps: AdamW settings for non-FOGO parameters.
            Defaults (0.9, 0.999), 1e-8.
        momentum: when set, the group's one momentum knob: it replaces ``beta_slow`` for the
            group's FOGO tensors and AdamW's beta1 for its AdamW tensors. It is the key torch's
            momentum-cycling schedulers write (``OneCycleLR``, ``CyclicLR`` with
            ``cycle_momentum=True``; they set it in every group at construction). Below
            ``beta_fast`` the "slow" stream decays faster than the fast one: the update is still
            the fusion of two momentum averages and nothing is clamped, but FOGO warns once.
            Must lie in [0, 1). Default None (use ``beta_slow`` and ``adamw_betas``).
        memory: enable the codebook memory (long-term module). Default True.
        memory_budget: memory size as a fraction of the parameter's float32 bytes (whatever its
            dtype); sets the pool rank R (at least 1) of the protected directions.
            Default 0.05.
        memory_dtype: storage dtype of the protected bases. Default "bfloat16".
        capacity: maximum number of codebook entries per matrix. Default 8.
        write_rank: directions added per write (default: R // 2, at least 1).
        write_interval: steps between scheduled (task-agnostic) writes; 0 disables them.
            Default 50.
        min_age: steps an entry written on schedule waits, after its last refresh by the same
            stretch of training, before it protects (so the current stretch does not block
            itself; see ``stretch_threshold``). Default: write_interval.
        gate: conflict test, ``"overlap"`` (any use of a protected subspace) or ``"sign"``
            (the update undoes the stored direction). Default "overlap".
        gate_threshold: tau of the gate. Default 0.0.
        radius: spectral norm r of the protection operator, in (0, 1]; the proximal weight is
            rho = r / (1 - r) (r = 1: hard projection). Default 1.0.
        merge_threshold: energy share above which a scheduled write merges into an existing
            scheduled entry. Default 0.5.
        stretch_threshold: a write starts a new stretch of training when the cosine between its
            window's output-energy profile sqrt(sum_t rowsq(G_t)) (one value per output unit)
            and the previous window's falls below this while the window's gradient energy
            grows (by 1.5x or more), after at least one window of agreement. A new stretch
            closes every entry: merges into it still refresh its age but no longer postpone its
            protection, so a class shift that keeps the dominant inputs (and merges into the
            old task's entry) is protected against, while a stationary stretch (cosine ~0.99)
            or converging training (shrinking energy) never blocks itself. 0 disables the test.
            Default 0.85 (docs/fogo.md, section 3).
        min_energy: energy share below which a new direction is not stored. Default 1e-3.
        eviction: ``"oldest"`` or ``"least_used"``: which entries make room. Default "oldest".
        overflow: how room is made when the pool or the entry slots are full: ``"compress"``
            (the two chosen entries become one entry of their top ``write_rank`` energy-weighted
            directions, so old tasks keep their dominant and shared directions) or ``"evict"``
            (the chosen entry is dropped). Default "evict" (compression was tried and measured
            no better, docs/fogo.md section 3).
        side: protected side, ``"input"`` (row space, default) or ``"output"`` (column space),
            of the layer, whatever its storage layout (see ``layout``).
        layout: how the parameter stores its matrix: ``"out_in"`` (torch ``nn.Linear`` and
            conv kernels: dim 0 is the output, default) or ``"in_out"`` (2-D only: HF GPT-2's
            ``Conv1D``, Flax/JAX kernels). Newton-Schulz and the RMS scale do not depend on it;
            the memory protects the layer's ``side`` in either layout.
        protection: what the memory is: ``"subspace"`` (default: the codebook of protected
            subspaces above, within ``memory_budget``) or ``"kronecker"`` (opt-in, beyond the
            budget: each task's Kronecker-factored gradient Grams damp every later update,
            U = (I + kappa sum_t S_t)^-1 O (I + kappa sum_t A_t)^-1 before the RMS scale, with
            A_t = sum G^T G and S_t = sum G G^T of task t, each normalised to mean eigenvalue
            1; see :mod:`orthoptim.memory.kronecker`). Tasks are consolidated by ``end_task``
            (and, with ``kron_online``, on the write schedule). A 2-D AdamW parameter of a
            group with the memory on (an embedding or the output head) is protected too, its
            AdamW step damped the same way. It costs 2 d^2 float32 per whole protected side of
            dimension d (47.5% of GPT-2 small's parameter bytes by default; docs/fogo.md,
            section 10). Not supported under data-parallel sharding yet (``ValueError``).
        kron_strength: kappa of the Kronecker protection. Default 10.
        kron_sides: sides the Kronecker protection covers on FOGO matrices, in the layer's
            terms: ``"smaller"`` (default: the smaller side whole, the input side when square:
            in a transformer block, the residual stream), ``"mixed"`` (the smaller side whole,
            the other as a diagonal of per-unit energies), ``"both"``, ``"input"`` or
            ``"output"``. AdamW parameters keep their features whole and their token rows as a
            diagonal (whole with ``"both"``).
        kron_share: ``"none"`` (default: every matrix keeps its own factors) or ``"model"``:
            every whole protected side of the same dimension d (and device, ``kron_strength``,
            ``kron_detect``), across param groups, shares one factor pair, whose Gram is the
            plain sum of the sides' Grams, sum_i sum_k G_ik^T G_ik (G_ik G_ik^T for a side that
            is the stored rows): in a transformer the residual stream, the smaller side of
            every block matrix and the feature side of the embedding / head, 2 d^2 float32 in
            all (0.95% of GPT-2 small's parameter bytes). Not with ``kron_online``.
        kron_detect: g > 1: detect task boundaries without ``end_task`` (shared factors
            only): a step whose gradient energy (fast average) exceeds g times its slow
            average, once the running Gram holds 50 steps or more, folds the Grams gathered
            before that step (at its start: the step itself is damped by the fold) and starts
            the next task's Gram with it; on the device, no host read
            (:func:`orthoptim.memory.kronecker.detect_step`; one d x d solve per step and
            shared factor). Only the shared factors fold at a detected boundary: a side
            that is not shared (an embedding's token rows) folds at ``end_task`` only.
            0 (default): none.
        kron_online: gamma in [0, 1). With gamma > 0 the Kronecker protection also
            consolidates every ``write_interval`` steps, precision <- I + gamma P +
            (1 - gamma) kappa A_window (task-agnostic; it also damps the current task's own
            directions). Default 0 (``end_task`` only).
        write_source: what a write summarises: ``"gradients"`` (default), a streaming Gaussian
            sketch Y = sum_t G_t^T G_t Omega of the gradients since the last write, read out by
            the Nystrom method; or ``"slow"``, the slow momentum at write time (its last ~1/(1 -
            beta_slow) steps). The sketch (side x (write_rank + 4) floats) counts in the budget.
        sketch_dim: sketch size k of the sign gate. Default 32.
        seed: base seed of every random projection (per parameter: seed and its index).
            Independent of the global RNG. Default 0.
        nonfinite: what a step does when a gradient holds NaN/inf: ``"skip"`` (default: drop
            the whole step, parameters and state untouched, counted in ``skipped_steps``),
            ``"raise"`` or ``"proceed"``. See :mod:`orthoptim.optim._nonfinite` and
            docs/reliability.md.
        shard: with a process group of W >= 2 ranks (data parallel: every rank holds the whole
            parameters and the same averaged gradients, e.g. under DDP), spread the matrices
            over the ranks (ZeRO-1): each same-shape bucket is cut into W chunks, the owner of a
            chunk keeps its momentum streams and memory, orthogonalizes, corrects and writes
            them, and the updates are all-gathered; the skip decision is all-reduced. ``False``:
            every rank steps every matrix (replicated; bit for bit the same results). With
            FSDP2 (``fully_shard``: ``DTensor`` parameters, ``Shard(0)`` on a 1-D mesh) sharding
            is required: each matrix's gradient is assembled at its owner and the update's rows
            sent back (``all_to_all``). No effect without a group or with W = 1 (exactly the
            single-process optimizer). See docs/distributed.md. Default True.
        process_group: the data-parallel ranks (default: the default group; FSDP2: the
            parameters' mesh).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        weight_decay: float = 0.0,
        beta_slow: float = 0.95,
        beta_fast: float = 0.8,
        mix: float = 0.5,
        dual_stream: bool = True,
        fusion: str = "slerp",
        nesterov: bool = False,
        target_rms: float = 0.2,
        scale: str = "rms",
        ns_steps: int = 5,
        ns_coefficients: str | tuple[float, float, float] = "muon",
        ns_dtype: str = "auto",
        eps: float = 1e-7,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        momentum: float | None = None,
        memory: bool = True,
        memory_budget: float = 0.05,
        memory_dtype: str = "bfloat16",
        capacity: int = 8,
        write_rank: int | None = None,
        write_interval: int = 50,
        min_age: int | None = None,
        gate: str = "overlap",
        gate_threshold: float = 0.0,
        radius: float = 1.0,
        merge_threshold: float = 0.5,
        stretch_threshold: float = 0.85,
        min_energy: float = 1e-3,
        eviction: str = "oldest",
        overflow: str = "evict",
        side: str = "input",
        layout: str = "out_in",
        protection: str = "subspace",
        kron_strength: float = 10.0,
        kron_sides: str = "smaller",
        kron_online: float = 0.0,
        kron_share: str = "none",
        kron_detect: float = 0.0,
        write_source: str = "gradients",
        sketch_dim: int = 32,
        seed: int = 0,
        nonfinite: str = "skip",
        shard: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, algorithm=None, beta_slow=beta_slow,
            beta_fast=beta_fast, mix=mix, dual_stream=dual_stream, fusion=fusion,
            nesterov=nesterov, target_rms=target_rms, scale=scale, ns_steps=ns_steps,
            ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, eps=eps,
            adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, momentum=momentum, memory=memory,
            memory_budget=memory_budget, memory_dtype=memory_dtype, capacity=capacity,
            write_rank=write_rank, write_interval=write_interval,
            min_age=min_age, gate=gate, gate_threshold=gate_threshold, radius=radius,
            merge_threshold=merge_threshold, stretch_threshold=stretch_threshold,
            min_energy=min_energy, eviction=eviction,
            overflow=overflow,
            side=side, layout=layout, protection=protection, kron_strength=kron_strength,
            kron_sides=kron_sides, kron_online=kron_online, kron_share=kron_share,
            kron_detect=kron_detect, write_source=write_source,
            sketch_dim=sketch_dim, seed=seed,
        )  # fmt: skip
        _fogo_state.validate(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_group_keys(group, defaults)
            _fogo_state.validate(group)
        _nonfinite.install(self, nonfinite)
        self._warned_momentum = False
        check_choice("shard", shard, (True, False))
        self._sharding = _fogo_shard.sharding_for(self.param_groups, shard, process_group)
        if self._sharding is not None:
            for group in self.param_groups:
                if group["memory"] and group["protection"] == "kronecker":
                    raise ValueError(
                        "Invalid protection: 'kronecker' with data-parallel sharding (a process "
                        f"group of {self._sharding.world} ranks or FSDP2) is not supported yet; "
                        "use protection='subspace' or one process"
                    )
        self._plans: list[list[megabatch.Chunks | None]] = []
        self._load: list[float] = [0.0] * (self._sharding.world if self._sharding else 1)
        self._reset_caches()
        self._populate_state()

    # ------------------------------------------------------------------------- groups, state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; unknown keys and invalid values raise ``ValueError`` (as in __init__).
        Its parameters' state is created at once (see :meth:`_populate_state`)."""
        check_group_keys(param_group, self.defaults)
        meta = ("params", "param_names")
        _fogo_state.validate(
            {**self.defaults, **{k: v for k, v in param_group.items() if k not in meta}}
        )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["ns_dtype"] == "auto":
            group["ns_dtype"] = _fogo_state.ns_dtype_for(group["params"])
        if hasattr(self, "_layouts"):  # not inside Optimizer.__init__
            self._reset_caches()
            self._populate_state()

    def _populate_state(self) -> None:
        """Create the state of every parameter that has none, when the optimizer is built (as
        torch.distributed.checkpoint needs: the same keys whatever had a gradient, and no
        zero-gradient step to make them); seeds by the parameter's global index. Sharded, a
        rank holds the state of its own matrices only (and of every AdamW parameter), and an
        empty entry for the others'."""
        index = 0
        owners = _fogo_state.shared_owners(self.param_groups)
        for gi, group in enumerate(self.param_groups):
            owned = self._owned(gi)
            for p in group["params"]:
                matrix = _fogo_state.algorithm(group, p) == "fogo" and p.numel() > 0
                if not self.state.get(p):
                    # Another rank's matrix: an empty entry, so that every rank lists every
                    # parameter (DCP's set_optimizer_state_dict expects them all).
                    mine = id(p) in owned or not matrix
                    shared = _fogo_state.owned_sides(owners, p)
                    self.state[p] = (
                        _fogo_state.new_state(group, p, index, p.device, shared) if mine else {}
                    )
                index += 1

    def _plan(self, gi: int) -> list[megabatch.Chunks | None]:
        """Group ``gi``'s ownership, per bucket (None: not sharded). Planned once per group, in
        order, the balance continuing from the groups before (``self._load``)."""
        while len(self._plans) <= gi:
            group = self.param_groups[len(self._plans)]
            buckets = _fogo_state.buckets_of(group)
            if self._sharding is None:
                self._plans.append([None] * len(buckets))
                continue
            streams = 2 if group["dual_stream"] else 1
            costs = [
                (len(b), _fogo_shard.matrix_cost(_fogo_state.matrix_shape(b[0]), streams))
                for b in buckets
            ]
            self._plans.append(
                list(megabatch.assign_chunks(costs, self._sharding.world, self._load))
            )
        return self._plans[gi]

    def _owned(self, gi: int) -> set[int]:
        """ids of group ``gi``'s matrices whose state this rank holds (all when not sharded)."""
        out: set[int] = set()
        for params, chunks in zip(
            _fogo_state.buckets_of(self.param_groups[gi]), self._plan(gi), strict=True
        ):
            own = _fogo_shard.owned(chunks, self._sharding, len(params))
            out.update(id(params[i]) for i in own)
        return out

    def _reset_caches(self) -> None:
        """Forget what is derived from the state (buckets, projections, step hints)."""
        self._layouts: list[_Layout] | None = None
        self._step_hint: dict[int, int] = {}  # host upper bound of each matrix's step counter
        # kron_share: each parameter's shared factors by side (views of the owners' state)
        self._factors: dict[int, dict[str, SharedFactor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults/state/param_groups, losing the policy, counter and caches
        # (deepcopy / pickle then fail); keep every attribute, drop the derived caches.
        return {**self.__dict__, "_layouts": None, "_step_hint": {}, "_factors": {}}

    def __deepcopy__(self, memo: dict[int, Any]) -> FOGO:
        # A process group cannot be copied: a copy shares it (and the ownership plan).
        memo[id(self._sharding)] = self._sharding
        out = type(self).__new__(type(self))
        memo[id(self)] = out
        out.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return out

    def _check_momentum(self, group: dict[str, Any]) -> None:
        """A scheduler may have written ``momentum`` since the last step: check it (host only)."""
        momentum = group.get("momentum")
        if momentum is None:
            return
        check_range("momentum", momentum, 0.0, 1.0, high_open=True)
        if group["dual_stream"] and momentum <= group["beta_fast"] and not self._warned_momentum:
            self._warned_momentum = True
            warnings.warn(
                f"FOGO: momentum {momentum} (the slow stream's beta, e.g. from OneCycleLR) is not "
                f"above beta_fast {group['beta_fast']}: the slow stream now decays at least as "
                "fast as the fast one (the update still fuses both averages; nothing is clamped)",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional).

        A step whose gradients are not finite is computed but not applied (every write is
        masked on the device, see :mod:`orthoptim.optim._nonfinite`); it reads nothing on the
        host except on memory writes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_ = self._sharding.group if self._sharding is not None else None
        guard = _nonfinite.begin_step(self, group_)  # also rejects sparse grads, complex params
        layouts = self._prepare()
        for factor in self._shared_factors():  # kron_detect: boundary test and fold (device)
            factor.begin_step(guard.skip(factor.acc.device))
        self._adamw(layouts, guard)
        stepped: list[tuple[_Bucket, list[int]]] = []
        for group, layout in zip(self.param_groups, layouts, strict=True):
            empty = [self.state[p]["step"] for p in layout.empty if p.grad is not None]
            if empty:
                _fogo_math.count_steps_(empty, guard.skip(empty[0].device))
            for bucket in layout.buckets:
                take = [i for i, p in enumerate(bucket.owned) if p.grad is not None]
                if bucket.chunks is None:
                    if take:
                        self._bucket_step(group, bucket, take, guard)
                elif cast(_fogo_shard.Sharding, self._sharding).replicated:
                    for j in range(bucket.chunks.world):  # chunk by chunk, as sharded
                        own = bucket.chunks.owned(bucket.chunks.owner[j])
                        part = [i for i in take if i in own]
                        if part:
                            self._bucket_step(group, bucket, part, guard)
                else:
                    self._sharded_bucket_step(group, bucket, take, guard)
                if take:
                    stepped.append((bucket, take))
        self._scheduled_writes(stepped, guard)
        return loss

    def _shared_factors(self) -> list[SharedFactor]:
        """Every shared Kronecker factor once (``kron_share``; empty without)."""
        unique = {id(f): f for sides in self._factors.values() for f in sides.values()}
        return list(unique.values())

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _prepare(self) -> list[_Layout]:
        """Host checks of the step (a scheduler's ``momentum``) and every group's layout (built
        once). Eager under ``torch.compile``: the projections come from seeded CPU generators."""
        for group in self.param_groups:
            self._check_momentum(group)
        if self._layouts is None:
            self._factors = self._build_factors()
            self._layouts = [
                _Layout(group, self.state, self._plan(gi), self._sharding, self._factors)
                for gi, group in enumerate(self.param_groups)
            ]
        return self._layouts

    def _build_factors(self) -> dict[int, dict[str, SharedFactor]]:
        """The shared factors (``kron_share="model"``), as views of their owners' state."""
        owners = _fogo_state.shared_owners(self.param_groups)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        params = {id(p): p for g in self.param_groups for p in g["params"]}
        made: dict[tuple[int, str], SharedFactor] = {}
        out: dict[int, dict[str, SharedFactor]] = {}
        for key, sides in owners.items():
            for side, (owner, owner_side) in sides.items():
                factor = made.get((id(owner), owner_side))
                if factor is None:
                    g = group_of[id(owner)]
                    factor = made[(id(owner), owner_side)] = SharedFactor(
                        self.state[owner]["kron"], owner_side, g["kron_strength"],
                        g["kron_detect"],
                    )  # fmt: skip
                if all(m is not params[key] for m in factor.members):  # both sides share: once
                    factor.members.append(params[key])
                out.setdefault(key, {})[side] = factor
        return out

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _adamw(self, layouts: list[_Layout], guard: _nonfinite.StepGuard) -> None:
        """AdamW on every group's non-FOGO parameters: torch's fused kernel, which dynamo does
        not trace either (eager under ``torch.compile``)."""
        for group, layout in zip(self.param_groups, layouts, strict=True):
            params = [p for p in layout.adamw if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            protected = [
                (p, st, p.detach().clone())
                for p, st in zip(params, states, strict=True)
                if "kron" in st
            ]
            loc = _fogo_shard.local  # FSDP2: this rank's shards (AdamW is element-wise)
            _fused.adamw_(
                [loc(p) for p in params], [loc(cast(torch.Tensor, p.grad)) for p in params],
                [loc(s["exp_avg"]) for s in states], [loc(s["exp_avg_sq"]) for s in states],
                [s["step"] for s in states], lr=group["lr"],
                betas=_fogo_state.adamw_betas(group), eps=group["adamw_eps"],
                weight_decay=group["weight_decay"], found_inf=guard.found_inf,
            )  # fmt: skip
            for p, state, before in protected:
                self._protect_adamw(group, p, state, before, guard)

    def _protect_adamw(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        state: dict[str, Any],
        before: torch.Tensor,
        guard: _nonfinite.StepGuard,
    ) -> None:
        """The Kronecker protection of a 2-D AdamW parameter (embedding, head): its Grams take
        this step's gradient and its AdamW step is damped, W <- W_0 + (I + kappa P_out)^-1
        (W - W_0) (I + kappa P_in)^-1, with an online consolidation when one is due."""
        shared = self._factors.get(id(p), {})
        kron = own_view(state["kron"], list(shared))
        grad = cast(torch.Tensor, p.grad)
        for name, new in kronecker.grams(kron, grad).items():
            guard.commit_(kron[name], new)
        pres = {k: v for k, v in kron.items() if k.endswith("_pre")}
        for side, factor in shared.items():
            factor.add(kronecker.gram_sum(grad.unsqueeze(0), side), guard.skip(p.device))
            pres[f"{side}_pre"] = factor.pre
        p.copy_(before + kronecker.apply(pres, p - before))
        gamma, interval = group["kron_online"], group["write_interval"]
        if gamma > 0 and interval and self._write_due(p, state, interval, guard) is not None:
            kronecker.consolidate(kron, (1 - gamma) * group["kron_strength"], gamma)

    def _bucket_step(
        self, group: dict[str, Any], bucket: _Bucket, take: list[int], guard: _nonfinite.StepGuard
    ) -> None:
        """One step of the matrices ``take`` of a bucket (one process, or replicated)."""
        params = [bucket.owned[i] for i in take]
        skip = guard.skip(params[0].device)
        update, alpha = self._updates(group, bucket, take, skip)
        _fogo_math.apply_(params, update, group["lr"], group["weight_decay"], alpha, skip,
                          zeroed=True)  # fmt: skip

    def _sharded_bucket_step(
        self, group: dict[str, Any], bucket: _Bucket, take: list[int], guard: _nonfinite.StepGuard
    ) -> None:
        """One sharded step of a bucket: this rank computes its chunk's updates (``take``: the
        positions in it that have a gradient), every rank receives and applies all of them."""
        sharding = cast(_fogo_shard.Sharding, self._sharding)
        first = _fogo_shard.local(bucket.params[0])
        skip = guard.skip(first.device)
        exchange = _fogo_shard.Exchange(cast(megabatch.Chunks, bucket.chunks), sharding,
                                        bucket.shape, first.dtype, first.device)  # fmt: skip
        grads = None
        if sharding.fsdp:  # the owned matrices' whole gradients, from every rank's rows
            grads = exchange.owner_grads(bucket.params)
            grads = rows(grads, take)
        update = first.new_zeros(0, *bucket.shape)
        if take:
            update, _ = self._updates(group, bucket, take, skip, grads)
        alpha = _fogo_math.coefficient(group["scale"], group["target_rms"], group["lr"],
                                       bucket.shape)  # fmt: skip
        send = exchange.scatter if sharding.fsdp else exchange.gather
        updates, stepped = send(update, take)
        params = [_fogo_shard.local(p) for p in bucket.params]
        _fogo_math.apply_(params, updates, group["lr"], group["weight_decay"], alpha, skip,
                          stepped)  # fmt: skip

    def _updates(
        self,
        group: dict[str, Any],
        bucket: _Bucket,
        take: list[int],
        skip: torch.Tensor | None,
        grads: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """The scaled updates (N', m, n) of this rank's matrices ``take`` and their coefficient:
        momentum, one batched Newton-Schulz for all matrices and streams, fusion, memory, scale
        (zero on a dropped step).
        ``grads``: their stacked gradients (default: the parameters' own)."""
        states = [bucket.states[i] for i in take]
        if grads is None:
            rows = [_fogo_state.as_matrix(cast(torch.Tensor, bucket.owned[i].grad)) for i in take]
        else:
            rows = list(grads.unbind(0))
        rows = _fogo_math.finite_grads(rows, skip)
        names = ("momentum_slow", "momentum_fast") if group["dual_stream"] else ("momentum_slow",)
        betas = (_fogo_state.slow_beta(group), group["beta_fast"])[: len(names)]
        directions = _fogo_math.momentum_(
            rows, [[st[n] for st in states] for n in names], betas, group["nesterov"], skip
        )
        ortho = _fogo_math.orthogonalize(
            directions, len(names), group["ns_steps"], group["ns_coefficients"],
            group["ns_dtype"], group["eps"],
        )  # fmt: skip
        update = _fogo_math.fuse(ortho, group["fusion"], group["mix"], group["eps"])
        counters = [st["step"] for st in states]
        _fogo_math.count_steps_(counters, skip)
        if bucket.memory is not None:
            bucket.memory.accumulate(torch.stack(rows), take, skip)
            update = bucket.memory.correct(update, torch.stack(counters), take, skip)
        return _fogo_math.scaled(update, group["scale"], group["target_rms"], group["eps"],
                                 group["lr"], skip)  # fmt: skip

    # ------------------------------------------------------------------------- memory writes
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _scheduled_writes(
        self, stepped: list[tuple[_Bucket, list[int]]], guard: _nonfinite.StepGuard
    ) -> None:
        """Scheduled writes due after this step (host logic; a write syncs). Eager under
        ``torch.compile``: the host's step bounds change every step."""
        for bucket, take in stepped:
            if bucket.memory is None or not bucket.memory.config.write_interval:
                continue
            interval = bucket.memory.config.write_interval
            for i in take:
                step = self._write_due(bucket.owned[i], bucket.states[i], interval, guard)
                if step is not None:
                    slow = bucket.states[i]["momentum_slow"]
                    bucket.memory.write(i, slow, step, codebook.SCHEDULED)

    def _write_due(
        self, p: torch.Tensor, state: dict[str, Any], interval: int, guard: _nonfinite.StepGuard
    ) -> int | None:
        """The step at which ``p``'s memory writes now, or None; reads the device only when
        the host's upper bound of the step counter reaches a multiple of ``interval``.

        The bound counts every step the parameter took part in; a step dropped on the device
        is not counted there, so at a candidate the true counter is read (a write syncs anyway)
        and the bound corrected: writes happen exactly at the counter's multiples, as if the
        dropped steps had never been taken.
        """
        key = id(p)
        hint = self._step_hint.get(key)
        if hint is None:  # first step after construction, a load or a copy: one read
            hint = int(state["step"].item()) - 1
        hint += 1
        self._step_hint[key] = hint
        if hint % interval:
            return None
        step = int(state["step"].item())
        self._step_hint[key] = step
        if step % interval or guard.skipped():
            return None
        return step

    # ---------------------------------------------------------------------------- loading
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; codebook tensors keep their own dtypes (bool/int64 metadata, the memory
        dtype of the bases) instead of torch's default cast to the parameter's dtype, and step
        counters go to their parameter's device. A state that does not fit a parameter raises
        ``ValueError`` before anything is changed. The state keys may be torch's integer ids or
        anything else that ``param_groups[i]["params"]`` lists (the parameter names of
        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``). Sharded, a rank keeps
        the state of its own matrices (a whole checkpoint loads on any number of ranks)."""
        _fogo_state.check_loadable(self.param_groups, state_dict)
        saved_ids = [key for g in state_dict.get("param_groups", []) for key in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_key = dict(zip(saved_ids, params, strict=False))  # torch checks the lengths
        kept = _fogo_state.own_dtype_values(state_dict)
        super().load_state_dict(state_dict)
        for key, p in by_key.items():
            if self.state.get(p):
                _fogo_state.restore_loaded(self.state[p], p, kept.get(key, {}))
        for gi, group in enumerate(self.param_groups):  # sharded: other ranks' matrices go
            owned = self._owned(gi)
            for bucket in _fogo_state.buckets_of(group):
                for p in bucket:
                    if id(p) not in owned:
                        self.state[p] = {}
        self._reset_caches()
        self._populate_state()  # parameters the state dict has no state for

    # --------------------------------------------------------------------- public memory API
    @torch.no_grad()
    def end_task(self) -> None:
        """Consolidate at a task boundary: store the slow momentum's directions as a protected
        entry and make every stored entry protect from now on (``protection="kronecker"``: fold
        the task's gradient Grams into the preconditioners). Optional; nothing requires it.
        Matrices that have not taken a step yet have nothing to consolidate."""
        layouts = self._prepare()
        for factor in self._shared_factors():
            factor.consolidate()
        for group, layout in zip(self.param_groups, layouts, strict=True):
            for p in layout.adamw:
                kron = self.state[p].get("kron")
                if kron is not None:
                    own = own_view(kron, list(self._factors.get(id(p), {})))
                    kronecker.consolidate(own, group["kron_strength"])
            for bucket in layout.buckets:
                if bucket.memory is None:
                    continue
                for i, state in enumerate(bucket.states):
                    step = int(state["step"].item())
                    if step == 0:
                        continue
                    bucket.memory.consolidate(i, state["momentum_slow"], step)

    def memory_stats(self) -> dict[str, float]:
        """Interference diagnostics of the last step, aggregated over protected matrices.

        Returns a dict with: ``matrices`` (with memory), ``conflict_rate`` (entries in conflict /
        ready entries), ``correction_ratio`` (mean ||U* - O||_F / ||O||_F), ``entries_used``,
        ``columns_used``, ``columns_capacity``, ``occupancy`` (columns used / capacity),
        ``memory_bytes`` (codebook tensors; with ``protection="kronecker"`` the Grams and
        preconditioners, AdamW-routed embeddings and heads included, a shared factor once, in
        its owner's state), ``param_bytes`` (of the protected parameters),
        ``memory_fraction`` and ``writes``. Reading it syncs with the device; ``step`` never does.
        Sharded, it sums over the ranks (a collective: call it on every rank).
        """
        out: dict[str, float] = defaultdict(float)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "kron" in state:  # protection="kronecker": Grams, preconditioners
                    out["matrices"] += 1
                    out["memory_bytes"] += sum(
                        t.numel() * t.element_size() for t in state["kron"].values()
                    )
                    out["param_bytes"] += p.numel() * p.element_size()
                    continue
                if not state or "memory" not in state:
                    continue
                book = state["memory"]
                out["matrices"] += 1
                out["entries_used"] += int(book["used"].sum())
                out["columns_used"] += int((book["owner"] >= 0).sum())
                out["columns_capacity"] += book["owner"].numel()
                out["memory_bytes"] += codebook.memory_bytes(book)
                for name in ("grad_sketch", "row_energy", "last_profile"):
                    if name in state:
                        extra = state[name]
                        out["memory_bytes"] += extra.numel() * extra.element_size()
                out["param_bytes"] += p.numel() * p.element_size()
                out["writes"] += state["writes"]
                stats = state["last_stats"]
                out["ready"] += int(stats["ready"])
                out["conflicts"] += int(stats["conflicts"])
                if int(state["step"]) > 0:
                    out["ratio_sum"] += float(stats["correction_ratio"])
                    out["ratio_count"] += 1
        sharding = self._sharding
        if sharding is not None and not sharding.replicated:
            keys = ("matrices", "entries_used", "columns_used", "columns_capacity",
                    "memory_bytes", "param_bytes", "writes", "ready", "conflicts", "ratio_sum",
                    "ratio_count")  # fmt: skip
            device = _fogo_shard.local(self.param_groups[0]["params"][0]).device
            sums = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(sums, group=sharding.group)
            out.update(zip(keys, sums.tolist(), strict=True))
        ratio_sum, ratio_count = out.pop("ratio_sum", 0.0), out.pop("ratio_count", 0.0)
        out["conflict_rate"] = out["conflicts"] / out["ready"] if out["ready"] else 0.0
        out["correction_ratio"] = ratio_sum / ratio_count if ratio_count else 0.0
        out["occupancy"] = (
            out["columns_used"] / out["columns_capacity"] if out["columns_capacity"] else 0.0
        )
        out["memory_fraction"] = (
            out["memory_bytes"] / out["param_bytes"] if out["param_bytes"] else 0.0
        )
        return dict(out)


class _Layout:
    """How one param group's parameters are stepped: AdamW tensors, zero-size matrices (they
    only count steps) and the FOGO matrices by (shape, dtype, device), in order."""

    def __init__(
        self,
        group: dict[str, Any],
        state: dict[torch.Tensor, Any],
        plan: list[megabatch.Chunks | None],
        sharding: _fogo_shard.Sharding | None,
        factors: dict[int, dict[str, SharedFactor]],
    ) -> None:
        self.adamw = [p for p in group["params"] if _fogo_state.algorithm(group, p) == "adamw"]
        self.empty = [
            p for p in group["params"]
            if _fogo_state.algorithm(group, p) == "fogo" and p.numel() == 0
        ]  # fmt: skip
        self.buckets = [
            _Bucket(group, params, chunks, state, sharding, factors)
            for params, chunks in zip(_fogo_state.buckets_of(group), plan, strict=True)
        ]


class _Bucket:
    """The FOGO matrices of one param group with the same (shape, dtype, device).

    Attributes:
        params: all of them, in order.
        shape: their matrix shape (m, n).
        chunks: their ownership over the ranks (None: this rank steps them all).
        owned: those whose state this rank holds and whose updates it computes.
        states: the state dicts of ``owned``.
        memory: the memory of ``owned`` (None without).
    """

    def __init__(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        chunks: megabatch.Chunks | None,
        state: dict[torch.Tensor, Any],
        sharding: _fogo_shard.Sharding | None,
        factors: dict[int, dict[str, SharedFactor]],
    ) -> None:
        self.params = params
        self.shape = _fogo_state.matrix_shape(params[0])
        self.chunks = chunks
        self.owned = [params[i] for i in _fogo_shard.owned(chunks, sharding, len(params))]
        self.states = [state[p] for p in self.owned]
        self.memory: MemoryBucket | KroneckerBucket | None = None
        if group["memory"] and self.owned:
            config = _fogo_state.memory_config(group, self.shape)
            dtype = _fogo_state.stats_dtype(params[0])
            device = _fogo_shard.local(params[0]).device
            # Same group and shape: every matrix of the bucket shares the same factors.
            shared = factors.get(id(self.owned[0]), {})
            self.memory = memory_for(config, self.states, device, dtype, shared)
