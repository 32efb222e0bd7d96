"""Gradient accumulation: k backward calls before one step() give the full batch's factors and
(FOP) the documented sub-batch gradients: k = 2 and k = 4 equal the full batch for K-FAC; for FOP
k = 2 equals the full batch, k = 4 the full batch ordered [mb1 | mb3 | mb2 | mb4] (odd- against
even-numbered micro-batches), odd k the odd/even unions; Hugging Face Trainer's token-count
normalisation; DDP's no_sync()."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthoptim import FOP, KFAC

D = torch.float64
KW = dict(lr=0.1, factor_interval=1, inverse_interval=1, factor_dtype="float64", damping=0.05,
          max_grad_norm=None, weight_decay=1e-3)  # fmt: skip


def model_fn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 6), nn.Tanh(),
        nn.Linear(6, 3),
    ).double()  # fmt: skip


def data(steps=3, batch=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 2, 4, 4, generator=g, dtype=D),
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]  # fmt: skip


def train(cls, batches, k, order=None, **kw):
    """``k`` micro-batches per step (``order`` permutes them), each loss divided by ``k``."""
    model = model_fn()
    opt = cls(model, **(KW | kw))
    for x, y in batches:
        opt.zero_grad()
        xs, ys = x.chunk(k), y.chunk(k)
        for i in order or range(k):
            (F.cross_entropy(model(xs[i]), ys[i]) / k).backward()
        opt.step()
    return model, opt


def assert_same(a, b, tol=1e-10):
    (ma, oa), (mb, ob) = a, b
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol)
    for ba, bb in zip(oa._blocks, ob._blocks, strict=True):
        for key in ("A", "G"):
            torch.testing.assert_close(oa.block_state(ba)[key], ob.block_state(bb)[key],
                                       rtol=tol, atol=tol)  # fmt: skip


@pytest.mark.parametrize("k", [2, 4])
def test_kfac_accumulation_equals_the_full_batch(k):
    batches = data()
    assert_same(train(KFAC, batches, k), train(KFAC, batches, 1))


def test_fop_k2_equals_the_full_batch_and_k4_the_interleaved_batch():
    batches = data()
    full = train(FOP, batches, 1)
    assert_same(train(FOP, batches, 2), full)
    # k = 4: halves {mb1, mb3} and {mb2, mb4} = the full batch ordered [mb1 | mb3 | mb2 | mb4]
    perm = [0, 2, 1, 3]
    reordered = [tuple(torch.cat([t.chunk(4)[i] for i in perm]) for t in xy) for xy in batches]
    assert_same(train(FOP, batches, 4, order=[0, 1, 2, 3]), train(FOP, reordered, 1))
    etas = [float(full[1].block_state(b)["eta"]) for b in full[1]._blocks]
    assert all(0.0 < e <= 2.0 for e in etas)  # the FOP path was taken


@pytest.mark.parametrize("k", [3, 5])
def test_fop_odd_k_halves_are_the_odd_and_even_micro_batches(k):
    """Odd k: g1 = the mean gradient over the odd-numbered micro-batches, g2 over the even ones
    (unequal halves, weighted by their sample counts)."""
    model = model_fn()
    opt = FOP(model, **KW)
    x, y = data(1, batch=2 * k)[0]
    xs, ys = x.chunk(k), y.chunk(k)
    for i in range(k):
        (F.cross_entropy(model(xs[i]), ys[i]) / k).backward()
    ref = model_fn()  # the same weights, not hooked
    params = dict(ref.named_parameters())
    means = []
    for part in (range(0, k, 2), range(1, k, 2)):
        xp, yp = torch.cat([xs[i] for i in part]), torch.cat([ys[i] for i in part])
        grads = torch.autograd.grad(F.cross_entropy(ref(xp), yp), list(params.values()))
        means.append(dict(zip(params, grads, strict=True)))
    names = {p: n for n, p in model.named_parameters()}
    for blk in opt._blocks:
        U, n, n_odd = opt._capture.halves_of(blk)
        assert (n, n_odd) == (2 * k, 2 * ((k + 1) // 2))
        g1, g2 = U[1] * (n / n_odd), (U[0] - U[1]) * (n / (n - n_odd))
        for got, m in ((g1, means[0]), (g2, means[1])):
            want = torch.cat([m[names[blk.weight]].flatten(1), m[names[blk.bias]][:, None]], 1)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(13, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 13)

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def _lm_batches(steps=3):
    """Sequences of 6 tokens; labels -100 (ignored) on a random tail, so token counts differ."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, 13, (8, 6), generator=g)
        labels = torch.randint(0, 13, (8, 6), generator=g)
        keep = torch.randint(1, 7, (8,), generator=g)
        labels[torch.arange(6)[None, :] >= keep[:, None]] = -100
        out.append((idx, labels))
    return out


