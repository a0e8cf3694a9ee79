"""The three ways users take the client, proven end to end: vendored file, typed wheel, Lambda
layer; plus the operator command line, the module header and the changelog.

Everything here runs real interpreters in subprocesses against ``spaps_mock`` over loopback.
The slow tests (several interpreters, a fresh venv, the layer) are marked ``slow`` but run in
the default suite; ``pytest -m "not slow"`` leaves them out while iterating.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest
from conftest import DEMO_EMAIL, DEMO_PASSWORD

import spaps_client
from spaps_client import FileTokenStorage, SpapsClient
from spaps_mock import MockServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "spaps_client.py")
VERSION = spaps_client.__version__
SUPPORTED = ("3.9", "3.10", "3.11", "3.12", "3.13")
TIMEOUT = 120  # seconds for any one subprocess
PRICE_ID = "price_basic_monthly"  # seeded in every emulator the user programs check out from
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # SPAPS ids


# -----------------------------------------------------------------------------
# helpers
# -----------------------------------------------------------------------------


def run(cmd: Sequence[str], *, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )


def clean_env(**extra: str) -> Dict[str, str]:
    """The environment minus anything that could leak the developer's Python or SPAPS setup."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SPAPS_", "PYTHON", "VIRTUAL_ENV"))
           and not key.lower().endswith("_proxy")}
    env.update(extra)
    return env


