"""Step time of FOGO's ``protection="kronecker"`` next to the default memory and no memory
and of its shared factors with and without boundary detection (``kron_share="model"``,
``kron_detect``; docs/fogo.md, sections 10.6 and 10.8), side by side on ``orthoptim speed``'s
``gpt`` case.

The three optimizers step the same fixed gradients in turn, round after round (no scheduled
writes; the Kronecker one after an ``end_task``, so its preconditioners are dense); the first
round is dropped and the medians of the per-round ratios are printed (timings on a shared CPU
are noisy: compare ratios measured side by side).

    python scripts/fogo_kronecker_step_cost.py [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from orthoptim import FOGO, param_groups
from orthoptim.benchmarks import speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y = speed.load_case("gpt").build()
    speed._loss(model, x, y).backward()

    def build(**kw) -> FOGO:
        groups = param_groups(model, verbose=False)
        return FOGO(groups, lr=1e-6, ns_dtype="float32", write_interval=0, **kw)

    opts = {"no memory": build(memory=False), "default memory": build(),
            "kronecker": build(protection="kronecker"),
            "kron shared": build(protection="kronecker", kron_share="model"),
            "kron detect": build(protection="kronecker", kron_share="model", kron_detect=1.5)}  # fmt: skip
    for opt in opts.values():
        opt.step()
    for name in ("kronecker", "kron shared", "kron detect"):
        opts[name].end_task()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        frac = opts[name].memory_stats().get("memory_fraction", 0.0)
        print(f"{name:15s} median step {1000 * statistics.median(ts[1:]):8.1f} ms, "
              f"memory {100 * frac:5.1f}% of the protected parameters' bytes")  # fmt: skip
    for a, b in (("kronecker", "no memory"), ("kronecker", "default memory"),
                 ("default memory", "no memory"), ("kron shared", "no memory"),
                 ("kron shared", "default memory"), ("kron detect", "no memory"),
                 ("kron detect", "default memory")):  # fmt: skip
        ratio = statistics.median(x / y for x, y in zip(times[a][1:], times[b][1:], strict=True))
        print(f"{a} / {b}: median per-round ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
