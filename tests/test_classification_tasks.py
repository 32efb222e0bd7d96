"""The vision benchmark tasks (longtail, continual-*, large-batch) on their tiny presets, the
evaluation split, the ResNet and the model factory (embedded digits; seconds in all)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import orthoptim
from orthoptim.benchmarks import metrics, models
from orthoptim.benchmarks.tasks import _common
from orthoptim.benchmarks.tasks.base import TaskSpec
from orthoptim.benchmarks.tasks.classification import TASKS

pytest.importorskip("sklearn")

BY_NAME = {t.name: t for t in TASKS}
CONTINUAL = [t for t in TASKS if t.family == "continual"]


def adamw(model, lr_scale=1.0):
    return torch.optim.AdamW(model.parameters(), lr=1e-3 * lr_scale)


class CountingAdamW(torch.optim.AdamW):
    """AdamW counting ``end_task`` calls."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.end_task_calls = 0

    def end_task(self):
        self.end_task_calls += 1


def _run(spec: TaskSpec, factory=adamw, seed=0, preset="tiny", **overrides):
    return spec.run(factory, seed=seed, settings=spec.settings(preset, **overrides),
                    data_dir=None, progress=None)  # fmt: skip


def test_task_table():
    assert [t.name for t in TASKS] == [
        "longtail", "longtail-cnn", "continual-permuted", "continual-rotated",
        "continual-split-task", "continual-split-class", "large-batch", "large-batch-cnn",
        "large-batch-vit", "large-batch-bncnn",
    ]  # fmt: skip
    fam = {t.name: t.family for t in TASKS}
    assert fam["longtail"] == "longtail" and fam["large-batch"] == "large-batch"
    assert BY_NAME["longtail"].primary.name == "balanced_accuracy"
    assert BY_NAME["large-batch"].primary.name == "steps_to_target"
    assert BY_NAME["large-batch"].primary.goal == "min"
    cnn = BY_NAME["large-batch-cnn"]
    assert cnn.family == "large-batch" and cnn.metrics == BY_NAME["large-batch"].metrics
    assert all(cnn.settings(p)["model"] == "cnn" for p in cnn.presets)
    for name, model in (("large-batch-vit", "vit"), ("large-batch-bncnn", "cnn-bn")):
        spec = BY_NAME[name]
        assert spec.metrics == cnn.metrics and all(spec.settings(p)["model"] == model
                                                  for p in spec.presets)  # fmt: skip
    for t in CONTINUAL:
        assert [(m.name, m.goal) for m in t.metrics] == [
            ("acc", "max"), ("bwt", "max"), ("forgetting", "min"), ("learning_accuracy", "max"),
        ]  # fmt: skip
    for t in TASKS:
        assert {"tiny", "quick", "paper"} <= set(t.presets)
        # every preset carries the same keys (every key a task reads is in all presets)
        keys = {p: set(s) for p, s in t.presets.items()}
        assert all(k == keys["tiny"] for k in keys.values()), t.name
        assert t.presets["tiny"]["dataset"] == t.presets["quick"]["dataset"] == "digits"
        for p, s in t.presets.items():
            assert s["dataset"] in _common.DATASETS, (t.name, p)
            json.dumps(s)
    for t in CONTINUAL:
        assert all(s["num_tasks"] >= 5 and s["task_aware"] for s in t.presets.values())


@pytest.mark.parametrize("spec", TASKS, ids=lambda t: t.name)
def test_tiny_preset_runs(spec):
    # No wall-clock bound: on a shared machine it fails by load, not by code (speed lives in
    # `orthoptim speed` and the docs); CI's time budget keeps the tiny presets tiny.
    out = _run(spec, seed=1)
    assert list(out.metrics) == [m.name for m in spec.metrics]
    assert all(isinstance(v, float) for v in out.metrics.values())
    for c in out.curves.values():
        assert set(c) == {"x", "y", "xlabel", "ylabel"} and len(c["x"]) == len(c["y"]) > 0
    json.dumps({"m": out.metrics, "c": out.curves, "e": out.extra})  # JSON-serialisable
    if spec.family != "large-batch":
        loss = out.curves["train_loss"]
        assert loss["x"][0] == 1 and all(math.isfinite(v) for v in loss["y"])


