"""The installed wheel is typed the way users see it: mypy --strict and pyright (strict), for the
oldest and newest supported Pythons.

The wheel is built once and installed, with pytest (docs/testing.md's example imports it), into
a fresh venv per target Python (pyenv's interpreter of that version when there is one). Outside
the checkout, so nothing is found by accident, each checker then reads:

* ``tests/typing/user_program.py`` (correct uses of the sync and async surfaces; it uses
  ``assert_type``, so a result typed ``Any`` fails) and docs/testing.md's pytest example:
  no diagnostics at all;
* ``tests/typing/misuses.py``: every line tagged ``# expect-error: WORD`` has an error whose
  message contains WORD, and no other line has one.

The checkers are installed at test time into the pytest cache (``.pytest_cache/d/``): mypy
1.18 in a venv of its own (mypy 2 cannot target 3.9) and pyright with npm, on this machine's
node (never a downloaded one). A checker that cannot be installed at all skips its tests.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPING_DIR = os.path.join(ROOT, "tests", "typing")
CLEAN_FILES = ("user_program.py", "testing_md_example.py")
MISUSES = "misuses.py"
PYTHON_VERSIONS = ("3.9", "3.13")
CHECKERS = ("mypy", "pyright")
MYPY_REQUIREMENT = "mypy>=1.18,<1.19"  # the last mypy that targets --python-version 3.9
PYRIGHT_VERSION = "1.1.414"
TIMEOUT = 600
TAG = re.compile(r"#\s*expect-error(\(3\.10\+\))?:\s*(\S+)\s*$")


class Diagnostic(NamedTuple):
    file: str  # base name
    line: int
    severity: str  # "error", "warning", "information"
    message: str
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.severity}: {self.message} [{self.rule}]"


def run(cmd: Sequence[str], *, cwd: Optional[str] = None, timeout: float = TIMEOUT,
        env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False, env=env if env is not None else clean_env())


def clean_env() -> Dict[str, str]:
    """No PYTHONPATH, virtualenv or SPAPS settings of the developer leak into the checks."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("PYTHON", "VIRTUAL_ENV", "SPAPS_", "MYPY"))}


def venv_python(venv: str) -> str:
    return os.path.join(venv, "Scripts", "python.exe") if os.name == "nt" else os.path.join(
        venv, "bin", "python")


def make_venv(python: str, venv: str, *requirements: str) -> str:
    """A new venv of ``python`` with ``requirements`` pip-installed; returns its python."""
    done = run([python, "-m", "venv", "--clear", venv])
    assert done.returncode == 0, done.stdout + done.stderr
    target = venv_python(venv)
    done = run([target, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                *requirements])
    if done.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n"
                           f"{done.stdout}{done.stderr}")
    return target


def pyenv_python(minor: str) -> Optional[str]:
    """pyenv's newest ``minor`` interpreter, if pyenv has one."""
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    if shutil.which("pyenv"):
        done = run(["pyenv", "root"], timeout=30)
        if done.returncode == 0:
            roots.insert(0, done.stdout.strip())
    for root in filter(None, roots):
        found = [path for path in glob.glob(os.path.join(root, "versions", minor + ".*"))
                 if re.fullmatch(r"\d+\.\d+\.\d+", os.path.basename(path))
                 and os.access(os.path.join(path, "bin", "python"), os.X_OK)]
        if found:
            newest = max(found, key=lambda p: tuple(map(int, os.path.basename(p).split("."))))
            return os.path.join(newest, "bin", "python")
    return None


