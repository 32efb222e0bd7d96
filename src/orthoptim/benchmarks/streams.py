"""Continual-learning task streams (van de Ven & Tolias' three scenarios).

- :func:`permuted_stream` (domain-IL): task ``t`` applies a fixed random permutation ``pi_t`` to
  the flattened input, ``x'[k] = x[pi_t[k]]``; task 0 is unpermuted when ``first_unpermuted``.
- :func:`rotated_stream` (domain-IL): task ``t`` rotates every image by ``theta_t`` degrees
  (bilinear ``affine_grid``/``grid_sample``, zeros outside). GEM angles:
  ``theta_t ~ U[t * 180/T, (t+1) * 180/T)``; Stable-SGD angles: ``theta_t = 10 t - U(0, 10)``
  (``0`` for the first task).
- :func:`split_stream`: consecutive groups of classes (``{0,1}, {2,3}, ...``). ``"task-il"`` masks
  the logits to the task's classes (the task id is known at test time); ``"class-il"`` uses all
  logits.

Inputs are not copied per task: a :class:`Task` shares the dataset tensors (or a subset of them)
and carries a ``transform`` applied batch-wise by the training loop, so 20 permuted full-MNIST
tasks cost no extra memory. Randomness comes from a local ``torch.Generator`` seeded with
``seed``; the global RNGs are untouched, and the same seed gives the same stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._types import ImageDataset

__all__ = [
    "Task",
    "Stream",
    "Permute",
    "Rotate",
    "permuted_stream",
    "rotated_stream",
    "split_stream",
]

SCENARIOS = ("domain-il", "task-il", "class-il")


class Permute:
    """Input transform ``x -> x.flatten(1)[:, perm].view_as(x)`` for one task."""

    def __init__(self, perm: torch.Tensor):
        self.perm = perm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, self.perm.to(x.device)].reshape(x.shape)

    def __repr__(self) -> str:
        return f"Permute(n={self.perm.numel()})"


class Rotate:
    """Input transform rotating ``(N, C, H, W)`` images by ``degrees`` (counter-clockwise)."""

    def __init__(self, degrees: float):
        self.degrees = float(degrees)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.degrees == 0.0:
            return x
        a = math.radians(self.degrees)
        c, s = math.cos(a), math.sin(a)
        theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __repr__(self) -> str:
        return f"Rotate({self.degrees:.2f})"


@dataclass
class Task:
    """One task of a stream.

    Attributes:
        name: e.g. ``"perm-3"``, ``"rot-45.2"``, ``"split-4-5"``.
        train_x, train_y, test_x, test_y: the task's data, before ``transform``.
        transform: batch-wise input transform (``None`` = identity).
        classes: the task's classes; for task-IL the logits are masked to them.
        use_mask: whether training and evaluation mask the logits to ``classes``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    classes: tuple[int, ...] | None = None
    use_mask: bool = False

    def mask(self, num_classes: int) -> torch.Tensor | None:
        """Boolean ``(num_classes,)`` logit mask (True = allowed), or ``None`` when unmasked."""
        if not self.use_mask or self.classes is None:
            return None
        m = torch.zeros(num_classes, dtype=torch.bool)
        m[list(self.classes)] = True
        return m


@dataclass
class Stream:
    """An ordered list of tasks sharing one label space of ``num_classes`` classes."""

    tasks: list[Task]
    num_classes: int
    scenario: str
    name: str
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _subset(x, y, n: int | None, g: torch.Generator):
    """The first ``n`` examples of a seeded permutation (in original order), or all if None."""
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx]


def permuted_stream(
    dataset: ImageDataset,
    num_tasks: int,
    seed: int = 0,
    first_unpermuted: bool = True,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
) -> Stream:
    """Permuted-input domain-IL stream.

    Args:
        dataset: source dataset (inputs of any shape; permuted after flattening).
        num_tasks: number of tasks ``T``.
        seed: seed of the permutations and subsets.
        first_unpermuted: task 0 keeps the original pixel order (Stable-SGD protocol; the GEM and
            Avalanche protocols permute every task: pass ``False``).
        train_per_task: draw this many training examples per task (GEM: 1000), else all.
        test_per_task: likewise for the test set, else all.
    """
    g = _generator(seed)
    d = int(dataset.train_x[0].numel())
    tasks = []
    for t in range(num_tasks):
        perm = torch.randperm(d, generator=g)
        tr = _subset(dataset.train_x, dataset.train_y, train_per_task, g)
        te = _subset(dataset.test_x, dataset.test_y, test_per_task, g)
        tf = None if (t == 0 and first_unpermuted) else Permute(perm)
        tasks.append(Task(f"perm-{t}", *tr, *te, transform=tf))
    return Stream(tasks, dataset.num_classes, "domain-il", f"permuted-{dataset.name}")


