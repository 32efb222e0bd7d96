"""Continual-learning tasks in the three scenarios of van de Ven & Tolias ("Three scenarios for
continual learning", arXiv:1904.07734):

- ``continual-permuted`` (domain-IL): a fixed pixel permutation per task (GEM, Lopez-Paz &
  Ranzato, NeurIPS 2017, arXiv:1706.08840; ``first_unpermuted`` follows Stable-SGD, Mirzadeh et
  al., NeurIPS 2020).
- ``continual-rotated`` (domain-IL): task ``t`` rotates every image by an angle drawn from
  ``U[t * 180/T, (t + 1) * 180/T)`` degrees (GEM protocol).
- ``continual-split-task`` (task-IL): consecutive class groups ``{0,1}, {2,3}, ...``; logits are
  masked to the task's classes in training and evaluation (the task id is known).
- ``continual-split-class`` (class-IL): the same split, all logits compete (no task id); without
  replay every optimizer-only method ends near ``1/T`` (benchmarks.md 1a).

One model and one optimizer see the tasks in order, ``steps_per_task`` steps each; with
``task_aware`` the optimizer's ``end_task()`` (FOGO) is called after every task
(:func:`~orthoptim.benchmarks.train.run_continual`). ``R[i, j]`` is the accuracy on task ``j``'s
evaluation set after training task ``i``; ``b[j]`` before any training. Streams (permutations,
angles, subsets) depend only on the seed, so all optimizers see the same stream within a seed.

Metrics (:mod:`~orthoptim.benchmarks.metrics`): ``acc = mean_j R[T-1, j]`` (primary),
``bwt = mean_{j<T-1} (R[T-1, j] - R[j, j])`` (GEM), ``forgetting`` (Chaudhry et al., ECCV 2018:
best past accuracy minus final) and ``learning_accuracy = mean_j R[j, j]``.
"""

from __future__ import annotations

from typing import Any

from .. import streams
from ..metrics import continual_metrics
from ..train import run_continual, task_seed
from ._common import COMMON_DATA, check_positive, loss_curve, model_fn, prepare, progress_callback
from .base import Metric, NullProgress, RunOutput, TaskSpec

__all__ = ["CONTINUAL_TASKS"]

METRICS = (
    Metric("acc", "max", "average accuracy over all tasks after the last one"),
    Metric("bwt", "max", "backward transfer (negative = forgetting)"),
    Metric("forgetting", "min", "mean drop from each task's best past accuracy to the final one"),
    Metric("learning_accuracy", "max", "mean accuracy on each task right after training it"),
)

_BASE = {**COMMON_DATA, "task_aware": True, "train_limit": None}
_DIGITS_TINY = {
    **_BASE,
    "dataset": "digits",
    "model": "mlp",
    "hidden": [64],
    "num_tasks": 5,
    "steps_per_task": 30,
    "batch_size": 32,
    "eval_limit": None,
}
_DIGITS_QUICK = {
    **_BASE,
    "dataset": "digits",
    "model": "mlp",
    "hidden": [128, 128],
    "num_tasks": 5,
    "steps_per_task": 100,
    "batch_size": 32,
    "eval_limit": None,
}
# MNIST, MLP 784-256-256-10 (Stable-SGD width), 5 tasks x 200 steps of 64, 2000 eval images
_MNIST_PAPER = {
    **_BASE,
    "dataset": "mnist",
    "model": "mlp",
    "num_tasks": 5,
    "steps_per_task": 200,
    "batch_size": 64,
    "eval_limit": 2000,
}
_DOMAIN = {"train_per_task": None}


def _permuted(data, s, seed):
    return streams.permuted_stream(data, int(s["num_tasks"]), seed=task_seed(seed, 31),
                                   first_unpermuted=bool(s["first_unpermuted"]),
                                   train_per_task=s["train_per_task"])  # fmt: skip


def _rotated(data, s, seed):
    if data.train_x.ndim != 4:
        raise ValueError(f"Invalid dataset: {s['dataset']!r}; continual-rotated needs images")
    return streams.rotated_stream(data, int(s["num_tasks"]), seed=task_seed(seed, 31),
                                  protocol="gem", train_per_task=s["train_per_task"])  # fmt: skip


