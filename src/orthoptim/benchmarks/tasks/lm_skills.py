"""``lm-skills``: a GPT pretrained on a base corpus, then fine-tuned on synthetic skills in turn.

The second stand-in (family ``"lm-continual"``) for FOGO's continual instruction tuning, closer
to it than ``lm-continual``'s three corpora: stage 0 pretrains the char-level GPT of
:mod:`.lm` on a base corpus (paper: Tiny Shakespeare; tiny/quick: ``pydoc``'s help text), then
stages 1..K fine-tune it on one instruction-like skill each (:mod:`..skills`: presets in the
order ``"add:12+34=46\\n"``, ``"rev:abc=cba\\n"``, ``"sort:cab=abc\\n"``). Settings of the
fine-tuning stages:

- ``context_chars`` (presets: 16; tiny: 8): each example follows a passage of that many
  characters of the base corpus and a newline (a random passage per example, drawn from the run
  seed; training examples from its training text, held-out ones from its evaluation text), so
  the instructions sit in text of the language the model was pretrained on; 0: bare examples.
- ``sft_loss``: which characters of an example are targets. ``"answer"``: the answer only
  (after ``=``, the closing newline included), the usual supervised fine-tuning loss;
  ``"example"``: every character; ``"answer_context"`` (presets): the passage (with its
  newline) and the answer, the prompt being context only.
- ``finetune_lr_scale`` (presets: 1): a factor on the whole lr schedule of every fine-tuning
  stage (pretraining keeps the tuned lr).

Why the presets (probes on the paper preset, seed 0, in docs/benchmarks.md): answer-only
fine-tuning on these narrow alphabets makes the model confident in them everywhere, so the base
corpus' loss rose above the uniform ``log V``, and a lower fine-tuning lr or whole-example
training did not keep it below; passages trained with the answers do, and ``add``'s digits
erased both string skills when it came last.

Windows of ``block_size`` characters start at an example's first character (its passage's),
so every answer sees its prompt; an example longer than a window is refused (``ValueError``
naming ``context_chars``). The base corpus is trained and scored on every character.

After every stage the loss on every stream fills ``L[i, j]`` (``j = 0`` the base corpus' held-out
text in nats per character, ``j >= 1`` skill ``j``'s held-out examples in nats per answer
character), and greedy exact match fills ``A[i, k]`` for skill ``k`` (the fraction of held-out
examples whose whole answer greedy decoding reproduces; computed from the teacher-forced logits,
which is the same thing). Metrics:

- ``avg_final_loss``, ``forgetting``, ``max_forgetting``, ``learning_loss``: those of
  :func:`.lm.loss_matrix_metrics` over the whole ``L`` (base and skills alike);
- ``base_forgetting = L[S-1, 0] - L[0, 0]``: what the skills cost the pretrained model;
- ``skill_forgetting = mean_{1 <= j < S-1} (L[S-1, j] - L[j, j])``: earlier skills only;
- ``exact_match = mean_k A[S-1, k]`` and
  ``exact_match_forgetting = mean_{k < K-1} (A[k+1, k] - A[S-1, k])`` (positive = forgot).

Everything else is ``lm-continual``'s protocol (:func:`.lm.train_in_turn`: one lr schedule per
stage, clipping, ``end_task()`` between stages when ``task_aware``, seeded initialisation); the
skills' examples are drawn from the run seed (:func:`..skills.skill_examples`), so seeds differ
in data as well as in initialisation and batch order. ``eval_split="val"`` evaluates the base
corpus on the tail of its training text and each skill on the last ``VAL_FRAC`` of its training
examples (the held-out examples are never read). One process only (no ``torchrun``: the
masked loss is a ratio, so averaging the ranks' shard losses would not give the global one).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..skills import SKILL_CHARS, SKILLS, SkillExample, skill_examples
from .base import Metric, NullProgress, RunOutput, TaskSpec
from .lm import (
    CONTINUAL,
    LOSS_MATRIX_METRICS,
    VAL_FRAC,
    Text,
    _check_common,
    _corpus_names,
    _curve,
    _evaluate,
    _load,
    _model_config,
    _number,
    _pos_int,
    loss_matrix_metrics,
    train_in_turn,
)

__all__ = ["TASKS", "LM_SKILLS", "skills_metrics", "encode_examples"]


def skills_metrics(L, A) -> dict[str, float]:
    """The ``lm-skills`` metrics (module docstring) of the loss and exact-match matrices.

    Args:
        L: ``(S, S)`` losses, stream 0 the base corpus, streams ``1..S-1`` the skills in order.
        A: ``(S, S-1)`` exact match, ``A[i, k]`` on skill ``k`` (stream ``k+1``) after stage ``i``.
    """
    L, A = np.asarray(L, dtype=float), np.asarray(A, dtype=float)
    out = loss_matrix_metrics(L)
    S = L.shape[0]
    if S < 2 or A.shape != (S, S - 1):
        raise ValueError(f"Invalid L/A shapes: {L.shape}/{A.shape}; expected (S, S), (S, S-1)")
    last = S - 1
    skills = np.arange(1, last)  # the skills trained before the last stage
    out["base_forgetting"] = float(L[last, 0] - L[0, 0])
    out["skill_forgetting"] = (
        float((L[last, skills] - L[skills, skills]).mean()) if len(skills) else math.nan
    )
    out["exact_match"] = float(A[last].mean())
    out["exact_match_forgetting"] = (
        float((A[skills, skills - 1] - A[last, skills - 1]).mean()) if len(skills) else math.nan
    )
    return out


SFT_LOSSES = ("answer", "example", "answer_context")


def encode_examples(
    examples: list[SkillExample], stoi: dict[str, int], scored: str = "answer", context: int = 0
) -> Text:
    """The examples one after another as a :class:`.lm.Text`, one example id per example.

    Args:
        examples: the examples, in order.
        stoi: character -> id (must hold every character of the examples).
        scored: which characters are targets: ``"answer"`` the answers only (after ``=``, the
            newline included), ``"example"`` every character (prompt and answer),
            ``"answer_context"`` the answers and each example's first ``context`` characters.
        context: the length of the passage (its newline included) that opens each prompt.
    """
    if scored not in SFT_LOSSES:
        raise ValueError(f"Invalid scored: {scored!r}; expected one of {SFT_LOSSES}")
    text = "".join(e.prompt + e.answer for e in examples)
    lengths = np.array([len(e.prompt) + len(e.answer) for e in examples])
    prompts = np.array([len(e.prompt) for e in examples])
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    offset = np.arange(len(text)) - first  # position inside its example
    return Text(
        ids=torch.tensor([stoi[c] for c in text], dtype=torch.int64),
        scored=torch.from_numpy(_mask(offset, np.repeat(prompts, lengths), scored, context)),
        example=torch.from_numpy(np.repeat(np.arange(len(examples)), lengths)),
    )


def _mask(offset, prompt_len, scored: str, context: int):
    """bool per character (``offset`` inside its example) for :func:`encode_examples`."""
    if scored == "example":
        return np.ones_like(offset, dtype=bool)
    answer = offset >= prompt_len
    return answer | (offset < context) if scored == "answer_context" else answer


def _skill_names(value) -> list[str]:
    names = value.split(",") if isinstance(value, str) else list(value)
    bad = [n for n in names if n not in SKILLS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"Invalid skills: {value!r}; expected distinct names from {SKILLS}")
    return names


def _with_context(
    examples: list[SkillExample], base: str, n: int, seq: list[int]
) -> list[SkillExample]:
    """Each example's prompt preceded by a random ``n``-character passage of ``base`` and a
    newline (passages drawn by ``SeedSequence(seq)``); ``n = 0``: the examples unchanged."""
    if n == 0:
        return examples
    if n > len(base):
        raise ValueError(f"Invalid context_chars: {n!r}; the base text has {len(base)} characters")
    rng = np.random.default_rng(np.random.SeedSequence(seq))
    starts = rng.integers(0, len(base) - n + 1, size=len(examples))
    return [
        SkillExample(base[int(a) : int(a) + n] + "\n" + e.prompt, e.answer)
        for a, e in zip(starts, examples, strict=True)
    ]


def _skill_texts(
    name: str, seed: int, s: dict, stoi: dict[str, int], base: tuple[str, str]
) -> tuple[Text, Text]:
    """(train, eval) texts of one skill; ``eval_split="val"`` holds out training examples;
    ``base`` is the base corpus' (train, eval) text the context passages come from."""
    n_train = _pos_int(s, "skill_train_examples")
    train, test = skill_examples(name, seed, n_train, _pos_int(s, "skill_test_examples"))
    if s["eval_split"] == "val":
        n_val = max(1, int(n_train * VAL_FRAC))
        train, test = train[:-n_val], train[-n_val:]
    n, k = _pos_int(s, "context_chars", zero_ok=True), SKILLS.index(name)
    train = _with_context(train, base[0], n, [int(seed), k, 1])
    test = _with_context(test, base[1], n, [int(seed), k, 2])
    longest = max(len(e.prompt) + len(e.answer) for e in train + test)
    if longest > s["block_size"] + 1:  # a window holds block_size + 1 ids (inputs and targets)
        raise ValueError(
            f"Invalid context_chars: {n!r}; a {name!r} example of {longest} characters does not "
            f"fit one window of block_size={s['block_size']}"
        )
    out = (
        encode_examples(train, stoi, s["sft_loss"], n + 1 if n else 0),
        encode_examples(test, stoi),
    )
    for what, text in zip(("skill_train_examples", "skill_test_examples"), out, strict=True):
        starts = text.window_starts(s["block_size"])
        if starts is None or len(starts) == 0:
            raise ValueError(
                f"Invalid {what}: too few {name!r} examples ({len(text.ids)} characters) for "
                f"one window of block_size={s['block_size']}"
            )
    return out


