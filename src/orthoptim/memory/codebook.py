"""FOGO's long-term memory: a codebook of protected input subspaces for one matrix parameter.

The memory of a matrix W (m x n; "input side" = its n columns) is a pool of R orthonormal
directions in R^n, grouped into at most K *entries* (one entry = the directions summarising one
stretch of training: a task, or a window between scheduled writes). Everything lives in fixed-
shape tensors so that ``state_dict`` round-trips exactly and the per-step correction never syncs
with the host:

    basis    (n, R)  memory dtype   the directions; unused columns are zero
    owner    (R,)    int64          entry id of each column, -1 if free
    used     (K,)    bool           entry slot occupied
    ready    (K,)    int64          step from which the entry protects (min-age rule; a merge
                                    postpones it while the entry is open)
    fresh    (K,)    int64          step of the entry's last write or merge (its age for eviction)
    kind     (K,)    int64          0 = scheduled write (task-agnostic), 1 = end_task consolidation
    hits     (K,)    int64          steps in which the entry was in conflict (usage count)
    energy   (R,)    float32        share of its write's energy each column carried (weights of
                                    the compression below)
    sign_dir (k, R)  float32        Gaussian sketch of the past direction's coordinates
                                    (only for the sign gate)
    open     (K,)    bool           entry of the current stretch of training: a merge into it
                                    postpones its protection (closed at a new stretch)

*Write* (rare; may sync): the past direction D (a factor of the gradients since the last write,
or the slow momentum) is deflated against the pool, its dominant remaining row space is found by
a randomized range finder (a seeded Gaussian random projection), and the new directions either
*merge* into the scheduled entry that already holds most of D's energy (refreshing its age; it
also postpones the entry's protection while the entry is *open*, i.e. belongs to the current
stretch of training: a new stretch, detected from the output side, closes every entry) or are
*inserted* as a new entry. When the pool or the slots are full, room is made by *evicting*
(default) or *compressing*; both pick the oldest entries (or least used; window summaries
before whole tasks, and a scheduled write never touches a task consolidated by ``end_task``).
Compression replaces the two chosen entries by one entry of ``write_rank`` directions: the top
left singular vectors of [V_a E_a^(1/2), V_b E_b^(1/2)] (V the entries' columns, E their
energies), a Frequent-Directions-style summary (Liberty 2013) that keeps the directions the
two stretches share and their strongest own ones, so old tasks lose rank gradually instead of
all protection at once.

*Correction* (every step): coordinates c = O V; an entry is in conflict when it is ready and
    overlap gate:  ||c_j||_F / ||O||_F > tau        (any use of the protected subspace)
    sign gate:     cos(S c_j, S A_j) < -tau          (the update undoes the stored direction A_j,
                                                      compared in sketch space S, JL-preserved)
and the conflicting coordinates are removed by the proximal lift of ``orthoptim.ops.subspace``,
U = O + ((c' - c) M) V^T, whose R x R matrix M depends on the basis only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from orthoptim.ops.sketch import gaussian_sketch_matrix, range_finder
from orthoptim.ops.subspace import lift_matrix

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
        eviction: ``"oldest"`` or ``"least_used"``: which entries make room.
        overflow: ``"compress"`` (merge the two chosen entries into one) or ``"evict"`` (drop
            the chosen entry).
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
    overflow: str = "evict"


def init_codebook(
    n: int, config: CodebookConfig, device: torch.device | str | None
) -> dict[str, torch.Tensor]:
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
        "energy": torch.zeros(r, dtype=torch.float32, device=device),
        "open": torch.zeros(k, dtype=torch.bool, device=device),
    }
    if config.gate == "sign":
        state["sign_dir"] = torch.zeros(config.sketch_dim, r, dtype=torch.float32, device=device)
    return state


def profile_cosine(previous: torch.Tensor, current: torch.Tensor) -> float:
    """Cosine between two windows' output-energy profiles sqrt(sum_t rowsq(G_t)) (0 if empty).

    A stationary stretch of training keeps the profile (cosine ~0.99 between consecutive
    windows); a shift of the task moves the error to other output units (0.6-0.8 measured on
    split Fashion-MNIST, docs/fogo.md section 3) even when the dominant inputs stay the same.
    """
    a, b = previous.double(), current.double()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-300))


def sign_sketch(
    m: int, config: CodebookConfig, seed: int, device: torch.device | str | None
) -> torch.Tensor:
    """The fixed k x m Gaussian sketch S of a matrix's output side (regenerated from its seed)."""
    return gaussian_sketch_matrix(
        config.sketch_dim, m, seed * 7919 + _SIGN_SKETCH_STREAM, device=device
    )


