"""The optimizers the benchmarks compare, by name: ``make_optimizer("fogo", model, {"lr": 3e-3})``.

Every entry builds a ``torch.optim.Optimizer`` for a model from a flat, JSON-serialisable dict of
hyperparameters (JSON lists become tuples). Its defaults are the code defaults of the class it
wraps (untuned); tuned values per task live in ``configs/hparams.json``
(:mod:`orthoptim.benchmarks.hparams`). The final learning rate is
``hparams["lr"] * entry.lr_multiplier * lr_scale``.

Built-in optimizers:

* ``sgd``, ``adamw``: torch's (SGD with momentum 0.9).
* ``muon``: Muon on the hidden matrices, AdamW (same lr and weight decay) on embeddings, the head
  and every tensor with ndim < 2, routed by :func:`orthoptim.param_groups`. It is FOGO's exact
  Muon mode (one momentum stream, beta 0.95, Nesterov, no memory) with ``scale="muon"``: the step
  is ``lr * 0.2 * sqrt(max(m, n)) * NS(M)``, torch's ``adjust_lr_fn="match_rms_adamw"``. That is
  the scale that makes an AdamW learning rate transfer (the step RMS is about ``0.2 lr``, AdamW's
  typical update RMS), so muon shares the lr scale of adamw and fogo; we keep torch's rule rather
  than FOGO's exact RMS (``scale="rms"``) so that ``muon`` *is* Muon. Newton-Schulz runs in
  float32: on CPU torch's bfloat16 matmuls are several times slower than float32, and results then
  do not depend on the device. ``muon-bf16`` runs it in bfloat16 and is bitwise
  ``torch.optim.Muon`` + ``torch.optim.AdamW(fused=True)`` (the tests check both).
* ``fogo``: FOGO at its defaults (memory on), Newton-Schulz in float32 as in
  ``scripts/fogo_evidence.py``; ``fogo-nomem``: the same without the memory. FOGO's RMS-0.2
  step shares AdamW's lr.
* ``kfac``, ``fop``: K-FAC and FOP (their lr is an SGD-outer lr, not on AdamW's scale).
  ``kfac-2x``: K-FAC at twice the lr and half the (coupled) weight decay, the fair baseline for FOP,
  whose step is K-FAC's at 2x lr when the two half-batches agree (docs/fop.md). Coverage
  controls at K-FAC's lr: ``kfac-noattn`` leaves attention's matrices to the plain update (what
  K-FAC preconditioned in a model built from ``nn.MultiheadAttention`` before the layer
  adapters: their hooks never fired), ``kfac-patch-head`` preconditions only what is not in a
  transformer layer (a ViT's patch convolution and head). A model may name parameters that are
  plain on purpose in a ``kfac_exclude`` attribute (the ViT's positional embedding).

Peers: every optimizer of the ``pytorch_optimizer`` package, by its lowercase name, when the package
imports (built-in names win on clashes: ``sgd``, ``adamw``, ``muon``). A peer is built over
``model.parameters()`` with the given kwargs; keys its constructor does not name are rejected even
where it would swallow them in ``**kwargs``. Checked in the benchmark loop: lion, adabelief, adan,
adamp and spam work as is (spam resets its moments every ``update_proj_gap=500`` steps, with a
``warmup_epoch=50``-step warm-up after each reset). Peers that need more than ``step()`` after
``loss.backward()`` say so in their description (:data:`PEER_NOTES`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orthoptim.optim.fogo import FOGO
from orthoptim.optim.fop import FOP
from orthoptim.optim.kfac import KFAC
from orthoptim.optim.param_groups import param_groups

__all__ = [
    "OptimizerEntry",
    "PEER_NOTES",
    "list_optimizers",
    "get_optimizer",
    "make_optimizer",
]

KINDS = ("builtin", "peer")

# Peers that cannot run as `loss.backward(); opt.step()` on model.parameters() (checked with
# pytorch_optimizer 4.1 on a small MLP).
PEER_NOTES = {
    "adahessian": "needs loss.backward(create_graph=True)",
    "sophiah": "needs loss.backward(create_graph=True)",
    "alig": "needs step(closure)",
    "lbfgs": "needs step(closure)",
    "bsam": "needs num_data=... and step(closure)",
    "ranger21": "needs num_iterations=...",
    "lomo": "fused backward: needs its own training loop",
    "adalomo": "fused backward: needs its own training loop",
    "adammini": "takes the model and needs its own parameter naming",
    "adago": "needs Muon-style param groups (use_muon)",
    "adamuon": "needs Muon-style param groups (use_muon)",
    "distributedmuon": "needs Muon-style param groups (use_muon) and torch.distributed",
    "muonclip": "needs Muon-style param groups (use_muon)",
    "normuon": "needs Muon-style param groups (use_muon)",
    "spectralsphere": "only 2-D parameters",
    "demo": "needs the einops package",
}


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer of the registry.

    Attributes:
        name: registry name (lowercase).
        description: one line for ``orthoptim list optimizers``.
        build: ``build(model, **hparams) -> Optimizer``; receives the final lr.
        defaults: code-default hyperparameters (JSON values); the user's hparams override them.
        lr_multiplier: factor applied to the lr (2.0 for ``kfac-2x``).
        kind: ``"builtin"`` or ``"peer"``.
        keys: every hyperparameter name ``build`` accepts.
        data_parallel: whether the optimizer is correct on a DDP-wrapped model (every rank steps
            and reaches the same parameters); the launcher refuses one that is not under
            ``torchrun``. Every built-in is: the first-order ones step on DDP's averaged
            gradient, K-FAC and FOP reduce their factors (and FOP's half-gradient difference)
            themselves (docs/distributed.md).
    """

    name: str
    description: str
    build: Callable[..., torch.optim.Optimizer] = field(repr=False)
    defaults: Mapping[str, Any]
    lr_multiplier: float = 1.0
    kind: str = "builtin"
    keys: frozenset[str] = frozenset()
    data_parallel: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Invalid kind: {self.kind!r}; expected one of {KINDS}")
        unknown = sorted(set(self.defaults) - self.keys)
        if unknown:
            raise ValueError(f"Invalid defaults of {self.name!r}: unknown key(s) {unknown}")

    def check(self, hparams: Mapping[str, Any]) -> None:
        """ValueError naming the key and this optimizer for a hyperparameter it does not take."""
        unknown = sorted(set(hparams) - self.keys)
        if unknown:
            close = {k: difflib.get_close_matches(k, self.keys, n=1) for k in unknown}
            hints = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
            raise ValueError(
                f"Invalid hyperparameter(s) {unknown} for optimizer {self.name!r}"
                + (f" ({hints})" if hints else "")
                + f"; it takes {sorted(self.keys)}"
            )


