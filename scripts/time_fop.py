"""Time per training step of K-FAC, FOP one-pass and FOP two-pass, side by side (CPU or GPU).

Each optimizer trains its own copy of the same small CNN on the same fixed batch. A window is
``--interval`` steps (one factor update and one inverse update each, so the curvature cost is
amortised exactly); windows of the three methods are interleaved (order rotated every round) and
the per-step time is the median over ``--rounds`` windows. A step is forward + backward + ``step()``
(two half-batch passes for the two-pass mode; ``--fallback`` adds one-pass FOP on layer
subclasses, which takes the extra-product fallback). Ratios are given two ways: of the medians, and the
median of the per-round ratios (windows of one round run back to back, so load drift between
rounds cancels).

``--breakdown`` then runs ``--rounds`` more paired K-FAC / one-pass windows with timers on the
work one-pass FOP cannot avoid without changing its math: the three Kronecker products per layer
against K-FAC's one (``FOP._products`` minus ``KFAC._precondition``). The half-batch split itself
has no separate cost to time: autograd forms each stock layer's weight gradient as two half-batch
products instead of one (``curvature.split.HalfBatchWeightGrad``), so it is part of "everything
else". Those windows are not used for the ratios above (the timers add a little overhead).

    python scripts/time_fop.py --rounds 7 --batch 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from orthoptim import FOP, KFAC
from orthoptim.benchmarks.models import SmallCNN


def small_cnn(width: int) -> nn.Module:
    torch.manual_seed(0)
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * w, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    """The large-batch benchmark's MLP 784-256-256-10 (inputs: flattened 28x28 images)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))  # fmt: skip


class _OwnForwardConv(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight, self.bias)


class _OwnForwardLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def own_forward(model: nn.Module) -> nn.Module:
    """The same model with layer subclasses that override ``forward``: FOP then takes its
    extra-product fallback (one half-batch product per layer in the gradient hook), which was
    every layer's one-pass path before ``HalfBatchWeightGrad``."""
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = _OwnForwardConv
        elif type(m) is nn.Linear:
            m.__class__ = _OwnForwardLinear
    return model


def bench_cnn() -> nn.Module:
    """The small CNN of the ``large-batch-cnn`` benchmark (channels 8 and 16, hidden 64)."""
    torch.manual_seed(0)
    return SmallCNN(1, 10, 28, channels=(8, 16), hidden=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--model", choices=("cnn", "mlp", "bench-cnn"), default="cnn",
                    help="cnn: 3 conv + 2 linear on 3x16x16; mlp: 784-256-256-10; bench-cnn: the "
                         "small CNN of the large-batch-cnn benchmark on 1x28x28")  # fmt: skip
    ap.add_argument("--image", type=int, default=16, help="CNN input side (the MLP takes 28x28)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--interval", type=int, default=10, help="factor and inverse interval")
    ap.add_argument("--rounds", type=int, default=7, help="timed windows per method")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machines: 1)")
    ap.add_argument(
        "--fallback", action="store_true",
        help="also time one-pass FOP through its extra-product fallback (fop_extra_product)",
    )  # fmt: skip
    ap.add_argument(
        "--passes", action="store_true",
        help="instead: plain autograd, one full-batch forward/backward vs two half-batch ones",
    )  # fmt: skip
    ap.add_argument(
        "--breakdown", action="store_true",
        help="extra paired windows that time FOP's inherent extra work (see the docstring)",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(1)
    shape = (3, args.image, args.image) if args.model == "cnn" else (1, 28, 28)
    build = {"cnn": lambda: small_cnn(args.width), "mlp": mlp, "bench-cnn": bench_cnn}[args.model]
    x = torch.randn(args.batch, *shape, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    kw = dict(lr=0.01, damping=1e-2, factor_interval=args.interval, inverse_interval=args.interval)

    if args.passes:
        passes(args, build, x, y, dev)
        return

    def make(cls, wrap=lambda m: m):
        model = wrap(build()).to(dev)
        return model, cls(model, **kw)

    runs = {"kfac": make(KFAC), "fop_one_pass": make(FOP), "fop_two_pass": make(FOP)}
    if args.fallback:
        runs["fop_extra_product"] = make(FOP, own_forward)

    def one_step(name, model, opt):
        opt.zero_grad()
        if name == "fop_two_pass":
            opt.backward_two_pass(x, y, F.cross_entropy)
        else:
            F.cross_entropy(model(x), y).backward()
        opt.step()

    def window(name) -> float:
        model, opt = runs[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.interval):
            one_step(name, model, opt)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.interval

    names = list(runs)
    for name in names:  # warm-up window
        window(name)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(window(name))
    med = {n: statistics.median(t) for n, t in times.items()}
    print("command: python " + " ".join(sys.argv))
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
          f"model {args.model}, batch {args.batch}x{'x'.join(map(str, shape))}, width {args.width}, "
          f"interval {args.interval}, rounds {args.rounds}")  # fmt: skip
    for n in names:
        lo, hi = 1e3 * min(times[n]), 1e3 * max(times[n])
        print(f"{n:14s} median {1e3 * med[n]:8.2f} ms/step (min {lo:.2f}, max {hi:.2f})")
    pairs = [("fop_one_pass", "kfac"), ("fop_two_pass", "kfac"), ("fop_one_pass", "fop_two_pass")]
    if args.fallback:
        pairs += [("fop_extra_product", "kfac"), ("fop_one_pass", "fop_extra_product")]
    for a, b in pairs:
        paired = statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True))
        wins = sum(ta < tb for ta, tb in zip(times[a], times[b], strict=True))
        print(f"ratio {a} / {b}: of medians {med[a] / med[b]:.3f}, "
              f"median per round {paired:.3f} ({a} faster in {wins}/{args.rounds} rounds)")  # fmt: skip
    if args.breakdown:
        breakdown(args, runs, window, dev)