def run_skills(
    make_optimizer, *, seed: int, settings: dict, data_dir=None, progress=None
) -> RunOutput:
    """Run ``lm-skills`` (see the module docstring and :class:`~.base.TaskSpec`).

    Args:
        make_optimizer: ``(model, lr_scale=1.0) -> Optimizer``.
        seed: run seed (model init, optimizer RNG, batch order, the skills' examples).
        settings: the task's settings (a preset with overrides).
        data_dir: root data folder (needed for ``base_corpus="tinyshakespeare"``).
        progress: per-step :class:`~.base.Progress` (default none).
    """
    s, progress = dict(settings), progress or NullProgress()
    _check_common(s)
    if not isinstance(s["base_corpus"], str):
        raise ValueError(f"Invalid base_corpus: {s['base_corpus']!r}; expected one corpus name")
    base = _corpus_names([s["base_corpus"]])
    names = _skill_names(s["skills"])
    if s["sft_loss"] not in SFT_LOSSES:
        raise ValueError(f"Invalid sft_loss: {s['sft_loss']!r}; expected one of {SFT_LOSSES}")
    ft_scale = _number(s, "finetune_lr_scale", 0.0)
    if ft_scale == 0.0:
        raise ValueError(f"Invalid finetune_lr_scale: {ft_scale!r}; expected a number > 0")
    block = _pos_int(s, "block_size")
    vocab, (ds,) = _load(base, data_dir, s["eval_split"], block, extra=SKILL_CHARS)
    stoi = {ch: i for i, ch in enumerate(vocab)}
    chars = tuple("".join(vocab[i] for i in ids.tolist()) for ids in (ds.train, ds.val))
    skills = [_skill_texts(n, seed, s, stoi, chars) for n in names]
    cfg = _model_config(s, len(vocab))
    steps = [_pos_int(s, "pretrain_steps")] + [_pos_int(s, "finetune_steps")] * len(names)
    evals = [Text(ds.val)] + [ev for _, ev in skills]
    S = len(evals)
    L, A = np.zeros((S, S)), np.zeros((S, S - 1))

    def after_stage(i: int, model) -> None:
        for j, text in enumerate(evals):
            L[i, j], exact = _evaluate(model, text, s["eval_batches"], s["batch_size"])
            if j:
                A[i, j - 1] = exact

    progress.start(sum(steps), desc="lm-skills")
    model, losses, calls, train_s = train_in_turn(
        make_optimizer, s, cfg, [Text(ds.train)] + [tr for tr, _ in skills], steps, seed,
        after_stage, progress, stage_lr_scales=[1.0] + [ft_scale] * len(names),
    )  # fmt: skip
    return RunOutput(
        metrics=skills_metrics(L, A),
        curves={
            "train_loss_vs_step": _curve(
                range(1, len(losses) + 1), losses, "step", "train loss (nats/scored char)"
            )
        },
        extra={
            "L": L.tolist(),
            "A": A.tolist(),
            "streams": [ds.name, *names],
            "stage_end_steps": np.cumsum(steps).tolist(),
            "vocab_size": len(vocab),
            "n_params": model.num_params(non_embedding=False),
            "end_task_calls": calls,
            "train_seconds": train_s,
        },
    )


