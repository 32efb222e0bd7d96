"""The result store: round trip, validation, resume keys, torn-tail recovery and a real SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from orthoptim.benchmarks import results as R
from orthoptim.benchmarks.results import ResultStore, make_record, run_key, validate_record

ENV = {"python": "3.11", "torch": "x"}  # fixed, so records compare equal and no torch probing


def record(seed=0, optimizer="fogo", **over):
    kw = dict(
        task="continual-permuted",
        family="continual",
        label="continual-permuted",
        settings={"tasks": 3, "steps": 10, "eval_split": "test"},
        optimizer=optimizer,
        hparams={"lr": 1e-3, "weight_decay": 0.01},
        hparams_source="defaults",
        seed=seed,
        metrics={"acc": 0.5 + seed / 100, "steps_to_target": float("nan")},
        metric_goals={"acc": "max", "steps_to_target": "min"},
        primary_metric="acc",
        started="2026-01-01T00:00:00+00:00",
        finished="2026-01-01T00:00:05+00:00",
        wall_seconds=5.0,
        curves={"loss": {"x": [0, 1, 2], "y": [1.0, float("inf"), float("nan")]}},
        extra={"R": [[0.9, 0.1], [0.8, 0.7]], "batch_size": None},
        suite="quick",
        preset="tiny",
        env=ENV,
    )
    kw.update(over)
    return make_record(**kw)


def same(a, b) -> bool:
    # json text equality treats NaN == NaN, which plain dict equality does not.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_round_trip_with_nan_and_inf(tmp_path):
    store = ResultStore(tmp_path / "out")
    recs = [record(seed=s) for s in range(3)]
    for r in recs:
        store.append(r)
    back = ResultStore(tmp_path / "out").records()
    assert len(back) == 3 and all(same(a, b) for a, b in zip(recs, back, strict=True))
    assert math.isnan(back[0]["metrics"]["steps_to_target"])
    assert back[0]["curves"]["loss"]["y"][1] == math.inf and back[0]["suite"] == "quick"
    text = store.path.read_text()
    assert text.count("\n") == 3 and "NaN" in text and "Infinity" in text  # documented literals
    assert store.completed() == {r["key"] for r in recs}


def test_empty_store_and_bad_out_dir(tmp_path):
    store = ResultStore(tmp_path / "none")
    assert store.records() == [] and store.completed() == set()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        ResultStore(f)


def test_validation_names_the_problem(tmp_path):
    good = record()
    bad = {k: v for k, v in good.items() if k not in ("seed", "metrics")}
    with pytest.raises(ValueError, match=r"missing field\(s\) \['seed', 'metrics'\]"):
        ResultStore(tmp_path).append(bad)
    cases = [
        ({"seed": True}, "'seed'"),
        ({"schema": 2}, "'schema'"),
        ({"metric_goals": {"acc": "up", "steps_to_target": "min"}}, "goal for metric 'acc'"),
        ({"primary_metric": "loss"}, "primary_metric"),
        ({"metrics": {"acc": "high", "steps_to_target": 1.0}}, "metric 'acc'"),
        ({"curves": {"loss": {"x": [1], "y": []}}}, "curve 'loss'"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            validate_record({**good, **change})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        ResultStore(tmp_path).append({**good, "extra": {"s": {1, 2}}})
    assert not (tmp_path / R.RESULTS_FILE).exists()  # nothing written for rejected records


def test_run_key_stable():
    s1 = {"a": 1, "b": [1, 2], "eval_split": "test"}
    s2 = {"eval_split": "test", "b": [1, 2], "a": 1}
    k = run_key("t", s1, "fogo", {"lr": 0.1, "wd": 0}, 0)
    assert k == run_key("t", s2, "fogo", {"wd": 0, "lr": 0.1}, 0)
    assert len(k) == 16 and int(k, 16) >= 0
    others = {
        run_key("t", s1, "fogo", {"lr": 0.1, "wd": 0}, 1),
        run_key("t", s1, "adamw", {"lr": 0.1, "wd": 0}, 0),
        run_key("t", s1, "fogo", {"lr": 0.2, "wd": 0}, 0),
        run_key("t", {**s1, "a": 2}, "fogo", {"lr": 0.1, "wd": 0}, 0),
        run_key("u", s1, "fogo", {"lr": 0.1, "wd": 0}, 0),
    }
    assert k not in others and len(others) == 5
    # Golden value: changing the hashing would silently redo every stored run on resume.
    assert run_key("t", {"a": 1}, "fogo", {"lr": 0.1}, 0) == "3a006e1705836bc9"
    with pytest.raises(ValueError, match="seed"):
        run_key("t", s1, "fogo", {}, 1.0)


def test_environment_fields():
    env = R.environment()
    for k in ("orthoptim", "torch", "numpy", "python", "platform", "cpu_count", "device"):
        assert k in env
    assert env["torch_threads"] >= 1
    json.dumps(env)


@pytest.mark.parametrize(
    "tail", [b'{"schema": 1, "ke', b"\x00\x00\x00\x00", b'{"key": "complete-but-no-newline"}']
)
def test_torn_tail_ignored_then_truncated(tmp_path, tail):
    store = ResultStore(tmp_path)
    store.append(record(seed=0))
    store.append(record(seed=1))
    size = store.path.stat().st_size
    with open(store.path, "ab") as f:
        f.write(tail)
    with pytest.warns(RuntimeWarning, match="torn last line 3"):
        assert [r["seed"] for r in store.records()] == [0, 1]
    with pytest.warns(RuntimeWarning, match="torn"):
        assert len(store.completed()) == 2
    assert store.path.stat().st_size == size + len(tail)  # reading never modifies the file
    store.append(record(seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # valid again: no warning
        assert [r["seed"] for r in store.records()] == [0, 1, 2]
    assert all(json.loads(line) for line in store.path.read_bytes().splitlines())


def test_torn_tail_with_newline_is_also_recovered(tmp_path):
    store = ResultStore(tmp_path)
    store.append(record(seed=0))
    with open(store.path, "ab") as f:
        f.write(b'{"schema": 1\n\n')
    with pytest.warns(RuntimeWarning, match="torn last line 2"):
        assert len(store.records()) == 1
    store.append(record(seed=1))
    assert store.path.read_bytes().count(b"\n") == 2


def test_corrupt_middle_line_is_an_error(tmp_path):
    store = ResultStore(tmp_path)
    store.append(record(seed=0))
    store.append(record(seed=1))
    first, second = store.path.read_bytes().splitlines(keepends=True)
    store.path.write_bytes(first + b"garbage\n" + second)  # e.g. a bad hand edit
    with pytest.raises(ValueError) as e:
        store.records()
    msg = str(e.value)
    assert str(store.path) in msg and "line 2" in msg and "delete that line" in msg


def test_duplicate_key_keeps_first(tmp_path):
    store = ResultStore(tmp_path)
    first = record(seed=0)
    store.append(first)
    store.append({**first, "wall_seconds": 99.0})
    with pytest.warns(RuntimeWarning, match="line 2 repeats key"):
        recs = store.records()
    assert len(recs) == 1 and recs[0]["wall_seconds"] == 5.0


# The child loads results.py by path: the module needs no torch, and skipping the package import
# (which imports torch, seconds on a busy CPU) keeps this test fast.
CHILD = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("orthoptim_results", sys.argv[1])
    R = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(R)
    store, n, pause = R.ResultStore(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    done = store.completed()
    for seed in range(n):
        rec = R.make_record(
            task="t", family="f", label="t", settings={"n": n}, optimizer="fogo",
            hparams={"lr": 0.1}, hparams_source="defaults", seed=seed,
            metrics={"acc": seed / n}, metric_goals={"acc": "max"}, primary_metric="acc",
            started="s", finished="f", wall_seconds=0.0, env={},
            # a few hundred kB per line, so a kill can land inside a write
            curves={"loss": {"x": list(range(20000)), "y": [seed + 0.5] * 20000}},
        )
        if rec["key"] in done:
            continue
        store.append(rec)
        print(rec["key"], flush=True)
        time.sleep(pause)
    """
)