def _kwargs_of(fn: Callable, skip: tuple[str, ...] = ()) -> frozenset[str]:
    """Named keyword arguments of ``fn`` (no ``self``, no ``*args`` / ``**kwargs``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind in kinds and p.name not in ("self", *skip))


def _tuples(hparams: Mapping[str, Any]) -> dict[str, Any]:
    # JSON has no tuples; constructors validate betas and clamps as tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}


def _routed(model: nn.Module, build: Callable[[list], torch.optim.Optimizer]):
    """Build over ``orthoptim.param_groups(model)``; keep its routing note on ``opt.routing``.

    The note (which tensors went to AdamW) is the same for every run of a task: as a warning it
    is noise in a benchmark log. Any other warning (no module named like a head) is re-emitted.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = param_groups(model)
    notes = []
    for w in caught:
        if str(w.message).startswith("param_groups: AdamW for"):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    opt = build(groups)
    opt.routing = "; ".join(notes)
    return opt


# FOGO keys that only matter with the memory on, or with two streams.
_MEMORY_KEYS = frozenset(
    ("memory_budget", "memory_dtype", "capacity", "write_rank", "write_interval", "min_age",
     "gate", "gate_threshold", "radius", "merge_threshold", "min_energy", "eviction", "side",
     "layout", "write_source", "sketch_dim", "seed", "protection", "kron_strength", "kron_sides",
     "kron_online")
)  # fmt: skip
_DUAL_KEYS = frozenset(("beta_fast", "mix", "fusion"))
_FOGO_KEYS = _kwargs_of(FOGO.__init__, skip=("params",))
_MUON_MODE = dict(dual_stream=False, memory=False, nesterov=True, scale="muon")


