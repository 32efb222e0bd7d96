"""Run benchmark tasks and record every run in a resumable result store.

One run = (task, settings, optimizer, hyperparameters, seed). :func:`run_one` executes it and
returns the self-describing record; :func:`run_plan` executes a list of planned runs, skipping
those whose key the store already holds, and appends each record as soon as its run finishes (so
an interruption loses at most the runs in progress). With ``jobs > 1`` runs execute in worker
processes, each single-threaded; only the parent writes the store.

Diagnostics: when the run's optimizer has a memory (FOGO's ``memory_stats()`` with at least one
protected matrix), its end-of-run statistics go into the record as
``extra["optimizer_stats"]["memory"]``; the report uses them to explain why two optimizers tie.

Learning rates: the optimizer's hyperparameters come from the versioned config
(:mod:`orthoptim.benchmarks.hparams`) unless given explicitly; the task may scale the lr (the
large-batch task's linear scaling) through the factory's ``lr_scale``.

Data parallelism (``torchrun``): every rank calls :func:`run_plan` with the same plans and a
:class:`~orthoptim.benchmarks.ddp.DataParallel`; the ranks run each plan together (tasks with
``data_parallel``), rank 0 alone decides which runs are still to do and appends the records. A
run that fails ends the plan on its rank, its record not stored (the other ranks may be waiting
in a collective of that run: ``orthoptim run`` exits with status 1 and torchrun stops them); a
re-run resumes after the completed ones. The world size is part of the run's key and of its
record (``extra["world_size"]``, and ``extra["device"]`` the ranks' device), and the default
report label is ``"<task> (<W> ranks)"``, so a distributed run never stands in for a
single-process one.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch

from . import registry
from ._verify import DataError
from .ddp import DataParallel
from .results import ResultStore, environment, run_key
from .tasks import all_tasks, get_task
from .tasks.base import NullProgress, Progress

__all__ = ["PlannedRun", "check_data_parallel", "run_one", "run_plan"]


@dataclass(frozen=True)
class PlannedRun:
    """One run to execute.

    Attributes:
        task: task name (see ``orthoptim list tasks``).
        preset: preset of the task's settings (``tiny``, ``quick``, ``paper``).
        overrides: settings that replace the preset's values.
        label: the report group this run belongs to (default: the task name).
        optimizer: registry name.
        hparams: the optimizer's hyperparameters.
        hparams_source: where they came from (config version, CLI...).
        seed: run seed.
        suite: suite name, or None for a single ``orthoptim run``.
        world_size: processes the run is split over (1: a single process).
    """

    task: str
    preset: str
    optimizer: str
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)
    hparams_source: str = "explicit"
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    suite: str | None = None
    world_size: int = 1

    @property
    def settings(self) -> dict[str, Any]:
        return get_task(self.task).settings(self.preset, **self.overrides)

    @property
    def key(self) -> str:
        return run_key(
            self.task, self.settings, self.optimizer, self.hparams, self.seed, self.world_size
        )

    @property
    def group(self) -> str:
        """The report label: ``label``, else the task name (with the ranks when > 1)."""
        if self.label:
            return self.label
        return self.task if self.world_size == 1 else f"{self.task} ({self.world_size} ranks)"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_one(
    plan: PlannedRun,
    data_dir: str | None = None,
    progress: Progress | None = None,
    parallel: DataParallel | None = None,
) -> dict[str, Any]:
    """Execute ``plan`` and return its record (see :mod:`orthoptim.benchmarks.results`).

    Args:
        plan: the run.
        data_dir: root of the real datasets (``None``: embedded data only).
        progress: per-step progress sink (default: none).
        parallel: the process group to split the run over (every rank calls ``run_one``);
            its size must be ``plan.world_size``. None: one process.
    """
    spec = get_task(plan.task)
    settings = plan.settings
    entry = registry.get_optimizer(plan.optimizer)  # fail fast on a bad name, before training
    world = 1 if parallel is None else parallel.world_size
    if world != plan.world_size:
        raise ValueError(
            f"Invalid world_size: the plan is for {plan.world_size} process(es), "
            f"this launch has {world}"
        )
    extra_kwargs: dict[str, Any] = {}
    if parallel is not None:
        check_data_parallel(spec.name, entry.name)
        extra_kwargs["parallel"] = parallel

    built: list[torch.optim.Optimizer] = []

    def make(model: torch.nn.Module, lr_scale: float = 1.0) -> torch.optim.Optimizer:
        built.append(registry.make_optimizer(plan.optimizer, model, plan.hparams, lr_scale))
        return built[-1]

    started, t0 = _now(), time.perf_counter()
    out = spec.run(
        make, seed=plan.seed, settings=settings, data_dir=data_dir,
        progress=progress or NullProgress(), **extra_kwargs,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    missing = [m.name for m in spec.metrics if m.name not in out.metrics]
    if missing:
        raise RuntimeError(f"task {spec.name!r} did not report metrics {missing}")
    extra = dict(out.extra)
    stats = _optimizer_stats(built[-1]) if built else {}
    if stats:
        extra["optimizer_stats"] = stats
    if parallel is not None:
        extra["world_size"] = parallel.world_size
        extra["device"] = str(parallel.device)
    return {
        "schema": 1,
        "key": plan.key,
        "suite": plan.suite,
        "task": spec.name,
        "family": spec.family,
        "label": plan.group,
        "preset": plan.preset,
        "settings": settings,
        "optimizer": plan.optimizer,
        "hparams": dict(plan.hparams),
        "hparams_source": plan.hparams_source,
        "seed": plan.seed,
        "metrics": {k: float(v) for k, v in out.metrics.items()},
        "metric_goals": {m.name: m.goal for m in spec.metrics},
        "primary_metric": spec.primary.name,
        "curves": out.curves,
        "extra": extra,
        "wall_seconds": wall,
        "started": started,
        "finished": _now(),
        "environment": environment(),
    }


def check_data_parallel(task: str, optimizer: str) -> None:
    """ValueError unless ``task`` and ``optimizer`` can run split over processes (``torchrun``).

    Args:
        task: task name.
        optimizer: registry name.
    """
    if not get_task(task).data_parallel:
        runs = sorted(t.name for t in all_tasks().values() if t.data_parallel)
        raise ValueError(
            f"Invalid task: {task!r} does not run under torchrun; tasks that do: {runs}"
        )
    if not registry.get_optimizer(optimizer).data_parallel:
        raise ValueError(
            f"Invalid optimizer: {optimizer!r} under torchrun; it is not correct on a "
            "data-parallel model (its ranks would step differently and drift apart)"
        )


def _optimizer_stats(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """End-of-run diagnostics of ``opt`` (JSON numbers); empty when it has none to give."""
    memory_stats = getattr(opt, "memory_stats", None)
    if memory_stats is None:
        return {}
    stats = memory_stats()
    if not stats.get("matrices"):  # fogo-nomem, or no matrix with a memory
        return {}
    return {"memory": {k: float(v) for k, v in stats.items()}}


def _worker(plan: PlannedRun, data_dir: str | None, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return run_one(plan, data_dir)


def run_plan(
    plans: Sequence[PlannedRun],
    store: ResultStore,
    data_dir: str | None = None,
    jobs: int = 1,
    threads: int | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    progress_factory: Callable[[str], Progress] | None = None,
    failures: list[tuple[PlannedRun, BaseException]] | None = None,
    parallel: DataParallel | None = None,
) -> list[dict[str, Any]]:
    """Execute the runs of ``plans`` not yet in ``store``; append each record when it finishes.

    Args:
        plans: the runs, in order (duplicate keys run once).
        store: where records go; keys already present are skipped (resume).
        data_dir: root of the real datasets.
        jobs: worker processes (1 = run in this process).
        threads: torch threads per run (default: unchanged with ``jobs=1``, 1 with more jobs).
        on_done: called with each new record after it is stored (progress display).
        progress_factory: ``(description) -> Progress`` for per-step progress (``jobs=1`` only).
        failures: if given, a run that raises is appended here as ``(plan, exception)`` and the
            other runs go on (nothing is stored for it, so a re-run retries it); if ``None``,
            the first exception propagates. A data error (missing file, checksum mismatch)
            always propagates: it would fail every run. Under ``parallel`` the first failure
            also ends the plan (the other ranks may be waiting in a collective of that run).
        parallel: data parallelism (``torchrun``): every rank calls ``run_plan`` with the same
            plans and runs each with the others; rank 0's store decides what is left to run,
            only rank 0 appends records and calls ``on_done``. Needs ``jobs=1``.

    Returns:
        The new records, in completion order.
    """
    if jobs < 1:
        raise ValueError(f"Invalid jobs: {jobs}; expected an integer >= 1")
    if threads is not None and threads < 1:
        raise ValueError(f"Invalid threads: {threads}; expected an integer >= 1")
    if parallel is not None and jobs != 1:
        raise ValueError(f"Invalid jobs: {jobs} under torchrun; each rank is one process (use 1)")
    if parallel is None:
        completed = store.completed()
    else:  # the ranks must agree on the runs: rank 0's store decides
        completed = parallel.broadcast_object(store.completed() if parallel.is_main else None)
    todo = _pending(plans, completed)
    new: list[dict[str, Any]] = []
    records = parallel is None or parallel.is_main

    def failed(plan: PlannedRun, exc: BaseException) -> bool:
        """Keep the failure (or raise it); True: stop running plans."""
        # Missing or corrupt data fails every run the same way: stop at once, with its message.
        if failures is None or isinstance(exc, DataError):
            raise exc
        failures.append((plan, exc))
        return parallel is not None

    def finish(rec: dict[str, Any]) -> None:
        new.append(rec)
        if not records:
            return
        store.append(rec)
        if on_done is not None:
            on_done(rec)

    if jobs == 1:
        prev = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for plan in todo:
                desc = f"{plan.label or plan.task} {plan.optimizer} s{plan.seed}"
                prog = progress_factory(desc) if progress_factory else None
                try:
                    rec = run_one(plan, data_dir, prog, parallel)
                except Exception as e:  # noqa: BLE001 - reported to the caller, run not stored
                    if failed(plan, e):
                        break
                else:
                    finish(rec)
        finally:
            torch.set_num_threads(prev)
        return new
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        queue = iter(todo)
        running: dict = {}
        for plan in islice(queue, jobs):
            running[pool.submit(_worker, plan, data_dir, threads or 1)] = plan
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                plan = running.pop(fut)
                try:
                    rec = fut.result()
                except Exception as e:  # noqa: BLE001
                    failed(plan, e)
                else:
                    finish(rec)
                for nxt in islice(queue, 1):
                    running[pool.submit(_worker, nxt, data_dir, threads or 1)] = nxt
    return new


def _pending(plans: Iterable[PlannedRun], completed: set[str]) -> list[PlannedRun]:
    seen, out = set(completed), []
    for p in plans:
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out