@pytest.mark.parametrize("spec", [BY_NAME["longtail"], BY_NAME["continual-permuted"],
                                  BY_NAME["large-batch"]], ids=lambda t: t.name)  # fmt: skip
def test_deterministic(spec):
    a, b, c = _run(spec, seed=3), _run(spec, seed=3), _run(spec, seed=4)
    timed = {"seconds_to_target"}
    pick = lambda o: {k: v for k, v in o.metrics.items() if k not in timed}  # noqa: E731
    np.testing.assert_equal(pick(a), pick(b))
    assert a.curves.get("train_loss") == b.curves.get("train_loss")
    assert pick(a) != pick(c) or a.curves != c.curves


# ---------------------------------------------------------------- evaluation split


def test_val_split_disjoint_from_train_and_test():
    s = BY_NAME["longtail"].settings("tiny", eval_split="val", train_limit=600)
    prep = _common.prepare(s, None, seed=0)
    src = _common.load_dataset("digits", None)
    assert prep.eval_source == "train"
    assert len(np.intersect1d(prep.train_index, prep.eval_index)) == 0
    # stratified subsets round per class: within one example per class of the limit
    assert len(prep.train_index) == len(prep.data.train_y) and abs(len(prep.train_index) - 600) <= 5
    assert torch.equal(prep.data.test_x, src.train_x[torch.from_numpy(prep.eval_index)])
    assert torch.equal(prep.data.train_x, src.train_x[torch.from_numpy(prep.train_index)])
    # stratified: every class keeps about val_frac of its examples in the validation part
    counts = np.bincount(src.train_y.numpy(), minlength=10)
    held = np.bincount(prep.data.test_y.numpy(), minlength=10)
    assert np.all(np.abs(held - s["val_frac"] * counts) <= 1)
    # no validation image equals a test image (val is cut from the training data)
    val_rows = {r.tobytes() for r in prep.data.test_x.numpy()}
    test_rows = {r.tobytes() for r in src.test_x.numpy()}
    train_rows = {r.tobytes() for r in prep.data.train_x.numpy()}
    dup = {r.tobytes() for r in src.train_x.numpy()} & test_rows  # digits holds a few repeats
    assert not (val_rows & test_rows) - dup and not (val_rows & train_rows) - dup
    # the same validation set for every run seed (tuning compares like with like)
    assert np.array_equal(_common.prepare(s, None, seed=5).eval_index, prep.eval_index)
    t = _common.prepare(BY_NAME["longtail"].settings("tiny"), None, seed=0)
    assert t.eval_source == "test" and torch.equal(t.data.test_y, src.test_y)


def test_val_split_used_by_tasks():
    out = _run(BY_NAME["longtail"], eval_split="val")
    n_val = _common.prepare(BY_NAME["longtail"].settings("tiny", eval_split="val"), None, 0)
    assert (
        out.extra["n_eval"]
        == len(n_val.data.test_y)
        != len(_common.load_dataset("digits", None).test_y)
    )
    assert out.extra["eval_split"] == "val"
    with pytest.raises(ValueError, match="val_frac"):
        _common.stratified_split(torch.zeros(4, dtype=torch.long), 1.5, 0)


# ---------------------------------------------------------------- longtail


def test_longtail_metrics():
    spec = BY_NAME["longtail"]
    out = _run(spec)
    e = out.extra
    counts, per_class = np.array(e["train_counts"]), np.array(e["per_class_accuracy"])
    s = spec.settings("tiny")
    assert counts[0] == s["n_max"] and counts[-1] == int(s["n_max"] / s["rho"])
    assert np.all(np.diff(counts) <= 0)  # class 0 is the head (no shuffling)
    assert out.metrics["balanced_accuracy"] == pytest.approx(np.mean(per_class))
    for g in ("head", "mid", "tail"):
        want = np.mean(per_class[e["group_classes"][g]])
        assert out.metrics[f"{g}_accuracy"] == pytest.approx(want)
    shots = metrics.shot_groups(counts)
    assert e["shot_classes"] == shots and all(shots.values())  # all three groups present
    # rho = 1: no class below 20 examples -> few-shot accuracy is NaN
    flat = _run(spec, rho=1.0)
    assert math.isnan(flat.metrics["few_shot_accuracy"])
    shuffled = _run(spec, shuffle_classes=True)
    order = shuffled.extra["class_order"]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert shuffled.extra["train_counts"][order[0]] == s["n_max"]


