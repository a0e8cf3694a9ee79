"""Tests of the SPAPS emulator itself, driven with nothing but ``http.client``."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spaps_mock import ADMIN_EMAIL, ADMIN_PASSWORD, ADMIN_USER_ID, MockServer  # noqa: E402

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
    assert status == 404 and body["error"] == {
        "code": "NOT_FOUND",
        "message": "Not Found",
        "details": {},
    }
    assert set(body) == {"success", "error", "request_id", "timestamp"}
    assert response.getheader("x-request-id") == body["request_id"]
    assert body["timestamp"].endswith("+00:00")
    status, response, body = call(conn, "GET", "/health", headers={"X-Request-ID": "req-1"})
    assert response.getheader("x-request-id") == body["request_id"] == "req-1"
    assert set(body) == {"success", "data", "request_id", "timestamp"}

    status, response, body = call(conn, "DELETE", "/api/auth/login")
    assert status == 405 and body["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert response.getheader("Allow") == "POST"

    status, _, body = call(conn, "POST", "/api/auth/login", DEMO, api_key=None)
    assert (status, body["error"]["code"]) == (401, "INVALID_APPLICATION")
    assert body["error"]["message"] == "Missing API key"
    server.api_key = "secret"
    status, _, body = call(conn, "POST", "/api/auth/login", DEMO, api_key="wrong")
    assert (status, body["error"]["message"]) == (401, "Invalid API key")
    assert call(conn, "POST", "/api/auth/login", DEMO, api_key="secret")[0] == 200
    assert call(conn, "GET", "/health", api_key=None)[0] == 200
    server.api_key = None

    status, _, body = call(conn, "POST", "/api/auth/login", {"email": "demo@example.com"})
    assert status == 400 and body["error"]["details"] == {"fields": {"password": "Field required"}}
    conn.request("POST", "/api/auth/login", body=b"{nope", headers={"X-API-Key": "k"})
    bad = json.loads(conn.getresponse().read())
    assert bad["error"]["code"] == "VALIDATION_ERROR"
    assert bad["error"]["details"] == {"fields": {"1": "JSON decode error"}}


def test_self_enveloped_health_routes_and_prometheus_text(server: MockServer) -> None:
    conn = connect(server)
    for path in ("/health/ready", "/api/metrics/json"):
        status, response, body = call(conn, "GET", path, api_key=None)
        assert status == 200 and set(body) == {"success", "data", "metadata"}
        assert response.getheader("x-request-id")
    status, response, text = call(conn, "GET", "/api/metrics", api_key=None)
    assert response.getheader("Content-Type").startswith("text/plain")
    assert 'spaps_info{version="1.0.0"} 1' in text and "spaps_requests_total" in text


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


class Clock:
    """A hand-moved clock for MockServer(clock=...), so lifetimes need no sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def refresh(conn: http.client.HTTPConnection, token: str, ua: str = "ua-a") -> tuple[int, Any]:
    status, _, body = call(
        conn, "POST", "/api/auth/refresh", {"refresh_token": token}, headers={"User-Agent": ua}
    )
    return status, body


def test_refresh_rotates_with_same_client_grace_and_cross_client_replay() -> None:
    clock = Clock()
    with MockServer(clock=clock) as server:
        conn = connect(server)
        first = login(conn)
        other_session = login(conn)
        status, body = refresh(conn, first["refresh_token"])
        assert status == 200 and set(body["data"]) == {
            "access_token",
            "refresh_token",
            "expires_in",
            "token_type",
        }
        rotated = body["data"]
        assert rotated["expires_in"] == 3600
        # the same client re-sending the consumed token gets the identical pair
        assert refresh(conn, first["refresh_token"])[1]["data"] == rotated
        clock.now += 61
        status, body = refresh(conn, first["refresh_token"])
        assert (status, body["error"]["code"]) == (401, "REFRESH_TOKEN_REPLAY")
        # a replay signs the user out everywhere, access tokens excepted
        for token in (rotated["refresh_token"], other_session["refresh_token"]):
            assert refresh(conn, token)[1]["error"]["code"] == "REFRESH_TOKEN_REPLAY"
        assert call(conn, "GET", "/api/auth/user", token=first["access_token"])[0] == 200

        fresh = login(conn)
        ok = refresh(conn, fresh["refresh_token"])[1]["data"]
        status, body = refresh(conn, fresh["refresh_token"], ua="ua-b")
        assert (status, body["error"]["code"]) == (401, "REFRESH_TOKEN_REPLAY")
        assert refresh(conn, ok["refresh_token"])[1]["error"]["code"] == "REFRESH_TOKEN_REPLAY"

        status, body = refresh(conn, fresh["access_token"])
        assert (status, body["error"]["code"]) == (401, "INVALID_REFRESH_TOKEN")
        status, _, body = call(conn, "POST", "/api/auth/refresh", {})
        assert body["error"]["message"] == "Refresh token required"


