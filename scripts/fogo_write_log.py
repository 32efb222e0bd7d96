"""What FOGO's scheduled memory writes do in a task-agnostic continual run (docs/fogo.md, 3.5).

Runs split (Fashion-)MNIST task-IL with FOGO's default memory and no ``end_task()`` calls, and
counts the outcome of every codebook write (``insert`` a new entry, ``merge`` into an existing
scheduled entry, which refreshes its age and so delays its protection, or ``skip``) per task and
per protected matrix (keyed by the protected side's dimension: 784 = first layer, 256 = second).

    python scripts/fogo_write_log.py --data-dir ../shared/data --dataset fashion --tasks 3
"""

from __future__ import annotations

import argparse
import collections

import torch

import orthoptim.optim.fogo as fogo_module
from orthoptim import FOGO, param_groups
from orthoptim.benchmarks import data, models, streams, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="fashion", choices=("mnist", "fashion"))
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = []
    write = fogo_module.codebook.write

    def logged(book, d, step, config, **kw):
        out = write(book, d, step, config, **kw)
        log.append((step, d.shape[1], out))
        return out

    fogo_module.codebook.write = logged
    load = data.load_mnist if args.dataset == "mnist" else data.load_fashion_mnist
    stream = streams.split_stream(load(args.data_dir), 2, "task-il", seed=args.seed,
                                  class_order=list(range(2 * args.tasks)))  # fmt: skip
    res = train.run_continual(
        stream, lambda: models.MLP(784, (256, 256), 10),
        lambda m: FOGO(param_groups(m, verbose=False), lr=1e-3, ns_dtype="float32"),
        steps_per_task=args.steps, batch_size=128, seed=args.seed, task_aware=False,
    )  # fmt: skip
    counts = collections.Counter(
        (min((step - 1) // args.steps, args.tasks - 1), side, out) for step, side, out in log
    )
    print(f"{args.dataset}, {args.tasks} tasks, seed {args.seed}: BWT {100 * res.metrics['bwt']:.1f}")
    print("| task | protected side | insert | merge | skip |")
    print("|---|---|---|---|---|")
    for task in range(args.tasks):
        for side in sorted({s for _, s, _ in log}, reverse=True):
            row = [counts[(task, side, o)] for o in ("insert", "merge", "skip")]
            print(f"| {task + 1} | {side} | {row[0]} | {row[1]} | {row[2]} |")


if __name__ == "__main__":
    main()
