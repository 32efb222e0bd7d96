"""Equal-budget learning-rate tuning on a task's validation split.

Protocol (the same for every optimizer, so no optimizer wins by getting more trials):

* grid: :func:`lr_grid`, ``points`` learning rates log-spaced by ``factor`` around the
  optimizer's default lr (default: 5 points, x sqrt(10) apart: default x 0.1 ... x 10);
* every (lr, seed) is one full run of the task at ``task.settings(preset, eval_split="val")``:
  scored on a split held out of the training data, never on the test set the report uses;
* the score of an lr is the mean over seeds of the task's primary metric, better by its goal
  (``max`` or ``min``); a NaN run (divergence, target never reached) makes its lr the worst;
* the best mean wins; ties go to the smaller lr (the more conservative choice);
* only the lr is tuned, every other hyperparameter stays at ``base_hparams``.

The chosen lr is meaningful only inside the grid: :attr:`TuneResult.at_edge` flags a winner on
the grid's edge (widen the grid). ``orthoptim tune`` (:func:`tune_command`) runs this for several
optimizers and, with ``--write``, stores the results in the hparams config with their provenance
(:func:`orthoptim.benchmarks.hparams.save_tuned`).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import registry
from .hparams import load_hparams, save_tuned
from .progress import TqdmProgress
from .tasks import get_task
from .tasks.base import NullProgress, Progress, TaskSpec

__all__ = ["lr_grid", "best_lr", "tune", "TuneResult", "tune_command"]

SQRT10 = 10**0.5


def lr_grid(default_lr: float, points: int = 5, factor: float = SQRT10) -> list[float]:
    """``points`` learning rates, ``factor`` apart, centred (geometrically) on ``default_lr``.

    Args:
        default_lr: the optimizer's default lr (> 0).
        points: grid size (>= 1); the same for every optimizer (the equal budget).
        factor: ratio of neighbouring points (> 1). Default sqrt(10): 5 points span 100x.

    Returns:
        Ascending lrs rounded to 4 significant digits (readable in the config).
    """
    if isinstance(default_lr, bool) or not isinstance(default_lr, (int, float)):
        raise ValueError(f"Invalid default_lr: {default_lr!r}; expected a number > 0")
    if not (math.isfinite(default_lr) and default_lr > 0):
        raise ValueError(f"Invalid default_lr: {default_lr!r}; expected a finite number > 0")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"Invalid points: {points!r}; expected an integer >= 1")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
        raise ValueError(f"Invalid factor: {factor!r}; expected a finite number > 1")
    mid = (points - 1) / 2
    return [float(f"{default_lr * factor ** (k - mid):.4g}") for k in range(points)]


@dataclass
class TuneResult:
    """The outcome of :func:`tune`.

    Attributes:
        task, optimizer, preset: what was tuned, where.
        metric, goal: the task's primary metric and its direction.
        grid: the lrs tried (ascending); seeds: the seeds run at each.
        scores: lr -> the metric of each seed (NaN kept).
        best_lr: the chosen lr; hparams: ``base_hparams`` with ``lr=best_lr``.
        date: ISO date of the tuning.
    """

    task: str
    optimizer: str
    preset: str
    metric: str
    goal: str
    grid: list[float]
    seeds: list[int]
    scores: dict[float, list[float]]
    best_lr: float
    hparams: dict[str, Any]
    date: str

    @property
    def means(self) -> dict[float, float]:
        """lr -> mean score over seeds (NaN if any seed is NaN)."""
        return {lr: sum(v) / len(v) for lr, v in self.scores.items()}

    @property
    def best_score(self) -> float:
        return self.means[self.best_lr]

    @property
    def at_edge(self) -> bool:
        """The best lr is the smallest or largest of a grid of >= 2 points."""
        return len(self.grid) > 1 and self.best_lr in (self.grid[0], self.grid[-1])

    def provenance(self) -> dict[str, Any]:
        """The ``tuned`` record of the config (strict JSON: NaN scores become null)."""
        clean = {
            f"{lr:g}": [None if math.isnan(s) else s for s in v] for lr, v in self.scores.items()
        }
        return {
            "preset": self.preset, "grid": list(self.grid), "seeds": list(self.seeds),
            "metric": self.metric, "goal": self.goal, "scores": clean, "date": self.date,
        }  # fmt: skip


def _rank_value(mean: float, goal: str) -> float:
    """Larger is better; NaN is the worst."""
    if math.isnan(mean):
        return -math.inf
    return mean if goal == "max" else -mean


def best_lr(means: dict[float, float], goal: str) -> float:
    """The lr with the best mean score by ``goal`` (``"max"``/``"min"``); NaN is the worst, and
    ties go to the smaller lr.

    Args:
        means: lr -> mean score over seeds.
        goal: the metric's direction.
    """
    # max() keeps the first of equal values: iterating in ascending lr, ties go to the smaller.
    return max(sorted(means), key=lambda lr: _rank_value(means[lr], goal))


def tune(
    task: TaskSpec,
    optimizer: str,
    *,
    preset: str,
    grid: Sequence[float] | None = None,
    seeds: Sequence[int] = (0,),
    data_dir: str | None = None,
    progress: Progress | None = None,
    base_hparams: dict[str, Any] | None = None,
    on_run: Callable[[float, int, float], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TuneResult:
    """Tune the lr of ``optimizer`` on ``task`` by the equal-budget protocol (module docstring).

    Args:
        task: the task.
        optimizer: registry name.
        preset: the task's settings preset (its ``eval_split`` is replaced by ``"val"``).
        grid: lrs to try; ``None``: ``lr_grid`` of the base lr (5 points).
        seeds: seeds run at every lr.
        data_dir: root of the real datasets (``None``: embedded data only).
        progress: step progress passed to every run (default: none shown).
        base_hparams: hyperparameters other than the lr (default: the registry's code defaults).
        on_run: called as ``on_run(lr, seed, score)`` after each run (logging).
        overrides: settings that replace the preset's (as a suite item's); ``eval_split`` is
            always ``"val"``.
    """
    entry = registry.get_optimizer(optimizer)
    base = {**entry.defaults, **(base_hparams or {})}
    entry.check(base)  # unknown keys fail before any training
    if grid is None:
        grid = lr_grid(base["lr"])
    grid = sorted(float(lr) for lr in grid)
    if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid):
        raise ValueError(f"Invalid grid: {grid!r}; expected finite lrs > 0")
    if len(set(grid)) != len(grid):
        raise ValueError(f"Invalid grid: {grid!r}; it repeats an lr")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("Invalid seeds: []; expected at least one seed")
    settings = task.settings(preset, **{**(overrides or {}), "eval_split": "val"})
    metric = task.primary
    progress = progress if progress is not None else NullProgress()
    scores: dict[float, list[float]] = {}
    for lr in grid:
        hp = {**base, "lr": lr}

        def make(model: nn.Module, lr_scale: float = 1.0, hp=hp):
            return registry.make_optimizer(optimizer, model, hp, lr_scale)

        for seed in seeds:
            out = task.run(
                make, seed=seed, settings=dict(settings), data_dir=data_dir, progress=progress
            )
            if metric.name not in out.metrics:
                raise ValueError(
                    f"Task {task.name!r} returned no primary metric {metric.name!r} "
                    f"(got {sorted(out.metrics)})"
                )
            value = float(out.metrics[metric.name])
            scores.setdefault(lr, []).append(value)
            if on_run is not None:
                on_run(lr, seed, value)
    best = best_lr({lr: sum(v) / len(v) for lr, v in scores.items()}, metric.goal)
    return TuneResult(
        task=task.name, optimizer=optimizer, preset=preset, metric=metric.name,
        goal=metric.goal, grid=grid, seeds=seeds, scores=scores, best_lr=best,
        hparams={**base, "lr": best}, date=_dt.date.today().isoformat(),
    )  # fmt: skip


def tune_command(args) -> int:
    """``orthoptim tune``: tune each ``args.optimizers`` on ``args.task``; print the scores and,
    with ``args.write``, store the winners in ``args.config`` (default: the packaged config).

    Args:
        args: parsed CLI arguments: task, optimizers, preset, points, seeds, data_dir, config,
            write, quiet.
    """
    spec = get_task(args.task)
    spec.settings(args.preset)  # a bad preset fails before any run
    config = load_hparams(args.config)
    for opt in args.optimizers:  # bad names fail before any run
        registry.get_optimizer(opt)
    bar = TqdmProgress(quiet=args.quiet)
    try:
        for opt in args.optimizers:
            base = config.default_hparams(opt)
            grid = lr_grid(base["lr"], points=args.points)

            def log(lr, seed, score, opt=opt):
                if not args.quiet:
                    print(f"  {opt} lr={lr:g} seed={seed}: {spec.primary.name}={score:.4g}")

            res = tune(
                spec, opt, preset=args.preset, grid=grid, seeds=args.seeds,
                data_dir=args.data_dir, progress=bar, base_hparams=base, on_run=log,
            )  # fmt: skip
            means = ", ".join(f"{lr:g}: {m:.4g}" for lr, m in res.means.items())
            print(f"{opt}: best lr {res.best_lr:g} ({res.metric} {res.best_score:.4g}, "
                  f"goal {res.goal}); means {means}")  # fmt: skip
            if res.at_edge:
                print(f"  warning: best lr {res.best_lr:g} is on the grid's edge; widen the grid")
            if math.isnan(res.best_score):
                print(f"  warning: every lr failed (NaN) for {opt}; nothing stored")
            elif args.write:
                config = save_tuned(config.path, spec.name, opt, res.hparams, res.provenance())
                print(f"  stored in {config.path} (version {config.version})")
    finally:
        bar.close()
    return 0
