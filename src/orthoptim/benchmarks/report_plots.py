"""The report's figures: curves, bar charts, accuracy-matrix heatmaps and batch-size scaling.

Each function takes plain numbers (already grouped by :mod:`orthoptim.benchmarks.report`), writes
one PNG and returns whether it wrote anything, so the report links only figures that exist.
Figures are built with matplotlib's object API on the Agg canvas (``Figure`` +
``FigureCanvasAgg``), not ``pyplot``: no global backend switch for the caller's process, and no
figure registry to leak memory across many plots. Non-finite values (NaN = a target never
reached, inf = diverged) are left out of means and bands instead of poisoning them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["aggregate_curves", "curve_figure", "bar_figure", "heatmap_figure", "scaling_figure"]

DPI = 110


def _save(fig: Figure, path: Path) -> bool:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return True


def _floats(values: Sequence) -> np.ndarray:
    # JSON may hold null for a missing point; dtype=float turns None into NaN.
    return np.asarray(list(values), dtype=float).reshape(-1)


def _nanstats(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stack = np.where(np.isfinite(stack), stack, np.nan)
    with warnings.catch_warnings():  # an all-NaN column is expected (e.g. every seed diverged)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stack, 0), np.nanmin(stack, 0), np.nanmax(stack, 0)


def aggregate_curves(curves: Sequence[Mapping]) -> tuple[np.ndarray, ...] | None:
    """Mean and min-max band over seeds of one curve: ``(x, mean, low, high)``, or None if empty.

    Args:
        curves: one ``{"x": [...], "y": [...]}`` per seed. When the seeds share ``x`` the points
            are used as they are; otherwise each curve is linearly interpolated onto the union of
            x values inside the range all curves cover.
    """
    pairs = []
    for c in curves:
        x, y = _floats(c.get("x", ())), _floats(c.get("y", ()))
        keep = np.isfinite(x)
        if keep.any() and len(x) == len(y):
            pairs.append((x[keep], y[keep]))
    if not pairs:
        return None
    if all(len(x) == len(pairs[0][0]) and np.array_equal(x, pairs[0][0]) for x, _ in pairs):
        x = pairs[0][0]
        stack = np.stack([y for _, y in pairs])
    else:
        lo = max(x.min() for x, _ in pairs)
        hi = min(x.max() for x, _ in pairs)
        if lo > hi:  # no common x range: averaging would invent data
            return None
        x = np.unique(np.concatenate([x for x, _ in pairs]))
        x = x[(x >= lo) & (x <= hi)]
        stack = np.stack([np.interp(x, *_sorted(xx, yy)) for xx, yy in pairs])
    return (x, *_nanstats(stack))


def _sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


# Every optimizer gets its own line style as well as its own color: two equal curves (fogo and
# fogo-nomem where the memory never acts) would otherwise show as one line.
LINE_STYLES = ("-", "--", "-.", ":")


def curve_figure(path: Path, name: str, per_optimizer: Mapping[str, Sequence[Mapping]]) -> bool:
    """One curve, one line per optimizer (mean over seeds) with its min-max band.

    Lines cycle through :data:`LINE_STYLES`, and a line equal to one drawn before it says so in
    the legend (``"b (n=2, same as a)"``), so no optimizer disappears under another.

    Args:
        path: PNG to write.
        name: curve name (the title).
        per_optimizer: optimizer -> that optimizer's curves of this name, one per seed.
    """
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    xlabel = ylabel = ""
    drawn, positive = False, True
    shown: dict[str, tuple[np.ndarray, ...]] = {}
    for opt, curves in per_optimizer.items():
        agg = aggregate_curves(curves)
        if agg is None or not np.isfinite(agg[1]).any():  # e.g. every seed diverged at once
            continue
        x, mean, low, high = agg
        same = [
            o
            for o, prev in shown.items()
            if all(np.array_equal(u, v, equal_nan=True) for u, v in zip(prev, agg, strict=True))
        ]
        shown[opt] = agg
        label = f"{opt} (n={len(curves)}" + (f", same as {same[0]})" if same else ")")
        style = LINE_STYLES[(len(shown) - 1) % len(LINE_STYLES)]
        line = ax.plot(x, mean, style, label=label)[0]
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        finite = mean[np.isfinite(mean)]
        positive &= bool(finite.size) and bool((finite > 0).all())
        drawn = True
        xlabel = xlabel or curves[0].get("xlabel", "")
        ylabel = ylabel or curves[0].get("ylabel", "")
    if not drawn:
        return False
    lines = [ln.get_ydata() for ln in ax.get_lines()]
    finite = np.concatenate([np.asarray(v, float)[np.isfinite(v)] for v in lines])
    # Losses often span decades; a log axis keeps the late differences visible.
    if positive and finite.size and finite.max() / finite.min() > 100:
        ax.set_yscale("log")
    ax.set(title=name, xlabel=xlabel, ylabel=ylabel or name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bar_figure(
    path: Path, metric: str, goal: str, stats: Mapping[str, tuple[float, float, int, int]]
) -> bool:
    """Bar chart of a metric: mean with a ±std error bar per optimizer.

    Args:
        path: PNG to write.
        metric, goal: the metric's name and ``"max"``/``"min"`` goal (shown in the title).
        stats: optimizer -> ``(mean, std, reached, n)``; an optimizer with no finite value gets an
            empty slot labelled ``0/n``.
    """
    if not stats:
        return False
    fig = Figure(figsize=(max(4.0, 1.1 * len(stats) + 2), 3.8))
    ax = fig.add_subplot()
    names = list(stats)
    means = np.array([stats[o][0] for o in names], dtype=float)
    stds = np.array([stats[o][1] for o in names], dtype=float)
    ok = np.isfinite(means)
    pos = np.arange(len(names))
    ax.bar(pos[ok], means[ok], yerr=np.nan_to_num(stds[ok]), capsize=4, color="tab:blue")
    labels = [
        o if stats[o][2] == stats[o][3] else f"{o}\n({stats[o][2]}/{stats[o][3]})" for o in names
    ]
    ax.set_xticks(pos, labels, fontsize=8)
    better = "higher" if goal == "max" else "lower"
    ax.set(title=f"{metric} ({better} is better; mean ± std over seeds)", ylabel=metric)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def heatmap_figure(path: Path, matrices: Mapping[str, np.ndarray]) -> bool:
    """Accuracy matrices ``R[i, j]`` (rows: after training task i; columns: task j evaluated).

    Args:
        path: PNG to write.
        matrices: optimizer -> its seed-averaged ``T x T`` matrix; one panel each, shared scale.
    """
    mats = {o: np.asarray(m, float) for o, m in matrices.items() if np.asarray(m).ndim == 2}
    if not mats:
        return False
    finite = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = Figure(figsize=(3.4 * len(mats) + 1.0, 3.6), layout="constrained")
    axes = [fig.add_subplot(1, len(mats), i + 1) for i in range(len(mats))]
    image = None
    for k, (ax, (opt, m)) in enumerate(zip(axes, mats.items(), strict=True)):
        image = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set(title=opt, xlabel="evaluated on task j")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        if k == 0:
            ax.set_ylabel("after training task i")
        if m.shape[0] <= 10:  # numbers stay readable up to 10 x 10
            for (i, j), v in np.ndenumerate(m):
                if np.isfinite(v):
                    # viridis is light at the top: dark text there, white below.
                    light = (v - vmin) > 0.6 * (vmax - vmin)
                    color = "black" if light else "white"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=axes, shrink=0.8)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # equal-aspect panels overflow
    return True


def scaling_figure(
    path: Path,
    task: str,
    goals: Mapping[str, str],
    values: Mapping[str, Mapping[float, Mapping[str, Sequence[float]]]],
) -> bool:
    """Each metric versus batch size, one line per optimizer (mean ± std over seeds).

    Args:
        path: PNG to write.
        task: task name (the title).
        goals: metric -> ``"max"``/``"min"``; one panel per metric, in this order.
        values: optimizer -> batch size -> metric -> the seeds' values.
    """
    if not goals or not values:
        return False
    fig = Figure(figsize=(4.2 * len(goals), 3.6))
    drawn = False
    for k, (metric, goal) in enumerate(goals.items()):
        ax = fig.add_subplot(1, len(goals), k + 1)
        for opt, by_bs in values.items():
            bs = sorted(by_bs)
            stats = []
            for b in bs:
                v = _floats(by_bs[b].get(metric, ()))
                v = v[np.isfinite(v)]
                std = float(v.std(ddof=1)) if v.size > 1 else 0.0
                stats.append((float(v.mean()), std) if v.size else (np.nan, np.nan))
            mean, std = np.array(stats, dtype=float).reshape(-1, 2).T
            if np.isfinite(mean).any():
                ax.errorbar(bs, mean, yerr=np.nan_to_num(std), marker="o", capsize=3, label=opt)
                drawn = True
        ax.set_xscale("log", base=2)
        ax.set(title=f"{metric} ({goal})", xlabel="batch size", ylabel=metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
            ax.legend(fontsize=8)
    if not drawn:
        return False
    fig.suptitle(f"{task}: metrics vs batch size")
    return _save(fig, path)
