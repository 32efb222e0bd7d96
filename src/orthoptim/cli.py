"""The ``orthoptim`` command line: list, run, suite, tune, report, speed.

    orthoptim list tasks            # or: list optimizers, list suites
    orthoptim suite quick [--out runs/quick] [--jobs 2]          # the main job
    orthoptim suite paper --data-dir ../shared/data --jobs 2
    orthoptim run continual-permuted -o fogo -o adamw --seeds 0 1 --preset quick
    orthoptim tune longtail -o adamw -o fogo --preset quick --write
    orthoptim report runs/quick
    orthoptim speed --shapes gpt --json speed.json   # optimizer step side by side (--device cuda)
    torchrun --nproc-per-node 2 -m orthoptim run large-batch -o sgd --preset tiny

Every run is appended to ``<out>/results.jsonl``; re-running the same command skips completed
runs, so an interrupted suite resumes. Each run uses one torch thread unless ``--threads N`` says
otherwise (tiny models gain nothing from more, and on a busy machine extra threads only contend).
Bad arguments end with one line ``orthoptim: error: ...`` and exit status 2. Output cut short by
the reader (``orthoptim list tasks | head -3``) ends quietly with exit status 141, as for other
shell tools killed by SIGPIPE.

Under ``torchrun`` (``orthoptim run`` only, for the tasks that support it: large-batch,
large-batch-cnn, lm-pretrain, lm-continual) every worker runs the same command: the process group
comes from torchrun's environment (gloo on CPU, NCCL on CUDA), each run's global batch is split
over the ranks (:mod:`orthoptim.benchmarks.ddp`), rank 0 evaluates, prints and records, and the
group is destroyed on exit, also after an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _kv(text: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as JSON when it is JSON (numbers, bools, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="orthoptim",
        description="Benchmarks for orthogonal optimizers (FOGO, FOP) and their baselines.",
        epilog="Results: <out>/results.jsonl (resumable), report: <out>/report.md.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    ls = sub.add_parser("list", help="list tasks, optimizers or suites")
    ls.add_argument("what", choices=("tasks", "optimizers", "suites"))

    def common(sp, out_default):
        sp.add_argument("--out", default=out_default, help="results folder (default %(default)s)")
        sp.add_argument("--data-dir", default=None, help="root of the real datasets")
        sp.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
        sp.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
        sp.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run")
        sp.add_argument("--config", default=None, help="hyperparameter config JSON")
        sp.add_argument("--no-report", action="store_true", help="do not render the report")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    su = sub.add_parser("suite", help="run a named suite (quick, paper) and write its report")
    su.add_argument("name", help="suite name (see `orthoptim list suites`)")
    common(su, None)
    su.add_argument("--optimizers", nargs="+", default=None, help="only these optimizers")
    su.add_argument("--tasks", nargs="+", default=None, help="only these tasks")

    ru = sub.add_parser("run", help="run one task for some optimizers and seeds")
    ru.add_argument("task", help="task name (see `orthoptim list tasks`)")
    ru.add_argument("-o", "--optimizer", action="append", required=True, dest="optimizers",
                    help="optimizer name (repeat for several)")  # fmt: skip
    ru.add_argument("--preset", default="quick", help="settings preset (default %(default)s)")
    ru.add_argument("--set", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                    help="override a task setting")  # fmt: skip
    ru.add_argument("--hp", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                    help="override an optimizer hyperparameter (all optimizers)")  # fmt: skip
    ru.add_argument("--label", default=None, help="report group label")
    common(ru, "runs/single")

    tu = sub.add_parser("tune", help="tune the lr of optimizers on a task's validation split")
    tu.add_argument("task")
    tu.add_argument("-o", "--optimizer", action="append", required=True, dest="optimizers")
    tu.add_argument("--preset", default="quick")
    tu.add_argument("--points", type=int, default=5, help="lr grid points (same for all)")
    tu.add_argument("--seeds", type=int, nargs="+", default=[0])
    tu.add_argument("--data-dir", default=None)
    tu.add_argument("--config", default=None, help="config JSON to read and, with --write, update")
    tu.add_argument("--write", action="store_true", help="store the chosen lrs in the config")
    tu.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    tu.add_argument("--quiet", action="store_true")

    rp = sub.add_parser("report", help="render report.md and figures from saved results")
    rp.add_argument("out", help="results folder holding results.jsonl")
    rp.add_argument("--title", default="orthoptim benchmark report")

    sp = sub.add_parser("speed", help="time the optimizer step side by side with torch.optim")
    sp.add_argument("--shapes", default="gpt",
                    help="gpt, gpt2-small, char-gpt, resnet20, bench-cnn, tiny, or "
                         "module:callable returning (model, inputs, targets) "
                         "(default %(default)s)")  # fmt: skip
    sp.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    sp.add_argument("--rounds", type=_positive, default=7, help="timed rounds (medians)")
    sp.add_argument("--steps", type=_positive, default=2, help="steps per round and optimizer")
    sp.add_argument("--warmup", type=_positive, default=2, help="untimed steps per instance")
    sp.add_argument("--compile", action="store_true", help="torch.compile every step()")
    sp.add_argument("-o", "--optimizer", action="append", dest="optimizers", default=None,
                    help="only this contender (repeat; default all)")  # fmt: skip
    sp.add_argument("--threads", type=_positive, default=1,
                    help="torch CPU threads (default %(default)s)")  # fmt: skip
    sp.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock, or the process's CPU time (CPU device only: steadier on "
                         "a shared machine) (default %(default)s)")  # fmt: skip
    sp.add_argument("--json", default=None, help="also write the figures to this JSON file")
    sp.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _bar(desc: str, total: int | None, quiet: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, **kw)


def _execute(plans, args, title: str, parallel=None) -> int:
    from .benchmarks import report, runner
    from .benchmarks.results import ResultStore

    main_rank = parallel is None or parallel.is_main
    say = print if main_rank else _silent
    quiet = args.quiet or not main_rank
    store = ResultStore(args.out)
    done_before = store.completed() if main_rank else set()
    todo = [p for p in plans if p.key not in done_before]
    say(f"{len(plans)} runs planned, {len(plans) - len(todo)} already in {store.path}")
    bar = _bar("runs", len(todo), quiet, position=0)
    from .benchmarks.progress import TqdmProgress

    steps: list[TqdmProgress] = []

    def factory(desc):
        steps.append(TqdmProgress(desc, quiet, position=1))
        return steps[-1]

    def on_done(rec):
        if steps:
            steps.pop().close()
        bar.update(1)
        bar.set_postfix_str(f"{rec['label']} {rec['optimizer']} s{rec['seed']}")

    t0 = time.perf_counter()
    failures: list = []
    try:
        runner.run_plan(
            todo, store, data_dir=args.data_dir, jobs=args.jobs, threads=args.threads,
            on_done=on_done, progress_factory=None if args.jobs > 1 else factory,
            failures=failures, parallel=parallel,
        )  # fmt: skip
    finally:
        bar.close()
    say(f"finished in {time.perf_counter() - t0:.0f} s; results in {store.path}")
    where = "" if parallel is None else f"[rank {parallel.rank}] "
    for plan, exc in failures:
        print(f"FAILED {where}{plan.label or plan.task} {plan.optimizer} seed {plan.seed}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)  # fmt: skip
    if main_rank and not args.no_report and store.records():
        command = "orthoptim " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        path = report.render_report(store.records(), args.out, title=title, command=command)
        print(f"report: {path}")
    if failures:
        print(f"orthoptim: {len(failures)} run(s) failed (not stored; re-run to retry)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _cmd_list(args) -> int:
    if args.what == "tasks":
        from .benchmarks.tasks import all_tasks

        for t in all_tasks().values():
            metrics = ", ".join(f"{m.name} ({m.goal})" for m in t.metrics[:3])
            print(f"{t.name:24s} [{t.family}] {t.description}\n{'':24s} metrics: {metrics}; "
                  f"presets: {', '.join(t.presets)}")  # fmt: skip
    elif args.what == "optimizers":
        from .benchmarks import registry

        for name in registry.list_optimizers(include_peers=False):
            print(f"{name:14s} {registry.get_optimizer(name).description}")
        peers = [n for n in registry.list_optimizers() if registry.get_optimizer(n).kind == "peer"]
        if peers:
            print(f"\n{len(peers)} peers from pytorch-optimizer: {', '.join(peers)}")
        else:
            print("\n(pip install pytorch-optimizer for Lion, AdaBelief, Adan, AdamP, SPAM, ...)")
    else:
        from .benchmarks.suites import SUITES

        for s in SUITES.values():
            n = sum(len(it.optimizers) for it in s.items) * len(s.seeds)
            print(f"{s.name:8s} {s.description}; {n} runs")
    return 0


def _cmd_suite(args) -> int:
    from .benchmarks.hparams import load_hparams
    from .benchmarks.suites import get_suite, plan_suite

    suite = get_suite(args.name)
    if suite.needs_data and args.data_dir is None:
        raise ValueError(f"suite {suite.name!r} reads real datasets: pass --data-dir DIR")
    args.out = args.out or f"runs/{suite.name}"
    plans = plan_suite(suite, load_hparams(args.config), args.seeds, args.optimizers, args.tasks)
    return _execute(plans, args, f"orthoptim `{suite.name}` suite")


def _silent(*args, **kwargs) -> None:
    pass


def _torchrun_world() -> int | None:
    """The number of processes of a torchrun launch, None outside one."""
    from .distributed import launched_by_torchrun

    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else None


def _cmd_run(args) -> int:
    from .benchmarks import registry
    from .benchmarks.hparams import load_hparams
    from .benchmarks.runner import PlannedRun, check_data_parallel
    from .benchmarks.tasks import get_task

    spec = get_task(args.task)
    overrides = dict(args.set)
    spec.settings(args.preset, **overrides)  # validate before anything runs
    world = _torchrun_world()
    config = load_hparams(args.config)
    plans = []
    for opt in args.optimizers:
        registry.get_optimizer(opt)
        if world is not None:  # refused on every rank, before any process group exists
            check_data_parallel(spec.name, opt)
        hp, source = config.lookup(spec.name, opt)
        if args.hp:
            hp, source = {**hp, **dict(args.hp)}, f"{source} + command line"
        for seed in args.seeds or [0]:
            plans.append(
                PlannedRun(spec.name, args.preset, opt, seed, hp, source, overrides, args.label,
                           world_size=world or 1)
            )  # fmt: skip
    title = f"orthoptim run {spec.name}"
    if world is None:
        return _execute(plans, args, title)
    if args.jobs != 1:
        raise ValueError(f"Invalid jobs: {args.jobs} under torchrun; each rank is one process")
    from .benchmarks.ddp import DataParallel
    from .distributed import process_group_from_env

    with process_group_from_env() as device:
        return _execute(plans, args, title, DataParallel.from_process_group(device))


def _cmd_tune(args) -> int:
    import torch

    from .benchmarks import tuning

    if args.threads < 1:
        raise ValueError(f"Invalid threads: {args.threads}; expected an integer >= 1")
    prev = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return tuning.tune_command(args)
    finally:
        torch.set_num_threads(prev)


def _cmd_speed(args) -> int:
    from .benchmarks import speed

    return speed.speed_command(args)


def _cmd_report(args) -> int:
    from .benchmarks import report
    from .benchmarks.results import ResultStore

    store = ResultStore(args.out)
    records = store.records()
    if not records:
        raise ValueError(f"no results in {store.path}: run `orthoptim suite` or `run` first")
    print(f"report: {report.render_report(records, args.out, title=args.title)}")
    return 0


_COMMANDS = {"list": _cmd_list, "suite": _cmd_suite, "run": _cmd_run, "tune": _cmd_tune,
             "report": _cmd_report, "speed": _cmd_speed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``orthoptim`` console script; returns the exit status."""
    from .benchmarks._verify import DataError

    try:
        args = build_parser().parse_args(argv)
        if args.command != "run" and _torchrun_world() is not None:
            raise ValueError(f"Invalid command: {args.command!r} under torchrun; only `run` is")
        return _COMMANDS[args.command](args)
    except (_UsageError, ValueError, DataError) as e:
        msg = " ".join(str(e).split())
        where = f"[rank {os.environ['RANK']}] " if _torchrun_world() is not None else ""
        print(f"orthoptim: error: {where}{msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orthoptim: interrupted; completed runs are saved, re-run to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader closed the pipe (`| head`). Point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and exit like a tool killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE (13): the shell's status for a tool killed by it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
