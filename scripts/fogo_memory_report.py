"""FOGO's optimizer-state bytes for a GPT-2-small-shaped parameter set (docs/fogo.md).

Builds the 124M-parameter GPT-2 small shapes (12 blocks of d = 768: qkv 2304 x 768, attention
projection 768 x 768, MLP 3072 x 768 and 768 x 3072, LayerNorms and biases; token embedding
50257 x 768 and position embedding 1024 x 768 on AdamW as Muon practice), takes one FOGO step
with zero gradients (ns_steps=0, so it is fast) and prints the memory per matrix shape and in
total, next to AdamW's state.

    python scripts/fogo_memory_report.py [--budget 0.05]
    python scripts/fogo_memory_report.py --protection kronecker [--kron-sides smaller] \
        [--kron-share model] [--kron-detect 1.5]

With ``--protection kronecker`` the embeddings are in the protected AdamW group (as
``param_groups`` routes them), so their Kronecker state counts too; the bytes are
``memory_stats()``'s. With ``--kron-share model`` one factor pair per dimension is held by its
first parameter (the others hold only their unshared sides).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from orthoptim import FOGO


def gpt2_small_params(d: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024):
    matrices, vectors = [], []
    for _ in range(layers):
        matrices += [torch.zeros(3 * d, d), torch.zeros(d, d), torch.zeros(4 * d, d),
                     torch.zeros(d, 4 * d)]  # fmt: skip
        vectors += [torch.zeros(3 * d), torch.zeros(d), torch.zeros(4 * d), torch.zeros(d)]
        vectors += [torch.zeros(d) for _ in range(4)]  # two LayerNorms
    vectors += [torch.zeros(d), torch.zeros(d)]  # final LayerNorm
    embeddings = [torch.zeros(vocab, d), torch.zeros(ctx, d)]
    return matrices, vectors + embeddings


def kronecker_report(opt: FOGO, params: list, n_matrices: int, sides: str, share: str) -> None:
    """Bytes of the Kronecker protection per parameter shape and in all (``memory_stats``)."""
    by_shape: Counter = Counter()
    on_matrices = 0
    for i, p in enumerate(params):
        if "kron" in opt.state[p]:
            mem = sum(t.numel() * t.element_size() for t in opt.state[p]["kron"].values())
            by_shape[tuple(p.shape), mem] += 1
            on_matrices += mem if i < n_matrices else 0
    print(f"{'shape':>14s} {'count':>5s} {'memory bytes':>13s} {'% of weight':>11s}")
    for (shape, mem), count in sorted(by_shape.items()):
        frac = mem / (shape[0] * shape[1] * 4)
        print(f"{str(shape):>14s} {count:5d} {mem:13,d} {100 * frac:10.2f}%")
    stats = opt.memory_stats()
    total = sum(p.numel() for p in params) * 4
    matrix_bytes = sum(p.numel() for p in params[:n_matrices]) * 4
    print(f"Kronecker memory ({sides}, kron_share={share!r}): {stats['memory_bytes'] / 2**20:.1f} MiB = "
          f"{100 * stats['memory_bytes'] / total:.1f}% of all parameter bytes; "
          f"{on_matrices / 2**20:.1f} MiB on the {n_matrices} FOGO matrices "
          f"({100 * on_matrices / matrix_bytes:.1f}% of their bytes), "
          f"{(stats['memory_bytes'] - on_matrices) / 2**20:.1f} MiB on the embeddings "
          "(running Grams and preconditioners, float32)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--protection", default="subspace", choices=("subspace", "kronecker"))
    ap.add_argument("--kron-sides", default="smaller")
    ap.add_argument("--kron-share", default="none", choices=("none", "model"))
    ap.add_argument("--kron-detect", type=float, default=0.0)
    args = ap.parse_args()
    matrices, others = gpt2_small_params()
    params = [torch.nn.Parameter(t) for t in matrices + others]
    opt = FOGO(
        [{"params": params[: len(matrices)]}, {"params": params[len(matrices):], "algorithm": "adamw"}],
        ns_steps=0, memory_budget=args.budget, protection=args.protection,
        kron_sides=args.kron_sides, kron_share=args.kron_share, kron_detect=args.kron_detect,
    )  # fmt: skip
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    total_params = sum(p.numel() for p in params)
    print(f"GPT-2 small shapes: {total_params / 1e6:.1f}M parameters "
          f"({len(matrices)} FOGO matrices, {sum(m.numel() for m in matrices) / 1e6:.1f}M)")  # fmt: skip
    if args.protection == "kronecker":
        kronecker_report(opt, params, len(matrices), args.kron_sides, args.kron_share)
        return
    by_shape = Counter()
    for p in params[: len(matrices)]:
        st = opt.state[p]
        mem = sum(t.numel() * t.element_size() for t in st["memory"].values())
        for name in ("grad_sketch", "row_energy", "last_profile"):
            if name in st:
                mem += st[name].numel() * st[name].element_size()
        by_shape[tuple(p.shape), st["memory"]["owner"].numel(), mem] += 1
    print(
        f"{'shape':>14s} {'count':>5s} {'pool rank R':>11s} {'memory bytes':>13s} {'% of weight':>11s}"
    )
    for (shape, rank, mem), count in sorted(by_shape.items()):
        frac = mem / (shape[0] * shape[1] * 4)
        print(f"{str(shape):>14s} {count:5d} {rank:11d} {mem:13,d} {100 * frac:10.2f}%")
    stats = opt.memory_stats()
    state_bytes = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
        if isinstance(t, torch.Tensor)
    )  # fmt: skip
    momentum = sum(
        s[k].numel() * 4 for s in opt.state.values() for k in s if k.startswith("momentum")
    )
    param_bytes = total_params * 4
    print(f"memory (codebooks + sketches): {stats['memory_bytes'] / 2**20:.2f} MiB = "
          f"{100 * stats['memory_fraction']:.2f}% of the FOGO matrices' bytes, "
          f"{100 * stats['memory_bytes'] / param_bytes:.2f}% of all parameter bytes")  # fmt: skip
    print(f"momentum buffers: {momentum / 2**20:.1f} MiB (two per matrix); "
          f"all FOGO state: {state_bytes / param_bytes:.3f} x parameter bytes "
          f"(AdamW: 2.000 x)")  # fmt: skip


if __name__ == "__main__":
    main()
