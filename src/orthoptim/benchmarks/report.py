"""Markdown report and figures from stored run records (see :mod:`orthoptim.benchmarks.results`).

:func:`summarize` groups records by ``label`` (one table each, first-seen order) and, per
optimizer and metric, gives n, mean and std (ddof=1; 0 for one value) over the *finite* values.
A non-finite metric (NaN: e.g. a loss target never reached; inf: diverged) counts as not reached:
the table shows "mean over reached (k/n reached)".

Winner. Optimizers are ranked by reach fraction first and then by mean in the metric's goal
direction, so one that reaches a target in 5/5 seeds ranks above one with a better mean over 2/5.

Significance. The winner is compared with every other optimizer over the finite values: a paired
t-test (``scipy.stats.ttest_rel``) when both ran the same set of seeds (pairs where either value
is non-finite are dropped), otherwise Welch's test (``ttest_ind(equal_var=False)``); fewer than
two values (pairs) on a side gives "no test". The interval is the ``1 - alpha`` t confidence
interval of the mean difference winner - other (paired: of the per-seed differences; Welch: with
the Welch-Satterthwaite degrees of freedom). Zero variance is handled before scipy, which would
warn and return NaN: identical values give p = 1; a difference that is the same in every seed
gives p = 0 (the t statistic is infinite; the limit of the test as the spread goes to 0) with an
explicit note, since such a result usually means the seed changes nothing.

:func:`render_report` writes ``report.md`` and PNGs under ``figures/`` (drawn by
:mod:`orthoptim.benchmarks.report_plots`).

Identical results. Two optimizers of a group whose every metric is equal in every seed (the same
seeds) are listed under "Identical results" (:func:`identical_pairs`): the report says whether
their curves are equal too (then the runs made the same updates, and what distinguishes the two
optimizers had no effect on the task) or differ (the updates differed, too little to change any
metric), and shows each one's end-of-run memory diagnostics when the runner recorded them
(FOGO's ``memory_stats()``), the usual reason for fogo and fogo-nomem to match. The curve
figures draw every optimizer with its own line style, so a curve is never hidden under another.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from orthoptim.benchmarks.results import validate_record

__all__ = [
    "MetricStats",
    "Comparison",
    "Verdict",
    "GroupSummary",
    "Identical",
    "identical_pairs",
    "compare",
    "summarize",
    "render_report",
]


@dataclass(frozen=True)
class MetricStats:
    """One optimizer's metric in one group.

    Attributes:
        n: runs; reached: finite values among them; mean, std: over the finite values (NaN when
        none; std 0 for one); values, seeds: per run, in record order (non-finite kept).
    """

    n: int
    reached: int
    mean: float
    std: float
    values: tuple[float, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Comparison:
    """Winner versus one other optimizer on one metric.

    Attributes:
        other: the other optimizer. test: ``"paired t"``, ``"Welch t"`` or ``"no test"``.
        p_value: two-sided p (None without a test). diff: mean difference winner - other.
        ci: ``(low, high)`` confidence interval of ``diff`` (None without a test).
        n: values (pairs) used on each side. note: why there is no test, or a caveat.
    """

    other: str
    test: str
    p_value: float | None
    diff: float
    ci: tuple[float, float] | None
    n: tuple[int, int]
    note: str = ""


@dataclass(frozen=True)
class Verdict:
    """The outcome on one metric: ``significant`` is None when there is nothing to test."""

    metric: str
    goal: str
    winner: str | None
    runner_up: str | None
    comparisons: dict[str, Comparison]
    significant: bool | None
    text: str


@dataclass
class GroupSummary:
    """One table: records sharing a ``label``.

    Attributes:
        label, task, family: the group and its task. primary_metric: the first record's.
        optimizers: in first-seen order. goals: metric -> goal (primary first).
        stats: optimizer -> metric -> :class:`MetricStats`. verdicts: metric -> :class:`Verdict`.
        records: the group's records, in file order.
    """

    label: str
    task: str
    family: str
    primary_metric: str
    optimizers: list[str]
    goals: dict[str, str]
    stats: dict[str, dict[str, MetricStats]]
    verdicts: dict[str, Verdict]
    records: list[dict[str, Any]] = field(repr=False)


@dataclass(frozen=True)
class Identical:
    """Two optimizers of a group with equal values of every metric in every seed.

    Attributes:
        a, b: the optimizers (first-seen order). seeds: the seeds they share.
        curve_diff: curve name -> max |a - b| over seeds and points (0.0: equal curves; NaN when
            the curves cannot be compared point by point).
    """

    a: str
    b: str
    seeds: tuple[int, ...]
    curve_diff: dict[str, float]

    @property
    def same_curves(self) -> bool:
        return all(d == 0.0 for d in self.curve_diff.values())


def _same(x: Any, y: Any) -> bool:
    # NaN (a target never reached) in both runs counts as the same outcome.
    return bool(x == y or (isinstance(x, float) and isinstance(y, float) and x != x and y != y))


def _curve_gap(ca: Mapping[str, Any], cb: Mapping[str, Any]) -> float:
    xa, ya = np.asarray(ca.get("x", ()), float), np.asarray(ca.get("y", ()), float)
    xb, yb = np.asarray(cb.get("x", ()), float), np.asarray(cb.get("y", ()), float)
    if xa.shape != xb.shape or ya.shape != yb.shape or not np.array_equal(xa, xb, equal_nan=True):
        return math.nan
    both_nan = np.isnan(ya) & np.isnan(yb)
    gap = np.where(both_nan, 0.0, np.abs(ya - yb))
    return float(np.nan_to_num(gap, nan=math.inf).max()) if gap.size else 0.0


def identical_pairs(g: GroupSummary) -> list[Identical]:
    """Pairs of optimizers in ``g`` that ran the same seeds and got every metric equal in each.

    Args:
        g: one group of :func:`summarize`.
    """
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in g.records:
        runs.setdefault(r["optimizer"], {})[r["seed"]] = r
    counts = {o: sum(r["optimizer"] == o for r in g.records) for o in g.optimizers}
    out = []
    for i, a in enumerate(g.optimizers):
        for b in g.optimizers[i + 1 :]:
            ra, rb = runs[a], runs[b]
            if set(ra) != set(rb) or counts[a] != len(ra) or counts[b] != len(rb):
                continue  # not the same seeds, or a seed run twice: nothing to pair
            seeds = tuple(sorted(ra))
            if not all(
                _same(ra[s]["metrics"].get(m, math.nan), rb[s]["metrics"].get(m, math.nan))
                for s in seeds
                for m in g.goals
            ):
                continue
            gaps: dict[str, float] = {}
            for s in seeds:
                ca, cb = ra[s]["curves"], rb[s]["curves"]
                for c in dict.fromkeys([*ca, *cb]):
                    gap = _curve_gap(ca[c], cb[c]) if c in ca and c in cb else math.nan
                    gaps[c] = max(gaps.get(c, 0.0), gap) if not math.isnan(gap) else math.nan
            out.append(Identical(a, b, seeds, gaps))
    return out


def _memory_note(g: GroupSummary, opt: str) -> str | None:
    """``opt``'s end-of-run memory diagnostics over the group's seeds, or None if not recorded."""
    stats = [
        r["extra"]["optimizer_stats"]["memory"]
        for r in g.records
        if r["optimizer"] == opt and "memory" in r["extra"].get("optimizer_stats", {})
    ]
    if not stats:
        return None

    def span(key: str) -> str:
        v = [float(s.get(key, math.nan)) for s in stats]
        lo, hi = min(v), max(v)
        return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"

    return (
        f"{opt}'s memory at the end of its {len(stats)} run(s): {span('writes')} writes, "
        f"{span('entries_used')} entries; last step: {span('conflicts')} conflicts of "
        f"{span('ready')} protecting entries, correction ratio {span('correction_ratio')}"
    )


def _identical_lines(g: GroupSummary) -> list[str]:
    pairs = identical_pairs(g)
    if not pairs:
        return []
    lines = ["", "Identical results:", ""]
    for p in pairs:
        text = f"`{_md(p.a)}` and `{_md(p.b)}`: every metric equal in every seed {list(p.seeds)}"
        if p.same_curves:
            text += (
                " and every curve too: the runs made the same updates, so what distinguishes the"
                " two optimizers had no effect on this task"
            )
        else:
            diffs = ", ".join(
                f"`{c}` " + ("not comparable" if math.isnan(d) else f"max |Δ| {fmt(d)}")
                for c, d in p.curve_diff.items()
                if d != 0.0
            )
            text += (
                f"; the curves differ ({diffs}): the updates differed, too little to change any"
                " metric"
            )
        notes = [n for n in (_memory_note(g, p.a), _memory_note(g, p.b)) if n]
        lines.append(f"- {text}." + "".join(f" {_md(n)}." for n in notes))
    return lines


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return a[np.isfinite(a)]


def _stats(values: list[float], seeds: list[int]) -> MetricStats:
    v = _finite(values)
    mean = float(v.mean()) if v.size else math.nan
    std = float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else math.nan)
    return MetricStats(len(values), int(v.size), mean, std, tuple(values), tuple(seeds))


def _flat(d: float, sd: float, scale: float) -> bool:
    # Zero spread up to rounding: scipy would warn about cancellation and give NaN or inf.
    return sd <= 1e-12 * max(scale, abs(d))


def _degenerate(other: str, diff: float, scale: float, n: tuple[int, int], what: str):
    if abs(diff) <= 1e-12 * scale:
        return Comparison(other, what, 1.0, 0.0, (0.0, 0.0), n, "identical values in every seed")
    note = "zero variance: the same difference in every seed, t is infinite (p=0)"
    return Comparison(other, what, 0.0, diff, (diff, diff), n, note)


def compare(a: MetricStats, b: MetricStats, other: str, level: float = 0.95) -> Comparison:
    """Test ``a`` (the winner) against ``b``.

    Args:
        a, b: the two optimizers' stats on one metric.
        other: ``b``'s optimizer name (recorded in the result).
        level: confidence level of the interval, in (0, 1).
    """
    if not 0 < level < 1:
        raise ValueError(f"Invalid level: {level!r}; expected 0 < level < 1")
    q = 0.5 + level / 2
    paired = (
        len(set(a.seeds)) == len(a.seeds)
        and len(set(b.seeds)) == len(b.seeds)
        and set(a.seeds) == set(b.seeds)
    )
    if paired:
        bv = dict(zip(b.seeds, b.values, strict=True))
        pairs = [(x, bv[s]) for s, x in zip(a.seeds, a.values, strict=True)]
        pairs = np.array([p for p in pairs if np.isfinite(p).all()], dtype=float).reshape(-1, 2)
        n = len(pairs)
        if n < 2:
            return Comparison(other, "no test", None, math.nan, None, (n, n), f"{n} paired seed(s)")
        d = pairs[:, 0] - pairs[:, 1]
        diff, sd = float(d.mean()), float(d.std(ddof=1))
        scale = float(np.abs(pairs).max())
        if _flat(diff, sd, scale):
            return _degenerate(other, diff, scale, (n, n), "paired t")
        p = float(sps.ttest_rel(pairs[:, 0], pairs[:, 1]).pvalue)
        half = float(sps.t.ppf(q, n - 1)) * sd / math.sqrt(n)
        return Comparison(other, "paired t", p, diff, (diff - half, diff + half), (n, n))
    x, y = _finite(a.values), _finite(b.values)
    n = (len(x), len(y))
    if min(n) < 2:
        return Comparison(other, "no test", None, math.nan, None, n, "fewer than 2 values")
    diff = float(x.mean() - y.mean())
    va, vb = float(x.var(ddof=1)) / n[0], float(y.var(ddof=1)) / n[1]
    scale = float(max(np.abs(x).max(), np.abs(y).max()))
    if _flat(diff, math.sqrt(va + vb), scale):
        return _degenerate(other, diff, scale, n, "Welch t")
    p = float(sps.ttest_ind(x, y, equal_var=False).pvalue)
    df = (va + vb) ** 2 / (va**2 / (n[0] - 1) + vb**2 / (n[1] - 1))
    half = float(sps.t.ppf(q, df)) * math.sqrt(va + vb)
    return Comparison(other, "Welch t", p, diff, (diff - half, diff + half), n)


def _rank(stats: dict[str, MetricStats], goal: str) -> list[str]:
    sign = -1.0 if goal == "max" else 1.0

    def key(opt):
        s = stats[opt]
        return (-s.reached / s.n, sign * s.mean if s.reached else math.inf)

    return sorted(stats, key=key)  # stable: ties keep first-seen order


def fmt(x: float | None) -> str:
    """A number for the report: 4 significant digits; ``n/a`` for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}"


