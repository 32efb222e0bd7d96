"""A small GPT (decoder-only transformer) for the language-model benchmark tasks.

The architecture and initialisation follow Karpathy's nanoGPT (``karpathy/nanoGPT``,
``model.py``), itself GPT-2 (Radford et al. 2019) at small scale:

* token embedding ``wte`` + learned position embedding ``wpe``, dropout;
* ``n_layer`` pre-LayerNorm blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``; attention is
  causal multi-head self-attention through ``F.scaled_dot_product_attention(is_causal=True)``
  (one fused ``c_attn`` projection to q, k, v, then ``c_proj``), the MLP is
  ``c_fc (4 n_embd) -> GELU -> c_proj``;
* a final LayerNorm ``ln_f`` and a bias-free ``lm_head``, tied to ``wte`` (GPT-2, nanoGPT default)
  or untied.

Initialisation (nanoGPT ``_init_weights``): every Linear and Embedding weight ~ N(0, 0.02), biases
zero, LayerNorm gains one; the residual-stream output projections (``*.c_proj.weight``) use
std ``0.02 / sqrt(2 n_layer)`` (GPT-2's scaling, so the residual stream's variance does not grow
with depth).

Module names matter for the optimizers: :func:`orthoptim.param_groups` sends ``nn.Embedding``
weights and the module called ``lm_head`` to AdamW and the 2-D hidden matrices (``c_attn``,
``c_proj``, ``c_fc``) to FOGO; K-FAC/FOP precondition every ``nn.Linear`` (inputs with a sequence
dimension are supported: the leading dimensions are flattened into rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPT"]


def _check_pos_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; expected a positive integer")


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (characters for the char-level tasks).
        block_size: maximum context length (size of the position embedding).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: width of the residual stream.
        dropout: dropout probability on embeddings, attention weights and residual branches.
        bias: biases in the Linear layers and LayerNorms (nanoGPT's ``bias`` flag).
        tie_weights: share ``lm_head.weight`` with the token embedding ``wte.weight``.
    """

    vocab_size: int
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_pos_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"Invalid n_head: {self.n_head!r}; must divide n_embd={self.n_embd}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"Invalid dropout: {self.dropout!r}; expected a float in [0, 1)")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``c_attn`` -> (q, k, v) -> SDPA -> ``c_proj``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """``c_fc (n_embd -> 4 n_embd) -> GELU -> c_proj (-> n_embd) -> dropout``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT-style decoder-only transformer (see the module docstring).

    Args:
        config: a :class:`GPTConfig`; or pass its fields as keyword arguments instead.
        **kwargs: :class:`GPTConfig` fields when ``config`` is None.
    """

    def __init__(self, config: GPTConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = GPTConfig(**kwargs)
        elif kwargs:
            raise ValueError(f"Invalid kwargs: {sorted(kwargs)}; pass either config or fields")
        self.config = cfg = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # one Parameter registered under both names (nanoGPT's weight tying)
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        std_proj = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std_proj)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (shared tensors once); ``non_embedding`` leaves out ``wpe``, as nanoGPT.

        Args:
            non_embedding: subtract the position embedding (the token embedding is counted: tied,
                it is also the head's weight).
        """
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy when ``targets`` are given.

        Args:
            idx: int64 token ids ``(B, T)`` with ``T <= block_size``.
            targets: int64 next-token ids ``(B, T)`` or None.

        Returns:
            ``(logits (B, T, vocab_size), loss)``; ``loss`` (nats per token, averaged over all
            ``B * T`` positions) is None without targets.
        """
        if idx.ndim != 2:
            raise ValueError(f"Invalid idx shape: {tuple(idx.shape)}; expected (batch, time)")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"Invalid idx length: {T}; the context is at most block_size="
                f"{self.config.block_size}"
            )
        pos = torch.arange(T, device=idx.device)
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))
        for block in tr.h:
            x = block(x)
        logits = self.lm_head(tr.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))
        return logits, loss
