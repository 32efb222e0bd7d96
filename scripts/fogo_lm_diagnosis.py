"""Where FOGO forgets on ``lm-continual``, and what its memory holds there (docs/fogo.md, section 10).

Runs the ``lm-continual`` paper preset (char GPT: Tiny Shakespeare 300 steps, then stdlib source
100, then pydoc help text 100; the task's own stage loop, schedule and evaluation) with FOGO at
the tuned lr and one of the named CONFIGS, and records per run (one JSON line in ``--out``):

* the loss matrix and the task's metrics (forgetting, learning loss, average final loss);
* per FOGO matrix (kinds: qkv = ``attn.c_attn``, attn_out = ``attn.c_proj``, mlp_in =
  ``mlp.c_fc``, mlp_out = ``mlp.c_proj``), for every stage: the spectrum of the stage's layer
  inputs (covariance C_x = sum x x^T over the stage's tokens), of its output gradients
  (C_d = sum d d^T, d = dLoss/d(layer output)) and of its weight gradients (sum G^T G, G G^T):
  effective rank (participation ratio) and the ranks that hold 90% / 99% of the energy; the pool
  rank R of the memory, the rank it holds at the end of the stage and the share of the stage's
  C_x, sum G^T G (input side) or C_d, sum G G^T (output side) energy the stored basis captures,
  against the best any rank-R subspace could capture;
* per stage and kind, how often the memory gates (steps with at least one entry in conflict /
  steps with a ready entry), the correction ratio ||U* - O|| / ||O||, write outcomes and new
  stretches detected (task-agnostic boundary detection);
* the damage on stage-1 inputs, tr(dW C_x1 dW^T) / tr(W1 C_x1 W1^T) with dW = W_final - W1;
* restoration: the Shakespeare loss after the last stage with one group of parameters put back
  to its value at the end of stage 1 (how much of the forgetting that group's drift carries).

    python scripts/fogo_lm_diagnosis.py --data-dir ../shared/data --configs nomem aware \
        agnostic --seeds 0
    python scripts/fogo_lm_diagnosis.py --summarize --out runs/fogo_lm

One thread per process (``torch.set_num_threads(1)``); runs already in ``--out`` are skipped.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from orthoptim import FOGO, param_groups
from orthoptim.benchmarks import hparams as hparams_module
from orthoptim.benchmarks.gpt import GPT
from orthoptim.benchmarks.tasks import lm
from orthoptim.benchmarks.train import seeded
from orthoptim.memory import bucket as memory_bucket
from orthoptim.memory import codebook, kronecker
from orthoptim.optim import _fogo_math

KINDS = {
    "attn.c_attn": "qkv",
    "attn.c_proj": "attn_out",
    "mlp.c_fc": "mlp_in",
    "mlp.c_proj": "mlp_out",
}
MATRIX_KINDS = tuple(KINDS.values())
# The output head (tied to the token embedding; on AdamW): probed like a matrix, kind "head".
KINDS["lm_head"] = "head"
# Parameter groups for freezing and restoration (AdamW-routed ones first).
GROUPS = ("wte", "wpe", "ln", "bias", *MATRIX_KINDS, "blocks", "adamw", "all")

# name -> dict(fogo=FOGO kwargs, aware=task-aware, freeze=groups frozen after stage 1,
#              kinds={kind: group overrides} (one FOGO group per kind), optimizer="fogo"/"adamw")
CONFIGS: dict[str, dict] = {
    "adamw": dict(optimizer="adamw", fogo={}),
    # the honest control for AdamW: its own lr curve (tuned lr 0.003162)
    **{f"adamw_lr{_lr}": dict(optimizer="adamw", fogo={}, adamw=dict(lr=_lr))
       for _lr in (0.001, 0.0018, 0.0056, 0.01)},  # fmt: skip
    "nomem": dict(fogo=dict(memory=False)),
    "aware": dict(fogo=dict(), aware=True),
    "agnostic": dict(fogo=dict()),
}
for _g in GROUPS[:-1]:
    CONFIGS[f"nomem_freeze_{_g}"] = dict(fogo=dict(memory=False), freeze=(_g,))
for _k in MATRIX_KINDS:
    # the memory on one kind of matrix only (task-aware)
    CONFIGS[f"aware_only_{_k}"] = dict(
        fogo=dict(), aware=True,
        kinds={k: dict(memory=k == _k) for k in MATRIX_KINDS},
    )  # fmt: skip
for _b in (0.2, 0.5):
    CONFIGS[f"aware_b{_b}"] = dict(fogo=dict(memory_budget=_b), aware=True)
for _r in (8, 16, 32, 64):
    # oracle: the top-r eigenvectors of stage 1's layer-input covariance, hard-protected
    CONFIGS[f"oracle_x{_r}"] = dict(fogo=dict(memory=False), oracle=dict(rank=_r))
    # output side for every matrix (C_d, the output-gradient covariance)
    CONFIGS[f"oracle_d{_r}"] = dict(fogo=dict(memory=False), oracle=dict(rank=_r, side="output"))
for _lr in (0.014, 0.007, 0.005, 0.003, 0.002):
    # the honest control: a lower lr also forgets less (and learns less)
    CONFIGS[f"nomem_lr{_lr}"] = dict(fogo=dict(memory=False, lr=_lr))
for _r in (32, 64):
    # the same from the optimizer's own statistic, the stage's weight-gradient Gram sum G^T G
    CONFIGS[f"oracle_g{_r}"] = dict(
        fogo=dict(memory=False), oracle=dict(rank=_r, source={"input": "gtg"})
    )  # fmt: skip
    # input side for qkv, attn_out and mlp_in, output side (the residual stream) for mlp_out
    CONFIGS[f"oracle_res{_r}"] = dict(
        fogo=dict(memory=False), oracle=dict(rank=_r, side={"mlp_out": "output"})
    )  # fmt: skip
for _r in (8, 32):
    # the head (tied to the token embedding, AdamW): its input side is the final hidden state
    CONFIGS[f"oracle_head{_r}"] = dict(
        fogo=dict(memory=False), oracle=dict(rank=_r, kinds=("head",))
    )
for _kappa in (1, 10):
    for _side in ("input", "both"):
        CONFIGS[f"oracle_soft_{_side}_k{_kappa}"] = dict(
            fogo=dict(memory=False), oracle=dict(kappa=_kappa, side=_side, rank=0)
        )
for _lr in (0.003, 0.001):
    CONFIGS[f"nomem_adamwlr{_lr}"] = dict(fogo=dict(memory=False), adamw_lr=_lr)
for _kappa in (30, 100):
    CONFIGS[f"oracle_soft_both_k{_kappa}"] = dict(
        fogo=dict(memory=False), oracle=dict(kappa=_kappa, side="both", rank=0)
    )
for _r in (8, 16, 32):
    CONFIGS[f"oracle_soft_both_k10_r{_r}"] = dict(
        fogo=dict(memory=False), oracle=dict(kappa=10, side="both", rank=0, soft_rank=_r)
    )
for _kappa in (10, 100):
    CONFIGS[f"oracle_diag_both_k{_kappa}"] = dict(
        fogo=dict(memory=False), oracle=dict(kappa=_kappa, side="both", rank=0, diagonal=True)
    )
    CONFIGS[f"oracle_diag_both_k{_kappa}_grad"] = dict(
        fogo=dict(memory=False),
        oracle=dict(kappa=_kappa, side="both", rank=0, diagonal=True, grad=True),
    )
for _kappa in (1, 10, 100):
    CONFIGS[f"oracle_kron_k{_kappa}_grad"] = dict(
        fogo=dict(memory=False), oracle=dict(kappa=_kappa, kron=True, grad=True, rank=0)
    )
for _grad in (False, True):
    CONFIGS["oracle_lrd8_both_k10" + "_grad" * _grad] = dict(
        fogo=dict(memory=False),
        oracle=dict(kappa=10, side="both", rank=0, soft_rank=8, diagonal=True, grad=_grad),
    )
CONFIGS["oracle_soft_both_k10_head"] = dict(
    fogo=dict(memory=False),
    oracle=dict(kappa=10, side="both", rank=0, kinds=(*MATRIX_KINDS, "head")),
)
# the residual-stream side of every block matrix (input of qkv, attn_out, mlp_in; output of
# mlp_out) and the head (tied embedding) on both sides
_RES = {"qkv": "input", "attn_out": "input", "mlp_in": "input", "mlp_out": "output"}
_ALL = (*MATRIX_KINDS, "head")
CONFIGS["oracle_soft_res_k10_head"] = dict(
    fogo=dict(memory=False), oracle=dict(kappa=10, side=_RES, rank=0, kinds=_ALL)
)
CONFIGS["oracle_soft_res_k10_grad_head"] = dict(
    fogo=dict(memory=False), oracle=dict(kappa=10, side=_RES, rank=0, kinds=_ALL, grad=True)
)
CONFIGS["oracle_soft_head_k10"] = dict(
    fogo=dict(memory=False), oracle=dict(kappa=10, side="both", rank=0, kinds=("head",))
)
CONFIGS["oracle_soft_both_k10_grad_head"] = dict(
    fogo=dict(memory=False), oracle=dict(kappa=10, side="both", rank=0, kinds=_ALL, grad=True)
)
# the head's vocabulary side as a diagonal (per-token energies: what a 50k vocabulary allows)
CONFIGS["oracle_soft_both_k10_headdiag"] = dict(
    fogo=dict(memory=False),
    oracle=dict(kappa=10, side="both", rank=0, kinds=_ALL, diagonal=("output",)),
)
# full factor on the residual side, a diagonal (per-unit energies) on the other side, and on
# the vocabulary side of the head: memory ~ the residual side's d x d per matrix
_LARGER = {"qkv": ("output",), "attn_out": ("output",), "mlp_in": ("output",),
           "mlp_out": ("input",), "head": ("output",)}  # fmt: skip
for _grad in (False, True):
    CONFIGS["oracle_soft_resdiag_k10_head" + "_grad" * _grad] = dict(
        fogo=dict(memory=False),
        oracle=dict(kappa=10, side="both", rank=0, kinds=_ALL, diagonal=_LARGER, grad=_grad),
    )
CONFIGS["oracle_soft_both_k10_grad"] = dict(
    fogo=dict(memory=False), oracle=dict(kappa=10, side="both", rank=0, grad=True)
)
for _share in (0.75, 0.9):
    # GPM-like: everything but the stage's least-used input directions
    CONFIGS[f"oracle_x{_share}"] = dict(fogo=dict(memory=False), oracle=dict(rank=_share))
    CONFIGS[f"oracle_xg{_share}"] = dict(
        fogo=dict(memory=False), oracle=dict(rank=_share, source={"input": "gtg"})
    )
# (The stretch-summary prototype configs aware_v8_* / agnostic_v8_* were measured at commit
# 9de448b of branch memory-prototype; that prototype is not in the library.)
# protection="kronecker" (issue 15): Kronecker-factored soft protection from the optimizer's own
# gradient Grams (smaller side of every block matrix, features of the tied embedding / head).
for _kappa in (3.0, 10.0, 30.0):
    for _sides in ("smaller", "mixed", "both"):
        CONFIGS[f"aware_kron_{_sides}_k{_kappa:g}"] = dict(
            fogo=dict(protection="kronecker", kron_strength=_kappa, kron_sides=_sides),
            aware=True,
        )
for _rank in (16, 32, 64):
    # what a memory of d x f numbers per side would hold (kronecker.keep_free at consolidation)
    CONFIGS[f"aware_kron_smaller_k10_free{_rank}"] = dict(
        fogo=dict(protection="kronecker"), aware=True, kron_rank=_rank
    )
for _gamma in (0.5, 0.9):
    CONFIGS[f"agnostic_kron_smaller_online{_gamma}"] = dict(
        fogo=dict(protection="kronecker", kron_online=_gamma)
    )
# Shared factors (issue 15, prototype emulation): every whole protected side of dimension d
# (the residual stream) damped by one preconditioner built from the sum of the sides' Grams,
# each normalised to mean eigenvalue 1 ("norm"), plain ("sum"), or every step's Gram
# normalised to unit trace ("step"). Emulated over the per-matrix code (see ``SharedEmulation``).
for _kappa in (3.0, 10.0, 30.0):
    for _weight in ("norm", "sum", "step"):
        CONFIGS[f"aware_kshare_{_weight}_k{_kappa:g}"] = dict(
            fogo=dict(protection="kronecker", kron_strength=_kappa), aware=True,
            share=_weight,
        )  # fmt: skip
    # one factor per kind (matrix shape and side) instead of one for the whole model
    CONFIGS[f"aware_kshare_kind_k{_kappa:g}"] = dict(
        fogo=dict(protection="kronecker", kron_strength=_kappa), aware=True, share="norm",
        share_by="kind",
    )  # fmt: skip
# The library's shared factors (kron_share="model", plain sum) and its task-agnostic boundary
# detection (kron_detect = growth of the step's gradient energy)
for _kappa in (3.0, 10.0, 30.0):
    CONFIGS[f"aware_kshare_model_k{_kappa:g}"] = dict(
        fogo=dict(protection="kronecker", kron_share="model", kron_strength=_kappa), aware=True
    )
    for _growth in (1.5, 1.3, 2.0):
        CONFIGS[f"agnostic_kshare_model_k{_kappa:g}_detect{_growth:g}"] = dict(
            fogo=dict(protection="kronecker", kron_share="model", kron_strength=_kappa,
                      kron_detect=_growth),
        )  # fmt: skip
# attn_out's input side (per-head attention values) is no residual stream: its normalised
# Grams are nearly orthogonal across layers (cosine 0.02-0.07), so it shares its output side
# (the residual write, as mlp_out's smaller side does)
_RESIDUAL = {"attn_out": dict(kron_sides="output")}
CONFIGS["aware_kshare_model_k10_res"] = dict(
    fogo=dict(protection="kronecker", kron_share="model"), aware=True, kinds=_RESIDUAL
)
CONFIGS["agnostic_kshare_model_k10_detect1.5_res"] = dict(
    fogo=dict(protection="kronecker", kron_share="model", kron_detect=1.5), kinds=_RESIDUAL
)
CONFIGS["aware_output"] = dict(fogo=dict(side="output"), aware=True)
CONFIGS["aware_output_b0.2"] = dict(fogo=dict(side="output", memory_budget=0.2), aware=True)


def kind_of(name: str) -> str | None:
    for suffix, kind in KINDS.items():
        if name.endswith(suffix + ".weight"):
            return kind
    return None


def group_of(name: str, p: torch.Tensor) -> str:
    if "wte" in name or "lm_head" in name:
        return "wte"
    if "wpe" in name:
        return "wpe"
    if ".ln_" in name or "ln_f" in name:
        return "ln"
    if name.endswith(".bias"):
        return "bias"
    return kind_of(name) or "other"


def in_group(group: str, name: str, p: torch.Tensor) -> bool:
    g = group_of(name, p)
    if group == "blocks":
        return g in MATRIX_KINDS
    if group == "adamw":
        return g not in MATRIX_KINDS
    return group == "all" or g == group


def tuned_hparams(optimizer: str) -> dict:
    hp, _ = hparams_module.load_hparams().lookup("lm-continual", optimizer)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hp.items()}


def build_optimizer(model: GPT, config: dict) -> torch.optim.Optimizer:
    if config.get("optimizer") == "adamw":
        hp = {**tuned_hparams("adamw"), **config.get("adamw", {})}
        return torch.optim.AdamW(model.parameters(), **hp)
    hp = {**tuned_hparams("fogo"), **config["fogo"]}
    groups = param_groups(model, verbose=False)
    kinds = config.get("kinds")
    if kinds:
        names = {id(p): n for n, p in model.named_parameters()}
        fogo_group, rest = groups[0], groups[1:]
        split = collections.defaultdict(list)
        for p in fogo_group["params"]:
            split[kind_of(names[id(p)])].append(p)
        groups = [{"params": split[k], "algorithm": "fogo", **kinds.get(k, {})} for k in split]
        groups += rest
    if "adamw_lr" in config:  # the AdamW-routed parameters at their own lr
        for g in groups:
            if g["algorithm"] == "adamw":
                g["lr"] = config["adamw_lr"]
    return FOGO(groups, **hp)


# ------------------------------------------------------------------------------ spectra


def spectrum(c: torch.Tensor) -> dict:
    """Participation ratio and the ranks holding 90% / 99% of the energy of a PSD matrix."""
    ev = torch.linalg.eigvalsh(c.double()).flip(0).clamp(min=0)
    total = float(ev.sum())
    if total <= 0:
        return dict(pr=0.0, k90=0, k99=0, dim=c.shape[0])
    cum = ev.cumsum(0) / total
    return dict(
        pr=total**2 / float(ev.square().sum()),
        k90=int((cum < 0.90).sum()) + 1,
        k99=int((cum < 0.99).sum()) + 1,
        dim=c.shape[0],
    )


def captured(basis: torch.Tensor, c: torch.Tensor) -> float:
    """Share tr(V^T C V) / tr(C) of C's energy in span(V) (V orthonormalised first)."""
    if basis.shape[1] == 0:
        return 0.0
    q = torch.linalg.qr(basis.double()).Q
    return float(torch.trace(q.mT @ c.double() @ q) / torch.trace(c.double()).clamp(min=1e-300))