def _verdict(metric: str, goal: str, stats: dict[str, MetricStats], alpha: float) -> Verdict:
    ranked = [o for o in _rank(stats, goal) if stats[o].reached]
    if not ranked:
        return Verdict(metric, goal, None, None, {}, None, "no finite values")
    w = ranked[0]
    comps = {o: compare(stats[w], stats[o], o, 1 - alpha) for o in stats if o != w}
    if len(ranked) < 2:
        alone = "only optimizer" if len(stats) == 1 else "only optimizer with finite values"
        return Verdict(metric, goal, w, None, comps, None, f"{w} ({alone}; no comparison)")
    r, c = ranked[1], comps[ranked[1]]
    reach = ""
    if stats[w].reached != stats[w].n or stats[r].reached != stats[r].n:
        reach = (
            f"; reached {stats[w].reached}/{stats[w].n} vs {stats[r].reached}/{stats[r].n},"
            " tested over reached values"
        )
    if c.p_value is None:
        text = f"{w} best, no test vs {r} ({c.note}){reach}"
        return Verdict(metric, goal, w, r, comps, None, text)
    ci = f"{w}−{r} = {fmt(c.diff)}, {round(100 * (1 - alpha))}% CI [{fmt(c.ci[0])}, {fmt(c.ci[1])}]"
    detail = f"{c.test}, n={c.n[0]}" + (f"; {c.note}" if c.note else "") + reach
    p = f"p={c.p_value:.2g}"
    significant = c.p_value < alpha
    if significant:
        text = f"{w} best ({p} vs runner-up {r}; {ci}; {detail})"
    else:
        text = f"{w} best, not significant vs {r} ({p}; {ci}; {detail})"
    return Verdict(metric, goal, w, r, comps, significant, text)


