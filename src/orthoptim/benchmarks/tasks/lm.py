"""Language-model tasks: char-level GPT pretraining and continual fine-tuning over corpora.

``lm-pretrain`` (family ``"lm"``) stands in for FOGO's GPT-2 pretraining claim. It follows
nanoGPT's ``shakespeare_char`` recipe (``karpathy/nanoGPT``, ``config/train_shakespeare_char.py``;
protocol in ``shared/research/benchmarks.md`` section 1d) at CPU scale: a :class:`~..gpt.GPT`
trained on random ``block_size`` windows of the training characters, AdamW-style linear warmup
then cosine decay, gradient clipping at norm 1, validation loss in nats per character. Reported:
the final and best validation loss, steps and tokens to a target validation loss, throughput.

``lm-continual`` (family ``"lm-continual"``) is the small-scale stand-in for FOGO's continual
LLaVA fine-tuning: pretrain on corpus A, then fine-tune on B, then C (paper: Tiny Shakespeare ->
Python standard-library source -> pydoc's English help topics; tiny/quick: the offline corpora of
:mod:`..corpora`). After every stage the validation loss of every corpus fills the loss matrix
``L[i, j]`` (loss on corpus ``j`` after stage ``i``), the analogue of the accuracy matrix ``R``
of continual classification with "lower is better":

- ``avg_final_loss = mean_j L[S-1, j]``
- ``forgetting = mean_{j<S-1} (L[S-1, j] - L[j, j])`` (Avalanche-style: final minus right after
  training on ``j``; positive = forgot), ``max_forgetting`` = the largest of those terms
- ``learning_loss = mean_j L[j, j]`` (plasticity)

Shared protocol (identical for every optimizer):

- Vocabulary: characters, the sorted union over the task's corpora (:func:`..corpora.shared_vocab`).
- Splits: each corpus' first 90% of characters train, the last 10% are held out (nanoGPT).
  ``eval_split="test"`` evaluates on the held-out part; ``"val"`` (tuning) cuts the last
  ``VAL_FRAC`` of the *training* characters off as the evaluation set and trains on the rest, so
  tuning never reads the held-out ids.
- Batches: ``batch_size`` windows with start positions drawn uniformly by a local
  ``torch.Generator`` seeded with ``task_seed(seed, stage)``; windows lie inside the training ids.
  (A :class:`Text` cut into examples, as ``lm-skills``' skills are, starts windows only at an
  example's first character and scores only its marked characters.)
- Evaluation: the mean loss over ``eval_batches * batch_size`` fixed windows evenly spaced over the
  evaluation ids (no sampling noise, the same windows for every optimizer and every evaluation).
- Learning rate: one ``torch.optim.lr_scheduler.LambdaLR`` scales every group's lr by
  ``(k+1)/(warmup+1)`` for step ``k < warmup``, then cosine from 1 to ``lr_min_ratio`` at the
  stage's last step (nanoGPT's ``get_lr`` with ``min_lr = lr/10``); each continual stage restarts
  it, as a fresh fine-tuning run would.
- Clipping: ``clip_grad_norm_(model.parameters(), grad_clip)`` before every step (nanoGPT's
  ``grad_clip=1.0``; 0 disables), applied to the raw gradient whatever the optimizer does next.
- Determinism: model initialisation and optimizer construction run under
  ``torch.random.fork_rng`` after ``torch.manual_seed(seed)`` (:func:`..train.seeded`).
- Under ``torchrun`` (:mod:`..ddp`): every rank draws the same ``batch_size`` windows and trains
  on its contiguous share (``batch_size`` must be a multiple of the number of processes), the
  model is in DDP, rank 0 evaluates and broadcasts, and the recorded training loss is the mean
  over the ranks. ``dropout > 0`` is refused: every rank would draw the same dropout masks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from .. import corpora
from ..ddp import DataParallel, once
from ..gpt import GPT, GPTConfig
from ..train import seeded, task_seed
from .base import Metric, NullProgress, RunOutput, TaskSpec

__all__ = [
    "TASKS",
    "LM_PRETRAIN",
    "LM_CONTINUAL",
    "CONTINUAL",
    "Text",
    "loss_matrix_metrics",
    "lr_multiplier",
    "train_in_turn",
]

VAL_FRAC = 0.1  # fraction of the training ids cut off as the tuning ("val") evaluation set
_CPU = torch.device("cpu")


def lr_multiplier(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """The schedule's lr factor at (0-based) ``step`` of a ``steps``-step run.

    Args:
        step: optimizer step index within the stage, from 0.
        steps: steps in the stage.
        warmup: linear-warmup steps.
        min_ratio: the factor reached at the last step (cosine floor).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def loss_matrix_metrics(L) -> dict[str, float]:
    """``avg_final_loss``, ``forgetting``, ``max_forgetting``, ``learning_loss`` of ``L`` (S x S).

    Args:
        L: square loss matrix, ``L[i, j]`` = loss on corpus ``j`` after stage ``i``.
    """
    L = np.asarray(L, dtype=float)
    if L.ndim != 2 or L.shape[0] != L.shape[1] or L.shape[0] == 0:
        raise ValueError(f"Invalid L shape: {L.shape}; expected a non-empty square matrix")
    S = L.shape[0]
    f = L[S - 1, : S - 1] - np.diag(L)[: S - 1]
    return {
        "avg_final_loss": float(L[S - 1].mean()),
        "forgetting": float(f.mean()) if S > 1 else math.nan,
        "max_forgetting": float(f.max()) if S > 1 else math.nan,
        "learning_loss": float(np.diag(L).mean()),
    }


