"""Evaluation metrics: pure functions on NumPy arrays or torch tensors. Accuracies are fractions.

Classification (``y_true``, ``y_pred`` integer labels):

- ``accuracy = mean_n [y_pred_n == y_true_n]``
- per-class accuracy ``a_c = mean_{n: y_n = c} [y_pred_n == c]`` (NaN for a class absent from
  ``y_true``); balanced accuracy ``= mean_c a_c`` over classes present.
- group accuracy of a class set ``G``: ``mean_{c in G} a_c`` (class-averaged, which equals the
  sample-weighted accuracy on a balanced test set).
- many / medium / few-shot groups (Liu et al., OLTR 2019) from training counts ``n_c``:
  many ``n_c > 100``, medium ``20 <= n_c <= 100``, few ``n_c < 20``.

Continual learning, from the accuracy matrix ``R`` (``R[i, j]`` = accuracy on task ``j`` after
training task ``i``, ``T x T``) and optional accuracies ``b[j]`` before any training:

- ``ACC = mean_j R[T-1, j]``
- ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])`` (GEM; negative = forgetting)
- ``F = mean_{j<T-1} (max_{l in [j, T-2]} R[l, j] - R[T-1, j])`` (Chaudhry; positive = forgetting)
- learning accuracy ``LA = mean_j R[j, j]``
- ``FWT = 1/(T-1) sum_{j>=1} (R[j-1, j] - b[j])`` (GEM)
- average incremental accuracy ``1/T sum_i mean_{j<=i} R[i, j]`` (iCaRL)

BWT, F and FWT are undefined (NaN) for ``T = 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "accuracy",
    "per_class_accuracy",
    "balanced_accuracy",
    "group_accuracy",
    "shot_groups",
    "head_mid_tail_groups",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "learning_accuracy",
    "forward_transfer",
    "average_incremental_accuracy",
    "continual_metrics",
]


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = _np(y_true).reshape(-1), _np(y_pred)
    if p.ndim == 2:  # logits or scores
        p = p.argmax(axis=1)
    p = p.reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}")
    return t.astype(np.int64), p.astype(np.int64)


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct predictions.

    Args:
        y_true: ``(N,)`` integer labels.
        y_pred: ``(N,)`` predicted labels, or ``(N, C)`` scores (argmax taken).
    """
    t, p = _labels(y_true, y_pred)
    return float((t == p).mean()) if t.size else float("nan")


