"""Readable reference FOGO: one tensor at a time, plain loops, no batching or Woodbury tricks.

It is the test oracle for :class:`orthoptim.FOGO`: the fast class batches Newton-Schulz over
same-shape matrices and both streams and solves the proximal lift in the R x R Woodbury form;
this one orthogonalizes each stream of each matrix separately, tests conflicts entry by entry in
a Python loop, and solves the lift from its n x n normal equations

    U (I_n + rho V V^T) = O + rho c' V^T.

Codebook writes (rare, host-side) are shared with the fast class and tested on their own.
"""

from __future__ import annotations

import torch

from orthoptim.memory.codebook import CodebookConfig
from orthoptim.optim.fogo import FOGO


def reference_correct(
    update: torch.Tensor,
    book: dict[str, torch.Tensor],
    step: int,
    config: CodebookConfig,
    sketch: torch.Tensor | None,
) -> tuple[torch.Tensor, list[int]]:
    """Conflict test and proximal lift of one update, entry by entry.

    Returns the corrected update and the list of entries found in conflict.
    """
    basis = book["basis"].to(update.dtype)
    target = update @ basis
    conflicts = []
    for entry in range(config.capacity):
        cols = book["owner"] == entry
        if not bool(book["used"][entry]) or int(book["ready"][entry]) > step:
            continue
        coords = update @ basis[:, cols]
        if config.gate == "overlap":
            in_conflict = float(coords.norm() / update.norm()) > config.gate_threshold
        else:
            sketched = sketch.to(update.dtype) @ coords
            stored = book["sign_dir"][:, cols].to(update.dtype)
            cos = (sketched * stored).sum() / (sketched.norm() * stored.norm())
            in_conflict = float(cos) < -config.gate_threshold
        if in_conflict:
            target[:, cols] = 0
            conflicts.append(entry)
    if config.rho == float("inf"):
        # Least-change solution of the hard constraint U V = c': U = O + (c' - O V) V^+.
        return update + (target - update @ basis) @ torch.linalg.pinv(basis), conflicts
    eye = torch.eye(basis.shape[0], dtype=update.dtype, device=update.device)
    rhs = update + config.rho * target @ basis.mT
    return torch.linalg.solve(eye + config.rho * basis @ basis.mT, rhs.mT).mT, conflicts


class FOGOReference(FOGO):
    """FOGO with the per-matrix step written as a plain loop (see module docstring)."""

    def _matrix_step(self, group: dict, params: list[torch.Tensor], guard) -> None:
        for p in params:
            directions = self._directions(group, p, guard)
            ortho = [self._orthogonalize(group, d) for d in directions]
            fused = self._fuse(group, ortho[0], ortho[1]) if len(ortho) == 2 else ortho[0]
            self._finish(group, p, fused, guard)

    def _correct(self, group: dict, p: torch.Tensor, direction: torch.Tensor, step, guard):
        state = self.state[p]
        config = self._codebook_config(group, p)
        flip = group["side"] == "output"
        u = direction.mT if flip else direction
        book = state["memory"]
        step = int(step)  # the oracle reads on the host
        corrected, conflicts = reference_correct(u, book, step, config, self._sketch(group, p))
        if not guard.skipped():
            for entry in conflicts:
                book["hits"][entry] += 1
        ready = book["used"] & (book["ready"] <= step)
        old = state.get("last_stats", {})
        new = {
            "ready": ready.sum(),
            "conflicts": torch.tensor(len(conflicts)),
            "correction_ratio": (corrected - u).norm() / u.norm(),
        }
        state["last_stats"] = {k: guard.select(old.get(k), v) for k, v in new.items()}
        return corrected.mT if flip else corrected
