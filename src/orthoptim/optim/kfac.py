r"""K-FAC as a ``torch.optim.Optimizer``: Kronecker-factored natural gradient + an outer update.

For every supported layer (``nn.Linear``, ``nn.Conv2d``, see
:func:`orthoptim.curvature.is_supported`) with gradient matrix :math:`M = [\nabla W | \nabla b]`
(bias folded into ``A`` by a trailing 1, see :mod:`orthoptim.curvature.factors`):

.. math:: d = (G + \delta_G I)^{-1} M (A + \delta_A I)^{-1}

(π-damping; or the exact :math:`(G\otimes A + \lambda I)^{-1}` with ``damping_type='tikhonov'``).
``d`` (or ``p.grad`` for every other parameter: norms, embeddings, ...) then goes to the outer
update: SGD with momentum and *coupled* weight decay (added after preconditioning, as the paper's
``torch.optim.SGD``), or AdamW (torch's fused steps, :mod:`orthoptim.optim._fused`).

Usage is drop-in; with ``fisher='mc'`` call :meth:`KFAC.sample_fisher` between forward and
``backward``::

    opt = orthoptim.KFAC(model, lr=0.1, damping=1e-2)
    logits = model(x); loss = F.cross_entropy(logits, y)
    opt.zero_grad(); loss.backward(); opt.step()
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from orthoptim.curvature import (
    Capture,
    a_factor,
    compute_preconditioner,
    ema,
    g_factor,
    inverse_mv,
    is_supported,
)
from orthoptim.optim import _fused, _nonfinite
from orthoptim.optim._validation import (
    check_betas,
    check_choice,
    check_group_keys,
    check_int,
    check_range,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_GROUP_META = ("params", "param_names")


def grad_matrix(module: nn.Module, gw=None, gb=None, out=None) -> torch.Tensor:
    """The layer gradient ``[dW.flatten(1) | db]`` (``(d_out, d_in [+1])``), from ``.grad``
    unless the weight / bias gradients ``gw`` / ``gb`` are given; written into ``out`` if given."""
    w = (module.weight.grad if gw is None else gw).flatten(1)
    if module.bias is None:
        return w if out is None else out.copy_(w)
    b = module.bias.grad if gb is None else gb
    b = torch.zeros_like(module.bias) if b is None else b
    return torch.cat([w, b[:, None]], dim=1, out=out)


def put_direction(dirs: dict, module: nn.Module, D: torch.Tensor) -> None:
    """Split a layer-matrix direction back into weight- and bias-shaped tensors."""
    w = module.weight
    dirs[w] = D[:, : w[0].numel()].reshape(w.shape)
    if module.bias is not None:
        dirs[module.bias] = D[:, -1]


def check_kfac_args(a: dict) -> None:
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
    check_choice("factor_dtype", a["factor_dtype"], tuple(_DTYPES))
    for name in ("kl_clip", "max_grad_norm"):
        if a[name] is not None:
            check_range(name, a[name], 0.0, low_open=True)
    check_int("seed", a["seed"], 0)


class KFAC(_nonfinite.Guarded, torch.optim.Optimizer):
    r"""K-FAC preconditioning of ``nn.Linear`` / ``nn.Conv2d`` gradients + SGD-momentum or AdamW.

    Args:
        model: the ``nn.Module`` to train; its trainable parameters form the single param group
            (names kept), its supported layers are hooked (keyed by module name).
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
        factor_dtype: ``'float32'`` (default) or ``'float64'``: dtype of factors and inverses.
        kl_clip: if set, scale the preconditioned directions by
            :math:`\min(1, \sqrt{\kappa / (lr^2 \sum_\ell \langle d_\ell, g_\ell\rangle)})`
            (kfac-pytorch). Default None (the paper does not clip by KL).
        max_grad_norm: clip the global norm of all directions (preconditioned and plain) before
            the outer update; default 10.0, the paper's training script (``--clipping_norm``),
            which K-FAC/FOP need for stability early on (the damped inverse of small, stale
            factors can amplify a growing gradient). ``None`` disables it.
        seed: seed of the generator used by :meth:`sample_fisher` (its state is saved).
        nonfinite: what a step does when a gradient holds NaN/inf: ``"skip"`` (default: drop
            the whole step; parameters, factors, inverses, momentum, step counter and the
            Monte-Carlo generator untouched, hook captures discarded; counted in
            ``skipped_steps``), ``"raise"`` or ``"proceed"``. A constructor keyword, not a
            param-group key (see :mod:`orthoptim.optim._nonfinite`, docs/reliability.md).

    Every argument lives in the param group (schedulers and state dicts see it); the curvature
    settings are read from the first group. Factors/inverses are kept in ``self.state['kfac']``
    keyed by module name, so they travel in ``state_dict()``.
    """

    def __init__(
        self,
        model: nn.Module,
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
        factor_dtype: str = "float32",
        kl_clip: float | None = None,
        max_grad_norm: float | None = 10.0,
        seed: int = 0,
        nonfinite: str = "skip",
        **extra,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__}; expected an nn.Module")
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, outer=outer, betas=betas, eps=eps,
            factor_interval=factor_interval, inverse_interval=inverse_interval,
            ema_weight=ema_weight, factor_init=factor_init, damping_type=damping_type,
            inverse_method=inverse_method, fisher=fisher, factor_dtype=factor_dtype,
            kl_clip=kl_clip, max_grad_norm=max_grad_norm, seed=seed, **extra,
        )  # fmt: skip
        self._check_args(defaults)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("Invalid model: it has no trainable parameters")
        super().__init__(params, defaults)
        self._model = model
        self._layers = {  # zero-size layers have nothing to precondition
            n: m for n, m in model.named_modules() if is_supported(m) and m.weight.numel() > 0
        }
        self._capture = Capture(self._layers)
        self.state["kfac"] = {"step": 0, "rng": None, "layers": {n: {} for n in self._layers}}
        self._rng_undo: list | None = None  # generator state before this step's sampling
        _nonfinite.install(self, nonfinite)
        self.register_state_dict_pre_hook(KFAC._exact_clock)
        self._arm_capture()

    # -- validation ---------------------------------------------------------------------------
    _EXTRA_KEYS: tuple[str, ...] = ()  # hyperparameters a subclass adds to the param group
    # The hooks' captures come from the scaled backward and are not unscaled yet: GradScaler
    # keeps its own (syncing) path for K-FAC until they are.
    _step_supports_amp_scaling = False

    def _check_args(self, args: dict) -> None:
        base = set(inspect.signature(KFAC.__init__).parameters) - {
            "self", "model", "extra", "nonfinite",
        }  # fmt: skip
        unknown = sorted(set(args) - base - set(self._EXTRA_KEYS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {unknown}")
        check_kfac_args(args)

    def add_param_group(self, param_group: dict) -> None:
        check_group_keys(param_group, self.defaults)
        self._check_args(
            {**self.defaults, **{k: v for k, v in param_group.items() if k not in _GROUP_META}}
        )
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        # torch keeps only defaults/state/param_groups: deepcopy / pickle lost the model, the
        # hooks and the non-finite policy. Keep every attribute.
        return dict(self.__dict__)

    # -- schedule -----------------------------------------------------------------------------
    @property
    def kfac_step(self) -> int:
        """Number of steps taken (drives the factor / inverse intervals). A step dropped for
        non-finite gradients is counted until the next factor / inverse step or ``state_dict()``,
        which take it off (reading the device): the schedule itself is exact."""
        return self.state["kfac"]["step"]

    def _is_factor_step(self) -> bool:
        return self.kfac_step % self.param_groups[0]["factor_interval"] == 0

    def _split_dtype(self):
        """Dtype of the first-half gradients the hooks form for every backward
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

    # -- Monte-Carlo Fisher -------------------------------------------------------------------
    def sample_fisher(self, logits: torch.Tensor) -> None:
        r"""Record Monte-Carlo Fisher output gradients (``fisher='mc'``).

        Call after the forward pass that produced ``logits`` (shape ``(..., C)``, a categorical
        model) and before ``loss.backward()``; it is a no-op unless ``fisher='mc'`` and the coming
        ``step()`` updates the factors, so it can be called every step. It samples
        :math:`y \sim \mathrm{softmax}(\text{logits})` with a generator whose state is kept in the
        optimizer state (deterministic resume), and backpropagates the sum-reduced
        :math:`-\log p(y)` to the hooked layer outputs only (no parameter ``.grad`` is touched).
        """
        if self.param_groups[0]["fisher"] != "mc" or not self._is_factor_step():
            return
        st = self.state["kfac"]
        recs = [(n, r) for n, r in self._capture.records.items() if r.outputs]
        if not recs:
            return
        gen = torch.Generator(device=logits.device)
        if st["rng"] is None:
            gen.manual_seed(self.param_groups[0]["seed"])
        else:
            gen.set_state(st["rng"])
        flat = logits.reshape(-1, logits.shape[-1])
        with torch.no_grad():
            probs = torch.softmax(flat.detach().float(), dim=-1)
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        if self._rng_undo is None:  # a skipped step rolls the generator back to here
            self._rng_undo = [st["rng"]]
        st["rng"] = gen.get_state()
        with torch.enable_grad():
            loss = F.cross_entropy(flat, y, reduction="sum")
            outs = [o for _, r in recs for o in r.outputs]
            self._capture.paused = True  # this backward must not look like a training backward
            try:
                grads = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
            finally:
                self._capture.paused = False
        it = iter(grads)
        for _, r in recs:
            for _o in r.outputs:
                g = next(it)
                if g is not None:
                    r.mc_grads.append((g.detach(), 1.0))
            r.outputs = []

    # -- curvature ----------------------------------------------------------------------------
    def _update_factors(self, hp: dict) -> None:
        dtype = _DTYPES[hp["factor_dtype"]]
        mc = hp["fisher"] == "mc"
        for name, m in self._layers.items():
            rec = self._capture.records[name]
            grads = rec.mc_grads if mc else rec.grads
            if not rec.inputs:
                continue
            if not grads:
                if mc:
                    raise RuntimeError(
                        "fisher='mc': call opt.sample_fisher(logits) after the forward pass and "
                        "before loss.backward() on factor-update steps"
                    )
                continue
            ls = self.state["kfac"]["layers"][name]
            w, init = hp["ema_weight"], hp["factor_init"]
            ls["A"] = ema(ls.get("A"), a_factor(m, rec.inputs, dtype), w, init)
            ls["G"] = ema(ls.get("G"), g_factor(m, grads, dtype), w, init)

    def update_inverses(self) -> None:
        """Recompute every layer's damped inverse from its current factors (done by ``step``)."""
        hp = self.param_groups[0]
        for ls in self.state["kfac"]["layers"].values():
            if "A" in ls:
                ls["pre"] = compute_preconditioner(
                    ls["A"], ls["G"], hp["damping"], hp["damping_type"], hp["inverse_method"]
                )

    def _precondition(self, ls: dict, M: torch.Tensor) -> torch.Tensor:
        return inverse_mv(ls["pre"], M.to(ls["A"].dtype)).to(M.dtype)

    def _directions(self, hp: dict, guard: _nonfinite.StepGuard) -> dict:
        """Preconditioned directions ``{param: tensor}`` of the layers that have an inverse
        (``guard``: this step's drop flag, for whatever a subclass keeps from the step)."""
        dirs = {}
        for name, m in self._layers.items():
            ls = self.state["kfac"]["layers"][name]
            if "pre" in ls and m.weight.grad is not None:
                put_direction(dirs, m, self._precondition(ls, grad_matrix(m)))
        return dirs

    def _rescale(self, dirs: dict, hp: dict) -> dict:
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
    def _outer_update(self, dirs: dict, found_inf) -> None:
        """SGD-momentum or AdamW on ``dirs`` (``p.grad`` elsewhere): torch's fused steps, which
        drop the step on the device when ``found_inf`` is 1.0."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            directions = [dirs.get(p, p.grad) for p in params]
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
                    if not state:
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
    def step(self, closure=None):
        """Update factors / inverses when due, precondition, apply the outer update.

        Returns the closure's loss (evaluated under ``torch.enable_grad()``), else None. A step
        with non-finite gradients is dropped on the device; the step clock (which counts every
        call) is corrected at the next factor / inverse step, which reads the device anyway.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        guard = _nonfinite.begin_step(self)
        hp = self.param_groups[0]
        if self._is_factor_step() or self.kfac_step % hp["inverse_interval"] == 0:
            skipped = guard.skipped()  # a scheduled update: the host may read the device
            self.state["kfac"]["step"] -= _nonfinite.unseen_skips(self) - skipped
            if skipped:
                self._discard_step()
                return loss
            if not self._is_factor_step() and self._rng_undo is not None:
                self.state["kfac"]["rng"] = self._rng_undo[0]  # sampled for a foreseen factor step
        self._rng_undo = None
        try:
            if self._is_factor_step():
                self._update_factors(hp)
            if self.kfac_step % hp["inverse_interval"] == 0:
                self.update_inverses()
            dirs = self._rescale(self._directions(hp, guard), hp)
            self._outer_update(dirs, guard.found_inf)
        finally:
            self._capture.clear()
        self.state["kfac"]["step"] += 1
        self._arm_capture()
        return loss

    def _exact_clock(self) -> None:
        """state_dict pre-hook: take the steps dropped since the last scheduled update off the
        clock (reads the device)."""
        self.state["kfac"]["step"] -= _nonfinite.unseen_skips(self)

    def _discard_step(self) -> None:
        """A skipped step: drop what the hooks captured, undo this step's Fisher sampling."""
        self._capture.clear()
        if self._rng_undo is not None:
            self.state["kfac"]["rng"] = self._rng_undo[0]
            self._rng_undo = None

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("state", {}).get("kfac")
        if saved is not None and set(saved.get("layers", {})) != set(self._layers):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state dict preconditions layers "
                f"{sorted(saved.get('layers', {}))} but this model has {sorted(self._layers)}; "
                "it comes from a different model"
            )
        super().load_state_dict(state_dict)
        for name, ls in self.state["kfac"]["layers"].items():  # follow the layer's device
            device = self._layers[name].weight.device
            for key, value in ls.items():
                if isinstance(value, torch.Tensor):
                    ls[key] = value.to(device)
                elif isinstance(value, dict):
                    ls[key] = {k: v.to(device) for k, v in value.items()}
        self._rng_undo = None
        self._arm_capture()  # the loaded step decides what the next step needs
