"""The resumable result store: one self-describing JSON record per benchmark run.

Every finished run appends one line to ``<out_dir>/results.jsonl`` (JSON Lines). A record holds
everything the report needs without the code that produced it: task, family, table group
(``label``), preset and settings, optimizer and hyperparameters (and where they came from), seed,
metrics with their goals, curves, extra detail (e.g. the accuracy matrix ``R``), timing and the
software environment. See :data:`FIELDS` for the fields and :func:`make_record` to build one.

Resuming. A record's ``key`` is :func:`run_key` of (task, settings, optimizer, hparams, seed): a
hash of their canonical JSON, so dict order does not matter. The runner skips every key in
:meth:`ResultStore.completed` and runs the rest.

Crash safety. :meth:`ResultStore.append` serialises the record first (so a bad record never
reaches the file), then writes the whole line, newline last, in one ``os.write`` on an
``O_APPEND`` descriptor, and ``fsync``s it before returning. A kill therefore loses at most the
run in progress: either its line is complete or it is a torn tail (no final newline, or invalid
JSON on the last line). Reading ignores a torn tail with a warning, and the next append truncates
it away first, so the file is valid JSON Lines again. Invalid JSON anywhere *before* the last
line cannot come from a kill (later lines were written after it); it is reported as an error
naming the file and line rather than silently dropped. On POSIX an advisory ``flock`` is held
during repair + write, so two processes appending to one store do not interleave or truncate each
other's lines.

NaN. Metrics may be NaN (a target never reached) and curves may hold NaN/inf. Records are written
with Python's ``json`` defaults (``allow_nan=True``): non-finite floats become the literals
``NaN``, ``Infinity`` and ``-Infinity``, which ``json.loads`` (and pandas) read back exactly,
anywhere in the record. Strict JSON parsers reject these literals; we accept that, because the
alternative (``null``) loses the NaN/inf distinction and needs schema-aware decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:  # POSIX only; without it, one writer at a time is the caller's job.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "SCHEMA",
    "FIELDS",
    "RESULTS_FILE",
    "run_key",
    "environment",
    "make_record",
    "validate_record",
    "ResultStore",
]

SCHEMA = 1
RESULTS_FILE = "results.jsonl"

# Field -> accepted types (None means JSON null). All are required: a record must describe itself.
FIELDS: dict[str, tuple[type | None, ...]] = {
    "schema": (int,),
    "key": (str,),
    "suite": (str, None),
    "task": (str,),
    "family": (str,),
    "label": (str,),
    "preset": (str, None),
    "settings": (dict,),
    "optimizer": (str,),
    "hparams": (dict,),
    "hparams_source": (str,),
    "seed": (int,),
    "metrics": (dict,),
    "metric_goals": (dict,),
    "primary_metric": (str,),
    "curves": (dict,),
    "extra": (dict,),
    "wall_seconds": (int, float),
    "started": (str,),
    "finished": (str,),
    "environment": (dict,),
}


def _canonical(obj: Any) -> str:
    # sort_keys makes the text independent of dict order; compact separators make it unique.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def run_key(
    task: str,
    settings: Mapping[str, Any],
    optimizer: str,
    hparams: Mapping[str, Any],
    seed: int,
    world_size: int = 1,
) -> str:
    """The identity of a run: 16 hex digits of the SHA-256 of its canonical JSON.

    Args:
        task: task name, e.g. ``"continual-permuted"``.
        settings: the task settings the run used (JSON-serialisable; order irrelevant).
        optimizer: optimizer name.
        hparams: the optimizer's hyperparameters (JSON-serialisable; order irrelevant).
        seed: the run's seed.
        world_size: processes the run was split over (``torchrun``); part of the identity only
            when > 1, so single-process keys are those of the stores written before it existed.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r}; expected an int")
    payload = {
        "task": task,
        "settings": dict(settings),
        "optimizer": optimizer,
        "hparams": dict(hparams),
        "seed": seed,
    }
    if world_size != 1:
        payload["world_size"] = world_size
    try:
        text = _canonical(payload)
    except TypeError as e:
        raise ValueError(f"Invalid settings or hparams: not JSON-serialisable ({e})") from e
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every run (imports torch on first call)."""
    import numpy
    import torch

    import orthoptim

    return {
        "orthoptim": orthoptim.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def make_record(
    *,
    task: str,
    family: str,
    label: str,
    settings: Mapping[str, Any],
    optimizer: str,
    hparams: Mapping[str, Any],
    hparams_source: str,
    seed: int,
    metrics: Mapping[str, float],
    metric_goals: Mapping[str, str],
    primary_metric: str,
    started: str,
    finished: str,
    wall_seconds: float,
    curves: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    suite: str | None = None,
    preset: str | None = None,
    env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A validated record with ``schema`` and ``key`` filled in.

    Args:
        task, family: the task's name and family (see ``TaskSpec``).
        label: the table group the run belongs to, e.g. ``"large-batch/bs1024"``.
        settings: task settings used.
        optimizer, hparams: optimizer name and hyperparameters.
        hparams_source: where the hyperparameters came from, e.g. ``"defaults"`` or a tuning file.
        seed: the run's seed.
        metrics, metric_goals, primary_metric: ``RunOutput.metrics``, each metric's ``"max"`` /
            ``"min"`` goal, and the primary metric's name.
        started, finished: ISO-8601 timestamps.
        wall_seconds: run time.
        curves, extra: ``RunOutput.curves`` and ``RunOutput.extra`` (default empty).
        suite, preset: the suite and preset names, if any.
        env: the :func:`environment` dict (default: computed now).
    """
    record = {
        "schema": SCHEMA,
        "key": run_key(task, settings, optimizer, hparams, seed),
        "suite": suite,
        "task": task,
        "family": family,
        "label": label,
        "preset": preset,
        "settings": dict(settings),
        "optimizer": optimizer,
        "hparams": dict(hparams),
        "hparams_source": hparams_source,
        "seed": seed,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "metric_goals": dict(metric_goals),
        "primary_metric": primary_metric,
        "curves": dict(curves or {}),
        "extra": dict(extra or {}),
        "wall_seconds": float(wall_seconds),
        "started": started,
        "finished": finished,
        "environment": dict(env) if env is not None else environment(),
    }
    validate_record(record)
    return record


