"""Character corpora for the language-model tasks, and one character vocabulary across them.

Offline corpora that ship with every CPython install (no data directory, no download), three
distinct registers so that a continual sequence of them is a real distribution shift:

* ``"stdlib"``: Python source code, the concatenated sources of a few pure-Python standard-library
  modules (:data:`orthoptim.benchmarks.data.DEFAULT_STDLIB_MODULES`, as
  :func:`~orthoptim.benchmarks.data.load_stdlib_text`), about 190k characters;
* ``"pydoc"``: English technical prose, the help-topic texts of ``pydoc_data.topics`` (what
  ``help("if")`` prints; the Language Reference excerpts), joined in sorted topic order, about 465k
  characters;
* ``"unicode"``: the Unicode character names from ``unicodedata`` (``LATIN SMALL LETTER A``...), one
  per line, for the code points U+0020 to U+2FFF that have a name, about 290k characters. A third
  register (upper-case noun phrases with systematic structure), in every CPython.

All three depend on the Python version (sources, help texts and the Unicode database change between
releases), so their losses compare runs on one interpreter, not across machines. The real corpus is
``"tinyshakespeare"`` (``<data_dir>/tinyshakespeare/input.txt``, sha256-verified by
:func:`~orthoptim.benchmarks.data.load_tiny_shakespeare`).

Every corpus is split as nanoGPT does: the first 90% of its characters train, the last 10% are the
held-out part. :func:`shared_vocab` maps the corpora of one task onto a single vocabulary, the
sorted union of their characters, so one model (one embedding and one head) reads them all; a
character one corpus lacks simply never occurs in it.
"""

from __future__ import annotations

import functools
import os
import unicodedata

import numpy as np
import torch

from ._types import TextDataset
from .data import DEFAULT_STDLIB_MODULES, load_tiny_shakespeare, stdlib_source_text

__all__ = ["OFFLINE_CORPORA", "CORPORA", "load_corpus", "shared_vocab", "text_to_dataset"]

OFFLINE_CORPORA = ("stdlib", "pydoc", "unicode")
CORPORA = (*OFFLINE_CORPORA, "tinyshakespeare")
TRAIN_FRAC = 0.9


def text_to_dataset(text: str, name: str, train_frac: float = TRAIN_FRAC) -> TextDataset:
    """Character-level :class:`TextDataset` of ``text`` (sorted-set vocabulary, nanoGPT split).

    Args:
        text: the corpus.
        name: dataset name.
        train_frac: fraction of the characters (from the start) used for training, in (0, 1).
    """
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"Invalid train_frac: {train_frac!r}; must lie in (0, 1)")
    if len(text) < 2:
        raise ValueError(f"Invalid text for {name!r}: {len(text)} characters; need at least 2")
    # code points through NumPy: a Python loop over ~500k characters would cost ~0.1 s
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    uniq, inv = np.unique(codes, return_inverse=True)
    vocab = "".join(map(chr, uniq.tolist()))
    ids = torch.from_numpy(inv.astype(np.int64).reshape(-1))
    n = int(len(ids) * train_frac)
    return TextDataset(train=ids[:n], val=ids[n:], vocab=vocab, name=name)


def _stdlib_text() -> str:
    return stdlib_source_text(DEFAULT_STDLIB_MODULES)


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _unicode_text() -> str:
    names = (unicodedata.name(chr(c), "") for c in range(0x20, 0x3000))
    return "\n".join(n for n in names if n) + "\n"


_OFFLINE = {"stdlib": _stdlib_text, "pydoc": _pydoc_text, "unicode": _unicode_text}


@functools.cache
def _offline(name: str) -> TextDataset:
    # cached: the tiny/quick presets re-read the same corpora in every run
    return text_to_dataset(_OFFLINE[name](), name)


def load_corpus(name: str, data_dir: str | os.PathLike | None = None) -> TextDataset:
    """Load one corpus by name (its own vocabulary; see :func:`shared_vocab`).

    Args:
        name: one of :data:`CORPORA`.
        data_dir: root data folder; needed only for ``"tinyshakespeare"``.

    Returns:
        The :class:`TextDataset` (treat its tensors as read-only: offline corpora are cached).
    """
    if name in _OFFLINE:
        return _offline(name)
    if name == "tinyshakespeare":
        if data_dir is None:
            raise ValueError(
                "Invalid data_dir: None; corpus 'tinyshakespeare' is read from "
                "<data_dir>/tinyshakespeare/input.txt"
            )
        return load_tiny_shakespeare(data_dir, train_frac=TRAIN_FRAC)
    raise ValueError(f"Invalid corpus: {name!r}; expected one of {CORPORA}")


def shared_vocab(datasets: list[TextDataset], extra: str = "") -> tuple[str, list[TextDataset]]:
    """Re-encode ``datasets`` onto the sorted union of their vocabularies (and ``extra``).

    Args:
        datasets: character datasets, each with its own vocabulary.
        extra: characters the vocabulary must hold besides the datasets' own (text that is
            encoded later, e.g. the synthetic skills of ``lm-skills``).

    Returns:
        ``(vocab, remapped)``: the union vocabulary and the datasets with ids into it (same
        splits, same names).
    """
    if not datasets:
        raise ValueError("Invalid datasets: empty; need at least one corpus")
    vocab = "".join(sorted(set(extra).union(*(d.vocab for d in datasets))))
    stoi = {ch: i for i, ch in enumerate(vocab)}
    out = []
    for d in datasets:
        # a lookup table old id -> new id, applied to the whole id tensor at once
        remap = torch.tensor([stoi[ch] for ch in d.vocab], dtype=torch.int64)
        out.append(TextDataset(train=remap[d.train], val=remap[d.val], vocab=vocab, name=d.name))
    return vocab, out
