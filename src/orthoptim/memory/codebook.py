"""FOGO's long-term memory: a codebook of protected input subspaces for one matrix parameter.

The memory of a matrix W (m x n; "input side" = its n columns) is a pool of R orthonormal
directions in R^n, grouped into at most K *entries* (one entry = the directions summarising one
stretch of training: a task, or a window between scheduled writes). Everything lives in fixed-
shape tensors so that ``state_dict`` round-trips exactly and the per-step correction never syncs
with the host:

    basis    (n, R)  memory dtype   the directions; unused columns are zero
    owner    (R,)    int64          entry id of each column, -1 if free
    used     (K,)    bool           entry slot occupied
    ready    (K,)    int64          step from which the entry protects (min-age rule)
    fresh    (K,)    int64          step of the entry's last write or merge (its age)
    kind     (K,)    int64          0 = scheduled write (task-agnostic), 1 = end_task consolidation
    hits     (K,)    int64          steps in which the entry was in conflict (usage count)
    sign_dir (k, R)  float32        Gaussian sketch of the past direction's coordinates
                                    (only for the sign gate)

*Write* (rare; may sync): the past direction D (the slow momentum) is deflated against the pool,
its dominant remaining row space is found by a randomized range finder (a seeded Gaussian random
projection), and the new directions either *merge* into the scheduled entry that already holds
most of D's energy (refreshing its age) or are *inserted* as a new entry; when the pool or the
slots are full, entries are *evicted* (oldest, or least used; window summaries before whole
tasks, and a scheduled write never evicts a task consolidated by ``end_task``).

*Correction* (every step): coordinates c = O V; an entry is in conflict when it is ready and
    overlap gate:  ||c_j||_F / ||O||_F > tau        (any use of the protected subspace)
    sign gate:     cos(S c_j, S A_j) < -tau          (the update undoes the stored direction A_j,
                                                      compared in sketch space S, JL-preserved)
and the conflicting coordinates are removed by the proximal lift of ``orthoptim.ops.subspace``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orthoptim.ops.sketch import gaussian_sketch_matrix, range_finder
from orthoptim.ops.subspace import proximal_lift

SCHEDULED, CONSOLIDATED = 0, 1
# Offsets that keep the independent random streams of one parameter apart.
_SIGN_SKETCH_STREAM = 1
_WRITE_STREAM = 1_000_003


@dataclass(frozen=True)
class CodebookConfig:
    """Static settings of one matrix's codebook (derived from the optimizer's hyperparameters).

    Attributes:
        rank: pool size R (total protected directions).
        capacity: maximum number of entries K.
        write_rank: directions added per write at most.
        min_energy: a new direction is kept only if it carries at least this fraction of the
            written direction's energy (drops noise).
        merge_threshold: a scheduled write merges into the scheduled entry that holds at least
            this fraction of its energy (relative to its own top write_rank directions) instead
            of opening a new entry.
        gate: ``"overlap"`` or ``"sign"``.
        gate_threshold: tau above.
        rho: proximal weight (radius r = rho / (1 + rho)); ``inf`` = hard projection.
        eviction: ``"oldest"`` or ``"least_used"``.
        sketch_dim: k of the sign-gate sketch.
        dtype: storage dtype of the basis.
    """

    rank: int
    capacity: int
    write_rank: int
    min_energy: float
    merge_threshold: float
    gate: str
    gate_threshold: float
    rho: float
    eviction: str
    sketch_dim: int
    dtype: torch.dtype


def init_codebook(n: int, config: CodebookConfig, device) -> dict[str, torch.Tensor]:
    """Empty codebook tensors for a matrix whose protected side has dimension ``n``."""
    r, k = config.rank, config.capacity
    state = {
        "basis": torch.zeros(n, r, dtype=config.dtype, device=device),
        "owner": torch.full((r,), -1, dtype=torch.int64, device=device),
        "used": torch.zeros(k, dtype=torch.bool, device=device),
        "ready": torch.zeros(k, dtype=torch.int64, device=device),
        "fresh": torch.zeros(k, dtype=torch.int64, device=device),
        "kind": torch.zeros(k, dtype=torch.int64, device=device),
        "hits": torch.zeros(k, dtype=torch.int64, device=device),
    }
    if config.gate == "sign":
        state["sign_dir"] = torch.zeros(config.sketch_dim, r, dtype=torch.float32, device=device)
    return state


def sign_sketch(m: int, config: CodebookConfig, seed: int, device) -> torch.Tensor:
    """The fixed k x m Gaussian sketch S of a matrix's output side (regenerated from its seed)."""
    return gaussian_sketch_matrix(
        config.sketch_dim, m, seed * 7919 + _SIGN_SKETCH_STREAM, device=device
    )


