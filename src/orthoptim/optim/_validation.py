"""Argument checks shared by every orthoptim optimizer: errors name the argument and its value."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def _as_float(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: tensor {name} must have exactly one element")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}; expected a number")
    return float(value)


def check_range(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (``<`` on an open end), finite."""
    v = _as_float(name, value)
    ok = math.isfinite(v) or (v == math.inf and high == math.inf and not high_open)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {value!r}; must lie in {lo}{low}, {high}{hi}")


def check_int(name: str, value: object, low: int = 0, high: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"Invalid {name}: {value}; must be {bound}")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {options}")


def check_betas(name: str, betas: object) -> None:
    """Validate a (beta1, beta2) pair in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r}; expected a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0, high_open=True)


def check_group_keys(group: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Reject unknown param-group keys: a typo must not be silently ignored."""
    unknown = sorted(set(group) - set(allowed) - {"params", "param_names"})
    if unknown:
        raise ValueError(
            f"Unknown param-group key(s) {unknown}; allowed keys are {sorted(allowed)}"
        )
