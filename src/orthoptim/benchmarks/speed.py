"""``orthoptim speed``: the optimizer step, side by side with torch.optim, in one process.

For a named shape set (a model and a batch: :data:`CASES`) or a user model given by import path,
every contender (:data:`CONTENDERS`) gets its own copy of the model (same initial weights) and is
timed in interleaved rounds (the order rotates every round, so load drift is shared):

* **step**: ``opt.step()`` alone, after warm-up, with a device synchronisation before and after
  (``--steps`` steps per round; the median and the spread over ``--rounds`` rounds). Optimizers
  that take parameters step on fixed gradients (one real backward at setup); K-FAC and FOP run a
  real forward/backward before every step, because their hooks capture it.
* **rare events, amortised**: FOGO's memory writes (every ``write_interval`` = 50 steps) and
  K-FAC/FOP's factor and inverse updates (every 10 steps) are timed with a second instance that
  has the event on every step: amortised = steady + (event - steady) / period.
* **backward share** (K-FAC, FOP): the forward+backward with the optimizer's hooks minus the
  plain forward+backward of the same model (FOP's one-pass split forms each layer's weight
  gradient as two half-batch products; K-FAC's hooks save inputs and output gradients on factor
  steps), amortised the same way. ``total`` = amortised step + amortised backward share.
* **state bytes per parameter byte** of each contender, after warm-up.
* **Newton-Schulz**: FLOPs of five iterations on the model's orthogonalized matrices (grouped by
  shape and run as FOGO runs them: one batched call on accelerators, large matrices one by one on
  the CPU; 4 m^2 n + 2 m^3 per iteration of an m x n matrix, m <= n), its achieved
  FLOP/s, against this machine's measured matmul FLOP/s (a square matmul in the same dtype).

Ratios are of medians measured in the same run. Speed targets live in docs/performance.md, never
in tests. The figures depend on the machine: the header says which. ``--clock cpu`` (CPU device
only) times with the process's CPU time instead of the wall clock: on a shared machine the time
the process waits for a core then does not count, which steadies the figures (other jobs still
share the caches); with ``--threads`` above 1 it adds up the threads' times.

    orthoptim speed                       # GPT-2-small-like stack (d=384, 6 blocks), this CPU
    orthoptim speed --shapes resnet20 --json speed.json
    orthoptim speed --device cuda         # everything on the GPU, one command
    orthoptim speed --shapes mypkg.models:speed_case   # a callable returning (model, x, y)
"""

from __future__ import annotations

import copy
import importlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from orthoptim.ops.newton_schulz import dtype_for_device, newton_schulz
from orthoptim.optim.fogo import FOGO
from orthoptim.optim.fop import FOP
from orthoptim.optim.kfac import KFAC
from orthoptim.optim.param_groups import param_groups

__all__ = ["CASES", "CONTENDERS", "Case", "load_case", "run_speed", "format_report"]


