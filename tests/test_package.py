"""Packaging: one version (the code's, the installed metadata's, the changelog's), py.typed."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
from pathlib import Path

import pytest

import orthoptim

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_ships_with_the_package():
    assert (importlib.resources.files("orthoptim") / "py.typed").is_file()


def test_installed_metadata_has_the_code_version():
    try:
        installed = importlib.metadata.version("orthoptim")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("orthoptim is not installed (imported from a source path)")
    assert installed == orthoptim.__version__


def test_changelog_top_release_is_the_code_version():
    changelog = ROOT / "CHANGELOG.md"
    if not changelog.is_file():
        pytest.skip("no CHANGELOG.md beside the tests")
    releases = re.findall(r"^## \[([^\]]+)\]", changelog.read_text(encoding="utf-8"), re.M)
    assert releases and releases[0] == orthoptim.__version__
