"""The operator command line, run in-process (``spaps_client.main``) against the emulator.

``tests/test_packaging.py`` runs the same commands as real ``python -m spaps_client``
subprocesses; these in-process runs keep each branch visible to coverage.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD

import spaps_client
from spaps_client import FileTokenStorage, SpapsClient, main
from spaps_mock import MockServer


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def signed_in_token_file(server: MockServer, path: Path) -> Path:
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     token_storage=FileTokenStorage(path=path)) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "version")
    assert code == spaps_client.EXIT_OK
    assert spaps_client.__version__ in out
    code, out, _ = run(capsys, "--json", "version")
    assert json.loads(out) == {"version": spaps_client.__version__}


def test_health_and_ready(server: MockServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--base-url", server.url, "health")
    assert (code, out.startswith("health: ok")) == (0, True)
    code, out, _ = run(capsys, "--base-url", server.url, "--json", "ready")
    document = json.loads(out)  # the document as SPAPS sent it, envelope included
    assert code == 0 and document["success"] is True
    assert document["data"]["status"] == "ready"
    assert document["data"]["checks"]["database"] == {"status": "connected"}


@pytest.mark.parametrize("command, body", [
    ("health", {"success": True, "data": {"status": "degraded"}}),
    ("health", {"success": True, "status": "ok", "data": {"status": "down"}}),
    ("ready", {"success": True, "data": {"status": "starting", "ready": False}}),
    ("ready", {"success": True, "ready": True, "data": {"status": "not_ready"}}),
], ids=["health-degraded", "health-data-wins", "ready-starting", "ready-data-wins"])
def test_verdict_is_read_from_the_data_envelope(
    server: MockServer, capsys: pytest.CaptureFixture[str], command: str, body: dict
) -> None:
    path = "/health" if command == "health" else "/health/ready"
    server.inject("GET", path, {"status": 200, "raw_body": json.dumps(body),
                                "content_type": "application/json"})
    code, out, _ = run(capsys, "--base-url", server.url, command)
    assert code == spaps_client.EXIT_FAILED
    assert out.startswith(f"{command}: NOT OK")


@pytest.mark.parametrize("command, body", [
    ("health", {"status": "healthy"}), ("ready", {"ready": True}),
], ids=["health", "ready"])
def test_unenveloped_verdicts_of_older_servers_still_count(
    server: MockServer, capsys: pytest.CaptureFixture[str], command: str, body: dict
) -> None:
    path = "/health" if command == "health" else "/health/ready"
    server.inject("GET", path, {"status": 200, "raw_body": json.dumps(body),
                                "content_type": "application/json"})
    code, out, _ = run(capsys, "--base-url", server.url, "--json", command)
    assert code == spaps_client.EXIT_OK and json.loads(out) == body


def test_unhealthy_server_exits_1(server: MockServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.inject("GET", "/health", *[{"status": 503}] * 3)
    code, _, err = run(capsys, "--base-url", server.url, "health")
    assert code == spaps_client.EXIT_FAILED
    assert "HTTP 503" in err


def test_unreachable_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run(capsys, "--base-url", f"http://127.0.0.1:{port}", "--timeout", "2",
                       "health")
    assert code == spaps_client.EXIT_UNREACHABLE
    assert "unreachable" in err


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "no-such-command")[0] == spaps_client.EXIT_USAGE
    assert run(capsys, "--base-url", "ftp://example.com", "health")[0] == spaps_client.EXIT_USAGE


def test_whoami_without_tokens_exits_4(server: MockServer, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--base-url", server.url, "--token-file",
                       str(tmp_path / "none.json"), "whoami")
    assert code == spaps_client.EXIT_NOT_SIGNED_IN
    assert "not signed in" in err


def test_whoami_and_sessions_with_a_token_file(
    server: MockServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = signed_in_token_file(server, tmp_path / "tokens.json")
    base = ["--base-url", server.url, "--api-key", API_KEY, "--token-file", str(tokens)]
    code, out, err = run(capsys, *base, "whoami")
    assert code == 0 and DEMO_EMAIL in out
    code, out, _ = run(capsys, *base, "--json", "sessions")
    assert code == 0 and json.loads(out)["total"] >= 1
    secrets = [API_KEY, FileTokenStorage(path=tokens).load().access_token]  # type: ignore[union-attr]
    for secret in secrets:
        assert secret not in out + err


def test_rejected_tokens_exit_4(server: MockServer, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    tokens = signed_in_token_file(server, tmp_path / "tokens.json")
    server.inject("GET", "/api/auth/user", {"status": 401, "code": "INVALID_TOKEN"})
    stored = FileTokenStorage(path=tokens).load()
    assert stored is not None
    FileTokenStorage(path=tokens).save(spaps_client.StoredTokens(stored.access_token))
    code, _, err = run(capsys, "--base-url", server.url, "--token-file", str(tokens), "whoami")
    assert code == spaps_client.EXIT_NOT_SIGNED_IN
    assert "INVALID_TOKEN" in err