def summarize(records: Sequence[dict[str, Any]], alpha: float = 0.05) -> list[GroupSummary]:
    """Group records by ``label`` and compute per-optimizer statistics and verdicts.

    Args:
        records: run records (each is validated; see ``results.FIELDS``).
        alpha: significance level of the tests, in (0, 1); intervals are ``1 - alpha``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"Invalid alpha: {alpha!r}; expected 0 < alpha < 1")
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, r in enumerate(records):
        try:
            validate_record(r)
        except ValueError as e:
            raise ValueError(f"Invalid records[{i}]: {e}") from e
        groups.setdefault(r["label"], []).append(r)
    out = []
    for label, recs in groups.items():
        primary = recs[0]["primary_metric"]
        goals: dict[str, str] = {primary: recs[0]["metric_goals"][primary]}
        for r in recs:
            for m, g in r["metric_goals"].items():
                if goals.setdefault(m, g) != g:
                    raise ValueError(
                        f"Invalid records: metric {m!r} in group {label!r} has goals "
                        f"{goals[m]!r} and {g!r}"
                    )
        by_opt: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            by_opt.setdefault(r["optimizer"], []).append(r)
        stats = {
            opt: {
                # A metric a run did not report counts as not reached (NaN).
                m: _stats([r["metrics"].get(m, math.nan) for r in rs], [r["seed"] for r in rs])
                for m in goals
            }
            for opt, rs in by_opt.items()
        }
        verdicts = {
            m: _verdict(m, g, {o: stats[o][m] for o in by_opt}, alpha) for m, g in goals.items()
        }
        first = recs[0]
        out.append(
            GroupSummary(
                label,
                first["task"],
                first["family"],
                primary,
                list(by_opt),
                goals,
                stats,
                verdicts,
                recs,
            )
        )
    return out


def slug(text: str) -> str:
    """``text`` made file-name safe: ``"large-batch/bs1024"`` -> ``"large-batch_bs1024"``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "group"