def _fogo_builder(fixed: dict[str, Any]):
    def build(model: nn.Module, **hp):
        return _routed(model, lambda groups: FOGO(groups, **{**_tuples(hp), **fixed}))

    return build


_NO_ATTENTION = ("*self_attn*", "*attn.in_proj*", "*attn.out_proj*")
_PATCH_HEAD = (*_NO_ATTENTION, "*linear1*", "*linear2*")


def _kfac_builder(cls: type, wd_factor: float = 1.0, exclude: tuple[str, ...] = ()):
    def build(model: nn.Module, **hp):
        hp = _tuples(hp)
        if "weight_decay" in hp:
            hp["weight_decay"] = hp["weight_decay"] * wd_factor
        plain = (*exclude, *getattr(model, "kfac_exclude", ()), *hp.pop("exclude", ()))
        return cls(model, exclude=plain, **hp)

    return build


def _torch_builder(cls: type):
    def build(model: nn.Module, **hp):
        return cls(model.parameters(), **_tuples(hp))

    return build


def _builtins() -> dict[str, OptimizerEntry]:
    kfac_keys = _kwargs_of(KFAC.__init__, skip=("params",))
    fop_keys = kfac_keys | _kwargs_of(FOP.__init__, skip=("params",))
    kfac_defaults = {"lr": 0.1, "damping": 1e-2, "momentum": 0.9, "weight_decay": 0.0}
    # Not "momentum": FOGO's scheduler knob (beta_slow and AdamW's beta1 at once) is not what
    # torch.optim.Muon calls momentum; a Muon config names beta_slow.
    muon_keys = _FOGO_KEYS - _MEMORY_KEYS - _DUAL_KEYS - set(_MUON_MODE) - {"ns_dtype", "momentum"}
    # torch.optim.Muon's code defaults (lr 1e-3, weight decay 0.1, momentum 0.95).
    muon_defaults = {"lr": 1e-3, "weight_decay": 0.1, "beta_slow": 0.95}
    entries = [
        OptimizerEntry(
            "sgd", "torch SGD, momentum 0.9", _torch_builder(torch.optim.SGD),
            {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
            keys=_kwargs_of(torch.optim.SGD.__init__, skip=("params",)),
        ),
        OptimizerEntry(
            "adamw", "torch AdamW", _torch_builder(torch.optim.AdamW),
            {"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8},
            keys=_kwargs_of(torch.optim.AdamW.__init__, skip=("params",)),
        ),
        OptimizerEntry(
            "muon", "Muon (float32 Newton-Schulz) on hidden matrices + AdamW on the rest",
            _fogo_builder({**_MUON_MODE, "ns_dtype": "float32"}), muon_defaults, keys=muon_keys,
        ),
        OptimizerEntry(
            "muon-bf16", "Muon as torch.optim.Muon (bfloat16 Newton-Schulz) + AdamW on the rest",
            _fogo_builder({**_MUON_MODE, "ns_dtype": "bfloat16"}), muon_defaults, keys=muon_keys,
        ),
        OptimizerEntry(
            "fogo", "FOGO: dual-stream orthogonalized momentum + subspace memory",
            _fogo_builder({}), {"lr": 1e-3, "weight_decay": 0.0, "ns_dtype": "float32"},
            keys=_FOGO_KEYS,
        ),
        OptimizerEntry(
            "fogo-nomem", "FOGO without the memory (dual-stream orthogonalized momentum)",
            _fogo_builder({"memory": False}),
            {"lr": 1e-3, "weight_decay": 0.0, "ns_dtype": "float32"},
            keys=_FOGO_KEYS - _MEMORY_KEYS - {"memory"},
        ),
        OptimizerEntry(
            "kfac", "K-FAC natural gradient (SGD outer)", _kfac_builder(KFAC), kfac_defaults,
            keys=kfac_keys,
        ),
        OptimizerEntry(
            "kfac-2x", "K-FAC at 2x lr and half weight decay: FOP's fair baseline",
            _kfac_builder(KFAC, wd_factor=0.5), kfac_defaults, lr_multiplier=2.0, keys=kfac_keys,
        ),
        OptimizerEntry(
            "fop", "FOP: Fisher-orthogonal projection on K-FAC", _kfac_builder(FOP),
            kfac_defaults, keys=fop_keys,
        ),
        OptimizerEntry(
            "kfac-noattn", "K-FAC with attention left to the plain update (the old coverage)",
            _kfac_builder(KFAC, exclude=_NO_ATTENTION), kfac_defaults, keys=kfac_keys,
        ),
        OptimizerEntry(
            "kfac-patch-head", "K-FAC on the layers outside transformer blocks only",
            _kfac_builder(KFAC, exclude=_PATCH_HEAD), kfac_defaults, keys=kfac_keys,
        ),
    ]  # fmt: skip
    return {e.name: e for e in entries}


BUILTINS: dict[str, OptimizerEntry] = _builtins()


@functools.lru_cache(maxsize=1)
def _peer_names() -> tuple[str, ...]:
    try:
        import pytorch_optimizer
    except ImportError:
        return ()
    names = {n.lower() for n in pytorch_optimizer.get_supported_optimizers()}
    return tuple(sorted(names - set(BUILTINS)))


@functools.cache
def _peer_entry(name: str) -> OptimizerEntry:
    import pytorch_optimizer

    cls = pytorch_optimizer.load_optimizer(name)
    sig = inspect.signature(cls.__init__).parameters
    first = next(p for p in sig if p != "self")
    keys = _kwargs_of(cls.__init__, skip=(first,))
    defaults = {}
    for key in ("lr", "weight_decay"):
        default = sig[key].default if key in sig else inspect.Parameter.empty
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            defaults[key] = float(default)

    def build(model: nn.Module, **hp):
        # lomo / adalomo / adammini take the model itself.
        return cls(model if first == "model" else model.parameters(), **_tuples(hp))

    note = PEER_NOTES.get(name)
    desc = f"{cls.__name__} from pytorch_optimizer" + (f" ({note})" if note else "")
    return OptimizerEntry(name, desc, build, defaults, kind="peer", keys=keys)


def list_optimizers(include_peers: bool = True) -> list[str]:
    """Registry names: built-ins in a fixed order, then (if ``include_peers`` and
    ``pytorch_optimizer`` imports) its optimizers, sorted.

    Args:
        include_peers: also list the ``pytorch_optimizer`` peers.
    """
    return list(BUILTINS) + (list(_peer_names()) if include_peers else [])


def get_optimizer(name: str) -> OptimizerEntry:
    """The entry called ``name``; an unknown name raises ValueError with the closest matches.

    Args:
        name: a name from :func:`list_optimizers`.
    """
    if name in BUILTINS:
        return BUILTINS[name]
    if isinstance(name, str) and name in _peer_names():
        return _peer_entry(name)
    known = list_optimizers()
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if not _peer_names():
        hint += " (peers need the pytorch-optimizer package: pip install orthoptim[peers])"
    raise ValueError(f"Invalid optimizer: {name!r}{hint} (see `orthoptim list optimizers`)")


def make_optimizer(
    name: str,
    model: nn.Module,
    hparams: Mapping[str, Any] | None = None,
    lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``.

    Args:
        name: registry name (see :func:`list_optimizers`).
        model: the model to train.
        hparams: hyperparameters overriding the entry's defaults (JSON values; lists become
            tuples). Unknown keys raise ValueError naming the key and the optimizer.
        lr_scale: extra lr factor (> 0), e.g. a task's linear batch-size scaling.

    Returns:
        The optimizer, with lr ``hparams["lr"] * lr_multiplier * lr_scale``.
    """
    entry = get_optimizer(name)
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__}; expected an nn.Module")
    hparams = dict(hparams or {})
    entry.check(hparams)
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)):
        raise ValueError(f"Invalid lr_scale: {lr_scale!r}; expected a number > 0")
    if not (math.isfinite(lr_scale) and lr_scale > 0):
        raise ValueError(f"Invalid lr_scale: {lr_scale!r}; expected a finite number > 0")
    hp = {**entry.defaults, **hparams}
    factor = entry.lr_multiplier * lr_scale
    if "lr" in hp:
        lr = hp["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"Invalid lr: {lr!r} for optimizer {name!r}; expected a number >= 0")
        hp["lr"] = lr * factor
    elif factor != 1.0:
        raise ValueError(f"Invalid lr_scale: {lr_scale!r}; optimizer {name!r} has no lr to scale")
    return entry.build(model, **hp)
