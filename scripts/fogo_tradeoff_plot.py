"""Plot FOGO's memory / forgetting trade-off from evidence records (docs/fogo_tradeoff.png).

    python scripts/fogo_tradeoff_plot.py --out runs/fogo_v5 --png docs/fogo_tradeoff.png
    python scripts/fogo_tradeoff_plot.py --lm runs/fogo_lm --png docs/fogo_lm_tradeoff.png

Uses the permuted-MNIST records of `fogo_evidence.py` (main and `_budget` files): mean BWT over
the seeds that every budget shares, against the measured memory bytes of the two hidden layers.
With ``--lm``: the ``lm-continual`` records of ``fogo_lm_diagnosis.py`` (``diagnosis``,
``kron``, ``control``, ``final``, ``kshare`` and ``kshare_detector.jsonl`` in that folder, seed
0): forgetting against learning loss for the lr curves of FOGO without memory and AdamW (the
control: a lower lr also forgets less) and for the protections, printed as a table too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BUDGETS = {"aware": ["fogo_nomem", "fogo_aware_b0.01", "fogo_aware", "fogo_aware_b0.2"],
           "agnostic": ["fogo_nomem", "fogo_agnostic", "fogo_agnostic_b0.2"]}  # fmt: skip


LM_FILES = ("diagnosis", "kron", "control", "final", "kshare", "kshare_detector")  # later win
# (label, marker style, configs in order); lr curves are lines, the rest points.
LM_CURVES = [
    ("FOGO no memory, lr 0.002-0.014", "o-",
     ["nomem_lr0.002", "nomem_lr0.003", "nomem_lr0.005", "nomem_lr0.007", "nomem",
      "nomem_lr0.014"]),
    ("AdamW, lr 0.001-0.01", "s-",
     ["adamw_lr0.001", "adamw_lr0.0018", "adamw", "adamw_lr0.0056", "adamw_lr0.01"]),
    ("subspace memory, budget 5/20/50%", "^--", ["aware", "aware_b0.2", "aware_b0.5"]),
    ("subspace memory, output side 5/20%", "v--", ["aware_output", "aware_output_b0.2"]),
    ("Kronecker, smaller side, kappa 3/10/30", "D--",
     ["aware_kron_smaller_k3", "aware_kron_smaller_k10", "aware_kron_smaller_k30"]),
    ("Kronecker, mixed / both sides", "P", ["aware_kron_mixed_k10", "aware_kron_both_k10"]),
    ("Kronecker, task-agnostic (online 0.9/0.5)", "X",
     ["agnostic_kron_smaller_online0.9", "agnostic_kron_smaller_online0.5"]),
    ("Kronecker kept on f = 32/16 directions", "*",
     ["aware_kron_smaller_k10_free32", "aware_kron_smaller_k10_free16"]),
    ("freeze blocks / AdamW params (no memory)", "h", ["nomem_freeze_blocks", "nomem_freeze_adamw"]),
    ("Kronecker shared (within 5%), kappa 10/30", "d--",
     ["aware_kshare_model_k10", "aware_kshare_sum_k30"]),
    ("Kronecker shared, task-agnostic (kron_detect 1.5/2)", "p",
     ["agnostic_kshare_model_k10_detect1.5", "agnostic_kshare_model_k10_detect2"]),
]  # fmt: skip

def lm_plot(folder: Path, png: Path, seed: int = 0) -> None:
    by = {}
    for path in [folder / f"{name}.jsonl" for name in LM_FILES]:
        if not path.exists():  # a folder from before the shared-factor runs
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line) if line.strip() else None
            if r and r["seed"] == seed:
                by[r["config"]] = r["metrics"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    print("| curve | config | learning loss | forgetting | avg final loss |")
    print("|---|---|---|---|---|")
    for label, style, configs in LM_CURVES:
        have = [c for c in configs if c in by]
        if not have:
            continue
        for c in have:
            m = by[c]
            print(f"| {label} | {c} | {m['learning_loss']:.3f} | {m['forgetting']:.3f} | "
                  f"{m['avg_final_loss']:.3f} |")  # fmt: skip
        xs = [by[c]["learning_loss"] for c in have]
        ys = [by[c]["forgetting"] for c in have]
        ax.plot(xs, ys, style, label=label, markersize=6)
    ax.set_xlabel("learning loss (mean of the loss matrix diagonal, nats)")
    ax.set_ylabel("forgetting (nats)")
    ax.set_title(f"lm-continual, seed {seed}: forgetting vs learning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lm", type=Path, help="lm-continual records folder (fogo_lm_diagnosis)")
    ap.add_argument("--out", type=Path, default=Path("runs/fogo_v5"))
    ap.add_argument("--png", type=Path, default=Path("docs/fogo_tradeoff.png"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = ap.parse_args()
    if args.lm:
        lm_plot(args.lm, args.png)
        return
    rows = [json.loads(line) for name in ("permuted.jsonl", "permuted_budget.jsonl")
            for line in (args.out / name).read_text().splitlines() if line.strip()]  # fmt: skip
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for mode, configs in BUDGETS.items():
        xs, ys = [], []
        for config in configs:
            rs = [r for r in rows if r["config"] == config and r["seed"] in args.seeds]
            xs.append(rs[0].get("memory", {}).get("memory_bytes", 0.0) / 1024)
            ys.append(np.mean([100 * r["metrics"]["bwt"] for r in rs]))
            print(f"{mode:9s} {config:20s} {xs[-1]:8.1f} KiB  BWT {ys[-1]:6.2f}")
        ax.plot(xs, ys, marker="o", label=f"FOGO, {mode}")
    ax.set_xlabel("memory of the two hidden layers (KiB)")
    ax.set_ylabel("backward transfer (points)")
    ax.set_title("Permuted MNIST, 3 tasks: memory vs forgetting")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
