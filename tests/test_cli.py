"""The ``orthoptim`` command line: listing, one-line errors, a tiny end-to-end run with report,
resume without duplicates, and a run killed with SIGKILL then resumed (no completed result lost
or duplicated)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orthoptim.cli import main


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("what", ["tasks", "optimizers", "suites"])
def test_list(what, capsys):
    code, out, _ = _run(["list", what], capsys)
    assert code == 0
    expected = {
        "tasks": ["longtail", "continual-permuted", "continual-split-class", "lm-pretrain",
                  "lm-continual", "large-batch"],
        "optimizers": ["sgd", "adamw", "muon", "fogo", "fogo-nomem", "kfac", "kfac-2x", "fop"],
        "suites": ["quick", "paper"],
    }[what]  # fmt: skip
    for name in expected:
        assert name in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "no-such-task", "-o", "adamw"], "Invalid task: 'no-such-task'"),
        (["run", "longtail", "-o", "adamx"], "adamx"),
        (["run", "longtail", "-o", "adamw", "--set", "bogus=1"], "bogus"),
        (["run", "longtail", "-o", "adamw", "--preset", "huge"], "Invalid preset: 'huge'"),
        (["run", "longtail", "-o", "adamw", "--set", "rho"], "key=value"),
        (["suite", "paper"], "--data-dir"),
        (["suite", "nope"], "Invalid suite: 'nope'"),
        (["list", "widgets"], "widgets"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments_give_one_line_error(argv, needle, capsys, tmp_path):
    code, out, err = _run([*argv, *(["--out", str(tmp_path)] if argv[0] == "run" else [])], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orthoptim: error:"), err
    assert needle in lines[0]


def test_missing_data_names_path_and_fix(tmp_path, capsys):
    code, _, err = _run(
        ["run", "longtail", "-o", "adamw", "--preset", "paper", "--data-dir", str(tmp_path),
         "--out", str(tmp_path / "out"), "--quiet"], capsys,
    )  # fmt: skip
    assert code == 2
    assert str(tmp_path) in err and "orthoptim: error:" in err


def test_run_writes_records_and_report_then_resumes(tmp_path, capsys):
    argv = ["run", "continual-split-task", "-o", "adamw", "-o", "sgd", "--preset", "tiny",
            "--seeds", "0", "1", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    code, out, _ = _run(argv, capsys)
    assert code == 0, out
    recs = _lines(tmp_path / "results.jsonl")
    assert sorted((r["optimizer"], r["seed"]) for r in recs) == [
        ("adamw", 0), ("adamw", 1), ("sgd", 0), ("sgd", 1)
    ]
    assert all(r["task"] == "continual-split-task" and "acc" in r["metrics"] for r in recs)
    report = (tmp_path / "report.md").read_text()
    assert "adamw" in report and "sgd" in report
    code, out, _ = _run(argv, capsys)
    assert code == 0 and "4 already" in out
    assert len(_lines(tmp_path / "results.jsonl")) == 4  # nothing re-run, nothing duplicated


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "orthoptim", "run", "longtail", "-o", "adamw", "-o", "sgd",
            "--preset", "tiny", "--seeds", "0", "1", "2", "--out", str(out), "--quiet",
            "--no-report"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _lines(results)
    assert 2 <= len(before) < 6
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = _lines(results)
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == 6
    assert after[: len(before)] == before  # completed records untouched by the resume


def test_a_failing_run_is_reported_not_stored_and_the_others_go_on(tmp_path, capsys):
    """``momentum`` is an SGD hyperparameter; AdamW rejects it at construction. The SGD run is
    stored, the AdamW run is reported and not stored (a re-run retries it), exit status 1."""
    argv = ["run", "large-batch", "-o", "adamw", "-o", "sgd", "--preset", "tiny", "--hp",
            "momentum=0.5", "--out", str(tmp_path), "--quiet", "--no-report"]  # fmt: skip
    code, _, err = _run(argv, capsys)
    assert code == 1
    assert "FAILED large-batch adamw seed 0" in err and "momentum" in err
    assert [r["optimizer"] for r in _lines(tmp_path / "results.jsonl")] == ["sgd"]


def test_checksum_mismatch_names_the_file_and_the_fix(tmp_path, capsys):
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    text = folder / "input.txt"
    text.write_text("To be, or not to be\n" * 50)
    size = text.stat().st_size
    (folder / "SOURCES.md").write_text(
        f"| file | bytes | md5 | sha256 |\n|---|---|---|---|\n| input.txt | {size} | {'a' * 32} "
        f"| {'0' * 64} |\n"
    )
    code, _, err = _run(
        ["run", "lm-pretrain", "-o", "adamw", "--preset", "paper", "--data-dir", str(tmp_path),
         "--out", str(tmp_path / "out"), "--quiet"], capsys,
    )  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("orthoptim: error:")
    assert "sha256 mismatch" in err and str(text) in err


def test_run_uses_one_thread_unless_told(tmp_path, capsys, monkeypatch):
    import torch

    base = ["run", "continual-split-task", "-o", "adamw", "--preset", "tiny", "--quiet",
            "--no-report"]  # fmt: skip
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # as torch would start on a 2-core machine
    try:
        assert _run([*base, "--out", str(tmp_path / "a")], capsys)[0] == 0
        assert _run([*base, "--out", str(tmp_path / "b"), "--threads", "2"], capsys)[0] == 0
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(prev)
    (a,), (b,) = _lines(tmp_path / "a/results.jsonl"), _lines(tmp_path / "b/results.jsonl")
    assert a["environment"]["torch_threads"] == 1
    assert b["environment"]["torch_threads"] == 2


def test_list_into_a_closed_pipe_ends_quietly():
    # `orthoptim list tasks | true`: the reader is gone before the first line is written.
    proc = subprocess.Popen(
        [sys.executable, "-m", "orthoptim", "list", "tasks"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def _doc_commands() -> list[str]:
    """Every ``orthoptim ...`` line inside a fenced block of the README and docs/*.md, and the
    ``orthoptim ...`` part of every torchrun line (``torchrun ... -m orthoptim run ...``); a
    command continued with a trailing backslash is joined, as the shell would."""
    root = Path(__file__).resolve().parents[1]
    lines = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        fenced = False
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("```"):
                fenced = not fenced
            elif fenced and line.startswith("orthoptim "):
                lines.append(line)
            elif fenced and " -m orthoptim " in line:
                lines.append("orthoptim " + line.split(" -m orthoptim ", 1)[1])
    return lines


def test_documented_commands_parse():
    import shlex

    from orthoptim.cli import build_parser

    commands = _doc_commands()
    assert any(c.startswith("orthoptim list ") for c in commands)
    for line in commands:
        words = shlex.split(line, comments=True)
        assert "|" not in words, f"pasted literally, this is a shell pipeline: {line}"
        build_parser().parse_args(words[1:])  # a bad line raises with argparse's message
