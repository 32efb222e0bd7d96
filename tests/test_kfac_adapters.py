"""Layer adapters: factors against explicitly computed E[a a^T], E[g g^T] per layer kind,
directions against dense (G kron A)^-1 products, attention against hand-written q/k/v/out
products, Conv1D against the equivalent nn.Linear, and the coverage rules (warning, refusals,
tied weights, exclude, max_factor_dim, no layer at all)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthoptim import FOP, KFAC
from orthoptim.optim.kfac import DiagonalFactorWarning, PlainUpdateWarning
from orthoptim.optim.kfac_reference import damped_dense_inverse, patches_loop

D = torch.float64
ONE_STEP = dict(lr=1.0, momentum=0.0, max_grad_norm=None, factor_interval=1, inverse_interval=1,
                factor_dtype="float64", damping=0.1)  # fmt: skip


def _ones(a):
    return torch.cat([a, torch.ones_like(a[..., :1])], -1)


def _outer_mean(rows, n, locations=1):
    """sum over rows of r r^T / (n * locations) for rows (n, L, d)."""
    r = rows.reshape(-1, rows.shape[-1])
    return r.T @ r / (n * locations)


def _one_step(opt, model, loss_fn):
    """One step; returns the update (before - after) of every parameter."""
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.zero_grad()
    loss_fn().backward()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    opt.step()
    return {p: before[p] - p.detach() for p in before}, grads


def _dense_direction(A, G, M, damping):
    """vec^-1((G kron A + pi-damping)^-1 vec(M)); diagonal factors given as vectors."""
    A = torch.diag(A) if A.dim() == 1 else A
    G = torch.diag(G) if G.dim() == 1 else G
    return (damped_dense_inverse(A, G, damping) @ M.reshape(-1)).reshape(M.shape)


# ---------------------------------------------------------------------------------- attention
class Attn(nn.Module):
    def __init__(self, kdim=None, bias=True, batch_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.att = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, kdim=kdim,
                                         vdim=kdim).double()  # fmt: skip

    def forward(self, q, kv, **kw):
        return self.att(q, kv, kv, **kw)[0]


def _inputs(kdim=None, batch_first=True, b=3, length=4, s=5):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, length, 8, generator=g, dtype=D)
    kv = torch.randn(b, s, kdim or 8, generator=g, dtype=D)
    target = torch.randn(b, length, 8, generator=g, dtype=D)
    if not batch_first:
        q, kv, target = (t.transpose(0, 1) for t in (q, kv, target))
    return q, kv, target


MASKS = {
    "none": lambda b, L, S: {},
    "padding": lambda b, L, S: {"key_padding_mask": torch.arange(S).expand(b, S) >= S - 1},
    "bool2d+padding": lambda b, L, S: {
        "attn_mask": torch.triu(torch.ones(L, S, dtype=torch.bool), 2),
        "key_padding_mask": torch.arange(S).expand(b, S) >= S - 1,
    },
    "float3d": lambda b, L, S: {"attn_mask": torch.randn(b * 2, L, S, dtype=D)},
}


@pytest.mark.parametrize("kdim,batch_first,bias", [(None, True, True), (6, False, True),
                                                   (None, False, False)])  # fmt: skip
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_attention_forward_equals_the_modules_own(kdim, batch_first, bias, need_weights, mask):
    model = Attn(kdim, bias, batch_first)
    ref = copy.deepcopy(model)
    KFAC(model, lr=0.0)  # replaces the module's forward
    assert "forward" in model.att.__dict__
    q, kv, _ = _inputs(kdim, batch_first)
    kw = dict(MASKS[mask](3, 4, 5), need_weights=need_weights)
    out, w = model.att(q, kv, kv, **kw)
    out_ref, w_ref = ref.att(q, kv, kv, **kw)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    assert (w is None) == (w_ref is None)
    if w is not None:
        torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    unbatched = (q[:, 0] if not batch_first else q[0]), (kv[:, 0] if not batch_first else kv[0])
    torch.testing.assert_close(
        model.att(unbatched[0], unbatched[1], unbatched[1])[0],
        ref.att(unbatched[0], unbatched[1], unbatched[1])[0],
    )


def _hand_attention(m: nn.MultiheadAttention, q_in, kv_in):
    """Multi-head attention written out, batch first; returns the output and the projection
    inputs/outputs (outputs retain their gradients)."""
    e, h = m.embed_dim, m.num_heads
    if m.in_proj_weight is not None:
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq, bk, bv = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
    q, k, v = F.linear(q_in, wq, bq), F.linear(kv_in, wk, bk), F.linear(kv_in, wv, bv)
    for t in (q, k, v):
        t.retain_grad()
    b, L = q.shape[0], q.shape[1]
    qh, kh, vh = (t.view(b, -1, h, e // h).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(qh @ kh.transpose(-1, -2) / (e // h) ** 0.5, -1) @ vh
    o_in = att.transpose(1, 2).reshape(b, L, e)
    o = m.out_proj(o_in)
    o.retain_grad()
    return o, {"q": (q_in, q), "k": (kv_in, k), "v": (kv_in, v), "out": (o_in, o)}


@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_attention_factors_equal_hand_written_products(kdim, approx):
    """Cross-attention: each projection's A from its own input (query vs key/value), its own G,
    against the products of a hand-written attention; expand and reduce."""
    model = Attn(kdim)
    ref = copy.deepcopy(model)
    q, kv, target = _inputs(kdim)
    b = q.shape[0]
    opt = KFAC(model, factor_interval=1, factor_dtype="float64", kfac_approx=approx, lr=0.0)
    opt.zero_grad()
    F.mse_loss(model(q, kv), target).backward()  # a mean over the batch (and positions)
    opt.step()
    out, io = _hand_attention(ref.att, q, kv)
    F.mse_loss(out, target).backward()
    names = {"q": "[q]", "k": "[k]", "v": "[v]", "out": "out_proj"}
    if kdim is not None:
        names = {"q": "q_proj_weight", "k": "k_proj_weight", "v": "v_proj_weight",
                 "out": "out_proj"}  # fmt: skip
    blocks = {key: next(bl for bl in opt._blocks if names[key] in bl.name) for key in names}
    assert len(opt._blocks) == 4
    for key, (x, y) in io.items():
        a, g = _ones(x), y.grad * b  # per-sample gradients of the batch-mean loss
        if approx == "reduce":
            a, g = a.mean(1, keepdim=True), g.sum(1, keepdim=True)
        ls = opt.block_state(blocks[key])
        torch.testing.assert_close(ls["A"], _outer_mean(a, b, a.shape[1]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ls["G"], _outer_mean(g, b), rtol=1e-10, atol=1e-12)


def test_attention_directions_equal_dense_inverse_products():
    model = Attn()
    q, kv, target = _inputs()
    opt = KFAC(model, **ONE_STEP)
    upd, grads = _one_step(opt, model, lambda: F.mse_loss(model(q, kv), target))
    m = model.att
    for blk in opt._blocks:
        ls = opt.block_state(blk)
        M = blk.grad_matrix(grads[blk.weight], grads[blk.bias])
        want = _dense_direction(ls["A"], ls["G"], M, ONE_STEP["damping"])
        rows = blk.rows or slice(None)
        torch.testing.assert_close(upd[blk.weight][rows], want[:, :-1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(upd[blk.bias][rows], want[:, -1], rtol=1e-9, atol=1e-12)
    assert {blk.name for blk in opt._blocks} == {
        "att.in_proj_weight[q]", "att.in_proj_weight[k]", "att.in_proj_weight[v]",
        "att.out_proj.weight",
    }  # fmt: skip
    assert m.in_proj_weight.grad is not None


def test_attention_refusals_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8))
    model.att = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.warns(PlainUpdateWarning, match=r"att\.in_proj_weight: .*add_bias_kv") as rec:
        opt = KFAC(model)
    assert "att.out_proj.weight" in str(rec[0].message)
    assert "forward" not in model.att.__dict__ and len(opt._blocks) == 1


# ---------------------------------------------------------------------------- HF Conv1D
class Conv1D(nn.Module):
    """Mimics transformers.pytorch_utils.Conv1D: weight (in, out), y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class StockConv1D(Conv1D):
    """The same class as transformers ships it: its forward is trusted to be x @ W + b."""

    forward = Conv1D.forward


