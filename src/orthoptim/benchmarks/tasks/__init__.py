"""Benchmark tasks, each a :class:`~orthoptim.benchmarks.tasks.base.TaskSpec`.

- :mod:`.classification`: long-tailed classification, continual learning (domain-IL permuted and
  rotated, task-IL and class-IL split) and large-batch time-to-accuracy.
- :mod:`.lm`: char-level GPT pretraining and continual language-model fine-tuning.
- :mod:`.lm_skills`: the GPT pretrained on a corpus, then fine-tuned on synthetic skills in turn.
"""

from __future__ import annotations

import difflib
import importlib

from .base import TaskSpec

__all__ = ["all_tasks", "get_task", "TaskSpec"]

_MODULES = ("classification", "lm", "lm_skills")


def all_tasks() -> dict[str, TaskSpec]:
    """Every task by name, in a stable order (imports the task modules on first use)."""
    out: dict[str, TaskSpec] = {}
    for mod in _MODULES:
        for spec in importlib.import_module(f"{__name__}.{mod}").TASKS:
            if spec.name in out:
                raise RuntimeError(f"duplicate task name {spec.name!r}")
            out[spec.name] = spec
    return out


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; an unknown name raises ValueError with the closest matches."""
    tasks = all_tasks()
    if name not in tasks:
        close = difflib.get_close_matches(name, tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Invalid task: {name!r}{hint} (see `orthoptim list tasks`)")
    return tasks[name]
