"""FOGO in the Hugging Face ``Trainer``: ``Trainer(..., optimizers=(opt, scheduler))``.

The Trainer builds AdamW unless it is given an optimizer and a scheduler. Here the optimizer is
FOGO over :func:`orthoptim.param_groups` (GPT-2's attention and MLP matrices orthogonalized;
``wte``, ``wpe``, the tied ``lm_head``, biases and norm gains on AdamW) and the scheduler is
transformers' cosine schedule with warm-up, a ``torch.optim.lr_scheduler.LambdaLR``. Nothing
else changes: the Trainer clips gradients, steps the optimizer and the scheduler, and logs.

The model is a small GPT-2 built from a ``GPT2Config`` (random weights, no download), trained on
the bytes of a source file of Python's standard library.

    pip install torch==2.13.0 && pip install "orthoptim[hf]"   # torch first: see docs/install.md
    python examples/hf_trainer.py [--steps 40] [--out runs/hf_trainer]
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    get_cosine_schedule_with_warmup,
)

from orthoptim import FOGO, param_groups


class ByteChunks(torch.utils.data.Dataset):
    """Fixed-length windows of a byte string; the labels are the inputs (the model shifts them)."""

    def __init__(self, data: bytes, block: int):
        self.tokens = torch.tensor(list(data), dtype=torch.long)
        self.block = block

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.tokens[i * self.block : (i + 1) * self.block]
        return {"input_ids": x, "labels": x.clone()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=None, help="Trainer output_dir (default: a temp folder)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    data = ByteChunks(Path(textwrap.__file__).read_bytes(), block=64)

    opt = FOGO(param_groups(model, verbose=False), lr=args.lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(
        opt, num_warmup_steps=args.steps // 10, num_training_steps=args.steps
    )
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.out or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            logging_steps=max(1, args.steps // 10),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(
            model=model, args=training_args, train_dataset=data, optimizers=(opt, scheduler)
        )
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"FOGO in the HF Trainer: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"in {trainer.state.global_step} steps")  # fmt: skip
    return {"trainer": trainer, "optimizer": opt, "scheduler": scheduler, "losses": losses}


if __name__ == "__main__":
    main()