def rotated_stream(
    dataset: ImageDataset,
    num_tasks: int,
    seed: int = 0,
    angles: Sequence[float] | None = None,
    protocol: str = "gem",
    train_per_task: int | None = None,
    test_per_task: int | None = None,
) -> Stream:
    """Rotated-image domain-IL stream; inputs must be ``(N, C, H, W)`` images.

    Args:
        dataset: source image dataset.
        num_tasks: number of tasks ``T``.
        seed: seed of the angles and subsets.
        angles: explicit angles in degrees (length ``T``); overrides ``protocol``.
        protocol: ``"gem"`` (``U[t*180/T, (t+1)*180/T)``) or ``"stable-sgd"`` (``10t - U(0,10)``,
            task 0 unrotated).
        train_per_task, test_per_task: per-task subset sizes as in :func:`permuted_stream`.
    """
    if dataset.train_x.ndim != 4:
        raise ValueError(
            f"rotated_stream needs (N, C, H, W) images, got {tuple(dataset.train_x.shape)}"
        )
    g = _generator(seed)
    if angles is None:
        u = torch.rand(num_tasks, generator=g, dtype=torch.float64).tolist()
        if protocol == "gem":
            angles = [(t + u[t]) * 180.0 / num_tasks for t in range(num_tasks)]
        elif protocol == "stable-sgd":
            angles = [0.0] + [10.0 * t - 10.0 * u[t] for t in range(1, num_tasks)]
        else:
            raise ValueError(f"Invalid protocol: {protocol!r}; expected 'gem' or 'stable-sgd'")
    if len(angles) != num_tasks:
        raise ValueError(f"got {len(angles)} angles for {num_tasks} tasks")
    tasks = []
    for a in angles:
        tr = _subset(dataset.train_x, dataset.train_y, train_per_task, g)
        te = _subset(dataset.test_x, dataset.test_y, test_per_task, g)
        tasks.append(Task(f"rot-{float(a):.1f}", *tr, *te, transform=Rotate(a)))
    return Stream(
        tasks, dataset.num_classes, "domain-il", f"rotated-{dataset.name}",
        info={"angles": [float(a) for a in angles]},
    )  # fmt: skip


def split_stream(
    dataset: ImageDataset,
    classes_per_task: int = 2,
    scenario: str = "task-il",
    seed: int = 0,
    shuffle_classes: bool = False,
    class_order: Sequence[int] | None = None,
    train_per_task: int | None = None,
) -> Stream:
    """Split stream: task ``t`` holds classes ``order[t*k : (t+1)*k]`` (``k = classes_per_task``).

    Labels keep their original values (one shared output layer). In ``"task-il"`` the logits are
    masked to the task's classes in training and evaluation; in ``"class-il"`` all
    ``num_classes`` logits compete (no task id), the hardest scenario.

    Args:
        dataset: source dataset.
        classes_per_task: classes per task; must divide the number of classes used.
        scenario: ``"task-il"`` or ``"class-il"``.
        seed: seed for ``shuffle_classes`` and the subsets.
        shuffle_classes: draw a random class order (else ``0, 1, ..., C-1``).
        class_order: explicit class order (overrides ``shuffle_classes``).
        train_per_task: subsample each task's training set to this many examples.
    """
    if scenario not in ("task-il", "class-il"):
        raise ValueError(f"Invalid scenario: {scenario!r}; expected 'task-il' or 'class-il'")
    g = _generator(seed)
    C = dataset.num_classes
    if class_order is None:
        class_order = torch.randperm(C, generator=g).tolist() if shuffle_classes else list(range(C))
    order = [int(c) for c in class_order]
    if len(order) % classes_per_task != 0:
        raise ValueError(f"{len(order)} classes do not split into tasks of {classes_per_task}")
    tasks = []
    for t in range(len(order) // classes_per_task):
        cls = tuple(order[t * classes_per_task : (t + 1) * classes_per_task])
        cl = torch.tensor(cls)
        tr_m, te_m = torch.isin(dataset.train_y, cl), torch.isin(dataset.test_y, cl)
        tr = _subset(dataset.train_x[tr_m], dataset.train_y[tr_m], train_per_task, g)
        name = "split-" + "-".join(map(str, cls))
        tasks.append(
            Task(name, *tr, dataset.test_x[te_m], dataset.test_y[te_m],
                 classes=cls, use_mask=scenario == "task-il")
        )  # fmt: skip
    return Stream(tasks, C, scenario, f"split-{dataset.name}", info={"class_order": order})
