"""Codebook memory: write / merge / insert / evict rules, conflict gates and the correction."""

import pytest
import torch

from orthoptim.memory import codebook
from orthoptim.memory.codebook import CONSOLIDATED, SCHEDULED, CodebookConfig


def config(**kw):
    base = dict(
        rank=8, capacity=3, write_rank=4, min_energy=1e-6, merge_threshold=0.5, gate="overlap",
        gate_threshold=0.0, rho=float("inf"), eviction="oldest", sketch_dim=64,
        dtype=torch.float64,
    )  # fmt: skip
    base.update(kw)
    return CodebookConfig(**base)


def low_rank(m, n, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        rank, n, generator=gen, dtype=torch.float64
    )


def test_write_stores_orthonormal_row_space_of_direction():
    cfg = config()
    book = codebook.init_codebook(12, cfg, "cpu")
    d = low_rank(10, 12, 3, seed=0)
    assert codebook.write(book, d, 5, cfg, seed=1, kind=CONSOLIDATED, ready=5) == "insert"
    cols = book["owner"] >= 0
    v = book["basis"][:, cols]
    assert v.shape[1] == 3  # only directions carrying energy are kept
    assert torch.allclose(v.T @ v, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(d @ v @ v.T, d, atol=1e-8)  # the whole row space is captured
    assert bool(book["used"][0]) and int(book["fresh"][0]) == 5 and int(book["kind"][0]) == 1


def test_scheduled_write_merges_when_energy_already_stored_and_refreshes_age():
    cfg = config()
    book = codebook.init_codebook(12, cfg, "cpu")
    d = low_rank(10, 12, 2, seed=0)
    codebook.write(book, d, 10, cfg, seed=1, kind=SCHEDULED, ready=30)
    assert codebook.write(book, 2 * d, 20, cfg, seed=2, kind=SCHEDULED, ready=40) == "merge"
    assert int(book["used"].sum()) == 1
    assert int(book["fresh"][0]) == 20 and int(book["ready"][0]) == 40


def test_a_new_stretch_closes_entries_so_merges_no_longer_postpone_their_protection():
    cfg = config()
    d = low_rank(10, 12, 2, seed=0)
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(book, d, 10, cfg, seed=1, kind=SCHEDULED, ready=30)
    # A class shift: the same inputs (the write merges), a new stretch by the output side.
    assert (
        codebook.write(book, d, 20, cfg, seed=2, kind=SCHEDULED, ready=40, new_stretch=True)
        == "merge"
    )
    assert int(book["fresh"][0]) == 20 and int(book["ready"][0]) == 30
    assert codebook.write(book, d, 50, cfg, seed=3, kind=SCHEDULED, ready=70) == "merge"
    assert int(book["ready"][0]) == 30  # closed for good
    # An entry inserted in the new stretch is open again.
    other = low_rank(10, 12, 2, seed=5)
    assert codebook.write(book, other, 60, cfg, seed=4, kind=SCHEDULED, ready=80) == "insert"
    assert codebook.write(book, other, 70, cfg, seed=5, kind=SCHEDULED, ready=90) == "merge"
    assert int(book["ready"][1]) == 90


def test_profile_cosine():
    a = torch.tensor([1.0, 2.0, 0.0])
    assert codebook.profile_cosine(a, 3 * a) == pytest.approx(1.0)
    assert codebook.profile_cosine(a, torch.tensor([0.0, 0.0, 5.0])) == 0.0
    assert codebook.profile_cosine(torch.zeros(3), a) == 0.0  # no previous window


def test_new_directions_insert_a_new_entry_orthogonal_to_the_pool():
    cfg = config()
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(book, low_rank(10, 12, 2, seed=0), 10, cfg, seed=1, kind=SCHEDULED, ready=10)
    assert (
        codebook.write(book, low_rank(10, 12, 2, seed=5), 20, cfg, seed=2, kind=SCHEDULED, ready=20)
        == "insert"
    )
    v = book["basis"][:, book["owner"] >= 0]
    assert v.shape[1] == 4
    assert torch.allclose(v.T @ v, torch.eye(4, dtype=torch.float64), atol=1e-10)


def test_consolidated_entries_are_never_merged_into_by_scheduled_writes():
    cfg = config()
    book = codebook.init_codebook(12, cfg, "cpu")
    d = low_rank(10, 12, 2, seed=0)
    codebook.write(book, d, 10, cfg, seed=1, kind=CONSOLIDATED, ready=10)
    # Same energy again, scheduled: it must not refresh (and so unprotect) the task's entry.
    assert codebook.write(book, d, 20, cfg, seed=2, kind=SCHEDULED, ready=40) == "skip"
    assert int(book["ready"][0]) == 10


@pytest.mark.parametrize("policy", ["oldest", "least_used"])
def test_eviction_when_slots_are_full(policy):
    cfg = config(capacity=2, rank=12, eviction=policy, overflow="evict")
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(book, low_rank(10, 12, 2, seed=0), 10, cfg, seed=1, kind=CONSOLIDATED, ready=10)
    codebook.write(book, low_rank(10, 12, 2, seed=1), 20, cfg, seed=2, kind=CONSOLIDATED, ready=20)
    book["hits"][0] = 5  # entry 0 is older but used more
    codebook.write(book, low_rank(10, 12, 2, seed=2), 30, cfg, seed=3, kind=CONSOLIDATED, ready=30)
    survivors = sorted(int(f) for f in book["fresh"][book["used"]])
    assert survivors == ([20, 30] if policy == "oldest" else [10, 30])
    assert int((book["owner"] >= 0).sum()) == 4


def test_eviction_when_the_pool_of_directions_is_full():
    cfg = config(capacity=3, rank=4, write_rank=3)
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(book, low_rank(10, 12, 3, seed=0), 10, cfg, seed=1, kind=CONSOLIDATED, ready=10)
    codebook.write(book, low_rank(10, 12, 3, seed=1), 20, cfg, seed=2, kind=CONSOLIDATED, ready=20)
    # The new entry needs 3 columns, 1 is free: the old entry is evicted whole.
    owners = book["owner"][book["owner"] >= 0]
    assert owners.numel() == 3 and int(book["used"].sum()) == 1
    assert all(int(book["fresh"][o]) == 20 for o in owners)


def _projector(v):
    return v @ torch.linalg.pinv(v)


def test_compression_keeps_the_energy_weighted_top_directions_of_the_two_oldest_entries():
    """Slots full: the two oldest entries become one entry of write_rank directions, equal to
    the top left singular vectors of [V_a E_a^(1/2), V_b E_b^(1/2)] (brute-force oracle); the
    pool stays orthonormal and the newest entry is untouched."""
    cfg = config(capacity=2, rank=12, write_rank=3, overflow="compress")
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(book, low_rank(10, 12, 3, seed=0), 10, cfg, seed=1, kind=CONSOLIDATED, ready=10)
    codebook.write(book, low_rank(10, 12, 3, seed=1), 20, cfg, seed=2, kind=CONSOLIDATED, ready=20)
    v, e = book["basis"][:, book["owner"] >= 0].clone(), book["energy"][book["owner"] >= 0]
    assert bool((e > 0).all()) and float(e.sum()) <= 2 + 1e-9
    u, sv, _ = torch.linalg.svd(v * e.double().sqrt(), full_matrices=False)
    expected = _projector(u[:, :3])
    codebook.write(book, low_rank(10, 12, 2, seed=2), 30, cfg, seed=3, kind=CONSOLIDATED, ready=30)
    assert int(book["used"].sum()) == 2
    merged = [k for k in range(2) if bool(book["used"][k]) and int(book["fresh"][k]) == 20]
    assert len(merged) == 1  # the compressed entry carries the newer age of the two
    cols = book["owner"] == merged[0]
    assert int(cols.sum()) == 3
    assert torch.allclose(_projector(book["basis"][:, cols]), expected, atol=1e-10)
    assert torch.allclose(book["energy"][cols].double(), sv[:3].square(), atol=1e-6)
    pool = book["basis"][:, book["owner"] >= 0]
    assert torch.allclose(pool.T @ pool, torch.eye(pool.shape[1], dtype=pool.dtype), atol=1e-10)


def test_compression_keeps_a_direction_every_old_task_shares():
    """Three tasks share one input direction x; with room for two entries, compression keeps x
    protected (eviction would too here, but compression also keeps the older task's own top
    direction instead of dropping it)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, generator=gen, dtype=torch.float64)
    x /= x.norm()

    def task(seed):
        g = torch.Generator().manual_seed(seed)
        own = torch.randn(12, generator=g, dtype=torch.float64)
        a = torch.randn(10, 1, generator=g, dtype=torch.float64)
        b = torch.randn(10, 1, generator=g, dtype=torch.float64)
        return 3 * a @ x[None] + b @ own[None], own

    for overflow in ("compress", "evict"):
        cfg = config(capacity=2, rank=4, write_rank=2, overflow=overflow)
        book = codebook.init_codebook(12, cfg, "cpu")
        d1, own1 = task(1)
        codebook.write(book, d1, 10, cfg, seed=1, kind=CONSOLIDATED, ready=10)
        codebook.write(book, task(2)[0], 20, cfg, seed=2, kind=CONSOLIDATED, ready=20)
        codebook.write(book, task(3)[0], 30, cfg, seed=3, kind=CONSOLIDATED, ready=30)
        p = _projector(book["basis"][:, book["owner"] >= 0])
        kept_x = float(x @ p @ x)
        kept_task1 = float((d1 @ p).norm() / d1.norm())
        if overflow == "compress":
            assert kept_x > 0.99
            compressed_task1 = kept_task1
        else:
            evicted_task1 = kept_task1
    assert compressed_task1 > evicted_task1 + 0.05


def test_overlap_gate_removes_protected_component_and_passes_orthogonal_updates():
    cfg = config()
    book = codebook.init_codebook(12, cfg, "cpu")
    d = low_rank(10, 12, 3, seed=0)
    codebook.write(book, d, 1, cfg, seed=1, kind=CONSOLIDATED, ready=1)
    v = book["basis"][:, book["owner"] >= 0]
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    corrected, stats = codebook.correct(u, book, 2, cfg)
    assert torch.allclose(corrected @ v, torch.zeros(10, 3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(corrected, u - u @ v @ v.T)
    assert int(stats["conflicts"]) == 1 and int(book["hits"][0]) == 1
    orth = u - u @ v @ v.T
    same, stats = codebook.correct(orth, book, 3, cfg)
    assert torch.allclose(same, orth, atol=1e-12)


def test_entries_not_ready_do_not_protect():
    cfg = config()
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(book, low_rank(10, 12, 3, seed=0), 1, cfg, seed=1, kind=SCHEDULED, ready=50)
    u = torch.randn(10, 12, dtype=torch.float64)
    out, stats = codebook.correct(u, book, 49, cfg)
    assert torch.equal(out, u) and int(stats["ready"]) == 0
    out, stats = codebook.correct(u, book, 50, cfg)
    assert not torch.allclose(out, u) and int(stats["ready"]) == 1


def test_sign_gate_corrects_an_opposing_update_and_passes_an_aligned_one():
    cfg = config(gate="sign", sketch_dim=256)
    book = codebook.init_codebook(12, cfg, "cpu")
    sketch = codebook.sign_sketch(10, cfg, seed=0, device="cpu")
    d = low_rank(10, 12, 2, seed=0)
    codebook.write(book, d, 1, cfg, seed=1, kind=CONSOLIDATED, ready=1, sketch=sketch)
    noise = torch.randn(10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    v = book["basis"][:, book["owner"] >= 0]
    noise = noise - noise @ v @ v.T
    opposing = -d + 0.1 * noise
    assert (opposing * d).sum() < 0
    corrected, stats = codebook.correct(opposing, book, 2, cfg, sketch)
    assert int(stats["conflicts"]) == 1
    assert (corrected * d).sum() > -1e-9  # no longer opposed
    aligned = d + 0.1 * noise
    passed, stats = codebook.correct(aligned, book, 3, cfg, sketch)
    assert int(stats["conflicts"]) == 0 and torch.equal(passed, aligned)


def test_correction_is_bounded_by_the_radius():
    rho = 1.0  # radius 0.5
    cfg = config(rho=rho)
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(
        book, torch.eye(12, dtype=torch.float64)[:10], 1, cfg, seed=1, kind=CONSOLIDATED, ready=1
    )
    u = torch.randn(10, 12, dtype=torch.float64)
    out, stats = codebook.correct(u, book, 2, cfg)
    assert out.norm() >= 0.5 * u.norm() - 1e-9
    assert float(stats["correction_ratio"]) <= 0.5 + 1e-9


def test_scheduled_writes_never_evict_consolidated_tasks():
    cfg = config(capacity=3, rank=4, write_rank=2)
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(book, low_rank(10, 12, 2, seed=0), 10, cfg, seed=1, kind=CONSOLIDATED, ready=10)
    codebook.write(book, low_rank(10, 12, 2, seed=1), 20, cfg, seed=2, kind=CONSOLIDATED, ready=20)
    # The pool is full of tasks: a window summary finds no room and is skipped.
    assert (
        codebook.write(book, low_rank(10, 12, 2, seed=2), 30, cfg, seed=3, kind=SCHEDULED, ready=50)
        == "skip"
    )
    assert sorted(int(f) for f in book["fresh"][book["used"]]) == [10, 20]
    # A new task evicts the oldest task.
    assert (
        codebook.write(
            book, low_rank(10, 12, 2, seed=3), 40, cfg, seed=4, kind=CONSOLIDATED, ready=40
        )
        == "insert"
    )
    assert sorted(int(f) for f in book["fresh"][book["used"]]) == [20, 40]


def test_consolidation_evicts_window_summaries_before_tasks():
    cfg = config(capacity=3, rank=4, write_rank=2)
    book = codebook.init_codebook(12, cfg, "cpu")
    codebook.write(book, low_rank(10, 12, 2, seed=0), 10, cfg, seed=1, kind=CONSOLIDATED, ready=10)
    codebook.write(book, low_rank(10, 12, 2, seed=1), 20, cfg, seed=2, kind=SCHEDULED, ready=40)
    codebook.write(book, low_rank(10, 12, 2, seed=2), 30, cfg, seed=3, kind=CONSOLIDATED, ready=30)
    kinds = sorted(int(k) for k in book["kind"][book["used"]])
    assert kinds == [CONSOLIDATED, CONSOLIDATED]


@pytest.mark.parametrize("gate", ["overlap", "sign"])
def test_batched_correction_with_cached_lifts_equals_one_matrix_at_a_time(gate):
    """codebook.correct over a stack of codebooks (FOGO's buckets), with the lift matrices and
    column maps computed once, equals the per-matrix correction; hits count the same."""
    from orthoptim.ops.subspace import lift_matrix

    cfg = config(gate=gate, gate_threshold=0.05, rho=3.0, sketch_dim=32)
    sketch = codebook.sign_sketch(10, cfg, seed=0, device="cpu")
    books = []
    for i in range(3):
        book = codebook.init_codebook(12, cfg, "cpu")
        for j in range(i + 1):  # 1 to 3 entries
            codebook.write(book, low_rank(10, 12, 2, seed=10 * i + j), 1, cfg, seed=j,
                           kind=CONSOLIDATED, ready=1, sketch=sketch)  # fmt: skip
        books.append(book)
    gen = torch.Generator().manual_seed(5)
    updates = torch.randn(3, 10, 12, generator=gen, dtype=torch.float64)
    updates[1] = -low_rank(10, 12, 2, seed=10)  # opposes a stored direction
    stacked = {k: torch.stack([b[k] for b in books]) for k in books[0]}
    lift = lift_matrix(stacked["basis"], cfg.rho)
    col2entry = codebook.entry_of_columns(stacked, cfg.capacity)
    signs = sketch.expand(3, *sketch.shape)
    out, stats = codebook.correct(updates, stacked, torch.full((3,), 2.0), cfg, signs,
                                  lift=lift, col2entry=col2entry)  # fmt: skip
    for i, book in enumerate(books):
        one, one_stats = codebook.correct(updates[i], book, 2, cfg, sketch)
        assert torch.allclose(out[i], one, atol=1e-12)
        assert torch.equal(stacked["hits"][i], book["hits"])
        for k in ("ready", "conflicts"):
            assert int(stats[k][i]) == int(one_stats[k])
    assert int(stats["conflicts"].sum()) > 0
