"""Checks that need an accelerator, in one short run (prints PASS/FAIL per check).

1. Sync-free steady steps: ``torch.cuda.set_sync_debug_mode("error")`` around a step of FOGO
   (memory on), K-FAC and FOP that is not a write / factor / inverse step, finite and NaN.
2. A dropped step on the device changes nothing: FOGO with NaN at some steps equals, bit for
   bit, the run that never took them (bf16 Newton-Schulz, memory writes crossed).
3. GradScaler("cuda") with fp16 autocast: FOGO takes the protocol path (``step`` is called on
   overflow steps, counted in ``skipped_steps``) and stays finite.

    python scripts/device_checks.py --device cuda
"""

from __future__ import annotations

import argparse
import traceback

import torch
import torch.nn.functional as F

from orthoptim import FOGO, FOP, KFAC
from orthoptim.benchmarks import speed
from orthoptim.optim.param_groups import param_groups


def case(device):
    model, x, y = speed.CASES["tiny"].build()
    return model.to(device), x.to(device), y.to(device)


def train_step(opt, model, x, y, nan=False):
    opt.zero_grad()
    loss = speed._loss(model, x, y)
    loss.backward()
    if nan:
        next(p for p in model.parameters() if p.ndim == 2).grad.view(-1)[0] = float("nan")
    opt.step()


def check_sync_free(device) -> None:
    builds = {
        "FOGO": lambda m: FOGO(param_groups(m, verbose=False), lr=1e-3, write_interval=50),
        "KFAC": lambda m: KFAC(m, factor_interval=10, inverse_interval=10),
        "FOP": lambda m: FOP(m, factor_interval=10, inverse_interval=10),
    }
    for name, build in builds.items():
        for nan in (False, True):
            model, x, y = case(device)
            opt = build(model)
            for _ in range(3):
                train_step(opt, model, x, y)
            opt.zero_grad()
            speed._loss(model, x, y).backward()
            if nan:
                next(p for p in model.parameters() if p.ndim == 2).grad.view(-1)[0] = float("nan")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
                ok, why = True, ""
            except RuntimeError as e:
                ok, why = False, str(e).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            print(f"{'PASS' if ok else 'FAIL'} sync-free steady step {name} nan={nan} {why}")


def check_nan_exactness(device) -> None:
    bad = {0, 4, 9, 10, 23}
    runs = []
    for skip_them in (False, True):
        model, x, y = case(device)
        opt = FOGO(param_groups(model, verbose=False), lr=1e-2, write_interval=5)
        gen = torch.Generator().manual_seed(0)
        for i in range(30):
            xi = torch.randint(0, 64, x.shape, generator=gen).to(device)
            if i in bad:
                if not skip_them:
                    train_step(opt, model, xi, torch.roll(xi, -1, 1), nan=True)
                continue
            train_step(opt, model, xi, torch.roll(xi, -1, 1))
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    same = all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    writes = o1.memory_stats()["writes"]
    print(f"{'PASS' if same and o1.skipped_steps == len(bad) else 'FAIL'} NaN steps dropped on "
          f"the device equal the run without them (skipped {o1.skipped_steps}, writes {writes}, "
          f"ns_dtype {o1.param_groups[0]['ns_dtype']})")  # fmt: skip


def check_grad_scaler(device) -> None:
    model, x, y = case(device)
    opt = FOGO(param_groups(model, verbose=False), lr=1e-3, write_interval=5)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)  # overflows for ~10 steps
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(x)[0]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    ok = finite and 0 < opt.skipped_steps < 20  # dropped the overflows, then trained
    print(f"{'PASS' if ok else 'FAIL'} GradScaler(cuda)+fp16 autocast: skipped "
          f"{opt.skipped_steps} overflow steps through the protocol, scale {scaler.get_scale()}, "
          f"finite {finite}")  # fmt: skip


def run_checks(description: str, checks) -> None:
    """Parse ``--device``, then run each ``check(device)``, a failure reported and the next run."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for check in checks:
        try:
            check(torch.device(args.device))
        except Exception:  # noqa: BLE001 - report and go on to the next check
            print(f"FAIL {check.__name__}: {traceback.format_exc()}")


def main() -> None:
    run_checks(__doc__.splitlines()[0], (check_sync_free, check_nan_exactness, check_grad_scaler))


if __name__ == "__main__":
    main()
