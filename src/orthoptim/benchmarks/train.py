"""The shared training loop, evaluation, and the continual / long-tailed task runners.

Determinism: data order comes from a local ``torch.Generator`` (seeded per task from
``SeedSequence([seed, task])``); model initialisation and any other global-RNG use happen inside
``torch.random.fork_rng`` after ``torch.manual_seed(seed)``, so runs are reproducible and the
caller's global RNG state is left as it was.

Data order: the batch sequence is the concatenation of independent random permutations of the
training set (one per epoch), cut into consecutive batches of ``batch_size``; every batch is full,
and ``epochs=e`` means ``ceil(e * N / batch_size)`` steps.

Masking (task-IL): with a boolean ``mask`` over classes, disallowed logits are set to ``-inf``
before the loss and the argmax, so ``softmax`` only spreads over the task's classes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import metrics
from ._types import ImageDataset
from .streams import Stream

if TYPE_CHECKING:
    from .ddp import DataParallel

__all__ = [
    "TrainResult",
    "ContinualResult",
    "LongTailResult",
    "task_seed",
    "seeded",
    "batch_indices",
    "train",
    "predict",
    "evaluate",
    "run_continual",
    "run_longtail",
]

ModelFn = Callable[[], nn.Module]
OptimizerFn = Callable[[nn.Module], torch.optim.Optimizer]
# callback(step, loss, model, optimizer) -> True to stop early
Callback = Callable[[int, float, nn.Module, torch.optim.Optimizer], "bool | None"]


@dataclass
class TrainResult:
    """What :func:`train` did: ``steps`` taken, per-step ``losses``, wall ``seconds``, ``stopped``
    early by the callback or not."""

    steps: int
    losses: list[float]
    seconds: float
    stopped: bool = False


@dataclass
class ContinualResult:
    """Result of :func:`run_continual`.

    Attributes:
        R: ``(T, T)`` accuracy matrix, ``R[i, j]`` = accuracy on task ``j`` after task ``i``.
        b: ``(T,)`` accuracies before any training (for FWT).
        metrics: :func:`~orthoptim.benchmarks.metrics.continual_metrics` of ``R`` and ``b``.
        task_names: names of the tasks, in order.
        losses: per-task lists of per-step training losses.
        train_seconds: wall time spent in training steps (and ``end_task``).
        seconds: total wall time including evaluation.
        end_task_calls: how many times ``optimizer.end_task()`` was called.
    """

    R: np.ndarray
    b: np.ndarray
    metrics: dict[str, float]
    task_names: list[str]
    losses: list[list[float]] = field(repr=False)
    train_seconds: float
    seconds: float
    end_task_calls: int

    def to_dict(self) -> dict:
        """JSON-serialisable summary (``R`` and ``b`` as nested lists; no per-step losses)."""
        return {
            "R": self.R.tolist(),
            "b": self.b.tolist(),
            "metrics": dict(self.metrics),
            "task_names": list(self.task_names),
            "train_seconds": self.train_seconds,
            "seconds": self.seconds,
            "end_task_calls": self.end_task_calls,
        }


@dataclass
class LongTailResult:
    """Result of :func:`run_longtail`: ``accuracy``, ``balanced_accuracy``, ``per_class`` (C,),
    ``groups`` (head/mid/tail), ``shots`` (many/medium/few; NaN for empty groups),
    ``group_classes`` / ``shot_classes`` (the class indices used), ``train_counts``, ``losses``,
    ``seconds``."""

    accuracy: float
    balanced_accuracy: float
    per_class: np.ndarray
    groups: dict[str, float]
    shots: dict[str, float]
    group_classes: dict[str, list[int]]
    shot_classes: dict[str, list[int]]
    train_counts: np.ndarray
    losses: list[float] = field(repr=False)
    seconds: float

    def to_dict(self) -> dict:
        """JSON-serialisable summary (arrays as lists, NaN kept as float NaN; no losses)."""
        return {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "per_class": self.per_class.tolist(),
            "groups": dict(self.groups),
            "shots": dict(self.shots),
            "group_classes": self.group_classes,
            "shot_classes": self.shot_classes,
            "train_counts": self.train_counts.tolist(),
            "seconds": self.seconds,
        }


def task_seed(seed: int, task: int) -> int:
    """A 63-bit seed for task ``task`` of run ``seed`` (``SeedSequence([seed, task])``)."""
    return int(np.random.SeedSequence([int(seed), int(task)]).generate_state(2, np.uint64)[0] >> 1)


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator:
    """Yield ``steps`` int64 index tensors of length ``batch_size`` (or ``n`` if smaller).

    Args:
        n: training-set size.
        batch_size: examples per batch.
        steps: number of batches.
        generator: source of the epoch permutations.
    """
    if n <= 0:
        raise ValueError("empty training set")
    bs = min(int(batch_size), n)
    buf = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while buf.numel() < bs:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:bs]
        buf = buf[bs:]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu"):
    """Fork the global RNGs of the CPU (and of ``device`` if CUDA), then seed them with ``seed``:
    model initialisation inside is reproducible and the caller's RNG state is left as it was."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    steps: int | None = None,
    epochs: float | None = None,
    seed: int = 0,
    mask: torch.Tensor | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    callback: Callback | None = None,
    device: torch.device | str | None = None,
    micro_batches: int = 1,
    parallel: DataParallel | None = None,
) -> TrainResult:
    """Minibatch training: ``zero_grad; loss(model(transform(x_b)) masked, y_b).backward(); step``.

    With ``micro_batches = k > 1`` each batch is cut into ``k`` chunks (``torch.chunk``), each
    chunk's loss divided by ``k`` is backpropagated, then one step: gradient accumulation (with
    BatchNorm every micro-batch has its own statistics: ghost batch norm; FOP takes the
    micro-batches as its two sub-batches, the paper's two-pass mode for ``k = 2``). An optimizer
    with a ``sample_fisher`` method (K-FAC, FOP) gets every forward's logits before its backward
    (a no-op unless ``fisher='mc'``).

    Args:
        model: the model (put in train mode).
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        x, y: training inputs and int64 labels (kept on their device; batches are moved).
        batch_size: examples per step.
        steps: number of optimizer steps; exactly one of ``steps`` / ``epochs``.
        epochs: number of passes, ``steps = ceil(epochs * N / batch_size)``.
        seed: seed of the data order (local generator).
        mask: optional boolean ``(num_classes,)`` logit mask (task-IL).
        transform: optional batch-wise input transform (e.g. a stream's permutation).
        loss_fn: ``loss_fn(logits, y_b)``; default cross-entropy.
        callback: ``callback(step, loss, model, optimizer)`` after each step (step counts from 1);
            returning ``True`` stops training.
        device: where batches go (default: the device of the model's first parameter).
        micro_batches: gradient-accumulation micro-batches per step (see above).
        parallel: data parallelism (:mod:`~orthoptim.benchmarks.ddp`): each step's global batch
            is drawn as without it and this rank keeps its shard; ``model`` is then the
            ``DistributedDataParallel`` wrapper (micro-batches but the last run under its
            ``no_sync()``: one gradient all-reduce per step), and the recorded losses (and the
            callback's) are averaged over the ranks. None: one process.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("pass exactly one of steps and epochs")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"Invalid micro_batches: {micro_batches!r}; must be an integer >= 1")
    sample_fisher = getattr(optimizer, "sample_fisher", None)
    n = len(y)
    if steps is None:
        steps = math.ceil(float(epochs) * n / batch_size)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(int(seed))
    model.train()
    losses: list[float] = []
    stopped = False
    t0 = time.perf_counter()
    for step, idx in enumerate(batch_indices(n, batch_size, int(steps), g), start=1):
        if parallel is not None:
            idx = parallel.shard(idx)
        xb, yb = x[idx].to(device), y[idx].to(device)
        if transform is not None:
            xb = transform(xb)
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        chunks = list(zip(xb.chunk(micro_batches), yb.chunk(micro_batches), strict=True))
        for i, (xm, ym) in enumerate(chunks):
            # under DDP only the last micro-batch's backward averages the accumulated gradients
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if parallel is None or last else model.no_sync():
                logits = _masked(model(xm), mask)
                if sample_fisher is not None:
                    sample_fisher(logits)
                part = loss_fn(logits, ym) / micro_batches
                part.backward()
            loss = loss + part.detach()
        optimizer.step()
        losses.append(float(loss if parallel is None else parallel.mean(loss)))
        if callback is not None and callback(step, losses[-1], model, optimizer):
            stopped = True
            break
    return TrainResult(len(losses), losses, time.perf_counter() - t0, stopped)


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 2048,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Argmax predictions (int64, on CPU) in eval mode; the model's mode is restored after.

    Args as in :func:`train`; ``batch_size`` only bounds memory.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            if transform is not None:
                xb = transform(xb)
            out.append(_masked(model(xb), mask).argmax(1).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 2048,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``(x, y)``; args as in :func:`predict`."""
    return metrics.accuracy(y, predict(model, x, mask, transform, batch_size, device))