def canonical(obj: Any) -> str:
    """Compact, key-sorted JSON (used to show and compare settings / hparams)."""
    return json.dumps(obj, sort_keys=True, separators=(", ", ": "))


def _md(text: Any) -> str:
    # A pipe would split a table cell.
    return str(text).replace("|", "\\|")


def _cell(s: MetricStats, best: bool) -> str:
    if not s.reached:
        return f"n/a (0/{s.n} reached)"
    text = f"{fmt(s.mean)} ± {fmt(s.std)}"
    if best:
        text = f"**{text}**"
    return text if s.reached == s.n else f"{text} ({s.reached}/{s.n} reached)"


def _environment_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    envs: dict[str, int] = {}
    for r in records:
        key = canonical(r["environment"])
        envs[key] = envs.get(key, 0) + 1
    lines = ["## Environment", ""]
    if len(envs) > 1:
        lines += [f"Runs came from {len(envs)} different environments:", ""]
    for key, count in envs.items():
        env = json.loads(key)
        if len(envs) > 1:
            lines += [f"{count} run(s):", ""]
        lines += ["| | |", "|---|---|"]
        lines += [f"| {_md(k)} | {_md(v)} |" for k, v in env.items()] or ["| (none) | |"]
        lines.append("")
    return lines


def _group_figures(g: GroupSummary, fig_dir: Path, name: str) -> list[tuple[str, Path]]:
    from orthoptim.benchmarks import report_plots as P  # matplotlib only when rendering

    figs = []
    curve_names = list(dict.fromkeys(c for r in g.records for c in r["curves"]))
    for c in curve_names:
        per_opt = {
            o: [r["curves"][c] for r in g.records if r["optimizer"] == o and c in r["curves"]]
            for o in g.optimizers
        }
        path = fig_dir / f"{name}__curve_{slug(c)}.png"
        if P.curve_figure(path, f"{g.label}: {c}", {o: v for o, v in per_opt.items() if v}):
            figs.append((f"curve `{c}`", path))
    m = g.primary_metric
    bars = {o: (s.mean, s.std, s.reached, s.n) for o, s in ((o, g.stats[o][m]) for o in g.stats)}
    path = fig_dir / f"{name}__bar_{slug(m)}.png"
    if P.bar_figure(path, m, g.goals[m], bars):
        figs.append((f"primary metric `{m}`", path))
    mats = {}
    for o in g.optimizers:
        rs = [
            np.asarray(r["extra"]["R"], float)
            for r in g.records
            if r["optimizer"] == o and "R" in r["extra"]
        ]
        if rs and all(x.ndim == 2 and x.shape == rs[0].shape for x in rs):
            mats[o] = np.mean(rs, axis=0)
    path = fig_dir / f"{name}__R.png"
    if mats and P.heatmap_figure(path, mats):
        figs.append(("accuracy matrix R (mean over seeds)", path))
    return figs