# ----------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """A model and one batch: ``build() -> (model, inputs, targets)`` (the loss is cross-entropy
    of the logits, leading dims flattened)."""

    name: str
    description: str
    build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]] = field(repr=False)


def _gpt(d: int, layers: int, heads: int, vocab: int, batch: int, tokens: int):
    def build():
        from orthoptim.benchmarks.gpt import GPT, GPTConfig

        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=vocab, block_size=tokens, n_layer=layers, n_head=heads,
                        n_embd=d)  # fmt: skip
        x = torch.randint(0, vocab, (batch, tokens))
        return GPT(cfg), x, torch.roll(x, -1, dims=1)

    return build


def _cnn(kind: str, batch: int):
    def build():
        from orthoptim.benchmarks.models import ResNet, SmallCNN

        torch.manual_seed(0)
        if kind == "resnet20":
            model, shape = ResNet(20, 3, 10, 16), (3, 32, 32)
        else:  # the large-batch-cnn benchmark's CNN
            model, shape = SmallCNN(1, 10, 28, channels=(8, 16), hidden=64), (1, 28, 28)
        return model, torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

    return build


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("gpt", "GPT-2-small-like stack scaled for CPU: d=384, 6 blocks, 6 heads, vocab "
             "4096 (tied head), batch 8 x 64 tokens", _gpt(384, 6, 6, 4096, 8, 64)),
        Case("gpt2-small", "GPT-2 small (d=768, 12 blocks, 12 heads, vocab 50257, tied head), "
             "batch 8 x 256 tokens: for accelerators", _gpt(768, 12, 12, 50257, 8, 256)),
        Case("resnet20", "CIFAR ResNet-20 (width 16, 0.27M parameters), batch 128 x 3x32x32",
             _cnn("resnet20", 128)),
        Case("bench-cnn", "the large-batch-cnn benchmark's small CNN (channels 8, 16, hidden "
             "64), batch 1024 x 1x28x28", _cnn("bench-cnn", 1024)),
        Case("char-gpt", "the lm-pretrain benchmark's char-level GPT (d=128, 4 blocks, 4 heads, "
             "vocab 65, tied head), batch 12 x 64 tokens", _gpt(128, 4, 4, 65, 12, 64)),
        Case("tiny", "GPT with d=32, 2 blocks, vocab 64, batch 2 x 8 tokens (for tests)",
             _gpt(32, 2, 2, 64, 2, 8)),
    )
}  # fmt: skip


def load_case(name: str) -> Case:
    """A case from :data:`CASES`, or ``"package.module:callable"`` whose callable returns
    ``(model, inputs, targets)``."""
    if name in CASES:
        return CASES[name]
    if ":" not in name:
        raise ValueError(
            f"Invalid shapes: {name!r}; expected one of {sorted(CASES)} or 'module:callable'"
        )
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"Invalid shapes: {name!r}: cannot import it ({e})") from None
    return Case(name, f"user model {name}", fn)


# ----------------------------------------------------------------------------- contenders
class _Chain:
    """Several optimizers stepped as one (Muon on the matrices + AdamW on the rest)."""

    def __init__(self, *optimizers):
        self.optimizers = [o for o in optimizers if o is not None]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


class PlainMuon(torch.optim.Optimizer):
    """Muon written plainly, one matrix at a time, Newton-Schulz in float32: the baseline for
    FOGO's single-stream mode at the same precision (torch.optim.Muon works in bfloat16).

    ``M <- mu M + (1 - mu) G`` (EMA), direction ``G + mu (M - G)`` (Nesterov), conv kernels as
    out x in*kh*kw, ``W <- (1 - lr wd) W - lr 0.2 sqrt(max(m, n)) NS(direction)`` (torch's
    ``match_rms_adamw``)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.reshape(p.shape[0], -1)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
                buf.lerp_(grad, 1 - g["momentum"])
                update = newton_schulz(grad.lerp(buf, g["momentum"]), dtype="float32")
                p.mul_(1 - g["lr"] * g["weight_decay"])
                scale = 0.2 * max(grad.shape) ** 0.5
                p.add_(update.view_as(p), alpha=-g["lr"] * scale)


def _split(model: nn.Module) -> tuple[list, list]:
    groups = param_groups(model, verbose=False)
    hidden = next((g["params"] for g in groups if g["algorithm"] == "fogo"), [])
    rest = next((g["params"] for g in groups if g["algorithm"] == "adamw"), [])
    return hidden, rest


def _adamw(params, **kw):
    return torch.optim.AdamW(params, lr=1e-3, foreach=True, **kw) if params else None


def _torch_muon(model):
    hidden, rest = _split(model)
    if any(p.ndim != 2 for p in hidden):
        raise NotImplementedError("torch.optim.Muon takes 2-D parameters only (conv kernels)")
    muon = torch.optim.Muon(hidden, lr=1e-3, adjust_lr_fn="match_rms_adamw")
    return _Chain(muon, _adamw(rest))


def _plain_muon(model):
    hidden, rest = _split(model)
    return _Chain(PlainMuon(hidden, lr=1e-3), _adamw(rest))


def _fogo(**kw):
    return lambda model: FOGO(param_groups(model, verbose=False), lr=1e-3, **kw)


_SINGLE = dict(dual_stream=False, memory=False, nesterov=True, scale="muon")  # Muon's mode


@dataclass(frozen=True)
class Contender:
    """One optimizer of the comparison.

    Attributes:
        name: column name.
        description: one line for the report.
        build: ``build(model) -> optimizer`` (anything with ``step`` and ``zero_grad``).
        model_based: hooks the model (K-FAC, FOP): a forward/backward before every step.
        event: ``(build, period)``: the same optimizer with its rare event (memory write,
            factor + inverse update) on every step, and how often it happens by default.
    """

    name: str
    description: str
    build: Callable = field(repr=False)
    model_based: bool = False
    event: tuple[Callable, int] | None = field(default=None, repr=False)


_NEVER = 10**9  # an interval no timed run reaches: the steady instance of a rare event

