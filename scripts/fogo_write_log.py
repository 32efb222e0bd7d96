"""What FOGO's scheduled memory writes do in a task-agnostic continual run (docs/fogo.md, 3.6-3.7).

Runs split (Fashion-)MNIST task-IL with FOGO's default memory and no ``end_task()`` calls, and
counts the outcome of every codebook write (``insert`` a new entry, ``merge`` into an existing
scheduled entry, or ``skip``) per task and per protected matrix (keyed by the protected side's
dimension: 784 = first layer, 256 = second). ``--per-write`` also prints, for every write, the
signals a "new stretch" test can use: the share of the window's gradient energy that the best
stored entry already holds (the merge rule's similarity), the window's gradient energy
sum_t ||G_t||_F^2 relative to the previous window's, the cosine between the output-energy
profiles of the window and the previous one, and whether FOGO declared a new stretch.

    python scripts/fogo_write_log.py --data-dir ../shared/data --dataset fashion --tasks 3
"""

from __future__ import annotations

import argparse
import collections

import torch

import orthoptim.memory.bucket as bucket_module
from orthoptim import FOGO, param_groups
from orthoptim.benchmarks import data, models, streams, train
from orthoptim.memory import codebook
from orthoptim.ops.sketch import nystrom_factor


def stored_share(state: dict, config, omega: torch.Tensor) -> float:
    """Largest share of the window's energy held by one stored entry (before the write)."""
    book = state["memory"]
    if not bool(book["used"].any()):
        return 0.0
    d = nystrom_factor(state["grad_sketch"], omega).mT
    return float(codebook.entry_shares(book, d, config.codebook, seed=1)[0].max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="fashion", choices=("mnist", "fashion"))
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-write", action="store_true", help="print every write's signals")
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = []  # (step, side, outcome, share, energy ratio, profile cosine, new stretch)
    energy = collections.defaultdict(float)  # gradient energy of the current window, per matrix
    previous = {}
    accumulate, write = bucket_module.MemoryBucket.accumulate, bucket_module.write
    new_stretch = bucket_module.new_stretch
    detected = {}

    def logged_new_stretch(state, config, kind):
        profile = state["row_energy"].sqrt()
        cosine = codebook.profile_cosine(state["last_profile"], profile)
        detected[id(state)] = (cosine, new_stretch(state, config, kind))
        return detected[id(state)][1]

    def logged_accumulate(self, grads, take, skip):
        for g, i in zip(grads, take, strict=True):
            energy[id(self.states[i])] += float(g.double().square().sum())
        return accumulate(self, grads, take, skip)

    def logged_write(state, config, slow, step, kind, omega, sign):
        key = id(state)
        share = stored_share(state, config, omega)
        ratio = energy[key] / previous[key] if previous.get(key) else float("nan")
        previous[key], energy[key] = energy[key], 0.0
        out = write(state, config, slow, step, kind, omega, sign)
        log.append((step, config.side_dim, out, share, ratio, *detected[key]))
        return out

    bucket_module.MemoryBucket.accumulate = logged_accumulate
    bucket_module.write, bucket_module.new_stretch = logged_write, logged_new_stretch
    load = data.load_mnist if args.dataset == "mnist" else data.load_fashion_mnist
    stream = streams.split_stream(load(args.data_dir), 2, "task-il", seed=args.seed,
                                  class_order=list(range(2 * args.tasks)))  # fmt: skip
    res = train.run_continual(
        stream, lambda: models.MLP(784, (256, 256), 10),
        lambda m: FOGO(param_groups(m, verbose=False), lr=1e-3, ns_dtype="float32"),
        steps_per_task=args.steps, batch_size=128, seed=args.seed, task_aware=False,
    )  # fmt: skip
    task_of = lambda step: min((step - 1) // args.steps, args.tasks - 1)  # noqa: E731
    counts = collections.Counter((task_of(step), side, out) for step, side, out, *_ in log)
    print(
        f"{args.dataset}, {args.tasks} tasks, seed {args.seed}: BWT {100 * res.metrics['bwt']:.1f}"
    )
    sides = sorted({s for _, s, *_ in log}, reverse=True)
    print("| task | protected side | insert | merge | skip |")
    print("|---|---|---|---|---|")
    for task in range(args.tasks):
        for side in sides:
            row = [counts[(task, side, o)] for o in ("insert", "merge", "skip")]
            print(f"| {task + 1} | {side} | {row[0]} | {row[1]} | {row[2]} |")
    if args.per_write:
        print(
            "\n| step | task | protected side | outcome | stored share | energy / previous "
            "window | profile cosine | new stretch |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for step, side, out, share, ratio, cosine, new in log:
            print(
                f"| {step} | {task_of(step) + 1} | {side} | {out} | {share:.2f} | {ratio:.2f} | "
                f"{cosine:.2f} | {'yes' if new else ''} |"
            )


if __name__ == "__main__":
    main()