def login_as(conn: http.client.HTTPConnection, ua: str) -> dict[str, Any]:
    status, _, body = call(conn, "POST", "/api/auth/login", DEMO, headers={"User-Agent": ua})
    assert status == 200, body
    data: dict[str, Any] = body["data"]
    return data


def test_refresh_binding_refuses_another_user_agent_and_spends_the_token() -> None:
    with MockServer() as server:
        assert server.refresh_binding  # on by default, like the real server
        conn = connect(server)
        first = login_as(conn, "ua-a")
        other = login_as(conn, "ua-a")
        status, body = refresh(conn, first["refresh_token"], ua="ua-b")
        assert (status, body["error"]["code"]) == (401, "REFRESH_TOKEN_ANOMALOUS")
        assert body["error"]["message"] == (
            "Network context anomaly detected (IP or user agent changed)"
        )
        # access token and the user's other refresh tokens untouched ...
        assert call(conn, "GET", "/api/auth/user", token=first["access_token"])[0] == 200
        rotated = refresh(conn, other["refresh_token"])[1]["data"]
        # ... but the refused token is spent without grace: its next use is a replay
        for ua in ("ua-a", "ua-b"):
            assert refresh(conn, first["refresh_token"], ua=ua)[1]["error"]["code"] == (
                "REFRESH_TOKEN_REPLAY"
            )
        assert refresh(conn, rotated["refresh_token"])[1]["error"]["code"] == (
            "REFRESH_TOKEN_REPLAY"
        )
        # a successor is bound to the client that refreshed; no User-Agent is not checked
        successor = refresh(conn, login_as(conn, "ua-b")["refresh_token"], ua="ua-b")[1]["data"]
        assert refresh(conn, successor["refresh_token"], ua="ua-a")[1]["error"]["code"] == (
            "REFRESH_TOKEN_ANOMALOUS"
        )
        assert refresh(conn, login(conn)["refresh_token"], ua="ua-b")[0] == 200

        control = connect(server)
        config = call(control, "POST", "/__mock__/config", {"refresh_binding": False}, api_key=None)
        assert config[2]["refresh_binding"] is False and server.refresh_binding is False
        assert refresh(conn, login_as(conn, "ua-a")["refresh_token"], ua="ua-b")[0] == 200
        bad = call(control, "POST", "/__mock__/config", {"refresh_binding": "no"}, api_key=None)
        assert bad[0] == 400
        server.refresh_binding = True
        status, body = refresh(conn, login_as(conn, "ua-a")["refresh_token"], ua="ua-b")
        assert body["error"]["code"] == "REFRESH_TOKEN_ANOMALOUS"

    with MockServer(refresh_binding=False) as server:
        conn = connect(server)
        assert refresh(conn, login_as(conn, "ua-a")["refresh_token"], ua="ua-b")[0] == 200


def test_every_sign_in_and_refresh_opens_a_session() -> None:
    with MockServer() as server:
        conn = connect(server)
        first = login(conn)
        rotated = refresh(conn, first["refresh_token"])[1]["data"]
        ids = {
            call(conn, "GET", "/api/sessions/current", token=t)[2]["data"]["session"]["id"]
            for t in (first["access_token"], rotated["access_token"])
        }
        assert len(ids) == 2
        listed = call(conn, "GET", "/api/sessions/", token=rotated["access_token"])[2]["data"]
        assert listed["total"] == 2 and {s["id"] for s in listed["sessions"]} == ids