def entry_of_columns(book: dict[str, torch.Tensor], capacity: int) -> torch.Tensor:
    """One-hot (R, K) map from columns to entries (free columns map to no entry)."""
    owner = book["owner"]
    return (owner.unsqueeze(1) == torch.arange(capacity, device=owner.device)).to(torch.float32)


def correct(
    update: torch.Tensor,
    book: dict[str, torch.Tensor],
    step: int,
    config: CodebookConfig,
    sketch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Remove the conflicting protected coordinates of ``update`` (m x n) by the proximal lift.

    Returns the corrected update and per-step statistics (0-d tensors, no host sync): number of
    ready entries, number in conflict, and ||U* - O||_F / ||O||_F. Also counts hits in place.
    """
    basis = book["basis"].to(update.dtype)
    coords = update @ basis  # (m, R)
    col2entry = entry_of_columns(book, config.capacity).to(update.dtype)  # (R, K)
    ready = book["used"] & (book["ready"] <= step)
    if config.gate == "overlap":
        energy = coords.square().sum(0) @ col2entry  # (K,)
        score = energy.sqrt() / update.norm().clamp(min=1e-30)
        conflict = ready & (score > config.gate_threshold)
    else:
        projected = sketch.to(update.dtype) @ coords  # (k, R)
        stored = book["sign_dir"].to(update.dtype)
        inner = (projected * stored).sum(0) @ col2entry
        norm_p = projected.square().sum(0) @ col2entry
        norm_s = stored.square().sum(0) @ col2entry
        cos = inner / (norm_p * norm_s).sqrt().clamp(min=1e-30)
        conflict = ready & (cos < -config.gate_threshold)
    active_cols = (col2entry @ conflict.to(update.dtype)) > 0
    target = coords * (~active_cols).to(update.dtype)
    corrected = proximal_lift(update, basis, target, config.rho)
    book["hits"] += conflict.to(torch.int64)
    stats = {
        "ready": ready.sum(),
        "conflicts": conflict.sum(),
        "correction_ratio": (corrected - update).norm() / update.norm().clamp(min=1e-30),
    }
    return corrected, stats


def _evict_one(book: dict[str, torch.Tensor], config: CodebookConfig, keep: int, kind: int) -> bool:
    """Free the entry chosen by the eviction policy; returns False if none may be evicted.

    Never evicts the entry ``keep``. Scheduled entries (window summaries) go before
    consolidated ones (whole tasks), and a scheduled write may evict only scheduled entries.
    """
    allowed = book["used"].clone()
    if 0 <= keep < allowed.numel():
        allowed[keep] = False
    if kind == SCHEDULED:
        allowed &= book["kind"] == SCHEDULED
    if not bool(allowed.any()):
        return False
    fresh = book["fresh"].double()
    if config.eviction == "least_used":
        # Fewest hits first, then oldest: hits dominate, age breaks ties.
        key = book["hits"].double() * 1e12 + fresh
    else:
        key = fresh
    key = key + book["kind"].double() * 1e15  # scheduled entries first
    key = torch.where(allowed, key, torch.full_like(key, float("inf")))
    victim = int(key.argmin())
    cols = book["owner"] == victim
    book["basis"][:, cols] = 0
    book["owner"][cols] = -1
    if "sign_dir" in book:
        book["sign_dir"][:, cols] = 0
    book["used"][victim] = False
    book["hits"][victim] = 0
    return True


def write(
    book: dict[str, torch.Tensor],
    direction: torch.Tensor,
    step: int,
    config: CodebookConfig,
    *,
    seed: int,
    kind: int,
    ready: int,
    sketch: torch.Tensor | None = None,
    sign_source: torch.Tensor | None = None,
) -> str:
    """Summarise ``direction`` (m x n) into the codebook; returns "insert", "merge" or "skip".

    Args:
        book: the codebook tensors (modified in place).
        direction: the persistent past direction, e.g. the slow momentum.
        step: current optimizer step (the entry's age origin).
        config: codebook settings.
        seed: seed of this write's Gaussian test matrix (parameter seed and write counter).
        kind: ``SCHEDULED`` or ``CONSOLIDATED``.
        ready: step from which the written directions protect.
        sketch: the sign-gate sketch S (needed when ``config.gate == "sign"``).
        sign_source: the past direction (out x side) whose coordinates the sign gate stores;
            defaults to ``direction``.
    """
    d = direction.double()
    total = d.square().sum()
    if not bool(total > 0):
        return "skip"
    basis = book["basis"].double()
    coords = d @ basis
    col2entry = entry_of_columns(book, config.capacity).double()
    entry_energy = coords.square().sum(0) @ col2entry
    residual = d - coords @ basis.mT
    v_new, s_new = range_finder(residual, config.write_rank, seed * 7919 + _WRITE_STREAM + step)
    keep = s_new.square() >= config.min_energy * total
    v_new = v_new[:, keep]
    if v_new.shape[1]:
        # Re-orthogonalise against the stored pool (its bf16 storage is not exactly orthonormal).
        v_new = v_new - basis @ (basis.mT @ v_new)
        v_new = torch.linalg.qr(v_new).Q

    # Similarity of the written energy to each scheduled entry, relative to the most that any
    # write_rank directions could hold (the top singular values of the direction itself).
    _, s_top = range_finder(d, config.write_rank, seed * 7919 + _WRITE_STREAM + step + 1)
    best = s_top.square().sum().clamp(min=1e-300)
    scheduled = book["used"] & (book["kind"] == SCHEDULED)
    share = torch.where(scheduled, entry_energy / best, torch.zeros_like(entry_energy))
    merge_into = int(share.argmax()) if bool(scheduled.any()) else -1
    merging = (
        kind == SCHEDULED and merge_into >= 0 and float(share[merge_into]) >= config.merge_threshold
    )
    if merging:
        target = merge_into
        book["fresh"][target] = step
        book["ready"][target] = ready
    else:
        if not v_new.shape[1]:
            return "skip"
        if bool(book["used"].all()) and not _evict_one(book, config, keep=-1, kind=kind):
            return "skip"
        target = int((~book["used"]).nonzero()[0])
        book["used"][target] = True
        book["fresh"][target] = step
        book["ready"][target] = ready
        book["kind"][target] = kind
        book["hits"][target] = 0

    # An entry holds at most write_rank directions: a long stretch of similar writes refreshes
    # one entry instead of taking over the pool.
    need = min(v_new.shape[1], config.write_rank - int((book["owner"] == target).sum()))
    while need and int((book["owner"] < 0).sum()) < need:
        if not _evict_one(book, config, keep=target, kind=kind):
            need = int((book["owner"] < 0).sum())  # nothing more may go: keep what fits
            break
    if not need and not merging:
        book["used"][target] = False  # no room at all for a new entry
        return "skip"
    if need:
        free = (book["owner"] < 0).nonzero().flatten()[:need]
        book["basis"][:, free] = v_new[:, :need].to(book["basis"].dtype)
        book["owner"][free] = target
        if "sign_dir" in book:
            # Sketch of the coordinates of the past direction in the new columns.
            past = d if sign_source is None else sign_source.double()
            book["sign_dir"][:, free] = (sketch.double() @ (past @ v_new[:, :need])).float()
    return "merge" if merging else "insert"


def memory_bytes(book: dict[str, torch.Tensor]) -> int:
    """Bytes held by one codebook (all its tensors)."""
    return sum(t.numel() * t.element_size() for t in book.values())