StockConv1D.__name__ = "Conv1D"
StockConv1D.__module__ = "transformers.pytorch_utils"


def _gpt_mlp(layer):
    torch.manual_seed(0)
    return nn.Sequential(layer(12, 5), nn.Tanh(), layer(3, 12)).double()


def _as_linear(model):
    lin = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    with torch.no_grad():
        for c, li in ((model[0], lin[0]), (model[2], lin[2])):
            li.weight.copy_(c.weight.T)
            li.bias.copy_(c.bias)
    return lin


@pytest.mark.parametrize("cls", [KFAC, FOP])
@pytest.mark.parametrize("layer", [Conv1D, StockConv1D])
def test_conv1d_trains_exactly_as_the_equivalent_linear(cls, layer):
    conv = _gpt_mlp(layer)
    lin = _as_linear(conv)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 4, 5, generator=g, dtype=D), torch.randint(0, 3, (6, 4), generator=g))
            for _ in range(4)]  # fmt: skip
    kw = dict(lr=0.1, factor_interval=2, inverse_interval=2, factor_dtype="float64")
    oc, ol = cls(conv, **kw), cls(lin, **kw)
    assert [b.stock for b in oc._blocks] == [layer is StockConv1D] * 2
    for x, y in data:
        for model, opt in ((conv, oc), (lin, ol)):
            opt.zero_grad()
            F.cross_entropy(model(x).transpose(1, 2), y).backward()
            opt.step()
    for c, li in ((conv[0], lin[0]), (conv[2], lin[2])):
        torch.testing.assert_close(c.weight.T, li.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.bias, li.bias, rtol=1e-10, atol=1e-12)
    for bc, bl in zip(oc._blocks, ol._blocks, strict=True):
        for key in ("A", "G"):
            torch.testing.assert_close(oc.block_state(bc)[key], ol.block_state(bl)[key])


