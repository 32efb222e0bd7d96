"""The contract every benchmark task follows, so the runner, the tuner and the report treat all
tasks alike.

A task is a :class:`TaskSpec`: a name, the metrics it reports (the first is the primary one, with
the direction that counts as better), size presets (``"tiny"`` for tests, ``"quick"`` for the
embedded-data suite, ``"paper"`` for real data) and a ``run`` function::

    out = spec.run(make_optimizer, seed=0, settings=spec.settings("quick"), data_dir=None,
                   progress=NullProgress())

``make_optimizer(model, lr_scale=1.0)`` builds the optimizer under test on the task's model
(``lr_scale`` multiplies its learning rate; the large-batch task uses it for linear scaling).
``settings`` is a flat, JSON-serialisable dict; every key a task reads must be in its presets,
and ``settings["eval_split"]`` is ``"test"`` (report) or ``"val"`` (tuning: a split held out of
the training data, never the test set). The returned :class:`RunOutput` holds only
JSON-serialisable values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "OptimizerFactory",
    "Metric",
    "RunOutput",
    "TaskSpec",
    "Progress",
    "NullProgress",
    "EVAL_SPLITS",
]

EVAL_SPLITS = ("test", "val")


class OptimizerFactory(Protocol):
    def __call__(self, model: nn.Module, lr_scale: float = 1.0) -> torch.optim.Optimizer: ...


class Progress(Protocol):
    """Step progress of one run: ``start(total)`` once, then ``advance(n)`` as steps finish."""

    def start(self, total: int, desc: str = "") -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NullProgress:
    """A :class:`Progress` that shows nothing."""

    def start(self, total: int, desc: str = "") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


@dataclass(frozen=True)
class Metric:
    """A reported number: ``goal`` is ``"max"`` or ``"min"`` (which direction is better)."""

    name: str
    goal: str
    description: str

    def __post_init__(self):
        if self.goal not in ("max", "min"):
            raise ValueError(f"Invalid goal: {self.goal!r}; expected 'max' or 'min'")


@dataclass
class RunOutput:
    """What one run of a task returns.

    Attributes:
        metrics: metric name -> float (NaN allowed, e.g. a target never reached).
        curves: curve name -> ``{"x": [...], "y": [...], "xlabel": str, "ylabel": str}``.
        extra: any other JSON-serialisable detail (accuracy matrix ``R``, per-class accuracy...).
    """

    metrics: dict[str, float]
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task.

    Attributes:
        name: unique id used on the command line (e.g. ``"continual-permuted"``).
        family: the paper-claim family it stands in for (``"longtail"``, ``"continual"``,
            ``"lm"``, ``"lm-continual"``, ``"large-batch"``).
        description: one line for ``orthoptim list tasks``.
        metrics: reported metrics; ``metrics[0]`` is the primary one (used for tuning).
        presets: preset name -> settings dict; must contain ``"tiny"`` and ``"quick"``.
        run: ``run(make_optimizer, *, seed, settings, data_dir, progress) -> RunOutput``.
        datasets: datasets the task can read under ``--data-dir`` (documentation only).
        data_parallel: whether the task runs under ``torchrun``: ``run`` then also takes
            ``parallel=`` a :class:`~orthoptim.benchmarks.ddp.DataParallel` (split the global
            batch over the ranks, train through DDP, evaluate once).
    """

    name: str
    family: str
    description: str
    metrics: tuple[Metric, ...]
    presets: Mapping[str, Mapping[str, Any]]
    run: Callable[..., RunOutput]
    datasets: tuple[str, ...] = ()
    data_parallel: bool = False

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    def settings(self, preset: str, **overrides) -> dict[str, Any]:
        """The preset's settings with ``overrides`` applied; unknown preset or key -> ValueError."""
        if preset not in self.presets:
            raise ValueError(
                f"Invalid preset: {preset!r} for task {self.name!r}; "
                f"expected one of {sorted(self.presets)}"
            )
        out = {"eval_split": "test", **self.presets[preset]}
        unknown = sorted(set(overrides) - set(out))
        if unknown:
            raise ValueError(
                f"Invalid setting(s) {unknown} for task {self.name!r}; known: {sorted(out)}"
            )
        out.update(overrides)
        if out["eval_split"] not in EVAL_SPLITS:
            raise ValueError(
                f"Invalid eval_split: {out['eval_split']!r}; expected one of {EVAL_SPLITS}"
            )
        return out
