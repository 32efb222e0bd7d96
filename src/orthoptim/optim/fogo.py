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
(The EMA form of the momentum differs from the paper's sum form M = beta M + G only by a scale
that Newton-Schulz removes.) Every other parameter (ndim < 2, or a group with
``algorithm="adamw"``) is updated by AdamW with the group's lr and weight decay.

The design of the memory is orthoptim's (the paper's text and code are not public): see
docs/fogo.md for what is from the paper, what is ours, and the ablations behind the defaults.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import cast

import torch
from torch.optim import Optimizer

from orthoptim.memory import codebook
from orthoptim.ops.geometry import nlerp, rms_scale, slerp
from orthoptim.ops.newton_schulz import (
    dtype_for_device,
    newton_schulz,
    resolve_coefficients,
    resolve_dtype,
)
from orthoptim.ops.sketch import gaussian_sketch_matrix, nystrom_factor
from orthoptim.ops.subspace import rho_from_radius
from orthoptim.optim import _fused, _nonfinite
from orthoptim.optim._validation import (
    check_betas,
    check_choice,
    check_group_keys,
    check_int,
    check_range,
)

_ALGORITHMS = ("fogo", "adamw")
# State that keeps its own dtype on load (torch casts floating state to the parameter's dtype).
# A new stretch raises the window's gradient energy by at least this factor (measured at class
# shifts on split Fashion-MNIST: 1.3 to 95; converging least squares oscillates by up to 1.2).
_SHIFT_GROWTH = 1.5
_OWN_DTYPE_STATE = ("memory", "last_stats", "grad_sketch", "row_energy", "last_profile")