@functools.cache
def pyenv_pythons() -> Dict[str, str]:
    """``{"3.X": interpreter}`` for each supported version pyenv has (newest patch wins)."""
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    if shutil.which("pyenv"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            roots.insert(0, run(["pyenv", "root"], timeout=30).stdout.strip())
    found: Dict[str, str] = {}
    for root in filter(None, roots):
        for minor in SUPPORTED:
            versions = [os.path.basename(path) for path in
                        glob.glob(os.path.join(root, "versions", minor + ".*"))]
            releases = [v for v in versions if re.fullmatch(r"\d+\.\d+\.\d+", v)]
            newest = max(releases, key=lambda v: tuple(map(int, v.split("."))), default=None)
            python = os.path.join(root, "versions", newest or "-", "bin", "python")
            if minor not in found and newest and os.access(python, os.X_OK):
                found[minor] = python
    return found


@contextlib.contextmanager
def mock_process(python: str = sys.executable, *, cwd: str = ROOT,
                 env: Optional[Dict[str, str]] = None) -> Iterator[str]:
    """``python -m spaps_mock --port 0`` in its own process, with ``PRICE_ID`` seeded; yields
    the URL it prints."""
    process = subprocess.Popen(
        [python, "-m", "spaps_mock", "--port", "0"], cwd=cwd, env=env or clean_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first: List[str] = []
        stdout = process.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: first.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        line = first[0] if first else ""
        match = re.fullmatch(r"spaps_mock listening on (http://\S+)\n", line)
        if match is None:
            process.kill()
            raise AssertionError(f"spaps_mock did not start: {line!r} "
                                 f"{process.stderr.read() if process.stderr else ''}")
        url = match.group(1)
        seed_price(url)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def seed_price(url: str, price_id: str = PRICE_ID) -> None:
    """Seed a Stripe price through the control route (SPAPS sells only prices it manages)."""
    request = urllib.request.Request(
        url + "/__mock__/prices", data=json.dumps({"price_id": price_id}).encode(),
        method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status in (200, 201)


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    """One out-of-process emulator shared by the tests of this module that only sign in."""
    with mock_process() as url:
        yield url


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (the port was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -----------------------------------------------------------------------------
# vendored copy: one file, any supported Python, isolated, no site-packages
# -----------------------------------------------------------------------------

VENDORED_SCRIPT = '''\
import asyncio
import os
import sys

# "python -I" never puts the script's directory on sys.path: add the vendor directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spaps_client
from spaps_client import AsyncSpapsClient, SpapsClient

url = sys.argv[1]
with SpapsClient(base_url=url, api_key="vendored-key") as spaps:
    pair = spaps.auth.sign_in_with_password(email="demo@example.com", password="demo-password")
    session = spaps.sessions.get_current_session()
    checkout = spaps.payments.create_checkout_session(
        price_id="price_basic_monthly",
        mode="subscription",
        success_url="https://example.com/success",
        cancel_url="https://example.com/cancel",
    )


async def async_flow():
    async with AsyncSpapsClient(base_url=url, api_key="vendored-key") as aspaps:
        await aspaps.auth.sign_in_with_password(email="demo@example.com",
                                                password="demo-password")
        return (await aspaps.sessions.get_current_session()).user_id


async_user = asyncio.run(async_flow())
print("python", "%d.%d" % sys.version_info[:2])
print("flags", sys.flags.isolated, sys.flags.no_site, "site" in sys.modules)
print("module", spaps_client.__file__)
print("version", spaps_client.__version__)
print("user", pair.user.email)
print("session", session.session_id, session.user_id == pair.user.user_id)
print("checkout", checkout.session_id, checkout.checkout_url)
print("async", async_user == pair.user.user_id)
'''


def check_vendored_output(out: str, module: str, minor: str) -> None:
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["python"] == minor
    assert lines["flags"] == "1 1 False"  # isolated, no site, and site never imported
    assert lines["module"] == module
    assert lines["version"] == VERSION
    assert lines["user"] == DEMO_EMAIL
    assert re.fullmatch(UUID + r" True", lines["session"])
    assert re.fullmatch(r"cs_\S+ https://\S+", lines["checkout"])
    assert lines["async"] == "True"


@pytest.mark.slow
@pytest.mark.parametrize("minor", SUPPORTED)
def test_vendored_file_runs_isolated_without_site(minor: str, mock_url: str,
                                                  tmp_path: Path) -> None:
    """Only spaps_client.py in an empty dir, ``python -I -S``, sign-in -> session -> checkout."""
    python = pyenv_pythons().get(minor)
    if python is None:
        pytest.skip(f"pyenv has no Python {minor}")
    vendor = str(tmp_path)
    assert os.listdir(vendor) == []
    shutil.copy(SOURCE, os.path.join(vendor, "spaps_client.py"))
    script = os.path.join(vendor, "script.py")
    with open(script, "w", encoding="utf-8") as handle:
        handle.write(VENDORED_SCRIPT)

    done = run([python, "-I", "-S", script, mock_url], cwd=vendor)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    check_vendored_output(done.stdout, os.path.join(vendor, "spaps_client.py"), minor)


@pytest.mark.slow
def test_vendored_inside_a_package(mock_url: str, tmp_path: Path) -> None:
    """The layout docs/vendoring.md recommends: ``myapp/_vendor/spaps_client.py``."""
    app = os.path.join(str(tmp_path), "myapp")
    os.makedirs(os.path.join(app, "_vendor"))
    for package in (app, os.path.join(app, "_vendor")):
        open(os.path.join(package, "__init__.py"), "w").close()
    shutil.copy(SOURCE, os.path.join(app, "_vendor", "spaps_client.py"))
    code = (
        "import sys\n"
        "from myapp._vendor import spaps_client\n"
        "from myapp._vendor.spaps_client import SpapsClient\n"
        "with SpapsClient(base_url=sys.argv[1], api_key='k') as spaps:\n"
        "    spaps.auth.sign_in_with_password(email='demo@example.com', password='demo-password')\n"
        "    print(spaps_client.__name__, spaps.sessions.get_current_session().tier)\n"
    )
    # -E -s -S: -I without -P, so the current directory (the app's root) is importable.
    done = run([sys.executable, "-E", "-s", "-S", "-c", code, mock_url], cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "myapp._vendor.spaps_client basic\n"


def test_module_header_describes_the_file() -> None:
    """A vendored copy is self-describing: what it is, version, licence, where the docs are."""
    with open(SOURCE, encoding="utf-8") as handle:
        header = "".join(handle.readline() for _ in range(30))
    assert header.startswith('"""spaps_client')
    assert "client for SPAPS" in header.splitlines()[0]
    assert "Sweet Potato Authentication & Payment Service" in header
    assert "standard library" in header
    assert re.search(rf"Version:\s*{re.escape(VERSION)}\b", header), \
        f"the header must state the version ({VERSION}) itself"
    assert re.search(r"Licen[cs]e:\s*MIT\b", header)
    assert re.search(r"Documentation:.*docs/", header, re.DOTALL)
    assert "docs/api.md" in header or "https://" in header
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as handle:
        assert handle.readline().strip() == "MIT License"


# -----------------------------------------------------------------------------
# typed wheel (and sdist)
# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """``python -m build`` (sdist, then the wheel from the sdist) into a temp dir."""
    out = str(tmp_path_factory.mktemp("dist"))
    if importlib.util.find_spec("build") is not None:
        done = run([sys.executable, "-m", "build", "--outdir", out, ROOT], cwd=ROOT,
                   timeout=300)
    else:  # e.g. a tox env without `build`: pip makes the same wheel through hatchling
        done = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", out, ROOT],
                   cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    found = {"wheel": glob.glob(os.path.join(out, "spaps_stdlib-*.whl")),
             "sdist": glob.glob(os.path.join(out, "spaps_stdlib-*.tar.gz"))}
    assert len(found["wheel"]) == 1, found
    return {kind: paths[0] for kind, paths in found.items() if paths}


@pytest.mark.slow
def test_wheel_contents(dists: Dict[str, str]) -> None:
    """The wheel installs the one source file as a typed package, and spaps_mock as another
    (``python -m spaps_mock`` through its ``__main__``)."""
    wheel = dists["wheel"]
    assert os.path.basename(wheel) == f"spaps_stdlib-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        with open(SOURCE, "rb") as handle:
            assert archive.read("spaps_client/__init__.py") == handle.read()
        with open(os.path.join(ROOT, "spaps_mock.py"), "rb") as handle:
            assert archive.read("spaps_mock/__init__.py") == handle.read()
        assert archive.read("spaps_mock/py.typed") == b""
        metadata = archive.read(f"spaps_stdlib-{VERSION}.dist-info/METADATA").decode()
    assert {"spaps_client/__init__.py", "spaps_client/__main__.py", "spaps_client/py.typed",
            "spaps_mock/__init__.py", "spaps_mock/__main__.py", "spaps_mock/py.typed"} <= names
    assert "spaps_mock.py" not in names  # the module and the package would shadow each other
    assert not [name for name in names if name.startswith(("tests/", "docs/", "scripts/"))]
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nRequires-Python: >=3.9\n" in metadata
    assert "Requires-Dist" not in metadata.split("Provides-Extra")[0]
    assert "Classifier: Typing :: Typed" in metadata


@pytest.mark.slow
def test_sdist_contents(dists: Dict[str, str]) -> None:
    if "sdist" not in dists:
        pytest.skip("`build` is not installed here (the wheel came from pip wheel)")
    import tarfile

    with tarfile.open(dists["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in ("spaps_client.py", "spaps_mock.py", "packaging/__main__.py",
                   "packaging/py.typed", "packaging/spaps_mock/__main__.py",
                   "packaging/spaps_mock/py.typed", "scripts/build_layer.py", "docs/lambda.md",
                   "CHANGELOG.md", "RELEASE_CHECKLIST.md", "LICENSE", "README.md"):
        assert needed in names, needed


@pytest.mark.slow
def test_dists_pass_twine_check_strict(dists: Dict[str, str]) -> None:
    if importlib.util.find_spec("twine") is None:
        pytest.skip("twine is not installed here (tox -e build runs twine check)")
    done = run([sys.executable, "-m", "twine", "check", "--strict", *dists.values()])
    assert done.returncode == 0, done.stdout + done.stderr


GOOD_PROGRAM = '''\
"""A user's program: precise types from the installed spaps package."""

from __future__ import annotations

import asyncio
import sys

import spaps_client
from spaps_client import (
    AsyncSpapsClient,
    CheckoutSession,
    FileTokenStorage,
    SessionListResult,
    SessionSummary,
    SpapsClient,
    SpapsError,
    TokenPair,
    UserProfile,
)


def sync_flow(url: str) -> str:
    with SpapsClient(base_url=url, api_key="typed-key") as client:
        pair: TokenPair = client.auth.sign_in_with_password(
            email="demo@example.com", password="demo-password"
        )
        session: SessionSummary = client.sessions.get_current_session()
        checkout: CheckoutSession = client.payments.create_checkout_session(
            price_id="price_basic_monthly",
            mode="subscription",
            success_url="https://example.com/success",
            cancel_url="https://example.com/cancel",
        )
        health = client.metrics.health()  # SPAPS envelopes it: {"success", "data": {...}}
        data = health.get("data")
        status: str = str(data.get("status")) if isinstance(data, dict) else "?"
        # TokenPair.user is Optional (a refresh reply names no user); login names one.
        email: str | None = pair.user.email if pair.user is not None else None
        return f"{email} {session.session_id} {checkout.checkout_url} {status}"


async def async_flow(url: str) -> int:
    async with AsyncSpapsClient(base_url=url, api_key="typed-key") as client:
        await client.auth.sign_in_with_password(email="demo@example.com",
                                                password="demo-password")
        me: UserProfile = await client.auth.get_current_user()
        session: SessionSummary = await client.sessions.get_current_session()
        listing: SessionListResult = await client.sessions.list_sessions(limit=5)
        assert me.id == session.user_id
        return listing.total


def main() -> int:
    storage = FileTokenStorage(path="tokens.json")
    version: str = spaps_client.__version__
    try:
        print(sync_flow(sys.argv[1]))
        print(asyncio.run(async_flow(sys.argv[1])), version, storage.path.endswith("json"))
    except SpapsError as exc:
        code: int | None = exc.status_code
        print("failed", code)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''

BAD_PROGRAM = '''\
"""Deliberate type errors: mypy must reject each, which it can only if the types are real."""

from __future__ import annotations

from spaps_client import AsyncSpapsClient, SpapsClient


def sync_mistakes(client: SpapsClient) -> None:
    session_id: int = client.sessions.get_current_session().session_id
    client.auth.sign_in_with_password(mail="demo@example.com", password="x")
    reveal_type(client.payments.create_checkout_session)


async def async_mistakes(client: AsyncSpapsClient) -> None:
    total: str = (await client.sessions.list_sessions()).total
'''


@pytest.mark.slow
def test_wheel_in_fresh_venv_is_typed_and_runs(dists: Dict[str, str],
                                               tmp_path: Path) -> None:
    """pip install the wheel + mypy into a new venv; mypy --strict sees real types."""
    base = str(tmp_path)
    venv = os.path.join(base, "venv")
    done = run([sys.executable, "-m", "venv", venv], timeout=300)
    assert done.returncode == 0, done.stderr
    python = os.path.join(venv, "bin", "python")
    env = clean_env()
    done = run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                dists["wheel"], "mypy"], env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    project = os.path.join(base, "project")  # not the checkout: nothing importable by accident
    os.makedirs(project)
    for name, text in (("good.py", GOOD_PROGRAM), ("bad.py", BAD_PROGRAM)):
        with open(os.path.join(project, name), "w", encoding="utf-8") as handle:
            handle.write(text)

    where = run([python, "-c", "import spaps_client, spaps_mock; "
                 "print(spaps_client.__file__); print(spaps_mock.__file__)"],
                cwd=project, env=env)
    assert where.returncode == 0, where.stderr
    site = os.path.join(venv, "lib")
    assert all(path.startswith(site) for path in where.stdout.split()), where.stdout
    assert where.stdout.split()[0].endswith(os.path.join("spaps_client", "__init__.py"))
    assert where.stdout.split()[1].endswith(os.path.join("spaps_mock", "__init__.py"))

    mypy = [python, "-m", "mypy", "--strict", "--no-error-summary",
            "--cache-dir", os.path.join(base, "mypy-cache")]
    good = run([*mypy, "good.py"], cwd=project, env=env, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout == ""

    bad = run([*mypy, "bad.py"], cwd=project, env=env, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = bad.stdout
    assert re.search(r'bad\.py:9: error: Incompatible types in assignment \(expression has type '
                     r'"str", variable has type "int"\)', out), out
    assert re.search(r'bad\.py:10: error: Unexpected keyword argument "mail"', out), out
    assert re.search(r'bad\.py:11: note: Revealed type is "def \(\*, price_id: (builtins\.)?str, '
                     r'.*\) -> spaps_client\.CheckoutSession"', out), out
    # bad.py:15 misuses an async result: typed on every Python (its parameters from 3.10 on).
    assert re.search(r'bad\.py:15: error: Incompatible types in assignment \(expression has '
                     r'type "int", variable has type "str"\)', out), out
    assert "py.typed" not in out and "missing library stubs" not in out

    # The installed package runs: its CLI, its emulator, and the user's program against it.
    version = run([python, "-m", "spaps_client", "version"], cwd=project, env=env)
    assert (version.returncode, version.stdout) == (0, f"spaps_client {VERSION}\n")
    helped = run([python, "-m", "spaps_mock", "--help"], cwd=project, env=env)
    assert helped.returncode == 0 and "--port" in helped.stdout, helped.stderr
    with mock_process(python, cwd=project, env=env) as url:
        program = run([python, "good.py", url], cwd=project, env=env)
    assert program.returncode == 0, program.stderr
    first, second = program.stdout.splitlines()
    assert re.fullmatch(rf"{re.escape(DEMO_EMAIL)} {UUID} https://\S+ ok", first)
    assert re.fullmatch(rf"\d+ {re.escape(VERSION)} True", second)


# -----------------------------------------------------------------------------
# AWS Lambda layer
# -----------------------------------------------------------------------------


def build_layer(outdir: str, *extra: str) -> tuple[str, str]:
    """Run scripts/build_layer.py; return (zip path, sha256 it printed)."""
    done = run([sys.executable, os.path.join(ROOT, "scripts", "build_layer.py"),
                "--outdir", outdir, *extra], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"([0-9a-f]{64})  (\S+\.zip)\n", done.stdout)
    assert match, done.stdout
    path = match.group(2)
    if not os.path.isabs(path):
        path = os.path.join(ROOT, path)
    return path, match.group(1)


LAYER_PROGRAM = '''\
import sys
import spaps_client
from spaps_client import SpapsClient

print(spaps_client.__file__)
print("site" in sys.modules)
with SpapsClient(base_url=sys.argv[1], api_key="layer-key") as spaps:
    print(spaps.metrics.health()["data"]["status"])
    pair = spaps.auth.sign_in_with_password(email="demo@example.com", password="demo-password")
    print(pair.user.email)
'''


@pytest.mark.slow
def test_layer_zip_unpacks_and_imports(server: MockServer,
                                       tmp_path: Path) -> None:
    base = str(tmp_path)
    path, digest = build_layer(os.path.join(base, "dist"))
    assert os.path.basename(path) == f"spaps-lambda-layer-{VERSION}.zip"
    with open(path, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == digest
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == sorted(
            ["python/spaps_client.py", "python/LICENSE.spaps"]
            + [f"python/__pycache__/spaps_client.cpython-3{minor}.pyc" for minor in range(9, 14)]
        )
        with open(os.path.join(ROOT, "LICENSE"), "rb") as handle:
            assert archive.read("python/LICENSE.spaps") == handle.read()
        info = archive.getinfo("python/spaps_client.py")
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.external_attr >> 16 == 0o100644
        with open(SOURCE, "rb") as handle:
            assert archive.read(info) == handle.read()
        unpacked = os.path.join(base, "opt")
        archive.extractall(unpacked)

    layer_python = os.path.join(unpacked, "python")
    env = clean_env(PYTHONPATH=layer_python)
    done = run([sys.executable, "-S", "-c", LAYER_PROGRAM, server.url], cwd=base, env=env)
    assert done.returncode == 0, done.stderr
    module, has_site, health, email = done.stdout.splitlines()
    assert module == os.path.join(layer_python, "spaps_client.py")
    assert (has_site, health, email) == ("False", "ok", DEMO_EMAIL)


@pytest.mark.slow
def test_layer_build_is_reproducible(tmp_path: Path) -> None:
    first, digest_1 = build_layer(os.path.join(str(tmp_path), "one"))
    second, digest_2 = build_layer(os.path.join(str(tmp_path), "two"))
    assert digest_1 == digest_2
    with open(first, "rb") as one, open(second, "rb") as two:
        assert one.read() == two.read()


@pytest.mark.slow
def test_layer_with_precompiled_bytecode(server: MockServer,
                                         tmp_path: Path) -> None:
    """``--compile-with`` ships a reproducible unchecked-hash .pyc that the runtime really uses."""
    base = str(tmp_path)
    tag = sys.implementation.cache_tag
    path, digest = build_layer(os.path.join(base, "one"), "--compile-with", sys.executable)
    _, digest_again = build_layer(os.path.join(base, "two"), "--compile-with", sys.executable)
    assert digest == digest_again
    assert os.path.basename(path) == f"spaps-lambda-layer-{VERSION}-{tag}.zip"
    pyc_name = f"python/__pycache__/spaps_client.{tag}.pyc"
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["python/LICENSE.spaps", pyc_name, "python/spaps_client.py"]
        assert archive.getinfo(pyc_name).date_time == (1980, 1, 1, 0, 0, 0)
        pyc = archive.read(pyc_name)
        archive.extractall(os.path.join(base, "opt"))
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 0b01  # hash-based, unchecked (PEP 552)

    layer_python = os.path.join(base, "opt", "python")
    env = clean_env(PYTHONPATH=layer_python, PYTHONDONTWRITEBYTECODE="1")
    done = run([sys.executable, "-S", "-v", "-c", LAYER_PROGRAM, server.url], cwd=base, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    cached = os.path.join(layer_python, "__pycache__", f"spaps_client.{tag}.pyc")
    assert f"code object from '{cached}'" in done.stderr
    assert done.stdout.splitlines()[2:] == ["ok", DEMO_EMAIL]


# -----------------------------------------------------------------------------
# the operator command line
# -----------------------------------------------------------------------------

CLI_KEY = "sk_test_cli_SECRET_0123456789abcdef"


@pytest.fixture
def cli_home(tmp_path: Path) -> str:
    """A HOME of its own, so the default token file is never the developer's."""
    return str(tmp_path)


def cli(home: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "spaps_client", *args], cwd=home,
               env=clean_env(HOME=home, PYTHONPATH=ROOT, **env), timeout=60)


@pytest.fixture
def token_file(server: MockServer, cli_home: str) -> str:
    """A FileTokenStorage file made by signing in through SpapsClient."""
    path = os.path.join(cli_home, "state", "tokens.json")
    with SpapsClient(base_url=server.url, api_key=CLI_KEY,
                     token_storage=FileTokenStorage(path=path)) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    _ISSUED.setdefault(path, []).extend(secrets_in(path))
    return path


_ISSUED: Dict[str, List[str]] = {}  # tokens as first written, in case a command refreshed them


def secrets_in(token_path: Optional[str]) -> List[str]:
    found = [CLI_KEY]
    if token_path:
        found += _ISSUED.get(token_path, [])
        if os.path.exists(token_path):
            with open(token_path, encoding="utf-8") as handle:
                document = json.load(handle)
            found += [document["access_token"], document["refresh_token"]]
    return found


def assert_no_secrets(done: subprocess.CompletedProcess[str],
                      token_path: Optional[str] = None) -> None:
    for secret in secrets_in(token_path):
        assert secret not in done.stdout and secret not in done.stderr


def test_cli_version(cli_home: str) -> None:
    done = cli(cli_home, "version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"spaps_client {VERSION}\n", "")
    done = cli(cli_home, "--json", "version")
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"version": VERSION}


def test_cli_health_and_ready(server: MockServer, cli_home: str) -> None:
    # SPAPS envelopes both documents; the verdict is read from (and printed with) "data".
    for command, value in (("health", "ok"), ("ready", "ready")):
        done = cli(cli_home, "--base-url", server.url, "--api-key", CLI_KEY, command)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{command}: ok ")
        assert_no_secrets(done)
        done = cli(cli_home, "--base-url", server.url, "--api-key", CLI_KEY, "--json", command)
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        assert document["success"] is True and document["data"]["status"] == value


def test_cli_reads_spaps_environment(server: MockServer, cli_home: str, token_file: str) -> None:
    done = cli(cli_home, "whoami", SPAPS_API_URL=server.url, SPAPS_API_KEY=CLI_KEY,
               SPAPS_TOKEN_FILE=token_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(DEMO_EMAIL + " ")
    assert_no_secrets(done, token_file)
    sent = [request for request in server.requests if request.path == "/api/auth/user"]
    assert sent and all(request.headers.get("x-api-key") == CLI_KEY for request in sent)


def test_cli_health_not_ok_exits_1(server: MockServer, cli_home: str) -> None:
    # More 503s than the client's attempts, so the failure reaches the command line.
    server.inject("GET", "/health", *([{"status": 503}] * 5))
    done = cli(cli_home, "--base-url", server.url, "--api-key", CLI_KEY, "health")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "503" in done.stderr and done.stdout == ""
    assert_no_secrets(done)
    server.clear_faults()
    server.inject("GET", "/health", {"status": 200, "raw_body": '{"status": "degraded"}',
                                     "content_type": "application/json"})
    done = cli(cli_home, "--base-url", server.url, "health")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("health: NOT OK")


def test_cli_ready_not_ready_exits_1(server: MockServer, cli_home: str) -> None:
    server.inject("GET", "/health/ready", {"status": 200, "raw_body": '{"ready": false}',
                                           "content_type": "application/json"})
    done = cli(cli_home, "--base-url", server.url, "--json", "ready")
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(done.stdout) == {"ready": False}


def test_cli_unreachable_exits_3(cli_home: str, token_file: str) -> None:
    url = closed_port_url()
    for command in ("health", "ready", "whoami", "sessions"):
        done = cli(cli_home, "--base-url", url, "--api-key", CLI_KEY, "--timeout", "2",
                   "--token-file", token_file, command)
        assert done.returncode == 3, (command, done.stdout, done.stderr)
        assert "unreachable" in done.stderr and done.stdout == ""
        assert_no_secrets(done, token_file)


def test_cli_whoami_without_token_file_exits_4(server: MockServer, cli_home: str) -> None:
    for extra in ([], ["--token-file", os.path.join(cli_home, "missing.json")]):
        done = cli(cli_home, "--base-url", server.url, "--api-key", CLI_KEY, *extra, "whoami")
        assert done.returncode == 4, done.stdout + done.stderr
        assert "not signed in" in done.stderr and done.stdout == ""
        assert_no_secrets(done)


def test_cli_rejected_tokens_exit_4(server: MockServer, cli_home: str) -> None:
    path = os.path.join(cli_home, "stale.json")
    FileTokenStorage(path=path).save(
        spaps_client.StoredTokens("stale-access-token-SECRET", None, None, "Bearer"))
    done = cli(cli_home, "--base-url", server.url, "--token-file", path, "sessions")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "401" in done.stderr
    assert "stale-access-token-SECRET" not in done.stdout + done.stderr


def test_cli_whoami_and_sessions(server: MockServer, cli_home: str, token_file: str) -> None:
    common = ["--base-url", server.url, "--api-key", CLI_KEY, "--token-file", token_file]
    done = cli(cli_home, *common, "whoami")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"{re.escape(DEMO_EMAIL)} \(id {UUID}, tier basic\)\n", done.stdout)
    assert_no_secrets(done, token_file)

    done = cli(cli_home, *common, "--json", "whoami")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["email"] == DEMO_EMAIL
    assert_no_secrets(done, token_file)

    current = current_session_id(server, token_file)
    done = cli(cli_home, *common, "sessions")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"1 session|\d+ sessions", lines[-1])
    assert len(lines) - 1 == int(lines[-1].split()[0]) >= 1
    assert any(line.startswith(current) for line in lines[:-1])
    assert all(re.match(UUID + r"( \(current\))? created ", line) for line in lines[:-1])
    assert_no_secrets(done, token_file)

    done = cli(cli_home, *common, "--json", "sessions")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert listing["total"] >= 1
    assert current in [s["session_id"] for s in listing["sessions"]]
    assert_no_secrets(done, token_file)


def current_session_id(server: MockServer, token_file: str) -> str:
    with SpapsClient(base_url=server.url, api_key=CLI_KEY,
                     token_storage=FileTokenStorage(path=token_file)) as spaps:
        return spaps.sessions.get_current_session().session_id


def test_cli_sessions_marks_the_current_one(server: MockServer, cli_home: str,
                                            token_file: str) -> None:
    """docs/cli.md: one line per session, "the current one marked ``(current)``"."""
    common = ["--base-url", server.url, "--api-key", CLI_KEY, "--token-file", token_file]
    current = current_session_id(server, token_file)
    done = cli(cli_home, *common, "sessions")
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if "(current)" in line] == [
        line for line in done.stdout.splitlines() if line.startswith(current)]
    assert f"{current} (current) created " in done.stdout


@pytest.mark.parametrize("args", [
    [],                                   # no command
    ["launch"],                           # unknown command
    ["--timeout", "soon", "health"],      # not a number
    ["--base-url", "ftp://spaps.example.com", "health"],  # not http(s)
])
def test_cli_bad_usage_exits_2(args: List[str], cli_home: str) -> None:
    done = cli(cli_home, "--api-key", CLI_KEY, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr and "Traceback" not in done.stderr
    assert_no_secrets(done)


def test_cli_help_does_not_echo_the_key(cli_home: str) -> None:
    done = cli(cli_home, "--help", SPAPS_API_KEY=CLI_KEY)
    assert done.returncode == 0
    for command in ("health", "ready", "version", "whoami", "sessions", "--base-url",
                    "--api-key", "--token-file", "--json", "--timeout"):
        assert command in done.stdout
    assert_no_secrets(done)


# -----------------------------------------------------------------------------
# docs/testing.md's pytest example passes under pytest
# -----------------------------------------------------------------------------


def test_testing_md_fixture_example_passes_under_pytest(tmp_path: Path) -> None:
    """Executing a block only defines its tests; this runs them, as a user's pytest would."""
    with open(os.path.join(ROOT, "docs", "testing.md"), encoding="utf-8") as handle:
        blocks = re.findall(r"^```python\n(.*?)^```", handle.read(), re.MULTILINE | re.DOTALL)
    examples = [block for block in blocks if "@pytest.fixture" in block]
    assert len(examples) == 1
    path = tmp_path / "test_my_integration.py"
    path.write_text(examples[0], encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
               cwd=str(tmp_path), env=clean_env(PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^3 passed", done.stdout, re.MULTILINE), done.stdout


# -----------------------------------------------------------------------------
# the changelog names the release and the sha256 of the file
# -----------------------------------------------------------------------------


def changelog_latest() -> tuple[str, str]:
    """(version, body) of the newest ``## [X.Y.Z]`` entry of CHANGELOG.md."""
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as handle:
        text = handle.read()
    entries = re.findall(r"^## \[([^\]]+)\][^\n]*\n(.*?)(?=^## \[|\Z)", text,
                         re.MULTILINE | re.DOTALL)
    assert entries, "CHANGELOG.md has no '## [version]' entry"
    version, body = entries[0]
    return str(version), str(body)


def test_changelog_latest_entry_is_this_version() -> None:
    version, body = changelog_latest()
    assert version == VERSION, f"CHANGELOG.md's newest entry is {version}, the code is {VERSION}"
    assert re.search(r"sha256 of `spaps_client\.py`: `[0-9a-f]{64}`", body), \
        "the entry must list the sha256 of spaps_client.py"


@pytest.mark.skipif(os.environ.get("RELEASE_CHECK") != "1",
                    reason="release-time check: RELEASE_CHECK=1 (see RELEASE_CHECKLIST.md)")
def test_changelog_sha256_matches_the_file() -> None:
    _, body = changelog_latest()
    listed = re.search(r"sha256 of `spaps_client\.py`: `([0-9a-f]{64})`", body)
    with open(SOURCE, "rb") as handle:
        actual = hashlib.sha256(handle.read()).hexdigest()
    assert listed and listed.group(1) == actual, f"CHANGELOG.md must list {actual}"


# -----------------------------------------------------------------------------
# CLI: errors a script can read, messages an operator can act on
# -----------------------------------------------------------------------------


def test_cli_json_errors_are_json_on_stdout(cli_home: str) -> None:
    done = cli(cli_home, "--base-url", closed_port_url(), "--api-key", CLI_KEY, "--json",
               "health")
    assert done.returncode == 3
    error = json.loads(done.stdout)["error"]
    assert error["exit_code"] == 3 and error["message"].startswith("SPAPS unreachable: ")
    assert set(error) == {"message", "status_code", "error_code", "request_id", "exit_code"}


def test_cli_names_a_bad_timeout_variable(cli_home: str) -> None:
    done = cli(cli_home, "--api-key", CLI_KEY, "health", SPAPS_REQUEST_TIMEOUT="soon")
    assert done.returncode == 2
    assert "SPAPS_REQUEST_TIMEOUT" in done.stderr and "'soon'" in done.stderr


def test_cli_plain_http_refusal_names_its_flag(cli_home: str, token_file: str) -> None:
    done = cli(cli_home, "--base-url", "http://spaps.example.invalid", "--api-key", CLI_KEY,
               "--token-file", token_file, "whoami")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--allow-insecure-http" in done.stderr and "allow_insecure_http" not in done.stderr


def test_cli_damaged_token_file_is_not_called_missing(cli_home: str) -> None:
    path = os.path.join(cli_home, "damaged.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("{not json")
    done = cli(cli_home, "--api-key", CLI_KEY, "--token-file", path, "whoami")
    assert done.returncode == 4
    assert "no readable tokens" in done.stderr and path in done.stderr
    assert "FileTokenStorage" not in done.stderr


def test_cli_error_line_says_each_fact_once(server: MockServer, cli_home: str,
                                            token_file: str) -> None:
    server.inject("GET", "/api/auth/user", *[{"status": 503}] * 3)
    done = cli(cli_home, "--base-url", server.url, "--api-key", CLI_KEY, "--token-file",
               token_file, "whoami")
    assert done.returncode == 1
    line = done.stderr.strip()
    assert line.startswith("error: ") and line.count("HTTP 503") == 1, line
    assert line.count("SERVER_ERROR") == 1, line


def test_cli_json_datetimes_are_iso_8601(server: MockServer, cli_home: str,
                                         token_file: str) -> None:
    done = cli(cli_home, "--base-url", server.url, "--api-key", CLI_KEY, "--token-file",
               token_file, "--json", "sessions")
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)["sessions"][0]["created_at"]
    assert "T" in created and datetime.fromisoformat(created).tzinfo is not None

