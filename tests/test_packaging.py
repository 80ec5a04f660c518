"""Packaging: building starqa's metadata (the first step of `make install` and of `pip wheel`) says nothing a user
should act on: no deprecation warnings from the build backend."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_building_the_metadata_prints_no_deprecation_warning(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    needed = int(re.search(r'requires = \["setuptools>=(\d+)', pyproject).group(1))
    if int(setuptools.__version__.split(".")[0]) < needed:
        pytest.skip(f"setuptools {setuptools.__version__} here; the build uses >= {needed}")
    # A copy, so the build's egg-info lands in a temporary folder rather than in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "starqa", source / "starqa", ignore=shutil.ignore_patterns("__pycache__"))
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-W", "default", "-c", build, str(tmp_path)], cwd=source,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "deprecat" not in output.lower(), output
    metadata = (tmp_path / result.stdout.strip().splitlines()[-1] / "METADATA").read_text(encoding="utf-8")
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
