"""FOGO or FOP in PyTorch Lightning: return them from ``configure_optimizers``.

Lightning steps the optimizer as ``optimizer.step(closure)``, the closure running
``training_step`` and the backward pass; orthoptim's optimizers take a closure like any
``torch.optim.Optimizer`` (K-FAC and FOP capture the layer inputs and output gradients while
the closure runs). The scheduler is a plain ``torch.optim.lr_scheduler``, stepped every batch.

* ``--optimizer fogo``: FOGO over :func:`orthoptim.param_groups` of the MLP (an
  ``nn.Sequential``: its last ``nn.Linear`` is the output head and goes to AdamW).
* ``--optimizer fop``: FOP takes the network itself (it hooks its ``nn.Linear`` layers).

Data: scikit-learn's 8x8 digits (shipped with scikit-learn, no download).

    pip install torch==2.13.0 && pip install "orthoptim[lightning,bench]"
    python examples/lightning_module.py [--optimizer fogo|fop] [--steps 150]
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from orthoptim import FOGO, FOP, param_groups

LR = {"fogo": 3e-3, "fop": 0.05}


class DigitsClassifier(L.LightningModule):
    """A two-hidden-layer MLP on 8x8 digits, trained with FOGO or FOP.

    Args:
        optimizer: ``"fogo"`` or ``"fop"``.
        lr: learning rate (FOGO's is on AdamW's scale; FOP's is an SGD-outer lr).
        steps: training steps, the length of the cosine schedule.
    """

    def __init__(self, optimizer: str = "fogo", lr: float | None = None, steps: int = 150):
        super().__init__()
        self.optimizer_name, self.steps = optimizer, steps
        self.lr = LR[optimizer] if lr is None else lr
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_name == "fogo":
            opt = FOGO(param_groups(self.net, verbose=False), lr=self.lr, weight_decay=0.01)
        else:
            opt = FOP(self.net, lr=self.lr, damping=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train / test split (3:1) of the digits, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = 3 * len(y) // 4
    return TensorDataset(x[perm[:cut]], y[perm[:cut]]), TensorDataset(x[perm[cut:]], y[perm[cut:]])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--optimizer", choices=sorted(LR), default="fogo")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # num_workers=0 is fine

    L.seed_everything(0, verbose=False)
    train, test = digits()
    module = DigitsClassifier(args.optimizer, args.lr, args.steps)
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True))
    x, y = test.tensors
    with torch.no_grad():
        accuracy = (module(x).argmax(1) == y).float().mean().item()
    print(f"{args.optimizer} in Lightning: {trainer.global_step} steps, "
          f"test accuracy {accuracy:.3f}")  # fmt: skip
    return {"trainer": trainer, "module": module, "accuracy": accuracy}


if __name__ == "__main__":
    main()