def run_continual(
    stream: Stream,
    model_fn: ModelFn,
    optimizer_fn: OptimizerFn,
    steps_per_task: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    task_aware: bool = True,
    *,
    epochs_per_task: float | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
) -> ContinualResult:
    """Train the tasks of ``stream`` in order and fill the accuracy matrix ``R``.

    Before training, every task is evaluated (``b``). After training task ``i`` (and calling
    ``optimizer.end_task()`` when ``task_aware`` and the optimizer has it), every task ``j`` is
    evaluated with its own transform and mask into ``R[i, j]``. One model and one optimizer live
    through the whole stream.

    Args:
        stream: the tasks (see :mod:`orthoptim.benchmarks.streams`).
        model_fn: ``() -> nn.Module``, called after ``torch.manual_seed(seed)``.
        optimizer_fn: ``(model) -> Optimizer``.
        steps_per_task: optimizer steps per task (or give ``epochs_per_task``).
        batch_size: examples per step.
        seed: seeds model init (global RNG, forked) and each task's data order.
        task_aware: call ``optimizer.end_task()`` after each task if it exists.
        epochs_per_task: passes over each task's training set instead of ``steps_per_task``.
        device: device of model and batches (default CPU).
        callback: forwarded to :func:`train` for every task.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    T, C = len(stream), stream.num_classes
    R, b = np.zeros((T, T)), np.zeros(T)
    losses: list[list[float]] = []
    names = [t.name for t in stream]
    train_s, calls = 0.0, 0
    t_start = time.perf_counter()
    with seeded(seed, dev):
        model = model_fn().to(dev)
        optimizer = optimizer_fn(model)
        end_task = getattr(optimizer, "end_task", None) if task_aware else None

        def eval_all(row: np.ndarray) -> None:
            for j, tj in enumerate(stream):
                row[j] = evaluate(model, tj.test_x, tj.test_y, tj.mask(C), tj.transform, device=dev)

        eval_all(b)
        for i, task in enumerate(stream):
            res = train(
                model, optimizer, task.train_x, task.train_y,
                batch_size=batch_size, steps=steps_per_task, epochs=epochs_per_task,
                seed=task_seed(seed, i), mask=task.mask(C), transform=task.transform,
                callback=callback, device=dev,
            )  # fmt: skip
            t0 = time.perf_counter()
            if callable(end_task):
                end_task()
                calls += 1
            train_s += res.seconds + time.perf_counter() - t0
            losses.append(res.losses)
            eval_all(R[i])
    return ContinualResult(
        R=R,
        b=b,
        metrics=metrics.continual_metrics(R, b),
        task_names=names,
        losses=losses,
        train_seconds=train_s,
        seconds=time.perf_counter() - t_start,
        end_task_calls=calls,
    )


def run_longtail(
    dataset: ImageDataset,
    model_fn: ModelFn,
    optimizer_fn: OptimizerFn,
    steps: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    *,
    epochs: float | None = None,
    groups: dict[str, list[int]] | None = None,
    many: int = 100,
    few: int = 20,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
) -> LongTailResult:
    """Train on a (long-tailed) training set and evaluate on its balanced test set.

    Args:
        dataset: e.g. the output of :func:`~orthoptim.benchmarks.longtail.make_longtail`.
        model_fn, optimizer_fn, batch_size, seed, device, callback: as in :func:`run_continual`.
        steps: optimizer steps (or give ``epochs``).
        epochs: passes over the training set.
        groups: explicit ``{name: classes}`` groups; default
            :func:`~orthoptim.benchmarks.metrics.head_mid_tail_groups` of the training counts.
        many, few: many/medium/few-shot thresholds (see
            :func:`~orthoptim.benchmarks.metrics.shot_groups`).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    C = dataset.num_classes
    counts = dataset.train_counts()
    t_start = time.perf_counter()
    with seeded(seed, dev):
        model = model_fn().to(dev)
        optimizer = optimizer_fn(model)
        res = train(
            model, optimizer, dataset.train_x, dataset.train_y, batch_size=batch_size,
            steps=steps, epochs=epochs, seed=task_seed(seed, 0), callback=callback, device=dev,
        )  # fmt: skip
        pred = predict(model, dataset.test_x, device=dev)
    per_class = metrics.per_class_accuracy(dataset.test_y, pred, C)
    group_classes = groups if groups is not None else metrics.head_mid_tail_groups(counts)
    shot_classes = metrics.shot_groups(counts, many, few)
    return LongTailResult(
        accuracy=metrics.accuracy(dataset.test_y, pred),
        balanced_accuracy=float(np.nanmean(per_class)),
        per_class=per_class,
        groups=metrics.group_accuracy(per_class, group_classes),
        shots=metrics.group_accuracy(per_class, shot_classes),
        group_classes={k: list(v) for k, v in group_classes.items()},
        shot_classes=shot_classes,
        train_counts=counts,
        losses=res.losses,
        seconds=time.perf_counter() - t_start,
    )
