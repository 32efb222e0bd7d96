"""Streams, long-tail subsampling, models and the shared training loop (fast, sklearn digits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orthoptim.benchmarks import longtail, models, streams, train
from orthoptim.benchmarks.data import ImageDataset, load_digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits()


class CountingSGD(torch.optim.SGD):
    """SGD with an ``end_task`` hook that only counts its calls."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.end_task_calls = 0

    def end_task(self):
        self.end_task_calls += 1


def _perms(stream):
    return [None if t.transform is None else t.transform.perm for t in stream]


# ---------------------------------------------------------------- streams


def test_permuted_stream_deterministic(digits):
    a = streams.permuted_stream(digits, 3, seed=0)
    b = streams.permuted_stream(digits, 3, seed=0)
    c = streams.permuted_stream(digits, 3, seed=1)
    pa, pb, pc = _perms(a), _perms(b), _perms(c)
    assert pa[0] is None and a.scenario == "domain-il" and len(a) == 3
    for x, y in zip(pa[1:], pb[1:], strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(pa[1], pc[1])
    assert sorted(pa[1].tolist()) == list(range(64))
    # all tasks permuted when asked; later permutations do not depend on that flag
    d = streams.permuted_stream(digits, 3, seed=0, first_unpermuted=False)
    assert d.tasks[0].transform is not None and torch.equal(_perms(d)[1], pa[1])


def test_permute_transform_and_subsets(digits):
    s = streams.permuted_stream(digits, 2, seed=3, train_per_task=100, test_per_task=50)
    t = s.tasks[1]
    assert len(t.train_y) == 100 and len(t.test_y) == 50
    x = t.train_x[:4]
    out = t.transform(x)
    assert out.shape == x.shape
    assert torch.equal(out.flatten(1), x.flatten(1)[:, t.transform.perm])
    s2 = streams.permuted_stream(digits, 2, seed=3, train_per_task=100, test_per_task=50)
    assert torch.equal(s2.tasks[1].train_y, t.train_y)


def test_rotated_stream(digits):
    a = streams.rotated_stream(digits, 4, seed=0)
    b = streams.rotated_stream(digits, 4, seed=0)
    c = streams.rotated_stream(digits, 4, seed=1)
    angles = a.info["angles"]
    assert angles == b.info["angles"] and angles != c.info["angles"]
    for t, ang in enumerate(angles):  # GEM protocol bins
        assert t * 45.0 <= ang < (t + 1) * 45.0
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 8] = 1.0  # a pixel right of centre
    r90 = streams.Rotate(90.0)(x)
    assert r90.shape == x.shape
    assert torch.equal(streams.Rotate(0.0)(x), x)
    assert r90.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert r90[0, 0, 4, 8].item() < 1e-4  # moved away
    assert r90[0, 0, 0, 4].item() == pytest.approx(1.0, abs=1e-4)  # right -> top: counter-clockwise
    explicit = streams.rotated_stream(digits, 2, angles=[0.0, 30.0])
    assert explicit.info["angles"] == [0.0, 30.0]


def test_split_stream(digits):
    s = streams.split_stream(digits, 2, "task-il")
    assert len(s) == 5 and s.scenario == "task-il"
    assert [t.classes for t in s] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for t in s:
        assert set(t.train_y.unique().tolist()) == set(t.classes)
        assert set(t.test_y.unique().tolist()) == set(t.classes)
    m = s.tasks[1].mask(10)
    assert m.tolist() == [False, False, True, True] + [False] * 6
    ci = streams.split_stream(digits, 2, "class-il")
    assert ci.tasks[1].mask(10) is None
    sh = [streams.split_stream(digits, 2, seed=k, shuffle_classes=True).info["class_order"]
          for k in (0, 0, 1)]  # fmt: skip
    assert sh[0] == sh[1] and sh[0] != sh[2] and sorted(sh[0]) == list(range(10))
    with pytest.raises(ValueError, match="scenario"):
        streams.split_stream(digits, 2, "domain")


# ---------------------------------------------------------------- long tail


def test_longtail_counts_formula():
    expected = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert longtail.longtail_counts(5000, 10, 100) == expected
    assert sum(expected) == 12406
    assert longtail.longtail_counts(6000, 10, 100) == [
        6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60,
    ]  # fmt: skip
    assert longtail.longtail_counts(5000, 10, 50)[-1] == 100


def test_make_longtail(digits):
    lt = longtail.make_longtail(digits, rho=10, n_max=100, seed=0)
    assert lt.train_counts().tolist() == longtail.longtail_counts(100, 10, 10)
    assert torch.equal(lt.test_y, digits.test_y)  # balanced test set kept
    again = longtail.make_longtail(digits, rho=10, n_max=100, seed=0)
    other = longtail.make_longtail(digits, rho=10, n_max=100, seed=1)
    assert torch.equal(lt.train_x, again.train_x)
    assert not torch.equal(lt.train_x, other.train_x)
    # capped at availability; custom rank order puts the head on class 9
    rev = longtail.make_longtail(digits, rho=10, n_max=200, class_order=list(range(9, -1, -1)))
    counts = rev.train_counts()
    assert counts[9] == digits.train_counts()[9]  # rank 0 wants 200, class 9 holds 144
    assert counts[0] == 20  # rank 9: int(200 / 10)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize(
    "model,shape",
    [
        (models.MLP(784, (32, 16)), (2, 1, 28, 28)),
        (models.SmallCNN(1, 10, 28, (4, 8), 16), (2, 1, 28, 28)),
        (models.SmallCNN(3, 10, 32, (4, 8), 16), (2, 3, 32, 32)),
        (models.MLP(40, ()), (2, 40)),
    ],
)
def test_models_shapes_and_head(model, shape):
    assert model(torch.zeros(shape)).shape == (2, 10)
    assert isinstance(model.head, torch.nn.Linear)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} <= {"body", "head"}


