"""Per-seed values and paired differences of one task's runs against a baseline, across report
groups (e.g. FOGO task-aware and task-agnostic, stored under two labels, against FOGO without
memory):

    python scripts/paired_seeds.py runs/skills --task lm-skills --base fogo-nomem \\
        --metrics forgetting learning_loss base_forgetting exact_match --matrix A

A configuration is ``optimizer`` in the task's default group, ``optimizer@label`` in another.
``--matrix NAME`` also prints each configuration's seed-mean of the matrix ``extra[NAME]`` (the
loss matrix ``L``, ``lm-skills``' exact-match matrix ``A``). Numbers come only from the stored records (``<out>/results.jsonl``); the test is the report's
(:func:`orthoptim.benchmarks.report.compare`: paired t over the seeds both ran).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from orthoptim.benchmarks.report import MetricStats, compare, fmt
from orthoptim.benchmarks.results import ResultStore


def _stats(by_seed: dict[int, float]) -> MetricStats:
    seeds = sorted(by_seed)
    v = np.array([by_seed[s] for s in seeds], dtype=float)
    f = v[np.isfinite(v)]
    std = float(f.std(ddof=1)) if f.size > 1 else 0.0
    mean = float(f.mean()) if f.size else float("nan")
    return MetricStats(len(v), int(f.size), mean, std, tuple(v.tolist()), tuple(seeds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="results folder")
    ap.add_argument("--task", required=True)
    ap.add_argument("--base", required=True, help="the configuration the others are paired with")
    ap.add_argument("--metrics", nargs="+", required=True)
    ap.add_argument("--matrix", default=None, help="also print the seed-mean of extra[MATRIX]")
    args = ap.parse_args()
    values: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    matrices: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in ResultStore(args.out).records():
        if r["task"] != args.task:
            continue
        name = r["optimizer"] if r["label"] == args.task else f"{r['optimizer']}@{r['label']}"
        for m in args.metrics:
            values[name][m][int(r["seed"])] = float(r["metrics"][m])
        if args.matrix:
            matrices[name].append(np.asarray(r["extra"][args.matrix], dtype=float))
    if args.base not in values:
        raise SystemExit(f"no runs of {args.base!r}; configurations: {sorted(values)}")
    print("| configuration | " + " | ".join(args.metrics) + " |")
    print("|---" * (len(args.metrics) + 1) + "|")
    for name, per in values.items():
        cells = [f"{fmt(_stats(per[m]).mean)} ± {fmt(_stats(per[m]).std)}" for m in args.metrics]
        print(f"| {name} (seeds {sorted(per[args.metrics[0]])}) | " + " | ".join(cells) + " |")
    print(f"\nPaired differences against {args.base} (per seed; mean, 95% CI, paired t):\n")
    base = values[args.base]
    for name, per in values.items():
        if name == args.base:
            continue
        for m in args.metrics:
            seeds = sorted(set(per[m]) & set(base[m]))
            d = ", ".join(f"s{s} {fmt(per[m][s] - base[m][s])}" for s in seeds)
            c = compare(_stats(per[m]), _stats(base[m]), args.base)
            ci = f"[{fmt(c.ci[0])}, {fmt(c.ci[1])}]" if c.ci else "-"
            p = fmt(c.p_value) if c.p_value is not None else "-"
            rel = c.diff / _stats(base[m]).mean if _stats(base[m]).mean else float("nan")
            print(
                f"- {name} - {args.base}, {m}: {d}; mean {fmt(c.diff)} ({rel:+.1%} of the "
                f"base), CI {ci}, p={p} ({c.test}{', ' + c.note if c.note else ''})"
            )
    for name, ms in matrices.items():
        rows = np.mean(ms, axis=0).round(3).tolist()
        print(f"\n{args.matrix}, {name}, mean over {len(ms)} seeds (row = after stage i): {rows}")


if __name__ == "__main__":
    main()