def test_access_tokens_expire_with_the_clock_and_logout_rules() -> None:
    clock = Clock()
    with MockServer(clock=clock, access_token_ttl=60) as server:
        conn = connect(server)
        pair = login(conn)
        assert pair["expires_in"] == 60
        clock.now += 61
        status, _, body = call(conn, "GET", "/api/auth/user", token=pair["access_token"])
        assert (status, body["error"]["code"]) == (401, "INVALID_TOKEN")
        fresh = refresh(conn, pair["refresh_token"])[1]["data"]
        server.expire_access_tokens()
        assert call(conn, "GET", "/api/auth/user", token=fresh["access_token"])[0] == 401
        assert call(conn, "GET", "/api/auth/user")[2]["error"]["code"] == "UNAUTHORIZED"

        plain = login(conn)
        user = call(conn, "GET", "/api/auth/user", token=plain["access_token"])[2]["data"]["user"]
        assert user["wallets"] is None and user["username"] == "demo"
        assert call(conn, "POST", "/api/auth/logout", token=plain["access_token"])[0] == 200
        status, _, body = call(conn, "GET", "/api/auth/user", token=plain["access_token"])
        assert body["error"]["message"] == "Token has been revoked"
        # body-less logout leaves the refresh token usable
        assert refresh(conn, plain["refresh_token"])[0] == 200

        full = login(conn)
        logout = {"refresh_token": full["refresh_token"]}
        call(conn, "POST", "/api/auth/logout", logout, token=full["access_token"])
        assert refresh(conn, full["refresh_token"])[1]["error"]["code"] == "REFRESH_TOKEN_REPLAY"


def test_sessions_redirect_list_touch_and_revoke(server: MockServer) -> None:
    conn = connect(server)
    mine = login(conn)
    other = login(conn)

    status, response, raw = call(conn, "GET", "/api/sessions?limit=1", token=mine["access_token"])
    assert (status, raw) == (307, None)
    assert response.getheader("Location").endswith("/api/sessions/?limit=1")

    body = call(conn, "GET", "/api/sessions/?limit=1", token=mine["access_token"])[2]["data"]
    assert body["total"] == 2 and len(body["sessions"]) == 1
    assert body["sessions"][0]["is_current"] is None
    current = call(conn, "GET", "/api/sessions/current", token=other["access_token"])[2]["data"]
    other_id = current["session"]["id"]
    assert current["session"]["is_current"] is True
    validated = call(conn, "POST", "/api/sessions/validate", token=mine["access_token"])[2]
    assert (validated["data"]["valid"], validated["data"]["reason"]) == (True, None)

    status, _, raw = call(conn, "DELETE", f"/api/sessions/{other_id}", token=mine["access_token"])
    assert (status, raw) == (204, None)
    status, _, body = call(conn, "GET", "/api/sessions/current", token=other["access_token"])
    assert (status, body["error"]["code"]) == (401, "INVALID_TOKEN")
    status, body = refresh(conn, other["refresh_token"])
    assert (status, body["error"]["code"]) == (401, "INVALID_REFRESH_TOKEN")
    status, _, body = call(conn, "DELETE", "/api/sessions/sess_unknown", token=mine["access_token"])
    assert (status, body["error"]["code"]) == (404, "NOT_FOUND")

    touched = call(conn, "POST", "/api/sessions/touch", token=mine["access_token"])[2]["data"]
    assert touched["message"] == "Session activity updated"
    assert refresh(conn, mine["refresh_token"])[1]["error"]["code"] == "REFRESH_TOKEN_REPLAY"


