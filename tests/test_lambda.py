"""The documented Lambda layer under the real runtime interface client, on a read-only FS.

``python scripts/build_layer.py`` (the default command of docs/lambda.md) is unpacked at
``/opt`` and a handler at ``/var/task``, and ``python -m awslambdaric handler.handler`` (the
real runtime client, ``awslambdaric`` from the ``dev`` extra) runs them against a Runtime API
stand-in, with the whole filesystem read-only except ``/tmp`` (tests/lambda_sandbox.py: a
private mount namespace, so root only; skipped, saying why, where the kernel refuses it).

Checked: the init phase succeeds with no writable bytecode cache; the module is loaded from
the layer's shipped unchecked-hash ``.pyc`` (the source is neither compiled nor even read);
module-level clients keep one keep-alive connection and one sign-in across invocations; the
token storage docs/lambda.md recommends, ``FileTokenStorage`` under ``/tmp`` (and the default
in-memory storage), works there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from spaps_mock import MockServer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import lambda_sandbox  # noqa: E402

pytest.importorskip("awslambdaric", reason="awslambdaric (the dev extra) is not installed")

pytestmark = pytest.mark.slow

INVOCATIONS = 4
TAG = sys.implementation.cache_tag
MODULE = "/opt/python/spaps_client.py"
PYC = f"/opt/python/__pycache__/spaps_client.{TAG}.pyc"

HANDLER = '''\
"""handler.py: a function using the layer the way docs/lambda.md says."""

import errno
import importlib.machinery
import os
import sys

# Spy on the source loader while spaps_client is imported: did it compile or read the source?
_compiled, _read = [], []
_Loader = importlib.machinery.SourceFileLoader
_source_to_code, _get_data = _Loader.source_to_code, _Loader.get_data


def _spy_compile(self, data, path, *args, **kwargs):
    _compiled.append(str(path))
    return _source_to_code(self, data, path, *args, **kwargs)


def _spy_read(self, path):
    _read.append(str(path))
    return _get_data(self, path)


_Loader.source_to_code, _Loader.get_data = _spy_compile, _spy_read
try:
    import spaps_client
    from spaps_client import FileTokenStorage, InMemoryTokenStorage, SpapsClient
finally:
    _Loader.source_to_code, _Loader.get_data = _source_to_code, _get_data

TOKENS = "/tmp/spaps/tokens.json"
# Module level: created once per execution environment, reused by every invocation.
spaps = SpapsClient(token_storage=FileTokenStorage(path=TOKENS), request_timeout=5)
memory = SpapsClient(base_url=os.environ["SPAPS_MEMORY_URL"],
                     token_storage=InMemoryTokenStorage(), request_timeout=5)


def _write_errno(directory):
    try:
        with open(os.path.join(directory, "probe"), "w"):
            pass
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "writable"


def handler(event, context):
    emails = []
    for client in (spaps, memory):
        if client.get_tokens() is None:
            client.auth.sign_in_with_password(email="demo@example.com",
                                              password="demo-password")
        emails.append(client.auth.get_current_user().email)
    on_disk = FileTokenStorage(path=TOKENS).load()
    return {
        "request_id": context.aws_request_id,
        "pid": os.getpid(),
        "emails": emails,
        "module": spaps_client.__file__,
        "cached": spaps_client.__spec__.cached,
        "loader": type(spaps_client.__spec__.loader).__name__,
        "co_filename": SpapsClient.__init__.__code__.co_filename,
        "compiled": _compiled,
        "read": _read,
        "dont_write_bytecode": sys.dont_write_bytecode,
        "token_file_mode": oct(os.stat(TOKENS).st_mode & 0o777),
        "token_file_matches": on_disk is not None
        and on_disk.access_token == spaps.get_tokens().access_token,
        "writes": {path: _write_errno(path) for path in ("/opt/python", "/var/task", "/tmp")},
    }
'''


@pytest.fixture(scope="module")
def sandbox() -> None:
    reason = lambda_sandbox.sandbox_unavailable()
    if reason:
        pytest.skip(f"no read-only Lambda sandbox here: {reason}")


@pytest.fixture
def layer(tmp_path: Path) -> str:
    """The default layer (scripts/build_layer.py, no options), unpacked as /opt would be."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "build_layer.py"),
         "--outdir", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    if done.returncode != 0 and "no interpreter was found" in done.stderr \
            and not os.environ.get("CI"):
        pytest.skip(f"the default layer needs Python 3.9-3.13: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"[0-9a-f]{64}  (\S+\.zip)\n", done.stdout)
    assert match, done.stdout
    opt = tmp_path / "opt"
    with zipfile.ZipFile(match.group(1)) as archive:
        names = archive.namelist()
        archive.extractall(opt)
    expected = {"python/spaps_client.py", "python/LICENSE.spaps"} | {
        f"python/__pycache__/spaps_client.cpython-3{minor}.pyc" for minor in range(9, 14)}
    assert set(names) == expected
    with open(os.path.join(ROOT, "LICENSE"), "rb") as handle:
        assert (opt / "python" / "LICENSE.spaps").read_bytes() == handle.read()
    return str(opt)


@pytest.fixture
def servers() -> Iterator[List[MockServer]]:
    file_backed, in_memory = MockServer().start(), MockServer().start()
    try:
        yield [file_backed, in_memory]
    finally:
        file_backed.stop()
        in_memory.stop()


def test_layer_under_awslambdaric_on_read_only_fs(sandbox: None, layer: str, tmp_path: Path,
                                                  servers: List[MockServer]) -> None:
    file_backed, in_memory = servers
    task = tmp_path / "task"
    task.mkdir()
    (task / "handler.py").write_text(HANDLER)
    api = lambda_sandbox.RuntimeApi().start()
    runtime = None
    try:
        request_ids = [api.invoke({"n": n}) for n in range(INVOCATIONS)]
        env = lambda_sandbox.runtime_env(api.address, {
            "SPAPS_API_URL": file_backed.url,
            "SPAPS_API_KEY": "lambda-layer-key",
            "SPAPS_MEMORY_URL": in_memory.url,
        })
        runtime = lambda_sandbox.start_runtime(layer, str(task), env)
        results: List[Dict[str, Any]] = []
        for request_id in request_ids:
            kind, body = api.wait_result(request_id, timeout=30, process=runtime.process)
            assert kind == "response", f"{body}\n{runtime.output()[-3000:]}"
            results.append(body)
        assert api.init_errors == [] and api.errors == {} and api.unexpected == []
        assert api.wait(lambda: api.next_calls == INVOCATIONS + 1, 10, runtime.process)
    finally:
        if runtime is not None:
            runtime.stop()
        api.stop()

    first = results[0]
    # One warm runtime process served every invocation, with Lambda's request ids.
    assert [r["request_id"] for r in results] == request_ids
    assert {r["pid"] for r in results} == {first["pid"]}
    # Imported from the layer, from the shipped .pyc: nothing compiled, the source not read,
    # and no writable cache needed (the bytecode flag is left as Lambda leaves it).
    assert first["module"] == MODULE
    assert first["cached"] == PYC
    assert first["loader"] == "SourceFileLoader"
    assert first["co_filename"] == MODULE
    assert MODULE not in first["compiled"], first["compiled"]
    assert PYC in first["read"] and MODULE not in first["read"], first["read"]
    assert first["dont_write_bytecode"] is False
    assert first["writes"] == {"/opt/python": "EROFS", "/var/task": "EROFS",
                               "/tmp": "writable"}
    # FileTokenStorage under /tmp works on the read-only FS; the in-memory one too.
    assert first["token_file_mode"] == "0o600" and first["token_file_matches"] is True
    for result in results:
        assert result["emails"] == ["demo@example.com", "demo@example.com"]
    # Module-level clients: one connection and one sign-in each, across all invocations.
    for server in servers:
        assert server.connections_opened == 1
        assert server.request_count("POST", "/api/auth/login") == 1
        assert server.request_count("GET", "/api/auth/user") == INVOCATIONS