def per_class_accuracy(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """Recall of each class, ``(num_classes,)`` float; NaN where the class is absent from y_true.

    Args:
        y_true, y_pred: as in :func:`accuracy`.
        num_classes: length of the result (default ``max label + 1``).
    """
    t, p = _labels(y_true, y_pred)
    C = int(num_classes) if num_classes is not None else int(max(t.max(), p.max(), -1)) + 1
    total = np.bincount(t, minlength=C)[:C].astype(np.float64)
    correct = np.bincount(t[t == p], minlength=C)[:C].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def balanced_accuracy(y_true, y_pred, num_classes: int | None = None) -> float:
    """Mean of :func:`per_class_accuracy` over the classes present in ``y_true``."""
    return float(np.nanmean(per_class_accuracy(y_true, y_pred, num_classes)))


def group_accuracy(per_class, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Class-averaged accuracy of each named class group.

    Args:
        per_class: ``(C,)`` per-class accuracies (from :func:`per_class_accuracy`).
        groups: ``{group name: class indices}``, e.g. ``{"head": [0, 1, 2], ...}``. An empty group
            (or one whose classes are all NaN) gets NaN.
    """
    a = _np(per_class).astype(np.float64)
    out = {}
    for name, classes in groups.items():
        vals = a[np.asarray(list(classes), dtype=np.int64)]
        vals = vals[~np.isnan(vals)]
        out[name] = float(vals.mean()) if vals.size else float("nan")
    return out


def shot_groups(train_counts, many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Many / medium / few-shot class groups from training counts (OLTR thresholds).

    Args:
        train_counts: ``(C,)`` training examples per class.
        many: classes with more than ``many`` examples are many-shot.
        few: classes with fewer than ``few`` examples are few-shot; the rest are medium-shot.

    Returns:
        ``{"many": [...], "medium": [...], "few": [...]}`` (class indices, ascending).
    """
    n = _np(train_counts).reshape(-1)
    return {
        "many": [int(c) for c in np.flatnonzero(n > many)],
        "medium": [int(c) for c in np.flatnonzero((n >= few) & (n <= many))],
        "few": [int(c) for c in np.flatnonzero(n < few)],
    }


def head_mid_tail_groups(train_counts, head_frac: float = 0.3, tail_frac: float = 0.3):
    """Explicit head / mid / tail groups by rank of training count (for few-class datasets).

    Classes are ranked by count, descending (ties: lower index first); the first
    ``round(head_frac * C)`` are head, the last ``round(tail_frac * C)`` are tail, the rest mid.
    For 10 classes with counts decreasing in the class index this gives 0-2 / 3-6 / 7-9.

    Args:
        train_counts: ``(C,)`` training examples per class.
        head_frac, tail_frac: fractions of classes in the head and tail groups.
    """
    n = _np(train_counts).reshape(-1)
    order = sorted(range(len(n)), key=lambda c: (-n[c], c))
    h, t = int(round(head_frac * len(n))), int(round(tail_frac * len(n)))
    return {
        "head": sorted(order[:h]),
        "mid": sorted(order[h : len(n) - t]),
        "tail": sorted(order[len(n) - t :]),
    }


def _R(R) -> np.ndarray:
    a = _np(R).astype(np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T x T matrix, got shape {a.shape}")
    return a


def average_accuracy(R) -> float:
    """``ACC = mean_j R[T-1, j]``: mean accuracy over all tasks after the last one."""
    return float(_R(R)[-1].mean())


def backward_transfer(R) -> float:
    """GEM ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])``; NaN for ``T = 1``."""
    a = _R(R)
    T = a.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean(a[-1, : T - 1] - np.diag(a)[: T - 1]))


def forgetting(R) -> float:
    """Chaudhry ``F = mean_{j<T-1} (max_{l in [j, T-2]} R[l, j] - R[T-1, j])``; NaN if T=1."""
    a = _R(R)
    T = a.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean([a[j : T - 1, j].max() - a[-1, j] for j in range(T - 1)]))


def learning_accuracy(R) -> float:
    """``mean_j R[j, j]``: accuracy on each task right after training it (plasticity)."""
    return float(np.diag(_R(R)).mean())


def forward_transfer(R, b) -> float:
    """GEM ``FWT = 1/(T-1) sum_{j>=1} (R[j-1, j] - b[j])``; NaN for ``T = 1``.

    Args:
        R: ``T x T`` accuracy matrix.
        b: ``(T,)`` accuracy of each task before any training (same model initialisation).
    """
    a = _R(R)
    bb = _np(b).astype(np.float64).reshape(-1)
    T = a.shape[0]
    if bb.shape != (T,):
        raise ValueError(f"b must have shape ({T},), got {bb.shape}")
    if T < 2:
        return float("nan")
    return float(np.mean([a[j - 1, j] - bb[j] for j in range(1, T)]))


def average_incremental_accuracy(R) -> float:
    """iCaRL ``1/T sum_i mean_{j<=i} R[i, j]``."""
    a = _R(R)
    return float(np.mean([a[i, : i + 1].mean() for i in range(a.shape[0])]))


def continual_metrics(R, b=None) -> dict[str, float]:
    """All continual-learning metrics of ``R`` (and FWT when ``b`` is given) in one dict.

    Keys: ``acc``, ``bwt``, ``forgetting``, ``learning_acc``, ``avg_incremental_acc`` and, with
    ``b``, ``fwt``.
    """
    out = {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
        "learning_acc": learning_accuracy(R),
        "avg_incremental_acc": average_incremental_accuracy(R),
    }
    if b is not None:
        out["fwt"] = forward_transfer(R, b)
    return out
