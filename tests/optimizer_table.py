"""The conformance info table: every public orthoptim optimizer (and the variants that reach its
other code paths), how to build it on a tiny model, how to take one training step, and which
constructor inputs it must reject. Driven by tests/test_conformance.py and tests/test_fuzz.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from orthoptim import FOGO, FOP, KFAC, FOGOReference

D_IN, HIDDEN, CLASSES, BATCH = 4, 6, 3, 8


def tiny_model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).to(dtype)


def batches(n: int, seed: int = 1, dtype=torch.float64, batch: int = BATCH) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, D_IN, generator=g, dtype=torch.float64).to(dtype),
            torch.randint(0, CLASSES, (batch,), generator=g),
        )
        for _ in range(n)
    ]


@dataclass(frozen=True)
class OptInfo:
    id: str
    cls: type
    model_based: bool  # KFAC / FOP take the model; FOGO takes parameters
    kwargs: dict  # test settings: short intervals so every code path runs within a few steps
    two_pass: bool = False  # FOP's backward_two_pass training loop
    # (argument, invalid value[, text the message must show]) -> ValueError naming it
    invalid: tuple = field(default=())

    def make(self, model: nn.Module, **over):
        kw = {**self.kwargs, **over}
        if self.model_based:
            return self.cls(model, **kw)
        return self.cls(model.named_parameters(), **kw)

    def make_params(self, params, **over):
        """Param-based optimizers only: build on explicit tensors / groups."""
        return self.cls(params, **{**self.kwargs, **over})


def train_step(info: OptInfo, opt, model, x, y, corrupt=None):
    """One training step as users write it; ``corrupt(model)`` may poison the gradients."""
    if info.two_pass:
        opt.zero_grad()
        loss = opt.backward_two_pass(x, y, F.cross_entropy)
    else:
        out = model(x)
        opt.zero_grad()
        if info.model_based:
            opt.sample_fisher(out)  # no-op unless fisher='mc' on a factor step
        loss = F.cross_entropy(out, y)
        loss.backward()
    if corrupt is not None:
        corrupt(model)
    opt.step()
    return loss


_COMMON_INVALID = (
    ("lr", -1.0),
    ("lr", math.nan),
    ("weight_decay", -0.1),
    ("nonfinite", "ignore"),
)

_FOGO_INVALID = _COMMON_INVALID + (
    ("beta_slow", 1.0),
    ("beta_fast", 0.995, "0.995"),  # must be < beta_slow
    ("mix", 1.5),
    ("fusion", "cubic"),
    ("nesterov", "yes"),
    ("target_rms", 0.0),
    ("scale", "adam"),
    ("ns_steps", -1),
    ("ns_steps", 2.5),
    ("eps", 0.0),
    ("adamw_betas", (0.9, 1.0), "1.0"),
    ("adamw_eps", -1e-8),
    ("memory", "yes"),
    ("memory_budget", 0.0),
    ("memory_budget", 1.5),
    ("memory_dtype", "int8"),
    ("capacity", 0),
    ("write_rank", 0),
    ("write_interval", -1),
    ("min_age", -1),
    ("gate", "cosine"),
    ("gate_threshold", 2.0),
    ("radius", 0.0),
    ("merge_threshold", -0.1),
    ("min_energy", 2.0),
    ("eviction", "random"),
    ("overflow", "drop"),
    ("side", "both"),
    ("write_source", "weights"),
    ("sketch_dim", 0),
    ("seed", -1),
)

_KFAC_INVALID = _COMMON_INVALID + (
    ("damping", -1.0),
    ("momentum", 1.0),
    ("eps", -1.0),
    ("betas", (1.0, 0.9), "1.0"),
    ("outer", "lbfgs"),
    ("factor_interval", 0),
    ("inverse_interval", 0),
    ("ema_weight", 0.0),
    ("factor_init", "ones"),
    ("damping_type", "levenberg"),
    ("inverse_method", "qr"),
    ("fisher", "true"),
    ("factor_dtype", "float16"),
    ("kl_clip", 0.0),
    ("max_grad_norm", -1.0),
    ("seed", -1),
)

_FOP_INVALID = _KFAC_INVALID + (
    ("beta", math.inf),
    ("eta", math.nan),
    ("beta_clamp", (1.0, 0.0), "(1.0, 0.0)"),
    ("eta_clamp", (0.0,), "(0.0,)"),
)

_FOGO_KW = dict(lr=0.02, weight_decay=1e-3, write_interval=3, memory_budget=0.5)
_KFAC_KW = dict(lr=0.05, factor_interval=2, inverse_interval=2, ema_weight=0.5, weight_decay=1e-3)

OPTIMIZERS = [
    OptInfo("FOGO", FOGO, False, _FOGO_KW, invalid=_FOGO_INVALID),
    OptInfo(
        "FOGO-sign-output-slow",
        FOGO,
        False,
        dict(_FOGO_KW, gate="sign", side="output", write_source="slow", nesterov=True),
    ),  # fmt: skip
    OptInfo("FOGOReference", FOGOReference, False, _FOGO_KW, invalid=_FOGO_INVALID),
    OptInfo("KFAC", KFAC, True, _KFAC_KW, invalid=_KFAC_INVALID),
    OptInfo(
        "KFAC-mc-adamw-tikhonov",
        KFAC,
        True,
        dict(
            _KFAC_KW,
            lr=0.01,
            fisher="mc",
            outer="adamw",
            damping_type="tikhonov",
            inverse_method="eigen",
            kl_clip=1e-2,
            seed=3,
        ),
    ),  # fmt: skip
    OptInfo("FOP", FOP, True, _KFAC_KW, invalid=_FOP_INVALID),
    OptInfo("FOP-mc-two-pass", FOP, True, dict(_KFAC_KW, fisher="mc", seed=5), two_pass=True),
]
BY_ID = {info.id: info for info in OPTIMIZERS}
# The table rows that stand for each public class (validation tests run once per class).
PRIMARY = [BY_ID[k] for k in ("FOGO", "FOGOReference", "KFAC", "FOP")]
