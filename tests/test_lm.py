"""The GPT model, the offline corpora and the language-model tasks (tiny presets)."""

import math
import warnings

import numpy as np
import pytest
import torch

import orthoptim
from orthoptim.benchmarks import corpora
from orthoptim.benchmarks._types import TextDataset
from orthoptim.benchmarks.gpt import GPT, GPTConfig
from orthoptim.benchmarks.tasks import get_task
from orthoptim.benchmarks.tasks import lm as lm_tasks
from orthoptim.benchmarks.tasks.lm import LM_CONTINUAL, LM_PRETRAIN, loss_matrix_metrics


def _gpt(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    return GPT(**{**cfg, **kw})


def _adamw(model, lr_scale=1.0):
    return torch.optim.AdamW(model.parameters(), lr=3e-3 * lr_scale)


def _fogo(model, lr_scale=1.0):
    groups = orthoptim.param_groups(model, verbose=False)
    return orthoptim.FOGO(groups, lr=3e-3 * lr_scale, ns_dtype="float32")


# ------------------------------------------------------------------------------------- model


def test_gpt_shapes_and_loss():
    m = _gpt()
    idx = torch.randint(0, 11, (3, 8))
    logits, loss = m(idx)
    assert logits.shape == (3, 8, 11) and loss is None
    logits, loss = m(idx[:, :5], idx[:, 1:6])
    assert logits.shape == (3, 5, 11) and loss.ndim == 0
    # at nanoGPT's init the predictions are near uniform
    assert abs(loss.item() - math.log(11)) < 0.3


def test_gpt_is_causal():
    m = _gpt().eval()
    idx = torch.randint(0, 11, (2, 8))
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    a, _ = m(idx)
    b, _ = m(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_tied_weights_are_one_parameter_and_untied_are_not():
    tied, untied = _gpt(tie_weights=True), _gpt(tie_weights=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == 11 * 16
    with torch.no_grad():
        tied.lm_head.weight[0, 0] = 5.0
    assert tied.transformer.wte.weight[0, 0].item() == 5.0


def test_scaled_init_of_residual_projections():
    m = GPT(vocab_size=50, block_size=8, n_layer=8, n_head=4, n_embd=256)
    std_proj = m.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert std_proj == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std_fc == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("tie", [True, False])
def test_param_groups_route_embeddings_and_head_to_adamw(tie):
    m = _gpt(tie_weights=tie)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = orthoptim.param_groups(m)
    by_alg = {g["algorithm"]: {id(p) for p in g["params"]} for g in groups}
    tr = m.transformer
    for p in (tr.wte.weight, tr.wpe.weight, m.lm_head.weight, tr.ln_f.weight):
        assert id(p) in by_alg["adamw"] and id(p) not in by_alg["fogo"]
    hidden = [b.attn.c_attn.weight for b in tr.h] + [b.mlp.c_proj.weight for b in tr.h]
    assert all(id(p) in by_alg["fogo"] for p in hidden)
    n_unique = len({id(p) for p in m.parameters()})
    assert len(by_alg["adamw"]) + len(by_alg["fogo"]) == n_unique


@pytest.mark.parametrize("cls", [orthoptim.KFAC, orthoptim.FOP])
@pytest.mark.parametrize("tie", [True, False])
def test_kfac_and_fop_steps_are_finite_and_move_the_weights(cls, tie):
    m = _gpt(tie_weights=tie)
    opt = cls(m, lr=0.05, damping=1e-2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        idx = torch.randint(0, 11, (4, 9), generator=g)
        opt.zero_grad()
        _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        assert torch.isfinite(p).all(), n
    assert not torch.equal(
        before["transformer.h.0.attn.c_attn.weight"], m.transformer.h[0].attn.c_attn.weight
    )
    assert getattr(opt, "skipped_steps", 0) == 0


def test_gpt_rejects_bad_config():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(vocab_size=10, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="block_size"):
        GPTConfig(vocab_size=10, block_size=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(vocab_size=10, dropout=1.5)
    with pytest.raises(ValueError, match="idx length"):
        _gpt()(torch.zeros(1, 9, dtype=torch.long))


# ------------------------------------------------------------------------------------ corpora


def test_offline_corpora_are_distinct_and_share_one_vocab():
    ds = [corpora.load_corpus(n) for n in corpora.OFFLINE_CORPORA]
    vocab, mapped = corpora.shared_vocab(ds)
    assert vocab == "".join(sorted(set().union(*(d.vocab for d in ds))))
    for d, m in zip(ds, mapped, strict=True):
        n = len(d.train) + len(d.val)
        assert n > 100_000 and len(d.train) == int(n * 0.9)
        # re-encoding changes ids, not text
        assert m.decode(m.train[:300]) == d.decode(d.train[:300])
        assert m.decode(m.val[-50:]) == d.decode(d.val[-50:])
    assert "def " in mapped[0].decode(mapped[0].train[:5000])  # Python source
    assert "LATIN SMALL LETTER A\n" in mapped[2].decode(mapped[2].train[:5000])


def test_unknown_corpus_raises_naming_it():
    with pytest.raises(ValueError, match="'shakespear'"):
        corpora.load_corpus("shakespear")
    with pytest.raises(ValueError, match="'klingon'"):
        LM_PRETRAIN.run(_adamw, seed=0, settings=LM_PRETRAIN.settings("tiny", corpus="klingon"))
    with pytest.raises(ValueError, match="'klingon'"):
        LM_CONTINUAL.run(
            _adamw, seed=0, settings=LM_CONTINUAL.settings("tiny", corpora=["stdlib", "klingon"])
        )
    with pytest.raises(ValueError, match="data_dir"):
        corpora.load_corpus("tinyshakespeare", None)


# -------------------------------------------------------------------------------------- tasks


def test_tasks_are_registered_with_the_contract():
    assert {t.name for t in lm_tasks.TASKS} == {"lm-pretrain", "lm-continual"}
    assert get_task("lm-pretrain") is LM_PRETRAIN
    for spec in lm_tasks.TASKS:
        assert {"tiny", "quick", "paper"} <= set(spec.presets)
        keys = set(spec.presets["tiny"])
        assert all(set(p) == keys for p in spec.presets.values())
    assert LM_PRETRAIN.primary.name == "val_loss" and LM_CONTINUAL.primary.name == "avg_final_loss"


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lm_tasks.lr_multiplier(k, 20, 4, 0.1) for k in range(20)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))


def test_pretrain_tiny_learns_and_reports_the_declared_metrics():
    out = LM_PRETRAIN.run(_adamw, seed=0, settings=LM_PRETRAIN.settings("tiny"))
    assert set(out.metrics) == {m.name for m in LM_PRETRAIN.metrics}
    vocab = out.extra["vocab_size"]
    m = out.metrics
    assert m["val_loss"] < math.log(vocab) - 0.5
    assert m["best_val_loss"] <= m["val_loss"] and m["tokens_per_second"] > 0
    curve = out.curves["val_loss_vs_step"]
    assert curve["x"][-1] == LM_PRETRAIN.presets["tiny"]["steps"]
    assert curve["y"][-1] == m["val_loss"]
    # steps_to_target is the first evaluated step at or below the target
    target = LM_PRETRAIN.presets["tiny"]["target_loss"]
    first = next(x for x, y in zip(curve["x"], curve["y"], strict=True) if y <= target)
    assert m["steps_to_target"] == first
    assert m["tokens_to_target"] == first * out.extra["tokens_per_step"]
    assert len(out.curves["train_loss_vs_step"]["y"]) == curve["x"][-1]
    assert out.curves["val_loss_vs_tokens"]["y"] == curve["y"]


def test_pretrain_target_never_reached_is_nan():
    s = LM_PRETRAIN.settings("tiny", target_loss=0.01, steps=10, eval_interval=5)
    out = LM_PRETRAIN.run(_adamw, seed=0, settings=s)
    assert math.isnan(out.metrics["steps_to_target"])
    assert math.isnan(out.metrics["tokens_to_target"])


def test_same_seed_gives_identical_metrics_and_other_seed_differs():
    s = LM_PRETRAIN.settings("tiny", steps=20, eval_interval=10)
    runs = [LM_PRETRAIN.run(_fogo, seed=sd, settings=s) for sd in (3, 3, 4)]
    timed = {"tokens_per_second"}
    key = [{k: v for k, v in r.metrics.items() if k not in timed} for r in runs]
    assert key[0] == key[1] and key[0] != key[2]
    assert runs[0].curves["train_loss_vs_step"] == runs[1].curves["train_loss_vs_step"]
    c = LM_CONTINUAL.settings("tiny", pretrain_steps=10, finetune_steps=5)
    a, b = (LM_CONTINUAL.run(_adamw, seed=1, settings=c) for _ in range(2))
    assert a.metrics == b.metrics and a.extra["L"] == b.extra["L"]


class _Poison:
    """Stands in for held-out ids: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"held-out ids read (.{name})")


@pytest.mark.parametrize("spec", [LM_PRETRAIN, LM_CONTINUAL])
def test_val_split_never_reads_held_out_ids(monkeypatch, spec):
    real = corpora.load_corpus

    def poisoned(name, data_dir=None):
        d = real(name, data_dir)
        return TextDataset(train=d.train, val=_Poison(), vocab=d.vocab, name=d.name)

    monkeypatch.setattr(corpora, "load_corpus", poisoned)
    small = (
        dict(steps=10, eval_interval=5)
        if spec is LM_PRETRAIN
        else dict(pretrain_steps=6, finetune_steps=3)
    )
    out = spec.run(_adamw, seed=0, settings=spec.settings("tiny", eval_split="val", **small))
    assert all(math.isfinite(v) for k, v in out.metrics.items() if "target" not in k)
    # the same run on the test split must touch the held-out ids (so the poison is effective)
    with pytest.raises((AssertionError, TypeError, IndexError)):
        spec.run(_adamw, seed=0, settings=spec.settings("tiny", eval_split="test", **small))


def test_loss_matrix_metrics_by_hand():
    L = np.array([[1.0, 4.0, 5.0], [1.5, 2.0, 5.0], [2.5, 2.2, 3.0]])
    m = loss_matrix_metrics(L)
    assert m["avg_final_loss"] == pytest.approx((2.5 + 2.2 + 3.0) / 3)
    assert m["forgetting"] == pytest.approx(((2.5 - 1.0) + (2.2 - 2.0)) / 2)
    assert m["max_forgetting"] == pytest.approx(1.5)
    assert m["learning_loss"] == pytest.approx((1.0 + 2.0 + 3.0) / 3)
    assert math.isnan(loss_matrix_metrics([[2.0]])["forgetting"])
    with pytest.raises(ValueError, match="L shape"):
        loss_matrix_metrics(np.zeros((2, 3)))


class _CountingAdamW(torch.optim.AdamW):
    calls = 0

    def end_task(self):
        type(self).calls += 1


@pytest.mark.parametrize("task_aware", [True, False])
def test_continual_tiny_fills_the_loss_matrix(task_aware):
    _CountingAdamW.calls = 0
    s = LM_CONTINUAL.settings("tiny", task_aware=task_aware)
    out = LM_CONTINUAL.run(
        lambda m, lr_scale=1.0: _CountingAdamW(m.parameters(), lr=3e-3), seed=0, settings=s
    )
    L = np.array(out.extra["L"])
    names = LM_CONTINUAL.presets["tiny"]["corpora"]
    assert L.shape == (3, 3) and out.extra["corpora"] == names
    assert np.isfinite(L).all()
    assert set(out.metrics) == {m.name for m in LM_CONTINUAL.metrics}
    assert out.metrics == pytest.approx(loss_matrix_metrics(L))
    assert (np.diag(L) < math.log(out.extra["vocab_size"])).all()
    assert _CountingAdamW.calls == out.extra["end_task_calls"] == (3 if task_aware else 0)
    steps = s["pretrain_steps"] + 2 * s["finetune_steps"]
    assert len(out.curves["train_loss_vs_step"]["y"]) == steps


def test_progress_is_started_and_advanced():
    class P:
        total, done = None, 0

        def start(self, total, desc=""):
            self.total = total

        def advance(self, n=1):
            self.done += n

    p = P()
    LM_PRETRAIN.run(
        _adamw, seed=0, settings=LM_PRETRAIN.settings("tiny", steps=7, eval_interval=7), progress=p
    )
    assert p.total == p.done == 7


def test_bad_settings_raise_naming_the_setting():
    with pytest.raises(ValueError, match="batch_size"):
        LM_PRETRAIN.run(_adamw, seed=0, settings=LM_PRETRAIN.settings("tiny", batch_size=0))
    with pytest.raises(ValueError, match="block_size"):
        LM_PRETRAIN.run(_adamw, seed=0, settings=LM_PRETRAIN.settings("tiny", block_size=10**7))
    with pytest.raises(ValueError, match="corpora"):
        LM_CONTINUAL.run(
            _adamw, seed=0, settings=LM_CONTINUAL.settings("tiny", corpora=["stdlib", "stdlib"])
        )
