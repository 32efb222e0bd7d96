"""``longtail``: long-tailed classification with a balanced evaluation set (FOP's LT-CIFAR claim).

Protocol (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
NeurIPS 2019, arXiv:1906.07413; ``longtail-cnn``: the same on the small CNN of
``large-batch-cnn``): the class at rank ``i`` keeps
``n_i = int(n_max * (1/rho) ** (i / (C - 1)))`` training examples (exponential profile,
:func:`~orthoptim.benchmarks.longtail.make_longtail`); rank 0 is class 0 unless
``shuffle_classes`` draws a seeded class-to-rank order (benchmarks.md: on Fashion-MNIST the hard
classes sit mid-index, so average over orders). The evaluation set stays balanced (the test set,
or with ``eval_split="val"`` a stratified part of the balanced training set held out BEFORE the
imbalance is applied). Plain cross-entropy, ``steps`` minibatch steps.

Metrics: balanced accuracy (mean per-class recall, the primary metric), accuracy, head / mid /
tail accuracy (classes ranked by training count, 30% / 40% / 30%:
:func:`~orthoptim.benchmarks.metrics.head_mid_tail_groups`), and many / medium / few-shot
accuracy (Liu et al., OLTR, CVPR 2019: > 100, 20-100, < 20 training examples; NaN for an empty
group, common with 10 classes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..longtail import make_longtail
from ..train import run_longtail, task_seed
from ._common import COMMON_DATA, check_positive, loss_curve, model_fn, prepare, progress_callback
from .base import Metric, NullProgress, RunOutput, TaskSpec

__all__ = ["LONGTAIL", "LONGTAIL_CNN"]

METRICS = (
    Metric("balanced_accuracy", "max", "mean per-class accuracy on the balanced eval set"),
    Metric("accuracy", "max", "top-1 accuracy on the balanced eval set"),
    Metric("head_accuracy", "max", "class-averaged accuracy of the 30% most frequent classes"),
    Metric("mid_accuracy", "max", "class-averaged accuracy of the middle 40% of classes"),
    Metric("tail_accuracy", "max", "class-averaged accuracy of the 30% rarest classes"),
    Metric("many_shot_accuracy", "max", "classes with > 100 training examples (NaN if none)"),
    Metric("medium_shot_accuracy", "max", "classes with 20-100 training examples (NaN if none)"),
    Metric("few_shot_accuracy", "max", "classes with < 20 training examples (NaN if none)"),
)

_BASE = {**COMMON_DATA, "train_limit": None, "shuffle_classes": False}
PRESETS: dict[str, dict[str, Any]] = {
    # digits: about 130 training images per class after the val hold-out; rho = 10 keeps 13 in
    # the tail class, so all three shot groups are populated.
    "tiny": {**_BASE, "dataset": "digits", "rho": 10.0, "n_max": 130, "model": "mlp",
             "hidden": [64], "steps": 150, "batch_size": 64, "eval_limit": None},
    "quick": {**_BASE, "dataset": "digits", "rho": 10.0, "n_max": 130, "model": "mlp",
              "hidden": [128, 128], "steps": 300, "batch_size": 64, "eval_limit": None},
    # Fashion-MNIST-LT rho = 100 (benchmarks.md 1b: 14,886 images, 6000 ... 60 per class)
    "paper": {**_BASE, "dataset": "fashion_mnist", "rho": 100.0, "n_max": 6000, "model": "mlp",
              "steps": 600, "batch_size": 128, "eval_limit": None},
    "paper-rho10": {**_BASE, "dataset": "fashion_mnist", "rho": 10.0, "n_max": 6000,
                    "model": "mlp", "steps": 600, "batch_size": 128, "eval_limit": None},
    "paper-mnist": {**_BASE, "dataset": "mnist", "rho": 100.0, "n_max": 5000, "model": "mlp",
                    "steps": 600, "batch_size": 128, "eval_limit": None},
}  # fmt: skip


def run(make_optimizer, *, seed: int, settings: dict[str, Any], data_dir=None,
        progress=None) -> RunOutput:  # fmt: skip
    """One long-tailed run (see the module docstring).

    Args:
        make_optimizer: ``(model, lr_scale=1.0) -> Optimizer`` (called with the model only).
        seed: seeds the imbalanced subset, the class order, model init and data order.
        settings: ``dataset``, ``rho`` (>= 1), ``n_max``, ``model``, ``hidden``, ``width``,
            ``steps``, ``batch_size``, ``shuffle_classes``, ``eval_split``, ``val_frac``,
            ``train_limit``, ``eval_limit``.
        data_dir: root data folder (not needed for ``digits``).
        progress: a :class:`~orthoptim.benchmarks.tasks.base.Progress` (default: none).
    """
    progress = progress or NullProgress()
    check_positive(settings, "steps", "batch_size", "n_max")
    if not settings["rho"] >= 1:
        raise ValueError(f"Invalid rho: {settings['rho']!r}; must be >= 1")
    prep = prepare(settings, data_dir, seed)
    C = prep.data.num_classes
    order = None
    if settings["shuffle_classes"]:
        order = np.random.default_rng(task_seed(seed, 104729)).permutation(C).tolist()
    lt = make_longtail(prep.data, settings["rho"], int(settings["n_max"]),
                       seed=task_seed(seed, 15485863), class_order=order)  # fmt: skip
    progress.start(int(settings["steps"]), desc="longtail")
    res = run_longtail(
        lt, model_fn(settings, lt), lambda m: make_optimizer(m), steps=int(settings["steps"]),
        batch_size=int(settings["batch_size"]), seed=seed, callback=progress_callback(progress),
    )  # fmt: skip
    out = {"balanced_accuracy": res.balanced_accuracy, "accuracy": res.accuracy}
    out.update({f"{g}_accuracy": float(res.groups[g]) for g in ("head", "mid", "tail")})
    out.update({f"{g}_shot_accuracy": float(res.shots[g]) for g in ("many", "medium", "few")})
    return RunOutput(
        metrics={k: float(v) for k, v in out.items()},
        curves={"train_loss": loss_curve(res.losses)},
        extra={
            "per_class_accuracy": [float(a) for a in res.per_class],
            "train_counts": [int(n) for n in res.train_counts],
            "group_classes": res.group_classes,
            "shot_classes": res.shot_classes,
            "class_order": order if order is not None else list(range(C)),
            "eval_split": settings["eval_split"],
            "n_eval": len(prep.data.test_y),
            "seconds": res.seconds,
        },
    )


LONGTAIL = TaskSpec(
    name="longtail",
    family="longtail",
    description="exponential-profile long-tailed classification, balanced evaluation set",
    metrics=METRICS,
    presets=PRESETS,
    run=run,
    datasets=("mnist", "fashion_mnist", "cifar10"),
)

_CNN = {"model": "cnn", "width": 8, "hidden": [64]}
# The FOP set on the small CNN of large-batch-cnn (its lrs at batch 128 are shared: same model,
# same batch); Fashion-MNIST-LT rho = 100 as ``paper``.
LONGTAIL_CNN = dataclasses.replace(
    LONGTAIL,
    name="longtail-cnn",
    description="longtail on the small CNN of large-batch-cnn (conv layers preconditioned)",
    presets={k: {**PRESETS[k], **_CNN} for k in ("tiny", "quick", "paper", "paper-rho10")},
)
