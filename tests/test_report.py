"""The report: summary statistics, test choice and p-values against scipy, NaN reach, rendering."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from orthoptim.benchmarks.report import render_report, summarize
from orthoptim.benchmarks.report_plots import aggregate_curves
from orthoptim.benchmarks.results import make_record

GOALS = {"acc": "max", "steps": "min"}


def rec(opt, seed, label="continual-permuted", goals=None, **over):
    """A valid record; metrics come in ``over["metrics"]`` (default: acc only)."""
    goals = goals or GOALS
    metrics = over.pop("metrics", {"acc": 0.5})
    kw = dict(
        task=label.split("/")[0],
        family="continual",
        label=label,
        settings={"steps": 10},
        optimizer=opt,
        hparams={"lr": 0.1},
        hparams_source="defaults",
        seed=seed,
        metrics=metrics,
        metric_goals={m: goals[m] for m in metrics if m in goals},
        primary_metric=next(iter(metrics)),
        started="2026-01-01T00:00:00",
        finished="2026-01-01T00:00:01",
        wall_seconds=1.0,
        env={"python": "3.11", "torch": "2.13"},
    )
    kw.update(over)
    return make_record(**kw)


def table(values: dict[str, list[float]], seeds=None, metric="acc"):
    """Records of one group: optimizer -> per-seed values of ``metric``."""
    out = []
    for opt, vals in values.items():
        for s, v in zip(seeds.get(opt) if seeds else range(len(vals)), vals, strict=True):
            out.append(rec(opt, s, metrics={metric: v}))
    return out


def test_summary_numbers_hand_computed():
    (g,) = summarize(table({"fogo": [0.8, 0.9, 1.0], "adamw": [0.5, 0.7, 0.6]}))
    assert g.label == "continual-permuted" and g.optimizers == ["fogo", "adamw"]
    f, a = g.stats["fogo"]["acc"], g.stats["adamw"]["acc"]
    assert (
        (f.n, f.reached) == (3, 3) and f.mean == pytest.approx(0.9) and f.std == pytest.approx(0.1)
    )
    assert a.mean == pytest.approx(0.6) and a.std == pytest.approx(0.1)
    v = g.verdicts["acc"]
    assert (v.winner, v.runner_up) == ("fogo", "adamw")
    # paired differences 0.3, 0.2, 0.4: mean 0.3, sd 0.1, t = 0.3 / (0.1 / sqrt 3) = 5.196
    c = v.comparisons["adamw"]
    assert c.test == "paired t" and c.diff == pytest.approx(0.3)
    half = sps.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert c.ci == pytest.approx((0.3 - half, 0.3 + half))
    assert c.p_value == pytest.approx(2 * sps.t.sf(0.3 / (0.1 / math.sqrt(3)), 2))
    assert v.significant is True and v.text.startswith("fogo best (p=0.035 vs runner-up adamw")


def test_paired_pairs_by_seed_and_matches_scipy():
    f, a = [0.71, 0.74, 0.69, 0.80], [0.70, 0.69, 0.68, 0.71]
    recs = table({"fogo": f})
    # adamw's runs arrive in another seed order: pairing must follow the seed, not the position
    order = [2, 0, 3, 1]
    recs += [rec("adamw", s, metrics={"acc": a[s]}) for s in order]
    c = summarize(recs)[0].verdicts["acc"].comparisons["adamw"]
    assert c.test == "paired t" and c.n == (4, 4)
    assert c.p_value == sps.ttest_rel(f, a).pvalue
    assert c.p_value != pytest.approx(sps.ttest_ind(f, a, equal_var=False).pvalue)


def test_welch_when_seed_sets_differ_and_matches_scipy():
    f, a = [0.71, 0.74, 0.69, 0.80], [0.60, 0.69, 0.68]
    (g,) = summarize(
        table({"fogo": f, "adamw": a}, seeds={"fogo": [0, 1, 2, 3], "adamw": [4, 5, 6]})
    )
    c = g.verdicts["acc"].comparisons["adamw"]
    assert c.test == "Welch t" and c.n == (4, 3)
    assert c.p_value == sps.ttest_ind(f, a, equal_var=False).pvalue
    va, vb = np.var(f, ddof=1) / 4, np.var(a, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = np.mean(f) - np.mean(a)
    assert c.ci == pytest.approx((diff - half, diff + half))
    # a repeated seed makes the pairing ambiguous: Welch too
    recs = table({"fogo": [0.7, 0.8], "adamw": [0.5, 0.6]}, seeds={"fogo": [0, 0], "adamw": [0, 1]})
    assert summarize(recs)[0].verdicts["acc"].comparisons["adamw"].test == "Welch t"


def test_nan_counts_as_not_reached():
    recs = table({"fogo": [10.0, math.nan, 20.0], "adamw": [30.0, 40.0, 50.0]}, metric="steps")
    (g,) = summarize(recs)
    s = g.stats["fogo"]["steps"]
    assert (s.n, s.reached) == (3, 2) and s.mean == 15.0 and s.std == pytest.approx(50**0.5)
    v = g.verdicts["steps"]
    # fogo's mean is lower (better), but adamw reaches the target in every seed
    assert (v.winner, v.runner_up) == ("adamw", "fogo")
    assert "reached 3/3 vs 2/3" in v.text
    assert v.comparisons["fogo"].p_value == sps.ttest_rel([30, 50], [10, 20]).pvalue
    (g,) = summarize(table({"fogo": [math.nan, math.nan]}, metric="steps"))
    st = g.stats["fogo"]["steps"]
    assert st.reached == 0 and math.isnan(st.mean) and g.verdicts["steps"].winner is None


def test_no_test_below_two_values_and_zero_variance():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constant samples must not reach scipy's warnings
        v = summarize(table({"fogo": [0.9], "adamw": [0.8]}))[0].verdicts["acc"]
        assert v.winner == "fogo" and v.significant is None and "no test" in v.text
        v = summarize(table({"fogo": [0.9, 0.9], "adamw": [0.9, 0.9]}))[0].verdicts["acc"]
        c = v.comparisons["adamw"]
        assert (c.p_value, c.diff, v.significant) == (1.0, 0.0, False) and "identical" in c.note
        v = summarize(table({"fogo": [0.9, 0.8], "adamw": [0.7, 0.6]}))[0].verdicts["acc"]
        c = v.comparisons["adamw"]
        assert c.test == "paired t" and c.p_value == 0.0 and c.ci == pytest.approx((0.2, 0.2))
        assert v.significant is True and "zero variance" in v.text
        seeds = {"fogo": [0, 1], "adamw": [2, 3]}
        v = summarize(table({"fogo": [0.9, 0.9], "adamw": [0.7, 0.7]}, seeds))[0].verdicts["acc"]
        assert v.comparisons["adamw"].test == "Welch t" and v.comparisons["adamw"].p_value == 0.0


def test_not_significant_wording():
    (g,) = summarize(table({"fogo": [0.8, 0.6, 0.9], "adamw": [0.7, 0.7, 0.7]}))
    v = g.verdicts["acc"]
    p = sps.ttest_rel([0.8, 0.6, 0.9], [0.7, 0.7, 0.7]).pvalue
    assert v.significant is False and f"fogo best, not significant vs adamw (p={p:.2g}" in v.text


def test_bad_input_raises():
    good = rec("fogo", 0)
    with pytest.raises(ValueError, match=r"records\[1\].*missing field"):
        summarize([good, {k: v for k, v in good.items() if k != "seed"}])
    with pytest.raises(ValueError, match="'acc'.*goals"):
        summarize([good, rec("adamw", 0, goals={"acc": "min"})])
    with pytest.raises(ValueError, match="alpha"):
        summarize([good], alpha=1.5)
    with pytest.raises(ValueError, match="records"):
        render_report([], "unused")


def curve(y):
    return {"loss": {"x": [0, 10, 20], "y": y, "xlabel": "step", "ylabel": "loss"}}


def images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_render_report_tables_and_figures(tmp_path):
    recs = []
    for opt, base in (("fogo", 0.9), ("adamw", 0.6)):
        for s in range(3):
            acc = base + 0.1 * (s - 1)
            R = [[base, 0.1], [base - 0.2, base]]
            recs.append(
                rec(
                    opt,
                    s,
                    metrics={"acc": acc, "steps": [10.0, math.nan, 20.0][s] + (opt == "adamw")},
                    curves=curve([1.0, 0.5, 0.2 + s / 10]),
                    extra={"R": R},
                )
            )
            for bs in (256, 1024):
                recs.append(
                    rec(
                        opt,
                        s,
                        label=f"large-batch/bs{bs}",
                        family="large-batch",
                        settings={"batch_size": bs},
                        metrics={"acc": acc - bs / 1e4},
                    )
                )
    path = render_report(recs, tmp_path, title="T", command="orthoptim run --suite quick")
    md = path.read_text()
    assert path == tmp_path / "report.md" and md.startswith("# T\n")
    assert "orthoptim run --suite quick" in md and "| python | 3.11 |" in md
    assert "| continual-permuted | acc ↑ | fogo | yes |" in md
    assert "| large-batch/bs1024 | acc ↑ | fogo | yes |" in md
    assert "| fogo | 3 | **0.9 ± 0.1** | **15 ± 7.071** (2/3 reached) |" in md
    assert "| adamw | 3 | 0.6 ± 0.1 | 16 ± 7.071 (2/3 reached) |" in md
    assert '| fogo | defaults | `{"lr": 0.1}` |' in md and '`{"batch_size": 256}`' in md
    assert "- `acc`: fogo best (p=" in md
    links = images(md)
    names = {link.split("/")[-1] for link in links}
    assert {
        "continual-permuted__curve_loss.png",
        "continual-permuted__bar_acc.png",
        "continual-permuted__R.png",
        "large-batch_bs256__bar_acc.png",
        "scaling__large-batch.png",
    } <= names
    for link in links:
        f = tmp_path / link
        assert (
            f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 1000
        )


def test_render_robust_to_degenerate_groups(tmp_path):
    recs = [
        rec(
            "fogo",
            0,
            label="one-seed-one-opt",
            metrics={"acc": 0.5, "lr_used": 0.1},
            metric_goals={"acc": "max"},
        ),
        rec("fogo", 0, label="all-nan", metrics={"steps": math.nan}),
        rec("adamw", 0, label="all-nan", metrics={"steps": math.nan}),
        rec(
            "fogo",
            0,
            label="nan-curve",
            metrics={"acc": 0.1},
            curves=curve([math.nan] * 3),
            extra={"R": [[0.5]]},
        ),
        rec(
            "fogo",
            1,
            label="nan-curve",
            metrics={"acc": 0.2},
            curves={},
            extra={"R": [[0.5, 0.1], [0.2, 0.3]]},
        ),  # R shapes differ: no heatmap
        rec("fogo", 0, label="lb", family="large-batch", metrics={"acc": 0.1}),  # no batch size
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        md = render_report(recs, tmp_path).read_text()
    assert "| one-seed-one-opt | acc ↑ | fogo | n/a |" in md
    assert "fogo (only optimizer; no comparison)" in md
    assert "Not tabulated (no goal in metric_goals): lr_used." in md
    assert "| all-nan | steps ↓ | n/a | n/a |" in md and "n/a (0/1 reached)" in md
    assert "- `steps`: no finite values" in md
    assert "nan-curve__R.png" not in md and "nan-curve__curve" not in md
    assert "Large-batch scaling" not in md
    for link in images(md):
        assert (tmp_path / link).stat().st_size > 0


def test_aggregate_curves_interpolates_on_common_range():
    a = {"x": [0, 2, 4], "y": [0.0, 2.0, 4.0]}
    b = {"x": [1, 3, 5], "y": [10.0, 10.0, 10.0]}
    x, mean, lo, hi = aggregate_curves([a, b])
    assert list(x) == [1, 2, 3, 4]  # union of x inside [max start, min end]
    assert list(mean) == [5.5, 6.0, 6.5, 7.0] and list(lo) == [1, 2, 3, 4] and set(hi) == {10}
    assert aggregate_curves([{"x": [0, 1], "y": [1, 2]}, {"x": [2, 3], "y": [1, 2]}]) is None
    x, mean, lo, hi = aggregate_curves([a, {"x": [0, 2, 4], "y": [2.0, None, math.inf]}])
    assert list(mean) == [1.0, 2.0, 4.0]  # None and inf are skipped, not averaged in


def _pair(b_acc, b_loss, a="fogo", b="fogo-nomem", seeds=(0, 1)):
    recs = []
    for s in seeds:
        memory = {"writes": 12.0, "entries_used": 2.0, "ready": 2.0, "conflicts": float(s),
                  "correction_ratio": 0.1}  # fmt: skip
        recs.append(rec(a, s, metrics={"acc": 0.5 + s / 10}, curves=curve([1.0, 0.5, 0.2]),
                        extra={"optimizer_stats": {"memory": memory}}))  # fmt: skip
    for s in seeds:
        recs.append(rec(b, s, metrics={"acc": b_acc + s / 10}, curves=curve(b_loss)))
    recs += [rec("adamw", s, metrics={"acc": 0.3 + s / 10}) for s in seeds]
    return recs


def test_identical_optimizers_are_found_and_explained(tmp_path):
    from orthoptim.benchmarks.report import identical_pairs

    (g,) = summarize(_pair(0.5, [1.0, 0.5, 0.2]))
    (p,) = identical_pairs(g)  # adamw differs from both: no other pair
    assert (p.a, p.b, p.seeds, p.same_curves) == ("fogo", "fogo-nomem", (0, 1), True)
    md = render_report(_pair(0.5, [1.0, 0.5, 0.2]), tmp_path).read_text()
    assert "`fogo` and `fogo-nomem`: every metric equal in every seed [0, 1] and every curve" in md
    assert "fogo's memory at the end of its 2 run(s): 12 writes, 2 entries; last step: 0-1" in md

    (g,) = summarize(_pair(0.5, [1.0, 0.5, 0.25]))
    (p,) = identical_pairs(g)
    assert not p.same_curves and p.curve_diff["loss"] == pytest.approx(0.05)
    md = render_report(_pair(0.5, [1.0, 0.5, 0.25]), tmp_path).read_text()
    assert "the curves differ (`loss` max |Δ| 0.05)" in md


def test_no_identical_pair_when_a_metric_or_the_seeds_differ():
    from orthoptim.benchmarks.report import identical_pairs

    assert identical_pairs(summarize(_pair(0.5 + 1e-9, [1.0, 0.5, 0.2]))[0]) == []
    assert identical_pairs(summarize(_pair(0.5, [1.0, 0.5, 0.2], seeds=(0,)) + [
        rec("fogo", 1, metrics={"acc": 0.6})])[0]) == []  # fmt: skip
    # NaN (target not reached) in both is the same outcome.
    recs = table({"a": [math.nan, 0.2], "b": [math.nan, 0.2]})
    assert [(p.a, p.b) for p in identical_pairs(summarize(recs)[0])] == [("a", "b")]


def test_curve_figure_keeps_equal_curves_apart(tmp_path, monkeypatch):
    from orthoptim.benchmarks import report_plots

    figs = []
    monkeypatch.setattr(report_plots, "_save", lambda fig, path: figs.append(fig) or True)
    same = [{"x": [0, 1, 2], "y": [1.0, 0.5, 0.2]}]
    other = [{"x": [0, 1, 2], "y": [1.0, 0.6, 0.3]}]
    assert report_plots.curve_figure(tmp_path / "c.png", "loss", {"a": same, "b": same, "c": other})
    (ax,) = figs[0].axes
    assert len({line.get_linestyle() for line in ax.get_lines()}) == 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a (n=1)", "b (n=1, same as a)", "c (n=1)"]
