"""A tqdm bar behind the tasks' :class:`~orthoptim.benchmarks.tasks.base.Progress` protocol.

One bar per run: ``start`` closes the previous bar and opens a new one, so a single adapter can
follow a sequence of runs. tqdm is imported on first use (it is a ``bench`` extra).
"""

from __future__ import annotations

__all__ = ["TqdmProgress"]


class TqdmProgress:
    """Step progress shown with tqdm.

    Args:
        prefix: text put before each run's description.
        quiet: show nothing.
        position: tqdm line position (1 keeps it under an outer bar at 0).
    """

    def __init__(self, prefix: str = "", quiet: bool = False, position: int | None = None):
        self.prefix, self.quiet, self.position, self.bar = prefix, quiet, position, None

    def start(self, total: int, desc: str = "") -> None:
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(
            total=total, desc=f"{self.prefix} {desc}".strip(), disable=self.quiet, leave=False,
            position=self.position, dynamic_ncols=True,
        )  # fmt: skip

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