# ---------------------------------------------------------------- training


def test_train_and_evaluate_deterministic(digits):
    def run(seed):
        torch.manual_seed(0)
        m = models.MLP(64, (32,))
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        x, y = digits.train_x, digits.train_y
        res = train.train(m, opt, x, y, batch_size=32, steps=60, seed=seed)
        return res, m

    r1, m1 = run(0)
    r2, m2 = run(0)
    r3, _ = run(1)
    assert r1.steps == 60 and r1.losses == r2.losses and r1.losses != r3.losses
    assert train.evaluate(m1, digits.test_x, digits.test_y) > 0.5
    stop = train.train(
        m1, torch.optim.SGD(m1.parameters(), lr=0.1), digits.train_x, digits.train_y,
        batch_size=32, epochs=1, callback=lambda step, loss, m, o: step == 5,
    )  # fmt: skip
    assert stop.steps == 5 and stop.stopped
    idx = list(train.batch_indices(10, 4, 5, torch.Generator().manual_seed(0)))
    flat = torch.cat(idx[:2] + [idx[2][:2]])  # first 10 indices = one permutation
    assert sorted(flat.tolist()) == list(range(10)) and all(len(i) == 4 for i in idx)


def test_masked_evaluation(digits):
    torch.manual_seed(0)
    m = models.MLP(64, (16,))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 3]] = True
    pred = train.predict(m, digits.test_x, mask=mask)
    assert set(pred.unique().tolist()) <= {2, 3}


def test_run_continual_end_to_end(digits):
    stream = streams.permuted_stream(digits, 2, seed=0)
    state = torch.random.get_rng_state()

    def go(task_aware=True):
        opts = []

        def opt_fn(m):
            opts.append(CountingSGD(m.parameters(), lr=0.5))
            return opts[-1]

        res = train.run_continual(
            stream, lambda: models.MLP(64, (32,)), opt_fn, steps_per_task=40, batch_size=32,
            seed=0, task_aware=task_aware,
        )  # fmt: skip
        return res, opts[0]

    res, opt = go()
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert res.R.shape == (2, 2) and res.b.shape == (2,)
    assert np.all((res.R >= 0) & (res.R <= 1))
    assert res.R[0, 0] > 0.5 and res.R[1, 1] > 0.5
    assert opt.end_task_calls == 2 and res.end_task_calls == 2
    assert set(res.metrics) == {"acc", "bwt", "forgetting", "learning_acc",
                                "avg_incremental_acc", "fwt"}  # fmt: skip
    assert res.metrics["acc"] == pytest.approx(res.R[1].mean())
    assert len(res.losses) == 2 and len(res.losses[0]) == 40 and res.seconds > 0
    summary = res.to_dict()
    assert summary["R"] == res.R.tolist() and summary["end_task_calls"] == 2
    json.dumps(summary)
    again, _ = go()
    np.testing.assert_array_equal(res.R, again.R)
    off, opt_off = go(task_aware=False)
    assert opt_off.end_task_calls == 0 and off.end_task_calls == 0
    np.testing.assert_array_equal(res.R, off.R)  # the counting hook does not touch the model


def test_run_continual_split_task_il(digits):
    stream = streams.split_stream(digits, 2, "task-il", train_per_task=80)
    res = train.run_continual(
        stream, lambda: models.MLP(64, (16,)),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), steps_per_task=10, batch_size=16,
    )  # fmt: skip
    assert res.R.shape == (5, 5)
    assert res.R[4, 4] > 0.6  # binary task with masking: well above chance after 10 steps


def test_run_longtail(digits):
    lt = longtail.make_longtail(digits, rho=10, n_max=140)
    res = train.run_longtail(
        lt, lambda: models.MLP(64, (32,)), lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        steps=60, batch_size=32,
    )  # fmt: skip
    assert res.per_class.shape == (10,)
    assert res.balanced_accuracy == pytest.approx(np.nanmean(res.per_class))
    assert res.group_classes == {"head": [0, 1, 2], "mid": [3, 4, 5, 6], "tail": [7, 8, 9]}
    # counts 140, 108, 84, ..., int(140 * 0.1**(8/9)) = 18, 14: many > 100, few < 20
    assert res.shot_classes == {"many": [0, 1], "medium": [2, 3, 4, 5, 6, 7], "few": [8, 9]}
    assert set(res.groups) == {"head", "mid", "tail"}
    assert set(res.shots) == {"many", "medium", "few"}
    assert res.accuracy > 0.5
    assert json.loads(json.dumps(res.to_dict()))["train_counts"][0] == 140