# ----------------------------------------------------------------------------------- settings


def _pos_int(s: dict, key: str, zero_ok: bool = False) -> int:
    v = s[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
        kind = "non-negative" if zero_ok else "positive"
        raise ValueError(f"Invalid {key}: {v!r}; expected a {kind} integer")
    return v


def _number(s: dict, key: str, low: float, high: float = math.inf) -> float:
    v = s[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ValueError(f"Invalid {key}: {v!r}; expected a number in [{low}, {high}]")
    return float(v)


def _corpus_names(value) -> list[str]:
    names = value.split(",") if isinstance(value, str) else list(value)
    for n in names:
        if n not in corpora.CORPORA:
            raise ValueError(f"Invalid corpus: {n!r}; expected one of {corpora.CORPORA}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"Invalid corpora: {value!r}; expected distinct corpus names")
    return names


def _model_config(s: dict, vocab_size: int) -> GPTConfig:
    if not isinstance(s["tie_weights"], bool):
        raise ValueError(f"Invalid tie_weights: {s['tie_weights']!r}; expected a bool")
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=_pos_int(s, "block_size"),
        n_layer=_pos_int(s, "n_layer"),
        n_head=_pos_int(s, "n_head"),
        n_embd=_pos_int(s, "n_embd"),
        dropout=_number(s, "dropout", 0.0, 0.99),
        tie_weights=s["tie_weights"],
    )


def _check_common(s: dict) -> None:
    for key in ("batch_size", "eval_batches"):
        _pos_int(s, key)
    _pos_int(s, "warmup", zero_ok=True)
    _number(s, "grad_clip", 0.0)
    _number(s, "lr_min_ratio", 0.0, 1.0)
    if not isinstance(s.get("task_aware", True), bool):
        raise ValueError(f"Invalid task_aware: {s['task_aware']!r}; expected a bool")


def _check_parallel(parallel: DataParallel | None, s: dict, cfg: GPTConfig) -> None:
    """ValueError, before any training, for a run that cannot be split over the ranks."""
    if parallel is None:
        return
    parallel.local_size(s["batch_size"])
    if cfg.dropout > 0:
        raise ValueError(
            f"Invalid dropout: {cfg.dropout!r} under data parallelism; every rank would draw the "
            "same dropout masks (set dropout=0)"
        )


# --------------------------------------------------------------------------------------- data


def _load(names: list[str], data_dir, eval_split: str, block_size: int, extra: str = ""):
    """Datasets whose ``train`` / ``val`` are the ids to train on / evaluate on, in one vocab
    (their characters and ``extra``)."""
    split = []
    for name in names:
        ds = corpora.load_corpus(name, data_dir)
        if eval_split == "val":
            # tuning: evaluate on the tail of the training ids; ds.val (held out) is never read
            n_val = int(len(ds.train) * VAL_FRAC)
            ds = type(ds)(
                train=ds.train[:-n_val], val=ds.train[-n_val:], vocab=ds.vocab, name=ds.name
            )
        split.append(ds)
    vocab, out = corpora.shared_vocab(split, extra)
    for ds in out:
        if min(len(ds.train), len(ds.val)) < block_size + 1:
            raise ValueError(
                f"Invalid block_size: {block_size}; corpus {ds.name!r} has only "
                f"{len(ds.train)}/{len(ds.val)} train/eval characters"
            )
    return vocab, out


@dataclass(frozen=True)
class Text:
    """Token ids to train or evaluate on, optionally cut into examples with scored characters.

    Attributes:
        ids: 1-D int64 token ids.
        scored: bool per id, whether the character counts as a target (its loss is averaged,
            the others are context only); None: every character counts.
        example: int64 per id, the index of the example the character belongs to (examples are
            contiguous); windows then start only at an example's first character, so every
            scored character sees its whole prompt. None: one unbroken text, windows start
            anywhere.
    """

    ids: torch.Tensor
    scored: torch.Tensor | None = None
    example: torch.Tensor | None = None

    def window_starts(self, T: int) -> torch.Tensor | None:
        """The positions a ``T``-token window (plus its next-token target) may start at; None:
        any of ``[0, len(ids) - T - 1]``."""
        if self.example is None:
            return None
        first = torch.ones(len(self.ids), dtype=torch.bool)
        first[1:] = self.example[1:] != self.example[:-1]
        pos = first.nonzero().squeeze(1)
        return pos[pos <= len(self.ids) - T - 1]

    def last_of_example(self) -> torch.Tensor:
        """bool per id: the character ends its example (requires ``example``)."""
        if self.example is None:
            raise ValueError("Invalid text: no examples; last_of_example needs example ids")
        last = torch.ones(len(self.ids), dtype=torch.bool)
        last[:-1] = self.example[1:] != self.example[:-1]
        return last


def _windows(ids: torch.Tensor, starts: torch.Tensor, T: int):
    idx = starts[:, None] + torch.arange(T + 1)
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def _target_view(per_id: torch.Tensor, starts: torch.Tensor, T: int) -> torch.Tensor:
    """``per_id`` at the target positions of the windows at ``starts``, shape ``(B, T)``."""
    return per_id[starts[:, None] + torch.arange(1, T + 1)]


def _scored_loss(logits: torch.Tensor, y: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored targets (sum over them / their count)."""
    ce = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="none")
    w = scored.reshape(-1).to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def _even_starts(text: Text, T: int, n: int) -> torch.Tensor:
    """``n`` window starts evenly spaced over the allowed starts of ``text``."""
    allowed = text.window_starts(T)
    if allowed is None:
        return torch.linspace(0, len(text.ids) - T - 1, n).round().long()
    return allowed[torch.linspace(0, len(allowed) - 1, n).round().long()]


@torch.no_grad()
def _evaluate(model: GPT, text: Text, batches: int, batch_size: int) -> tuple[float, float]:
    """Loss and exact match of ``model`` (eval mode) on ``batches * batch_size`` fixed windows.

    The loss is the mean over the windows' scored targets (every target when ``text.scored`` is
    None). Exact match, for a text of examples: the fraction of the examples completed inside a
    window whose scored characters are all the argmax of the teacher-forced logits, which is
    exactly "greedy decoding from the prompt reproduces the answer"; NaN without examples.
    """
    T = model.config.block_size
    device = next(model.parameters()).device
    starts = _even_starts(text, T, batches * batch_size)
    last = text.last_of_example() if text.example is not None else None
    was = model.training
    model.eval()
    loss_sum, weight, exact, complete = 0.0, 0.0, 0, 0
    for chunk in starts.split(batch_size):
        x, y = (w.to(device) for w in _windows(text.ids, chunk, T))
        if text.scored is None:
            _, loss = model(x, y)
            loss_sum, weight = loss_sum + float(loss) * len(chunk), weight + len(chunk)
            continue
        logits, _ = model(x)
        scored = _target_view(text.scored, chunk, T).to(device)
        n = float(scored.sum())
        loss_sum, weight = loss_sum + float(_scored_loss(logits, y, scored)) * n, weight + n
        if last is None or text.example is None:
            continue
        ex = _target_view(text.example, chunk, T).to(device)
        # one key per (window, example inside it); an example counts once its last character
        # is a target of the window, i.e. its whole answer is
        row = torch.arange(len(chunk), device=device)[:, None] * (T + 1)
        key = (row + ex - ex[:, :1]).flatten()
        wrong = (scored & (logits.argmax(-1) != y)).flatten().to(torch.float64)
        ends = _target_view(last, chunk, T).to(device).flatten().to(torch.float64)
        size = len(chunk) * (T + 1)
        done = torch.bincount(key, weights=ends, minlength=size) > 0
        right = torch.bincount(key, weights=wrong, minlength=size) == 0
        exact += int((done & right).sum())
        complete += int(done.sum())
    model.train(was)
    return loss_sum / weight, (exact / complete if complete else math.nan)


def _eval_loss(model: GPT, text: Text, batches: int, batch_size: int) -> float:
    """The loss of :func:`_evaluate`."""
    return _evaluate(model, text, batches, batch_size)[0]


class _Stage:
    """Train ``model`` for ``steps`` steps on ``text`` (batches from ``task_seed(seed, stage)``);
    under data parallelism the forward runs through ``net`` (the DDP wrapper) on this rank's
    share of each batch."""

    def __init__(
        self, model, optimizer, s: dict, text: Text, steps: int, seed: int, stage: int,
        net=None, parallel: DataParallel | None = None, lr_scale: float = 1.0,
    ):  # fmt: skip
        self.model, self.opt, self.text, self.steps = model, optimizer, text, steps
        self.net = net if net is not None else model
        self.parallel = parallel
        self.device = next(model.parameters()).device
        self.B, self.T, self.clip = s["batch_size"], model.config.block_size, s["grad_clip"]
        self.allowed = text.window_starts(self.T)
        self.gen = torch.Generator().manual_seed(task_seed(seed, stage))
        warmup, floor = s["warmup"], s["lr_min_ratio"]
        # a fresh LambdaLR per stage; initial_lr (set by the first one) is the base lr
        for g in optimizer.param_groups:
            if "initial_lr" in g:
                g["lr"] = g["initial_lr"]
        self.sched = LambdaLR(
            optimizer, lambda k: lr_scale * lr_multiplier(k, steps, warmup, floor)
        )
        self.seconds = 0.0

    def _starts(self) -> torch.Tensor:
        if self.allowed is None:
            return torch.randint(len(self.text.ids) - self.T, (self.B,), generator=self.gen)
        return self.allowed[torch.randint(len(self.allowed), (self.B,), generator=self.gen)]

    def step(self) -> float:
        t0 = time.perf_counter()
        starts = self._starts()
        if self.parallel is not None:
            starts = self.parallel.shard(starts)
        x, y = (w.to(self.device) for w in _windows(self.text.ids, starts, self.T))
        self.opt.zero_grad(set_to_none=True)
        if self.text.scored is None:
            _, loss = self.net(x, y)
        else:
            logits, _ = self.net(x)
            scored = _target_view(self.text.scored, starts, self.T).to(self.device)
            loss = _scored_loss(logits, y, scored)
        loss.backward()  # under DDP the gradients are the global-batch mean from here on
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        out = float(loss.detach() if self.parallel is None else self.parallel.mean(loss))
        self.seconds += time.perf_counter() - t0
        return out


def _curve(x, y, xlabel: str, ylabel: str) -> dict:
    return {
        "x": [float(v) for v in x],
        "y": [float(v) for v in y],
        "xlabel": xlabel,
        "ylabel": ylabel,
    }


# ------------------------------------------------------------------------------------ runners


def train_in_turn(
    make_optimizer, s: dict, cfg: GPTConfig, texts: list[Text], stage_steps: list[int],
    seed: int, after_stage, progress, parallel: DataParallel | None = None,
    stage_lr_scales: list[float] | None = None,
) -> tuple[GPT, list[float], int, float]:  # fmt: skip
    """Train one GPT on ``texts[0]``, then ``texts[1]``, ... (the continual protocol).

    Stage ``i`` runs ``stage_steps[i]`` steps with a fresh lr schedule and batches from
    ``task_seed(seed, i)``; after it, the optimizer's ``end_task()`` runs when
    ``s["task_aware"]`` (and the optimizer has one), then ``after_stage(i, model)`` (the
    evaluations, not timed). Model and optimizer are built under :func:`..train.seeded`.

    Args:
        make_optimizer: ``(model, lr_scale=1.0) -> Optimizer``.
        s: the task's settings (checked by the caller).
        cfg: the model.
        texts: one training text per stage.
        stage_steps: optimizer steps per stage.
        seed: run seed.
        after_stage: ``(stage index, model) -> None``.
        progress: advanced once per step (started by the caller).
        parallel: data parallelism under ``torchrun``; None: one process.
        stage_lr_scales: a factor per stage on the whole lr schedule of that stage (e.g. a
            lower fine-tuning lr); None: 1 for every stage.

    Returns:
        ``(model, per-step training losses, end_task calls, training seconds)``.
    """
    losses: list[float] = []
    calls, train_s = 0, 0.0
    with seeded(seed, _CPU):
        model = GPT(cfg)
        net = None if parallel is None else parallel.wrap(model)
        optimizer = make_optimizer(model)
        end_task = getattr(optimizer, "end_task", None) if s["task_aware"] else None
        for i, text in enumerate(texts):
            scale = 1.0 if stage_lr_scales is None else stage_lr_scales[i]
            stage = _Stage(
                model, optimizer, s, text, stage_steps[i], seed, i, net, parallel, scale
            )
            for _ in range(stage_steps[i]):
                losses.append(stage.step())
                progress.advance()
            t0 = time.perf_counter()
            if callable(end_task):
                end_task()
                calls += 1
            train_s += stage.seconds + time.perf_counter() - t0
            after_stage(i, model)
    return model, losses, calls, train_s


def run_pretrain(
    make_optimizer, *, seed: int, settings: dict, data_dir=None, progress=None,
    parallel: DataParallel | None = None,
) -> RunOutput:  # fmt: skip
    """Run ``lm-pretrain`` (see the module docstring and :class:`~.base.TaskSpec`).

    Args:
        make_optimizer: ``(model, lr_scale=1.0) -> Optimizer``.
        seed: run seed (model init, optimizer RNG, batch order).
        settings: the task's settings (a preset with overrides).
        data_dir: root data folder (needed for ``corpus="tinyshakespeare"``).
        progress: per-step :class:`~.base.Progress` (default none).
        parallel: data parallelism under ``torchrun`` (see the module docstring); None: one
            process.
    """
    s, progress = dict(settings), progress or NullProgress()
    _check_common(s)
    steps, interval = _pos_int(s, "steps"), _pos_int(s, "eval_interval")
    target = _number(s, "target_loss", 0.0)
    names = _corpus_names([s["corpus"]] if isinstance(s["corpus"], str) else s["corpus"])
    if len(names) != 1:
        raise ValueError(f"Invalid corpus: {s['corpus']!r}; expected one corpus name")
    vocab, (ds,) = _load(names, data_dir, s["eval_split"], _pos_int(s, "block_size"))
    cfg = _model_config(s, len(vocab))
    _check_parallel(parallel, s, cfg)
    tokens_per_step = s["batch_size"] * cfg.block_size
    progress.start(steps, desc="lm-pretrain")
    train_losses, eval_steps, eval_losses = [], [], []
    with seeded(seed, _CPU):
        model = GPT(cfg)
        net = None if parallel is None else parallel.wrap(model)
        stage = _Stage(
            model, make_optimizer(model), s, Text(ds.train), steps, seed, 0, net, parallel
        )
        for k in range(1, steps + 1):
            train_losses.append(stage.step())
            progress.advance()
            if k % interval == 0 or k == steps:
                eval_steps.append(k)
                evaluate = partial(
                    _eval_loss, model, Text(ds.val), s["eval_batches"], s["batch_size"]
                )
                eval_losses.append(once(parallel, evaluate))
    hit = next((k for k, v in zip(eval_steps, eval_losses, strict=True) if v <= target), None)
    finite = [v for v in eval_losses if math.isfinite(v)]
    metrics = {
        "val_loss": eval_losses[-1],
        "best_val_loss": min(finite) if finite else math.nan,
        "steps_to_target": float(hit) if hit is not None else math.nan,
        "tokens_to_target": float(hit * tokens_per_step) if hit is not None else math.nan,
        "tokens_per_second": steps * tokens_per_step / max(stage.seconds, 1e-9),
    }
    tokens = [k * tokens_per_step for k in eval_steps]
    return RunOutput(
        metrics=metrics,
        curves={
            "val_loss_vs_step": _curve(eval_steps, eval_losses, "step", "val loss (nats/char)"),
            "val_loss_vs_tokens": _curve(tokens, eval_losses, "tokens", "val loss (nats/char)"),
            "train_loss_vs_step": _curve(
                range(1, steps + 1), train_losses, "step", "train loss (nats/char)"
            ),
        },
        extra={
            "corpus": ds.name,
            "vocab_size": len(vocab),
            "n_params": model.num_params(non_embedding=False),
            "train_seconds": stage.seconds,
            "tokens_per_step": tokens_per_step,
        },
    )


def run_continual(
    make_optimizer, *, seed: int, settings: dict, data_dir=None, progress=None,
    parallel: DataParallel | None = None,
) -> RunOutput:  # fmt: skip
    """Run ``lm-continual`` (see the module docstring and :class:`~.base.TaskSpec`).

    Args:
        make_optimizer: ``(model, lr_scale=1.0) -> Optimizer``.
        seed: run seed (model init, optimizer RNG, batch order of every stage).
        settings: the task's settings (a preset with overrides).
        data_dir: root data folder (needed when ``"tinyshakespeare"`` is among the corpora).
        progress: per-step :class:`~.base.Progress` (default none).
        parallel: data parallelism under ``torchrun`` (see the module docstring); None: one
            process.
    """
    s, progress = dict(settings), progress or NullProgress()
    _check_common(s)
    names = _corpus_names(s["corpora"])
    stage_steps = [_pos_int(s, "pretrain_steps")] + [_pos_int(s, "finetune_steps")] * (
        len(names) - 1
    )
    vocab, data = _load(names, data_dir, s["eval_split"], _pos_int(s, "block_size"))
    cfg = _model_config(s, len(vocab))
    _check_parallel(parallel, s, cfg)
    S = len(names)
    L = np.zeros((S, S))
    evals = [Text(d.val) for d in data]

    def after_stage(i: int, model: GPT) -> None:
        for j, text in enumerate(evals):
            evaluate = partial(_eval_loss, model, text, s["eval_batches"], s["batch_size"])
            L[i, j] = once(parallel, evaluate)

    progress.start(sum(stage_steps), desc="lm-continual")
    model, losses, calls, train_s = train_in_turn(
        make_optimizer, s, cfg, [Text(d.train) for d in data], stage_steps, seed, after_stage,
        progress, parallel,
    )  # fmt: skip
    bounds = np.cumsum(stage_steps).tolist()
    return RunOutput(
        metrics=loss_matrix_metrics(L),
        curves={
            "train_loss_vs_step": _curve(
                range(1, len(losses) + 1), losses, "step", "train loss (nats/char)"
            )
        },
        extra={
            "L": L.tolist(),
            "corpora": [d.name for d in data],
            "stage_end_steps": bounds,
            "vocab_size": len(vocab),
            "n_params": model.num_params(non_embedding=False),
            "end_task_calls": calls,
            "train_seconds": train_s,
        },
    )


# -------------------------------------------------------------------------------------- specs

_MODEL_TINY = dict(block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0, tie_weights=True)
_MODEL_QUICK = dict(block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0, tie_weights=True)
# nanoGPT README's CPU configuration of shakespeare_char (block 64, 4 layers, 4 heads, 128 wide,
# batch 12, dropout 0), at a quarter of its 2000 iterations
_MODEL_PAPER = dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, tie_weights=True)
_OPT = dict(grad_clip=1.0, lr_min_ratio=0.1)
# The continual protocol per preset (model, schedule, evaluation), shared by lm-continual and
# lm-skills; each adds its streams
CONTINUAL: dict[str, dict[str, Any]] = {
    "tiny": dict(
        **_MODEL_TINY, **_OPT, batch_size=8, pretrain_steps=30, finetune_steps=15, warmup=3,
        eval_batches=2, task_aware=True,
    ),
    "quick": dict(
        **_MODEL_QUICK, **_OPT, batch_size=12, pretrain_steps=80, finetune_steps=40, warmup=10,
        eval_batches=6, task_aware=True,
    ),
    "paper": dict(
        **_MODEL_PAPER, **_OPT, batch_size=12, pretrain_steps=300, finetune_steps=100,
        warmup=20, eval_batches=16, task_aware=True,
    ),
}  # fmt: skip

LM_PRETRAIN = TaskSpec(
    name="lm-pretrain",
    family="lm",
    description="char-level GPT pretraining (nanoGPT shakespeare_char at CPU scale): val loss",
    metrics=(
        Metric("val_loss", "min", "final validation loss (nats/char)"),
        Metric("best_val_loss", "min", "lowest validation loss over the evaluations"),
        Metric("steps_to_target", "min", "first evaluated step with val loss <= target_loss"),
        Metric("tokens_to_target", "min", "training tokens at steps_to_target"),
        Metric("tokens_per_second", "max", "training throughput (evaluation excluded)"),
    ),
    presets={
        "tiny": dict(
            corpus="stdlib",
            **_MODEL_TINY,
            **_OPT,
            batch_size=8,
            steps=100,
            warmup=5,
            eval_interval=25,
            eval_batches=2,
            target_loss=3.6,
        ),
        "quick": dict(
            corpus="stdlib",
            **_MODEL_QUICK,
            **_OPT,
            batch_size=12,
            steps=150,
            warmup=15,
            eval_interval=25,
            eval_batches=8,
            target_loss=2.7,
        ),
        "paper": dict(
            corpus="tinyshakespeare",
            **_MODEL_PAPER,
            **_OPT,
            batch_size=12,
            steps=500,
            warmup=50,
            eval_interval=50,
            eval_batches=16,
            target_loss=2.4,
        ),
    },
    run=run_pretrain,
    datasets=("tinyshakespeare",),
    data_parallel=True,
)

# The loss-matrix metrics of the continual LM tasks (a stream is a corpus or a skill).
LOSS_MATRIX_METRICS = (
    Metric("avg_final_loss", "min", "mean eval loss over every stream after the last stage"),
    Metric("forgetting", "min", "mean over earlier streams of final minus just-trained loss"),
    Metric("max_forgetting", "min", "largest per-stream forgetting"),
    Metric("learning_loss", "min", "mean eval loss on each stream right after training it"),
)

LM_CONTINUAL = TaskSpec(
    name="lm-continual",
    family="lm-continual",
    description="GPT pretrained on one corpus, fine-tuned on two more in sequence: loss matrix",
    metrics=LOSS_MATRIX_METRICS,
    presets={
        "tiny": dict(corpora=["pydoc", "stdlib", "unicode"], **CONTINUAL["tiny"]),
        "quick": dict(corpora=["pydoc", "stdlib", "unicode"], **CONTINUAL["quick"]),
        "paper": dict(corpora=["tinyshakespeare", "stdlib", "pydoc"], **CONTINUAL["paper"]),
    },
    run=run_continual,
    datasets=("tinyshakespeare",),
    data_parallel=True,
)

TASKS = (LM_PRETRAIN, LM_CONTINUAL)
