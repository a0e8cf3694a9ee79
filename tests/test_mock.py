"""Tests of the SPAPS emulator itself, driven with nothing but ``http.client``."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spaps_mock import MockServer  # noqa: E402

DEMO = {"email": "demo@example.com", "password": "demo-password"}


@pytest.fixture
def server() -> Iterator[MockServer]:
    with MockServer() as srv:
        yield srv


def connect(srv: MockServer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    api_key: str | None = "test-key",
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPResponse, Any]:
    sent: dict[str, str] = {}
    if api_key is not None:
        sent["X-API-Key"] = api_key
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    conn.request(method, path, body=payload, headers=sent)
    response = conn.getresponse()
    raw = response.read()
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode()
    return response.status, response, parsed


def login(conn: http.client.HTTPConnection) -> dict[str, Any]:
    status, _, body = call(conn, "POST", "/api/auth/login", DEMO)
    assert status == 200, body
    data: dict[str, Any] = body["data"]
    return data


# -- connections and envelopes ----------------------------------------------------------------


def test_keep_alive_reuses_one_connection_and_control_calls_are_not_counted(
    server: MockServer,
) -> None:
    conn = connect(server)
    for _ in range(3):
        assert call(conn, "GET", "/health")[0] == 200
    assert server.connections_opened == 1

    control = connect(server)
    assert call(control, "GET", "/__mock__/stats", api_key=None)[0] == 200
    assert server.connections_opened == 1

    other = connect(server)
    call(other, "GET", "/health/ready")
    assert server.connections_opened == 2
    assert server.request_count("GET", "/health") == 3
    server.reset_stats()
    assert (server.connections_opened, server.requests) == (0, [])


def test_parallel_clients_each_get_a_connection(server: MockServer) -> None:
    statuses: list[int] = []

    def worker() -> None:
        conn = connect(server)
        statuses.extend(call(conn, "GET", "/health")[0] for _ in range(3))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 24
    assert server.connections_opened == 8


def test_error_envelope_request_id_routing_and_api_key(server: MockServer) -> None:
    conn = connect(server)
    status, response, body = call(conn, "GET", "/api/nope")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    assert response.getheader("x-request-id") == body["metadata"]["request_id"]
    assert body["metadata"]["request_id"].startswith("req_")
    assert body["metadata"]["timestamp"].endswith("Z")

    status, response, body = call(conn, "DELETE", "/api/auth/login")
    assert status == 405 and body["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert response.getheader("Allow") == "POST"

    status, _, body = call(conn, "POST", "/api/auth/login", DEMO, api_key=None)
    assert status == 401 and body["error"]["code"] == "INVALID_API_KEY"
    server.api_key = "secret"
    assert call(conn, "POST", "/api/auth/login", DEMO, api_key="wrong")[0] == 401
    assert call(conn, "POST", "/api/auth/login", DEMO, api_key="secret")[0] == 200
    assert call(conn, "GET", "/health", api_key=None)[0] == 200
    server.api_key = None

    status, _, body = call(conn, "POST", "/api/auth/login", {"email": "demo@example.com"})
    assert status == 400 and "password" in body["error"]["message"]
    conn.request("POST", "/api/auth/login", body=b"{nope", headers={"X-API-Key": "k"})
    bad = conn.getresponse()
    assert bad.status == 400 and json.loads(bad.read())["error"]["code"] == "VALIDATION_ERROR"


def test_recorded_requests_keep_raw_path_query_and_headers(server: MockServer) -> None:
    conn = connect(server)
    token = login(conn)["access_token"]
    call(conn, "GET", "/api/v1/whitelist?limit=5&offset=0&tier=", token=token)
    recorded = server.requests[-1]
    assert (recorded.method, recorded.path) == ("GET", "/api/v1/whitelist")
    assert recorded.query == {"limit": ["5"], "offset": ["0"], "tier": [""]}
    assert recorded.raw_query == "limit=5&offset=0&tier="
    assert recorded.headers["authorization"] == f"Bearer {token}"
    assert server.requests[0].json == DEMO


# -- auth state ------------------------------------------------------------------------------


def test_refresh_tokens_rotate_and_access_tokens_expire(server: MockServer) -> None:
    conn = connect(server)
    first = login(conn)
    status, _, body = call(
        conn, "POST", "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert status == 200
    second = body["data"]
    assert second["refresh_token"] != first["refresh_token"]
    status, _, body = call(
        conn, "POST", "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert (status, body["error"]["code"]) == (401, "INVALID_REFRESH")

    session_id = call(conn, "GET", "/api/sessions/current", token=second["access_token"])[2]
    assert session_id["data"]["session"]["id"]

    server.expire_access_tokens()
    status, _, body = call(conn, "GET", "/api/auth/user", token=second["access_token"])
    assert (status, body["error"]["code"]) == (401, "TOKEN_EXPIRED")
    status, _, body = call(
        conn, "POST", "/api/auth/refresh", {"refresh_token": second["refresh_token"]}
    )
    fresh = body["data"]["access_token"]
    assert call(conn, "GET", "/api/auth/user", token=fresh)[2]["data"]["user"]["username"] == "demo"
    assert call(conn, "GET", "/api/auth/user")[2]["error"]["code"] == "UNAUTHORIZED"

    server.access_token_ttl = 0.05
    short = login(conn)["access_token"]
    time.sleep(0.1)
    assert call(conn, "GET", "/api/auth/user", token=short)[2]["error"]["code"] == "TOKEN_EXPIRED"

    assert call(conn, "POST", "/api/auth/logout", token=fresh)[2]["data"]["message"]
    assert call(conn, "GET", "/api/auth/user", token=fresh)[2]["error"]["code"] == "INVALID_TOKEN"


def test_sessions_redirect_list_and_revoke(server: MockServer) -> None:
    conn = connect(server)
    mine = login(conn)["access_token"]
    other = login(conn)["access_token"]

    status, response, _ = call(conn, "GET", "/api/sessions?limit=1&starting_after=x", token=mine)
    assert status == 307
    assert response.getheader("Location") == "/api/sessions/?limit=1&starting_after=x"

    body = call(conn, "GET", "/api/sessions/?limit=1", token=mine)[2]["data"]
    assert body["total"] == 2 and len(body["sessions"]) == 1
    other_id = call(conn, "GET", "/api/sessions/current", token=other)[2]["data"]["session"]["id"]
    status, _, body = call(conn, "DELETE", f"/api/sessions/{other_id}", token=mine)
    assert (status, body["data"]["session_id"]) == (200, other_id)
    status, _, body = call(conn, "GET", "/api/sessions/current", token=other)
    assert (status, body["error"]["code"]) == (401, "SESSION_REVOKED")
    status, _, body = call(conn, "DELETE", "/api/sessions/sess_unknown", token=mine)
    assert (status, body["error"]["code"]) == (404, "SESSION_NOT_FOUND")


def test_register_magic_link_password_reset_and_wallet_flows(server: MockServer) -> None:
    conn = connect(server)
    status, _, body = call(
        conn, "POST", "/api/auth/register", {"email": "a@x.io", "password": "short"}
    )
    assert (status, body["error"]["code"]) == (400, "WEAK_PASSWORD")
    status, _, body = call(
        conn, "POST", "/api/auth/register", {"email": "a@x.io", "password": "longenough"}
    )
    assert status == 201 and set(body) >= {"message", "tokens", "user"}
    status, _, body = call(
        conn, "POST", "/api/auth/register", {"email": "a@x.io", "password": "longenough"}
    )
    assert (status, body["error"]["code"]) == (409, "EMAIL_ALREADY_EXISTS")

    status, _, body = call(conn, "POST", "/api/auth/magic-link", {"email": "new@x.io"})
    assert body["message"] and body["data"]["email"] == "new@x.io"
    token = server.magic_link_token("new@x.io")
    assert token is not None
    body = call(conn, "POST", "/api/auth/verify-magic-link", {"token": token, "type": "magiclink"})[
        2
    ]
    assert body["user"]["email"] == "new@x.io" and body["tokens"]["access_token"]
    status, _, body = call(conn, "POST", "/api/auth/verify-magic-link", {"token": token})
    assert (status, body["error"]["code"]) == (401, "INVALID_TOKEN")

    assert call(conn, "POST", "/api/auth/password-reset", {"email": "nobody@x.io"})[0] == 200
    assert server.password_reset_token("nobody@x.io") is None
    call(conn, "POST", "/api/auth/password-reset", {"email": "demo@example.com"})
    reset = server.password_reset_token("demo@example.com")
    confirm = {"token": reset, "new_password": "brand-new-pass"}
    assert call(conn, "POST", "/api/auth/reset-password-confirm", confirm)[2]["message"]
    assert call(conn, "POST", "/api/auth/reset-password-confirm", confirm)[0] == 400
    assert call(conn, "POST", "/api/auth/login", DEMO)[0] == 401
    new_login = {"email": "demo@example.com", "password": "brand-new-pass"}
    assert call(conn, "POST", "/api/auth/login", new_login)[0] == 200

    nonce = call(conn, "POST", "/api/auth/nonce", {"wallet_address": "0xabc"})[2]["data"]
    sign_in = {"wallet_address": "0xabc", "signature": "0xsig", "message": nonce["message"]}
    body = call(conn, "POST", "/api/auth/wallet-sign-in", sign_in)[2]
    assert body["data"]["user"]["wallet_address"] == "0xabc"
    status, _, body = call(conn, "POST", "/api/auth/wallet-sign-in", sign_in)
    assert status == 401


def test_usage_idempotency_and_secure_messages(server: MockServer) -> None:
    conn = connect(server)
    token = login(conn)["access_token"]
    record = {"feature": "api_calls", "quantity": 5}
    key = {"X-Idempotency-Key": "k-1"}
    first = call(conn, "POST", "/api/usage/record", record, token=token, headers=key)[2]["data"]
    again = call(conn, "POST", "/api/usage/record", record, token=token, headers=key)[2]["data"]
    assert first["record_id"] == again["record_id"]
    assert again["current_usage"] == {"used": 5, "limit": 1000, "remaining": 995}
    status, _, body = call(
        conn, "POST", "/api/usage/record", {"feature": "x", "quantity": 1}, token=token
    )
    assert (status, body["error"]["code"]) == (404, "FEATURE_NOT_FOUND")

    message = {"patientId": "p1", "practitionerId": "d1", "content": "hello"}
    status, _, body = call(conn, "POST", "/api/secure-messages", message, token=token)
    assert status == 201 and body["data"]["patient_id"] == "p1"
    snake = {"patient_id": "p1", "practitioner_id": "d1", "content": "hello"}
    assert call(conn, "POST", "/api/secure-messages", snake, token=token)[0] == 400
    listed = call(conn, "GET", "/api/secure-messages", token=token)[2]["data"]["messages"]
    assert [m["id"] for m in listed] == [body["data"]["id"]]


# -- fault injection ---------------------------------------------------------------------------


def test_status_faults_are_consumed_in_order(server: MockServer) -> None:
    server.inject(
        "GET",
        "/health",
        {"status": 503, "retry_after": 2},
        {"status": 429},
        {"passthrough": True, "headers": {"X-Extra": "yes"}},
    )
    conn = connect(server)
    status, response, body = call(conn, "GET", "/health")
    assert (status, response.getheader("Retry-After")) == (503, "2")
    assert body["error"]["code"] == "SERVER_ERROR"
    assert call(conn, "GET", "/health")[2]["error"]["code"] == "RATE_LIMITED"
    status, response, body = call(conn, "GET", "/health")
    assert (status, body, response.getheader("X-Extra")) == (200, {"status": "healthy"}, "yes")
    assert call(conn, "GET", "/health")[0] == 200
    assert server.request_count("GET", "/health") == 4
    assert server.connections_opened == 1


def test_raw_body_and_delay_faults(server: MockServer) -> None:
    server.inject(
        "GET", "/health", {"raw_body": "<html>proxy</html>", "status": 502}, {"delay": 0.2}
    )
    conn = connect(server)
    status, response, body = call(conn, "GET", "/health")
    assert (status, body) == (502, "<html>proxy</html>")
    assert response.getheader("Content-Type").startswith("text/html")
    started = time.monotonic()
    assert call(conn, "GET", "/health")[0] == 200
    assert time.monotonic() - started >= 0.2


def test_drop_before_read_resets_without_side_effects(server: MockServer) -> None:
    server.inject("POST", "/api/auth/register", {"drop": "before_read"})
    conn = connect(server)
    with pytest.raises(ConnectionResetError) as info:
        call(conn, "POST", "/api/auth/register", {"email": "r@x.io", "password": "password1"})
    assert not isinstance(info.value, http.client.RemoteDisconnected)  # RST, not a clean close
    assert server.request_count("POST", "/api/auth/register") == 1
    login_body = {"email": "r@x.io", "password": "password1"}
    assert call(connect(server), "POST", "/api/auth/login", login_body)[0] == 401


def test_drop_after_read_and_after_process(server: MockServer) -> None:
    body = {"email": "d@x.io", "password": "password1"}
    server.inject("POST", "/api/auth/register", {"drop": "after_read"}, {"drop": "after_process"})
    with pytest.raises(http.client.RemoteDisconnected):
        call(connect(server), "POST", "/api/auth/register", body)
    assert server.requests[-1].json == body
    assert call(connect(server), "POST", "/api/auth/login", body)[0] == 401

    with pytest.raises(http.client.RemoteDisconnected):
        call(connect(server), "POST", "/api/auth/register", body)
    assert call(connect(server), "POST", "/api/auth/login", body)[0] == 200


def test_truncate_sends_half_the_body(server: MockServer) -> None:
    server.inject("POST", "/api/auth/login", {"truncate": True})
    conn = connect(server)
    conn.request("POST", "/api/auth/login", body=json.dumps(DEMO), headers={"X-API-Key": "k"})
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()


def test_close_idle_connections_makes_pooled_connection_stale(server: MockServer) -> None:
    conn = connect(server)
    assert call(conn, "GET", "/health")[0] == 200
    assert server.close_idle_connections() == 1
    with pytest.raises(ConnectionError):
        call(conn, "GET", "/health")
    assert call(connect(server), "GET", "/health")[0] == 200
    assert server.connections_opened == 2


def test_inject_rejects_bad_actions(server: MockServer) -> None:
    with pytest.raises(ValueError):
        server.inject("GET", "/health", {"stauts": 500})
    with pytest.raises(ValueError):
        server.inject("GET", "/health", {"drop": "sometimes"})
    server.inject("GET", "/health", {"status": 500})
    server.clear_faults()
    assert call(connect(server), "GET", "/health")[0] == 200


# -- control routes and the command line ---------------------------------------------------


def test_control_routes(server: MockServer) -> None:
    control = connect(server)
    inject = {"method": "GET", "path": "/health", "actions": [{"status": 500}]}
    assert call(control, "POST", "/__mock__/inject", inject, api_key=None)[0] == 200
    api = connect(server)
    assert call(api, "GET", "/health")[0] == 500
    stats = call(control, "GET", "/__mock__/stats", api_key=None)[2]
    assert stats["counts"] == {"GET /health": 1}
    assert stats["requests"][0]["method"] == "GET" and stats["connections_opened"] == 1
    call(control, "POST", "/__mock__/reset-stats", {}, api_key=None)
    assert call(control, "GET", "/__mock__/stats", api_key=None)[2]["requests"] == []

    user = {"email": "ctl@x.io", "password": "password1", "tier": "pro"}
    status, _, created = call(control, "POST", "/__mock__/users", user, api_key=None)
    assert status == 201 and created["tier"] == "pro"
    token = login(api)["access_token"]
    call(control, "POST", "/__mock__/expire-tokens", {}, api_key=None)
    assert call(api, "GET", "/api/auth/user", token=token)[2]["error"]["code"] == "TOKEN_EXPIRED"
    config = call(control, "POST", "/__mock__/config", {"access_token_ttl": 5.5}, api_key=None)
    assert config[2]["access_token_ttl"] == 5.5 and server.access_token_ttl == 5.5

    call(api, "POST", "/api/auth/magic-link", {"email": "ml@x.io"})
    found = call(control, "GET", "/__mock__/magic-link?email=ml%40x.io", api_key=None)[2]
    assert found["token"] == server.magic_link_token("ml@x.io")

    token = login(api)["access_token"]
    invoice = {"asset": "USDC", "network": "base", "amount": "42.75"}
    created = call(api, "POST", "/api/payments/crypto/invoices", invoice, token=token)[2]
    invoice_id = created["data"]["invoice"]["id"]
    path = f"/__mock__/invoices/{invoice_id}"
    assert call(control, "POST", path, {"status": "confirmed"}, api_key=None)[0] == 200
    status_path = f"/api/payments/crypto/invoices/{invoice_id}/status"
    status_body = call(api, "GET", status_path, token=token)[2]["data"]
    assert status_body["status"] == "confirmed" and status_body["settlement_ids"]
    assert all(not r.path.startswith("/__mock__") for r in server.requests)


def test_command_line_serves_until_terminated() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "spaps_mock", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"spaps_mock listening on http://127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=5)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"status": "healthy"})
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
