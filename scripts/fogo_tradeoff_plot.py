"""Plot FOGO's memory / forgetting trade-off from evidence records (docs/fogo_tradeoff.png).

    python scripts/fogo_tradeoff_plot.py --out runs/fogo_v5 --png docs/fogo_tradeoff.png

Uses the permuted-MNIST records of `fogo_evidence.py` (main and `_budget` files): mean BWT over
the seeds that every budget shares, against the measured memory bytes of the two hidden layers.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/fogo_v5"))
    ap.add_argument("--png", type=Path, default=Path("docs/fogo_tradeoff.png"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = ap.parse_args()
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
