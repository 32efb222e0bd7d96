"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orthoptim.benchmarks import metrics as M

# R[i, j] = accuracy on task j after training task i (T = 3).
R = np.array(
    [
        [0.90, 0.10, 0.20],
        [0.95, 0.80, 0.10],
        [0.60, 0.75, 0.95],
    ]
)
B = np.array([0.10, 0.00, 0.00])


def test_continual_metrics_hand_computed():
    # ACC = (0.60 + 0.75 + 0.95) / 3
    assert M.average_accuracy(R) == pytest.approx(2.30 / 3)
    # BWT = ((0.60 - 0.90) + (0.75 - 0.80)) / 2
    assert M.backward_transfer(R) == pytest.approx(-0.175)
    # forgetting: task 0 best past 0.95 (after task 1) -> 0.35; task 1: 0.80 - 0.75 = 0.05
    assert M.forgetting(R) == pytest.approx(0.20)
    assert M.forgetting(R) >= -M.backward_transfer(R)
    assert M.learning_accuracy(R) == pytest.approx((0.90 + 0.80 + 0.95) / 3)
    # FWT = ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = (0.10 + 0.10) / 2
    assert M.forward_transfer(R, B) == pytest.approx(0.10)
    # iCaRL: (0.90 + (0.95 + 0.80) / 2 + 2.30 / 3) / 3
    assert M.average_incremental_accuracy(R) == pytest.approx((0.90 + 0.875 + 2.30 / 3) / 3)
    d = M.continual_metrics(torch.tensor(R), B)
    assert d["acc"] == pytest.approx(2.30 / 3) and d["fwt"] == pytest.approx(0.10)
    assert "fwt" not in M.continual_metrics(R)


def test_continual_metrics_edge_cases():
    one = np.array([[0.7]])
    assert M.average_accuracy(one) == pytest.approx(0.7)
    assert math.isnan(M.backward_transfer(one)) and math.isnan(M.forgetting(one))
    assert math.isnan(M.forward_transfer(one, [0.1]))
    with pytest.raises(ValueError, match="square"):
        M.average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="b must have shape"):
        M.forward_transfer(R, [0.1, 0.2])
    perfect = np.eye(4) * 0 + 1.0  # no forgetting at all
    assert M.backward_transfer(perfect) == 0 and M.forgetting(perfect) == 0


def test_accuracy_and_balanced_accuracy():
    y = [0, 0, 0, 0, 1, 1, 2]
    p = [0, 0, 0, 1, 1, 0, 2]
    assert M.accuracy(y, p) == pytest.approx(5 / 7)
    pc = M.per_class_accuracy(y, p, num_classes=4)
    np.testing.assert_allclose(pc[:3], [0.75, 0.5, 1.0])
    assert math.isnan(pc[3])  # class absent from y_true
    assert M.balanced_accuracy(y, p, num_classes=4) == pytest.approx(0.75)
    logits = torch.nn.functional.one_hot(torch.tensor(p), 3).float()
    assert M.accuracy(torch.tensor(y), logits) == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="labels"):
        M.accuracy([0, 1], [0])


def test_group_and_shot_accuracies():
    pc = np.array([0.9, 0.8, 0.7, 0.4, 0.2, np.nan])
    g = M.group_accuracy(pc, {"head": [0, 1], "mid": [2, 3], "tail": [4, 5], "none": []})
    assert g["head"] == pytest.approx(0.85) and g["mid"] == pytest.approx(0.55)
    assert g["tail"] == pytest.approx(0.2) and math.isnan(g["none"])
    counts = [500, 101, 100, 20, 19, 5]
    assert M.shot_groups(counts) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    s = M.group_accuracy(pc, M.shot_groups(counts))
    assert s["many"] == pytest.approx(0.85) and s["few"] == pytest.approx(0.2)


def test_head_mid_tail_groups():
    dec = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert M.head_mid_tail_groups(dec) == {
        "head": [0, 1, 2],
        "mid": [3, 4, 5, 6],
        "tail": [7, 8, 9],
    }
    assert M.head_mid_tail_groups(dec[::-1])["head"] == [7, 8, 9]