def cache_root(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        return Path(cache.mkdir("spaps-typing"))
    return tmp_path_factory.getbasetemp() / "spaps-typing-cache"


# -----------------------------------------------------------------------------
# the wheel, the users' environments, the checkers
# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("typing-wheel"))
    if _has_module("build"):
        cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", out, ROOT]
    else:  # pip makes the same wheel through hatchling
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", out, ROOT]
    done = run(cmd, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = glob.glob(os.path.join(out, "*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The user's files in a directory of their own: nothing of the checkout is importable."""
    base = str(tmp_path_factory.mktemp("typing-project"))
    for name in ("user_program.py", MISUSES):
        shutil.copy(os.path.join(TYPING_DIR, name), os.path.join(base, name))
    with open(os.path.join(base, "testing_md_example.py"), "w", encoding="utf-8") as handle:
        handle.write(docs_testing_example())
    return base


def docs_testing_example() -> str:
    """docs/testing.md's pytest block (test_packaging.py runs it under pytest)."""
    with open(os.path.join(ROOT, "docs", "testing.md"), encoding="utf-8") as handle:
        blocks = re.findall(r"^```python\n(.*?)^```", handle.read(), re.MULTILINE | re.DOTALL)
    examples = [block for block in blocks if "@pytest.fixture" in block]
    assert len(examples) == 1, "docs/testing.md should have exactly one pytest fixture block"
    return str(examples[0])


@pytest.fixture(scope="module")
def user_env(wheel: str, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """``{"3.X": python}``: venvs with the wheel and pytest, as a user's project has them."""
    envs: Dict[str, str] = {}
    base = str(tmp_path_factory.mktemp("typing-venvs"))
    for minor in PYTHON_VERSIONS:
        interpreter = pyenv_python(minor)
        # typing_extensions: the user program's own import (assert_type is 3.11+ in typing).
        requirements = [wheel, "pytest", "typing_extensions"]
        if interpreter is None:
            # This interpreter for a --python-version it is not: keep pytest to what 3.9 parses.
            interpreter, requirements = sys.executable, [wheel, "pytest<9", "typing_extensions"]
        envs[minor] = make_venv(interpreter, os.path.join(base, minor), *requirements)
    return envs


@pytest.fixture(scope="module")
def mypy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """mypy 1.18's python, in a venv cached under the pytest cache.

    It runs on the newest target Python: mypy parses the target's site-packages (pytest 9
    there uses syntax an older interpreter cannot read).
    """
    interpreter = pyenv_python(PYTHON_VERSIONS[-1]) or sys.executable
    tag = run([interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
              ).stdout.strip()
    venv = str(cache_root(request, tmp_path_factory) / f"mypy-1.18-venv-{tag}")
    python = venv_python(venv)
    marker = os.path.join(venv, ".complete")
    if os.path.exists(marker) and run([python, "-m", "mypy", "--version"]).returncode == 0:
        return python
    try:
        make_venv(interpreter, venv, MYPY_REQUIREMENT)
    except (RuntimeError, AssertionError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"mypy cannot be installed here ({MYPY_REQUIREMENT}): {exc}")
    open(marker, "w").close()
    return python


@pytest.fixture(scope="module")
def pyright(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """pyright's entry script, npm-installed under the pytest cache; runs on this node."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("pyright cannot be installed: it needs node and npm on PATH")
    prefix = str(cache_root(request, tmp_path_factory) / f"pyright-{PYRIGHT_VERSION}")
    script = os.path.join(prefix, "node_modules", "pyright", "index.js")
    marker = os.path.join(prefix, ".complete")
    if not os.path.exists(marker):
        done = run([npm, "install", "--prefix", prefix, "--no-audit", "--no-fund",
                    "--no-save", "--loglevel=error", f"pyright@{PYRIGHT_VERSION}"])
        if done.returncode != 0 or not os.path.exists(script):
            pytest.skip(f"pyright cannot be installed with npm: {done.stdout}{done.stderr}")
        open(marker, "w").close()
    done = run([node, script, "--version"])
    assert done.returncode == 0 and PYRIGHT_VERSION in done.stdout, done.stdout + done.stderr
    return script


# -----------------------------------------------------------------------------
# running a checker
# -----------------------------------------------------------------------------

FILES = (*CLEAN_FILES, MISUSES)
_RESULTS: Dict[Tuple[str, str], List[Diagnostic]] = {}


def run_mypy(mypy_python: str, target: str, minor: str, project: str) -> List[Diagnostic]:
    done = run([mypy_python, "-m", "mypy", "--strict", "--python-version", minor,
                "--python-executable", target, "--no-error-summary", "--no-pretty",
                "--show-error-codes", "--no-color-output",
                "--cache-dir", os.path.join(project, f".mypy-cache-{minor}"), *FILES],
               cwd=project)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    found: List[Diagnostic] = []
    for line in done.stdout.splitlines():
        match = re.fullmatch(r"(.+?):(\d+): (error|warning|note): (.*?)(?:  \[([\w-]+)\])?",
                             line)
        assert match, f"unexpected mypy output: {line!r}\n{done.stdout}{done.stderr}"
        file, number, severity, message, rule = match.groups()
        if severity != "note":
            found.append(Diagnostic(os.path.basename(file), int(number), severity, message,
                                    rule or ""))
    assert done.returncode == (1 if found else 0), done.stdout + done.stderr
    return found


def run_pyright(script: str, target: str, minor: str, project: str) -> List[Diagnostic]:
    config = os.path.join(project, f"pyrightconfig-{minor}.json")
    with open(config, "w", encoding="utf-8") as handle:
        json.dump({"typeCheckingMode": "strict", "pythonVersion": minor}, handle)
    node = shutil.which("node")
    assert node is not None
    done = run([node, script, "--outputjson", "--project", config, "--pythonpath", target,
                "--pythonversion", minor, *FILES], cwd=project)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = json.loads(done.stdout)
    found = [Diagnostic(os.path.basename(item["file"]), item["range"]["start"]["line"] + 1,
                        item["severity"], item["message"], item.get("rule", ""))
             for item in report["generalDiagnostics"]]
    assert report["summary"]["filesAnalyzed"] == len(FILES), report["summary"]
    return found


@pytest.fixture(params=[(checker, minor) for checker in CHECKERS for minor in PYTHON_VERSIONS],
                ids=lambda param: f"{param[0]}-py{param[1]}")
def diagnostics(request: pytest.FixtureRequest, user_env: Dict[str, str],
                project: str) -> List[Diagnostic]:
    """What one checker says about the three files, for one target Python (run once)."""
    checker, minor = request.param
    key = (checker, minor)
    if key not in _RESULTS:
        tool = request.getfixturevalue(checker)
        runner = run_mypy if checker == "mypy" else run_pyright
        _RESULTS[key] = runner(tool, user_env[minor], minor, project)
    return _RESULTS[key]


def expected_errors(minor: str) -> Dict[int, str]:
    """``{line: word}`` for the ``# expect-error: WORD`` lines of misuses.py that a checker
    targeting Python ``minor`` must flag (``(3.10+)`` ones only from 3.10 on)."""
    with open(os.path.join(TYPING_DIR, MISUSES), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    modern = tuple(map(int, minor.split("."))) >= (3, 10)
    tags = {number: match.group(2) for number, text in enumerate(lines, 1)
            for match in [TAG.search(text)] if match and (modern or not match.group(1))}
    assert len(tags) >= 20, tags
    return tags


# -----------------------------------------------------------------------------
# the checks
# -----------------------------------------------------------------------------


def test_correct_programs_have_no_diagnostics(diagnostics: List[Diagnostic]) -> None:
    """user_program.py and docs/testing.md's example: not an error, not a warning."""
    found = [item for item in diagnostics
             if item.file in CLEAN_FILES and item.severity != "information"]
    assert not found, "\n".join(map(str, found))


def test_every_misuse_is_flagged_and_nothing_else(request: pytest.FixtureRequest,
                                                  diagnostics: List[Diagnostic]) -> None:
    expected = expected_errors(request.node.callspec.params["diagnostics"][1])
    errors = [item for item in diagnostics if item.file == MISUSES and item.severity == "error"]
    missed = [f"misuses.py:{line}: no error mentioning {word!r}; got "
              f"{[item.message for item in errors if item.line == line]}"
              for line, word in sorted(expected.items())
              if not any(item.line == line and word.lower() in item.message.lower()
                         for item in errors)]
    stray = [str(item) for item in diagnostics
             if item.file == MISUSES and item.line not in expected]
    assert not missed and not stray, "\n".join(
        ["missed misuses (a type hole?):", *missed, "diagnostics on untagged lines:", *stray])


def test_user_program_runs_against_the_installed_emulator(user_env: Dict[str, str],
                                                          project: str) -> None:
    """The correct program is correct at run time too, on each target Python."""
    for minor, python in user_env.items():
        done = run([python, "user_program.py"], cwd=project, timeout=120)
        assert done.returncode == 0, (minor, done.stdout, done.stderr)
        assert done.stdout.startswith("user program ok "), (minor, done.stdout)
        where = run([python, "-c", "import spaps_client, spaps_mock; "
                     "print(spaps_client.__file__); print(spaps_mock.__file__)"], cwd=project)
        client_file, mock_file = where.stdout.split()
        assert client_file.endswith(os.path.join("spaps_client", "__init__.py")), where.stdout
        assert mock_file.endswith(os.path.join("spaps_mock", "__init__.py")), where.stdout
        assert os.path.exists(os.path.join(os.path.dirname(mock_file), "py.typed"))
