"""Readable reference FOGO: one tensor at a time, plain loops, no batching or Woodbury tricks.

It is the test oracle for :class:`orthoptim.FOGO`: the fast class batches Newton-Schulz over
same-shape matrices and both streams and solves the proximal lift in the R x R Woodbury form;
this one orthogonalizes each stream of each matrix separately, tests conflicts entry by entry in
a Python loop, and solves the lift from its n x n normal equations

    U (I_n + rho V V^T) = O + rho c' V^T.

With ``protection="kronecker"`` it accumulates each matrix's Grams and multiplies its update by
each side's preconditioner one side at a time (the fast class: one batched product per bucket);
a shared factor (``kron_share``) takes each matrix's Gram one at a time.

Everything else (state, codebook writes and Kronecker consolidations: rare, host-side; the
AdamW step) is shared with the fast class; the writes are tested on their own.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from orthoptim.memory.bucket import KroneckerBucket, MemoryBucket
from orthoptim.memory.codebook import CodebookConfig
from orthoptim.ops.geometry import nlerp, rms_scale, slerp
from orthoptim.ops.newton_schulz import newton_schulz
from orthoptim.optim._fogo_state import as_matrix, slow_beta
from orthoptim.optim._nonfinite import StepGuard
from orthoptim.optim.fogo import FOGO, _Bucket


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
            if sketch is None:
                raise ValueError("sketch is required by the sign gate, got None")
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

    def _bucket_step(
        self, group: dict[str, Any], bucket: _Bucket, take: list[int], guard: StepGuard
    ) -> None:
        for i in take:
            self._matrix_step(group, bucket, i, guard)

    def _matrix_step(
        self, group: dict[str, Any], bucket: _Bucket, i: int, guard: StepGuard
    ) -> None:
        p, state = bucket.params[i], bucket.states[i]
        grad = as_matrix(cast(torch.Tensor, p.grad))
        # Momentum streams and their directions.
        names = ("momentum_slow", "momentum_fast") if group["dual_stream"] else ("momentum_slow",)
        betas = (slow_beta(group), group["beta_fast"])
        directions = []
        for name, beta in zip(names, betas[: len(names)], strict=False):
            buf = state[name]
            guard.commit_(buf, torch.lerp(buf, grad, 1 - beta))
            directions.append(grad.lerp(buf, beta) if group["nesterov"] else buf)
        # Newton-Schulz per stream, then the fusion.
        ns = (group["ns_steps"], group["ns_coefficients"], group["ns_dtype"], group["eps"])
        # Each as a batch of one: the batched kernel (baddbmm) of the fast path, whose bits can
        # differ from a 2-D addmm's.
        ortho = [newton_schulz(d.unsqueeze(0), *ns)[0] for d in directions]
        if len(ortho) == 2:
            interp = slerp if group["fusion"] == "slerp" else nlerp
            update = interp(ortho[0], ortho[1], group["mix"], group["eps"])
        else:
            update = ortho[0]
        guard.commit_(state["step"], state["step"] + 1)
        if isinstance(bucket.memory, KroneckerBucket):
            update = self._kronecker(bucket.memory, i, grad, update, guard)
        elif bucket.memory is not None:
            update = self._memory(bucket.memory, i, grad, update, guard)
        # Scale, decay, update.
        lr, new = group["lr"], p
        if group["weight_decay"] != 0:
            new = p.mul(1 - lr * group["weight_decay"])
        if group["scale"] == "muon":
            m, n = update.shape
            new = new.add(update.view_as(p), alpha=-(lr * (group["target_rms"] * max(m, n) ** 0.5)))
        else:
            gamma = rms_scale(update, group["target_rms"], group["eps"])
            new = new.add((update * gamma).view_as(p), alpha=-lr)
        guard.commit_(p, new)

    def _memory(
        self,
        memory: MemoryBucket,
        i: int,
        grad: torch.Tensor,
        update: torch.Tensor,
        guard: StepGuard,
    ) -> torch.Tensor:
        """Window statistics, then the conflict test and the lift, for matrix ``i``."""
        state, config = memory.states[i], memory.config
        flip = config.transpose
        g = grad.mT if flip else grad
        if "grad_sketch" in state:
            if memory.omega is None:
                raise ValueError("memory.omega is None: a grad_sketch needs its projection")
            sketch = state["grad_sketch"]
            guard.commit_(sketch, sketch + g.mT.float() @ (g.float() @ memory.omega[i]))
        if "row_energy" in state:
            energy = state["row_energy"]
            guard.commit_(energy, energy + g.float().square().sum(1))
        u = update.mT if flip else update
        low = u.dtype in (torch.float16, torch.bfloat16)
        work = u.float() if low else u
        book = state["memory"]
        step = int(state["step"])  # the oracle reads on the host
        sign = memory.sign[i] if memory.sign is not None else None
        corrected, conflicts = reference_correct(work, book, step, config.codebook, sign)
        if not guard.skipped():
            for entry in conflicts:
                book["hits"][entry] += 1
        ready = book["used"] & (book["ready"] <= step)
        new = {
            "ready": ready.sum(),
            "conflicts": torch.tensor(len(conflicts)),
            "correction_ratio": (corrected - work).norm() / work.norm(),
        }
        for k, v in new.items():
            state["last_stats"][k].copy_(guard.select(state["last_stats"][k], v))
        corrected = corrected.to(u.dtype)
        return corrected.mT if flip else corrected

    def _kronecker(
        self,
        memory: KroneckerBucket,
        i: int,
        grad: torch.Tensor,
        update: torch.Tensor,
        guard: StepGuard,
    ) -> torch.Tensor:
        """``protection="kronecker"`` for matrix ``i``, side by side: the running Grams take
        this step's G^T G (input side) or G G^T (output side), or their diagonals, then the
        update is multiplied by each side's preconditioner (I + kappa P)^-1."""
        kron = memory.states[i]["kron"]
        g = grad.float()
        for side, form in memory.config.sides:
            if form == "full":
                gram = g.mT @ g if side == "input" else g @ g.mT
            else:
                gram = g.square().sum(0) if side == "input" else g.square().sum(1)
            if side in memory.shared:  # kron_share: this matrix's Gram joins the shared sum
                memory.shared[side].add(gram, guard.skip(gram.device))
                continue
            acc = kron[f"{side}_acc"]
            guard.commit_(acc, acc + gram)
        u = update.to(torch.promote_types(update.dtype, torch.float32))
        for side, form in memory.config.sides:
            shared = memory.shared.get(side)
            pre = (shared.pre if shared is not None else kron[f"{side}_pre"]).to(u.dtype)
            if form == "diagonal":
                u = u * (pre if side == "input" else pre[:, None])
            else:
                u = u @ pre if side == "input" else pre @ u
        return u.to(update.dtype)