def best_captured(c: torch.Tensor, rank: int) -> float:
    ev = torch.linalg.eigvalsh(c.double()).flip(0).clamp(min=0)
    return float(ev[:rank].sum() / ev.sum().clamp(min=1e-300))


class Probe:
    """Forward/backward hooks and optimizer hooks that record what the module docstring lists."""

    def __init__(self, model: GPT, opt: torch.optim.Optimizer):
        self.model, self.opt = model, opt
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.modules = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and kind_of(name + ".weight"):
                self.modules[name] = module
                module.register_forward_pre_hook(self._fwd(name))
                module.register_full_backward_hook(self._bwd(name))
        self.stage = 0
        self.cov = collections.defaultdict(lambda: None)  # (stage, name, what) -> matrix
        self.gates = collections.Counter()  # (stage, kind, what) -> count
        self.ratios = collections.defaultdict(list)  # (stage, kind) -> correction ratios
        self.writes = collections.Counter()  # (stage, kind, outcome)
        self.stretches = collections.Counter()  # (stage, kind)
        self.signals = []  # (stage, kind, step, profile cosine, energy growth) at every write
        self.energy = []  # per step: [stage, gradient energy of each kind (sum over blocks)]
        self.novelty = []  # per step: [stage, input-side novelty of each kind (mean)]
        self.hist, self.whiten, self.steps = {}, {}, 0
        if isinstance(opt, FOGO):
            opt.register_step_pre_hook(lambda o, a, k: self._grads())
            opt.register_step_post_hook(lambda o, a, k: self._stats())
        self._wrap_fogo()

    def _add(self, key, mat):
        mat = mat.double()
        self.cov[key] = mat if self.cov[key] is None else self.cov[key] + mat

    def _fwd(self, name):
        def hook(module, args):
            if module.training:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                self._add((self.stage, name, "x"), x.mT @ x)

        return hook

    def _bwd(self, name):
        def hook(module, grad_in, grad_out):
            d = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).float()
            self._add((self.stage, name, "d"), d.mT @ d)

        return hook

    def _grads(self):
        energy = collections.defaultdict(float)
        novelty = collections.defaultdict(list)
        self.steps += 1
        for name, module in self.modules.items():
            g = module.weight.grad
            kind = kind_of(name + ".weight")
            if g is None or kind not in MATRIX_KINDS:
                continue
            energy[kind] += float(g.double().square().sum())
            if g.shape[1] > 128:
                continue
            # novelty of this step's input-side energy against the Gram of all earlier steps:
            # tr(G (C_hat + eps I)^-1 G^T) / ||G||^2, C_hat normalised to mean eigenvalue 1
            if name in self.whiten:
                gd = g.double()
                novelty[kind].append(
                    float((gd @ self.whiten[name]).square().sum() / gd.square().sum())
                )
            hist = self.hist.get(name)
            self.hist[name] = g.double().mT @ g.double() + (0 if hist is None else hist)
            if self.steps % 10 == 1:
                c = self.hist[name] / (torch.trace(self.hist[name]) / g.shape[1])
                ev, evec = torch.linalg.eigh(c)
                self.whiten[name] = evec * (ev.clamp(min=0) + 1e-2).rsqrt()
        self.energy.append([self.stage, *(energy[k] for k in MATRIX_KINDS)])
        self.novelty.append(
            [self.stage, *(float(np.mean(novelty[k])) if novelty[k] else 0.0 for k in MATRIX_KINDS)]
        )
        for name, module in self.modules.items():
            g = module.weight.grad
            if g is not None:
                self._add((self.stage, name, "gtg"), g.mT @ g)
                self._add((self.stage, name, "ggt"), g @ g.mT)

    def _stats(self):
        for name, module in self.modules.items():
            state = self.opt.state.get(module.weight, {})
            stats = state.get("last_stats")
            if stats is None or module.weight.grad is None:
                continue
            kind = kind_of(name + ".weight")
            if int(stats["ready"]) > 0:
                self.gates[(self.stage, kind, "ready")] += 1
                self.gates[(self.stage, kind, "gated")] += int(int(stats["conflicts"]) > 0)
            self.ratios[(self.stage, kind)].append(float(stats["correction_ratio"]))

    def _wrap_fogo(self):
        """Log every codebook write (outcome) and stretch test (signals, new stretches)."""
        probe = self
        write, new_stretch = memory_bucket.MemoryBucket.write, memory_bucket.new_stretch

        def name_of(state) -> str:
            for p, st in probe.opt.state.items():
                if st is state:
                    return probe.names.get(id(p), "")
            return ""

        def logged_write(bucket, i, slow, step, kind):
            out = write(bucket, i, slow, step, kind)
            probe.writes[(probe.stage, kind_of(name_of(bucket.states[i])), out)] += 1
            return out

        def logged_new_stretch(state, config, kind):
            kind_name = kind_of(name_of(state))
            if "row_energy" in state:
                last, energy = state["last_profile"], state["row_energy"]
                cosine = codebook.profile_cosine(last, energy.sqrt())
                growth = float(energy.sum() / last.square().sum().clamp(min=1e-30))
                probe.signals.append((probe.stage, kind_name, int(state["step"]), cosine, growth))
            new = new_stretch(state, config, kind)
            if new and kind == codebook.SCHEDULED:
                probe.stretches[(probe.stage, kind_name)] += 1
            return new

        self._restore = (write, new_stretch)
        memory_bucket.MemoryBucket.write = logged_write
        memory_bucket.new_stretch = logged_new_stretch

    def close(self):
        memory_bucket.MemoryBucket.write, memory_bucket.new_stretch = self._restore

    def memory(self, stage: int) -> dict:
        """Per matrix: pool rank, rank held, captured energy of this stage's covariances."""
        out = {}
        if not isinstance(self.opt, FOGO):
            return out
        for group in self.opt.param_groups:
            for p in group["params"]:
                name = self.names[id(p)]
                state = self.opt.state.get(p, {})
                if "memory" not in state:
                    continue
                mod = name.rsplit(".", 1)[0]
                book = state["memory"]
                basis = book["basis"][:, book["owner"] >= 0].double()
                side = group["side"]
                covs = ("x", "gtg") if side == "input" else ("d", "ggt")
                rank = book["owner"].numel()
                row = dict(side=side, pool_rank=rank, held=basis.shape[1])
                for what in covs:
                    c = self.cov[(stage, mod, what)]
                    row[f"cap_{what}"] = captured(basis, c)
                    row[f"best_{what}"] = best_captured(c, rank)
                out[name] = row
        return out


