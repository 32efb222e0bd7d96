"""The versioned hyperparameter config: which hyperparameters each optimizer gets on each task.

The packaged ``configs/hparams.json`` (or any file passed as ``--config``) has this layout::

    {"version": 3, "updated": "2026-07-01", "protocol": "<how tuned values were chosen>",
     "defaults": {"adamw": {"lr": 0.001, ...}, ...},
     "tasks": {"continual-permuted": {"fogo": {"hparams": {"lr": 0.00316, ...},
                                               "tuned": {"preset": "quick", "grid": [...],
                                                         "seeds": [0, 1], "metric": "acc",
                                                         "scores": {...}, "date": "..."}}}}}

``defaults`` are the code defaults of the registry (untuned, and marked so in every result);
``tasks`` holds what the tuner (:mod:`orthoptim.benchmarks.tuning`) chose, with its provenance.
:meth:`HParamConfig.lookup` returns the hyperparameters of one (task, optimizer) and a source
string that every result records, so a number can always be traced to the config version and
the tuning run behind it. Every save bumps ``version``.

Loading validates everything (optimizer names and hyperparameter keys against the registry, the
provenance fields) and names the file and the bad key in the error. Saving writes a temporary
file in the same folder and renames it over the config (``os.replace``), so a crash never leaves
a half-written config. Two tuners writing the same file at once would lose one update: run them
one after the other.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry

__all__ = ["DEFAULT_PATH", "HParamConfig", "load_hparams", "save_tuned", "TUNED_FIELDS"]

DEFAULT_PATH = Path(__file__).parent / "configs" / "hparams.json"
_TOP_KEYS = ("version", "updated", "protocol", "defaults", "tasks")
# Provenance every tuned entry carries.
TUNED_FIELDS = ("preset", "grid", "seeds", "metric", "scores", "date")


@dataclass
class HParamConfig:
    """A loaded config (see the module docstring for the layout).

    Attributes:
        path: the file it was read from.
        version: config version (bumped by every :func:`save_tuned`).
        updated: date of the last change (ISO).
        protocol: how the tuned values were chosen.
        defaults: optimizer -> hyperparameters (code defaults, untuned).
        tasks: task -> optimizer -> ``{"hparams": {...}, "tuned": {...provenance}}``.
    """

    path: Path
    version: int
    updated: str
    protocol: str
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def default_hparams(self, optimizer: str) -> dict[str, Any]:
        """The untuned hyperparameters of ``optimizer``: the config's defaults, else the
        registry's code defaults (peers are not listed in the config).

        Args:
            optimizer: registry name (unknown -> ValueError).
        """
        entry = registry.get_optimizer(optimizer)
        return copy.deepcopy(dict(self.defaults.get(optimizer, entry.defaults)))

    def lookup(self, task: str, optimizer: str) -> tuple[dict[str, Any], str]:
        """Hyperparameters for ``optimizer`` on ``task`` and where they come from.

        Args:
            task: task name.
            optimizer: registry name (unknown -> ValueError).

        Returns:
            ``(hparams, source)``; source is e.g. ``"tuned v3 (task continual-permuted, preset
            quick)"``, ``"default v3 (untuned)"`` or, for an optimizer the config does not list,
            ``"code default (untuned; not in config v3)"``.
        """
        base = self.default_hparams(optimizer)
        tuned = self.tasks.get(task, {}).get(optimizer)
        if tuned is not None:
            preset = tuned["tuned"]["preset"]
            source = f"tuned v{self.version} (task {task}, preset {preset})"
            return {**base, **copy.deepcopy(tuned["hparams"])}, source
        if optimizer in self.defaults:
            return base, f"default v{self.version} (untuned)"
        return base, f"code default (untuned; not in config v{self.version})"

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this config (the file's content)."""
        return {
            "version": self.version, "updated": self.updated, "protocol": self.protocol,
            "defaults": self.defaults, "tasks": self.tasks,
        }  # fmt: skip


def _fail(path: Path, what: str) -> ValueError:
    return ValueError(f"Invalid hparams config {path}: {what}")


def _check_hparams(path: Path, where: str, optimizer: str, hparams: Any) -> None:
    try:
        entry = registry.get_optimizer(optimizer)
    except ValueError as e:
        raise _fail(path, f"{where}: {e}") from None
    if not isinstance(hparams, dict):
        raise _fail(path, f"{where}: expected an object of hyperparameters, got {hparams!r}")
    try:
        entry.check(hparams)
    except ValueError as e:
        raise _fail(path, f"{where}: {e}") from None


