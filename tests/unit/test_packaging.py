"""setup.py's requirements: a dependency whose private APIs mrlhf uses is bounded above on every Python."""

from __future__ import annotations

import ast
import os

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# used through private modules (mrlhf/convert, mrlhf/parallel/compat.py): a new minor release can break them
PRIVATE_API_DEPS = ("megatron-core",)


def install_requires() -> list[str]:
    """The literal install_requires list of setup.py, read without running it (running it builds the extension)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no install_requires")


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
@pytest.mark.parametrize("dep", PRIVATE_API_DEPS)
def test_private_api_dependencies_are_bounded_on_every_python(dep: str, python: str) -> None:
    env = {"python_version": python, "python_full_version": python + ".0"}
    reqs = [Requirement(r) for r in install_requires()]
    active = [r for r in reqs if r.name == dep and (r.marker is None or r.marker.evaluate(env))]
    assert active, f"{dep} is not required on Python {python}"
    for r in active:
        uppers = [s for s in r.specifier if s.operator in ("<", "<=", "==", "~=")]
        assert uppers, f"{r} leaves {dep} unbounded on Python {python}"
