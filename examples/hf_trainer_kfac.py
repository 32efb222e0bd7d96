"""K-FAC or FOP in the Hugging Face ``Trainer``, with ``gradient_accumulation_steps``.

K-FAC and FOP take the model itself: they hook its layers (GPT-2's ``Conv1D`` attention and MLP
matrices through the transposed-weight adapter) and capture each layer's inputs and output
gradients in the backward passes the Trainer runs. Under ``gradient_accumulation_steps=k`` the
Trainer runs k forward/backward passes, each micro-batch loss its summed token loss divided by the
token count of the whole accumulated batch, then one ``optimizer.step()``. The optimizer counts the
forwards since its last step, so the Kronecker factors are those of one backward over the k
micro-batches together, and FOP's two sub-batch gradients are the odd- and even-numbered
micro-batches (docs/fop.md, "Gradient accumulation"). A run with k micro-batches of b sequences
therefore follows the run with one batch of k*b sequences, up to float rounding: ``--check``
runs both and prints the largest parameter difference.

The tied token embedding / LM head is not preconditioned (tied weights are refused by name); it
is passed in ``exclude`` to say that this is intended, and gets the plain outer update. The
position embedding sees ``position_ids`` broadcast over the batch and is named in a
``PlainUpdateWarning`` at the first step (plain update too: docs/integrations.md). Dropout is
off so the two runs compare exactly.

    pip install torch==2.13.0 && pip install "orthoptim[hf]"   # torch first: see docs/install.md
    python examples/hf_trainer_kfac.py [--optimizer kfac|fop] [--accumulation 2] [--check]
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from orthoptim import FOP, KFAC

OPTIMIZERS = {"kfac": KFAC, "fop": FOP}


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


def train(
    optimizer: str, accumulation: int, batch: int, steps: int, lr: float, **extra: Any
) -> dict[str, Any]:
    """Train a small GPT-2 for ``steps`` optimizer steps of ``batch`` sequences each, taken as
    ``accumulation`` micro-batches of ``batch // accumulation`` (``extra``: more optimizer
    keywords)."""
    if batch % accumulation:
        raise ValueError(f"batch={batch} is not a multiple of accumulation={accumulation}")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    data = ByteChunks(Path(textwrap.__file__).read_bytes(), block=64)
    opt = OPTIMIZERS[optimizer](
        model, lr=lr, damping=1e-2, factor_interval=1, inverse_interval=1,
        exclude=["transformer.wte.weight"], **extra,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch // accumulation,
            gradient_accumulation_steps=accumulation,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        # A constant schedule: the Trainer builds it around our optimizer.
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"trainer": trainer, "optimizer": opt, "model": model, "losses": losses}


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest absolute difference between two models' parameters."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="fop")
    ap.add_argument("--accumulation", type=int, default=2, help="gradient_accumulation_steps")
    ap.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--check", action="store_true", help="also train with one batch and compare")
    args = ap.parse_args(argv)

    run = train(args.optimizer, args.accumulation, args.batch, args.steps, args.lr)
    losses = run["losses"]
    print(f"{args.optimizer} in the HF Trainer, {args.accumulation} micro-batches of "
          f"{args.batch // args.accumulation}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"in {run['trainer'].state.global_step} steps")  # fmt: skip
    if args.check:
        whole = train(args.optimizer, 1, args.batch, args.steps, args.lr)
        run["whole"] = whole
        run["max_param_diff"] = max_param_diff(run["model"], whole["model"])
        print(f"one batch of {args.batch}: loss {whole['losses'][-1]:.3f}; largest parameter "
              f"difference from the accumulated run {run['max_param_diff']:.2e}")  # fmt: skip
    return run


if __name__ == "__main__":
    main()