CONTENDERS: list[Contender] = [
    Contender("adamw", "torch.optim.AdamW(foreach=True), every parameter",
              lambda m: _adamw(list(m.parameters()))),
    Contender("muon", "torch.optim.Muon (bf16 Newton-Schulz) + AdamW(foreach) on the rest",
              _torch_muon),
    Contender("muon-fp32", "plain float32 Muon (one matrix at a time) + AdamW(foreach)",
              _plain_muon),
    Contender("fogo-single-nomem", "FOGO single stream, no memory (Muon's mode; ns_dtype auto)",
              _fogo(**_SINGLE)),
    Contender("fogo-nomem", "FOGO two streams, no memory", _fogo(memory=False)),
    Contender("fogo", "FOGO default (two streams + memory, a write every 50 steps)",
              _fogo(write_interval=0), event=(_fogo(write_interval=1), 50)),
    Contender("kfac", "K-FAC defaults (factors and inverses every 10 steps)",
              lambda m: KFAC(m, factor_interval=_NEVER, inverse_interval=_NEVER),
              model_based=True,
              event=(lambda m: KFAC(m, factor_interval=1, inverse_interval=1), 10)),
    Contender("fop", "FOP defaults (one-pass split; factors and inverses every 10 steps)",
              lambda m: FOP(m, factor_interval=_NEVER, inverse_interval=_NEVER),
              model_based=True,
              event=(lambda m: FOP(m, factor_interval=1, inverse_interval=1), 10)),
]  # fmt: skip
"""Rare events are timed apart: ``build`` gives the steady instance (FOGO without scheduled
writes; K-FAC/FOP whose first step computes the factors and inverses, and no later step),
``event`` the instance with the event on every step."""


# ------------------------------------------------------------------------------ measuring
def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _tensor_bytes(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device)
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def state_bytes(opt) -> int:
    """Bytes of every tensor an optimizer keeps in its state (shared storage counted once)."""
    seen: set = set()
    optimizers = opt.optimizers if isinstance(opt, _Chain) else [opt]
    return sum(_tensor_bytes(dict(o.state), seen) for o in optimizers)


class _Runner:
    """One contender instance on its own model copy."""

    def __init__(self, build, model, x, y, model_based, compile_step):
        self.model = model
        self.x, self.y = x, y
        self.model_based = model_based
        self.opt = build(model)
        self.step_fn = self.opt.step
        if compile_step:
            optimizers = self.opt.optimizers if isinstance(self.opt, _Chain) else [self.opt]
            for o in optimizers:
                o.step = torch.compile(o.step)
            self.step_fn = self.opt.step
        if not model_based:  # fixed gradients: one real backward
            _loss(model, x, y).backward()

    def forward_backward(self):
        self.opt.zero_grad(set_to_none=True)
        _loss(self.model, self.x, self.y).backward()

    def measure(self, steps: int, device, clock=time.perf_counter) -> tuple[float, float]:
        """Seconds per step of ``step()`` and of the forward/backward before it (0 if none)."""
        t_step = t_fb = 0.0
        for _ in range(steps):
            if self.model_based:
                _sync(device)
                t0 = clock()
                self.forward_backward()
                _sync(device)
                t_fb += clock() - t0
            _sync(device)
            t0 = clock()
            self.step_fn()
            _sync(device)
            t_step += clock() - t0
        return t_step / steps, t_fb / steps


class _PlainForwardBackward:
    """The model's forward/backward without any optimizer hooks (the backward baseline)."""

    model_based = True

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y

    def measure(self, steps, device, clock=time.perf_counter):
        t = 0.0
        for _ in range(steps):
            self.model.zero_grad(set_to_none=True)
            _sync(device)
            t0 = clock()
            _loss(self.model, self.x, self.y).backward()
            _sync(device)
            t += clock() - t0
        return 0.0, t / steps


def _ns_flops(shape: tuple[int, int], steps: int = 5) -> int:
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m**3)


def _median_time(fn, device, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


# The timers of ``--clock``: the wall clock, or the process's CPU time (CPU device only).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def newton_schulz_rates(
    model: nn.Module, device, dtype: str, repeats: int, clock=time.perf_counter
) -> dict:
    """FLOPs, time and FLOP/s of one Newton-Schulz pass (one stream) over the orthogonalized
    matrices of ``model`` batched by shape, and the square matmul FLOP/s in the same dtype."""
    hidden, _ = _split(model)
    by_shape: dict[tuple, int] = {}
    for p in hidden:
        shape = (p.shape[0], p[0].numel())
        by_shape[shape] = by_shape.get(shape, 0) + 1
    gen = torch.Generator().manual_seed(0)
    stacks = [torch.randn(k, *s, generator=gen).to(device) for s, k in by_shape.items()]
    flops = sum(k * _ns_flops(s) for s, k in by_shape.items())
    t_ns = _median_time(
        lambda: [newton_schulz(x, dtype=dtype) for x in stacks], device, repeats, clock
    )
    size = 1024 if device.type == "cpu" else 8192
    torch_dtype = getattr(torch, dtype)
    a = torch.randn(size, size, generator=gen).to(device, torch_dtype)
    t_mm = _median_time(lambda: a @ a, device, repeats, clock)
    return {
        "dtype": dtype, "matrices": len(hidden), "flops": flops, "seconds": t_ns,
        "flops_per_s": flops / t_ns, "matmul_size": size,
        "matmul_flops_per_s": 2 * size**3 / t_mm, "fraction_of_matmul": (flops / t_ns) /
        (2 * size**3 / t_mm),
    }  # fmt: skip


