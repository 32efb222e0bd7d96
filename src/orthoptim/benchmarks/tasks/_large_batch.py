"""``large-batch``: steps, epochs and seconds to a target accuracy at a batch size (FOP's claim).

Protocol (benchmarks.md 1c; MLPerf "time-to-train", AlgoPerf "time-to-result", Dahl et al.,
arXiv:2306.07179; steps-to-target vs batch size as in Shallue et al., arXiv:1811.03600):

- **Linear learning-rate scaling** (Goyal et al., "Accurate, Large Minibatch SGD",
  arXiv:1706.02677): the optimizer is built as
  ``make_optimizer(model, lr_scale=batch_size / base_batch_size)``, i.e. the learning rate
  tuned at ``base_batch_size`` is multiplied by ``k`` when the batch grows ``k`` times. With
  ``warmup_steps > 0`` every group's learning rate is also ramped linearly,
  ``lr_t = lr * min(1, t / warmup_steps)`` for step ``t = 1, 2, ...`` (Goyal's gradual warmup, in
  steps; a ``LambdaLR`` on the optimizer).
- Train with minibatches of ``batch_size`` (every batch full; see
  :func:`~orthoptim.benchmarks.train.train`), evaluate the eval set (``eval_limit`` stratified
  images of the test set, or of the held-out validation part with ``eval_split="val"``) at step 0
  and every ``eval_every`` steps, and stop at the first evaluation whose accuracy is
  ``>= target_accuracy``, or after ``min(ceil(max_epochs * N / batch_size), max_steps)`` steps
  (a final evaluation is made there).
- ``steps_to_target`` is that step (NaN if never reached; resolution ``eval_every``),
  ``epochs_to_target = steps * batch_size / N``, ``seconds_to_target`` the training wall time up
  to it, evaluation time excluded (wall-clock is secondary on a shared CPU, K-FAC and FOP do
  more work per step, so report steps and seconds together).
- Under ``torchrun`` (:mod:`orthoptim.benchmarks.ddp`) the same global batches are split over
  the ranks and rank 0 evaluates; ``batch_size`` must be a multiple of the number of processes.

``large-batch-cnn`` is the same protocol on the small CNN (two 3x3 conv blocks of 8 and 16
channels, a 64-wide hidden layer: K-FAC and FOP precondition two ``Conv2d`` and two ``Linear``
layers), the same MNIST target 0.96, at most 100 steps at B = 4096 (about 1 s per step on one
CPU thread) and 400 at B = 1024 (SGD needs ~60 steps to leave the initial plateau of this CNN).
Its lrs are tuned separately (its own task entry in the hparams config).

``large-batch-vit`` is the same protocol on a small vision transformer (:class:`~orthoptim.\
benchmarks.models.ViT`: 4x4 patches of 7x7 pixels, width 32, 2 pre-norm encoder layers of 4 heads,
MLP 64) on Fashion-MNIST, target 0.82 (reached by AdamW in about 500 steps at batch 128), batch
128 / 512 / 2048 with step caps 1500 / 600 / 200 and 10 warm-up steps at every batch (attention
models want a warm-up); its lrs are tuned at batch 512.

``large-batch-bncnn`` is ``large-batch-cnn`` with BatchNorm after each convolution, for the FOP
paper's BatchNorm-dependent modes: ``micro_batches=2`` gives the two-pass mode (each half with its
own statistics) and ``--hp fisher=mc`` the Monte-Carlo Fisher (``scripts/fop_bn_evidence.py``).
Its lrs are tuned at batch 1024 (K-FAC and FOP only).

Targets: MNIST 0.96 (AlgoPerf's MNIST development workload uses 0.97; 0.96 keeps the B = 4096
run within its 60-step CPU budget), Fashion-MNIST 0.85, the same for every batch size so that
steps-to-target can be compared across batch sizes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from ..ddp import once
from ..train import evaluate, seeded, task_seed, train
from ._common import COMMON_DATA, check_positive, model_fn, prepare
from .base import Metric, NullProgress, RunOutput, TaskSpec

__all__ = ["LARGE_BATCH", "LARGE_BATCH_BNCNN", "LARGE_BATCH_CNN", "LARGE_BATCH_VIT"]

METRICS = (
    Metric("steps_to_target", "min", "optimizer steps until eval accuracy >= target (NaN: never)"),
    Metric("epochs_to_target", "min", "passes over the training set until the target"),
    Metric("seconds_to_target", "min", "training wall time until the target, evaluation excluded"),
    Metric("final_accuracy", "max", "eval accuracy at the last evaluation"),
    Metric("best_accuracy", "max", "best eval accuracy over all evaluations"),
)

_BASE = {**COMMON_DATA, "train_limit": None, "base_batch_size": 128, "warmup_steps": 0,
         "micro_batches": 1}
_MNIST = {
    **_BASE,
    "dataset": "mnist",
    "model": "mlp",
    "target_accuracy": 0.96,
    "max_epochs": 10.0,
    "eval_limit": 1000,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**_BASE, "dataset": "digits", "model": "mlp", "hidden": [64], "batch_size": 256,
             "base_batch_size": 64, "target_accuracy": 0.8, "max_epochs": 20.0,
             "max_steps": 60, "eval_every": 5, "eval_limit": None},
    "quick": {**_BASE, "dataset": "digits", "model": "mlp", "hidden": [128, 128],
              "batch_size": 512, "base_batch_size": 64, "target_accuracy": 0.95,
              "max_epochs": 100.0, "max_steps": 300, "eval_every": 5, "eval_limit": None},
    # MNIST MLP 784-256-256-10 at B = 4096 (32x the base batch), target 0.96
    "paper": {**_MNIST, "batch_size": 4096, "max_steps": 60, "eval_every": 5,
              "warmup_steps": 10},
    "paper-b1024": {**_MNIST, "batch_size": 1024, "max_steps": 300, "eval_every": 10,
                    "warmup_steps": 10},
    "paper-b128": {**_MNIST, "batch_size": 128, "max_steps": 1500, "eval_every": 50},
    "paper-fashion": {**_MNIST, "dataset": "fashion_mnist", "target_accuracy": 0.85,
                      "batch_size": 4096, "max_steps": 60, "eval_every": 5,
                      "warmup_steps": 10},
}  # fmt: skip
_CNN = {**_MNIST, "model": "cnn", "width": 8, "hidden": [64]}
CNN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**PRESETS["tiny"], "model": "cnn", "width": 4, "hidden": [32], "max_steps": 30},
    "quick": {**PRESETS["quick"], "model": "cnn", "width": 8, "hidden": [64]},
    "paper": {**_CNN, "batch_size": 4096, "max_steps": 100, "eval_every": 5, "warmup_steps": 10},
    "paper-b1024": {**_CNN, "batch_size": 1024, "max_steps": 400, "eval_every": 10,
                    "warmup_steps": 10},
    "paper-b128": {**_CNN, "batch_size": 128, "max_steps": 1500, "eval_every": 50},
}  # fmt: skip


_VIT = {**_BASE, "dataset": "fashion_mnist", "model": "vit", "width": 32, "hidden": [64],
        "target_accuracy": 0.82, "max_epochs": 10.0, "eval_limit": 1000, "warmup_steps": 10}
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**PRESETS["tiny"], "model": "vit", "width": 8, "hidden": [16], "max_steps": 15},
    "quick": {**PRESETS["quick"], "model": "vit", "width": 32, "hidden": [64],
              "target_accuracy": 0.9, "warmup_steps": 10},
    "paper": {**_VIT, "batch_size": 2048, "max_steps": 200, "eval_every": 10},
    "paper-b512": {**_VIT, "batch_size": 512, "max_steps": 600, "eval_every": 20},
    "paper-b128": {**_VIT, "batch_size": 128, "max_steps": 1500, "eval_every": 50},
}  # fmt: skip


def run(make_optimizer, *, seed: int, settings: dict[str, Any], data_dir=None,
        progress=None, parallel=None) -> RunOutput:  # fmt: skip
    """One large-batch run (see the module docstring).

    Args:
        make_optimizer: ``(model, lr_scale) -> Optimizer``; receives
            ``lr_scale = batch_size / base_batch_size`` (linear scaling rule).
        seed: seeds model init and data order (and the training subset if ``train_limit``).
        settings: ``dataset``, ``model``, ``hidden``, ``width``, ``batch_size``,
            ``base_batch_size``, ``warmup_steps`` (0 = none), ``target_accuracy`` (in (0, 1]),
            ``max_epochs``, ``max_steps``, ``eval_every`` (steps), ``eval_split``, ``val_frac``,
            ``train_limit``, ``eval_limit``, ``micro_batches`` (gradient accumulation, see
            :func:`~orthoptim.benchmarks.train.train`).
        data_dir: root data folder (not needed for ``digits``).
        progress: a Progress (default: none); ``total`` is the step budget.
        parallel: a :class:`~orthoptim.benchmarks.ddp.DataParallel` under ``torchrun`` (the
            global batch split over the ranks, the model in DDP, evaluation on rank 0 broadcast
            to all); None: one process.
    """
    progress = progress or NullProgress()
    s = settings
    check_positive(s, "batch_size", "base_batch_size", "max_epochs", "max_steps", "eval_every",
                   "target_accuracy")  # fmt: skip
    if not 0.0 < s["target_accuracy"] <= 1.0:
        raise ValueError(f"Invalid target_accuracy: {s['target_accuracy']!r}; must lie in (0, 1]")
    if s["warmup_steps"] < 0:
        raise ValueError(f"Invalid warmup_steps: {s['warmup_steps']!r}; must be >= 0")
    prep = prepare(s, data_dir, seed)
    data = prep.data
    n, bs = len(data.train_y), int(s["batch_size"])
    bs_eff = min(bs, n)  # train() caps the batch at the training-set size
    if parallel is not None:
        parallel.local_size(bs_eff)  # a batch that does not split evenly fails before training
    budget = min(math.ceil(float(s["max_epochs"]) * n / bs_eff), int(s["max_steps"]))
    lr_scale = bs / float(s["base_batch_size"])
    every, target, warm = int(s["eval_every"]), float(s["target_accuracy"]), int(s["warmup_steps"])

    evals: dict[str, list[float]] = {"step": [], "epoch": [], "seconds": [], "acc": []}
    state = {"eval_s": 0.0, "hit": None}
    with seeded(seed):
        model = model_fn(s, data)()
        net = model if parallel is None else parallel.wrap(model)  # the training forward
        opt = make_optimizer(model, lr_scale=lr_scale)  # on the module: DDP-free names
        sched = None
        if warm > 0:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warm))

        def record(step: int) -> bool:
            t_eval = time.perf_counter()
            train_s = t_eval - t0 - state["eval_s"]
            acc = once(parallel, lambda: evaluate(model, data.test_x, data.test_y))
            state["eval_s"] += time.perf_counter() - t_eval
            for k, v in zip(evals, (step, step * bs_eff / n, train_s, acc), strict=True):
                evals[k].append(float(v))
            if acc >= target and state["hit"] is None:
                state["hit"] = (step, step * bs_eff / n, train_s)
            return state["hit"] is not None

        def callback(step, loss, model_, opt_):
            if sched is not None:
                sched.step()
            progress.advance(1)
            if step % every == 0 or step == budget:
                return record(step)
            return None

        progress.start(budget, desc="large-batch")
        t0 = time.perf_counter()
        record(0)  # accuracy at initialisation (the curves start at step 0)
        res = train(net, opt, data.train_x, data.train_y, batch_size=bs, steps=budget,
                    seed=task_seed(seed, 0), callback=callback, parallel=parallel,
                    micro_batches=int(s["micro_batches"]))  # fmt: skip
    hit = state["hit"] or (math.nan, math.nan, math.nan)
    return RunOutput(
        metrics={
            "steps_to_target": float(hit[0]),
            "epochs_to_target": float(hit[1]),
            "seconds_to_target": float(hit[2]),
            "final_accuracy": evals["acc"][-1],
            "best_accuracy": max(evals["acc"]),
        },
        curves={
            f"eval_accuracy_vs_{k}": {
                "x": list(evals[k]),
                "y": list(evals["acc"]),
                "xlabel": k,
                "ylabel": "eval accuracy",
            }
            for k in ("step", "epoch", "seconds")
        },  # fmt: skip
        extra={
            "batch_size": bs,
            "effective_batch_size": bs_eff,
            "lr_scale": lr_scale,
            "n_train": n,
            "n_eval": len(data.test_y),
            "steps_run": res.steps,
            "step_budget": budget,
            "reached_target": state["hit"] is not None,
            "train_seconds": evals["seconds"][-1],
            "eval_seconds": state["eval_s"],
            "eval_split": s["eval_split"],
        },
    )


LARGE_BATCH = TaskSpec(
    name="large-batch",
    family="large-batch",
    description="steps / epochs / seconds to a target accuracy at a large batch (lr scaled)",
    metrics=METRICS,
    presets=PRESETS,
    run=run,
    datasets=("mnist", "fashion_mnist", "cifar10"),
    data_parallel=True,
)

LARGE_BATCH_CNN = dataclasses.replace(
    LARGE_BATCH,
    name="large-batch-cnn",
    description="large-batch on the small CNN (conv layers preconditioned), MNIST target 0.96",
    presets=CNN_PRESETS,
)

LARGE_BATCH_VIT = dataclasses.replace(
    LARGE_BATCH,
    name="large-batch-vit",
    description="large-batch on a small ViT (attention preconditioned), Fashion-MNIST target 0.82",
    presets=VIT_PRESETS,
)

LARGE_BATCH_BNCNN = dataclasses.replace(
    LARGE_BATCH,
    name="large-batch-bncnn",
    description="large-batch on the small CNN with BatchNorm (FOP's two-pass mode), MNIST 0.96",
    presets={k: {**v, "model": "cnn-bn"} for k, v in CNN_PRESETS.items()},
)
