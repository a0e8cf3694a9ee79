"""The client and the emulator import nothing but the standard library."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("spaps_client.py", "spaps_mock.py")

needs_stdlib_names = pytest.mark.skipif(
    not hasattr(sys, "stdlib_module_names"), reason="sys.stdlib_module_names needs Python 3.10+"
)


def imported_modules(filename: str) -> List[str]:
    """Top-level names of every module imported anywhere in ``filename`` (lazy imports too)."""
    with open(os.path.join(ROOT, filename), encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=filename)
    names: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{filename}: relative import of {node.module!r}"
            assert node.module is not None
            names.append(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.append("__import__")  # dynamic imports are not allowed either
    return names


@needs_stdlib_names
@pytest.mark.parametrize("filename", MODULES)
def test_imports_only_the_standard_library(filename: str) -> None:
    names = imported_modules(filename)
    assert names, "the AST walk found no imports at all"
    outside: Set[str] = {name for name in names if name not in sys.stdlib_module_names}
    assert outside == set(), f"{filename} imports non-stdlib modules: {sorted(outside)}"


def test_client_never_imports_the_emulator() -> None:
    assert "spaps_mock" not in imported_modules("spaps_client.py")


def test_the_check_itself_sees_lazy_imports() -> None:
    # spaps_client imports urllib/ssl/socket lazily inside functions; the walk must see them.
    names = set(imported_modules("spaps_client.py"))
    assert {"json", "threading", "urllib", "socket", "ssl"} <= names


ISOLATED_IMPORT = """
import sys
sys.path.insert(0, ".")
before = set(sys.modules)
import spaps_client
loaded = sorted(set(sys.modules) - before)
stdlib = getattr(sys, "stdlib_module_names", None)
outside = [m for m in loaded if m.split(".")[0] != "spaps_client"
           and stdlib is not None and m.split(".")[0] not in stdlib]
assert "spaps_mock" not in sys.modules, "importing the client pulled in the emulator"
assert not outside, outside
print(spaps_client.__version__)
"""


@pytest.mark.parametrize("module", ["spaps_client", "spaps_mock"])
def test_import_in_an_isolated_interpreter_without_site(module: str) -> None:
    # -I: no environment, no user site; -S: no site-packages at all. Only the stdlib is left.
    code = ISOLATED_IMPORT if module == "spaps_client" else (
        "import sys\nsys.path.insert(0, '.')\nimport spaps_mock\nprint(spaps_mock.MockServer)\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    if module == "spaps_client":
        import spaps_client

        assert done.stdout.strip() == spaps_client.__version__