# The skills in stage order, arithmetic first (its digits stage erased both string skills' exact
# match when it came last); each example after a 16-character passage of the base corpus,
# trained on the passage and the answer (the module docstring says why)
_SKILLS = dict(
    skills=["add", "rev", "sort"], sft_loss="answer_context", finetune_lr_scale=1.0,
    context_chars=16,
)  # fmt: skip

LM_SKILLS = TaskSpec(
    name="lm-skills",
    family="lm-continual",
    description="GPT pretrained on a corpus, fine-tuned on 3 synthetic string skills in turn",
    metrics=(
        *LOSS_MATRIX_METRICS,
        Metric("base_forgetting", "min", "base corpus: final minus after-pretraining loss"),
        Metric("skill_forgetting", "min", "forgetting over the earlier skills only"),
        Metric("exact_match", "max", "mean greedy exact match over the skills at the end"),
        Metric("exact_match_forgetting", "min", "mean drop of earlier skills' exact match"),
    ),
    presets={
        "tiny": dict(
            base_corpus="pydoc", **{**_SKILLS, "context_chars": 8}, **CONTINUAL["tiny"],
            skill_train_examples=400, skill_test_examples=100,
        ),
        "quick": dict(
            base_corpus="pydoc", **_SKILLS, **CONTINUAL["quick"],
            skill_train_examples=2000, skill_test_examples=300,
        ),
        # 150 fine-tuning steps per skill (lm-continual: 100); FOGO's exact match after 200 steps
        # was 83% on rev and 74% on sort (seed 0), 150 keeps a run near 3 minutes on one thread
        "paper": dict(
            base_corpus="tinyshakespeare", **_SKILLS,
            **{**CONTINUAL["paper"], "finetune_steps": 150},
            skill_train_examples=20000, skill_test_examples=1000,
        ),
    },  # fmt: skip
    run=run_skills,
    datasets=("tinyshakespeare",),
)

TASKS = (LM_SKILLS,)
