"""FOGO evidence and ablations on real continual and long-tailed tasks (docs/fogo.md).

Each (experiment, config, seed) run appends one JSON line to ``<out>/<experiment>.jsonl``; runs
already recorded are skipped, so an interrupted sweep resumes where it stopped.

    python scripts/fogo_evidence.py --data-dir ../shared/data --experiment permuted \
        --configs adamw fogo_nomem fogo_aware fogo_agnostic --seeds 0 1 2
    python scripts/fogo_evidence.py --summarize --out runs/fogo

Configs are named below (CONFIGS); every FOGO variant shares the same lr, tuned on the first
task's accuracy (plasticity), not on forgetting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from orthoptim import FOGO, param_groups
from orthoptim.benchmarks import data, longtail, models, streams, train
from orthoptim.memory import bucket as memory_bucket

# fp32 Newton-Schulz: on CPU bf16 matmuls are several times slower than fp32.
BASE = dict(ns_dtype="float32")
# name -> (optimizer kind, FOGO kwargs, task_aware)
CONFIGS: dict[str, tuple[str, dict, bool]] = {
    "adamw": ("adamw", {}, False),
    "muon": ("fogo", dict(memory=False, dual_stream=False, beta_slow=0.95, nesterov=True), False),
    "fogo_nomem": ("fogo", dict(memory=False), False),
    "fogo_aware": ("fogo", dict(), True),
    "fogo_agnostic": ("fogo", dict(), False),
    "fogo_aware_single": ("fogo", dict(dual_stream=False), True),
    "fogo_aware_lerp": ("fogo", dict(fusion="lerp"), True),
    "fogo_aware_sign": ("fogo", dict(gate="sign", gate_threshold=0.0), True),
    "fogo_aware_r0.5": ("fogo", dict(radius=0.5), True),
    "fogo_aware_r0.9": ("fogo", dict(radius=0.9), True),
    "fogo_aware_output": ("fogo", dict(side="output"), True),
    "fogo_aware_cap2": ("fogo", dict(capacity=2), True),
    "fogo_aware_nosched": ("fogo", dict(write_interval=0), True),
    "fogo_agnostic_sign": ("fogo", dict(gate="sign"), False),
    "fogo_aware_slowsrc": ("fogo", dict(write_source="slow"), True),
    "fogo_agnostic_slowsrc": ("fogo", dict(write_source="slow"), False),
    "fogo_nomem_single": ("fogo", dict(memory=False, dual_stream=False), False),
    "fogo_nomem_lerp": ("fogo", dict(memory=False, fusion="lerp"), False),
    "fogo_agnostic_r0.5": ("fogo", dict(radius=0.5), False),
    # The Muon-like single stream (beta 0.95, Nesterov) with the memory on top.
    "muon_mem_aware": ("fogo", dict(dual_stream=False, beta_slow=0.95, nesterov=True), True),
    "muon_mem_agnostic": ("fogo", dict(dual_stream=False, beta_slow=0.95, nesterov=True), False),
    "fogo_aware_evict": ("fogo", dict(overflow="evict"), True),
    "fogo_agnostic_evict": ("fogo", dict(overflow="evict"), False),
    "fogo_aware_b95": ("fogo", dict(beta_slow=0.95, beta_fast=0.8), True),
    "fogo_nomem_b95": ("fogo", dict(memory=False, beta_slow=0.95, beta_fast=0.8), False),
}
# protection="kronecker" (opt-in, issue 15): smaller / mixed / both sides, task-aware; online
# consolidation (task-agnostic).
for _sides in ("smaller", "mixed", "both"):
    CONFIGS[f"fogo_aware_kron_{_sides}"] = (
        "fogo", dict(protection="kronecker", kron_sides=_sides), True
    )  # fmt: skip
for _gamma in (0.5, 0.9):
    CONFIGS[f"fogo_agnostic_kron_online{_gamma}"] = (
        "fogo", dict(protection="kronecker", kron_online=_gamma), False
    )  # fmt: skip
# shared factors (kron_share="model", within the budget), task-aware and with the
# task-agnostic boundary detection (kron_detect)
CONFIGS["fogo_aware_kshare"] = ("fogo", dict(protection="kronecker", kron_share="model"), True)
for _growth in (1.5, 2.0, 3.0):
    CONFIGS[f"fogo_agnostic_kshare_detect{_growth:g}"] = (
        "fogo", dict(protection="kronecker", kron_share="model", kron_detect=_growth), False
    )  # fmt: skip
for budget in (0.01, 0.02, 0.05, 0.1, 0.2, 0.4):
    CONFIGS[f"fogo_aware_b{budget}"] = ("fogo", dict(memory_budget=budget), True)
    CONFIGS[f"fogo_agnostic_b{budget}"] = ("fogo", dict(memory_budget=budget), False)


def make_optimizer(name: str, lr: float, weight_decay: float):
    kind, kwargs, _ = CONFIGS[name]

    def build(model):
        if kind == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        groups = param_groups(model, verbose=False)
        return FOGO(groups, lr=lr, weight_decay=weight_decay, **{**BASE, **kwargs})

    return build


class detector_folds:  # noqa: N801 (used as a context of run_one)
    """Logs the steps at which a shared Kronecker factor folds a detected boundary
    (``kron_detect``; a diagnostic host read per step) until ``restore`` is put back."""

    def __init__(self):
        self.steps: list[int] = []
        self.calls = 0
        self.restore = memory_bucket.SharedFactor.begin_step
        log = self

        def logged(factor, skip):
            log.restore(factor, skip)
            log.calls += 1
            since = factor.state.get(f"{factor.side}_since")
            if factor.growth > 0 and since is not None and float(since) == 1 and log.calls > 1:
                log.steps.append(log.calls)

        memory_bucket.SharedFactor.begin_step = logged  # type: ignore[method-assign]


def run_one(args, experiment: str, name: str, seed: int) -> dict:
    kind, _, task_aware = CONFIGS[name]
    lr = args.lr_adamw if kind == "adamw" else args.lr_fogo
    opt_fn = make_optimizer(name, lr, args.weight_decay)
    start = time.time()
    if experiment in ("permuted", "rotated", "split_task", "split_class"):
        ds = (
            data.load_mnist(args.data_dir)
            if args.dataset == "mnist"
            else data.load_fashion_mnist(args.data_dir)
        )
        if experiment == "permuted":
            stream = streams.permuted_stream(ds, args.tasks, seed=seed)
        elif experiment == "rotated":
            stream = streams.rotated_stream(ds, args.tasks, seed=seed)
        else:
            scenario = "task-il" if experiment == "split_task" else "class-il"
            # --tasks T < 5 keeps the first T class pairs (0-1, 2-3, ...)
            order = list(range(2 * min(args.tasks, 5)))
            stream = streams.split_stream(ds, 2, scenario, seed=seed, class_order=order)
        holder = {}
        folds = detector_folds()

        def model_fn():
            return models.MLP(784, (args.width, args.width), 10)

        def tracking_opt(model):
            holder["opt"] = opt_fn(model)
            return holder["opt"]

        res = train.run_continual(
            stream, model_fn, tracking_opt, steps_per_task=args.steps, batch_size=args.batch,
            seed=seed, task_aware=task_aware,
        )  # fmt: skip
        opt = holder["opt"]
        memory_bucket.SharedFactor.begin_step = folds.restore  # type: ignore[method-assign]
        record = {"metrics": res.metrics, "R": np.asarray(res.R).tolist()}
        if folds.steps:
            record["detector_folds"] = folds.steps
        if isinstance(opt, FOGO):
            record["memory"] = opt.memory_stats()
    elif experiment == "longtail":
        ds = data.load_fashion_mnist(args.data_dir)
        lt = longtail.make_longtail(ds, rho=args.rho, seed=seed)
        res = train.run_longtail(
            lt, lambda: models.MLP(784, (args.width, args.width), 10), opt_fn,
            steps=args.steps, batch_size=args.batch, seed=seed,
        )  # fmt: skip
        record = {"metrics": res.to_dict()}
    else:
        raise ValueError(f"unknown experiment {experiment!r}")
    record.update(
        experiment=experiment, config=name, seed=seed, lr=lr, steps=args.steps,
        batch=args.batch, tasks=args.tasks, width=args.width, dataset=args.dataset,
        seconds=time.time() - start, torch=torch.__version__,
    )  # fmt: skip
    return record


def summarize(out: Path) -> None:
    for path in sorted(out.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        print(f"\n## {path.stem}\n")
        by = {}
        for r in rows:
            by.setdefault(r["config"], []).append(r)
        if rows and "R" in rows[0]:
            print(
                "| config | seeds | ACC % | BWT (pts) | forgetting | learning acc % | last task % | memory/params |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for name, rs in by.items():

                def ms(key, scale=100.0, rs=rs):
                    v = np.array([r["metrics"][key] for r in rs]) * scale
                    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}"

                last = np.array([r["R"][-1][-1] for r in rs]) * 100
                mem = rs[0].get("memory", {}).get("memory_fraction", 0.0)
                print(
                    f"| {name} | {len(rs)} | {ms('acc')} | {ms('bwt')} | {ms('forgetting')} | "
                    f"{ms('learning_acc')} | {last.mean():.1f} ± {last.std(ddof=1) if len(last) > 1 else 0:.1f} | {mem:.3f} |"
                )
        else:
            print("| config | seeds | balanced acc % | head % | mid % | tail % |")
            print("|---|---|---|---|---|---|")
            for name, rs in by.items():

                def g(fn, rs=rs):
                    v = np.array([fn(r["metrics"]) for r in rs]) * 100
                    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}"

                print(
                    f"| {name} | {len(rs)} | {g(lambda m: m['balanced_accuracy'])} | "
                    f"{g(lambda m: m['groups']['head'])} | {g(lambda m: m['groups']['mid'])} | "
                    f"{g(lambda m: m['groups']['tail'])} |"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/fogo"))
    ap.add_argument("--experiment", default="permuted")
    ap.add_argument("--configs", nargs="+", default=["adamw", "fogo_nomem", "fogo_aware"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "fashion"])
    ap.add_argument("--tasks", type=int, default=5, help="tasks (split: class pairs, at most 5)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rho", type=float, default=100.0)
    ap.add_argument("--lr-adamw", type=float, default=1e-3)
    ap.add_argument("--lr-fogo", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.out)
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.experiment}{args.tag}.jsonl"
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["config"], r["seed"]))
    for name in args.configs:
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            record = run_one(args, args.experiment, name, seed)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            m = record["metrics"]
            print(name, seed, {k: round(v, 4) for k, v in m.items() if isinstance(v, float)},
                  f"{record['seconds']:.1f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
