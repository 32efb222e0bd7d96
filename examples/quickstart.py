"""orthoptim quickstart: FOGO vs AdamW on a small continual stream, with no downloads.

Trains an MLP on 3 permuted versions of scikit-learn's 8x8 digits (embedded data, no data dir)
with AdamW, FOGO without memory and FOGO with memory (task-aware, ``end_task()`` at each task
boundary), and prints average accuracy, backward transfer (forgetting, negative is worse) and
what the memory did. Takes a few minutes on a 2-core CPU.

    python examples/quickstart.py [--seeds 0 1 2] [--steps 200]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from orthoptim import FOGO, param_groups
from orthoptim.benchmarks import data, models, streams, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200, help="training steps per task")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3, help="shared by AdamW and FOGO")
    args = ap.parse_args()
    torch.set_num_threads(1)

    digits = data.load_digits()
    optimizers = {
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr),
        # Newton-Schulz in fp32: bf16 matmuls are slow on CPUs.
        "fogo (no memory)": lambda m: FOGO(
            param_groups(m, verbose=False), lr=args.lr, memory=False, ns_dtype="float32"
        ),
        "fogo": lambda m: FOGO(param_groups(m, verbose=False), lr=args.lr, ns_dtype="float32"),
    }
    print(f"{args.tasks} permuted-digits tasks x {args.steps} steps, MLP 64-256-256-10, "
          f"lr {args.lr}, seeds {args.seeds}\n")  # fmt: skip
    print(f"{'optimizer':18s} {'avg acc %':>12s} {'BWT (pts)':>12s} {'last task %':>12s}")
    for name, make in optimizers.items():
        rows, stats = [], None
        for seed in args.seeds:
            holder = {}

            def build(model, make=make, holder=holder):
                holder["opt"] = make(model)
                return holder["opt"]

            res = train.run_continual(
                streams.permuted_stream(digits, args.tasks, seed=seed),
                lambda: models.MLP(64, (256, 256), 10), build,
                steps_per_task=args.steps, batch_size=64, seed=seed, task_aware=True,
            )  # fmt: skip
            rows.append((res.metrics["acc"], res.metrics["bwt"], float(np.asarray(res.R)[-1, -1])))
            if isinstance(holder["opt"], FOGO):
                stats = holder["opt"].memory_stats()
        arr = np.array(rows) * 100
        mean, std = arr.mean(0), arr.std(0)
        cells = [f"{m:6.1f} ± {s:4.1f}" for m, s in zip(mean, std, strict=True)]
        print(f"{name:18s} " + " ".join(cells))
        if stats and stats.get("matrices"):
            print(f"{'':18s} memory: {stats['memory_bytes'] / 1024:.1f} KiB "
                  f"({100 * stats['memory_fraction']:.1f}% of the protected weights), "
                  f"{stats['entries_used']:.0f} entries, last-step correction "
                  f"{100 * stats['correction_ratio']:.0f}% of the update")  # fmt: skip


if __name__ == "__main__":
    main()
