"""Compact markdown tables of a suite's results for docs/benchmarks.md: per report group, a few
key metrics (mean ± std over seeds, reach counts for targets) and the primary metric's verdict.

    python scripts/benchmark_tables.py runs/paper > /tmp/tables.md

Numbers come only from the stored records (``<out>/results.jsonl``), through the same
``report.summarize`` the full report uses.
"""

from __future__ import annotations

import argparse

from orthoptim.benchmarks.report import summarize
from orthoptim.benchmarks.results import ResultStore

# the metrics shown per task family (the full report has them all)
KEY_METRICS = {
    "longtail": ["balanced_accuracy", "head_accuracy", "mid_accuracy", "tail_accuracy"],
    "continual": ["acc", "bwt", "forgetting", "learning_accuracy"],
    "lm": ["val_loss", "steps_to_target", "tokens_per_second"],
    # lm-skills adds the base corpus' share and greedy exact match (absent from lm-continual)
    "lm-continual": [
        "avg_final_loss",
        "forgetting",
        "learning_loss",
        "base_forgetting",
        "exact_match",
        "exact_match_forgetting",
    ],
    "large-batch": ["steps_to_target", "epochs_to_target", "seconds_to_target", "final_accuracy"],
}
PERCENT = {"balanced_accuracy", "head_accuracy", "mid_accuracy", "tail_accuracy", "acc", "bwt",
           "forgetting", "learning_accuracy", "final_accuracy"}  # fmt: skip


def cell(stats, metric: str, family: str) -> str:
    if stats.reached == 0:
        return f"never (0/{stats.n})"
    scale = 100.0 if metric in PERCENT and family != "lm-continual" else 1.0
    digits = 1 if scale == 100.0 else (0 if "steps" in metric or "tokens" in metric else 3)
    m, s = stats.mean * scale, stats.std * scale
    text = f"{m:.{digits}f} ± {s:.{digits}f}"
    if stats.reached < stats.n:
        text += f" ({stats.reached}/{stats.n} reached)"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="results folder")
    args = ap.parse_args()
    for g in summarize(ResultStore(args.out).records()):
        metrics = [m for m in KEY_METRICS.get(g.family, [g.primary_metric]) if m in g.goals]
        seeds = sorted({r["seed"] for r in g.records})
        print(f"**{g.label}** (seeds {seeds})\n")
        arrows = {"max": "↑", "min": "↓"}
        print("| optimizer | " + " | ".join(f"{m} {arrows[g.goals[m]]}" for m in metrics) + " |")
        print("|---" * (len(metrics) + 1) + "|")
        for opt in g.optimizers:
            cells = [cell(g.stats[opt][m], m, g.family) for m in metrics]
            print(f"| {opt} | " + " | ".join(cells) + " |")
        v = g.verdicts[g.primary_metric]
        print(f"\nVerdict ({g.primary_metric}): {v.text}\n")


if __name__ == "__main__":
    main()
