"""``lm-skills``: the synthetic skills, the answer-only windows, exact match and the metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orthoptim.benchmarks import corpora, skills
from orthoptim.benchmarks.gpt import GPT
from orthoptim.benchmarks.suites import get_suite
from orthoptim.benchmarks.tasks import get_task, lm_skills
from orthoptim.benchmarks.tasks.lm import Text, _evaluate, lr_multiplier
from orthoptim.benchmarks.tasks.lm_skills import LM_SKILLS, encode_examples, skills_metrics


def _adamw(model, lr_scale=1.0):
    return torch.optim.AdamW(model.parameters(), lr=3e-3 * lr_scale)


# -------------------------------------------------------------------------------------- data


def _solve(prompt: str) -> str:
    name, arg = prompt[:-1].split(":")
    if name == "add":
        a, b = arg.split("+")
        return str(int(a) + int(b))
    return arg[::-1] if name == "rev" else "".join(sorted(arg))


@pytest.mark.parametrize("name", skills.SKILLS)
def test_skill_examples_are_right_seeded_and_split_by_prompt(name):
    train, test = skills.skill_examples(name, 3, 300, 40)
    assert len(train) == 300 and len(test) == 40
    for ex in train + test:
        assert ex.prompt.startswith(f"{name}:") and ex.prompt.endswith("=")
        assert ex.answer == _solve(ex.prompt) + "\n"
        assert set(ex.prompt + ex.answer) <= set(skills.SKILL_CHARS)
    # the held-out side is exactly the prompts that hash there: no prompt on both sides
    assert all(skills.is_test_prompt(e.prompt) for e in test)
    assert not any(skills.is_test_prompt(e.prompt) for e in train)
    assert skills.skill_examples(name, 3, 300, 40) == (train, test)
    assert skills.skill_examples(name, 4, 300, 40)[0] != train
    with pytest.raises(ValueError, match="n_test"):
        skills.skill_examples(name, 3, 10, 0)
    with pytest.raises(ValueError, match="'mul'"):
        skills.skill_examples("mul", 3, 10, 10)


def test_encoded_examples_score_answers_and_windows_start_at_examples():
    exs = [skills.SkillExample("rev:ab=", "ba\n"), skills.SkillExample("add:1+2=", "3\n")]
    stoi = {c: i for i, c in enumerate(skills.SKILL_CHARS)}
    t = encode_examples(exs, stoi)
    text = "rev:ab=ba\nadd:1+2=3\n"
    assert t.ids.tolist() == [stoi[c] for c in text]
    assert "".join(c for c, s in zip(text, t.scored.tolist(), strict=True) if s) == "ba\n3\n"
    assert t.example.tolist() == [0] * 10 + [1] * 10
    assert t.last_of_example().nonzero().squeeze(1).tolist() == [9, 19]
    assert t.window_starts(4).tolist() == [0, 10]  # both examples start a whole window
    assert t.window_starts(10).tolist() == [0]  # the second one has no 10 + 1 ids after it
    assert Text(t.ids).window_starts(4) is None  # plain text: any start
    whole = encode_examples(exs, stoi, scored="example")
    assert whole.ids.tolist() == t.ids.tolist() and whole.example.tolist() == t.example.tolist()
    assert whole.scored.all()  # sft_loss="example": prompt and answer are targets
    # answer_context: the first `context` characters of each example and its answer
    mixed = encode_examples(exs, stoi, scored="answer_context", context=2)
    assert "".join(c for c, s in zip(text, mixed.scored.tolist(), strict=True) if s) == (
        "reba\nad3\n"
    )
    assert encode_examples(exs, stoi, "answer_context").scored.tolist() == t.scored.tolist()
    with pytest.raises(ValueError, match="'prompt'"):
        encode_examples(exs, stoi, scored="prompt")


def test_context_passages_are_seeded_slices_of_the_base_text():
    exs = skills.skill_examples("rev", 0, 20, 5)[0]
    base = "".join(chr(ord("A") + k % 26) for k in range(100))
    out = lm_skills._with_context(exs, base, 7, [0, 0, 1])
    assert lm_skills._with_context(exs, base, 0, [0, 0, 1]) == exs
    assert out == lm_skills._with_context(exs, base, 7, [0, 0, 1])
    assert out != lm_skills._with_context(exs, base, 7, [1, 0, 1])
    for e, c in zip(exs, out, strict=True):
        assert c.answer == e.answer and c.prompt.endswith("\n" + e.prompt)
        passage = c.prompt[: -len(e.prompt) - 1]
        assert len(passage) == 7 and passage in base


# ------------------------------------------------------------------------------- evaluation


def _toy_text(gen: torch.Generator, n: int, vocab: int) -> Text:
    """Random examples over ``vocab`` ids: 2-3 prompt ids, then 1-2 scored answer ids."""
    ids, scored, example = [], [], []
    for k in range(n):
        p, a = 2 + int(torch.randint(2, (1,), generator=gen)), 1 + k % 2
        ids += torch.randint(vocab, (p + a,), generator=gen).tolist()
        scored += [False] * p + [True] * a
        example += [k] * (p + a)
    return Text(torch.tensor(ids), torch.tensor(scored), torch.tensor(example))


@torch.no_grad()
def test_evaluate_equals_greedy_decoding_and_scored_cross_entropy_by_brute_force():
    gen = torch.Generator().manual_seed(0)
    V, T = 3, 8
    text = _toy_text(gen, 60, V)
    torch.manual_seed(0)
    model = GPT(vocab_size=V, block_size=T, n_layer=1, n_head=1, n_embd=8).eval()
    loss, exact = _evaluate(model, text, batches=3, batch_size=4)
    # the oracle: every window, every example completed in it, decoded greedily from its prompt
    ids, ex = text.ids.tolist(), text.example.tolist()
    allowed = text.window_starts(T)
    starts = allowed[torch.linspace(0, len(allowed) - 1, 12).round().long()].tolist()
    nll, count, right, done = 0.0, 0, 0, 0
    for s in starts:
        logits, _ = model(text.ids[s : s + T][None])
        for t in range(T):
            if text.scored[s + t + 1]:
                nll += float(F.cross_entropy(logits[0, t], text.ids[s + t + 1]))
                count += 1
        for e in sorted({ex[p] for p in range(s + 1, s + T + 1)}):
            pos = [p for p in range(len(ids)) if ex[p] == e]
            if pos[-1] > s + T:
                continue  # not completed inside the window
            answer = [p for p in pos if text.scored[p]]
            ctx = ids[s : answer[0]]
            for _ in answer:  # greedy decoding: append the argmax, feed it back
                ctx.append(int(model(torch.tensor([ctx]))[0][0, -1].argmax()))
            right += ctx[-len(answer) :] == [ids[p] for p in answer]
            done += 1
    assert loss == pytest.approx(nll / count, rel=1e-5)
    assert 0 < right < done  # a non-trivial case: some answers right, some wrong
    assert exact == pytest.approx(right / done)
    # plain text: every target scored, no exact match
    plain_loss, plain_exact = _evaluate(model, Text(text.ids), batches=1, batch_size=4)
    assert math.isfinite(plain_loss) and math.isnan(plain_exact)


def test_skills_metrics_by_hand():
    # base corpus, then skills a and b: L[i, j] loss on stream j after stage i
    L = [[2.0, 3.0, 3.5], [2.4, 1.0, 3.2], [2.7, 1.6, 0.8]]
    A = [[0.0, 0.0], [0.5, 0.1], [0.2, 0.9]]
    m = skills_metrics(L, A)
    assert m["avg_final_loss"] == pytest.approx((2.7 + 1.6 + 0.8) / 3)
    assert m["forgetting"] == pytest.approx(((2.7 - 2.0) + (1.6 - 1.0)) / 2)
    assert m["max_forgetting"] == pytest.approx(0.7)
    assert m["learning_loss"] == pytest.approx((2.0 + 1.0 + 0.8) / 3)
    assert m["base_forgetting"] == pytest.approx(0.7)
    assert m["skill_forgetting"] == pytest.approx(0.6)
    assert m["exact_match"] == pytest.approx((0.2 + 0.9) / 2)
    assert m["exact_match_forgetting"] == pytest.approx(0.5 - 0.2)
    one = skills_metrics([r[:2] for r in L[:2]], [[0.0], [0.5]])
    assert math.isnan(one["skill_forgetting"]) and math.isnan(one["exact_match_forgetting"])
    with pytest.raises(ValueError, match="L/A shapes"):
        skills_metrics(L, [[0.0, 0.0]])


# -------------------------------------------------------------------------------------- task


class _CountingAdamW(torch.optim.AdamW):
    calls = 0

    def end_task(self):
        type(self).calls += 1


@pytest.mark.parametrize("task_aware", [True, False])
def test_tiny_run_fills_both_matrices_and_is_deterministic(task_aware):
    _CountingAdamW.calls = 0
    s = LM_SKILLS.settings("tiny", task_aware=task_aware)
    make = lambda m, lr_scale=1.0: _CountingAdamW(m.parameters(), lr=3e-3)  # noqa: E731
    out = LM_SKILLS.run(make, seed=0, settings=s)
    L, A = np.array(out.extra["L"]), np.array(out.extra["A"])
    assert L.shape == (4, 4) and A.shape == (4, 3)
    assert out.extra["streams"] == ["pydoc", "add", "rev", "sort"]
    assert np.isfinite(L).all() and ((A >= 0) & (A <= 1)).all()
    assert set(out.metrics) == {m.name for m in LM_SKILLS.metrics}
    assert out.metrics == pytest.approx(skills_metrics(L, A), nan_ok=True)
    # each skill is learned in its stage: its loss drops below the pretrained model's
    assert all(L[j, j] < L[0, j] for j in (1, 2, 3))
    assert _CountingAdamW.calls == out.extra["end_task_calls"] == (4 if task_aware else 0)
    steps = s["pretrain_steps"] + 3 * s["finetune_steps"]
    assert len(out.curves["train_loss_vs_step"]["y"]) == steps
    if task_aware:
        again = LM_SKILLS.run(_adamw, seed=0, settings=s)
        assert again.extra["L"] == LM_SKILLS.run(_adamw, seed=0, settings=s).extra["L"]


def _spy_run(monkeypatch, **overrides):
    """Run the tiny preset briefly; return the training texts and the evaluated texts."""
    seen: dict = {"evals": []}
    real_train, real_eval = lm_skills.train_in_turn, lm_skills._evaluate

    def train(make, s, cfg, texts, steps, seed, after, progress, **kw):
        seen["train"] = texts
        return real_train(make, s, cfg, texts, steps, seed, after, progress, **kw)

    def evaluate(model, text, *a):
        seen["evals"].append(text)
        return real_eval(model, text, *a)

    monkeypatch.setattr(lm_skills, "train_in_turn", train)
    monkeypatch.setattr(lm_skills, "_evaluate", evaluate)
    s = LM_SKILLS.settings("tiny", pretrain_steps=2, finetune_steps=2, **overrides)
    LM_SKILLS.run(_adamw, seed=0, settings=s)
    return seen


def _scored_chars(text: Text, vocab: str) -> str:
    pairs = zip(text.ids.tolist(), text.scored.tolist(), strict=True)
    return "".join(vocab[i] for i, s in pairs if s)


@pytest.mark.parametrize("sft_loss", ["answer", "example", "answer_context"])
@pytest.mark.parametrize("context_chars", [0, 9])
def test_training_scores_what_sft_loss_says_and_evaluation_only_answers(
    monkeypatch, sft_loss, context_chars
):
    seen = _spy_run(monkeypatch, sft_loss=sft_loss, context_chars=context_chars)
    vocab = "".join(sorted(set(skills.SKILL_CHARS).union(corpora.load_corpus("pydoc").vocab)))
    base, *skill_train = seen["train"]
    assert base.scored is None  # pretraining: every character
    for text in skill_train:
        chars = "".join(vocab[i] for i in text.ids.tolist())
        if sft_loss == "example":
            assert text.scored.all()
            continue
        sizes = torch.unique_consecutive(text.example, return_counts=True)[1].tolist()
        ends = np.cumsum(sizes)
        examples = [chars[e - n : e] for e, n in zip(ends, sizes, strict=True)]
        assert all(e.count("=") >= 1 and e.endswith("\n") for e in examples)
        # the answer is what follows the example's last "=", the passage its first characters
        # and a newline (answer_context only)
        lead = context_chars + 1 if sft_loss == "answer_context" and context_chars else 0
        if lead:
            assert all(e[lead - 1] == "\n" for e in examples)
        want = "".join(e[:lead] + e.rsplit("=", 1)[1] for e in examples)
        assert _scored_chars(text, vocab) == want
    for text in seen["evals"]:  # the base corpus per character, the skills on answers only
        if text.scored is not None:
            chars = _scored_chars(text, vocab)
            assert set(chars) <= set("0123456789abcdefghijklmnopqrstuvwxyz\n")
            assert chars.endswith("\n") and "=" not in chars and ":" not in chars
    assert sum(t.scored is None for t in seen["evals"]) == 4  # base, after each of 4 stages


def test_finetune_lr_scale_scales_every_fine_tuning_step():
    lrs: list[float] = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    s = LM_SKILLS.settings("tiny", pretrain_steps=6, finetune_steps=5, finetune_lr_scale=0.25)
    LM_SKILLS.run(lambda m, lr_scale=1.0: Recording(m.parameters(), lr=0.01), seed=0, settings=s)
    w, floor = s["warmup"], s["lr_min_ratio"]
    want = [0.01 * lr_multiplier(k, 6, w, floor) for k in range(6)]
    want += 3 * [0.0025 * lr_multiplier(k, 5, w, floor) for k in range(5)]
    assert lrs == pytest.approx(want)


class _Poison(list):
    """Stands in for held-out examples: any read fails the test."""

    def __getitem__(self, k):
        raise AssertionError("held-out examples read")

    def __iter__(self):
        raise AssertionError("held-out examples read")


def test_val_split_never_reads_held_out_examples(monkeypatch):
    real = skills.skill_examples
    monkeypatch.setattr(
        lm_skills, "skill_examples", lambda *a: (real(*a)[0], _Poison())
    )  # fmt: skip
    small = dict(pretrain_steps=4, finetune_steps=2)
    val = LM_SKILLS.settings("tiny", eval_split="val", **small)
    out = LM_SKILLS.run(_adamw, seed=0, settings=val)
    assert math.isfinite(out.metrics["avg_final_loss"])
    with pytest.raises(AssertionError, match="held-out"):
        LM_SKILLS.run(_adamw, seed=0, settings=LM_SKILLS.settings("tiny", **small))


def test_registered_in_both_suites_with_the_task_agnostic_fogo():
    assert get_task("lm-skills") is LM_SKILLS and LM_SKILLS.family == "lm-continual"
    keys = set(LM_SKILLS.presets["tiny"])
    assert all(set(p) == keys for p in LM_SKILLS.presets.values())
    for name in ("quick", "paper"):
        items = [it for it in get_suite(name).items if it.task == "lm-skills"]
        assert {o for it in items for o in it.optimizers} == {"adamw", "muon", "fogo-nomem", "fogo"}
        agnostic = [it for it in items if it.overrides.get("task_aware") is False]
        assert len(agnostic) == 1 and agnostic[0].optimizers == ("fogo",)


@pytest.mark.parametrize(
    "key, value",
    [("skills", ["rev", "mul"]), ("skills", ["rev", "rev"]), ("base_corpus", "klingon"),
     ("skill_test_examples", 1), ("skill_train_examples", 0), ("sft_loss", "prompt"),
     ("finetune_lr_scale", 0.0), ("finetune_lr_scale", "0.1"), ("context_chars", -1),
     ("context_chars", 20)],  # tiny: block 32, 20 + 1 + 11 + 6 > 33 characters
)  # fmt: skip
def test_bad_settings_raise_naming_the_setting(key, value):
    with pytest.raises(ValueError, match=key if key != "base_corpus" else "klingon"):
        LM_SKILLS.run(_adamw, seed=0, settings=LM_SKILLS.settings("tiny", **{key: value}))
