r"""K-FAC as a ``torch.optim.Optimizer``: Kronecker-factored natural gradient + an outer update.

For every block (a layer's weight, or a row block of one, see
:mod:`orthoptim.curvature.adapters`) with gradient matrix :math:`M = [\nabla W | \nabla b]` (bias
folded into ``A`` by a trailing 1, see :mod:`orthoptim.curvature.factors`):

.. math:: d = (G + \delta_G I)^{-1} M (A + \delta_A I)^{-1}

(π-damping; or the exact :math:`(G\otimes A + \lambda I)^{-1}` with ``damping_type='tikhonov'``).
``d`` (or ``p.grad`` for every other parameter: norms, vectors, excluded or unsupported layers)
then goes to the outer update: ``torch.optim.SGD``'s with momentum and *coupled* weight decay
(added after preconditioning, as the paper), or ``torch.optim.AdamW``'s (torch's fused steps,
:mod:`orthoptim.optim._fused`, which drop a non-finite step on the device).

Usage is drop-in, with the model or with its parameters (the owning layers are then found on the
first forward); with ``fisher='mc'`` call :meth:`KFAC.sample_fisher` between forward and
``backward``::

    opt = orthoptim.KFAC(model, lr=0.1, damping=1e-2)      # or KFAC(model.parameters(), ...)
    logits = model(x); loss = F.cross_entropy(logits, y)
    opt.zero_grad(); loss.backward(); opt.step()

**State** is keyed by parameter, as ``torch.optim`` keys it, so ``state_dict()`` and
``torch.distributed.checkpoint`` (which names it by parameter FQN) carry everything: a weight's
``state['kfac']`` holds its blocks' factors and inverses (``{block key: {...}}``, ``'w'`` for a
whole weight, ``'q'``/``'k'``/``'v'`` for attention's packed rows), created with their final shapes
on the first ``step()``; the step counter ``kfac_step`` lives in the state of the first parameter
(as ``torch.optim.LBFGS`` keeps its counters); the Monte-Carlo labels are drawn from a generator
seeded by ``(seed, step, call)``, so no generator state is needed to resume exactly.

**Data parallelism** (a process group of ``W > 1`` ranks, each with its shard of the global
batch): the Kronecker factors are all-reduced (sums over ranks divided by the global sample count),
so every rank holds the factors of the global batch; the gradients are averaged by
``DistributedDataParallel`` when the model runs inside it (detected at the forward), else by the
optimizer itself (with the model's floating-point buffers, BatchNorm's running statistics); each
block's inverse is computed by its owner rank or by every rank (``inverse_placement``, see
:mod:`orthoptim.optim._kfac_dist`). Every rank ends the step with bit-identical parameters and
state (owned inverses aside); docs/distributed.md.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orthoptim.curvature import (
    Block,
    a_factor,
    a_sum,
    compute_preconditioner,
    ema,
    g_factor,
    g_sum,
    inverse_mv,
)
from orthoptim.distributed.curvature import (
    Pending,
    all_reduce_sum,
    average_buffers,
    broadcast,
    sync_grads,
)
from orthoptim.optim import _fused, _kfac_dist, _nonfinite
from orthoptim.optim._kfac_layers import (  # noqa: F401  (the warnings are part of this API)
    DiagonalFactorWarning,
    LayerCoverage,
    PlainUpdateWarning,
)
from orthoptim.optim._validation import (
    check_betas,
    check_choice,
    check_group_keys,
    check_int,
    check_range,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
Dirs = dict[torch.Tensor, torch.Tensor]  # parameter -> its direction
_GROUP_META = ("params", "param_names")
_CONSTRUCTOR_ONLY = (
    "max_factor_dim", "exclude", "grad_scaler", "nonfinite", "process_group", "inverse_placement",
)  # fmt: skip


def check_kfac_args(a: dict[str, Any]) -> None:
    """Validate the K-FAC hyperparameters (``ValueError`` naming the argument and value)."""
    check_range("lr", a["lr"], 0.0)
    check_range("damping", a["damping"], 0.0)
    check_range("momentum", a["momentum"], 0.0, 1.0, high_open=True)
    check_range("weight_decay", a["weight_decay"], 0.0)
    check_range("eps", a["eps"], 0.0)
    check_betas("betas", a["betas"])
    check_choice("nesterov", a["nesterov"], (True, False))
    if a["nesterov"] and a["momentum"] == 0:
        raise ValueError("Invalid nesterov: True; nesterov needs momentum > 0")
    check_choice("outer", a["outer"], ("sgd", "adamw"))
    check_int("factor_interval", a["factor_interval"], 1)
    check_int("inverse_interval", a["inverse_interval"], 1)
    check_range("ema_weight", a["ema_weight"], 0.0, 1.0, low_open=True)
    check_choice("factor_init", a["factor_init"], ("batch", "zero"))
    check_choice("damping_type", a["damping_type"], ("pi", "tikhonov"))
    check_choice("inverse_method", a["inverse_method"], ("cholesky", "eigen"))
    if a["damping_type"] == "tikhonov" and a["inverse_method"] != "eigen":
        raise ValueError(
            f"Invalid inverse_method: {a['inverse_method']!r}; "
            "damping_type='tikhonov' needs 'eigen'"
        )
    if a["damping_type"] == "tikhonov" and a["damping"] <= 0:
        raise ValueError(f"Invalid damping: {a['damping']!r}; 'tikhonov' needs damping > 0")
    check_choice("fisher", a["fisher"], ("empirical", "mc"))
    check_choice("kfac_approx", a["kfac_approx"], ("expand", "reduce"))
    check_choice("factor_dtype", a["factor_dtype"], tuple(_DTYPES))
    for name in ("kl_clip", "max_grad_norm"):
        if a[name] is not None:
            check_range(name, a[name], 0.0, low_open=True)
    check_int("seed", a["seed"], 0)


class KFAC(LayerCoverage, _nonfinite.Guarded):
    r"""K-FAC preconditioning of the model's layers + SGD-momentum or AdamW.

    Args:
        params: the model (an ``nn.Module``: its trainable parameters form the single param
            group, names kept, layers hooked now), or an iterable of parameters / named
            parameters / param groups (``torch.optim`` style: the layers owning them are found on
            the model's first forward, see :mod:`orthoptim.curvature.owners`; exactly the given
            parameters are trained). Layers: see :mod:`orthoptim.curvature.adapters`.
        lr: outer learning rate (default 0.1, the FOP code's default).
        damping: λ (default 1e-2, the FOP code's default). With ``'pi'`` it is split between the
            factors by π; with ``'tikhonov'`` it is added to the Kronecker product's eigenvalues.
        momentum: SGD momentum (default 0.9, as the paper). ``outer='sgd'`` only.
        nesterov: Nesterov momentum (default False, as the paper's K-FAC/FOP runs).
        weight_decay: coupled L2 (SGD, added to the *preconditioned* direction, as the paper, which
            used 5e-4) or decoupled decay (AdamW). Default 0.
        outer: ``'sgd'`` (default) or ``'adamw'``.
        betas, eps: AdamW coefficients (default (0.9, 0.999), 1e-8).
        factor_interval: update the factors every this many steps (default 10), starting at step 0.
        inverse_interval: recompute damped inverses every this many steps (default 10).
        ema_weight: ρ, weight of the new batch estimate in the running average (default 0.05,
            ASDL's ``ema_decay`` used by the FOP code).
        factor_init: ``'batch'`` (default: first running average = first batch estimate) or
            ``'zero'`` (ASDL/FOP code: zero start, no bias correction, first value ρ·estimate).
        damping_type: ``'pi'`` (default, the FOP code) or ``'tikhonov'``.
        inverse_method: ``'cholesky'`` (default, the FOP code) or ``'eigen'``.
        fisher: ``'empirical'`` (default; ``G`` from the training backward, no extra pass) or
            ``'mc'`` (Monte-Carlo: labels sampled from the model, as the paper; needs
            :meth:`sample_fisher` on factor-update steps).
        kfac_approx: ``'expand'`` (default) or ``'reduce'``: the K-FAC of weights shared across
            locations (Eschenhagen et al., NeurIPS 2023; :mod:`orthoptim.curvature.factors`).
        factor_dtype: ``'float32'`` (default) or ``'float64'``: dtype of factors and inverses.
        kl_clip: if set, scale the preconditioned directions by
            :math:`\min(1, \sqrt{\kappa / (lr^2 \sum_\ell \langle d_\ell, g_\ell\rangle)})`
            (kfac-pytorch). Default None (the paper does not clip by KL).
        max_grad_norm: clip the global norm of all directions (preconditioned and plain) before
            the outer update; default 10.0, the paper's training script (``--clipping_norm``).
            ``None`` disables it.
        seed: seed of the Monte-Carlo labels drawn by :meth:`sample_fisher`.
        max_factor_dim: a factor side larger than this (an LM head's vocabulary side: ``G`` of a
            50k vocabulary is 10 GB in fp32) is kept diagonal; named once in a
            :class:`DiagonalFactorWarning`. Default 8192; ``None``: never. Constructor only.
        exclude: parameters or name patterns (``fnmatch``: ``"lm_head.*"``) that get the plain
            outer update on purpose: they are not preconditioned and not named in the warning.
            Constructor only.
        grad_scaler: the ``torch.amp.GradScaler`` of the run, needed only when
            ``scaler.unscale_(opt)`` runs before ``scaler.step(opt)`` (gradient clipping under
            AMP): the captured output gradients are still scaled then, and the scaler no longer
            tells the optimizer its scale. Without ``unscale_`` the scaler hands its scale to
            ``step()`` itself. Constructor only.
        nonfinite: what a step does when a gradient holds NaN/inf: ``"skip"`` (default: drop
            the whole step; parameters, factors, inverses, momentum and step counter untouched,
            hook captures discarded; counted in ``skipped_steps``), ``"raise"`` or ``"proceed"``
            (see :mod:`orthoptim.optim._nonfinite`, docs/reliability.md). Constructor only.
        process_group: the data-parallel group (default None: the default group when
            ``torch.distributed`` is initialised; a group of one rank is a single process).
            Constructor only.
        inverse_placement: ``"owner"`` (default: each block's inverse computed and applied by one
            rank, balanced by cost, its direction broadcast every step) or ``"replicated"``
            (every rank inverts every block; no per-step broadcast). Only with ``W > 1`` ranks;
            see :mod:`orthoptim.optim._kfac_dist`. Constructor only.

    **No silent fallbacks.** Every trained matrix parameter that does not get K-FAC (no adapter
    for its layer, a refused option, a tied weight, a layer whose hooks never fire) is named once
    in a :class:`PlainUpdateWarning` with the reason; ``exclude`` silences it for the listed
    parameters. A model with no layer K-FAC can precondition raises ``ValueError``.

    Every other argument lives in the param group (schedulers and state dicts see it); the
    curvature settings are read from the first group.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        *,
        damping: float = 1e-2,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        outer: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        factor_interval: int = 10,
        inverse_interval: int = 10,
        ema_weight: float = 0.05,
        factor_init: str = "batch",
        damping_type: str = "pi",
        inverse_method: str = "cholesky",
        fisher: str = "empirical",
        kfac_approx: str = "expand",
        factor_dtype: str = "float32",
        kl_clip: float | None = None,
        max_grad_norm: float | None = 10.0,
        seed: int = 0,
        max_factor_dim: int | None = 8192,
        exclude: Any = (),
        grad_scaler: Any = None,
        nonfinite: str = "skip",
        process_group: Any = None,
        inverse_placement: str = "owner",
        **extra: Any,
    ) -> None:
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, outer=outer, betas=betas, eps=eps,
            factor_interval=factor_interval, inverse_interval=inverse_interval,
            ema_weight=ema_weight, factor_init=factor_init, damping_type=damping_type,
            inverse_method=inverse_method, fisher=fisher, kfac_approx=kfac_approx,
            factor_dtype=factor_dtype, kl_clip=kl_clip, max_grad_norm=max_grad_norm, seed=seed,
            **extra,
        )  # fmt: skip
        self._check_args(defaults)
        if max_factor_dim is not None:
            check_int("max_factor_dim", max_factor_dim, 1)
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise ValueError(f"Invalid grad_scaler: {grad_scaler!r}; expected a GradScaler")
        model = params if isinstance(params, nn.Module) else None
        if model is not None:
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if not params:
                raise ValueError("Invalid model: it has no trainable parameters")
        elif isinstance(params, torch.Tensor):
            raise ValueError(f"Invalid params: {type(params).__name__}; expected an nn.Module "
                             "or an iterable of parameters")  # fmt: skip
        ranks = _kfac_dist.resolve(process_group, inverse_placement)
        super().__init__(params, defaults)
        _refuse_dtensors(self.param_groups, type(self).__name__)
        self._ranks = ranks
        self._grad_scaler = grad_scaler
        self._inv_scale: torch.Tensor | None = None  # 1 / the scale of this step's captures
        self._mc_calls = 0
        _nonfinite.install(self, nonfinite)
        self._init_coverage(model, max_factor_dim, exclude)
        self.register_state_dict_pre_hook(_exact_clock_hook)
        self._arm_capture()

    # -- validation ---------------------------------------------------------------------------
    _EXTRA_KEYS: tuple[str, ...] = ()  # hyperparameters a subclass adds to the param group

    def _check_args(self, args: dict[str, Any]) -> None:
        base = set(inspect.signature(KFAC.__init__).parameters) - {
            "self", "params", "extra", *_CONSTRUCTOR_ONLY,
        }  # fmt: skip
        unknown = sorted(set(args) - base - set(self._EXTRA_KEYS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {unknown}")
        check_kfac_args(args)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_group_keys(param_group, self.defaults)
        self._check_args(
            {**self.defaults, **{k: v for k, v in param_group.items() if k not in _GROUP_META}}
        )
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults/state/param_groups: deepcopy / pickle lost the model, the
        # hooks and the non-finite policy. Keep every attribute.
        return dict(self.__dict__)

    # -- schedule -----------------------------------------------------------------------------
    def _anchor_state(self) -> dict[str, Any]:
        return self.state[self.param_groups[0]["params"][0]]

    @property
    def kfac_step(self) -> int:
        """Number of steps taken (drives the factor / inverse intervals). A step dropped for
        non-finite gradients is counted until the next factor / inverse step or ``state_dict()``,
        which take it off (reading the device): the schedule itself is exact."""
        anchor = self.param_groups[0]["params"][0]  # reading must not create state entries
        return self.state[anchor].get("kfac_step", 0) if anchor in self.state else 0

    def _is_factor_step(self) -> bool:
        return self.kfac_step % self.param_groups[0]["factor_interval"] == 0

    def _split_dtype(self) -> torch.dtype | None:
        """Dtype of the sub-batch gradients the hooks form for every backward
        (:attr:`Capture.split_dtype`, FOP's one-pass split); None for K-FAC."""
        return None

    def _arm_capture(self) -> None:
        """Tell the hooks what the coming step needs, so other steps keep no references."""
        factor = self._is_factor_step()
        mc = self.param_groups[0]["fisher"] == "mc"
        self._capture.save_inputs = factor
        self._capture.save_grads = factor and not mc
        self._capture.save_outputs = factor and mc
        self._capture.split_dtype = self._split_dtype()

    # -- state --------------------------------------------------------------------------------
    def block_state(self, block: Block) -> dict[str, Any]:
        """The K-FAC state of one block: ``A``, ``G``, ``pre`` (the damped inverse), the number
        of factor ``updates`` and ``inverses`` computed (FOP adds ``beta``, ``eta``)."""
        return self.state[block.weight]["kfac"][block.key]

    def _new_block_state(self, block: Block, hp: dict[str, Any]) -> dict[str, Any]:
        dtype, dev = _DTYPES[hp["factor_dtype"]], block.weight.device

        def factor(d: int, diag: bool) -> torch.Tensor:
            return torch.zeros((d,) if diag else (d, d), dtype=dtype, device=dev)

        A, G = factor(block.d_in, block.diag_a), factor(block.d_out, block.diag_g)
        if hp["damping_type"] == "pi":
            pre = {"A_inv": torch.zeros_like(A), "G_inv": torch.zeros_like(G)}
        else:
            pre = {"scale": torch.zeros((block.d_out, block.d_in), dtype=dtype, device=dev)}
            if not block.diag_a:
                pre["QA"] = torch.zeros_like(A)
            if not block.diag_g:
                pre["QG"] = torch.zeros_like(G)
        return {"A": A, "G": G, "pre": pre, "updates": 0, "inverses": 0}

    def _init_state(self, hp: dict[str, Any]) -> None:
        """Create every block's state with its final shapes (a checkpoint loader's template)."""
        anchor = self._anchor_state()
        anchor.setdefault("kfac_step", 0)
        for b in self._blocks:
            blocks = self.state[b.weight].setdefault("kfac", {})
            if b.key not in blocks:
                blocks[b.key] = self._new_block_state(b, hp)
        if self._ranks is not None:
            self._place_inverses()

    def _seen(self, local: list[bool]) -> list[bool]:
        if self._ranks is None or not local:
            return local
        flags = torch.tensor(local, dtype=torch.float32, device=self._blocks[0].weight.device)
        all_reduce_sum(flags, self._ranks.group).wait()  # once, at the first step
        return [v > 0 for v in flags.tolist()]

    def _owns(self, block: Block) -> bool:
        """Whether this rank computes ``block``'s inverse and direction (always in one
        process)."""
        return self._ranks is None or self._ranks.owns(block)

    # -- Monte-Carlo Fisher -------------------------------------------------------------------
    def _mc_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded by ``(seed, step, call within the step)``: resuming needs no
        generator state, and a skipped step draws the same labels again."""
        key = f"{self.param_groups[0]['seed']}:{self.kfac_step}:{self._mc_calls}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        self._mc_calls += 1
        return torch.Generator(device=device).manual_seed(seed)

    def sample_fisher(self, logits: torch.Tensor) -> None:
        r"""Record Monte-Carlo Fisher output gradients (``fisher='mc'``).

        Call after the forward pass that produced ``logits`` (shape ``(..., C)``, a categorical
        model) and before ``loss.backward()`` (once per micro-batch under gradient accumulation);
        it is a no-op unless ``fisher='mc'`` and the coming ``step()`` updates the factors, so it
        can be called every step. It samples :math:`y \sim \mathrm{softmax}(\text{logits})` and
        backpropagates the sum-reduced :math:`-\log p(y)` to the hooked layer outputs only (no
        parameter ``.grad`` is touched).
        """
        if self.param_groups[0]["fisher"] != "mc" or not self._is_factor_step():
            return
        recs = [r for r in self._capture.records.values() if r.outputs]
        if not recs:
            return
        gen = self._mc_generator(logits.device)
        flat = logits.reshape(-1, logits.shape[-1])
        with torch.no_grad():
            probs = torch.softmax(flat.detach().float(), dim=-1)
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        with torch.enable_grad():
            loss = F.cross_entropy(flat, y, reduction="sum")
            outs = [o for r in recs for o in r.outputs]
            self._capture.paused = True  # this backward must not look like a training backward
            try:
                grads = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
            finally:
                self._capture.paused = False
        it = iter(grads)
        for r in recs:
            for _o in r.outputs:
                g = next(it)
                if g is not None:
                    r.mc_grads.append((g.detach(), 1.0))
            r.outputs = []

    # -- curvature ----------------------------------------------------------------------------
    def _update_factors(self, hp: dict[str, Any]) -> None:
        w, init = hp["ema_weight"], hp["factor_init"]
        for b, (A, G) in self._factor_estimates(hp).items():
            ls = self.block_state(b)
            first = ls["updates"] == 0
            ls["A"] = ema(None if first else ls["A"], A, w, init)
            ls["G"] = ema(None if first else ls["G"], G, w, init)
            ls["updates"] += 1

    def _grads_of(self, b: Block, mc: bool) -> list[tuple[torch.Tensor, float | torch.Tensor]]:
        """``(grad, scale)`` records of ``b`` for ``G`` (per-sample once scaled)."""
        rec = self._capture.records[b]
        grads: list[tuple[torch.Tensor, float | torch.Tensor]] = []
        grads += rec.mc_grads if mc else rec.grad_records()
        if self._inv_scale is not None and not mc:  # captured from the scaled backward
            grads = [(g, scale * self._inv_scale) for g, scale in grads]
        if rec.inputs and not grads and mc:
            raise RuntimeError(
                "fisher='mc': call opt.sample_fisher(logits) after the forward pass and "
                "before loss.backward() on factor-update steps"
            )
        return grads

    def _factor_estimates(self, hp: dict[str, Any]) -> dict[Block, tuple[torch.Tensor, ...]]:
        """This step's batch estimates ``(A, G)`` of the blocks that saw data (on any rank)."""
        if self._ranks is not None:
            return self._reduced_estimates(hp)
        dtype, approx = _DTYPES[hp["factor_dtype"]], hp["kfac_approx"]
        mc = hp["fisher"] == "mc"
        out: dict[Block, tuple[torch.Tensor, ...]] = {}
        # attention's q/k/v blocks of a self-attention share their input: one A for the three
        a_cache: dict[tuple[Any, ...], torch.Tensor] = {}
        for b in self._blocks:
            rec = self._capture.records[b]
            grads = self._grads_of(b, mc)
            if not rec.inputs or not grads:
                continue
            key = (type(b.ops), b.bias is not None, b.diag_a, *map(id, rec.inputs))
            if key not in a_cache:
                a_cache[key] = a_factor(b, rec.inputs, dtype, approx)
            out[b] = (a_cache[key], g_factor(b, grads, rec.samples(), dtype, approx))
        return out

    def _reduced_estimates(self, hp: dict[str, Any]) -> dict[Block, tuple[torch.Tensor, ...]]:
        """Data parallelism: every rank's factor sums and sample counts, summed over the ranks
        (one asynchronous all-reduce per block, started as soon as its sums are formed, so the
        next block's sums overlap it), divided by the global counts. A rank without data for a
        block sends zeros; a block no rank saw is skipped (its counts are read on the host:
        factor steps sync anyway)."""
        assert self._ranks is not None
        dtype, approx = _DTYPES[hp["factor_dtype"]], hp["kfac_approx"]
        mc = hp["fisher"] == "mc"
        pending, flats = Pending(), []
        for b in self._blocks:
            rec = self._capture.records[b]
            grads = self._grads_of(b, mc)
            dev = b.weight.device
            sa = (b.d_in,) if b.diag_a else (b.d_in, b.d_in)
            sg = (b.d_out,) if b.diag_g else (b.d_out, b.d_out)
            if rec.inputs and grads:
                A, n_a = a_sum(b, rec.inputs, dtype, approx)
                G, n_g = g_sum(b, grads, dtype, approx), rec.samples()
            else:
                A = torch.zeros(sa, dtype=dtype, device=dev)
                G = torch.zeros(sg, dtype=dtype, device=dev)
                n_a = n_g = 0
            counts = torch.tensor([n_a, n_g], dtype=dtype, device=dev)
            flat = torch.cat([A.reshape(-1), G.reshape(-1), counts])
            pending.add(all_reduce_sum(flat, self._ranks.group))
            flats.append((b, flat, sa, sg))
        pending.wait()
        if not flats:
            return {}
        seen = torch.stack([f[-2:] for _, f, _, _ in flats]).tolist()
        out: dict[Block, tuple[torch.Tensor, ...]] = {}
        for (b, flat, sa, sg), (n_a, n_g) in zip(flats, seen, strict=True):
            if n_a > 0 and n_g > 0:
                na = int(torch.Size(sa).numel())
                A = flat[:na].view(sa) / n_a
                G = flat[na : na + int(torch.Size(sg).numel())].view(sg) / n_g
                out[b] = (A, G)
        return out

    def update_inverses(self) -> None:
        """Recompute every block's damped inverse from its current factors (done by ``step``)."""
        hp = self.param_groups[0]
        for b in self._blocks:
            ls = self.block_state(b)
            if ls["updates"] > 0:
                if self._owns(b):  # another rank's inverse is computed there
                    ls["pre"] = compute_preconditioner(
                        ls["A"], ls["G"], hp["damping"], hp["damping_type"], hp["inverse_method"]
                    )
                ls["inverses"] += 1

    def _precondition(self, ls: dict[str, Any], M: torch.Tensor) -> torch.Tensor:
        return inverse_mv(ls["pre"], M.to(ls["A"].dtype)).to(M.dtype)

    def _ready(self, block: Block) -> bool:
        return block.weight.grad is not None and self.block_state(block)["inverses"] > 0

    def _put(self, dirs: Dirs, block: Block, D: torch.Tensor) -> None:
        """Write a block direction (matrix layout) into ``dirs`` (weight- and bias-shaped)."""
        w, b = block.split_direction(D)
        if block.rows is None:
            dirs[block.weight] = w
        else:  # a row block: the other rows keep their own direction (or the gradient)
            full = dirs.get(block.weight)
            if full is None:
                g = block.weight.grad
                full = dirs[block.weight] = torch.zeros_like(w) if g is None else g.clone()
            full[block.rows] = w
        if block.bias is None or b is None:
            return
        if block.bias_rows is None:
            dirs[block.bias] = b
            return
        full = dirs.get(block.bias)
        if full is None:
            g = block.bias.grad
            full = dirs[block.bias] = torch.zeros_like(block.bias) if g is None else g.clone()
        full[block.bias_rows] = b

    _SHARED_KEYS: tuple[str, ...] = ()  # block-state scalars an owner sends with its direction

    def _directions(self, hp: dict[str, Any], guard: _nonfinite.StepGuard) -> Dirs:
        """Preconditioned directions ``{param: tensor}`` of the blocks that have an inverse
        (``guard``: this step's drop flag, for whatever a subclass keeps from the step). Under
        ``inverse_placement="owner"`` each rank computes its own blocks' and broadcasts them."""
        ready = [b for b in self._blocks if self._ready(b)]
        self._prepare(ready)
        out = self._block_directions([b for b in ready if self._owns(b)], hp, guard)
        if self._ranks is not None and self._ranks.owner_mode:
            out = self._share(ready, out)
        dirs: Dirs = {}
        for b in ready:
            self._put(dirs, b, out[b])
        return dirs

    def _prepare(self, ready: list[Block]) -> None:
        """What every rank must do for the ready blocks before any direction (FOP: the
        collective that forms the halves)."""

    def _block_directions(
        self, blocks: list[Block], hp: dict[str, Any], guard: _nonfinite.StepGuard
    ) -> dict[Block, torch.Tensor]:
        """The directions (matrix layout) of ``blocks``: K-FAC's ``F^-1 M``."""
        return {b: self._precondition(self.block_state(b), b.grad_matrix()) for b in blocks}

    def _share(
        self, ready: list[Block], out: dict[Block, torch.Tensor]
    ) -> dict[Block, torch.Tensor]:
        """Owner placement: broadcast every ready block's direction (and the block-state scalars
        of :attr:`_SHARED_KEYS`) from its owner; asynchronous, waited once all are started."""
        ranks = self._ranks
        assert ranks is not None
        keys, pending, bufs = self._SHARED_KEYS, Pending(), []
        for b in ready:
            ls, n = self.block_state(b), b.d_out * b.d_in
            dtype = ls["A"].dtype if keys else b.weight.dtype
            if ranks.owner[b] == ranks.rank:
                buf = torch.cat([out[b].reshape(-1).to(dtype)]
                                + [ls[k].reshape(1).to(dtype) for k in keys])  # fmt: skip
            else:
                buf = torch.empty(n + len(keys), dtype=dtype, device=b.weight.device)
            pending.add(broadcast(buf, ranks.owner[b], ranks.group))
            bufs.append((b, buf, n))
        pending.wait()
        shared = {}
        for b, buf, n in bufs:
            shared[b] = buf[:n].view(b.d_out, b.d_in).to(b.weight.dtype)
            if ranks.owner[b] != ranks.rank:
                ls = self.block_state(b)
                for i, k in enumerate(keys):
                    ls[k] = buf[n + i].clone()
        return shared

    def _rescale(self, dirs: Dirs, hp: dict[str, Any]) -> Dirs:
        """KL-clip (preconditioned layers) and global-norm clip (everything), no host sync."""
        if hp["kl_clip"] is not None and dirs:
            vg = sum((d * p.grad).sum() for p, d in dirs.items() if p.grad is not None)
            vg = vg * hp["lr"] ** 2  # a bias without .grad enters M as zeros: no term
            nu = (hp["kl_clip"] / vg.abs().clamp_min(1e-30)).sqrt().clamp(max=1.0)
            dirs = {p: d * nu for p, d in dirs.items()}
        if hp["max_grad_norm"] is not None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p not in dirs:
                        dirs[p] = p.grad
            if dirs:
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(d) for d in dirs.values()])
                )
                c = (hp["max_grad_norm"] / (norm + 1e-6)).clamp(max=1.0)
                dirs = {p: d * c for p, d in dirs.items()}
        return dirs

    # -- step ---------------------------------------------------------------------------------
    def _outer_update(self, dirs: Dirs, found_inf: torch.Tensor | None) -> None:
        """SGD-momentum or AdamW on ``dirs`` (``p.grad`` elsewhere): torch's fused steps, which
        drop the step on the device when ``found_inf`` is 1.0."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            directions = [dirs.get(p, p.grad).to(p.dtype) for p in params]  # no-op but autocast
            states = [self.state[p] for p in params]
            if group["outer"] == "sgd":
                if group["momentum"] != 0:
                    for p, state in zip(params, states, strict=True):
                        state.setdefault("momentum_buffer", torch.zeros_like(p))
                _fused.sgd_(
                    params, directions, [s.get("momentum_buffer") for s in states],
                    lr=float(group["lr"]), momentum=group["momentum"], nesterov=group["nesterov"],
                    weight_decay=group["weight_decay"], found_inf=found_inf,
                )  # fmt: skip
            else:
                for p, state in zip(params, states, strict=True):
                    if "exp_avg" not in state:  # the first parameter also holds the clock
                        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                _fused.adamw_(
                    params, directions, [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                    lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], found_inf=found_inf,
                )  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update factors / inverses when due, precondition, apply the outer update.

        Returns the closure's loss (evaluated under ``torch.enable_grad()``), else None. A step
        with non-finite gradients is dropped on the device; the step clock (which counts every
        call) is corrected at the next factor / inverse step, which reads the device anyway.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_search()
        buffers = self._sync_replicas()
        # under data parallelism every rank drops the same steps (the flag is all-reduced; the
        # gradients are averaged by now, but a GradScaler's unscale_ saw each rank's own)
        guard = _nonfinite.begin_step(self, None if self._ranks is None else self._ranks.group)
        self._inv_scale = self._capture_scale(guard)
        hp = self.param_groups[0]
        if self._is_factor_step() or self.kfac_step % hp["inverse_interval"] == 0:
            skipped = guard.skipped()  # a scheduled update: the host may read the device
            self._correct_clock(skipped)
            if skipped:
                self._discard_step()
                buffers.wait()
                return loss
        self._init_state(hp)
        if not self._checked and self._roots and self._capture.saw_forward():
            self._check_hooks()
        try:
            if self._is_factor_step():
                self._update_factors(hp)
            if self.kfac_step % hp["inverse_interval"] == 0:
                self.update_inverses()
            dirs = self._rescale(self._directions(hp, guard), hp)
            self._outer_update(dirs, guard.found_inf)
        finally:
            self._capture.clear()
            self._mc_calls = 0
            buffers.wait()
        self._anchor_state()["kfac_step"] += 1
        self._arm_capture()
        return loss

    def _sync_replicas(self) -> Pending:
        """Data parallelism without DDP (no forward since the last step ran inside a
        ``DistributedDataParallel``): average the gradients now (waited: the step needs them)
        and start averaging the model's floating-point buffers (returned, waited at the end of
        the step). Nothing in one process or under DDP, which averages the gradients in backward
        and broadcasts rank 0's buffers at every forward."""
        if self._ranks is None or self._capture.ddp_forward:
            return Pending()
        r = self._ranks
        sync_grads(self._trained(), r.world_size, r.group).wait()
        modules = self._roots or ([self._model] if self._model is not None else [])
        return average_buffers(modules, r.world_size, r.group)

    def _correct_clock(self, skipped: bool) -> None:
        """Take the dropped steps the host has not seen yet off the step clock (reads the
        device); a dropped current step never reached the clock."""
        off = _nonfinite.unseen_skips(self) - int(skipped)
        if off:
            anchor = self._anchor_state()
            anchor["kfac_step"] = anchor.get("kfac_step", 0) - off

    def _exact_clock(self) -> None:
        """The clock without the steps dropped since the last scheduled update (reads the
        device; ``state_dict()`` calls it)."""
        if self.param_groups[0]["params"][0] in self.state:
            self._correct_clock(False)

    def _capture_scale(self, guard: _nonfinite.StepGuard) -> torch.Tensor | None:
        """1 / the loss scale of what the hooks captured this step from a GradScaler's scaled
        backward (the output gradients: ``G`` scales by ``s²``; FOP's sub-batch gradients: by
        ``s``), or None without a scaler. When the scaler hands its scale to ``step()``,
        :func:`~orthoptim.optim._nonfinite.begin_step` unscales ``.grad`` and returns it; after
        ``scaler.unscale_`` (gradient clipping) it hands none over, and the constructor's
        ``grad_scaler`` says it."""
        if guard.inv_scale is not None:
            return guard.inv_scale
        if getattr(self, "found_inf", None) is None:  # no GradScaler
            return None
        if self._grad_scaler is None:
            raise RuntimeError(
                f"{type(self).__name__}: scaler.unscale_(opt) ran before scaler.step(opt), so "
                "the output gradients the hooks captured are still scaled and the scaler no "
                f"longer says by how much; build it with {type(self).__name__}(..., "
                "grad_scaler=scaler)"
            )
        scale = getattr(self._grad_scaler, "_scale", None)  # its device tensor: no host read
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(self._grad_scaler.get_scale()))
        return scale.double().reciprocal().float()

    def _discard_step(self) -> None:
        """A skipped step: drop what the hooks captured (the step clock does not count it, so
        the Monte-Carlo labels of the retried step are drawn again)."""
        self._capture.clear()
        self._mc_calls = 0

    # -- state dicts --------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim`` loading, except that K-FAC state keeps ``factor_dtype`` (torch would
        cast it to each parameter's dtype) and follows the parameter's device; a state dict whose
        blocks or parameter names do not match this model raises ``ValueError``."""
        ours = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        id_map = dict(zip(saved_ids, ours, strict=False))
        self._check_names(state_dict)
        stripped, kfac = {}, {}
        for k, v in state_dict["state"].items():
            v = dict(v)
            if "kfac" in v:
                kfac[id_map.get(k)] = v.pop("kfac")
            stripped[k] = v
        self._check_blocks(kfac)
        super().load_state_dict({**state_dict, "state": stripped})
        for p, blocks in kfac.items():
            if p is not None:
                self.state[p]["kfac"] = _to_device(blocks, p.device)
        if self._ranks is not None:
            self._place_inverses()  # again at the first step for blocks found by its forward
        self._arm_capture()  # the loaded step decides what the next step needs

    def _place_inverses(self) -> None:
        """Owner placement: drop the inverses of blocks another rank owns (a new block's
        template, or a loaded state dict's), and recompute an owned one that a loaded state dict
        lacks (saved by another rank) from the loaded factors (exact when the factors have not
        changed since the last inverse step; ``torch.distributed.checkpoint`` restores each
        owner's own inverses exactly). Called by ``_init_state`` and after loading."""
        assert self._ranks is not None
        self._ranks.assign(self._blocks)
        hp = self.param_groups[0]
        for b in self._blocks:
            ls = self.state[b.weight].get("kfac", {}).get(b.key)
            if ls is None:
                continue
            if not self._owns(b):
                ls.pop("pre", None)
            elif "pre" not in ls and ls["inverses"] > 0:
                ls["pre"] = compute_preconditioner(
                    ls["A"], ls["G"], hp["damping"], hp["damping_type"], hp["inverse_method"]
                )

    def _check_names(self, state_dict: dict[str, Any]) -> None:
        for g_saved, g in zip(state_dict["param_groups"], self.param_groups, strict=False):
            a, b = g_saved.get("param_names"), g.get("param_names")
            if a is not None and b is not None and list(a) != list(b):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state dict's parameters "
                    f"{list(a)[:4]}... do not match this optimizer's {list(b)[:4]}...; it comes "
                    "from a different model"
                )

    def _check_blocks(self, kfac: dict[Any, Any]) -> None:
        for b in self._blocks:
            saved = kfac.get(b.weight, {}).get(b.key)
            if saved is None:
                continue
            want = (b.d_in,) if b.diag_a else (b.d_in, b.d_in)
            if tuple(saved["A"].shape) != want:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: block {b.name} has A of shape "
                    f"{want} but the state dict's is {tuple(saved['A'].shape)}; it comes from a "
                    "different model"
                )


def _refuse_dtensors(groups: list[dict[str, Any]], name: str) -> None:
    """FSDP2 (``fully_shard``) and tensor parallelism hand the optimizer DTensor shards: a
    layer's Kronecker factors need its whole weight, input and output gradient, so K-FAC / FOP
    refuse them (use DistributedDataParallel, docs/distributed.md)."""
    from torch.distributed.tensor import DTensor

    for g in groups:
        for i, p in enumerate(g["params"]):
            if isinstance(p, DTensor):
                names = g.get("param_names")
                raise ValueError(
                    f"Invalid params: {names[i] if names else f'param {i}'} is a DTensor "
                    f"(FSDP2 fully_shard or tensor parallelism); {name} needs whole layers: wrap "
                    "the model in DistributedDataParallel instead"
                )


def _exact_clock_hook(optimizer: torch.optim.Optimizer) -> None:
    """state_dict pre-hook of :class:`KFAC`."""
    assert isinstance(optimizer, KFAC)
    optimizer._exact_clock()


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