def test_register_magic_link_password_reset_and_wallet_flows(server: MockServer) -> None:
    conn = connect(server)
    status, _, body = call(
        conn, "POST", "/api/auth/register", {"email": "a@x.io", "password": "short"}
    )
    assert (status, body["error"]["code"]) == (400, "WEAK_PASSWORD")
    account = {"email": "a@x.io", "password": "Long-enough-1"}
    status, _, body = call(conn, "POST", "/api/auth/register", account)
    assert status == 201 and set(body["data"]) == {
        "tokens",
        "token_type",
        "user",
        "email_confirmed",
    }
    assert set(body["data"]["tokens"]) == {"access_token", "refresh_token", "expires_in"}
    status, _, body = call(conn, "POST", "/api/auth/register", account)
    assert (status, body["error"]["code"]) == (400, "EMAIL_ALREADY_EXISTS")

    status, _, body = call(conn, "POST", "/api/auth/magic-link", {"email": "new@x.io"})
    assert body["data"]["email"] == "new@x.io" and body["data"]["delivery_status"] == "sent"
    token = server.magic_link_token("new@x.io")
    assert token is not None
    verify = {"token": token, "type": "magiclink"}
    body = call(conn, "POST", "/api/auth/verify-magic-link", verify)[2]["data"]
    assert body["user"]["email"] == "new@x.io" and body["tokens"]["access_token"]
    assert "username" not in body["user"]  # null-valued keys are dropped
    status, _, body = call(conn, "POST", "/api/auth/verify-magic-link", verify)
    assert (status, body["error"]["code"]) == (401, "INVALID_TOKEN")

    assert call(conn, "POST", "/api/auth/password-reset", {"email": "nobody@x.io"})[0] == 200
    assert server.password_reset_token("nobody@x.io") is None
    call(conn, "POST", "/api/auth/password-reset", {"email": "demo@example.com"})
    reset = server.password_reset_token("demo@example.com")
    confirm = {"token": reset, "new_password": "Brand-new-pass-1"}
    assert call(conn, "POST", "/api/auth/reset-password-confirm", confirm)[2]["data"]["message"]
    assert call(conn, "POST", "/api/auth/reset-password-confirm", confirm)[0] == 400
    assert call(conn, "POST", "/api/auth/login", DEMO)[0] == 401
    new_login = {"email": "demo@example.com", "password": "Brand-new-pass-1"}
    assert call(conn, "POST", "/api/auth/login", new_login)[0] == 200

    nonce = call(conn, "POST", "/api/auth/nonce", {"wallet_address": "0xABC"})[2]["data"]
    assert nonce["wallet_address"] == "0xabc" and len(nonce["nonce"]) == 64
    sign_in = {"wallet_address": "0xabc", "signature": "0xsig", "message": nonce["message"]}
    body = call(conn, "POST", "/api/auth/wallet-sign-in", sign_in)[2]
    assert body["data"]["access_token"] and body["data"]["user"]["roles"] == ["user"]
    status, _, body = call(conn, "POST", "/api/auth/wallet-sign-in", sign_in)
    assert (status, body["error"]["code"]) == (401, "INVALID_SIGNATURE")


