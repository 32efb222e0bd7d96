"""Equal-budget lr tuning and the versioned hparams config, on fake tasks (milliseconds each)."""

import argparse
import json
import math
import shutil

import pytest
import torch
from torch import nn

from orthoptim.benchmarks import hparams, registry, tuning
from orthoptim.benchmarks.tasks.base import Metric, RunOutput, TaskSpec

GRID = [1e-4, 3.162e-4, 1e-3, 3.162e-3, 1e-2]


def fake_task(score, goal="max", calls=None):
    """A task whose primary metric is ``score(lr, seed)``, lr read back from the optimizer."""

    def run(make, *, seed, settings, data_dir, progress):
        opt = make(nn.Linear(3, 2), lr_scale=settings["scale"])
        lr = opt.param_groups[0]["lr"]
        if calls is not None:
            calls.append(dict(settings=settings, seed=seed, data_dir=data_dir, opt_lr=lr))
        progress.start(1)
        progress.advance()
        return RunOutput(metrics={"score": score(lr / settings["scale"], seed), "other": 0.0})

    metrics = (Metric("score", goal, "primary"), Metric("other", "max", "not used"))
    presets = {"tiny": {"scale": 2.0}, "quick": {"scale": 2.0}}
    return TaskSpec("fake", "test", "fake task", metrics, presets, run)