# ---------------------------------------------------------------- continual


@pytest.mark.parametrize("spec", CONTINUAL, ids=lambda t: t.name)
def test_continual_matrix_and_end_task(spec):
    made = []

    def factory(model, lr_scale=1.0):
        made.append(CountingAdamW(model.parameters(), lr=1e-3 * lr_scale))
        return made[-1]

    out = _run(spec, factory)
    T = spec.settings("tiny")["num_tasks"]
    R = np.array(out.extra["R"])
    assert R.shape == (T, T) and len(out.extra["b"]) == T and len(out.extra["task_names"]) == T
    ref = metrics.continual_metrics(R, out.extra["b"])
    assert out.metrics["acc"] == pytest.approx(R[-1].mean()) == pytest.approx(ref["acc"])
    assert out.metrics["bwt"] == pytest.approx(ref["bwt"])
    assert out.metrics["forgetting"] == pytest.approx(ref["forgetting"])
    assert out.metrics["learning_accuracy"] == pytest.approx(np.diag(R).mean())
    assert len(made) == 1 and made[0].end_task_calls == T == out.extra["end_task_calls"]
    assert len(out.curves["train_loss"]["y"]) == T * spec.settings("tiny")["steps_per_task"]
    made.clear()
    out = _run(spec, factory, task_aware=False)
    assert made[0].end_task_calls == 0 == out.extra["end_task_calls"]


def test_continual_scenarios():
    assert _run(BY_NAME["continual-split-task"]).extra["scenario"] == "task-il"
    assert _run(BY_NAME["continual-split-class"]).extra["scenario"] == "class-il"
    rot = _run(BY_NAME["continual-rotated"])
    assert rot.extra["scenario"] == "domain-il" and len(rot.extra["stream_info"]["angles"]) == 5
    with pytest.raises(ValueError, match="num_tasks: 3"):
        _run(BY_NAME["continual-split-task"], num_tasks=3)


# ---------------------------------------------------------------- large batch


def test_large_batch_lr_scale_and_target():
    spec = BY_NAME["large-batch"]
    seen = []

    def factory(model, lr_scale=1.0):
        seen.append(lr_scale)
        return torch.optim.AdamW(model.parameters(), lr=1e-3 * lr_scale)

    out = _run(spec, factory, batch_size=256, base_batch_size=32, target_accuracy=0.5)
    assert seen == [8.0] and out.extra["lr_scale"] == 8.0 and out.extra["batch_size"] == 256
    steps = out.metrics["steps_to_target"]
    e = out.extra
    assert e["reached_target"] and steps % 5 == 0 and e["steps_run"] == steps  # stopped there
    assert out.metrics["epochs_to_target"] == pytest.approx(steps * 256 / e["n_train"])
    acc = out.curves["eval_accuracy_vs_step"]
    assert acc["x"][0] == 0 and acc["x"][-1] == steps and acc["y"][-1] >= 0.5
    assert max(acc["y"][:-1]) < 0.5  # the first evaluation over the target is the one reported
    assert 0 < out.metrics["seconds_to_target"] <= out.curves["eval_accuracy_vs_seconds"]["x"][-1]
    # an unreachable target: NaN, and training runs the whole (bounded) budget
    never = _run(spec, target_accuracy=1.0, max_steps=12)
    assert all(math.isnan(never.metrics[k])
               for k in ("steps_to_target", "epochs_to_target", "seconds_to_target"))  # fmt: skip
    assert never.extra["steps_run"] == 12 and never.curves["eval_accuracy_vs_step"]["x"] == [
        0, 5, 10, 12,
    ]  # fmt: skip
    assert never.metrics["best_accuracy"] == max(never.curves["eval_accuracy_vs_step"]["y"])
    assert never.metrics["final_accuracy"] == never.curves["eval_accuracy_vs_step"]["y"][-1]
    # the epoch budget binds too: max_epochs = 1 on about 1300 images at batch 256 -> 6 steps
    short = _run(spec, target_accuracy=1.0, max_epochs=1.0)
    assert short.extra["steps_run"] == math.ceil(short.extra["n_train"] / 256)