def _hf_train(cls, k: int):
    """Hugging Face Trainer's causal-LM accumulation: each micro-batch loss is its summed token
    loss divided by the number of label tokens of the whole accumulated batch."""
    model = TinyLM().double()
    opt = cls(model, **KW)
    for idx, labels in _lm_batches():
        opt.zero_grad()
        n_items = int((labels != -100).sum())
        for i, l in zip(idx.chunk(k), labels.chunk(k), strict=True):
            logits = model(i)
            loss = F.cross_entropy(logits.flatten(0, 1), l.flatten(), ignore_index=-100,
                                   reduction="sum") / n_items  # fmt: skip
            loss.backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_hf_token_count_normalisation_equals_the_full_batch(cls):
    assert_same(_hf_train(cls, 2), _hf_train(cls, 1))


def test_ddp_no_sync_accumulation_equals_the_full_batch(tmp_path):
    """One gloo process: K-FAC on a DistributedDataParallel model, two micro-batches under
    no_sync() then a synchronised one, equals the full batch (the distributed work builds on it)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        batches = data()
        model = DDP(model_fn())
        opt = KFAC(model, **KW)
        for x, y in batches:
            opt.zero_grad()
            xs, ys = x.chunk(4), y.chunk(4)
            with model.no_sync():
                for i in range(3):
                    (F.cross_entropy(model(xs[i]), ys[i]) / 4).backward()
            (F.cross_entropy(model(xs[3]), ys[3]) / 4).backward()
            opt.step()
        assert_same((model.module, opt), train(KFAC, batches, 1))
    finally:
        dist.destroy_process_group()


class _PositionModel(nn.Module):
    """Token and position embeddings; the positions' input (1, T) is broadcast over the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos, self.out = nn.Embedding(16, 8), nn.Embedding(6, 8), nn.Linear(8, 16)

    def forward(self, x):
        positions = torch.arange(x.shape[1])[None]
        return self.out(torch.tanh(self.tok(x) + self.pos(positions)))


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_an_input_broadcast_over_the_batch_is_named_and_accumulation_stays_exact(cls):
    """The position embedding only sees the sum of the samples' output gradients, so its G would
    depend on how the batch is cut into micro-batches: it is left to the plain update, by name,
    and 2 micro-batches then equal the full batch."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 16, (8, 6), generator=g) for _ in range(3)]

    def run(k):
        model = _PositionModel().double()
        opt = cls(model, **KW)
        for x in batches:
            opt.zero_grad()
            for xs in x.chunk(k):  # each micro-batch's summed loss over the whole batch's count
                logits = model(xs).flatten(0, 1)
                (F.cross_entropy(logits, xs.roll(1, 1).flatten(), reduction="sum")
                 / x.numel()).backward()  # fmt: skip
            opt.step()
        return model, opt

    with pytest.warns(UserWarning, match=r"pos\.weight: its input has batch 1") as record:
        whole = run(1)
    assert not any("tok.weight" in str(w.message) for w in record)
    assert [b.name for b in whole[1]._blocks] == ["tok.weight", "out.weight"]
    with pytest.warns(UserWarning, match=r"pos\.weight"):
        assert_same(run(2), whole)
