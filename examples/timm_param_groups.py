"""timm-style parameter groups with FOGO: orthogonalized layers, AdamW for the rest, timm's
weight-decay rule on top.

timm's optimizer factory (``timm.optim.create_optimizer_v2``) puts biases, norm gains and the
names in ``model.no_weight_decay()`` (a ViT's ``cls_token`` and ``pos_embed``) in a group without
weight decay. :func:`orthoptim.param_groups` decides which tensors FOGO orthogonalizes (hidden
layer weights) and which go to AdamW (class token, position table, head, biases, norm gains);
:func:`timm_style_groups` then splits each of its groups by timm's rule, so each tensor gets the
right algorithm *and* the right weight decay.

The ViT below has timm's ``VisionTransformer`` attribute names (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv``, ``mlp.fc1``, ``norm``, ``head``) and is built
locally: timm needs torchvision, whose index wheels do not import beside the CPU torch wheel.
It trains for a few steps on random images labelled by a fixed random teacher.

    python examples/timm_param_groups.py [--steps 30]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from orthoptim import FOGO, param_groups


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """A small ViT with timm's names: patch embedding, class token, position table, blocks."""

    def __init__(self, img=16, patch=4, dim=32, depth=2, heads=4, hidden=64, classes=10):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def no_weight_decay(self) -> set[str]:
        """timm's hook: parameter names that get no weight decay."""
        return {"pos_embed", "cls_token"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def timm_style_groups(model: nn.Module, weight_decay: float, **options: Any) -> list[dict]:
    """``orthoptim.param_groups(model)``, each group split by timm's weight-decay rule.

    A tensor gets no weight decay when it has ndim <= 1 or its name is in
    ``model.no_weight_decay()`` (as ``timm.optim.param_groups_weight_decay``).

    Args:
        model: the model.
        weight_decay: decay of the decayed groups.
        **options: other group keys (``lr=...``).
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in param_groups(model, verbose=False, **options):
        decay, no_decay = [], []
        for p in group["params"]:
            (no_decay if p.ndim <= 1 or names[id(p)] in skip else decay).append(p)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({**group, "params": params, "weight_decay": wd})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = VisionTransformer()
    groups = timm_style_groups(model, args.weight_decay, lr=args.lr)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        listed = ", ".join(names[id(p)] for p in g["params"])
        print(f"{g['algorithm']:5s} weight_decay={g['weight_decay']:<5g} {listed}")
    opt = FOGO(groups)
    teacher = nn.Linear(3 * 16 * 16, 10)
    losses = []
    for _ in range(args.steps):
        x = torch.randn(32, 3, 16, 16)
        with torch.no_grad():
            y = teacher(x.flatten(1)).argmax(1)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} after {args.steps} steps")
    return {"model": model, "optimizer": opt, "groups": groups, "losses": losses}


if __name__ == "__main__":
    main()