def _check_tuned(path: Path, where: str, tuned: Any) -> None:
    if not isinstance(tuned, dict):
        raise _fail(path, f"{where}.tuned: expected an object, got {tuned!r}")
    missing = [k for k in TUNED_FIELDS if k not in tuned]
    if missing:
        raise _fail(path, f"{where}.tuned: missing provenance field(s) {missing}")


def _validate(path: Path, raw: Any) -> HParamConfig:
    if not isinstance(raw, dict):
        raise _fail(path, f"the top level must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in _TOP_KEYS if k not in raw]
    extra = sorted(set(raw) - set(_TOP_KEYS))
    if missing or extra:
        raise _fail(path, f"missing key(s) {missing}, unknown key(s) {extra}; expected {_TOP_KEYS}")
    version = raw["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise _fail(path, f"'version' must be an integer >= 0, got {version!r}")
    for key in ("updated", "protocol"):
        if not isinstance(raw[key], str):
            raise _fail(path, f"{key!r} must be a string, got {raw[key]!r}")
    for key in ("defaults", "tasks"):
        if not isinstance(raw[key], dict):
            raise _fail(path, f"{key!r} must be an object, got {type(raw[key]).__name__}")
    for opt, hp in raw["defaults"].items():
        _check_hparams(path, f"defaults.{opt}", opt, hp)
    for task, per_opt in raw["tasks"].items():
        if not isinstance(per_opt, dict):
            raise _fail(path, f"tasks.{task}: expected an object of optimizers")
        for opt, item in per_opt.items():
            where = f"tasks.{task}.{opt}"
            if not isinstance(item, dict) or set(item) != {"hparams", "tuned"}:
                raise _fail(path, f"{where}: expected an object with keys 'hparams' and 'tuned'")
            _check_hparams(path, f"{where}.hparams", opt, item["hparams"])
            _check_tuned(path, where, item["tuned"])
    return HParamConfig(
        path=path, version=version, updated=raw["updated"], protocol=raw["protocol"],
        defaults=raw["defaults"], tasks=raw["tasks"],
    )  # fmt: skip


def load_hparams(path: str | os.PathLike | None = None) -> HParamConfig:
    """Read and validate a config.

    Args:
        path: the JSON file; ``None`` reads the packaged ``configs/hparams.json``.

    Raises:
        ValueError: missing file, bad JSON or bad content, naming the file and the bad key.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(
            f"Invalid hparams config {path}: no such file (omit --config for the packaged one)"
        ) from None
    except OSError as e:
        raise _fail(path, f"cannot read it ({e})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(
            path,
            f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file or "
            f"restore the packaged copy from git (src/orthoptim/benchmarks/configs/hparams.json)",
        ) from None
    return _validate(path, raw)


def save_tuned(
    path: str | os.PathLike | None,
    task: str,
    optimizer: str,
    hparams: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> HParamConfig:
    """Store tuned hyperparameters of ``optimizer`` on ``task``, bump the version, write atomically.

    Args:
        path: the config to update (``None``: the packaged one); it must exist and be valid.
        task: task name.
        optimizer: registry name.
        hparams: the chosen hyperparameters (JSON values).
        provenance: how they were chosen: preset, grid, seeds, metric, scores and date
            (:meth:`orthoptim.benchmarks.tuning.TuneResult.provenance`).

    Returns:
        The updated config.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    config = load_hparams(path)
    if not isinstance(task, str) or not task:
        raise ValueError(f"Invalid task: {task!r}; expected a non-empty name")
    _check_hparams(path, f"tasks.{task}.{optimizer}.hparams", optimizer, dict(hparams))
    provenance = dict(provenance)
    _check_tuned(path, f"tasks.{task}.{optimizer}", provenance)
    raw = copy.deepcopy(config.to_json())
    raw["tasks"].setdefault(task, {})[optimizer] = {
        "hparams": dict(hparams), "tuned": provenance,
    }  # fmt: skip
    raw["version"] = config.version + 1
    raw["updated"] = _dt.date.today().isoformat()
    try:
        text = json.dumps(raw, indent=2, allow_nan=False) + "\n"  # strict JSON: no NaN
    except (TypeError, ValueError) as e:
        raise ValueError(f"Invalid hparams or provenance: not strict JSON ({e})") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return _validate(path, raw)
