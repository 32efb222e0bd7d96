"""FOGO's settings and per-parameter state: how a parameter is seen as a matrix, what state it
holds, the memory's settings per (group, shape), the checks of a group's settings, and the
checks and dtype rules of loading.

Every parameter has its own state dict (so ``state_dict()``, ``torch.distributed.checkpoint``
and resharding stay per parameter); the step stacks what it needs per bucket of same-shape
matrices (``orthoptim.optim._fogo_math``, ``orthoptim.memory.bucket``).

A matrix parameter (``algorithm="fogo"``) holds::

    step            float32 0-d, on the parameter's device (a dropped step does not count)
    momentum_slow   (m, n), the parameter's dtype (conv kernels as out x in*kh*kw)
    momentum_fast   (m, n), when dual_stream
    seed, writes    ints: base seed of its random projections (global parameter index), writes
    memory          the codebook tensors (``orthoptim.memory.codebook``), with ``memory=True``
    grad_sketch     (side, width) float32 sketch of the gradients since the last write
    row_energy, last_profile, stretch_windows   the stretch test's output-energy profiles
    last_stats      0-d diagnostics of the last correction (``memory_stats``)

With ``protection="kronecker"`` (opt-in) a matrix holds ``kron`` instead of the codebook state
(``orthoptim.memory.kronecker``: running gradient Grams and preconditioners per protected
side), and so does a 2-D AdamW parameter of a group with the memory on (an embedding or head).
With ``kron_share="model"`` a whole side shared with other matrices lives only in its factor's
*owner* (the first parameter, in ``param_groups`` order, with a whole protected side of that
dimension and settings; see :func:`shared_owners`): the others' ``kron`` lacks that side.

"side" is the protected side of the *layer* (``side="input"``: its inputs), whatever the storage
``layout``: ``"out_in"`` (torch: dim 0 is the output) or ``"in_out"`` (HF GPT-2 ``Conv1D``, Flax
kernels: dim 0 is the input). Everything below works on the stored matrix; :func:`stored_side`
translates.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch

from orthoptim.memory import codebook, kronecker
from orthoptim.memory.bucket import MemoryConfig
from orthoptim.ops.newton_schulz import dtype_for_device, resolve_coefficients, resolve_dtype
from orthoptim.ops.subspace import rho_from_radius
from orthoptim.optim._validation import check_betas, check_choice, check_int, check_range

ALGORITHMS = ("fogo", "adamw")
LAYOUTS = ("out_in", "in_out")
# State that keeps its own dtype on load (torch casts floating state to the parameter's dtype).
OWN_DTYPE_STATE = ("memory", "last_stats", "grad_sketch", "row_energy", "last_profile", "kron")
PROTECTIONS = ("subspace", "kronecker")
# Settings added after checkpoints were first saved: a loaded group may lack them.
_LATER_DEFAULTS = {
    "layout": "out_in", "protection": "subspace", "kron_share": "none", "kron_detect": 0.0,
}  # fmt: skip


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a >= 2-D tensor as (out, in * rest): conv kernels become out x in*kh*kw."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # not -1: zero-size tensors


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    return (p.shape[0], math.prod(p.shape[1:]))


def algorithm(group: dict[str, Any], p: torch.Tensor) -> str:
    """``"fogo"`` or ``"adamw"``: the group's choice, else FOGO for ndim >= 2."""
    if group["algorithm"] is not None:
        if group["algorithm"] == "fogo" and p.ndim < 2:
            raise ValueError(
                f"algorithm='fogo' needs parameters with ndim >= 2, got shape {tuple(p.shape)}"
            )
        return group["algorithm"]
    return "fogo" if p.ndim >= 2 else "adamw"


def stored_side(group: dict[str, Any]) -> str:
    """The protected side in the stored matrix's terms: an ``"in_out"`` layout keeps the layer's
    inputs on dim 0, so its input side is the stored matrix's column space."""
    side = group["side"]
    if group.get("layout", "out_in") == "in_out":  # groups saved before the key existed
        return {"input": "output", "output": "input"}[side]
    return side


