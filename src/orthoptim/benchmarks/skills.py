"""Synthetic string "skills" for the ``lm-skills`` task: instruction-like examples in text form.

Each skill is a family of examples ``"<name>:<prompt>=<answer>\\n"`` over one small character set
(lower-case letters, digits, ``:=+`` and the newline), so every skill shares the base corpus'
character vocabulary plus a few symbols:

* ``"rev"``: reverse a lower-case string, ``"rev:abc=cba\\n"``;
* ``"sort"``: sort its letters, ``"sort:cab=abc\\n"``;
* ``"add"``: add two decimal numbers, ``"add:12+34=46\\n"``.

Strings have ``MIN_LEN`` to ``MAX_LEN`` letters drawn uniformly; the addends are uniform in
``[0, 10**ADD_DIGITS)``. The *answer* of an example is what follows ``=`` up to and including the
newline (the newline is the stop signal a greedy decoder needs).

Examples are drawn by a NumPy generator seeded with ``SeedSequence([seed, skill index])``, so a
run's data is a function of its seed. Training and test examples never share a prompt: an
example is a test example exactly when the CRC-32 of its prompt is ``0 mod TEST_MOD`` (the same
rule for every seed), so the held-out set measures the skill, not recall of seen prompts.
"""

from __future__ import annotations

import string
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["SKILLS", "SKILL_CHARS", "SkillExample", "is_test_prompt", "skill_examples"]

SKILLS = ("rev", "sort", "add")
MIN_LEN, MAX_LEN = 2, 5
ADD_DIGITS = 2
TEST_MOD = 10
_LETTERS = np.array(list(string.ascii_lowercase))
SKILL_CHARS = "".join(sorted(set(string.ascii_lowercase + string.digits + ":=+\n")))


@dataclass(frozen=True)
class SkillExample:
    """One example: the text is ``prompt + answer``; only ``answer`` is scored."""

    prompt: str  # "rev:abc="
    answer: str  # "cba\n"


def _draw(name: str, rng: np.random.Generator) -> SkillExample:
    if name == "add":
        a, b = (int(v) for v in rng.integers(0, 10**ADD_DIGITS, size=2))
        return SkillExample(f"add:{a}+{b}=", f"{a + b}\n")
    n = int(rng.integers(MIN_LEN, MAX_LEN + 1))
    s = "".join(_LETTERS[rng.integers(0, len(_LETTERS), size=n)])
    out = s[::-1] if name == "rev" else "".join(sorted(s))
    return SkillExample(f"{name}:{s}=", out + "\n")


def is_test_prompt(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out side of the split (CRC-32 mod ``TEST_MOD``)."""
    return zlib.crc32(prompt.encode()) % TEST_MOD == 0


def skill_examples(
    name: str, seed: int, n_train: int, n_test: int
) -> tuple[list[SkillExample], list[SkillExample]]:
    """``n_train`` training and ``n_test`` test examples of skill ``name`` for run ``seed``.

    Examples are drawn in sequence and sent to the side their prompt hashes to until both sides
    are full (prompts may repeat within a side, never across).

    Args:
        name: one of :data:`SKILLS`.
        seed: the run seed.
        n_train: training examples (positive).
        n_test: test examples (positive).
    """
    if name not in SKILLS:
        raise ValueError(f"Invalid skill: {name!r}; expected one of {SKILLS}")
    for key, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Invalid {key}: {n!r}; expected a positive integer")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SKILLS.index(name)]))
    train: list[SkillExample] = []
    test: list[SkillExample] = []
    while len(train) < n_train or len(test) < n_test:
        ex = _draw(name, rng)
        side = test if is_test_prompt(ex.prompt) else train
        if len(side) < (n_test if side is test else n_train):
            side.append(ex)
    return train, test