def _type_ok(value: Any, types: tuple[type | None, ...]) -> bool:
    if value is None:
        return None in types
    if isinstance(value, bool):  # bool is an int subclass; never a valid int/float field here
        return False
    return any(t is not None and isinstance(value, t) for t in types)


def validate_record(record: Any) -> None:
    """Check a record's fields and types; raise ValueError naming what is wrong.

    Args:
        record: the dict to check (see :data:`FIELDS`).
    """
    if not isinstance(record, dict):
        raise ValueError(f"Invalid record: expected a dict, got {type(record).__name__}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"Invalid record: missing field(s) {missing}")
    for name, types in FIELDS.items():
        if not _type_ok(record[name], types):
            names = [t.__name__ if t else "null" for t in types]
            raise ValueError(f"Invalid record field {name!r}: {record[name]!r}; expected {names}")
    if record["schema"] != SCHEMA:
        raise ValueError(f"Invalid record field 'schema': {record['schema']!r}; expected {SCHEMA}")
    for name, value in record["metrics"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Invalid metric {name!r}: {value!r}; expected a float (NaN allowed)")
    for name, goal in record["metric_goals"].items():
        if goal not in ("max", "min"):
            raise ValueError(f"Invalid goal for metric {name!r}: {goal!r}; expected 'max'/'min'")
    # A metric without a goal is allowed (a task may report extra detail); the report lists it
    # without ranking it. Rejecting it here would lose a finished run at append time.
    if record["primary_metric"] not in record["metrics"]:
        raise ValueError(
            f"Invalid primary_metric: {record['primary_metric']!r}; "
            f"not among metrics {sorted(record['metrics'])}"
        )
    for name, curve in record["curves"].items():
        if not isinstance(curve, dict) or not {"x", "y"} <= set(curve):
            raise ValueError(f"Invalid curve {name!r}: expected a dict with 'x' and 'y'")
        if len(curve["x"]) != len(curve["y"]):
            raise ValueError(
                f"Invalid curve {name!r}: len(x)={len(curve['x'])} != len(y)={len(curve['y'])}"
            )


class ResultStore:
    """Append-only JSON Lines store of run records under ``out_dir``.

    Args:
        out_dir: folder holding ``results.jsonl`` (created on the first append).
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"Invalid out_dir: {str(out_dir)!r} exists and is not a directory")
        self.path = self.out_dir / RESULTS_FILE

    def _scan(self) -> tuple[list[dict[str, Any]], int | None]:
        """Parse the file: (records, byte offset where a torn tail starts, or None)."""
        if not self.path.exists():
            return [], None
        lines = self.path.read_bytes().split(b"\n")
        # After a final newline split() leaves b"" last; anything else last is unterminated.
        nonblank = [i for i, line in enumerate(lines) if line.strip()]
        tail = nonblank[-1] if nonblank else -1
        records, seen, start = [], set(), 0
        for i, line in enumerate(lines):
            offset, start = start, start + len(line) + 1
            if not line.strip():
                continue  # blank lines are harmless (e.g. after a hand edit)
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "key" not in record:
                    raise ValueError("not a JSON object with a 'key'")
                if i == len(lines) - 1:  # the newline is written last: it marks completion
                    raise ValueError("no final newline")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
                if i == tail:
                    warnings.warn(
                        f"{self.path}: ignoring torn last line {i + 1} ({e}); probably a run "
                        "killed mid-write. It is removed before the next append.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    return records, offset
                raise ValueError(
                    f"{self.path}: line {i + 1} is not a valid record ({e}). Complete lines "
                    "follow it, so it is not a killed write: fix or delete that line by hand "
                    "(a deleted run is redone on the next resume)."
                ) from e
            if record["key"] in seen:
                warnings.warn(
                    f"{self.path}: line {i + 1} repeats key {record['key']!r}; keeping the first",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            seen.add(record["key"])
            records.append(record)
        return records, None

    def records(self) -> list[dict[str, Any]]:
        """All complete records in file order (first occurrence of each key)."""
        return self._scan()[0]

    def completed(self) -> set[str]:
        """Keys of the runs already stored: the runner skips these."""
        return {r["key"] for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        """Validate ``record`` and append it durably as one line.

        Args:
            record: a complete record (see :func:`make_record` / :data:`FIELDS`).
        """
        validate_record(record)
        try:
            line = (json.dumps(record, allow_nan=True, ensure_ascii=True) + "\n").encode()
        except TypeError as e:
            raise ValueError(
                f"Invalid record {record['key']!r}: not JSON-serialisable ({e})"
            ) from e
        self.out_dir.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._repair_tail(fd)
            view = memoryview(line)
            while view:  # one call in practice; loop only if the OS returns a short write
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the flock
        if created:
            _fsync_dir(self.out_dir)

    def _repair_tail(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n" and self._last_line_ok(f, size):
                return  # the common case: only the last line is read
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # records() already warns when a reader sees it
            _, torn_at = self._scan()
        if torn_at is not None:
            os.ftruncate(fd, torn_at)

    @staticmethod
    def _last_line_ok(f, size: int) -> bool:
        # Walk back from the final newline to the previous one, reading in blocks.
        end, start, block = size - 1, size - 1, 1 << 16
        while start > 0:
            lo = max(0, start - block)
            f.seek(lo)
            chunk = f.read(start - lo)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                start = lo + nl + 1
                break
            start = lo
        f.seek(start)
        line = f.read(end - start)
        try:
            return isinstance(json.loads(line), dict)
        except ValueError:
            return False


def _fsync_dir(path: Path) -> None:
    # A new file's directory entry is durable only once the directory itself is synced.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