# ------------------------------------------------------------------------------- convolutions
CONVS = {
    "conv1d-same": lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=1),
    "conv1d-stride-reflect": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2,
                                               padding_mode="reflect"),  # fmt: skip
    "conv2d-same-dilated": lambda: nn.Conv2d(3, 4, (3, 2), padding="same", dilation=(2, 1)),
    "conv2d-circular-nobias": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular",
                                                bias=False),  # fmt: skip
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_factors_equal_explicit_patches(kind):
    torch.manual_seed(0)
    conv = CONVS[kind]().double()
    one_d = isinstance(conv, nn.Conv1d)
    x = torch.randn(5, 3, 9, dtype=D) if one_d else torch.randn(5, 3, 7, 6, dtype=D)
    before = copy.deepcopy(conv)
    opt = KFAC(conv, **ONE_STEP)
    upd, grads = _one_step(opt, conv, lambda: conv(x).square().mean(0).sum())
    # explicit: pad as the module does, then patches by loops (Conv1d as a 1-row Conv2d)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if one_d:
        xp, k, s, d = xp[:, :, None], (1, *k), (1, *s), (1, *d)
    probe = nn.Conv2d(3, 4, k, stride=s, dilation=d, padding=0)
    a = patches_loop(probe, xp)
    out = before(x)
    gout = torch.autograd.grad(out.square().mean(0).sum(), out)[0] * x.shape[0]
    g = gout.flatten(2).transpose(1, 2)
    a = _ones(a) if conv.bias is not None else a
    blk = opt._blocks[0]
    ls = opt.block_state(blk)
    torch.testing.assert_close(ls["A"], _outer_mean(a, 5, a.shape[1]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ls["G"], _outer_mean(g, 5), rtol=1e-10, atol=1e-12)
    M = blk.grad_matrix(grads[conv.weight], grads.get(conv.bias))
    want = _dense_direction(ls["A"], ls["G"], M, ONE_STEP["damping"])
    cols = conv.weight[0].numel()
    torch.testing.assert_close(upd[conv.weight].flatten(1), want[:, :cols], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------- embeddings
def test_embedding_factors_are_token_counts_and_output_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), nn.Linear(4, 3)).double()
    idx = torch.randint(0, 7, (6, 5))
    y = torch.randint(0, 3, (6, 5))
    emb = copy.deepcopy(model)
    opt = KFAC(model, **ONE_STEP)

    def loss():
        return F.cross_entropy(model(idx).transpose(1, 2), y)

    upd, grads = _one_step(opt, model, loss)
    blk = opt._blocks[0]
    assert blk.diag_a and not blk.diag_g and blk.d_in == 7
    ls = opt.block_state(blk)
    counts = torch.bincount(idx.flatten(), minlength=7).double()
    torch.testing.assert_close(ls["A"], counts / 30)
    out = emb[0](idx)
    gout = torch.autograd.grad(F.cross_entropy(emb[2](torch.tanh(out)).transpose(1, 2), y), out)[0]
    torch.testing.assert_close(ls["G"], _outer_mean(gout * 6, 6), rtol=1e-10, atol=1e-12)
    M = grads[model[0].weight].T  # matrix layout: (dim, vocab)
    want = _dense_direction(ls["A"], ls["G"], M, ONE_STEP["damping"])
    torch.testing.assert_close(upd[model[0].weight], want.T, rtol=1e-9, atol=1e-12)
    assert torch.equal(upd[model[0].weight][0], torch.zeros(4, dtype=D))  # padding row


