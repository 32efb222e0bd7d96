"""Runner and suites: worker processes give the same records as in-process runs, planning
expands suites with config lookups, and bad filters are rejected."""

from __future__ import annotations

import pytest

from orthoptim.benchmarks import hparams
from orthoptim.benchmarks.results import ResultStore
from orthoptim.benchmarks.runner import PlannedRun, run_plan
from orthoptim.benchmarks.suites import SUITES, get_suite, plan_suite
from orthoptim.benchmarks.tasks import get_task


def _plans():
    return [
        PlannedRun("longtail", "tiny", opt, seed, {"lr": 1e-2}, "test")
        for opt in ("adamw", "sgd")
        for seed in (0, 1)
    ]


def test_worker_processes_reproduce_in_process_runs(tmp_path):
    one = run_plan(_plans(), ResultStore(tmp_path / "one"), jobs=1, threads=1)
    two = run_plan(_plans(), ResultStore(tmp_path / "two"), jobs=2, threads=1)
    by_key = {r["key"]: r for r in two}
    assert sorted(by_key) == sorted(r["key"] for r in one)
    for r in one:
        assert r["metrics"] == by_key[r["key"]]["metrics"]
        assert r["curves"] == by_key[r["key"]]["curves"]


def test_duplicate_plans_run_once(tmp_path):
    store = ResultStore(tmp_path)
    new = run_plan(_plans()[:1] * 3, store)
    assert len(new) == 1 and len(store.records()) == 1


@pytest.mark.parametrize("name", sorted(SUITES))
def test_suites_expand_to_valid_runs(name):
    suite = get_suite(name)
    plans = plan_suite(suite, hparams.load_hparams())
    n = sum(len(it.optimizers) for it in suite.items) * len(suite.seeds)
    assert len(plans) == n == len({p.key for p in plans})
    for p in plans:
        assert p.settings["eval_split"] == "test"  # suites report on test, never tune on it
        assert get_task(p.task).settings(p.preset, **p.overrides) == p.settings
    # seed-major: the first seed's comparisons complete before the next seed starts
    assert [p.seed for p in plans] == sorted(p.seed for p in plans)


def test_plan_filters_and_errors(tmp_path):
    suite = get_suite("quick")
    plans = plan_suite(suite, hparams.load_hparams(), seeds=[5], optimizers=["fogo"])
    assert plans and all(p.optimizer == "fogo" and p.seed == 5 for p in plans)
    with pytest.raises(ValueError, match="adamx"):
        plan_suite(suite, hparams.load_hparams(), optimizers=["adamx"])
    with pytest.raises(ValueError, match="nope"):
        plan_suite(suite, hparams.load_hparams(), tasks=["nope"])
    with pytest.raises(ValueError, match="jobs"):
        run_plan([], ResultStore(tmp_path), jobs=0)


def test_records_keep_fogo_memory_diagnostics(tmp_path):
    plans = [PlannedRun("longtail", "tiny", o, 0, {"lr": 1e-3}, "test")
             for o in ("fogo", "fogo-nomem")]  # fmt: skip
    fogo, nomem = run_plan(plans, ResultStore(tmp_path), threads=1)
    memory = fogo["extra"]["optimizer_stats"]["memory"]
    assert memory["matrices"] >= 1 and memory["writes"] >= 0 and 0 <= memory["occupancy"] <= 1
    assert "optimizer_stats" not in nomem["extra"]  # no memory, nothing to report