class Oracle:
    """Hard protection of the top-``rank`` eigenvectors of each finished stage's covariance,
    from the probe's exact statistics: what a subspace memory of that rank could do at best.

    ``spec``: rank (directions per stage and matrix), side ("input" or "output", or a dict per
    kind), source (covariance: "x"/"gtg" input side, "d"/"ggt" output side; per side default
    "x"/"d"), kinds (matrices protected), stages (how many first stages are protected).
    Applied to FOGO's fused, orthogonalized direction before the RMS scale (``_fogo_math.scaled``
    inside ``FOGO._updates``), and to the AdamW step of the head, memory off.
    """

    def __init__(self, opt: FOGO, probe: Probe, spec: dict):
        self.opt, self.probe, self.spec = opt, probe, spec
        self.bases: dict[int, tuple[str, torch.Tensor]] = {}
        self.soft: dict[int, dict[str, torch.Tensor]] = {}  # id -> side -> (I + kappa C)^-1
        self.kron: dict[int, torch.Tensor] = {}  # id -> kappa sum_t s_t a_t^T (m x n)
        updates, scaled, adamw = FOGO._updates, _fogo_math.scaled, FOGO._adamw
        oracle = self
        self.current: list[torch.Tensor] = []  # the matrices of the bucket being stepped

        def tracked_updates(o, group, bucket, take, skip, grads=None):
            oracle.current = [bucket.owned[i] for i in take]
            try:
                return updates(o, group, bucket, take, skip, grads)
            finally:
                oracle.current = []

        def protected_scaled(update, *args, **kwargs):
            if oracle.current:
                update = torch.stack(
                    [oracle.protect(p, u) for p, u in zip(oracle.current, update, strict=True)]
                )
            return scaled(update, *args, **kwargs)

        def protected_adamw(o, layouts, guard):
            params = [p for g in o.param_groups for p in g["params"] if p.grad is not None
                      and (id(p) in oracle.bases or id(p) in oracle.soft)]  # fmt: skip
            before = [p.detach().clone() for p in params]
            adamw(o, layouts, guard)
            for p, b in zip(params, before, strict=True):
                delta = p.detach() - b
                if id(p) in oracle.bases:
                    _, v = oracle.bases[id(p)]
                    delta = delta - (delta @ v) @ v.mT
                for side, pre in oracle.soft.get(id(p), {}).items():
                    delta = delta @ pre if side == "input" else pre @ delta
                p.copy_(b + delta)

        self._restore = (updates, scaled, adamw)
        FOGO._updates, FOGO._adamw = tracked_updates, protected_adamw
        _fogo_math.scaled = protected_scaled

    def protect(self, p: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """The oracle's protection of one matrix's direction (m x n)."""
        if id(p) in self.bases:
            side, v = self.bases[id(p)]
            v = v.to(direction.dtype)
            if side == "input":
                direction = direction - (direction @ v) @ v.mT
            else:
                direction = direction - v @ (v.mT @ direction)
        for side, pre in self.soft.get(id(p), {}).items():
            direction = direction @ pre if side == "input" else pre @ direction
        if id(p) in self.kron:  # elementwise proximal lift of a diagonal Kronecker penalty
            direction = direction / (1 + self.kron[id(p)].to(direction.dtype))
        return direction

    def side(self, kind: str) -> str:
        side = self.spec.get("side", "input")
        return side.get(kind, "input") if isinstance(side, dict) else side

    def add_stage(self, stage: int) -> None:
        if stage >= self.spec.get("stages", 1):
            return
        for mod, module in self.probe.modules.items():
            kind = kind_of(mod + ".weight")
            if kind not in self.spec.get("kinds", MATRIX_KINDS):
                continue
            if "kappa" in self.spec and self.spec.get("kron"):
                # U* = argmin 1/2 ||U - O||^2 + kappa/2 sum_ij s_i a_j U_ij^2 (diagonal factors,
                # each normalised to mean 1): U*_ij = O_ij / (1 + kappa s_i a_j)
                grad = self.spec.get("grad", False)
                a = self.probe.cov[(stage, mod, "gtg" if grad else "x")].diagonal()
                s_ = self.probe.cov[(stage, mod, "ggt" if grad else "d")].diagonal()
                term = self.spec["kappa"] * torch.outer(s_ / s_.mean(), a / a.mean()).float()
                self.kron[id(module.weight)] = self.kron.get(id(module.weight), 0) + term
                continue
            if "kappa" in self.spec:
                self._add_soft(stage, mod, module.weight)
                continue
            side = self.side(kind)
            source = self.spec.get("source", {}).get(side, "x" if side == "input" else "d")
            rank = self.spec["rank"]
            rank = rank.get(kind, 0) if isinstance(rank, dict) else rank
            if isinstance(rank, float):  # a share of the protected side's dimension
                c = self.probe.cov[(stage, mod, "x" if side == "input" else "d")]
                rank = int(rank * c.shape[0])
            if rank <= 0:
                continue
            c = self.probe.cov[(stage, mod, source)]
            old = self.bases.get(id(module.weight), (side, c.new_zeros(c.shape[0], 0)))[1]
            if old.shape[1]:
                proj = torch.eye(c.shape[0], dtype=c.dtype) - old @ old.mT
                c = proj @ c @ proj
            top = torch.linalg.eigh(c).eigenvectors[:, -rank:]
            basis = torch.linalg.qr(torch.cat([old, top], 1)).Q
            self.bases[id(module.weight)] = (side, basis.float())

    def _add_soft(self, stage: int, mod: str, weight: torch.Tensor) -> None:
        """Soft protection (EWC with a Kronecker-factored Fisher, as a preconditioner): the
        update becomes (I + kappa S)^-1 U (I + kappa A)^-1 on the protected sides, with A = C_x
        and S = C_d of the stage (or the weight-gradient Grams sum G^T G and sum G G^T with
        ``grad=True``) normalised to mean eigenvalue 1; the RMS scale follows. ``soft_rank``
        keeps only the top eigenpairs of each factor (what a low-rank memory can hold)."""
        sides = self.spec.get("side", "input")
        if isinstance(sides, dict):  # per kind
            sides = sides.get(kind_of(mod + ".weight"), "both")
        sides = ("input", "output") if sides == "both" else (sides,)
        grad = self.spec.get("grad", False)
        for side in sides:
            what = ("gtg" if grad else "x") if side == "input" else ("ggt" if grad else "d")
            c = self.probe.cov[(stage, mod, what)]
            c = c / (torch.trace(c) / c.shape[0])
            low = c.new_zeros(c.shape)
            if self.spec.get("soft_rank"):  # the top eigenpairs
                ev, evec = torch.linalg.eigh(c)
                k = self.spec["soft_rank"]
                low = (evec[:, -k:] * ev[-k:]) @ evec[:, -k:].mT
            diagonal = self.spec.get("diagonal")
            if isinstance(diagonal, dict):  # per kind
                diagonal = diagonal.get(kind_of(mod + ".weight"), ())
            if diagonal is True or (isinstance(diagonal, (tuple, list)) and side in diagonal):
                # the standard basis (row/column energies) of the rest
                c = low + torch.diag((c - low).diagonal())
            elif self.spec.get("soft_rank"):
                c = low
            eye = torch.eye(c.shape[0], dtype=c.dtype)
            old = self.soft.setdefault(id(weight), {}).get(side)
            # later stages add their Fisher factor to the earlier ones' (summed precision)
            prec = eye + self.spec["kappa"] * c
            if old is not None:
                prec = prec + torch.linalg.inv(old.double()) - eye
            self.soft[id(weight)][side] = torch.linalg.inv(prec).float()

    def close(self):
        FOGO._updates, _fogo_math.scaled, FOGO._adamw = self._restore


class SharedEmulation:
    """One shared preconditioner per dimension d of the whole protected sides, emulated over
    the per-matrix protection: at ``end_task`` the sides' Grams are pooled (``weight``), folded
    into the shared precision I + kappa sum_t hat A_t, and its inverse is written into every
    side's preconditioner (so the damping is exactly the shared one's)."""

    def __init__(self, opt: FOGO, weight: str, kappa: float, by: str = "model"):
        self.opt, self.weight, self.kappa, self.by = opt, weight, kappa, by
        self.precision: dict = {}
        self.cosines: list = []  # per end_task and pool: pairwise cosines of the normalised Grams
        self._end_task = opt.end_task
        opt.end_task = self.end_task  # type: ignore[method-assign]
        self._grams = kronecker.grams
        if weight == "step":
            def unit_grams(state, grad):
                g = grad.float()
                norm = g.square().sum((-2, -1), keepdim=True).sqrt().clamp(min=1e-30)
                return self._grams(state, g / norm)

            kronecker.grams = unit_grams

    def close(self):
        kronecker.grams = self._grams

    def sides(self) -> dict:
        out = collections.defaultdict(list)
        for p, st in self.opt.state.items():
            kron = st.get("kron") if st else None
            for side in kronecker.SIDES:
                acc = kron.get(f"{side}_acc") if kron else None
                if acc is not None and acc.ndim == 2:
                    key = acc.shape[0] if self.by == "model" else (tuple(p.shape), side)
                    out[key].append((kron, side))
        return out

    @torch.no_grad()
    def end_task(self) -> None:
        pres = {}
        for key, entries in self.sides().items():
            d = entries[0][0][f"{entries[0][1]}_acc"].shape[0]
            total = torch.zeros(d, d, dtype=torch.float64)
            normed = []
            for kron, side in entries:
                acc = kron[f"{side}_acc"].double()
                tr = float(torch.trace(acc))
                if tr > 0:
                    normed.append(acc / (tr / d))
                    total += normed[-1] if self.weight == "norm" else acc
            if len(normed) > 1:
                flat = torch.stack([a.flatten() for a in normed])
                flat = flat / flat.norm(dim=1, keepdim=True)
                cos = flat @ flat.mT
                off = cos[~torch.eye(len(normed), dtype=torch.bool)]
                self.cosines.append(dict(pool=str(key), n=len(normed), mean=float(off.mean()),
                                         min=float(off.min()), max=float(off.max())))  # fmt: skip
            tr = float(torch.trace(total))
            prec = self.precision.get(key, torch.eye(d, dtype=torch.float64))
            if tr > 0:
                prec = prec + self.kappa * total / (tr / d)
                self.precision[key] = prec
            pres[key] = torch.linalg.inv(0.5 * (prec + prec.mT)).float()
        self._end_task()
        for key, entries in self.sides().items():
            for kron, side in entries:
                kron[f"{side}_pre"].copy_(pres[key])
        for layout in self.opt._layouts or []:
            for b in layout.buckets:
                if isinstance(b.memory, memory_bucket.KroneckerBucket):
                    for i in range(len(b.states)):
                        b.memory.refresh(i)


def run(args, name: str, seed: int) -> dict:
    config = CONFIGS[name]
    spec = lm.LM_CONTINUAL
    s = {
        **spec.settings(args.preset),
        "eval_split": "test",
        "task_aware": bool(config.get("aware")),
    }
    names = lm._corpus_names(s["corpora"])
    steps = [s["pretrain_steps"]] + [s["finetune_steps"]] * (len(names) - 1)
    vocab, data = lm._load(names, args.data_dir, s["eval_split"], s["block_size"])
    # the stage loop and the evaluation take lm.Text (ids, optionally cut into examples)
    data = [types.SimpleNamespace(train=lm.Text(d.train), val=lm.Text(d.val)) for d in data]
    record = dict(config=name, seed=seed, spec=config)
    start = time.time()
    consolidate = kronecker.consolidate
    if "kron_rank" in config:  # every consolidation keeps only the f least-damped directions
        rank = config["kron_rank"]
        kronecker.consolidate = lambda st, kappa, decay=1.0, rank_=0: consolidate(
            st, kappa, decay, rank
        )
    try:
        return _run(args, name, seed, config, s, names, steps, vocab, data, record, start)
    finally:
        kronecker.consolidate = consolidate


def _run(args, name, seed, config, s, names, steps, vocab, data, record, start) -> dict:
    S = len(names)
    L = np.zeros((S, S))
    with seeded(seed, "cpu"):
        model = GPT(lm._model_config(s, len(vocab)))
        opt = build_optimizer(model, config)
        probe = Probe(model, opt) if args.probe or "oracle" in config else None
        oracle = Oracle(opt, probe, config["oracle"]) if "oracle" in config else None
        shared = None
        if "share" in config:
            shared = SharedEmulation(opt, config["share"], config["fogo"]["kron_strength"],
                                     config.get("share_by", "model"))  # fmt: skip
        named = dict(model.named_parameters())
        stage1 = None
        per_stage = []
        curve = []  # [stage, step, loss on corpus 0, ..., loss on corpus stage]
        for i, ds in enumerate(data):
            if probe:
                probe.stage = i
            stage = lm._Stage(model, opt, s, ds.train, steps[i], seed, i)
            for k in range(steps[i]):
                stage.step()
                if args.track and i > 0 and (k + 1) % args.track == 0:
                    curve.append([i, k + 1] + [
                        lm._eval_loss(model, dj.val, s["eval_batches"], s["batch_size"])
                        for dj in data[: i + 1]
                    ])  # fmt: skip
            if s["task_aware"] and hasattr(opt, "end_task"):
                opt.end_task()
            for j, dj in enumerate(data):
                L[i, j] = lm._eval_loss(model, dj.val, s["eval_batches"], s["batch_size"])
            # kron_detect: steps in each shared factor's running Gram at the end of the stage
            # (the steps since the last detected boundary)
            since = [float(t) for st in opt.state.values() if st
                     for k, t in st.get("kron", {}).items() if k.endswith("_since")]  # fmt: skip
            if since:
                record.setdefault("detector_since", []).append(since)
            if probe:
                per_stage.append(dict(memory=probe.memory(i)))
            if oracle:
                oracle.add_stage(i)
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), args.save / f"{name}_s{seed}_stage{i}.pt")
            if i == 0:
                stage1 = {n: p.detach().clone() for n, p in named.items()}
                for group in config.get("freeze", ()):
                    for n, p in named.items():
                        if in_group(group, n, p):
                            p.requires_grad_(False)
        record.update(metrics=lm.loss_matrix_metrics(L), L=L.tolist())
        if curve:
            record["curve"] = curve
        if oracle:
            oracle.close()
        if shared:
            shared.close()
            record["share_cosines"] = shared.cosines
        if probe:
            probe.close()
            record.update(analysis(args, probe, model, named, stage1, data, s, per_stage))
    record["seconds"] = time.time() - start
    return record