def _split(scenario):
    def build(data, s, seed):
        T, C = int(s["num_tasks"]), data.num_classes
        if C % T != 0:
            raise ValueError(
                f"Invalid num_tasks: {T!r}; the {C} classes of {s['dataset']!r} must split evenly"
            )
        return streams.split_stream(data, C // T, scenario, seed=task_seed(seed, 31))

    return build


def _make_run(name, build_stream):
    def run(make_optimizer, *, seed: int, settings: dict[str, Any], data_dir=None,
            progress=None) -> RunOutput:  # fmt: skip
        progress = progress or NullProgress()
        check_positive(settings, "num_tasks", "steps_per_task", "batch_size")
        if int(settings["num_tasks"]) < 2:
            raise ValueError(f"Invalid num_tasks: {settings['num_tasks']!r}; must be >= 2")
        prep = prepare(settings, data_dir, seed)
        stream = build_stream(prep.data, settings, seed)
        steps = int(settings["steps_per_task"])
        progress.start(steps * len(stream), desc=name)
        res = run_continual(
            stream, model_fn(settings, prep.data), lambda m: make_optimizer(m),
            steps_per_task=steps, batch_size=int(settings["batch_size"]), seed=seed,
            task_aware=bool(settings["task_aware"]), callback=progress_callback(progress),
        )  # fmt: skip
        m = continual_metrics(res.R, res.b)
        return RunOutput(
            metrics={
                "acc": m["acc"],
                "bwt": m["bwt"],
                "forgetting": m["forgetting"],
                "learning_accuracy": m["learning_acc"],
            },
            curves={"train_loss": loss_curve([v for task in res.losses for v in task])},
            extra={
                "R": res.R.tolist(),
                "b": res.b.tolist(),
                "task_names": list(res.task_names),
                "scenario": stream.scenario,
                "fwt": m["fwt"],
                "avg_incremental_acc": m["avg_incremental_acc"],
                "end_task_calls": res.end_task_calls,
                "train_seconds": res.train_seconds,
                "seconds": res.seconds,
                "stream_info": {k: v for k, v in stream.info.items()},
                "eval_split": settings["eval_split"],
            },
        )

    run.__doc__ = f"""One ``{name}`` run (see the module docstring).

        Args:
            make_optimizer: ``(model, lr_scale=1.0) -> Optimizer`` (called with the model only).
            seed: seeds the stream, model init and each task's data order.
            settings: ``dataset``, ``model``, ``hidden``, ``width``, ``num_tasks``,
                ``steps_per_task``, ``batch_size``, ``task_aware``, ``eval_split``, ``val_frac``,
                ``train_limit``, ``eval_limit`` (+ stream-specific keys of the presets).
            data_dir: root data folder (not needed for ``digits``).
            progress: a Progress (default: none).
        """
    return run


def _presets(extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "tiny": {**_DIGITS_TINY, **extra},
        "quick": {**_DIGITS_QUICK, **extra},
        "paper": {**_MNIST_PAPER, **extra},
        "paper-fashion": {**_MNIST_PAPER, "dataset": "fashion_mnist", **extra},
    }


def _spec(name, description, build, extra):
    return TaskSpec(name=name, family="continual", description=description, metrics=METRICS,
                    presets=_presets(extra), run=_make_run(name, build),
                    datasets=("mnist", "fashion_mnist"))  # fmt: skip


CONTINUAL_TASKS = (
    _spec("continual-permuted", "domain-IL: a fixed pixel permutation per task", _permuted,
          {**_DOMAIN, "first_unpermuted": True}),
    _spec("continual-rotated", "domain-IL: a rotation angle per task (GEM angles)", _rotated,
          dict(_DOMAIN)),
    _spec("continual-split-task", "task-IL: class pairs, logits masked to the task", _split(
        "task-il"), {}),
    _spec("continual-split-class", "class-IL: class pairs, one head over all classes", _split(
        "class-il"), {}),
)  # fmt: skip