def test_large_batch_warmup():
    lrs = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    def factory(model, lr_scale=1.0):
        return Recording(model.parameters(), lr=0.1 * lr_scale)

    _run(BY_NAME["large-batch"], factory, warmup_steps=4, base_batch_size=256,
         target_accuracy=1.0, max_steps=6)  # fmt: skip
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


# ---------------------------------------------------------------- models and errors


@pytest.mark.parametrize("name, params", [("resnet8", 75_290), ("resnet20", 269_722)])
def test_resnet_shapes_and_routing(name, params):
    m = models.build_model(name, (3, 32, 32), 10)
    assert sum(p.numel() for p in m.parameters()) == params  # ResNet-20: 0.27M (He et al.)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    m1 = models.build_model(name, (1, 28, 28), 7, width=4)
    assert m1(torch.zeros(3, 1, 28, 28)).shape == (3, 7) and m1.head.in_features == 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = orthoptim.param_groups(m)
    by_alg = {g["algorithm"]: {id(p) for p in g["params"]} for g in groups}
    assert id(m.head.weight) in by_alg["adamw"] and id(m.head.bias) in by_alg["adamw"]
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == int(name[6:]) - 1  # 6n + 1 convs, plus the head: 6n + 2 layers
    assert all(id(c.weight) in by_alg["fogo"] for c in convs)
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert bns and all(id(b.weight) in by_alg["adamw"] for b in bns)


def test_build_model_names_and_errors():
    assert isinstance(models.build_model("mlp", (1, 8, 8), 10, hidden=[32]), models.MLP)
    cnn = models.build_model("cnn", (1, 8, 8), 10, width=4, hidden=[16])
    assert isinstance(cnn, models.SmallCNN) and cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="'vgg11'"):
        models.build_model("vgg11", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="depth: 10"):
        models.ResNet(depth=10)
    with pytest.raises(ValueError, match="input_shape"):
        models.build_model("resnet8", (64,), 10)


def test_unknown_settings_errors():
    lt = BY_NAME["longtail"]
    with pytest.raises(ValueError, match="'svhn'"):
        _run(lt, dataset="svhn")
    with pytest.raises(ValueError, match="'transformer'"):
        _run(BY_NAME["continual-permuted"], model="transformer")
    with pytest.raises(ValueError, match="data_dir.*'mnist'"):
        _run(lt, dataset="mnist")
    with pytest.raises(ValueError, match="steps: 0"):
        _run(lt, steps=0)
    with pytest.raises(ValueError, match="target_accuracy: 1.5"):
        _run(BY_NAME["large-batch"], target_accuracy=1.5)
    with pytest.raises(ValueError, match="Invalid setting"):
        lt.settings("tiny", learning_rate=1.0)


def test_resnet_runs_in_a_task():
    out = _run(BY_NAME["continual-split-task"], model="resnet8", width=4, steps_per_task=3)
    assert np.array(out.extra["R"]).shape == (5, 5)


def test_large_batch_cnn_preconditions_conv_layers():
    """large-batch-cnn is the large-batch protocol on the small CNN: K-FAC sees two convs."""
    from orthoptim import KFAC

    built = []

    def factory(model, lr_scale=1.0):
        built.append(KFAC(model, lr=0.01 * lr_scale))
        return built[-1]

    out = _run(BY_NAME["large-batch-cnn"], factory, max_steps=10)
    kinds = [type(b.module).__name__ for b in built[0]._blocks]
    assert kinds == ["Conv2d", "Conv2d", "Linear", "Linear"]
    assert out.extra["steps_run"] <= 10 and out.metrics["final_accuracy"] > 0.0