def run_speed(
    case: Case,
    *,
    device: str = "cpu",
    rounds: int = 7,
    steps: int = 2,
    warmup: int = 2,
    compile_step: bool = False,
    contenders: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> dict:
    """Time every contender on ``case``; returns a JSON-serialisable dict (see the module doc).

    Args:
        case: the model and batch.
        device: torch device string.
        rounds: timed rounds (the order of the contenders rotates every round).
        steps: steps per contender per round (their mean is the round's figure).
        warmup: untimed steps per instance before the first round (compilation included).
        compile_step: wrap every optimizer's ``step`` in ``torch.compile``.
        contenders: names from :data:`CONTENDERS` (default: all).
        progress: called with a short line as work proceeds.
        clock: ``"wall"`` (default) or ``"cpu"``: the process's CPU time, on a CPU device only
            (see the module doc).
    """
    say = progress or (lambda _: None)
    dev = torch.device(device)
    if clock not in CLOCKS:
        raise ValueError(f"Invalid clock: {clock!r}; expected one of {sorted(CLOCKS)}")
    if clock == "cpu" and dev.type != "cpu":
        raise ValueError(
            f"Invalid clock: 'cpu' on device {dev}: a {dev.type} device works asynchronously, "
            "its time is not the process's CPU time; use clock='wall'"
        )
    timer = CLOCKS[clock]
    chosen = [c for c in CONTENDERS if contenders is None or c.name in contenders]
    unknown = sorted(set(contenders or []) - {c.name for c in CONTENDERS})
    if unknown:
        raise ValueError(f"Invalid contender(s) {unknown}; expected {[c.name for c in CONTENDERS]}")
    model, x, y = case.build()
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    runners: dict[str, object] = {"plain-fb": _PlainForwardBackward(copy.deepcopy(model), x, y)}
    failed: dict[str, str] = {}
    for c in chosen:
        builds = [(c.name, c.build)] + ([(c.name + "@event", c.event[0])] if c.event else [])
        for key, build in builds:
            say(f"building {key}")
            try:
                runner = _Runner(build, copy.deepcopy(model), x, y, c.model_based, compile_step)
                for _ in range(warmup):
                    runner.measure(1, dev, timer)
                runners[key] = runner
            except Exception as e:  # noqa: BLE001 - reported in the table, the rest go on
                failed[c.name] = f"{type(e).__name__}: {e}".splitlines()[0]
                runners.pop(c.name, None)
                break
    names = list(runners)
    times = {n: {"step": [], "fb": []} for n in names}
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t_step, t_fb = runners[n].measure(steps, dev, timer)
            times[n]["step"].append(t_step)
            times[n]["fb"].append(t_fb)
    plain_fb = statistics.median(times["plain-fb"]["fb"])
    rows = {}
    for c in chosen:
        if c.name in failed:
            rows[c.name] = {"description": c.description, "error": failed[c.name]}
            continue
        step = times[c.name]["step"]
        row = {
            "description": c.description, "step_median_s": statistics.median(step),
            "step_min_s": min(step), "step_max_s": max(step), "step_rounds_s": step,
            "state_bytes_per_param_byte": state_bytes(runners[c.name].opt) / param_bytes,
        }  # fmt: skip
        amortised = row["step_median_s"]
        backward = 0.0
        if c.model_based:
            backward = statistics.median(times[c.name]["fb"]) - plain_fb
            row["backward_share_s"] = backward
        if c.event:
            period = c.event[1]
            ev = times[c.name + "@event"]
            row["event_period"] = period
            row["event_step_median_s"] = statistics.median(ev["step"])
            amortised += (row["event_step_median_s"] - row["step_median_s"]) / period
            if c.model_based:
                ev_backward = statistics.median(ev["fb"]) - plain_fb
                row["event_backward_share_s"] = ev_backward
                backward += (ev_backward - backward) / period
        row["amortised_step_s"] = amortised
        row["total_s"] = amortised + backward
        rows[c.name] = row
    for base in ("adamw", "muon", "muon-fp32"):
        if base in rows and "total_s" in rows[base]:
            for row in rows.values():
                if "total_s" in row:
                    row[f"vs_{base}"] = row["total_s"] / rows[base]["total_s"]
    ns_dtype = dtype_for_device(dev)
    say("Newton-Schulz and matmul rates")
    ns = {
        d: newton_schulz_rates(model, dev, d, max(3, rounds), timer)
        for d in ("float32", "bfloat16")
    }
    for name in ("fogo-single-nomem", "fogo-nomem", "fogo"):
        if name in rows and "step_median_s" in rows[name]:
            streams = 1 if name == "fogo-single-nomem" else 2
            rows[name]["newton_schulz_share"] = (
                streams * ns[ns_dtype]["seconds"] / rows[name]["step_median_s"]
            )
    return {
        "case": case.name, "case_description": case.description, "device": str(dev),
        "device_name": _device_name(dev), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": steps,
        "compile": compile_step, "clock": clock,
        "parameters": sum(p.numel() for p in model.parameters()),
        "param_bytes": param_bytes, "plain_forward_backward_s": plain_fb,
        "ns_dtype_auto": ns_dtype, "newton_schulz": ns, "optimizers": rows,
    }  # fmt: skip


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


def format_report(res: dict) -> str:
    """The result as a plain-text table (absolute figures in ms, ratios, bytes, FLOP/s)."""
    lines = [
        f"case {res['case']}: {res['case_description']}",
        f"{res['parameters']:,} parameters; device {res['device']} ({res['device_name']}), torch "
        f"{res['torch']}, {res['threads']} threads; {res['rounds']} rounds x "
        f"{res['steps_per_round']} steps, medians; compile={res['compile']}; "
        f"clock {res.get('clock', 'wall')}",
        f"plain forward+backward {1e3 * res['plain_forward_backward_s']:.2f} ms",
        "",
        f"{'optimizer':18s} {'step ms':>9s} {'(min-max)':>17s} {'amortised':>10s} "
        f"{'+bwd ms':>8s} {'total ms':>9s} {'x adamw':>8s} {'x muon':>7s} {'x muon32':>9s} "
        f"{'state/param':>11s} {'NS share':>8s}",
    ]
    for name, r in res["optimizers"].items():
        if "error" in r:
            lines.append(f"{name:18s} n/a: {r['error']}")
            continue

        def ratio(key, r=r):
            return f"{r[key]:.2f}" if key in r else "-"

        bwd = r["total_s"] - r["amortised_step_s"] if "backward_share_s" in r else None
        spread = f"({1e3 * r['step_min_s']:.1f}-{1e3 * r['step_max_s']:.1f})"
        share = f"{r['newton_schulz_share']:.2f}" if "newton_schulz_share" in r else "-"
        lines.append(
            f"{name:18s} {1e3 * r['step_median_s']:9.2f} {spread:>17s} "
            f"{1e3 * r['amortised_step_s']:10.2f} "
            f"{'-' if bwd is None else f'{1e3 * bwd:.2f}':>8s} {1e3 * r['total_s']:9.2f} "
            f"{ratio('vs_adamw'):>8s} {ratio('vs_muon'):>7s} {ratio('vs_muon-fp32'):>9s} "
            f"{r['state_bytes_per_param_byte']:11.2f} {share:>8s}"
        )
    lines.append("")
    for d, ns in res["newton_schulz"].items():
        lines.append(
            f"Newton-Schulz {d}: {ns['matrices']} matrices, {ns['flops'] / 1e9:.2f} GFLOP per "
            f"stream in {1e3 * ns['seconds']:.2f} ms = {ns['flops_per_s'] / 1e9:.1f} GFLOP/s; "
            f"matmul {ns['matmul_size']}^3: {ns['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"(NS at {100 * ns['fraction_of_matmul']:.0f}%)"
        )
    lines.append(
        f"ns_dtype 'auto' on {res['device']} is {res['ns_dtype_auto']}. amortised = steady "
        "step + (event step - steady step) / period; +bwd = backward with the optimizer's hooks "
        "minus the plain backward (K-FAC, FOP); total = amortised + bwd; ratios of totals."
    )
    return "\n".join(lines)


def speed_command(args) -> int:
    """``orthoptim speed`` (see :func:`orthoptim.cli.build_parser`)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    case = load_case(args.shapes)
    res = run_speed(
        case, device=args.device, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
        compile_step=args.compile, contenders=args.optimizers,
        progress=None if args.quiet else (lambda s: print(s, flush=True)), clock=args.clock,
    )  # fmt: skip
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"json: {args.json}")
    return 0
