"""The ecosystem examples run: FOGO in the HF ``Trainer`` (``optimizers=(opt, scheduler)``), K-FAC
and FOP in the HF ``Trainer`` with ``gradient_accumulation_steps`` (equal to one batch), FOGO
and FOP in PyTorch Lightning (``configure_optimizers``, stepped with a closure). Each test skips
when its extra is not installed (``pip install torch==2.13.0 && pip install -e ".[hf,lightning]"``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from orthoptim import FOGO, FOP, KFAC

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_steps_fogo_and_its_scheduler():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    steps = 6
    result = _example("hf_trainer").main(["--steps", str(steps)])
    trainer, opt, sched = result["trainer"], result["optimizer"], result["scheduler"]
    assert isinstance(opt, FOGO)
    # The Trainer stepped our optimizer (accelerate wraps it), not an AdamW of its own.
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
    assert trainer.state.global_step == steps and sched.last_epoch == steps
    model = trainer.model
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert opt.state[c_attn]["momentum_slow"].abs().sum() > 0  # FOGO on the hidden matrices
    assert "exp_avg" in opt.state[model.transformer.wte.weight]  # AdamW on the embedding
    # The cosine schedule ends near zero: every group's lr follows the scheduler.
    last = sched.get_last_lr()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(last)
    assert last[0] < 0.1 * opt.param_groups[0]["initial_lr"]
    assert result["losses"] and all(math.isfinite(v) for v in result["losses"])


@pytest.mark.parametrize("name, cls", [("kfac", KFAC), ("fop", FOP)])
def test_hf_trainer_accumulation_equals_one_batch(name, cls):
    """2 micro-batches of 4 (the Trainer's token-count loss normalisation) follow one batch of 8:
    K-FAC's factors and FOP's halves see the whole accumulated batch."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    steps = 3
    with pytest.warns(UserWarning, match=r"transformer\.wpe\.weight: its input has batch 1"):
        run = _example("hf_trainer_kfac").main(
            ["--optimizer", name, "--accumulation", "2", "--batch", "8", "--steps", str(steps),
             "--check"]
        )  # fmt: skip
    opt, model = run["optimizer"], run["model"]
    assert isinstance(opt, cls) and opt.kfac_step == steps
    assert run["trainer"].state.global_step == steps
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert any(b.weight is c_attn for b in opt._blocks)  # GPT-2's Conv1D is preconditioned
    assert opt.block_state(next(b for b in opt._blocks if b.weight is c_attn))["inverses"] > 0
    # Float32 rounding of a different summation order (8e-8 measured), not a different algorithm:
    # preconditioning the broadcast position embedding made them differ by 6e-3 in 4 steps.
    assert run["max_param_diff"] < 1e-5
    assert run["losses"][-1] < run["losses"][0]


@pytest.mark.parametrize("name, cls", [("fogo", FOGO), ("fop", FOP)])
def test_lightning_configure_optimizers(name, cls):
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    steps = 12
    example = _example("lightning_module")
    result = example.main(["--optimizer", name, "--steps", str(steps)])
    trainer, module = result["trainer"], result["module"]
    (opt,) = trainer.optimizers
    assert isinstance(opt, cls) and trainer.global_step == steps
    first = module.net[0].weight
    if cls is FOP:
        assert opt.kfac_step == steps  # every Lightning step reached FOP's step
        assert torch.isfinite(opt.state[first]["momentum_buffer"]).all()
    else:
        assert int(opt.state[first]["step"]) == steps  # every Lightning step reached FOGO's step
        assert opt.state[first]["momentum_slow"].abs().sum() > 0
        assert "exp_avg" in opt.state[module.net[4].weight]  # the Sequential's head: AdamW
    (sched,) = [c.scheduler for c in trainer.lr_scheduler_configs]
    assert sched.last_epoch == steps  # stepped every batch ("interval": "step")
    assert 0.0 <= result["accuracy"] <= 1.0