def slow_beta(group: dict[str, Any]) -> float:
    """The slow stream's beta: the scheduler's ``momentum`` when set, else ``beta_slow``."""
    momentum = group.get("momentum")  # groups loaded from older checkpoints lack the key
    return group["beta_slow"] if momentum is None else momentum


def adamw_betas(group: dict[str, Any]) -> tuple[float, float]:
    momentum = group.get("momentum")
    return group["adamw_betas"] if momentum is None else (momentum, group["adamw_betas"][1])


# ------------------------------------------------------------------------------ memory config
_MEMORY_KEYS = (
    "side", "layout", "memory_budget", "memory_dtype", "capacity", "write_rank", "write_interval",
    "min_age", "gate", "gate_threshold", "radius", "merge_threshold", "stretch_threshold",
    "min_energy", "eviction", "overflow", "write_source", "sketch_dim",
)  # fmt: skip


_KRONECKER_KEYS = ("layout", "kron_strength", "kron_sides", "kron_online", "write_interval")


def protection(group: dict[str, Any]) -> str:
    return group.get("protection", "subspace")


def memory_config(
    group: dict[str, Any], shape: tuple[int, int]
) -> MemoryConfig | kronecker.KroneckerConfig:
    """The memory settings of a (m, n) matrix under ``group`` (cached per distinct settings):
    the codebook's, or with ``protection="kronecker"`` the Kronecker protection's."""
    kron = protection(group) == "kronecker"
    keys = _KRONECKER_KEYS if kron else _MEMORY_KEYS
    settings = tuple((k, group.get(k, _LATER_DEFAULTS.get(k))) for k in keys)
    return (_kronecker_config if kron else _memory_config)(settings, tuple(shape))


@functools.lru_cache(maxsize=1024)
def _kronecker_config(
    settings: tuple[tuple[str, Any], ...], shape: tuple[int, int]
) -> kronecker.KroneckerConfig:
    g = dict(settings)
    in_out = g["layout"] == "in_out"
    out_dim, in_dim = (shape[1], shape[0]) if in_out else shape
    sides = kronecker.layer_sides(out_dim, in_dim, g["kron_sides"])
    if in_out:  # the stored rows are the layer's inputs
        sides = {{"input": "output", "output": "input"}[k]: v for k, v in sides.items()}
    online = g["kron_online"]
    return kronecker.KroneckerConfig(
        sides=tuple(sorted(sides.items())), kappa=g["kron_strength"], online=online,
        write_interval=g["write_interval"] if online > 0 else 0,
    )  # fmt: skip


def kronecker_sides(group: dict[str, Any], p: torch.Tensor) -> dict[str, str]:
    """The stored sides the Kronecker protection covers on ``p`` (``{side: "full" or
    "diagonal"}``; empty when it covers none)."""
    if has_kronecker_adamw(group, p):
        return embedding_sides(group)
    if has_memory(group, p) and protection(group) == "kronecker":
        config = memory_config(group, matrix_shape(p))
        return dict(cast(kronecker.KroneckerConfig, config).sides)
    return {}


def shared_owners(
    param_groups: list[dict[str, Any]],
) -> dict[int, dict[str, tuple[torch.Tensor, str]]]:
    """``kron_share="model"``: for every parameter with a whole protected side that a factor
    shares, ``{id(p): {side: (owner, owner's side)}}``. One factor per (dimension of the side,
    device, ``kron_strength``, ``kron_detect``), across param groups (the embedding / head is
    usually in another group than the block matrices); its owner is its first parameter in
    ``param_groups`` order, whose state holds the factor under the owner's side."""
    owners: dict[tuple[Any, ...], tuple[torch.Tensor, str]] = {}
    out: dict[int, dict[str, tuple[torch.Tensor, str]]] = {}
    for group in param_groups:
        if group.get("kron_share", "none") == "none":
            continue
        for p in group["params"]:
            for side, form in kronecker_sides(group, p).items():
                if form != "full":
                    continue
                shape = matrix_shape(p)
                dim = shape[1] if side == "input" else shape[0]
                key = (dim, str(p.device), group["kron_strength"], group["kron_detect"])
                out.setdefault(id(p), {})[side] = owners.setdefault(key, (p, side))
    return out


