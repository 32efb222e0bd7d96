"""Tune the learning rate of every optimizer of a suite with the same budget, in parallel, and
store the winners in the versioned config (src/orthoptim/benchmarks/configs/hparams.json).

    python scripts/tune_suite.py --data-dir ../shared/data --points 3 --jobs 2 --write

Each (task, optimizer) pair runs ``orthoptim.benchmarks.tuning.tune`` on the task's validation
split (``eval_split="val"``), one worker process per pair; only the parent writes the config.
Tasks that share a protocol share the tuned lr (``SHARED``): tuning every continual variant and
both language-model tasks separately would double the cost for settings that differ only in
the data transform or the fine-tuning schedule. The copied entries say where they came from.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor

import torch

from orthoptim.benchmarks import hparams, registry, tuning
from orthoptim.benchmarks.suites import get_suite
from orthoptim.benchmarks.tasks import get_task

# tuned task -> (preset to tune on, tasks that reuse its lr)
TUNED = {
    "lm-pretrain": ("paper", ("lm-continual",)),  # longest runs first: better packing
    "longtail": ("paper", ()),
    "continual-permuted": ("paper", ("continual-rotated",)),
    "continual-split-task": ("paper", ("continual-split-class",)),
    "large-batch": ("paper-b1024", ()),
}


def _one(task: str, preset: str, opt: str, points: int, seeds, data_dir, config_path):
    torch.set_num_threads(1)
    config = hparams.load_hparams(config_path)
    base = config.default_hparams(opt)
    grid = tuning.lr_grid(base["lr"], points=points)
    res = tuning.tune(
        get_task(task), opt, preset=preset, grid=grid, seeds=seeds, data_dir=data_dir,
        base_hparams=base,
    )  # fmt: skip
    return task, opt, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="paper")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--config", default=None)
    ap.add_argument("--tasks", nargs="+", default=None, help="only these tuned tasks")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    suite = get_suite(args.suite)
    opts = {it.task: it.optimizers for it in suite.items}
    pairs = [(t, p, o) for t, (p, _) in TUNED.items() if not args.tasks or t in args.tasks
             for o in opts[t]]  # fmt: skip
    for _, _, o in pairs:
        registry.get_optimizer(o)
    config_path = args.config or hparams.DEFAULT_PATH
    with ProcessPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(_one, t, p, o, args.points, args.seeds, args.data_dir, config_path)
                for t, p, o in pairs]  # fmt: skip
        results = [f.result() for f in futs]
    for task, opt, res in results:
        means = ", ".join(f"{lr:g}: {m:.4g}" for lr, m in res.means.items())
        edge = "  (best on the grid edge)" if res.at_edge else ""
        print(f"{task:22s} {opt:11s} best lr {res.best_lr:g}; {res.metric} means {means}{edge}")
        if not args.write or math.isnan(res.best_score):
            continue
        prov = res.provenance()
        hparams.save_tuned(config_path, task, opt, res.hparams, prov)
        for other in TUNED[task][1]:
            if opt in opts.get(other, ()):
                hparams.save_tuned(
                    config_path, other, opt, res.hparams, {**prov, "shared_from": task}
                )
    if args.write:
        print(f"stored in {config_path} (version {hparams.load_hparams(config_path).version})")


if __name__ == "__main__":
    main()