@torch.no_grad()
def analysis(args, probe, model, named, stage1, data, s, per_stage) -> dict:
    out = dict(stages=per_stage)
    # spectra of every stage's covariances, per matrix
    spectra = {}
    for (stage, mod, what), c in probe.cov.items():
        spectra.setdefault(mod, {}).setdefault(what, {})[stage] = spectrum(c)
    out["spectra"] = spectra
    # overlap of later stages' inputs with stage 1's top subspace of the same rank as its k90
    overlap = {}
    for mod in probe.modules:
        c1 = probe.cov[(0, mod, "x")]
        ev, evec = torch.linalg.eigh(c1)
        k = spectra[mod]["x"][0]["k90"]
        top = evec[:, -k:]
        overlap[mod] = {st: captured(top, probe.cov[(st, mod, "x")]) for st in (1, 2)}
    out["overlap_x"] = overlap
    # damage on stage-1 inputs
    damage = {}
    for mod, module in probe.modules.items():
        w1 = stage1[probe.names[id(module.weight)]].double()
        dw = module.weight.double() - w1
        c1 = probe.cov[(0, mod, "x")]
        damage[mod] = float(torch.trace(dw @ c1 @ dw.mT) / torch.trace(w1 @ c1 @ w1.mT))
    out["damage"] = damage
    out["gates"] = {f"{st}|{k}|{w}": v for (st, k, w), v in probe.gates.items()}
    out["ratios"] = {f"{st}|{k}": float(np.mean(v)) for (st, k), v in probe.ratios.items()}
    out["writes"] = {f"{st}|{k}|{o}": v for (st, k, o), v in probe.writes.items()}
    out["stretches"] = {f"{st}|{k}": v for (st, k), v in probe.stretches.items()}
    out["signals"] = probe.signals
    out["grad_energy"] = probe.energy
    out["novelty"] = probe.novelty
    # restoration: Shakespeare (corpus 0) loss with one group put back to its stage-1 value
    final = {n: p.detach().clone() for n, p in named.items()}

    def losses():
        return [lm._eval_loss(model, d.val, s["eval_batches"], s["batch_size"]) for d in data]

    restore = {"none": losses()}
    layers = [f"h.{i}." for i in range(model.config.n_layer)]
    for group in (*GROUPS, *layers):
        for n, p in named.items():
            hit = group in n if group.startswith("h.") else in_group(group, n, p)
            if hit:
                p.copy_(stage1[n])
        restore[group] = losses()
        for n, p in named.items():
            p.copy_(final[n])
    out["restore"] = restore
    return out