def owned_sides(
    owners: dict[int, dict[str, tuple[torch.Tensor, str]]], p: torch.Tensor
) -> dict[str, bool]:
    """``{side: whether p's state holds the factor}`` for ``p``'s shared sides."""
    return {side: o is p and os == side for side, (o, os) in owners.get(id(p), {}).items()}


def embedding_sides(group: dict[str, Any]) -> dict[str, str]:
    """The Kronecker protection of a 2-D AdamW parameter (an embedding or a head, stored as
    (tokens, features)): its features whole, its token rows as a diagonal (a 50k vocabulary
    fits), or whole with ``kron_sides="both"``."""
    return {"input": "full", "output": "full" if group["kron_sides"] == "both" else "diagonal"}


@functools.lru_cache(maxsize=1024)
def _memory_config(settings: tuple[tuple[str, Any], ...], shape: tuple[int, int]) -> MemoryConfig:
    g = dict(settings)
    transpose = stored_side(g) == "output"
    m, n = (shape[1], shape[0]) if transpose else shape  # m: other side, n: protected side
    mem_dtype = resolve_dtype(g["memory_dtype"])
    elem = torch.empty((), dtype=mem_dtype).element_size()
    # Relative to the float32 size of the weight, so the memory (and a checkpoint of it) does
    # not change with the parameter dtype.
    budget = g["memory_budget"] * m * n * 4  # bytes
    if g["stretch_threshold"] > 0:
        budget -= 8 * m  # output-energy profiles of this window and the previous one
    if g["write_source"] == "gradients":
        # Pool R (elem bytes per entry) plus a float32 sketch of width R // 2 + 4 per column.
        rank = int((budget / n - 16) // (elem + 2))
    else:
        rank = int(budget // (n * elem))
    rank = max(1, min(rank, n))
    write_rank = min(g["write_rank"] or max(1, rank // 2), rank)
    book = codebook.CodebookConfig(
        rank=rank, capacity=g["capacity"], write_rank=write_rank, min_energy=g["min_energy"],
        merge_threshold=g["merge_threshold"], gate=g["gate"],
        gate_threshold=g["gate_threshold"], rho=rho_from_radius(g["radius"]),
        eviction=g["eviction"], overflow=g["overflow"], sketch_dim=g["sketch_dim"],
        dtype=mem_dtype,
    )  # fmt: skip
    interval = g["write_interval"]
    return MemoryConfig(
        codebook=book, transpose=transpose, side_dim=n, other_dim=m,
        sketch_width=min(write_rank + 4, n) if g["write_source"] == "gradients" else 0,
        profile=g["stretch_threshold"] > 0, stretch_threshold=g["stretch_threshold"],
        write_interval=interval, min_age=g["min_age"] if g["min_age"] is not None else interval,
    )  # fmt: skip


# ------------------------------------------------------------------------------ state
def has_memory(group: dict[str, Any], p: torch.Tensor) -> bool:
    return bool(group["memory"]) and p.numel() > 0 and algorithm(group, p) == "fogo"


def has_kronecker_adamw(group: dict[str, Any], p: torch.Tensor) -> bool:
    """A 2-D AdamW parameter that the Kronecker protection covers (an embedding or head)."""
    return (
        bool(group["memory"]) and protection(group) == "kronecker" and p.ndim == 2
        and p.numel() > 0 and algorithm(group, p) == "adamw"
    )  # fmt: skip


def stats_dtype(p: torch.Tensor) -> torch.dtype:
    """dtype the correction runs in (and its ratio is kept in): >= float32."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def new_state(
    group: dict[str, Any],
    p: torch.Tensor,
    index: int,
    device: torch.device | str,
    shared: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """The fresh state of ``p`` (global parameter index ``index``) under ``group``'s settings,
    on ``device`` (``"meta"``: shapes only, what loading checks a saved state against).
    ``shared``: ``{side: whether p owns the factor}`` for its sides that a factor shares
    (:func:`shared_owners`): a side owned elsewhere is left out of ``kron``, an owned one
    also gets the boundary detector's state when ``kron_detect`` is on.

    ``step`` is a float32 0-d tensor on the parameter's device (as in torch's fused AdamW):
    a step dropped for non-finite gradients is not counted, without a host sync."""
    state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32, device=device)}
    if algorithm(group, p) == "adamw":
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format, device=device)
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if has_kronecker_adamw(group, p):
            state["kron"] = _kron_state(group, embedding_sides(group), matrix_shape(p), device,
                                        shared)  # fmt: skip
        return state
    if group.get("layout", "out_in") == "in_out" and p.ndim != 2:
        raise ValueError(
            f"Invalid layout: 'in_out' needs a 2-D parameter, got shape {tuple(p.shape)}"
        )
    shape = matrix_shape(p)
    state["momentum_slow"] = torch.zeros(shape, dtype=p.dtype, device=device)
    if group["dual_stream"]:
        state["momentum_fast"] = torch.zeros(shape, dtype=p.dtype, device=device)
    if not has_memory(group, p):  # a zero-size matrix has nothing to protect
        return state
    config = memory_config(group, shape)
    if isinstance(config, kronecker.KroneckerConfig):
        state["kron"] = _kron_state(group, dict(config.sides), shape, device, shared)
        return state
    state["seed"] = group["seed"] * 1_000_003 + index
    state["writes"] = 0
    state["memory"] = codebook.init_codebook(config.side_dim, config.codebook, device)
    if config.sketch_width:
        state["grad_sketch"] = torch.zeros(config.side_dim, config.sketch_width, device=device)
    if config.profile:
        state["row_energy"] = torch.zeros(config.other_dim, device=device)
        state["last_profile"] = torch.zeros(config.other_dim, device=device)
        state["stretch_windows"] = 0
    state["last_stats"] = new_stats(stats_dtype(p), device)
    return state


def _kron_state(
    group: dict[str, Any],
    sides: dict[str, str],
    shape: tuple[int, int],
    device: torch.device | str,
    shared: dict[str, bool] | None,
) -> dict[str, torch.Tensor]:
    """``kron`` of a protected matrix: its own sides, the shared sides it owns (with their
    detector when ``kron_detect`` is on), none of the shared sides another parameter owns."""
    shared = shared or {}
    state = kronecker.init({k: v for k, v in sides.items() if shared.get(k, True)}, *shape, device)
    if group.get("kron_detect", 0.0) > 0:
        for side, owned in shared.items():
            if owned:
                state.update(kronecker.init_detector(side, device))
    return state


def new_stats(dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The last correction's diagnostics, before any correction."""
    return {
        "ready": torch.zeros((), dtype=torch.int64, device=device),
        "conflicts": torch.zeros((), dtype=torch.int64, device=device),
        "correction_ratio": torch.zeros((), dtype=dtype, device=device),
    }


def _tensor_shapes(state: dict[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{"name" or "memory.name": shape}`` of every tensor in a (nested) state dict."""
    out = {}
    for name, value in state.items():
        if isinstance(value, dict):
            out.update(_tensor_shapes(value, f"{prefix}{name}."))
        elif isinstance(value, torch.Tensor):
            out[prefix + name] = tuple(value.shape)
    return out


def check_loadable(param_groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """``ValueError`` if a saved per-parameter state cannot belong to its parameter under the
    saved group settings (another model, optimizer or memory configuration)."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(param_groups):
        return  # torch raises its own error
    for saved, group in zip(saved_groups, param_groups, strict=True):
        if len(saved["params"]) != len(group["params"]):
            return
    merged = [
        {**group, **{k: v for k, v in saved.items() if k != "params"}}
        for saved, group in zip(saved_groups, param_groups, strict=True)
    ]
    owners = shared_owners(merged)
    for gi, (saved, hp) in enumerate(zip(saved_groups, merged, strict=True)):
        for key, p in zip(saved["params"], hp["params"], strict=True):
            st = state_dict["state"].get(key)
            if not st:
                continue
            shared = owned_sides(owners, p)
            fresh = new_state(hp, p, 0, "meta", shared)
            expect = _tensor_shapes({k: v for k, v in fresh.items() if k != "last_stats"})
            found = _tensor_shapes({k: v for k, v in st.items() if k != "last_stats"})
            extra = [name for name in found if name not in expect]
            for name in [*expect, *extra]:  # what is missing first, then what is left over
                if expect.get(name) != found.get(name):
                    raise ValueError(
                        f"FOGO.load_state_dict: param group {gi}, parameter {key} "
                        f"(shape {tuple(p.shape)}, algorithm {algorithm(hp, p)!r}) needs state "
                        f"{name!r} of shape {expect.get(name)}, the state dict has "
                        f"{found.get(name)}; it comes from another model, optimizer or "
                        "memory configuration"
                    )


def own_dtype_values(state_dict: dict[str, Any]) -> dict[str, Any]:
    """What ``load_state_dict`` must restore in its saved dtype, per saved state key."""
    return {
        key: {name: value[name] for name in OWN_DTYPE_STATE if name in value}
        for key, value in state_dict["state"].items()
    }


def restore_loaded(state: dict[str, Any], p: torch.Tensor, kept: dict[str, Any]) -> None:
    """After torch's load: put back the own-dtype values (copied to ``p``'s device) and move the
    step counter to the parameter's device as float32."""
    for name, value in kept.items():
        if isinstance(value, dict):
            value = {k: v.to(p.device, copy=True) for k, v in value.items()}
        else:
            value = value.to(p.device, copy=True)
        state[name] = value
    if "step" in state:
        state["step"] = state["step"].to(p.device, torch.float32, copy=True)
    if "memory" in state and "last_stats" not in state:  # saved before any correction
        state["last_stats"] = new_stats(stats_dtype(p), p.device)


# ------------------------------------------------------------------------------ validation
def validate(g: dict[str, Any]) -> None:
    """``ValueError`` naming the first invalid setting of a param group (or the defaults)."""
    check_range("lr", g["lr"], 0.0)
    check_range("weight_decay", g["weight_decay"], 0.0)
    check_range("beta_slow", g["beta_slow"], 0.0, 1.0, high_open=True)
    check_range("beta_fast", g["beta_fast"], 0.0, 1.0, high_open=True)
    if g["dual_stream"] and not g["beta_fast"] < g["beta_slow"]:
        raise ValueError(
            f"Invalid beta_fast: {g['beta_fast']}; must be < beta_slow ({g['beta_slow']})"
        )
    check_range("mix", g["mix"], 0.0, 1.0)
    check_choice("dual_stream", g["dual_stream"], (True, False))
    check_choice("fusion", g["fusion"], ("slerp", "lerp"))
    check_choice("nesterov", g["nesterov"], (True, False))
    check_range("target_rms", g["target_rms"], 0.0, low_open=True)
    check_choice("scale", g["scale"], ("rms", "muon"))
    check_int("ns_steps", g["ns_steps"], 0, 99)
    resolve_coefficients(g["ns_coefficients"])
    if g["ns_dtype"] != "auto":
        resolve_dtype(g["ns_dtype"])
    check_range("eps", g["eps"], 0.0, low_open=True)
    check_betas("adamw_betas", g["adamw_betas"])
    check_range("adamw_eps", g["adamw_eps"], 0.0, low_open=True)
    if g.get("momentum") is not None:
        check_range("momentum", g["momentum"], 0.0, 1.0, high_open=True)
    check_choice("memory", g["memory"], (True, False))
    check_range("memory_budget", g["memory_budget"], 0.0, 1.0, low_open=True)
    check_choice("memory_dtype", g["memory_dtype"], ("bfloat16", "float32", "float64"))
    check_int("capacity", g["capacity"], 1)
    if g["write_rank"] is not None:
        check_int("write_rank", g["write_rank"], 1)
    check_int("write_interval", g["write_interval"], 0)
    if g["min_age"] is not None:
        check_int("min_age", g["min_age"], 0)
    check_choice("gate", g["gate"], ("overlap", "sign"))
    check_range("gate_threshold", g["gate_threshold"], 0.0, 1.0)
    check_range("radius", g["radius"], 0.0, 1.0, low_open=True)
    check_range("merge_threshold", g["merge_threshold"], 0.0, 1.0)
    check_range("stretch_threshold", g["stretch_threshold"], 0.0, 1.0)
    check_range("min_energy", g["min_energy"], 0.0, 1.0)
    check_choice("eviction", g["eviction"], ("oldest", "least_used"))
    check_choice("overflow", g["overflow"], ("compress", "evict"))
    check_choice("side", g["side"], ("input", "output"))
    check_choice("layout", g["layout"], LAYOUTS)
    check_choice("protection", g["protection"], PROTECTIONS)
    check_range("kron_strength", g["kron_strength"], 0.0, low_open=True)
    check_choice("kron_sides", g["kron_sides"], kronecker.SIDE_CHOICES)
    check_range("kron_online", g["kron_online"], 0.0, 1.0, high_open=True)
    check_choice("kron_share", g.get("kron_share", "none"), kronecker.SHARE_CHOICES)
    detect = g.get("kron_detect", 0.0)
    check_range("kron_detect", detect, 0.0)
    if detect and detect <= 1:
        raise ValueError(
            f"Invalid kron_detect: {detect}; the energy growth that marks a new task must be "
            "> 1 (or 0: no detection)"
        )
    if detect and g.get("kron_share", "none") == "none":
        raise ValueError(
            f"Invalid kron_detect: {detect} needs shared factors (kron_share='model'), got "
            "kron_share='none'"
        )
    if g.get("kron_share", "none") != "none" and g["kron_online"] > 0:
        raise ValueError(
            f"Invalid kron_online: {g['kron_online']} with kron_share={g['kron_share']!r}; "
            "shared factors consolidate at end_task or on a detected boundary (kron_detect)"
        )
    check_choice("write_source", g["write_source"], ("gradients", "slow"))
    check_int("sketch_dim", g["sketch_dim"], 1)
    check_int("seed", g["seed"], 0)
    if g.get("algorithm") is not None:
        check_choice("algorithm", g["algorithm"], ALGORITHMS)


def ns_dtype_for(params: list[torch.Tensor]) -> str:
    """``ns_dtype="auto"``: the dtype of the parameters' device type (one per group)."""
    names = {dtype_for_device(p.device) for p in params} or {"float32"}
    if len(names) > 1:
        devices = sorted({p.device.type for p in params})
        raise ValueError(
            f"Invalid ns_dtype: 'auto' for a param group on devices {devices}, which use "
            f"{sorted(names)}; set ns_dtype explicitly"
        )
    return names.pop()


def buckets_of(group: dict[str, Any]) -> list[list[torch.Tensor]]:
    """The group's FOGO matrices (non-empty) by (matrix shape, dtype, device), in order: the
    batches of the step and the units of ownership of a sharded one."""
    by_key: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for p in group["params"]:
        if algorithm(group, p) == "fogo" and p.numel() > 0:
            by_key.setdefault((matrix_shape(p), p.dtype, p.device), []).append(p)
    return list(by_key.values())
