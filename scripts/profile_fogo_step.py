"""Where FOGO's step time goes, on a shape set of ``orthoptim speed`` (default: the GPT stack).

FOGO's steady step (no memory write) on fixed gradients, with a timer around each part of the
step (the functions and methods the step calls, wrapped; a device sync before and after each):
the non-finite check, the gradients' mask of a dropped step, the momentum streams,
Newton-Schulz, the fusion, the step counters, the memory's accumulation (sketch and
output-energy profile) and correction, the RMS scale, the masked parameter update, AdamW, and
what is left (Python, stacking, the loop). The write step is timed apart, on an instance that
writes every step. Then the top operators by self time (torch.profiler). ``--clock cpu`` (CPU
only) times with the process's CPU time, steadier on a shared machine (``orthoptim speed``'s
``--clock``).

    python scripts/profile_fogo_step.py --steps 5 --threads 1
    python scripts/profile_fogo_step.py --shapes gpt --steps 5 --clock cpu --set memory=false
    python scripts/profile_fogo_step.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

from orthoptim.benchmarks import speed
from orthoptim.memory.bucket import MemoryBucket
from orthoptim.optim import _fogo_math, _fogo_state, _nonfinite
from orthoptim.optim.fogo import FOGO
from orthoptim.optim.param_groups import param_groups

# (where, attribute, label): the step's parts, each timed where the step calls it.
PARTS = (
    (_nonfinite, "begin_step", "non-finite check"),
    (_fogo_math, "finite_grads", "gradients zeroed on a dropped step"),
    (_fogo_math, "momentum_", "momentum streams"),
    (_fogo_math, "orthogonalize", "Newton-Schulz"),
    (_fogo_math, "fuse", "fusion (slerp)"),
    (_fogo_math, "count_steps_", "step counters"),
    (MemoryBucket, "accumulate", "memory: sketch and energy accumulation"),
    (MemoryBucket, "correct", "memory: correction"),
    (_fogo_math, "scaled", "RMS scale"),
    (_fogo_math, "apply_", "masked parameter update"),
    (FOGO, "_adamw", "AdamW"),
    (FOGO, "_scheduled_writes", "memory writes (schedule and writes)"),
)


def timed(fn, key, spent, device, clock):
    def wrapper(*args, **kwargs):
        speed._sync(device)
        t0 = clock()
        out = fn(*args, **kwargs)
        speed._sync(device)
        spent[key] += clock() - t0
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="gpt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=15, help="operators listed by the profiler")
    ap.add_argument("--clock", choices=sorted(speed.CLOCKS), default="wall")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a FOGO keyword, e.g. --set dual_stream=false --set memory=false",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.clock == "cpu" and dev.type != "cpu":
        raise SystemExit("--clock cpu times CPU work only; use the wall clock on an accelerator")
    clock = speed.CLOCKS[args.clock]
    model, x, y = speed.load_case(args.shapes).build()
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    speed._loss(model, x, y).backward()

    options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}

    def build(**kw):
        return FOGO(param_groups(model, verbose=False), lr=1e-3, **{**options, **kw})

    print(f"shapes {args.shapes}, device {dev}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, {args.steps} timed steps (medians), clock {args.clock}, "
          f"FOGO {options}")  # fmt: skip
    variants = [("steady (no write)", dict(write_interval=0))]
    if options.get("memory", True):
        variants.append(("write every step", dict(write_interval=1)))
    for label, kw in variants:
        opt = build(**kw)
        for _ in range(2):
            opt.step()
        spent: dict[str, float] = defaultdict(float)
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PARTS]
        for owner, name, fn in originals:
            setattr(owner, name, timed(fn, name, spent, dev, clock))
        rows, totals = defaultdict(list), []
        try:
            for _ in range(args.steps):
                spent.clear()
                speed._sync(dev)
                t0 = clock()
                opt.step()
                speed._sync(dev)
                totals.append(clock() - t0)
                for _, name, _ in PARTS:
                    rows[name].append(spent[name])
                rows["other"].append(totals[-1] - sum(spent.values()))
        finally:
            for owner, name, fn in originals:
                setattr(owner, name, fn)
        total = statistics.median(totals)
        print(f"\n{label}: step {1e3 * total:.1f} ms")
        for _, name, title in (*PARTS, (None, "other", "other: Python, stacking, loop")):
            t = statistics.median(rows[name])
            print(f"  {title:48s} {1e3 * t:9.2f} ms  {100 * t / total:5.1f}%")

    opt = build(write_interval=0)
    for _ in range(2):
        opt.step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            opt.step()
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"\ntop operators of {args.steps} steady steps (self time):")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=40))
    ranks = {
        _fogo_state.matrix_shape(p): _fogo_state.memory_config(
            g, _fogo_state.matrix_shape(p)
        ).codebook.rank
        for g in opt.param_groups if g["algorithm"] == "fogo" and g["memory"]
        for p in g["params"]
    }  # fmt: skip
    print(f"memory pool rank R per matrix shape: {ranks}")


if __name__ == "__main__":
    main()
