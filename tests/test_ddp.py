"""Data-parallel launching (orthoptim.benchmarks.ddp, the runner and the CLI under torchrun).

- W gloo ranks (one spawn per world size; W = 4 with ``pytest -m slow``): DDP + SGD and DDP + FOGO
  (replicated, with scheduled memory writes and an ``end_task()``) equal single-process training on
  the same global batch to float32 tolerance, with every rank's parameters bit-identical;
- the tasks' own distributed path (``run_one`` of large-batch and lm-pretrain) reproduces the
  single-process record; ``run_plan`` records once (rank 0) and resumes;
- world size 1 (a group of one rank in this process) equals the single-process run bit for bit;
- the CLI in a torchrun environment destroys its group on success and on failure, and
  ``python -m torch.distributed.run --nproc-per-node 2 -m orthoptim run ...`` records the run once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import one_rank_group, run_scenarios

import orthoptim
from orthoptim.benchmarks import registry
from orthoptim.benchmarks.ddp import DataParallel
from orthoptim.benchmarks.models import build_model
from orthoptim.benchmarks.results import ResultStore
from orthoptim.benchmarks.runner import PlannedRun, run_one, run_plan
from orthoptim.benchmarks.tasks._common import load_dataset
from orthoptim.benchmarks.train import seeded, train
from orthoptim.cli import main

SGD = ("sgd", {"lr": 0.1, "momentum": 0.9})
# memory writes every 3 steps: the 8 + 4 steps cross several, and end_task() writes too
FOGO = ("fogo", {"lr": 0.01, "write_interval": 3, "min_age": 3})
LARGE_BATCH = ("large-batch", "tiny", "sgd", 0, {"lr": 0.05}, "test", {"max_steps": 10})
LM = ("lm-pretrain", "tiny", "adamw", 0, {"lr": 3e-3}, "test", {"steps": 12, "eval_interval": 6})


def _train(parallel: DataParallel | None, optimizer: str, hparams: dict) -> dict:
    """8 steps, ``end_task()`` if the optimizer has it, 4 more steps, on a global batch of 64."""
    data = load_dataset("digits", None)
    with seeded(0):
        model = build_model("mlp", data.input_shape, data.num_classes, hidden=[32], width=None)
        net = model if parallel is None else parallel.wrap(model)
        opt = registry.make_optimizer(optimizer, model, hparams)
        losses = []
        for phase, steps in enumerate((8, 4)):
            res = train(net, opt, data.train_x, data.train_y, batch_size=64, steps=steps,
                        seed=phase, parallel=parallel)  # fmt: skip
            losses += res.losses
            if phase == 0 and hasattr(opt, "end_task"):
                opt.end_task()
    out = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses}
    if hasattr(opt, "memory_stats"):
        out["memory"] = opt.memory_stats()
    return out


_DISCRETE = ("matrices", "entries_used", "columns_used", "writes", "ready", "conflicts")
_TIMING = ("seconds", "tokens_per_second", "wall_seconds", "started", "finished")


def _untimed(obj):
    """A record without its wall-clock fields (they differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not any(t in k for t in _TIMING)}
    return obj


def _train_scenario(rank: int, world: int, which: tuple) -> dict:
    return _train(DataParallel.from_process_group(), *which)


def _run_scenario(rank: int, world: int, plan: tuple) -> dict:
    return _untimed(run_one(PlannedRun(*plan, world_size=world), parallel=_parallel()))


def _resume_scenario(rank: int, world: int, folder: str) -> tuple[int, int]:
    plans = [PlannedRun(*LARGE_BATCH, world_size=world)]
    first = run_plan(plans, ResultStore(folder), parallel=_parallel())
    again = run_plan(plans, ResultStore(folder), parallel=_parallel())
    return len(first), len(again)