def _tensor_shapes(state: dict, prefix: str = "") -> dict[str, tuple]:
    """``{"name" or "memory.name": shape}`` of every tensor in a (nested) state dict."""
    out = {}
    for name, value in state.items():
        if isinstance(value, dict):
            out.update(_tensor_shapes(value, f"{prefix}{name}."))
        elif isinstance(value, torch.Tensor):
            out[prefix + name] = tuple(value.shape)
    return out


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
        side: protected side, ``"input"`` (row space, default) or ``"output"`` (column space).
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
    """

    def __init__(
        self,
        params,
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
        ns_coefficients="muon",
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
        write_source: str = "gradients",
        sketch_dim: int = 32,
        seed: int = 0,
        nonfinite: str = "skip",
    ):
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
            side=side, write_source=write_source, sketch_dim=sketch_dim, seed=seed,
        )  # fmt: skip
        self._validate(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_group_keys(group, defaults)
            self._validate(group)
        _nonfinite.install(self, nonfinite)
        self._sketch_cache: dict[int, torch.Tensor] = {}
        self._omega_cache: dict[int, torch.Tensor] = {}
        self._step_hint: dict[int, int] = {}  # host upper bound of each matrix's step counter
        self._warned_momentum = False

    # ----------------------------------------------------------------------------- validation
    @staticmethod
    def _validate(g: dict) -> None:
        check_range("lr", g["lr"], 0.0)
        check_range("weight_decay", g["weight_decay"], 0.0)
        check_range("beta_slow", g["beta_slow"], 0.0, 1.0, high_open=True)
        check_range("beta_fast", g["beta_fast"], 0.0, 1.0, high_open=True)
        if g["dual_stream"] and not g["beta_fast"] < g["beta_slow"]:
            raise ValueError(
                f"Invalid beta_fast: {g['beta_fast']}; must be < beta_slow ({g['beta_slow']})"
            )
        check_range("mix", g["mix"], 0.0, 1.0)
        check_choice("dual_stream", g["dual_stream"], (True, False))
        check_choice("fusion", g["fusion"], ("slerp", "lerp"))
        check_choice("nesterov", g["nesterov"], (True, False))
        check_range("target_rms", g["target_rms"], 0.0, low_open=True)
        check_choice("scale", g["scale"], ("rms", "muon"))
        check_int("ns_steps", g["ns_steps"], 0, 99)
        resolve_coefficients(g["ns_coefficients"])
        if g["ns_dtype"] != "auto":
            resolve_dtype(g["ns_dtype"])
        check_range("eps", g["eps"], 0.0, low_open=True)
        check_betas("adamw_betas", g["adamw_betas"])
        check_range("adamw_eps", g["adamw_eps"], 0.0, low_open=True)
        if g.get("momentum") is not None:
            check_range("momentum", g["momentum"], 0.0, 1.0, high_open=True)
        check_choice("memory", g["memory"], (True, False))
        check_range("memory_budget", g["memory_budget"], 0.0, 1.0, low_open=True)
        check_choice("memory_dtype", g["memory_dtype"], ("bfloat16", "float32", "float64"))
        check_int("capacity", g["capacity"], 1)
        if g["write_rank"] is not None:
            check_int("write_rank", g["write_rank"], 1)
        check_int("write_interval", g["write_interval"], 0)
        if g["min_age"] is not None:
            check_int("min_age", g["min_age"], 0)
        check_choice("gate", g["gate"], ("overlap", "sign"))
        check_range("gate_threshold", g["gate_threshold"], 0.0, 1.0)
        check_range("radius", g["radius"], 0.0, 1.0, low_open=True)
        check_range("merge_threshold", g["merge_threshold"], 0.0, 1.0)
        check_range("stretch_threshold", g["stretch_threshold"], 0.0, 1.0)
        check_range("min_energy", g["min_energy"], 0.0, 1.0)
        check_choice("eviction", g["eviction"], ("oldest", "least_used"))
        check_choice("overflow", g["overflow"], ("compress", "evict"))
        check_choice("side", g["side"], ("input", "output"))
        check_choice("write_source", g["write_source"], ("gradients", "slow"))
        check_int("sketch_dim", g["sketch_dim"], 1)
        check_int("seed", g["seed"], 0)
        if g.get("algorithm") is not None:
            check_choice("algorithm", g["algorithm"], _ALGORITHMS)

    def __getstate__(self) -> dict:
        # torch keeps only defaults/state/param_groups, losing the policy, counter and caches
        # (deepcopy / pickle then fail); keep every attribute, drop the id-keyed caches.
        return {**self.__dict__, "_sketch_cache": {}, "_omega_cache": {}, "_step_hint": {}}

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; unknown keys and invalid values raise ``ValueError`` (as in __init__)."""
        check_group_keys(param_group, self.defaults)
        meta = ("params", "param_names")
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k not in meta}})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["ns_dtype"] == "auto":
            group["ns_dtype"] = self._ns_dtype_for(group["params"])

    @staticmethod
    def _ns_dtype_for(params: list[torch.Tensor]) -> str:
        """``ns_dtype="auto"``: the dtype of the parameters' device type (one per group)."""
        names = {dtype_for_device(p.device) for p in params} or {"float32"}
        if len(names) > 1:
            devices = sorted({p.device.type for p in params})
            raise ValueError(
                f"Invalid ns_dtype: 'auto' for a param group on devices {devices}, which use "
                f"{sorted(names)}; set ns_dtype explicitly"
            )
        return names.pop()

    # ---------------------------------------------------------------------------- helpers
    @staticmethod
    def _algorithm(group: dict, p: torch.Tensor) -> str:
        if group["algorithm"] is not None:
            if group["algorithm"] == "fogo" and p.ndim < 2:
                raise ValueError(
                    f"algorithm='fogo' needs parameters with ndim >= 2, got shape {tuple(p.shape)}"
                )
            return group["algorithm"]
        return "fogo" if p.ndim >= 2 else "adamw"

    @staticmethod
    def _as_matrix(t: torch.Tensor) -> torch.Tensor:
        """View a >= 2-D tensor as (out, in * rest): conv kernels become out x in*kh*kw."""
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # not -1: zero-size tensors

    @staticmethod
    def _slow_beta(group: dict) -> float:
        momentum = group.get("momentum")  # groups loaded from older checkpoints lack the key
        return group["beta_slow"] if momentum is None else momentum

    @staticmethod
    def _adamw_betas(group: dict) -> tuple[float, float]:
        momentum = group.get("momentum")
        return group["adamw_betas"] if momentum is None else (momentum, group["adamw_betas"][1])

    def _check_momentum(self, group: dict) -> None:
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

    def _param_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    @staticmethod
    def _codebook_config(group: dict, p: torch.Tensor) -> codebook.CodebookConfig:
        m, n = FOGO._as_matrix(p).shape
        if group["side"] == "output":
            m, n = n, m
        mem_dtype = resolve_dtype(group["memory_dtype"])
        elem = torch.empty((), dtype=mem_dtype).element_size()
        # Relative to the float32 size of the weight, so the memory (and a checkpoint of it) does
        # not change with the parameter dtype.
        budget = group["memory_budget"] * m * n * 4  # bytes
        if group["stretch_threshold"] > 0:
            budget -= 8 * m  # output-energy profiles of this window and the previous one
        if group["write_source"] == "gradients":
            # Pool R (elem bytes per entry) plus a float32 sketch of width R // 2 + 4 per column.
            rank = int((budget / n - 16) // (elem + 2))
        else:
            rank = int(budget // (n * elem))
        rank = max(1, min(rank, n))
        write_rank = group["write_rank"] or max(1, rank // 2)
        return codebook.CodebookConfig(
            rank=rank, capacity=group["capacity"], write_rank=min(write_rank, rank),
            min_energy=group["min_energy"], merge_threshold=group["merge_threshold"],
            gate=group["gate"], gate_threshold=group["gate_threshold"],
            rho=rho_from_radius(group["radius"]), eviction=group["eviction"],
            overflow=group["overflow"],
            sketch_dim=group["sketch_dim"], dtype=mem_dtype,
        )  # fmt: skip

    def _init_state(self, group: dict, p: torch.Tensor, index: int) -> None:
        self.state[p].update(self._new_state(group, p, index, p.device))
        self._step_hint[id(p)] = 0

    def _new_state(self, group: dict, p: torch.Tensor, index: int, device) -> dict:
        """The fresh state of ``p`` under ``group``'s settings, on ``device`` ("meta": shapes
        only, what ``load_state_dict`` checks a saved state against).

        ``step`` is a float32 0-d tensor on the parameter's device (as in torch's fused AdamW):
        a step dropped for non-finite gradients is not counted, without a host sync."""
        state = {"step": torch.zeros((), dtype=torch.float32, device=device)}
        if self._algorithm(group, p) == "adamw":
            state["exp_avg"] = torch.zeros_like(
                p, memory_format=torch.preserve_format, device=device
            )
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            return state
        mat = self._as_matrix(p)
        state["momentum_slow"] = torch.zeros_like(mat, device=device)
        if group["dual_stream"]:
            state["momentum_fast"] = torch.zeros_like(mat, device=device)
        if group["memory"] and p.numel() > 0:  # a zero-size matrix has nothing to protect
            config = self._codebook_config(group, p)
            side_dim = mat.shape[1] if group["side"] == "input" else mat.shape[0]
            state["seed"] = group["seed"] * 1_000_003 + index
            state["writes"] = 0
            state["memory"] = codebook.init_codebook(side_dim, config, device)
            if group["write_source"] == "gradients":
                width = min(config.write_rank + 4, side_dim)
                state["grad_sketch"] = torch.zeros(side_dim, width, device=device)
            if group["stretch_threshold"] > 0:
                other_dim = mat.shape[0] if group["side"] == "input" else mat.shape[1]
                state["row_energy"] = torch.zeros(other_dim, device=device)
                state["last_profile"] = torch.zeros(other_dim, device=device)
                state["stretch_windows"] = 0
        return state

    def _sketch(self, group: dict, p: torch.Tensor) -> torch.Tensor | None:
        """The sign-gate sketch of ``p``: derived from its seed, cached, never saved."""
        if group["gate"] != "sign":
            return None
        key = id(p)
        if key not in self._sketch_cache:
            mat = self._as_matrix(p)
            out_dim = mat.shape[0] if group["side"] == "input" else mat.shape[1]
            config = self._codebook_config(group, p)
            self._sketch_cache[key] = codebook.sign_sketch(
                out_dim, config, self.state[p]["seed"], p.device
            )
        return self._sketch_cache[key]

    def _omega(self, p: torch.Tensor) -> torch.Tensor:
        """The Gaussian test matrix of ``p``'s gradient sketch: from its seed, cached, not saved."""
        key = id(p)
        sketch = self.state[p]["grad_sketch"]
        if key not in self._omega_cache:
            self._omega_cache[key] = gaussian_sketch_matrix(
                sketch.shape[1], sketch.shape[0], self.state[p]["seed"] * 7919 + 2,
                device=sketch.device,
            ).mT.contiguous()  # fmt: skip
        return self._omega_cache[key]

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional).

        A step whose gradients are not finite is computed but not applied (every write is
        masked on the device, see :mod:`orthoptim.optim._nonfinite`); it reads nothing on the
        host except on memory writes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        guard = _nonfinite.begin_step(self)  # also rejects sparse gradients, complex params
        index = None
        for group in self.param_groups:
            self._check_momentum(group)
            matrices, vectors = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    index = index or self._param_index()  # built only when state is created
                    self._init_state(group, p, index[id(p)])
                if self._algorithm(group, p) == "adamw":
                    vectors.append(p)
                elif p.numel() > 0:
                    matrices.append(p)
                else:
                    guard.commit_(self.state[p]["step"], self.state[p]["step"] + 1)
            if vectors:
                self._adamw(group, vectors, guard)
            if matrices:
                self._matrix_step(group, matrices, guard)
        return loss

    def _adamw(self, group: dict, params: list[torch.Tensor], guard) -> None:
        states = [self.state[p] for p in params]
        _fused.adamw_(
            params, [cast(torch.Tensor, p.grad) for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=group["lr"],
            betas=self._adamw_betas(group), eps=group["adamw_eps"],
            weight_decay=group["weight_decay"], found_inf=guard.found_inf,
        )  # fmt: skip

    def _directions(self, group: dict, p: torch.Tensor, guard) -> list[torch.Tensor]:
        """Update the momentum streams of ``p`` and return the direction of each stream."""
        state = self.state[p]
        grad = self._as_matrix(p.grad)
        names = ("momentum_slow", "momentum_fast") if group["dual_stream"] else ("momentum_slow",)
        betas = (self._slow_beta(group), group["beta_fast"])
        out = []
        for name, beta in zip(names, betas[: len(names)], strict=True):
            buf = state[name]
            guard.commit_(buf, torch.lerp(buf, grad, 1 - beta))
            out.append(grad.lerp(buf, beta) if group["nesterov"] else buf)
        return out

    def _orthogonalize(self, group: dict, x: torch.Tensor) -> torch.Tensor:
        return newton_schulz(
            x, group["ns_steps"], group["ns_coefficients"], group["ns_dtype"], group["eps"]
        )

    def _fuse(self, group: dict, o_slow: torch.Tensor, o_fast: torch.Tensor) -> torch.Tensor:
        interp = slerp if group["fusion"] == "slerp" else nlerp
        return interp(o_slow, o_fast, group["mix"], group["eps"])

    def _matrix_step(self, group: dict, params: list[torch.Tensor], guard) -> None:
        """Fast path: one batched Newton-Schulz call per shape for all matrices and streams."""
        by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_shape[(self._as_matrix(p).shape, p.dtype, p.device)].append(p)
        for same in by_shape.values():
            streams = [self._directions(group, p, guard) for p in same]
            n_streams = len(streams[0])
            stacked = torch.stack([d for dirs in streams for d in dirs])
            ortho = self._orthogonalize(group, stacked)
            ortho = ortho.view(len(same), n_streams, *stacked.shape[1:])
            fused = self._fuse(group, ortho[:, 0], ortho[:, 1]) if n_streams == 2 else ortho[:, 0]
            for i, p in enumerate(same):
                self._finish(group, p, fused[i], guard)

    def _finish(self, group: dict, p: torch.Tensor, direction: torch.Tensor, guard) -> None:
        """Memory correction, scaling, weight decay and the parameter update for one matrix.

        Every write goes through ``guard`` (a dropped step changes nothing); the step counter
        stays on the device, and the host follows it with an upper bound (``_write_due``).
        """
        state = self.state[p]
        step = state["step"]
        guard.commit_(step, step + 1)
        if group["memory"]:
            grad = self._as_matrix(p.grad)
            if group["side"] == "output":
                grad = grad.mT
            if "grad_sketch" in state:
                sketch = state["grad_sketch"]
                guard.commit_(sketch, sketch + grad.mT.float() @ (grad.float() @ self._omega(p)))
            if "row_energy" in state:
                energy = state["row_energy"]
                guard.commit_(energy, energy + grad.float().square().sum(1))
            direction = self._correct(group, p, direction, step, guard)
        lr = group["lr"]
        new = p.mul(1 - lr * group["weight_decay"]) if group["weight_decay"] != 0 else p
        if group["scale"] == "muon":
            m, n = direction.shape
            alpha = -(lr * (group["target_rms"] * math.sqrt(max(m, n))))
            new = new.add(direction.view_as(p), alpha=alpha)
        else:
            gamma = rms_scale(direction, group["target_rms"], group["eps"])
            new = new.add((direction * gamma).view_as(p), alpha=-lr)
        guard.commit_(p, new)
        if group["memory"] and group["write_interval"]:
            written = self._write_due(p, group["write_interval"], guard)
            if written is not None:
                self._write(group, p, written, codebook.SCHEDULED)

    def _write_due(self, p: torch.Tensor, interval: int, guard) -> int | None:
        """The step at which ``p``'s memory writes now, or None; reads the device only when
        the host's upper bound of the step counter reaches a multiple of ``interval``.

        The bound counts every step the parameter took part in; a step dropped on the device
        is not counted there, so at a candidate the true counter is read (a write syncs anyway)
        and the bound corrected: writes happen exactly at the counter's multiples, as if the
        dropped steps had never been taken.
        """
        key = id(p)
        hint = self._step_hint.get(key)
        if hint is None:  # first step after a load or a copy: one read
            hint = int(self.state[p]["step"].item()) - 1
        hint += 1
        self._step_hint[key] = hint
        if hint % interval:
            return None
        step = int(self.state[p]["step"].item())
        self._step_hint[key] = step
        if step % interval or guard.skipped():
            return None
        return step

    def _correct(self, group: dict, p: torch.Tensor, direction: torch.Tensor, step, guard):
        state = self.state[p]
        book = state["memory"]
        config = self._codebook_config(group, p)
        flip = group["side"] == "output"
        u = direction.mT if flip else direction
        low = u.dtype in (torch.float16, torch.bfloat16)  # the lift's solve needs >= float32
        corrected, stats = codebook.correct(
            u.float() if low else u, book, step, config, self._sketch(group, p),
            skip=guard.skip(p.device),
        )  # fmt: skip
        corrected = corrected.to(u.dtype)
        old = state.get("last_stats", {})
        state["last_stats"] = {k: guard.select(old.get(k), v) for k, v in stats.items()}
        return corrected.mT if flip else corrected

    def _write(self, group: dict, p: torch.Tensor, step: int, kind: int) -> str:
        state = self.state[p]
        config = self._codebook_config(group, p)
        slow = state["momentum_slow"]
        if group["side"] == "output":
            slow = slow.mT
        if "grad_sketch" in state:
            # Rows of F^T span the same space, with the same energies, as the gradients since
            # the last write: F F^T ~= sum_t G_t^T G_t.
            source = nystrom_factor(state["grad_sketch"], self._omega(p)).mT
            state["grad_sketch"].zero_()
        else:
            source = slow
        new_stretch = self._new_stretch(group, p, kind)
        interval = group["write_interval"]
        min_age = group["min_age"] if group["min_age"] is not None else interval
        ready = step if kind == codebook.CONSOLIDATED else step + min_age
        seed = state["seed"] * 65_537 + state["writes"]
        state["writes"] += 1
        return codebook.write(
            state["memory"], source, step, config, seed=seed, kind=kind, ready=ready,
            sketch=self._sketch(group, p), sign_source=slow, new_stretch=new_stretch,
        )  # fmt: skip

    def _new_stretch(self, group: dict, p: torch.Tensor, kind: int) -> bool:
        """Whether the window ending now starts a new stretch of training (output-side test).

        A new stretch moves the error to other output units *and* makes it grow: the window's
        profile agrees with the previous window's less than ``stretch_threshold`` (cosine) and
        its gradient energy is at least 1.5 times the previous window's. A drop counts once the
        previous stretch has held for a window (the first windows of training, and the first after a
        shift, are transients). Converging training, whose error shrinks while its profile
        drifts, never starts one. ``end_task`` is always a boundary.
        """
        state = self.state[p]
        if "row_energy" not in state:
            return kind == codebook.CONSOLIDATED
        # The window's energy sum_t ||G_t||^2 is the squared norm of its profile.
        last = state["last_profile"]
        grew = bool(state["row_energy"].sum() >= _SHIFT_GROWTH * last.square().sum())
        profile = state["row_energy"].sqrt()
        state["row_energy"].zero_()
        agree = codebook.profile_cosine(last, profile) >= group["stretch_threshold"]
        last.copy_(profile)
        if kind == codebook.CONSOLIDATED:
            state["stretch_windows"] = 0
            return True
        new = not agree and grew and state["stretch_windows"] >= 1
        state["stretch_windows"] = state["stretch_windows"] + 1 if agree else 0
        return new

    def _check_loadable(self, state_dict: dict) -> None:
        """``ValueError`` if a saved per-parameter state cannot belong to this parameter under
        the saved group settings (another model, optimizer or memory configuration)."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return  # torch raises its own error
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                return
            hp = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for key, p in zip(saved["params"], group["params"], strict=True):
                st = state_dict["state"].get(key)
                if not st:
                    continue
                algo = self._algorithm(hp, p)
                expect = _tensor_shapes(self._new_state(hp, p, 0, "meta"))
                found = _tensor_shapes({k: v for k, v in st.items() if k != "last_stats"})
                extra = [name for name in found if name not in expect]
                for name in [*expect, *extra]:  # what is missing first, then what is left over
                    if expect.get(name) != found.get(name):
                        raise ValueError(
                            f"FOGO.load_state_dict: param group {gi}, parameter {key} "
                            f"(shape {tuple(p.shape)}, algorithm {algo!r}) needs state "
                            f"{name!r} of shape {expect.get(name)}, the state dict has "
                            f"{found.get(name)}; it comes from another model, optimizer or "
                            "memory configuration"
                        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state; codebook tensors keep their own dtypes (bool/int64 metadata, the memory
        dtype of the bases) instead of torch's default cast to the parameter's dtype, and step
        counters go to their parameter's device. A state that does not fit a parameter raises
        ``ValueError`` before anything is changed. The state keys may be torch's integer ids or
        anything else that ``param_groups[i]["params"]`` lists (the parameter names of
        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``)."""
        self._check_loadable(state_dict)
        saved_ids = [key for g in state_dict.get("param_groups", []) for key in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_key = dict(zip(saved_ids, params, strict=False))  # torch checks the lengths
        kept = {
            key: {name: value[name] for name in _OWN_DTYPE_STATE if name in value}
            for key, value in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        for key, extra in kept.items():
            p = by_key[key]
            for name, value in extra.items():
                if isinstance(value, dict):
                    value = {k: v.to(p.device, copy=True) for k, v in value.items()}
                else:
                    value = value.to(p.device, copy=True)
                self.state[p][name] = value
        for p in params:
            state = self.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32, copy=True)
        self._sketch_cache.clear()
        self._omega_cache.clear()
        self._step_hint.clear()

    # --------------------------------------------------------------------- public memory API
    @torch.no_grad()
    def end_task(self) -> None:
        """Consolidate at a task boundary: store the slow momentum's directions as a protected
        entry and make every stored entry protect from now on. Optional; nothing requires it."""
        for group in self.param_groups:
            if not group["memory"]:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "memory" not in state:
                    continue
                step = int(state["step"].item())
                self._write(group, p, step, codebook.CONSOLIDATED)
                book = state["memory"]
                book["ready"].clamp_(max=step)

    def memory_stats(self) -> dict[str, float]:
        """Interference diagnostics of the last step, aggregated over protected matrices.

        Returns a dict with: ``matrices`` (with memory), ``conflict_rate`` (entries in conflict /
        ready entries), ``correction_ratio`` (mean ||U* - O||_F / ||O||_F), ``entries_used``,
        ``columns_used``, ``columns_capacity``, ``occupancy`` (columns used / capacity),
        ``memory_bytes`` (codebook tensors), ``param_bytes`` (of the protected matrices),
        ``memory_fraction`` and ``writes``. Reading it syncs with the device; ``step`` never does.
        """
        out = defaultdict(float)
        ratios = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
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
                stats = state.get("last_stats")
                if stats is not None:
                    out["ready"] += int(stats["ready"])
                    out["conflicts"] += int(stats["conflicts"])
                    ratios.append(float(stats["correction_ratio"]))
        out["conflict_rate"] = out["conflicts"] / out["ready"] if out["ready"] else 0.0
        out["correction_ratio"] = sum(ratios) / len(ratios) if ratios else 0.0
        out["occupancy"] = (
            out["columns_used"] / out["columns_capacity"] if out["columns_capacity"] else 0.0
        )
        out["memory_fraction"] = (
            out["memory_bytes"] / out["param_bytes"] if out["param_bytes"] else 0.0
        )
        return dict(out)