def test_lr_grid_is_log_spaced_around_the_default():
    assert tuning.lr_grid(1e-3) == GRID
    grid = tuning.lr_grid(0.1, points=4, factor=2.0)
    assert len(grid) == 4 and math.prod(grid) ** 0.25 == pytest.approx(0.1, rel=1e-3)
    assert all(b / a == pytest.approx(2.0, rel=1e-3) for a, b in zip(grid, grid[1:], strict=False))
    assert tuning.lr_grid(0.02, points=1) == [0.02]
    for kwargs, name in [
        (dict(default_lr=0.0), "default_lr"), (dict(default_lr=float("nan")), "default_lr"),
        (dict(default_lr=1e-3, points=0), "points"), (dict(default_lr=1e-3, points=2.0), "points"),
        (dict(default_lr=1e-3, factor=1.0), "factor"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            tuning.lr_grid(**kwargs)


def test_tune_runs_every_lr_and_seed_on_the_val_split_with_lr_scale():
    calls = []
    task = fake_task(lambda lr, seed: -abs(math.log10(lr) + 3), calls=calls)
    assert task.settings("tiny")["eval_split"] == "test"  # the preset's own split is the test set
    res = tuning.tune(task, "adamw", preset="tiny", grid=GRID, seeds=[0, 1], data_dir="/data")
    assert [c["settings"]["eval_split"] for c in calls] == ["val"] * 10
    assert [c["seed"] for c in calls] == [0, 1] * 5 and {c["data_dir"] for c in calls} == {"/data"}
    # The factory forwards the task's lr_scale: the optimizer sees lr * 2.
    assert [c["opt_lr"] for c in calls[::2]] == pytest.approx([2 * lr for lr in GRID])
    assert res.best_lr == 1e-3 and res.hparams == {**registry.get_optimizer("adamw").defaults,
                                                   "lr": 1e-3}  # fmt: skip
    assert res.metric == "score" and res.goal == "max" and not res.at_edge
    assert res.scores[1e-3] == [0.0, 0.0] and res.best_score == 0.0


def test_overrides_reach_the_runs_but_never_the_eval_split():
    calls = []
    task = fake_task(lambda lr, seed: 0.0, calls=calls)
    tuning.tune(task, "adamw", preset="tiny", grid=[1e-3], overrides={"scale": 4.0,
                "eval_split": "test"})  # fmt: skip
    assert calls[0]["settings"] == {"scale": 4.0, "eval_split": "val"}
    with pytest.raises(ValueError, match="bogus"):
        tuning.tune(task, "adamw", preset="tiny", grid=[1e-3], overrides={"bogus": 1})


@pytest.mark.parametrize("goal", ["max", "min"])
def test_best_follows_the_metric_goal(goal):
    # score = log10(lr): "max" wants the largest lr, "min" the smallest.
    res = tuning.tune(
        fake_task(lambda lr, seed: math.log10(lr) + seed, goal=goal), "sgd", preset="tiny",
        grid=GRID, seeds=[0, 1],
    )  # fmt: skip
    assert res.best_lr == (GRID[-1] if goal == "max" else GRID[0])
    assert res.at_edge


@pytest.mark.parametrize("goal", ["max", "min"])
def test_nan_is_the_worst_score(goal):
    # score = log10(lr); the lr best by the finite seed fails on seed 1: its mean is NaN, so it
    # must lose (a plain max/min over floats would keep or pick a NaN).
    best_by_finite = GRID[-1] if goal == "max" else GRID[0]

    def score(lr, seed):
        return float("nan") if lr == pytest.approx(best_by_finite) and seed == 1 else math.log10(lr)

    res = tuning.tune(fake_task(score, goal=goal), "sgd", preset="tiny", grid=GRID, seeds=[0, 1])
    assert math.isnan(res.means[best_by_finite])
    assert res.best_lr == (GRID[-2] if goal == "max" else GRID[1])
    assert res.provenance()["scores"][f"{best_by_finite:g}"][1] is None  # strict JSON


def test_ties_go_to_the_smaller_lr_and_all_nan_keeps_the_smallest():
    tied = {GRID[1]: 1.0, GRID[3]: 1.0}
    res = tuning.tune(
        fake_task(lambda lr, seed: tied.get(lr, 0.0)), "sgd", preset="tiny", grid=GRID[::-1]
    )
    assert res.grid == GRID and res.best_lr == GRID[1]
    res = tuning.tune(
        fake_task(lambda lr, seed: -tied.get(lr, 0.0), goal="min"), "sgd", preset="tiny", grid=GRID
    )
    assert res.best_lr == GRID[1]
    res = tuning.tune(fake_task(lambda lr, seed: float("nan")), "sgd", preset="tiny", grid=GRID)
    assert res.best_lr == GRID[0] and math.isnan(res.best_score)


def test_bad_arguments_fail_before_any_run():
    calls = []
    task = fake_task(lambda lr, seed: 0.0, calls=calls)
    with pytest.raises(ValueError, match=r"\['wd'\] for optimizer 'adamw'"):
        tuning.tune(task, "adamw", preset="tiny", base_hparams={"wd": 0.1})
    with pytest.raises(ValueError, match="Invalid grid"):
        tuning.tune(task, "adamw", preset="tiny", grid=[1e-3, -1.0])
    with pytest.raises(ValueError, match="repeats"):
        tuning.tune(task, "adamw", preset="tiny", grid=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="Invalid preset"):
        tuning.tune(task, "adamw", preset="paper")
    with pytest.raises(ValueError, match="Invalid optimizer"):
        tuning.tune(task, "adamx", preset="tiny")
    assert calls == []


def test_real_training_diverged_lrs_lose():
    """SGD on least squares: large lrs blow up (NaN), the tuner picks a finite one."""

    def run(make, *, seed, settings, data_dir, progress):
        torch.manual_seed(seed)
        x = torch.randn(256, 8) * 8  # curvature ~180: SGD diverges above lr ~0.02
        y = x @ torch.randn(8, 1)
        model = nn.Linear(8, 1)
        opt = make(model)
        for _ in range(60):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
        final = ((model(x) - y) ** 2).mean().item()
        return RunOutput(metrics={"loss": final if math.isfinite(final) else float("nan")})

    task = TaskSpec("lsq", "test", "", (Metric("loss", "min", ""),), {"tiny": {}, "quick": {}}, run)
    res = tuning.tune(task, "sgd", preset="tiny", grid=tuning.lr_grid(0.01), seeds=[0, 1])
    assert math.isnan(res.means[0.03162]) and math.isnan(res.means[0.1])  # diverged
    assert res.best_lr == 0.001 and res.best_score < min(res.means[0.003162], res.means[0.01])


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "hparams.json"
    shutil.copy(hparams.DEFAULT_PATH, path)
    return path


def test_packaged_config_defaults_are_the_code_defaults_up_to_the_stated_rules():
    """Code defaults, except the two benchmark rules the protocol states: weight decay 0 for
    every optimizer and SGD centred on lr 0.05."""
    config = hparams.load_hparams()
    assert isinstance(config.version, int)
    assert "validation split" in config.protocol and "weight decay 0" in config.protocol
    builtins = registry.list_optimizers(include_peers=False)
    assert sorted(config.defaults) == sorted(builtins)
    for name in builtins:
        code = json.loads(json.dumps(registry.get_optimizer(name).defaults))
        code["weight_decay"] = 0.0
        if name == "sgd":
            code["lr"] = 0.05
        assert config.defaults[name] == code
        if name not in config.tasks.get("continual-permuted", {}):
            hp, source = config.lookup("continual-permuted", name)
            assert source == f"default v{config.version} (untuned)" and hp == config.defaults[name]


def test_save_tuned_round_trip_bumps_the_version(config_path):
    before = hparams.DEFAULT_PATH.read_bytes()
    v0 = hparams.load_hparams(config_path).version
    res = tuning.tune(
        fake_task(lambda lr, seed: -abs(math.log10(lr) + 3)), "adamw", preset="tiny", grid=GRID
    )
    saved = hparams.save_tuned(config_path, "fake", "adamw", res.hparams, res.provenance())
    loaded = hparams.load_hparams(config_path)
    assert saved.version == loaded.version == v0 + 1
    hp, source = loaded.lookup("fake", "adamw")
    assert hp == {**res.hparams, "betas": [0.9, 0.999]} and hp["lr"] == 1e-3
    assert source == f"tuned v{v0 + 1} (task fake, preset tiny)"
    tuned = loaded.tasks["fake"]["adamw"]["tuned"]
    assert tuned["grid"] == GRID and tuned["metric"] == "score" and tuned["seeds"] == [0]
    assert loaded.lookup("other-task", "adamw")[1] == f"default v{v0 + 1} (untuned)"
    assert loaded.lookup("fake", "sgd")[1].startswith("default")
    hparams.save_tuned(config_path, "fake", "fogo", {"lr": 3e-3}, res.provenance())
    again = hparams.load_hparams(config_path)
    assert again.version == v0 + 2 and set(again.tasks["fake"]) == {"adamw", "fogo"}
    assert again.lookup("fake", "fogo")[0] == {
        "lr": 3e-3,
        "weight_decay": 0.0,
        "ns_dtype": "float32",
    }
    assert sorted(p.name for p in config_path.parent.iterdir()) == ["hparams.json"]  # no tmp left
    assert hparams.DEFAULT_PATH.read_bytes() == before


def test_save_tuned_rejects_bad_input_and_leaves_the_file(config_path):
    text = config_path.read_text()
    prov = dict(preset="tiny", grid=[1e-3], seeds=[0], metric="acc", scores={}, date="2026-01-01")
    with pytest.raises(ValueError, match="not strict JSON"):
        hparams.save_tuned(config_path, "t", "adamw", {"lr": float("nan")}, prov)
    with pytest.raises(ValueError, match=r"tasks\.t\.adamw\.hparams.*\['wd'\]"):
        hparams.save_tuned(config_path, "t", "adamw", {"wd": 0.1}, prov)
    with pytest.raises(ValueError, match=r"missing provenance field\(s\) \['date'\]"):
        hparams.save_tuned(
            config_path, "t", "adamw", {"lr": 1e-3}, {k: v for k, v in prov.items() if k != "date"}
        )
    assert config_path.read_text() == text


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda raw: "{not json", r"not valid JSON \(line 1, column 2"),
        (lambda raw: {**raw, "defaults": {"fgo": {}}}, r"defaults\.fgo: .*did you mean fogo"),
        (lambda raw: {**raw, "defaults": {"adamw": {"wd": 0.1}}}, r"defaults\.adamw: .*\['wd'\]"),
        (lambda raw: {k: raw[k] for k in raw if k != "version"}, r"missing key\(s\) \['version'"),
        (lambda raw: {**raw, "version": "3"}, "'version' must be an integer"),
        (lambda raw: {**raw, "tasks": {"t": {"adamw": {"hparams": {}}}}}, r"tasks\.t\.adamw: exp"),
        (
            lambda raw: {**raw, "tasks": {"t": {"adamw": {"hparams": {}, "tuned": {"seeds": 1}}}}},
            r"tasks\.t\.adamw\.tuned: missing provenance",
        ),
    ],
)  # fmt: skip
def test_load_errors_name_the_file_and_the_key(config_path, edit, match):
    raw = json.loads(config_path.read_text())
    new = edit(raw)
    config_path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ValueError, match=match) as info:
        hparams.load_hparams(config_path)
    assert str(config_path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        hparams.load_hparams(tmp_path / "nope.json")


def test_tune_command_writes_the_winners(config_path, monkeypatch, capsys):
    task = fake_task(lambda lr, seed: -abs(math.log10(lr) + 2))  # best: 1e-2 for a 1e-3 default
    monkeypatch.setattr(tuning, "get_task", lambda name: task)
    args = argparse.Namespace(
        task="fake", optimizers=["adamw", "kfac"], preset="tiny", points=3, seeds=[0],
        data_dir=None, config=str(config_path), write=True, quiet=True,
    )  # fmt: skip
    v0 = hparams.load_hparams(config_path).version
    assert tuning.tune_command(args) == 0
    config = hparams.load_hparams(config_path)
    assert config.version == v0 + 2  # two optimizers stored, one bump each
    assert config.lookup("fake", "adamw")[0]["lr"] == pytest.approx(3.162e-3)  # grid edge
    assert config.lookup("fake", "kfac")[0]["lr"] == pytest.approx(0.03162)  # kfac default 0.1
    out = capsys.readouterr().out
    assert "adamw: best lr 0.003162" in out and "on the grid's edge" in out