def test_sigkill_mid_run_then_resume(tmp_path):
    n, out = 40, tmp_path / "out"
    args = [sys.executable, "-c", CHILD, R.__file__, str(out), str(n)]
    child = subprocess.Popen([*args, "0.02"], stdout=subprocess.PIPE, text=True)
    reported, deadline = [], time.monotonic() + 20
    while len(reported) < 5 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        reported.append(line.strip())
    os.kill(child.pid, signal.SIGKILL)
    reported += child.stdout.read().split()  # keys printed before the kill landed
    assert child.wait() == -signal.SIGKILL
    assert 5 <= len(reported) < n, "the child should have been killed mid-run"

    with warnings.catch_warnings(record=True):  # a torn tail is allowed here
        warnings.simplefilter("always")
        recs = ResultStore(out).records()
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys))
    assert set(reported) <= set(keys)  # every acknowledged append survived
    assert len(keys) <= len(reported) + 1  # at most the append in flight beyond them
    for r in recs:  # no partial record: each one is complete and valid
        validate_record(r)
        assert r["curves"]["loss"]["y"] == [r["seed"] + 0.5] * 20000

    resumed = subprocess.run([*args, "0"], capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert set(resumed.stdout.split()).isdisjoint(keys)  # completed runs were skipped
    lines = ResultStore(out).path.read_bytes().splitlines()
    final = [json.loads(line)["key"] for line in lines]
    assert len(final) == n and len(set(final)) == n
    assert sorted(json.loads(line)["seed"] for line in lines) == list(range(n))