# -------------------------------------------------------------------------------- summary


def _ms(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def summarize(paths: list[Path], configs: list[str] | None) -> None:
    rows = [
        json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()
    ]
    by = collections.defaultdict(dict)
    for r in rows:
        by[r["config"]][r["seed"]] = r
    base = by.get("nomem", {})
    print("| config | seeds | forgetting | learning loss | avg final loss | forgetting vs nomem "
          "(paired, per seed) | learning loss − nomem's | avg final loss − nomem's | "
          "L[2,0] Shakespeare final |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in by.items():
        if configs and name not in configs:
            continue
        seeds = sorted(runs)
        m = lambda key, runs=runs, seeds=seeds: [runs[sd]["metrics"][key] for sd in seeds]  # noqa: E731
        paired = [sd for sd in seeds if sd in base]

        def diff(key, runs=runs, paired=paired):
            return ", ".join(
                f"{runs[sd]['metrics'][key] - base[sd]['metrics'][key]:+.3f}" for sd in paired
            )

        rel = [
            f"{100 * (runs[sd]['metrics']['forgetting'] / base[sd]['metrics']['forgetting'] - 1):+.0f}%"
            for sd in paired
        ]  # fmt: skip
        print(f"| {name} | {seeds} | {_ms(m('forgetting'))} | {_ms(m('learning_loss'))} | "
              f"{_ms(m('avg_final_loss'))} | {', '.join(rel)} | {diff('learning_loss')} | "
              f"{diff('avg_final_loss')} | {_ms([runs[sd]['L'][-1][0] for sd in seeds])} |")  # fmt: skip
    for name, runs in by.items():
        if configs and name not in configs:
            continue
        for seed, r in sorted(runs.items()):
            if "spectra" in r:
                print(f"\n### {name}, seed {seed}")
                print_analysis(r)


def _by_kind(d: dict, fn) -> dict:
    out = collections.defaultdict(list)
    for mod, value in d.items():
        out[kind_of(mod + ".weight") or kind_of(mod)].append(fn(value))
    return out


def print_analysis(r: dict) -> None:
    spectra = r["spectra"]
    print("\nInputs and gradients per kind (mean over the 4 blocks; stage 1 = Shakespeare):")
    print("| kind | input dim | C_x pr / k90 / k99 (stage 1) | sum G^T G pr / k90 / k99 | "
          "C_d (output grad) pr / k90 / k99 | out dim | stage-2 / stage-3 input energy in "
          "stage 1's top-k90 subspace |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind in MATRIX_KINDS:
        mods = [m for m in spectra if kind_of(m + ".weight") == kind]

        def f(what, key, stage=0, mods=mods):
            return np.mean([spectra[m][what][str(stage)][key] for m in mods])

        ov = [r["overlap_x"][m] for m in mods]
        print(f"| {kind} | {f('x', 'dim'):.0f} | {f('x', 'pr'):.1f} / {f('x', 'k90'):.0f} / "
              f"{f('x', 'k99'):.0f} | {f('gtg', 'pr'):.1f} / {f('gtg', 'k90'):.0f} / "
              f"{f('gtg', 'k99'):.0f} | {f('d', 'pr'):.1f} / {f('d', 'k90'):.0f} / "
              f"{f('d', 'k99'):.0f} | {f('d', 'dim'):.0f} | "
              f"{np.mean([o['1'] for o in ov]):.2f} / {np.mean([o['2'] for o in ov]):.2f} |")  # fmt: skip
    stages = r["stages"]
    if stages and stages[0]["memory"]:
        print("\nMemory after stage 1 (task-aware: after end_task):")
        print("| kind | side | pool rank R | rank held | energy captured (C_x or C_d) | best at "
              "rank R | captured (sum G^T G or G G^T) | best at rank R |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        mem = stages[0]["memory"]
        for kind in MATRIX_KINDS:
            rows = [v for m, v in mem.items() if kind_of(m) == kind]
            if not rows:
                continue
            a, b = ("x", "gtg") if rows[0]["side"] == "input" else ("d", "ggt")
            g = lambda key, rows=rows: np.mean([v[key] for v in rows])  # noqa: E731
            print(f"| {kind} | {rows[0]['side']} | {g('pool_rank'):.0f} | {g('held'):.1f} | "
                  f"{g('cap_' + a):.2f} | {g('best_' + a):.2f} | {g('cap_' + b):.2f} | "
                  f"{g('best_' + b):.2f} |")  # fmt: skip
    print("\nPer stage (2 = stdlib, 3 = pydoc): gating, correction, writes, stretches detected:")
    print("| stage | kind | steps gated / steps with a ready entry | correction ratio | "
          "writes insert / merge / skip | new stretches |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for st in ("0", "1", "2"):
        for kind in MATRIX_KINDS:
            ready = r["gates"].get(f"{st}|{kind}|ready", 0)
            gated = r["gates"].get(f"{st}|{kind}|gated", 0)
            ratio = r["ratios"].get(f"{st}|{kind}")
            if ratio is None:
                continue
            w = [r["writes"].get(f"{st}|{kind}|{o}", 0) for o in ("insert", "merge", "skip")]
            print(f"| {int(st) + 1} | {kind} | {gated} / {ready} | {ratio:.3f} | "
                  f"{w[0]} / {w[1]} / {w[2]} | {r['stretches'].get(f'{st}|{kind}', 0)} |")  # fmt: skip
    dmg = _by_kind(r["damage"], float)
    print("\nDamage on stage-1 inputs after stage 3, tr(dW C_x1 dW^T) / tr(W1 C_x1 W1^T), "
          "per kind (blocks 0-3): " + "; ".join(
              f"{k} " + ", ".join(f"{v:.2f}" for v in dmg[k]) for k in MATRIX_KINDS))  # fmt: skip
    rest = {k: v if isinstance(v, list) else [v] for k, v in r["restore"].items()}
    none = rest["none"]
    print("\nRestoration: losses after stage 3 with one group put back to its stage-1 value "
          f"(none: {', '.join(f'{v:.3f}' for v in none)}; L[0,0] = {r['L'][0][0]:.3f}; share = "
          "share of the Shakespeare forgetting L[2,0] - L[0,0] removed):")  # fmt: skip
    total = none[0] - r["L"][0][0]
    print("| group | Shakespeare loss | share removed | change on the other corpora |")
    print("|---|---|---|---|")
    for group, loss in rest.items():
        if group != "none":
            other = ", ".join(f"{a - b:+.3f}" for a, b in zip(loss[1:], none[1:], strict=False))
            print(f"| {group} | {loss[0]:.3f} | {(none[0] - loss[0]) / total:+.2f} | {other} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/fogo_lm/diagnosis.jsonl"))
    ap.add_argument("--configs", nargs="+", default=["nomem", "aware", "agnostic"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--probe", action="store_true", help="record the spectra, memory and damage")
    ap.add_argument("--preset", default="paper", help="task preset (tiny: a smoke test)")
    ap.add_argument(
        "--track",
        type=int,
        default=0,
        help="evaluate the earlier corpora every N steps of stages 2 and 3",
    )
    ap.add_argument("--save", type=Path, help="save the model after every stage here")
    ap.add_argument("--summarize", action="store_true")
    ap.add_argument("--inputs", nargs="+", type=Path, help="result files to summarise")
    args = ap.parse_args()
    if args.summarize:
        chosen = args.configs if "--configs" in sys.argv else None
        summarize(args.inputs or [args.out], chosen)
        return
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["config"], r["seed"], "spectra" in r))
    for name in args.configs:
        for seed in args.seeds:
            if (name, seed, args.probe) in done or (name, seed, True) in done:
                continue
            record = run(args, name, seed)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            m = record["metrics"]
            print(name, seed, {k: round(v, 4) for k, v in m.items()},
                  f"{record['seconds']:.0f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
