"""The package version, from one source: the ``version`` field of pyproject.toml.

An installed package reports its metadata (written from pyproject.toml at build time); a source
tree used in place (``setup.py build_ext --inplace`` on ``PYTHONPATH``) has no metadata for this
copy, so the version is read from the pyproject.toml beside the package."""
from __future__ import annotations

import os
import re

_PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")


def _from_pyproject(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if not project or not re.search(r'^name\s*=\s*"visualad"', project.group(1), re.M):
        return None  # not this project's file
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return found.group(1) if found else None


def package_version() -> str:
    """The version of this copy of visualad: its source tree's pyproject.toml when it sits in one,
    else the installed distribution's metadata."""
    version = _from_pyproject(_PYPROJECT)
    if version is not None:
        return version
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version("visualad")
    except PackageNotFoundError:  # pragma: no cover - neither installed nor in a source tree
        return "0+unknown"
