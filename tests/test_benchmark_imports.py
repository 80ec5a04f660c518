"""The benchmarks are run by hand, not by `make test`, so nothing else notices when one of them imports a name the
package no longer has (benchmarks/vs_llamacpp.py did: a removed constant of starqa.model.resolve). Every
`from starqa... import name` in every benchmark script, at the top or inside a function, must resolve."""

from __future__ import annotations

import ast
import importlib

import pytest

from conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def _starqa_imports(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "starqa" and not node.level:
            for alias in node.names:
                yield node.module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "starqa":
                    yield alias.name, None, node.lineno


def test_there_are_benchmarks_to_check():
    assert len(SCRIPTS) >= 5
    assert any(list(_starqa_imports(path)) for path in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_starqa_name_a_benchmark_imports_exists(script):
    missing = []
    for module_name, name, line in _starqa_imports(script):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing.append(f"line {line}: {module_name} ({exc})")
            continue
        if name is not None and name != "*" and not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")  # a submodule
            except ImportError:
                missing.append(f"line {line}: {module_name}.{name}")
    assert not missing, f"{script.name} imports names starqa does not have: {missing}"