def passes(args, build, x, y, dev) -> None:
    """Plain autograd (no optimizer, no hooks): is one full-batch forward/backward cheaper than
    two half-batch ones on this device? (The cost model behind one-pass vs two-pass FOP.)"""
    model = build().to(dev)
    params = list(model.parameters())

    def run(two: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(args.interval):
            chunks = zip(x.chunk(2), y.chunk(2), strict=True) if two else [(x, y)]
            for xs, ys in chunks:
                torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.interval

    run(False), run(True)  # warm-up
    rows = [(run(False), run(True)) for _ in range(args.rounds)]
    one, two = (statistics.median(c) for c in zip(*rows, strict=True))
    ratio = statistics.median(b / a for a, b in rows)
    print(f"model {args.model}, batch {args.batch}: one pass {1e3 * one:.2f} ms, two half passes "
          f"{1e3 * two:.2f} ms; two / one median per round {ratio:.3f}")  # fmt: skip


def breakdown(args, runs, window, dev) -> None:
    spent = {"products": 0.0, "kfac_products": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            spent[key] += time.perf_counter() - t0
            return out

        return wrapper

    fop, kfac = runs["fop_one_pass"][1], runs["kfac"][1]
    fop._products = timed(fop._products, "products")
    kfac._precondition = timed(kfac._precondition, "kfac_products")
    rows = []
    for _ in range(args.rounds):
        for key in spent:
            spent[key] = 0.0
        t_kfac, t_fop = window("kfac"), window("fop_one_pass")
        extra = (spent["products"] - spent["kfac_products"]) / args.interval
        rows.append((t_kfac, t_fop, extra))
    t_kfac, t_fop, extra = (statistics.median(c) for c in zip(*rows, strict=True))
    print(f"breakdown ({args.rounds} paired windows, medians, ms/step): kfac {1e3 * t_kfac:.2f}, "
          f"fop_one_pass {1e3 * t_fop:.2f}")  # fmt: skip
    print(f"  2 extra Kronecker products per layer {1e3 * extra:.2f} = {extra / t_kfac:.3f} x kfac")
    rest = statistics.median((f - k - e) / k for k, f, e in rows)
    print(f"  inherent floor of fop_one_pass / kfac = {1 + extra / t_kfac:.3f}; "
          f"everything else {rest:+.3f} x kfac")  # fmt: skip

if __name__ == "__main__":
    main()
