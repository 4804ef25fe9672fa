"""A plain `pytest` from the repository root collects every test folder in one process.

The test folders have no ``__init__.py`` and pytest imports in "prepend" mode (each test file's folder goes on
sys.path and the file is imported by its basename; helpers such as ``harness`` are imported the same way), so two
modules with one basename in different folders stop collection with "import file mismatch".
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")


def test_module_basenames_are_unique_across_test_folders() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for folder, dirs, files in os.walk(TESTS):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py") and f != "conftest.py":  # pytest registers conftests by path
                where[f].append(os.path.relpath(os.path.join(folder, f), ROOT))
    clashes = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"


def test_root_pytest_config_covers_every_test_folder() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        opts = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert opts["testpaths"] == ["tests"]
    assert "importlib" not in opts.get("addopts", "")  # the tests import their helpers by basename
