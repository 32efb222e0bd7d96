"""Named benchmark suites: which tasks, settings, optimizers and seeds stand in for each paper
claim.

* ``quick``: embedded data only (scikit-learn digits, text from the Python standard library),
  every task family, the headline optimizers, 2 seeds; about 2 minutes on 2 CPU cores with
  ``--jobs 2``. A smoke test of the whole pipeline and a first look, not evidence.
* ``paper``: real data under ``--data-dir`` (MNIST, Fashion-MNIST, Tiny Shakespeare), 3 seeds,
  the settings docs/benchmarks.md reports; about 70 minutes on 2 CPU cores with ``--jobs 2``
  (measured in two parts: 44 minutes for the MLP and language-model items, 24 for the small-CNN
  items), plus the ViT items (54 runs: 67 minutes at ``--jobs 1`` on 2 shared cores) and the
  ``lm-skills`` items (15 runs: 30 minutes at ``--jobs 1`` on 2 shared cores; 10 quick-preset
  runs take under a minute).

Optimizer sets follow the claims: the FOGO families compare FOGO with its baselines (SGD, AdamW,
Muon) and with itself without memory (the ablation that isolates the codebook); the large-batch
family compares FOP with K-FAC at its own and at twice its learning rate (FOP's layer step
eta* lies in [1, 2], so K-FAC at 2x lr is the fair control) and the first-order methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .hparams import HParamConfig
from .runner import PlannedRun

__all__ = ["SuiteItem", "SUITES", "get_suite", "plan_suite"]

FOGO_SET = ("sgd", "adamw", "muon", "fogo-nomem", "fogo")
FOP_SET = ("sgd", "adamw", "kfac", "kfac-2x", "fop")
# The ViT adds K-FAC with the coverage it had before the layer adapters (no attention) and with
# only the patch convolution and head: what preconditioning attention and the MLPs buys.
VIT_SET = ("sgd", "adamw", "kfac", "kfac-noattn", "kfac-patch-head", "fop")
LONGTAIL_SET = ("sgd", "adamw", "muon", "fogo-nomem", "fogo", "kfac", "fop")
# FOGO's GPT-2 claim is against Adam and Muon; plain SGD is not a language-model baseline.
LM_SET = ("adamw", "muon", "fogo-nomem", "fogo")


@dataclass(frozen=True)
class SuiteItem:
    """A task at one setting, run for every optimizer and seed; ``label`` names its report group."""

    task: str
    optimizers: tuple[str, ...]
    label: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # default: the suite's preset


_CONTINUAL = ("continual-permuted", "continual-rotated", "continual-split-task",
              "continual-split-class")  # fmt: skip


def _items(preset: str) -> tuple[SuiteItem, ...]:
    if preset == "quick":
        longtail = [SuiteItem("longtail", LONGTAIL_SET, "longtail/rho10")]
        large = [
            SuiteItem("large-batch", FOP_SET, f"large-batch/bs{b}", {"batch_size": b})
            for b in (64, 512)
        ]
    else:
        longtail = [
            SuiteItem("longtail", LONGTAIL_SET, "longtail/rho100", preset="paper"),
            SuiteItem("longtail", LONGTAIL_SET, "longtail/rho10", preset="paper-rho10"),
            SuiteItem("longtail-cnn", FOP_SET, "longtail-cnn/rho100", preset="paper"),
        ]
        large = [
            SuiteItem("large-batch", FOP_SET, f"large-batch/bs{b}", preset=p)
            for b, p in ((128, "paper-b128"), (1024, "paper-b1024"), (4096, "paper"))
        ]
        large += [
            SuiteItem("large-batch-cnn", FOP_SET, f"large-batch-cnn/bs{b}", preset=p)
            for b, p in ((128, "paper-b128"), (1024, "paper-b1024"), (4096, "paper"))
        ]
        large += [
            SuiteItem("large-batch-vit", VIT_SET, f"large-batch-vit/bs{b}", preset=p)
            for b, p in ((128, "paper-b128"), (512, "paper-b512"), (2048, "paper"))
        ]
    items = longtail + [SuiteItem(t, FOGO_SET) for t in _CONTINUAL]
    items += [SuiteItem("lm-pretrain", LM_SET), SuiteItem("lm-continual", LM_SET)]
    # lm-skills also runs FOGO task-agnostic (end_task() never called: only scheduled writes)
    items += [
        SuiteItem("lm-skills", LM_SET),
        SuiteItem("lm-skills", ("fogo",), "lm-skills/task-agnostic", {"task_aware": False}),
    ]
    return tuple(items + large)


@dataclass(frozen=True)
class Suite:
    """A named suite: items, their default preset, seeds, and whether it needs ``--data-dir``."""

    name: str
    description: str
    preset: str
    seeds: tuple[int, ...]
    items: tuple[SuiteItem, ...]
    needs_data: bool


SUITES: dict[str, Suite] = {
    "quick": Suite(
        "quick",
        "embedded data, every task family, headline optimizers, 2 seeds (~2 min on 2 cores)",
        "quick", (0, 1), _items("quick"), needs_data=False,
    ),
    "paper": Suite(
        "paper",
        "real data (MNIST, Fashion-MNIST, Tiny Shakespeare), 3 seeds (~2 h on 2 cores)",
        "paper", (0, 1, 2), _items("paper"), needs_data=True,
    ),
}  # fmt: skip


def get_suite(name: str) -> Suite:
    """The suite called ``name`` (ValueError listing the known suites otherwise)."""
    if name not in SUITES:
        raise ValueError(f"Invalid suite: {name!r}; expected one of {sorted(SUITES)}")
    return SUITES[name]


def plan_suite(
    suite: Suite,
    config: HParamConfig,
    seeds: Sequence[int] | None = None,
    optimizers: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
) -> list[PlannedRun]:
    """Expand ``suite`` into runs, hyperparameters looked up in ``config``.

    Args:
        suite: the suite.
        config: the versioned hyperparameter config.
        seeds: replace the suite's seeds.
        optimizers: keep only these optimizers (each must appear in the suite).
        tasks: keep only these tasks (each must appear in the suite).
    """
    known_opts = {o for it in suite.items for o in it.optimizers}
    known_tasks = {it.task for it in suite.items}
    for what, given, known in (("optimizer", optimizers, known_opts), ("task", tasks, known_tasks)):
        bad = sorted(set(given or ()) - known)
        if bad:
            raise ValueError(
                f"Invalid {what}(s) {bad} for suite {suite.name!r}; it has {sorted(known)}"
            )
    plans = []
    # Seed-major order: a partial suite already holds complete comparisons for the first seeds.
    for seed in seeds if seeds is not None else suite.seeds:
        for it in suite.items:
            if tasks and it.task not in tasks:
                continue
            for opt in it.optimizers:
                if optimizers and opt not in optimizers:
                    continue
                hp, source = config.lookup(it.task, opt)
                plans.append(
                    PlannedRun(
                        task=it.task, preset=it.preset or suite.preset, optimizer=opt,
                        seed=int(seed),
                        hparams=hp, hparams_source=source, overrides=dict(it.overrides),
                        label=it.label, suite=suite.name,
                    )
                )  # fmt: skip
    return plans