def entry_of_columns(book: dict[str, torch.Tensor], capacity: int) -> torch.Tensor:
    """One-hot (..., R, K) map from columns to entries (free columns map to no entry)."""
    owner = book["owner"]
    return (owner.unsqueeze(-1) == torch.arange(capacity, device=owner.device)).to(torch.float32)


def correct(
    update: torch.Tensor,
    book: dict[str, torch.Tensor],
    step: int | torch.Tensor,
    config: CodebookConfig,
    sketch: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    lift: torch.Tensor | None = None,
    col2entry: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Remove the conflicting protected coordinates of ``update`` (m x n) by the proximal lift.

    U = O + ((c' - c) M) V^T with c = O V, c' = c without the columns of the entries in
    conflict, and M the lift matrix of the basis (:func:`orthoptim.ops.subspace.lift_matrix`).
    Batched over leading dimensions: ``update`` (..., m, n) with every codebook tensor stacked
    the same way (..., n, R) etc., ``step`` 0-d or (...).

    Returns the corrected update and per-step statistics (tensors of the leading shape, no host
    sync): number of ready entries, number in conflict, and ||U* - O||_F / ||O||_F. Also counts
    hits in place, unless ``skip`` (a 0-d bool tensor: the step is dropped) is True. ``step``
    may be a tensor on the device (the optimizer's counter). ``lift`` (M) and ``col2entry``
    (:func:`entry_of_columns`) may come from the caller's cache; both depend on the basis and
    owners only, which change only at writes.
    """
    dtype = update.dtype
    basis = book["basis"].to(dtype)
    coords = update @ basis  # (..., m, R)
    if col2entry is None:
        col2entry = entry_of_columns(book, config.capacity)
    col2entry = col2entry.to(dtype)  # (..., R, K)
    if isinstance(step, torch.Tensor) and step.ndim:
        step = step.unsqueeze(-1)
    ready = book["used"] & (book["ready"] <= step)

    def per_entry(per_column: torch.Tensor) -> torch.Tensor:  # (..., R) -> (..., K)
        return (per_column.unsqueeze(-2) @ col2entry).squeeze(-2)

    norm = update.norm(dim=(-2, -1)).clamp(min=1e-30)
    if config.gate == "overlap":
        score = per_entry(coords.square().sum(-2)).sqrt() / norm.unsqueeze(-1)
        conflict = ready & (score > config.gate_threshold)
    else:
        projected = cast(torch.Tensor, sketch).to(dtype) @ coords  # (..., k, R)
        stored = book["sign_dir"].to(dtype)
        inner = per_entry((projected * stored).sum(-2))
        norm_p = per_entry(projected.square().sum(-2))
        norm_s = per_entry(stored.square().sum(-2))
        cos = inner / (norm_p * norm_s).sqrt().clamp(min=1e-30)
        conflict = ready & (cos < -config.gate_threshold)
    active = (col2entry @ conflict.to(dtype).unsqueeze(-1)).squeeze(-1) > 0  # (..., R)
    m = lift_matrix(book["basis"], config.rho) if lift is None else lift
    # c' - c = -c on the active columns, 0 elsewhere; shift = (c' - c) M.
    shift = (coords * -active.to(dtype).unsqueeze(-2)) @ m.to(dtype)  # (..., m, R)
    # ||shift V^T||_F^2 = <shift V^T V, shift>: the correction's norm from R x R products.
    energy = ((shift @ (basis.mT @ basis)) * shift).sum(dim=(-2, -1))
    book["hits"] += (conflict if skip is None else conflict & ~skip).to(torch.int64)
    stats = {
        "ready": ready.sum(-1),
        "conflicts": conflict.sum(-1),
        "correction_ratio": energy.clamp(min=0).sqrt() / norm,
    }
    return _add_product(update, shift, basis.mT), stats


def _add_product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x + a @ b, the product accumulated onto x in one GEMM (it is never formed on its own:
    the correction of a whole update costs one pass over it). Leading dims are a batch."""
    if x.ndim == 2:
        return torch.addmm(x, a, b)
    flat = [t.reshape(-1, *t.shape[-2:]) for t in (x, a, b)]
    return torch.baddbmm(*flat).reshape(x.shape)


def entry_shares(
    book: dict[str, torch.Tensor], direction: torch.Tensor, config: CodebookConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of ``direction``'s energy that each entry's subspace holds (K,), relative to the
    most any ``write_rank`` directions could hold (its top singular values, by a range finder
    seeded with ``seed``), and that best energy. The merge rule's similarity."""
    d = direction.double()
    coords = d @ book["basis"].double()
    held = coords.square().sum(0) @ entry_of_columns(book, config.capacity).double()
    _, top = range_finder(d, config.write_rank, seed)
    best = top.square().sum().clamp(min=1e-300)
    return held / best, best


def _victims(
    book: dict[str, torch.Tensor], config: CodebookConfig, keep: int, kind: int
) -> list[int]:
    """Entries that may make room, in the order the policy gives them up.

    Never the entry ``keep``. Scheduled entries (window summaries) go before consolidated ones
    (whole tasks), and a scheduled write may touch only scheduled entries.
    """
    allowed = book["used"].clone()
    if 0 <= keep < allowed.numel():
        allowed[keep] = False
    if kind == SCHEDULED:
        allowed &= book["kind"] == SCHEDULED
    fresh = book["fresh"].double()
    if config.eviction == "least_used":
        # Fewest hits first, then oldest: hits dominate, age breaks ties.
        key = book["hits"].double() * 1e12 + fresh
    else:
        key = fresh
    key = key + book["kind"].double() * 1e15  # scheduled entries first
    order = torch.argsort(key, stable=True).tolist()
    return [i for i in order if bool(allowed[i])]


def _evict(book: dict[str, torch.Tensor], victim: int) -> None:
    cols = book["owner"] == victim
    book["basis"][:, cols] = 0
    book["owner"][cols] = -1
    book["energy"][cols] = 0
    if "sign_dir" in book:
        book["sign_dir"][:, cols] = 0
    book["used"][victim] = False
    book["hits"][victim] = 0


def _compress(book: dict[str, torch.Tensor], config: CodebookConfig, a: int, b: int) -> None:
    """Replace entries ``a`` and ``b`` by one entry (id ``a``) of at most ``write_rank``
    directions: the top left singular vectors of [V_a E_a^(1/2), V_b E_b^(1/2)].

    The new columns span a subspace of span(V_a, V_b), so the pool stays orthonormal; their
    energies are the squared singular values (the two entries' weights add up, so a compressed
    entry counts as the tasks it summarises in later compressions).
    """
    cols = ((book["owner"] == a) | (book["owner"] == b)).nonzero().flatten()
    v = book["basis"][:, cols].double()
    e = book["energy"][cols].double().clamp(min=0)
    # Zero energy (a state written before energies were kept) weighs the columns equally.
    w = torch.where(e.sum() > 0, e, torch.ones_like(e)).sqrt()
    u, sv, _ = torch.linalg.svd(v * w, full_matrices=False)
    k = min(config.write_rank, int((sv > sv[0] * 1e-6).sum()) if sv.numel() else 0)
    u = u[:, :k]
    if "sign_dir" in book:
        # Coordinates of the stored past directions in the new basis: u = V C, C = V^T u.
        book["sign_dir"][:, cols[:k]] = (book["sign_dir"][:, cols].double() @ (v.mT @ u)).float()
        book["sign_dir"][:, cols[k:]] = 0
    book["basis"][:, cols] = 0
    book["basis"][:, cols[:k]] = u.to(book["basis"].dtype)
    book["energy"][cols] = 0
    book["energy"][cols[:k]] = sv[:k].square().float()
    book["owner"][cols] = -1
    book["owner"][cols[:k]] = a
    book["open"][a] = book["open"][a] & book["open"][b]
    book["fresh"][a] = torch.maximum(book["fresh"][a], book["fresh"][b])
    book["ready"][a] = torch.minimum(book["ready"][a], book["ready"][b])
    book["kind"][a] = torch.maximum(book["kind"][a], book["kind"][b])
    book["hits"][a] += book["hits"][b]
    book["used"][b] = False
    book["hits"][b] = 0


def _make_room(book: dict[str, torch.Tensor], config: CodebookConfig, keep: int, kind: int) -> bool:
    """Free one entry slot (and its columns) by compression or eviction; False if nothing may
    be touched."""
    victims = _victims(book, config, keep, kind)
    if not victims:
        return False
    if config.overflow == "compress" and len(victims) >= 2:
        _compress(book, config, victims[1], victims[0])  # keep the newer id, free the oldest
    else:
        _evict(book, victims[0])
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
    new_stretch: bool = False,
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
        new_stretch: a new stretch of training began in this window (see ``profile_cosine``):
            every stored entry is closed first, so later merges refresh its age but no longer
            postpone its protection.
    """
    if new_stretch:
        book["open"].zero_()
    d = direction.double()
    total = d.square().sum()
    if not bool(total > 0):
        return "skip"

    def deflated() -> torch.Tensor:
        """The dominant directions of d outside the current pool (orthonormal, n x <= k)."""
        pool = book["basis"].double()
        residual = d - (d @ pool) @ pool.mT
        v, sv = range_finder(residual, config.write_rank, seed * 7919 + _WRITE_STREAM + step)
        v = v[:, sv.square() >= config.min_energy * total]
        if v.shape[1]:
            # Re-orthogonalise against the pool (its bf16 storage is not exactly orthonormal).
            v = torch.linalg.qr(v - pool @ (pool.mT @ v)).Q
        return v

    v_new = deflated()
    room_made = False

    held, best = entry_shares(book, d, config, seed * 7919 + _WRITE_STREAM + step + 1)
    scheduled = book["used"] & (book["kind"] == SCHEDULED)
    share = torch.where(scheduled, held, torch.zeros_like(held))
    merge_into = int(share.argmax()) if bool(scheduled.any()) else -1
    merging = (
        kind == SCHEDULED and merge_into >= 0 and float(share[merge_into]) >= config.merge_threshold
    )
    if merging:
        # A merge refreshes the entry's age (it is evicted later). It postpones its protection
        # only while the entry belongs to the current stretch: a class shift can keep the old
        # dominant inputs (the input share says "merge") while it moves the error to other
        # output units (a new stretch, which closed the entry); the old entry protects through it.
        target = merge_into
        book["fresh"][target] = step
        if bool(book["open"][target]):
            book["ready"][target] = ready
    else:
        if not v_new.shape[1]:
            return "skip"
        if bool(book["used"].all()):
            if not _make_room(book, config, keep=-1, kind=kind):
                return "skip"
            room_made = True
        target = int((~book["used"]).nonzero()[0])
        book["used"][target] = True
        book["fresh"][target] = step
        book["ready"][target] = ready
        book["kind"][target] = kind
        book["hits"][target] = 0
        book["open"][target] = True

    # An entry holds at most write_rank directions: a long stretch of similar writes refreshes
    # one entry instead of taking over the pool.
    cap = config.write_rank - int((book["owner"] == target).sum())
    need = min(v_new.shape[1], cap)
    while need and int((book["owner"] < 0).sum()) < need:
        if not _make_room(book, config, keep=target, kind=kind):
            need = int((book["owner"] < 0).sum())  # nothing more may go: keep what fits
            break
        room_made = True
    if room_made:
        # Room was made by dropping or compressing directions the first deflation counted as
        # covered: deflate again against the pool as it is now.
        v_new = deflated()
        need = min(v_new.shape[1], cap, int((book["owner"] < 0).sum()))
    if not need and not merging:
        book["used"][target] = False  # no room at all for a new entry
        return "skip"
    if need:
        free = (book["owner"] < 0).nonzero().flatten()[:need]
        book["basis"][:, free] = v_new[:, :need].to(book["basis"].dtype)
        book["owner"][free] = target
        # Share of the written energy each new direction carries (residual energy on v_new).
        book["energy"][free] = ((d @ v_new[:, :need]).square().sum(0) / best).float()
        if "sign_dir" in book:
            if sketch is None:
                raise ValueError("Invalid sketch: None; the sign gate needs its sketch S")
            # Sketch of the coordinates of the past direction in the new columns.
            past = d if sign_source is None else sign_source.double()
            book["sign_dir"][:, free] = (sketch.double() @ (past @ v_new[:, :need])).float()
    return "merge" if merging else "insert"


def memory_bytes(book: dict[str, torch.Tensor]) -> int:
    """Bytes held by one codebook (all its tensors)."""
    return sum(t.numel() * t.element_size() for t in book.values())
