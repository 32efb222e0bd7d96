"""Vision classification tasks: the ``longtail``, ``continual-*`` and ``large-batch`` families.

Each task is a :class:`~orthoptim.benchmarks.tasks.base.TaskSpec` (protocols, metrics and presets
in its own module):

- ``longtail`` (:mod:`._longtail_task`): exponential-profile long-tailed training set (Cao et al.,
  NeurIPS 2019), balanced evaluation, balanced / group / shot accuracies; ``longtail-cnn`` is the
  same on the small CNN of ``large-batch-cnn``.
- ``continual-permuted``, ``continual-rotated`` (domain-IL), ``continual-split-task`` (task-IL),
  ``continual-split-class`` (class-IL) (:mod:`._continual_tasks`; van de Ven & Tolias 2019, GEM
  metrics).
- ``large-batch`` (:mod:`._large_batch`): steps / epochs / seconds to a target accuracy with the
  linear learning-rate scaling rule (Goyal et al. 2017); ``large-batch-cnn``,
  ``large-batch-bncnn`` and ``large-batch-vit`` are the same protocol on the small CNN (without
  and with BatchNorm) and on a small ViT.

Datasets: ``"digits"`` (scikit-learn's embedded 8x8 digits; the ``tiny`` and ``quick`` presets,
no data directory), ``"mnist"``, ``"fashion_mnist"`` and ``"cifar10"`` from ``data_dir`` (the
``paper*`` presets). Models by name: ``"mlp"``, ``"cnn"``, ``"resnet8"``, ``"resnet20"``, ``"vit"``
(:func:`~orthoptim.benchmarks.models.build_model`). ``eval_split="val"`` evaluates on a stratified
hold-out of the training data and never reads the test set (:mod:`._common`).
"""

from __future__ import annotations

from ._continual_tasks import CONTINUAL_TASKS
from ._large_batch import LARGE_BATCH, LARGE_BATCH_BNCNN, LARGE_BATCH_CNN, LARGE_BATCH_VIT
from ._longtail_task import LONGTAIL, LONGTAIL_CNN
from .base import TaskSpec

__all__ = ["TASKS"]

TASKS: tuple[TaskSpec, ...] = (
    LONGTAIL, LONGTAIL_CNN, *CONTINUAL_TASKS, LARGE_BATCH, LARGE_BATCH_CNN, LARGE_BATCH_VIT,
    LARGE_BATCH_BNCNN,
)  # fmt: skip
