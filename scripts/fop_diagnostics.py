"""Why FOP is level with K-FAC: what its per-layer coefficients do on the benchmark tasks.

Runs a task (``large-batch``, ``large-batch-cnn`` or ``longtail``) with FOP at its tuned lr for
each preset
and records, for every step and preconditioned layer, the inner products FOP computes (the
``fop_dots`` passed to ``fop_coefficients``) and the coefficients it returns. With
``a = <g_avg, P g_avg>``, ``y = <g_diff, P g_diff>`` (``P`` the damped inverse), the projection
``s``, ``D``, ``E`` and the clamped ``beta``, ``eta`` (see orthoptim.curvature.projection), it
prints medians over steps and layers of:

* ``noise = y / a``: the half-batch disagreement relative to the mean gradient (P-norms);
* ``beta`` and the share of steps where it sits on its clamp;
* ``perp = |beta| sqrt(E / a)``: the size of the orthogonal term ``beta g_perp`` relative to
  ``g_avg`` in the P-norm, i.e. how far FOP's direction is from K-FAC's;
* ``cos = D / sqrt(a E)``: the P-cosine of g_avg and g_perp (what beta* = D / E acts on);
* ``eta``: the layer step (2 when beta = 0: K-FAC at twice the lr).

    python scripts/fop_diagnostics.py --data-dir ../shared/data --presets paper-b128 paper-b1024 paper
    python scripts/fop_diagnostics.py --data-dir ../shared/data --task longtail --presets paper
"""

from __future__ import annotations

import argparse
import statistics

import torch

import orthoptim.optim.fop as fop_module
from orthoptim.benchmarks import hparams, registry
from orthoptim.benchmarks.tasks import get_task
from orthoptim.curvature import fop_terms

RECORDS: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
_coefficients = fop_module.fop_coefficients


def _recording(dots, **kwargs):
    out = _coefficients(dots, **kwargs)
    _, _, beta, eta = out
    RECORDS.append((dots.detach().double().clone(), beta.detach().double(), eta.detach().double()))
    return out


def summarize(beta_clamp: float) -> dict[str, float]:
    """Medians over all (step, layer) pairs of the quantities in the module docstring."""
    rows = {"noise": [], "beta": [], "clamped": [], "perp": [], "cos": [], "eta": []}
    for dots, beta, eta in RECORDS:
        _, a, D, E = fop_terms(dots)
        rows["noise"] += (dots[:, 1, 2] / a).tolist()  # <g_diff, P g_diff> / <g_avg, P g_avg>
        rows["beta"] += beta.tolist()
        rows["clamped"] += (beta.abs() >= beta_clamp - 1e-12).double().tolist()
        rows["perp"] += (beta.abs() * (E.clamp_min(0) / a).sqrt()).tolist()
        rows["cos"] += (D / (a * E.clamp_min(1e-30)).sqrt()).tolist()
        rows["eta"] += eta.tolist()
    out = {k: statistics.median(v) for k, v in rows.items() if k != "clamped"}
    out["clamped"] = statistics.fmean(rows["clamped"])
    out["abs_beta"] = statistics.median(abs(b) for b in rows["beta"])
    out["n"] = len(rows["eta"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--task", default="large-batch",
                    choices=("large-batch", "large-batch-cnn", "longtail"))  # fmt: skip
    ap.add_argument("--presets", nargs="+", default=["paper-b128", "paper-b1024", "paper"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fop_module.fop_coefficients = _recording
    task = get_task(args.task)
    hp, source = hparams.load_hparams().lookup(args.task, "fop")
    print(f"task {args.task}, FOP hparams {hp} ({source}), seed {args.seed}")
    metric = task.primary.name
    print(f"| preset | batch | steps | {metric} | noise y/a | beta | |beta| | on clamp "
          "| perp | cos | eta |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        RECORDS.clear()
        settings = task.settings(preset)

        def build(model, lr_scale=1.0):
            return registry.make_optimizer("fop", model, hp, lr_scale=lr_scale)

        res = task.run(build, seed=args.seed, settings=settings, data_dir=args.data_dir)
        sm = summarize(0.5)
        print(f"| {preset} | {settings['batch_size']} | {len(RECORDS)} | "
              f"{res.metrics[metric]:.4g} | {sm['noise']:.3g} | {sm['beta']:+.3f} | "
              f"{sm['abs_beta']:.3f} | {100 * sm['clamped']:.0f}% | {sm['perp']:.3f} | "
              f"{sm['cos']:+.3f} | {sm['eta']:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
