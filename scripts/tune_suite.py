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
    "lm-pretrain": ("paper", ("lm-continual", "lm-skills")),  # longest runs first: packing
    "longtail": ("paper", ()),
    "continual-permuted": ("paper", ("continual-rotated",)),
    "continual-split-task": ("paper", ("continual-split-class",)),
    "large-batch": ("paper-b1024", ()),
    "large-batch-cnn": ("paper-b1024", ("longtail-cnn",)),  # same CNN, lrs at batch 128
    "large-batch-vit": ("paper-b512", ()),
    "large-batch-bncnn": ("paper-b1024", ()),
}
# Tuned tasks that are not suite items (the FOP BatchNorm evidence, scripts/fop_bn_evidence.py)
OUTSIDE_SUITE = {"large-batch-bncnn": ("kfac", "fop")}
# Optimizers that are K-FAC at K-FAC's tuned lr (kfac-2x doubles it at build time; the coverage
# controls differ from K-FAC only in which layers are preconditioned): never tuned themselves.
KFAC_COPIES = ("kfac-2x", "kfac-noattn", "kfac-patch-head")


def _store(config_path, task: str, opt: str, hp: dict, prov: dict, opts: dict) -> None:
    """Store a tuned lr, and its copies: the tasks that share ``task``'s tuning (``TUNED``) and,
    for K-FAC, the ``KFAC_COPIES`` in the task's set."""
    hparams.save_tuned(config_path, task, opt, hp, prov)
    for other in TUNED[task][1]:
        if opt in opts.get(other, ()):
            hparams.save_tuned(config_path, other, opt, hp, {**prov, "shared_from": task})
    for copy in KFAC_COPIES:
        if opt == "kfac" and copy in opts[task]:
            hparams.save_tuned(config_path, task, copy, hp,
                               {**prov, "shared_from": f"{task} kfac"})  # fmt: skip


def _one(task: str, preset: str, opt: str, points: int, seeds, data_dir, config_path, grid=None):
    torch.set_num_threads(1)
    config = hparams.load_hparams(config_path)
    base = config.default_hparams(opt)
    grid = grid or tuning.lr_grid(base["lr"], points=points)
    res = tuning.tune(
        get_task(task), opt, preset=preset, grid=grid, seeds=seeds, data_dir=data_dir,
        base_hparams=base,
    )  # fmt: skip
    return task, opt, res


def _means(scores: dict, grid) -> dict[float, float]:
    """lr -> mean of the stored (JSON, null = NaN) scores; NaN when none is finite."""
    out = {}
    for lr in grid:
        vals = [v for v in scores.get(f"{lr:g}", []) if v is not None]
        out[lr] = sum(vals) / len(vals) if vals else math.nan
    return out


def _edge_lr(entry_prov: dict | None, default_lr: float, goal: str, points: int) -> float | None:
    """The next lr beyond the grid's edge when the best lr sits on it (None: interior).

    No stored entry means every lr failed (NaN): try below the grid (too large an lr is the
    usual cause: divergence, or a target never reached)."""
    step = math.sqrt(10.0)
    if entry_prov is None:
        return min(tuning.lr_grid(default_lr, points=points)) / step
    grid = sorted(entry_prov["grid"])
    best = tuning.best_lr(_means(entry_prov["scores"], grid), goal)
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return None
    return best / step if best == grid[0] else best * step


def extend(args, opts, config_path, failed: dict) -> None:
    """One round: every (task, optimizer) whose best lr is on its grid's edge (or that failed at
    every lr) runs one more lr, a sqrt(10) step beyond that edge; the merged grid is stored.
    ``failed`` keeps, across the rounds of one invocation, the grids that failed at every lr
    (they have no config entry), so the next round goes one step further down."""
    config = hparams.load_hparams(config_path)
    todo = []
    for task, (preset, _) in TUNED.items():
        if args.tasks and task not in args.tasks:
            continue
        goal = get_task(task).primary.goal
        for opt in opts[task]:
            entry = config.tasks.get(task, {}).get(opt)
            prov = entry["tuned"] if entry else failed.get((task, opt))
            if (prov and prov.get("shared_from")) or opt in KFAC_COPIES:
                continue  # K-FAC's copies share kfac's entry
            lr = _edge_lr(prov, config.default_hparams(opt)["lr"], goal, args.points)
            if lr is not None:
                todo.append((task, preset, opt, prov, float(f"{lr:.4g}")))
    print(f"extending {len(todo)} edge grids")
    with ProcessPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(_one, t, p, o, 1, args.seeds, args.data_dir, config_path, [lr])
                for t, p, o, _, lr in todo]  # fmt: skip
        results = [f.result() for f in futs]
    for (task, _, opt, prov, lr), (_, _, res) in zip(todo, results, strict=True):
        if prov is None:  # every lr of the first grid failed: keep them, as failures
            first = tuning.lr_grid(config.default_hparams(opt)["lr"], points=args.points)
            prov = {"grid": first, "scores": {f"{g:g}": [None] for g in first}}
        scores = dict(prov["scores"])
        grid = sorted(set(prov["grid"] + [lr]))
        new = res.provenance()
        scores.update(new["scores"])
        merged = {**new, "grid": grid, "scores": scores, "extended": True}
        means = _means(scores, grid)
        if all(math.isnan(m) for m in means.values()):
            print(f"{task:22s} {opt:11s} still failing at every lr {grid}")
            failed[(task, opt)] = merged
            continue
        best = tuning.best_lr(means, res.goal)
        hp = {**hparams.load_hparams(config_path).default_hparams(opt), "lr": best}
        print(f"{task:22s} {opt:11s} grid {grid} -> best lr {best:g} ({means[best]:.4g})")
        if args.write:
            _store(config_path, task, opt, hp, merged, opts)


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
    ap.add_argument("--extend", action="store_true",
                    help="one more lr beyond the edge for every best-on-the-edge grid")
    ap.add_argument("--rounds", type=int, default=1, help="extension rounds (with --extend)")
    args = ap.parse_args()
    suite = get_suite(args.suite)
    opts = {**OUTSIDE_SUITE, **{it.task: it.optimizers for it in suite.items}}
    if args.extend:
        failed: dict = {}
        for _ in range(args.rounds):
            extend(args, opts, args.config or hparams.DEFAULT_PATH, failed)
        return
    # K-FAC's copies are not tuned: they share kfac's entry (KFAC_COPIES)
    pairs = [(t, p, o) for t, (p, _) in TUNED.items() if not args.tasks or t in args.tasks
             for o in opts[t] if o not in KFAC_COPIES]  # fmt: skip
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
        _store(config_path, task, opt, res.hparams, res.provenance(), opts)
    if args.write:
        print(f"stored in {config_path} (version {hparams.load_hparams(config_path).version})")


if __name__ == "__main__":
    main()
