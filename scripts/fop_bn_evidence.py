"""Do the Monte-Carlo Fisher or the two-pass mode explain the FOP paper's gains? (BatchNorm CNN)

docs/fop.md found FOP level with K-FAC on the benchmark tasks (empirical Fisher, one pass, models
without BatchNorm) and left two differences from the paper's runs untested: the paper samples the
Fisher (Monte-Carlo labels) and forms its two halves with two forward passes, so on a BatchNorm
model each half is normalised with its own statistics (ghost batch norm). This script runs the
``large-batch-bncnn`` task (the small CNN with BatchNorm after each convolution, MNIST, steps to
96%) in every combination, 3 seeds, at two batch sizes, at the lrs tuned for K-FAC and FOP on this
model (the variants keep their base optimizer's lr):

* ``kfac``, ``kfac-mc`` (Monte-Carlo Fisher), ``kfac-ghost2`` (two micro-batches of half the batch:
  K-FAC with the two-pass mode's ghost BatchNorm, the control for the statistics alone);
* ``fop`` (one pass: the halves share full-batch statistics), ``fop-mc``, ``fop-2pass`` (the two
  halves as two micro-batches: each with its own statistics, the paper's single-GPU mode) and
  ``fop-mc-2pass`` (the paper's configuration).

    python scripts/fop_bn_evidence.py --data-dir ../shared/data --out runs/fop_bn --batches 4096
    python scripts/fop_bn_evidence.py --data-dir ../shared/data --out runs/fop_bn98 --batches 4096 \
        --target 0.98
    python scripts/fop_bn_evidence.py --data-dir ../shared/data --out runs/fop_bn --table

Runs are stored (resumable) in ``<out>/results.jsonl``; ``--table`` prints the markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics

from orthoptim.benchmarks import hparams
from orthoptim.benchmarks.results import ResultStore
from orthoptim.benchmarks.runner import PlannedRun, run_plan

TASK = "large-batch-bncnn"
# condition -> (optimizer, hyperparameter overrides, task setting overrides)
CONDITIONS = {
    "kfac": ("kfac", {}, {}),
    "kfac-mc": ("kfac", {"fisher": "mc"}, {}),
    "kfac-ghost2": ("kfac", {}, {"micro_batches": 2}),
    "fop": ("fop", {}, {}),
    "fop-mc": ("fop", {"fisher": "mc"}, {}),
    "fop-2pass": ("fop", {}, {"micro_batches": 2}),
    "fop-mc-2pass": ("fop", {"fisher": "mc"}, {"micro_batches": 2}),
}
PRESETS = {1024: "paper-b1024", 4096: "paper"}


def plan(seeds, batches, target: float | None = None) -> list[PlannedRun]:
    config = hparams.load_hparams()
    out = []
    for seed in seeds:
        for b in batches:
            for name, (opt, hp, settings) in CONDITIONS.items():
                base, source = config.lookup(TASK, opt)
                over = dict(settings) | ({} if target is None else {"target_accuracy": target})
                out.append(PlannedRun(
                    task=TASK, preset=PRESETS[b], optimizer=opt, seed=seed,
                    hparams={**base, **hp}, hparams_source=source, overrides=over,
                    label=f"bs{b}/{name}",
                ))  # fmt: skip
    return out


def table(store: ResultStore, target: float = 0.96) -> str:
    rows: dict = {}
    for r in store.records():
        rows.setdefault(r["label"], []).append(r["metrics"]["steps_to_target"])
    batches = sorted({int(k.split("/")[0][2:]) for k in rows})
    lines = [f"| steps to {target:.0%} | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]  # fmt: skip
    for name in CONDITIONS:
        cells = []
        for b in batches:
            vals = rows.get(f"bs{b}/{name}", [])
            hit = [v for v in vals if not math.isnan(v)]
            if not hit:
                cells.append(f"never (0/{len(vals)})")
                continue
            sd = statistics.stdev(hit) if len(hit) > 1 else 0.0
            cells.append(f"{statistics.fmean(hit):.0f} ± {sd:.0f} ({len(hit)}/{len(vals)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="runs/fop_bn")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--target", type=float, default=None, help="target accuracy (default 0.96)")
    ap.add_argument("--table", action="store_true", help="only print the table of stored runs")
    args = ap.parse_args()
    store = ResultStore(args.out)
    if not args.table:
        plans = plan(args.seeds, args.batches, args.target)
        run_plan(plans, store, data_dir=args.data_dir, jobs=args.jobs)
    print(table(store, 0.96 if args.target is None else args.target))


if __name__ == "__main__":
    main()