def _muon_state_scenario(rank: int, world: int) -> dict:
    """Which matrices' momentum this rank holds after one step of the registry's ``muon``."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 16) for _ in range(4)]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 4))
    opt = registry.make_optimizer("muon", model)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    held = [n for n, p in model.named_parameters() if "momentum_slow" in opt.state.get(p, {})]
    return {"kind": type(opt).__name__, "held": held}


def _parallel() -> DataParallel:
    return DataParallel.from_process_group("cpu")


def _scenarios(folder: Path) -> dict:
    return {
        "sgd": functools.partial(_train_scenario, which=SGD),
        "fogo": functools.partial(_train_scenario, which=FOGO),
        "large_batch": functools.partial(_run_scenario, plan=LARGE_BATCH),
        "lm": functools.partial(_run_scenario, plan=LM),
        "resume": functools.partial(_resume_scenario, folder=str(folder)),
        "muon_state": _muon_state_scenario,
    }


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def ranks(request, tmp_path_factory):
    """(W, folder of the resume scenario, scenario name -> per-rank results): one spawn per W."""
    folder = tmp_path_factory.mktemp(f"ddp{request.param}")
    return request.param, folder, run_scenarios(request.param, _scenarios(folder), timeout=300)


@pytest.fixture(scope="module")
def single():
    return {
        "sgd": _train(None, *SGD),
        "fogo": _train(None, *FOGO),
        "large_batch": _untimed(run_one(PlannedRun(*LARGE_BATCH))),
        "lm": _untimed(run_one(PlannedRun(*LM))),
    }


def _assert_replicas_identical(per_rank: list[dict]) -> None:
    for r, other in enumerate(per_rank[1:], start=1):
        for name, p in per_rank[0]["params"].items():
            assert torch.equal(p, other["params"][name]), f"rank {r} differs at {name}"


def test_registry_muon_shards_its_matrices_like_fogo(ranks):
    """The registry's ``muon`` is FOGO's Muon mode: under a process group each hidden matrix's
    momentum lives on one rank only."""
    world, _, results = ranks
    per_rank = results["muon_state"]
    assert {r["kind"] for r in per_rank} == {"FOGO"}
    held = [set(r["held"]) for r in per_rank]
    assert all(held), "every rank owns some matrices"
    for a in range(world):
        for b in range(a + 1, world):
            assert not held[a] & held[b], f"ranks {a} and {b} both hold {held[a] & held[b]}"
    assert len(set().union(*held)) >= 3  # the hidden matrices, each on exactly one rank


@pytest.mark.parametrize("which", ["sgd", "fogo"])
def test_ddp_training_equals_one_process_on_the_global_batch(ranks, single, which):
    world, _, results = ranks
    per_rank = results[which]
    _assert_replicas_identical(per_rank)
    ref = single[which]
    for name, p in per_rank[0]["params"].items():
        torch.testing.assert_close(p, ref["params"][name], rtol=1e-5, atol=1e-6, msg=name)
    # recorded losses are global-batch means, the same on every rank
    assert all(r["losses"] == per_rank[0]["losses"] for r in per_rank)
    torch.testing.assert_close(torch.tensor(per_rank[0]["losses"]), torch.tensor(ref["losses"]))
    if which == "fogo":  # the memory's discrete decisions agree (writes, protected subspaces)
        assert ref["memory"]["writes"] > 0
        for r in per_rank:
            for k in _DISCRETE:
                assert r["memory"][k] == ref["memory"][k], k
            assert r["memory"] == pytest.approx(ref["memory"], rel=1e-5)


def test_tasks_under_ddp_reproduce_the_single_process_records(ranks, single):
    world, _, results = ranks
    for name in ("large_batch", "lm"):
        per_rank, ref = results[name], single[name]
        # the ranks agree on every number (NaN included: a target not reached)
        assert len({json.dumps(r, sort_keys=True) for r in per_rank}) == 1
        rec = per_rank[0]
        assert rec["extra"].pop("world_size") == world and rec["extra"].pop("device") == "cpu"
        assert rec["label"] == f"{ref['task']} ({world} ranks)" and rec["key"] != ref["key"]
        for key in ("label", "key"):
            rec.pop(key), ref.pop(key)
        # accuracies and losses of float32 runs that differ only in summation order
        assert _close(rec, ref), name


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-4, abs=1e-5, nan_ok=True)
    return a == b


def test_run_plan_records_once_and_resumes(ranks):
    world, folder, results = ranks
    assert results["resume"] == [(1, 0)] * world  # every rank ran it once, nothing the 2nd time
    records = ResultStore(folder).records()
    assert len(records) == 1 and records[0]["extra"]["world_size"] == world


@pytest.mark.parametrize("which", [SGD, FOGO], ids=["sgd", "fogo"])
def test_world_size_one_equals_one_process_bit_for_bit(tmp_path, which):
    with one_rank_group(tmp_path):
        ddp = _train(_parallel(), *which)
    assert not dist.is_initialized()
    ref = _train(None, *which)
    assert ddp["losses"] == ref["losses"]
    for name, p in ref["params"].items():
        assert torch.equal(ddp["params"][name], p), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_under_torchrun_environment_destroys_its_group(tmp_path, monkeypatch, capsys):
    """A one-process torchrun environment, in this process: the run is recorded, a run that fails
    is reported (exit 1), a task without data parallelism, an optimizer not marked data-parallel
    and other commands are refused (exit 2), and no process group outlives ``main``."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    base = ["run", "large-batch", "--preset", "tiny", "--set", "max_steps=5", "--out",
            str(tmp_path), "--quiet", "--no-report"]  # fmt: skip
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert main([*base, "-o", "sgd"]) == 0 and not dist.is_initialized()
    (rec,) = ResultStore(tmp_path).records()
    assert rec["extra"]["world_size"] == 1 and rec["label"] == "large-batch"
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert main([*base, "-o", "adamw", "--hp", "momentum=0.5"]) == 1 and not dist.is_initialized()
    assert "FAILED [rank 0] large-batch adamw seed 0" in capsys.readouterr().err
    assert len(ResultStore(tmp_path).records()) == 1
    assert main(["run", "longtail", "-o", "sgd", "--preset", "tiny"]) == 2
    not_parallel = dataclasses.replace(registry.get_optimizer("fop"), data_parallel=False)
    monkeypatch.setitem(registry.BUILTINS, "fop", not_parallel)
    assert main([*base, "-o", "fop"]) == 2  # an optimizer not marked data-parallel
    assert main(["list", "tasks"]) == 2
    err = capsys.readouterr().err
    assert "'longtail' does not run under torchrun" in err and "only `run`" in err
    assert "Invalid optimizer: 'fop' under torchrun" in err
    assert not dist.is_initialized()


def test_torchrun_launch_records_the_run_once(tmp_path):
    src = str(Path(orthoptim.__file__).parents[1])  # the orthoptim this test imports
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "orthoptim", "run", "large-batch", "-o", "sgd", "--preset", "tiny",
            "--set", "max_steps=10", "--hp", "lr=0.05", "--out", str(tmp_path), "--quiet",
            "--no-report"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output
    assert done.stdout.count("runs planned") == 1, output  # rank 0 alone prints
    (rec,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rec["extra"]["world_size"] == 2 and rec["label"] == "large-batch (2 ranks)"
    ref = run_one(PlannedRun("large-batch", "tiny", "sgd", 0, rec["hparams"], "test",
                             {"max_steps": 10}))  # fmt: skip
    got, want = rec["curves"]["eval_accuracy_vs_step"], ref["curves"]["eval_accuracy_vs_step"]
    assert got["x"] == want["x"] and got["y"] == pytest.approx(want["y"], abs=1e-2)
