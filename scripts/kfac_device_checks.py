"""K-FAC / FOP layer coverage on an accelerator, in one short run (PASS/FAIL per check).

1. The device computes what the CPU computes: a small ViT (patch conv, ``nn.MultiheadAttention``
   through its adapter, MLPs, head) in float64, K-FAC and FOP with factor and inverse updates,
   equal to the CPU run to 1e-9.
2. Sync-free steady steps with the hooks: forward, backward and ``step()`` of a step that is not a
   factor / inverse step, under ``torch.cuda.set_sync_debug_mode("error")``.
3. ``GradScaler("cuda")`` with fp16 autocast on the ViT: overflow steps dropped through the
   protocol, with and without ``scaler.unscale_`` (then ``grad_scaler=``), factors finite.

    python scripts/kfac_device_checks.py --device cuda
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from device_checks import run_checks  # scripts/ is on the path when a script runs

from orthoptim import FOP, KFAC
from orthoptim.benchmarks.models import ViT

KW = dict(lr=0.01, factor_interval=2, inverse_interval=2, exclude=["pos_embedding"])


def vit(device, dtype=torch.float32):
    torch.manual_seed(0)
    return ViT(1, 10, 28, 7, 32, 4, 2, 64).to(device, dtype)


def data(device, n, dtype=torch.float32, batch=64):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(batch, 1, 28, 28, generator=g).to(device, dtype),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(n)]  # fmt: skip


def step(opt, model, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def check_equal_to_cpu(device) -> None:
    for cls in (KFAC, FOP):
        runs = []
        for dev in ("cpu", device):
            model = vit(dev, torch.float64)
            opt = cls(model, factor_dtype="float64", **KW)
            for x, y in data(dev, 5, torch.float64):
                step(opt, model, x, y)
            runs.append([p.detach().cpu() for p in model.parameters()])
        cpu, dev = runs
        err = max(float((a - b).abs().max() / (b.abs().max() + 1e-30))
                  for a, b in zip(dev, cpu, strict=True))  # fmt: skip
        print(f"{'PASS' if err < 1e-9 else 'FAIL'} {cls.__name__} ViT float64 on {device} equals "
              f"the CPU run (max relative difference {err:.2e})")  # fmt: skip


def check_sync_free(device) -> None:
    for cls in (KFAC, FOP):
        model = vit(device)
        opt = cls(model, **KW)
        batches = data(device, 4)
        for x, y in batches[:3]:  # steps 0 (factors, inverses), 1, 2 (factors, inverses)
            step(opt, model, x, y)
        x, y = batches[3]  # step 3: steady
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        why = ""
        try:
            step(opt, model, x, y)
        except RuntimeError as e:
            why = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        print(f"{'FAIL' if why else 'PASS'} {cls.__name__} sync-free steady step on the ViT "
              f"(forward and backward hooks, attention adapter, step) {why}")  # fmt: skip


def check_grad_scaler(device) -> None:
    for cls in (KFAC, FOP):
        for unscale in (False, True):
            model = vit(device)
            scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)  # overflows at first
            opt = cls(model, grad_scaler=scaler if unscale else None, **KW)
            for x, y in data(device, 20):
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = F.cross_entropy(model(x).float(), y)
                scaler.scale(loss).backward()
                if unscale:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                scaler.step(opt)
                scaler.update()
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            factors = all(bool(torch.isfinite(opt.block_state(b)["G"]).all()) for b in opt._blocks)
            ok = finite and factors and 0 < opt.skipped_steps < 20
            print(f"{'PASS' if ok else 'FAIL'} {cls.__name__} GradScaler(cuda)+fp16 unscale_="
                  f"{unscale}: skipped {opt.skipped_steps} overflow steps, scale "
                  f"{scaler.get_scale()}, parameters finite {finite}, factors finite {factors}")


def main() -> None:
    run_checks(__doc__.splitlines()[0], (check_equal_to_cpu, check_sync_free, check_grad_scaler))


if __name__ == "__main__":
    main()