def admin_login(conn: http.client.HTTPConnection) -> str:
    body = {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    data = call(conn, "POST", "/api/auth/login", body)[2]["data"]
    assert data["user"]["isAdmin"] is True and data["user"]["roles"] == ["admin", "super_admin"]
    token: str = data["access_token"]
    return token


def test_usage_needs_an_entitlement_then_authorize_record_and_replay(server: MockServer) -> None:
    conn = connect(server)
    pair = login(conn)
    token = pair["access_token"]
    uid = call(conn, "GET", "/api/auth/user", token=token)[2]["data"]["user"]["id"]
    ask = {
        "feature_key": "api_calls",
        "resource_type": "user",
        "subject_user_id": uid,
        "dimensions": {"requests": 2},
    }
    status, _, body = call(conn, "POST", "/api/usage/authorize", ask, token=token)
    assert (status, body["error"]["code"]) == (403, "USAGE_ENTITLEMENT_REQUIRED")
    grant = {
        "beneficiary_user_id": uid,
        "entitlement_key": "api_calls",
        "metadata": {"usage_features": ["api_calls"], "usage_limits": {"requests": 3}},
    }
    status, _, body = call(conn, "POST", "/api/entitlements/manual", grant, token=token)
    assert (status, body["error"]["code"]) == (403, "FORBIDDEN")
    assert call(conn, "POST", "/api/entitlements/manual", grant, token=admin_login(conn))[0] == 201

    features = call(conn, "GET", "/api/usage/features", token=token)[2]["data"]["features"]
    assert features[0]["feature_key"] == "api_calls" and features[0]["limits"] == {"requests": 3.0}
    decision = call(conn, "POST", "/api/usage/authorize", ask, token=token)[2]["data"]
    assert decision["decision"] == "allowed" and decision["remaining"] == {"requests": 1.0}
    record = {
        "authorization_ref": decision["authorization_ref"],
        "idempotency_key": "k-1",
        "feature_key": "api_calls",
        "resource_type": "user",
        "subject_user_id": uid,
        "dimensions": {"requests": 2},
    }
    status, _, first = call(conn, "POST", "/api/usage/record", record, token=token)
    assert status == 201 and first["data"]["window_totals"] == {"requests": 2.0}
    status, _, again = call(conn, "POST", "/api/usage/record", record, token=token)
    assert status == 201 and again["data"]["event_id"] == first["data"]["event_id"]
    assert (again["data"]["status"], again["data"]["replayed"]) == ("replayed", True)
    status, _, body = call(
        conn, "POST", "/api/usage/record", {"feature": "api_calls", "quantity": 1}, token=token
    )
    assert status == 400 and "authorization_ref" in body["error"]["details"]["fields"]
    over = call(conn, "POST", "/api/usage/authorize", ask, token=token)[2]["data"]
    assert over["decision"] == "blocked"
    history = call(conn, "GET", "/api/usage/history?limit=1", token=token)[2]["data"]
    assert len(history["events"]) == 1 and history["has_more"] is True
    assert history["next_offset"] == 1


def test_secure_messages_need_members(server: MockServer) -> None:
    conn = connect(server)
    admin = admin_login(conn)
    demo = login(conn)["access_token"]
    demo_id = call(conn, "GET", "/api/auth/user", token=demo)[2]["data"]["user"]["id"]
    message = {"patientId": demo_id, "practitionerId": ADMIN_USER_ID, "content": "hello"}
    status, _, body = call(conn, "POST", "/api/secure-messages", message, token=demo)
    assert (status, body["error"]["code"]) == (403, "SECURE_MESSAGES_FORBIDDEN_PARTICIPANT")
    for uid in (demo_id, ADMIN_USER_ID):
        body = call(conn, "POST", "/api/users/memberships", {"user_id": uid}, token=admin)[2]
        assert body["data"]["result"] == "created"
    status, _, created = call(conn, "POST", "/api/secure-messages", message, token=demo)
    assert status == 201 and created["data"]["patient_id"] == demo_id
    snake = {"patient_id": demo_id, "practitioner_id": ADMIN_USER_ID, "content": "hello"}
    assert call(conn, "POST", "/api/secure-messages", snake, token=demo)[0] == 400
    bad = {**message, "patientId": "p1"}
    status, _, body = call(conn, "POST", "/api/secure-messages", bad, token=demo)
    assert (status, body["error"]["message"]) == (400, "patient_id must be a valid UUID")
    listed = call(conn, "GET", "/api/secure-messages", token=demo)[2]["data"]["messages"]
    assert [m["id"] for m in listed] == [created["data"]["id"]]


def test_whitelist_is_admin_only_and_answers_204_on_remove(server: MockServer) -> None:
    conn = connect(server)
    user = login(conn)["access_token"]
    admin = admin_login(conn)
    entry = {"email": "wl@x.io", "tier": "premium"}
    status, _, body = call(conn, "POST", "/api/v1/whitelist", entry, token=user)
    assert (status, body["error"]) == (
        403,
        {"code": "FORBIDDEN", "message": "Admin access required", "details": {}},
    )
    assert call(conn, "POST", "/api/v1/whitelist", entry, token=admin)[0] == 201
    assert call(conn, "POST", "/api/v1/whitelist", entry, token=admin)[0] == 409
    check = call(conn, "GET", "/api/v1/whitelist/check?email=wl%40x.io")[2]["data"]
    assert check["entry"]["tier"] == "premium"
    stats = call(conn, "GET", "/api/v1/whitelist/stats", token=admin)[2]["data"]["stats"]
    assert stats["tierBreakdown"] == [{"tier": "premium", "count": 1}]
    status, _, raw = call(conn, "DELETE", "/api/v1/whitelist/wl@x.io", token=admin)
    assert (status, raw) == (204, None)
    assert call(conn, "GET", "/api/v1/whitelist/check?email=wl%40x.io")[2]["data"]["entry"] is None


def test_payments_stubs_crypto_and_seeded_stripe_price(server: MockServer) -> None:
    conn = connect(server)
    token = login(conn)["access_token"]
    status, _, body = call(conn, "GET", "/api/payments/balance", token=token)
    assert (status, body["error"]["code"]) == (501, "NOT_IMPLEMENTED")
    invoice = {"asset": "USDC", "network": "base", "amount": "42.75"}
    status, _, body = call(conn, "POST", "/api/payments/crypto/invoices", invoice)
    assert status == 201 and body["data"]["invoice"]["expires_at"] is None
    invoice_id = body["data"]["invoice"]["id"]
    status_view = call(conn, "GET", f"/api/payments/crypto/invoices/{invoice_id}/status")[2]
    assert set(status_view["data"]) == {"id", "status", "amount", "settled_at", "expires_at"}
    reconcile = call(conn, "POST", "/api/payments/crypto/reconcile", {})[2]["data"]
    assert reconcile == {"reconciled": True, "message": "Payment reconciliation completed"}

    checkout = {
        "mode": "payment",
        "line_items": [{"price_id": "price_x", "quantity": 1}],
        "success_url": "https://a.example/ok",
        "cancel_url": "https://a.example/no",
    }
    status, _, body = call(conn, "POST", "/api/stripe/checkout-sessions", checkout, token=token)
    assert (status, body["error"]["code"]) == (404, "PRICE_NOT_FOUND")
    server.add_price("price_x", unit_amount=500)
    status, _, body = call(conn, "POST", "/api/stripe/checkout-sessions", checkout, token=token)
    assert (
        status == 201 and body["data"]["status"] == "open" and body["data"]["amount_total"] == 500
    )
    listed = call(conn, "GET", "/api/stripe/checkout-sessions", token=token)[2]["data"]
    assert [s["id"] for s in listed["sessions"]] == [body["data"]["id"]]


def test_rate_limits_only_when_switched_on() -> None:
    with MockServer(rate_limit=True) as server:
        conn = connect(server)
        wrong = {"email": "demo@example.com", "password": "nope"}
        statuses = [call(conn, "POST", "/api/auth/login", wrong)[0] for _ in range(10)]
        assert statuses == [401] * 10
        status, response, body = call(conn, "POST", "/api/auth/login", wrong)
        assert (status, body["error"]["code"]) == (429, "RATE_LIMIT_EXCEEDED")
        assert body["error"]["details"] == {"retry_after": 60}
        assert response.getheader("retry-after") == "60"
        assert response.getheader("x-ratelimit-remaining") == "0"
        assert call(conn, "GET", "/health")[0] == 200
    with MockServer() as server:
        conn = connect(server)
        assert all(call(conn, "POST", "/api/auth/login", DEMO)[0] == 200 for _ in range(12))


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
    assert call(conn, "GET", "/health")[2]["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    status, response, body = call(conn, "GET", "/health")
    assert (status, body["data"]["status"], response.getheader("X-Extra")) == (200, "ok", "yes")
    assert call(conn, "GET", "/health")[0] == 200
    assert server.request_count("GET", "/health") == 4
    assert server.connections_opened == 1


def test_raw_body_and_delay_faults(server: MockServer) -> None:
    server.inject(
        "GET", "/health", {"raw_body": "<html>proxy</html>", "status": 502}, {"delay": 0.5}
    )
    conn = connect(server)
    status, response, body = call(conn, "GET", "/health")
    assert (status, body) == (502, "<html>proxy</html>")
    assert response.getheader("Content-Type").startswith("text/html")
    conn.request("GET", "/health", headers={"X-API-Key": "test-key"})
    assert conn.sock is not None
    conn.sock.settimeout(0.05)
    with pytest.raises(socket.timeout):  # the answer is held back: not a byte of it yet
        conn.sock.recv(1, socket.MSG_PEEK)
    conn.sock.settimeout(5)
    response = conn.getresponse()  # and then it comes, on the same connection
    assert (response.status, json.loads(response.read())["data"]["status"]) == (200, "ok")


def test_drop_before_read_resets_without_side_effects(server: MockServer) -> None:
    server.inject("POST", "/api/auth/register", {"drop": "before_read"})
    conn = connect(server)
    with pytest.raises(ConnectionResetError) as info:
        call(conn, "POST", "/api/auth/register", {"email": "r@x.io", "password": "Password-1"})
    assert not isinstance(info.value, http.client.RemoteDisconnected)  # RST, not a clean close
    assert server.request_count("POST", "/api/auth/register") == 1
    login_body = {"email": "r@x.io", "password": "Password-1"}
    assert call(connect(server), "POST", "/api/auth/login", login_body)[0] == 401


def test_drop_after_read_and_after_process(server: MockServer) -> None:
    body = {"email": "d@x.io", "password": "Password-1"}
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

    user = {"email": "ctl@x.io", "password": "Password-1", "tier": "pro"}
    status, _, created = call(control, "POST", "/__mock__/users", user, api_key=None)
    assert status == 201 and created["tier"] == "pro"
    token = login(api)["access_token"]
    call(control, "POST", "/__mock__/expire-tokens", {}, api_key=None)
    assert call(api, "GET", "/api/auth/user", token=token)[2]["error"]["code"] == "INVALID_TOKEN"
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
    assert status_body["status"] == "confirmed" and status_body["settled_at"]
    assert all(not r.path.startswith("/__mock__") for r in server.requests)


def test_command_line_serves_until_terminated() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "spaps_mock", "--port", "0", "--no-refresh-binding"],
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
        assert response.status == 200 and json.loads(response.read())["data"]["status"] == "ok"
        conn.request("GET", "/__mock__/config")
        assert json.loads(conn.getresponse().read())["refresh_binding"] is False
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


# --- seeding helpers for MFA and Stripe (emulator only) ------------------------------------------


def test_totp_code_follows_the_emulator_clock() -> None:
    from spaps_mock import totp_code

    now = [1_700_000_000.0]
    with MockServer(clock=lambda: now[0]) as server:
        secret = "JBSWY3DPEHPK3PXP"
        assert server.totp_code(secret) == totp_code(secret, now[0])
        assert server.totp_code(secret, steps=1) == totp_code(secret, now[0] + 30)
        now[0] += 30
        assert server.totp_code(secret, steps=-1) == totp_code(secret, now[0] - 30)


def test_stripe_seeding_helpers_check_their_arguments() -> None:
    with MockServer() as server:
        user = server.add_user("seed@example.com", "Seed-Pass-1")
        server.add_price("price_seed")
        with pytest.raises(KeyError):
            server.add_subscription("no-such-user", "price_seed")
        with pytest.raises(KeyError):
            server.add_subscription(user["id"], "price_missing")
        with pytest.raises(ValueError):
            server.add_payment(user["id"], -1)
        with pytest.raises(KeyError):
            server.add_payment("no-such-user", 100)
        sub = server.add_subscription(user["id"], "price_seed", subscription_id="sub_1")
        assert (sub["id"], sub["status"], sub["price_id"]) == ("sub_1", "active", "price_seed")
        with pytest.raises(ValueError):
            server.add_subscription(user["id"], "price_seed", subscription_id="sub_1")
        payment = server.add_payment(user["id"], 250, currency="EUR")
        assert (payment["amount"], payment["currency"]) == (250, "eur")