def _scaling_figures(groups: list[GroupSummary], fig_dir: Path) -> list[tuple[str, Path]]:
    from orthoptim.benchmarks import report_plots as P

    tasks: dict[str, dict] = {}
    goals: dict[str, dict[str, str]] = {}
    for g in groups:
        for r in g.records:
            bs = r["settings"].get("batch_size", r["extra"].get("batch_size"))
            if r["family"] != "large-batch" or isinstance(bs, bool) or not isinstance(bs, int):
                continue
            goals.setdefault(r["task"], {}).update(g.goals)
            per = tasks.setdefault(r["task"], {}).setdefault(r["optimizer"], {})
            for metric, v in r["metrics"].items():
                per.setdefault(bs, {}).setdefault(metric, []).append(v)
    figs = []
    for task, values in tasks.items():
        path = fig_dir / f"scaling__{slug(task)}.png"
        if P.scaling_figure(path, task, goals[task], values):
            figs.append((f"`{task}`: each metric vs batch size", path))
    return figs


def render_report(
    records: Sequence[dict[str, Any]],
    out_dir: str | Path,
    title: str = "orthoptim benchmark report",
    command: str | None = None,
    alpha: float = 0.05,
) -> Path:
    """Write ``out_dir/report.md`` and its figures under ``out_dir/figures/``; return the path.

    Args:
        records: run records (e.g. ``ResultStore(out_dir).records()``); must not be empty.
        out_dir: output folder (created if missing).
        title: the report's heading.
        command: the command line that produced the runs, shown verbatim if given.
        alpha: significance level, in (0, 1), as in :func:`summarize`.
    """
    if not records:
        raise ValueError("Invalid records: empty; nothing to report")
    groups = summarize(records, alpha)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [
        f"{len(records)} runs in {len(groups)} groups. Cells are mean ± std over seeds "
        "(ddof=1), best in bold; a non-finite value counts as not reached and the mean is over "
        f"the reached runs. Tests: paired t when both optimizers ran the same seeds, else Welch; "
        f"significant means p < {alpha}.",
        "",
        "## Overview",
        "",
        "| group | primary metric | winner | significant |",
        "|---|---|---|---|",
    ]
    for g in groups:
        v = g.verdicts[g.primary_metric]
        sig = {True: "yes", False: "no", None: "n/a"}[v.significant]
        goal = "↑" if v.goal == "max" else "↓"
        winner = _md(v.winner or "n/a")
        lines.append(f"| {_md(g.label)} | {_md(v.metric)} {goal} | {winner} | {sig} |")
    lines.append("")
    names: set[str] = set()
    for g in groups:
        name = base = slug(g.label)
        k = 1
        while name in names:  # two labels can share a slug ("a/b" and "a_b")
            k += 1
            name = f"{base}-{k}"
        names.add(name)
        lines += _group_section(g, _group_figures(g, fig_dir, name), out)
    scaling = _scaling_figures(groups, fig_dir)
    if scaling:
        lines += ["## Large-batch scaling", ""]
        lines += [f"![{cap}]({p.relative_to(out).as_posix()})" for cap, p in scaling] + [""]
    lines += _environment_lines(records)
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def _group_section(g: GroupSummary, figs: list[tuple[str, Path]], out: Path) -> list[str]:
    seeds = sorted({r["seed"] for r in g.records})
    presets = sorted({str(r["preset"]) for r in g.records})
    lines = [
        f"## {g.label}",
        "",
        f"Task `{g.task}` (family `{g.family}`), preset {', '.join(presets)}, seeds {seeds}.",
        "",
    ]
    head = [f"{_md(m)} {'↑' if goal == 'max' else '↓'}" for m, goal in g.goals.items()]
    lines += ["| optimizer | n | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for o in g.optimizers:
        cells = [_cell(g.stats[o][m], g.verdicts[m].winner == o) for m in g.goals]
        n = max(s.n for s in g.stats[o].values())
        lines.append(f"| {_md(o)} | {n} | " + " | ".join(cells) + " |")
    ungoaled = sorted({m for r in g.records for m in r["metrics"]} - set(g.goals))
    if ungoaled:
        lines += ["", f"Not tabulated (no goal in metric_goals): {', '.join(ungoaled)}."]
    lines += ["", "Verdicts:", ""]
    lines += [f"- `{m}`: {_md(v.text)}" for m, v in g.verdicts.items()]
    lines += _identical_lines(g)
    settings = list(dict.fromkeys(canonical(r["settings"]) for r in g.records))
    lines += ["", "Settings" + (f" ({len(settings)} variants)" if len(settings) > 1 else "") + ":"]
    lines += ["", *(f"- `{s}`" for s in settings), "", "Hyperparameters:", ""]
    lines += ["| optimizer | source | hparams |", "|---|---|---|"]
    for o in g.optimizers:
        used = dict.fromkeys(
            (r["hparams_source"], canonical(r["hparams"])) for r in g.records if r["optimizer"] == o
        )
        lines += [f"| {_md(o)} | {_md(src)} | `{_md(h)}` |" for src, h in used]
    lines.append("")
    for cap, p in figs:
        lines += [f"![{cap}]({p.relative_to(out).as_posix()})", ""]
    return lines
