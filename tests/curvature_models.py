"""Tiny models and batches shared by the K-FAC and FOP tests."""

import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)
    ).double()


def batches(kind, n=4, batch=8):
    torch.manual_seed(1)
    shape = (batch, 4) if kind == "mlp" else (batch, 2, 4, 4)
    return [(torch.randn(shape).double(), torch.randint(0, 3, (batch,))) for _ in range(n)]


def layout_of(model, **kw):
    """The K-FAC blocks of ``model`` (every trainable parameter trained)."""
    from orthoptim.curvature import find_blocks

    return find_blocks(model, {p: n for n, p in model.named_parameters() if p.requires_grad}, **kw)


def capture_of(model, split_dtype=None):
    """A :class:`Capture` hooked on ``model``'s blocks; returns ``(capture, {name: block})``."""
    from orthoptim.curvature import Capture

    layout = layout_of(model)
    cap = Capture()
    cap.attach(layout.blocks, layout.adapters, model)
    cap.split_dtype = split_dtype
    return cap, {b.name: b for b in layout.blocks}
