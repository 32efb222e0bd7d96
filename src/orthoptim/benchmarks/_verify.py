"""File checks for dataset loaders: clear errors, ``SOURCES.md`` parsing and sha256 verification.

A data folder may hold a ``SOURCES.md`` whose markdown tables list the shipped files as rows
``| file | bytes | sha256 | ... |``. Any row whose first cell is a file name and which has a cell of
64 hex digits is read as ``file -> (bytes, sha256)``; the ``bytes`` cell may contain thousands
separators (``9,719,438``) and is ignored when it is not a number. Files that the table does not
list are not verified.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "ChecksumError",
    "CorruptDataError",
    "parse_sources_md",
    "sha256_file",
    "verify_file",
    "require_file",
]

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

# (path, size, mtime_ns) -> sha256 hex; avoids re-hashing a file that did not change.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


class DataError(Exception):
    """Base class of every dataset-file error raised by :mod:`orthoptim.benchmarks`."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A dataset file is missing."""


class ChecksumError(DataError, ValueError):
    """A dataset file's size or sha256 differs from its ``SOURCES.md`` entry."""


class CorruptDataError(DataError, ValueError):
    """A dataset file exists but cannot be decoded (truncated gzip, bad header, bad zip...)."""


def require_file(path: str | os.PathLike, hint: str = "") -> Path:
    """Return ``path`` as a :class:`Path`, or raise :class:`DataFileNotFoundError` naming it.

    Args:
        path: the file that must exist.
        hint: how to obtain the file, appended to the message.
    """
    p = Path(path)
    if not p.is_file():
        msg = f"dataset file not found: {p}"
        if hint:
            msg += f". {hint}"
        raise DataFileNotFoundError(msg)
    return p


def parse_sources_md(path: str | os.PathLike) -> dict[str, tuple[int | None, str]]:
    """Parse the markdown tables of a ``SOURCES.md`` into ``{file name: (bytes, sha256)}``.

    Args:
        path: the ``SOURCES.md`` file.

    Returns:
        A dict from the first cell of each qualifying row (backticks stripped) to the byte size
        (``None`` if that cell is not an integer) and the lower-case sha256 hex digest.
    """
    table: dict[str, tuple[int | None, str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            continue
        cells = [c.strip().strip("`").strip() for c in line.strip("|").split("|")]
        if len(cells) < 3 or not cells[0]:
            continue
        sha = next((c.lower() for c in cells[1:] if _HEX64.match(c)), None)
        if sha is None:
            continue
        size_cell = cells[1].replace(",", "").replace("_", "")
        size = int(size_cell) if size_cell.isdigit() else None
        table[cells[0]] = (size, sha)
    return table


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the sha256 hex digest of a file, reading it in ``chunk_size`` byte chunks.

    Digests are memoised per (path, size, mtime), so re-loading an unchanged file is free.
    """
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    digest = h.hexdigest()
    _HASH_CACHE[key] = digest
    return digest


def verify_file(path: str | os.PathLike, sources: str | os.PathLike | None = None) -> bool:
    """Check ``path`` against its row in ``SOURCES.md``; raise :class:`ChecksumError` on mismatch.

    Args:
        path: the data file (must exist).
        sources: the ``SOURCES.md`` to use; default ``<folder of path>/SOURCES.md``.

    Returns:
        ``True`` if the file was listed and verified, ``False`` if there is no ``SOURCES.md`` or it
        does not list the file (nothing to check against).
    """
    p = require_file(path)
    src = Path(sources) if sources is not None else p.parent / "SOURCES.md"
    if not src.is_file():
        return False
    entry = parse_sources_md(src).get(p.name)
    if entry is None:
        return False
    size, expected = entry
    fix = (
        "The file is damaged or a different version: copy it again from the source named in "
        f"{src} (or pass verify=False to skip the check at your own risk)."
    )
    actual_size = p.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(
            f"size mismatch for {p}: {actual_size} bytes, {src} expects {size}. {fix}"
        )
    actual = sha256_file(p)
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {p}: got {actual}, {src} expects {expected}. {fix}"
        )
    return True