def test_embedding_refusals_are_named():
    model = nn.Sequential(nn.Embedding(7, 4, max_norm=1.0), nn.Linear(4, 3))
    with pytest.warns(PlainUpdateWarning, match=r"0\.weight: .*max_norm"):
        KFAC(model)


# ------------------------------------------------------------------------ size rule, reduce
def test_max_factor_dim_keeps_the_large_side_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 20)).double()
    x = torch.randn(8, 4, dtype=D)
    gout = 2 * model(x).detach()  # per-sample output gradients of the sum of squares
    with pytest.warns(DiagonalFactorWarning, match=r"0\.weight: G \(20\) > max_factor_dim=10"):
        opt = KFAC(model, max_factor_dim=10, **ONE_STEP)
    upd, grads = _one_step(opt, model, lambda: model(x).square().mean(0).sum())
    blk = opt._blocks[0]
    ls = opt.block_state(blk)
    assert ls["G"].shape == (20,) and ls["A"].shape == (5, 5)
    torch.testing.assert_close(ls["G"], (gout * gout).mean(0), rtol=1e-10, atol=1e-12)
    M = blk.grad_matrix(grads[model[0].weight], grads[model[0].bias])
    want = _dense_direction(ls["A"], ls["G"], M, ONE_STEP["damping"])
    torch.testing.assert_close(upd[model[0].weight], want[:, :-1], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------- coverage
def test_the_warning_names_a_grus_matrices_and_exclude_silences_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    with pytest.warns(PlainUpdateWarning) as rec:
        KFAC(Net())
    text = str(rec[0].message)
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        assert f"{name}: nn.GRU has no K-FAC adapter" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = KFAC(Net(), exclude=["rnn.*"])
    assert [b.name for b in opt._blocks] == ["head.weight"]


class Tied(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(9, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def test_tied_weights_are_not_preconditioned_and_are_named():
    """The rule: a weight shared by two modules gets the plain update (named with both
    modules); no module's factors are applied to the shared gradient."""
    model = Tied(True).double()
    with pytest.warns(PlainUpdateWarning, match=r"emb\.weight: shared by emb .*, head"):
        opt = KFAC(model, **ONE_STEP)
    assert [b.name for b in opt._blocks] == ["mid.weight"]
    idx = torch.randint(0, 9, (5, 3))
    upd, grads = _one_step(opt, model, lambda: model(idx).logsumexp(-1).mean())
    torch.testing.assert_close(upd[model.emb.weight], grads[model.emb.weight])  # plain SGD
    untied = KFAC(Tied(False).double())
    assert [b.name for b in untied._blocks] == ["emb.weight", "mid.weight", "head.weight"]


def test_no_preconditionable_layer_is_an_error_for_both_forms():
    model = nn.Sequential(nn.LayerNorm(3), nn.GRU(3, 3))
    with pytest.raises(ValueError, match="no layer it can precondition.*GRU"):
        KFAC(model)
    opt = FOP(model[0].parameters())
    opt.step()  # a checkpoint loader's zero-gradient step: no forward yet, nothing to say
    with pytest.raises(ValueError, match="no layer it can precondition"):
        opt.zero_grad()
        model[0](torch.randn(2, 3)).sum().backward()
        opt.step()


def _transformer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.Linear(5, 8), layer, nn.Linear(8, 3)).double()


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_every_transformer_matrix_gets_a_preconditioned_first_update(cls):
    model = _transformer()
    x = torch.randn(6, 4, 5, dtype=D)
    y = torch.randint(0, 3, (6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left to the plain update
        opt = cls(model, **(ONE_STEP | {"damping": 1e-3}))
    upd, grads = _one_step(opt, model, lambda: F.cross_entropy(model(x).transpose(1, 2), y))
    matrices = [n for n, p in model.named_parameters() if p.dim() == 2]
    assert len(matrices) == 6  # in, in_proj, out_proj, linear1, linear2, head
    covered = {b.weight for b in opt._blocks}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert p in covered, name
            cos = F.cosine_similarity(upd[p].flatten(), grads[p].flatten(), dim=0)
            assert cos < 0.95, (name, float(cos))  # plain SGD would give 1


class Mixed(nn.Module):
    """Every adapter kind in one model, each used once per forward."""

    def __init__(self, conv1d_cls=Conv1D):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.conv = nn.Conv1d(8, 8, 3, padding="same", padding_mode="replicate")
        self.block = _transformer()[1]
        self.mlp = conv1d_cls(8, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, idx):
        h = self.emb(idx)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(self.mlp(self.block(h))))


@pytest.mark.parametrize("batch", [6, 5])
def test_one_pass_split_of_every_block_equals_half_batch_autograd(batch):
    """FOP's sub-batch gradients (free half-batch products for stock blocks, attention's row
    blocks included; one extra product for the look-alike Conv1D) equal autograd's gradients of
    the two half-batch losses."""
    model = Mixed().double()
    idx = torch.randint(0, 11, (batch, 7))
    y = torch.randint(0, 11, (batch, 7))
    opt = FOP(model, lr=0.0, factor_dtype="float64")
    # the replicate-padded conv and the look-alike Conv1D take the extra-product path
    assert [b.stock for b in opt._blocks] == [True, False] + [True] * 6 + [False, True]
    F.cross_entropy(model(idx).transpose(1, 2), y).backward()
    b1 = (batch + 1) // 2
    params = list(model.parameters())
    ref = copy.deepcopy(model)
    opt._capture.remove()
    ref_params = dict(zip(params, ref.parameters(), strict=True))
    half = [torch.autograd.grad(F.cross_entropy(ref(idx[s]).transpose(1, 2), y[s]),
                                list(ref.parameters()), allow_unused=True)
            for s in (slice(0, b1), slice(b1, None))]  # fmt: skip
    by_ref = [dict(zip(ref.parameters(), h, strict=True)) for h in half]
    for blk in opt._blocks:
        U, n, n1 = opt._capture.halves_of(blk)
        assert (n, n1) == (batch, b1)
        g1, g2 = (U[1] * (n / n1), (U[0] - U[1]) * (n / (n - n1)))
        for got, h in ((g1, by_ref[0]), (g2, by_ref[1])):
            gb = h[ref_params[blk.bias]] if blk.bias is not None else None
            want = blk.grad_matrix(h[ref_params[blk.weight]], gb)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=blk.name)


def test_a_layer_whose_hooks_never_fire_is_named_at_the_first_step():
    """Model form: the construction warning is already spent when the first step finds a layer
    used through the functional API; that layer is still named, once."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(F.linear(x, self.a.weight, self.a.bias)))

    torch.manual_seed(0)
    model = Functional()
    opt = KFAC(model, lr=0.1, factor_interval=1, inverse_interval=1)
    for step in range(2):
        model(torch.randn(8, 4)).square().mean().backward()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            opt.step()
        named = [w for w in record if "a.weight: its module's hooks never saw it run" in
                 str(w.message)]  # fmt: skip
        assert len(named) == (1 if step == 0 else 0)
        opt.zero_grad()
