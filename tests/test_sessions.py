"""Sessions service (docs/api.md, "Sessions"), sync and async, over real HTTP to ``spaps_mock``."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any, Dict, List

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD, is_uuid, only

from spaps_client import (
    AsyncSessionsClient,
    AsyncSpapsClient,
    AuthError,
    RetryConfig,
    SessionError,
    SessionListResult,
    SessionRecord,
    SessionRevokeResult,
    SessionsClient,
    SessionSummary,
    SessionTouchResult,
    SessionValidationResult,
    SpapsClient,
    SpapsError,
)
from spaps_mock import APPLICATION_ID, MockServer, RecordedRequest


def bearer(client: SpapsClient) -> str:
    tokens = client.get_tokens()
    assert tokens is not None
    return f"Bearer {tokens.access_token}"


def assert_both_headers(request: RecordedRequest, authorization: str) -> None:
    assert request.headers.get("x-api-key") == API_KEY
    assert request.headers.get("authorization") == authorization


def second_session(server: MockServer) -> str:
    """Sign the demo user in elsewhere; return that session's id."""
    with SpapsClient(base_url=server.url, api_key=API_KEY) as other:
        other.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        return other.sessions.get_current_session().session_id


# --------------------------------------------------------------------------------------------
# current / validate / touch
# --------------------------------------------------------------------------------------------


def test_get_current_session(server: MockServer, signed_in: SpapsClient) -> None:
    session = signed_in.sessions.get_current_session()

    request = only(server, "GET", "/api/sessions/current")
    assert_both_headers(request, bearer(signed_in))
    assert request.body == b"" and "content-type" not in request.headers
    assert request.raw_query == ""

    assert isinstance(session, SessionSummary)
    assert is_uuid(session.session_id)
    assert is_uuid(session.user_id)
    assert session.application_id == APPLICATION_ID
    assert session.tier == "basic"
    for moment in (session.created_at, session.expires_at, session.last_activity):
        assert isinstance(moment, datetime) and moment.tzinfo is not None
    assert session.expires_at > session.created_at
    assert session.wallets_count == 0
    assert session.duration_minutes == 0
    assert session.idle_minutes == 0


def test_validate_session_flat_shape(server: MockServer, signed_in: SpapsClient) -> None:
    current = signed_in.sessions.get_current_session()
    result = signed_in.sessions.validate_session()

    request = only(server, "POST", "/api/sessions/validate")
    assert_both_headers(request, bearer(signed_in))
    assert request.json == {}
    assert request.headers["content-type"].startswith("application/json")

    assert isinstance(result, SessionValidationResult)
    assert result.valid is True
    assert result.session_id == current.session_id
    assert result.expires_at == current.expires_at
    assert isinstance(result.expires_at, datetime) and result.expires_at.tzinfo is not None
    # SPAPS answers {valid, reason, session{...}}: no "renewed", and no reason when valid.
    assert result.renewed is None
    assert result.reason is None


def test_validate_session_reads_an_invalid_verdict(server: MockServer,
                                                   signed_in: SpapsClient) -> None:
    server.inject("POST", "/api/sessions/validate", {
        "status": 200, "raw_body": '{"success":true,"data":{"valid":false,'
                                   '"reason":"session_expired","session":null}}',
        "content_type": "application/json",
    })
    result = signed_in.sessions.validate_session()
    assert (result.valid, result.reason, result.session_id) == (False, "session_expired", None)


def test_validate_session_nested_shape_is_still_understood(server: MockServer,
                                                           signed_in: SpapsClient) -> None:
    server.inject("POST", "/api/sessions/validate", {
        "raw_body": '{"success":true,"data":{"session":{"valid":true,"session_id":"sess_1",'
                    '"expires_at":"2030-01-01T00:00:00Z","renewed":false}}}',
        "content_type": "application/json",
    })
    result = signed_in.sessions.validate_session()
    assert (result.valid, result.session_id, result.renewed) == (True, "sess_1", False)


def test_touch_session(server: MockServer, signed_in: SpapsClient) -> None:
    current = signed_in.sessions.get_current_session()
    result = signed_in.sessions.touch_session()

    request = only(server, "POST", "/api/sessions/touch")
    assert_both_headers(request, bearer(signed_in))
    assert request.json == {}
    assert request.headers["content-type"].startswith("application/json")

    assert isinstance(result, SessionTouchResult)
    assert result.session_id == current.session_id
    assert result.message == "Session activity updated"
    assert isinstance(result.last_activity, datetime)
    assert result.last_activity >= current.last_activity


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------


def test_list_sessions_calls_the_slash_collection_with_both_headers(
    server: MockServer, signed_in: SpapsClient
) -> None:
    current = signed_in.sessions.get_current_session()
    listing = signed_in.sessions.list_sessions()

    # "/api/sessions" would be a 307 to "/api/sessions/": the client goes there at once.
    assert server.request_count("GET", "/api/sessions") == 0
    request = only(server, "GET", "/api/sessions/")
    assert_both_headers(request, bearer(signed_in))
    assert request.raw_query == ""
    assert request.body == b""

    assert isinstance(listing, SessionListResult)
    assert listing.total == 1
    assert len(listing.sessions) == 1
    record = listing.sessions[0]
    assert isinstance(record, SessionRecord)
    assert record.session_id == current.session_id
    assert record.user_id == current.user_id
    assert record.application_id == APPLICATION_ID
    assert record.is_current is None  # SPAPS lists is_current as null
    assert isinstance(record.created_at, datetime)
    assert isinstance(record.last_used, datetime)
    assert record.user_agent and "spaps" in record.user_agent


def test_list_sessions_limit_zero_is_sent(server: MockServer, signed_in: SpapsClient) -> None:
    # limit=0 is sent as given (not dropped as falsy); SPAPS wants limit >= 1.
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.list_sessions(limit=0)
    assert only(server, "GET", "/api/sessions/").raw_query == "limit=0"
    assert (caught.value.status_code, caught.value.error_code) == (400, "VALIDATION_ERROR")
    assert caught.value.details == {
        "fields": {"query.limit": "Input should be greater than or equal to 1"}}


def test_list_sessions_pagination(server: MockServer, signed_in: SpapsClient) -> None:
    second_session(server)
    second_session(server)
    server.reset_stats()

    page1 = signed_in.sessions.list_sessions(limit=2)
    assert page1.total == 3
    assert len(page1.sessions) == 2
    page2 = signed_in.sessions.list_sessions(limit=2, offset=2)
    assert page2.total == 3
    assert len(page2.sessions) == 1
    all_ids = [s.session_id for s in page1.sessions + page2.sessions]
    assert len(all_ids) == len(set(all_ids)) == 3
    assert signed_in.sessions.list_sessions(limit=2, offset=3).sessions == []

    listed = [r for r in server.requests if r.path == "/api/sessions/"]
    assert [r.raw_query for r in listed] == ["limit=2", "limit=2&offset=2",
                                             "limit=2&offset=3"]
    for request in server.requests:
        assert_both_headers(request, bearer(signed_in))


def test_list_sessions_empty_starting_after_is_omitted(server: MockServer,
                                                       signed_in: SpapsClient) -> None:
    signed_in.sessions.list_sessions(starting_after="")
    assert only(server, "GET", "/api/sessions/").raw_query == ""


def test_list_sessions_sends_a_cursor_when_given(server: MockServer,
                                                 signed_in: SpapsClient) -> None:
    # For servers that page by cursor; SPAPS pages by offset and ignores it.
    listing = signed_in.sessions.list_sessions(limit=5, starting_after="sess_1")
    assert only(server, "GET", "/api/sessions/").query == {"limit": ["5"],
                                                           "starting_after": ["sess_1"]}
    assert listing.total == 1


# --------------------------------------------------------------------------------------------
# revoke
# --------------------------------------------------------------------------------------------


def test_revoke_session(server: MockServer, signed_in: SpapsClient) -> None:
    other_id = second_session(server)
    result = signed_in.sessions.revoke_session(other_id)

    request = only(server, "DELETE", f"/api/sessions/{other_id}")
    assert_both_headers(request, bearer(signed_in))
    assert request.body == b"" and "content-type" not in request.headers

    assert isinstance(result, SessionRevokeResult)
    assert result.session_id == other_id
    assert result.message == "Session revoked"
    remaining = [s.session_id for s in signed_in.sessions.list_sessions().sessions]
    assert other_id not in remaining
    assert len(remaining) == 1


def test_revoke_session_path_parameter_is_percent_encoded(server: MockServer,
                                                          signed_in: SpapsClient) -> None:
    balance_before = server.request_count("GET", "/api/payments/balance")
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.revoke_session("../payments/balance")
    assert caught.value.status_code == 404
    assert caught.value.error_code == "NOT_FOUND"

    deletes = [r for r in server.requests if r.method == "DELETE"]
    assert [r.path for r in deletes] == ["/api/sessions/..%2Fpayments%2Fbalance"]
    assert server.request_count("DELETE", "/api/payments/balance") == 0
    assert server.request_count("GET", "/api/payments/balance") == balance_before
    assert all(not r.path.startswith("/api/payments") for r in server.requests)


@pytest.mark.parametrize(
    ("session_id", "raw_path"),
    [
        ("a?b#c", "/api/sessions/a%3Fb%23c"),
        ("with space", "/api/sessions/with%20space"),
        ("sess/1", "/api/sessions/sess%2F1"),
        ("ünï", "/api/sessions/%C3%BCn%C3%AF"),
    ],
)
def test_revoke_session_encodes_reserved_characters(server: MockServer, signed_in: SpapsClient,
                                                    session_id: str, raw_path: str) -> None:
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.revoke_session(session_id)
    assert caught.value.status_code == 404
    deletes = [r for r in server.requests if r.method == "DELETE"]
    assert [r.path for r in deletes] == [raw_path]
    assert deletes[0].raw_query == ""


@pytest.mark.parametrize("session_id", ["", ".", ".."])
def test_revoke_session_rejects_empty_or_dot_ids_before_sending(
    server: MockServer, signed_in: SpapsClient, session_id: str
) -> None:
    count = len(server.requests)
    with pytest.raises(ValueError):
        signed_in.sessions.revoke_session(session_id)
    assert len(server.requests) == count


def test_revoked_session_token_is_rejected_with_session_error(server: MockServer,
                                                              signed_in: SpapsClient) -> None:
    with SpapsClient(base_url=server.url, api_key=API_KEY) as other:
        pair = other.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        other_id = other.sessions.get_current_session().session_id
    signed_in.sessions.revoke_session(other_id)
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.get_current_session(access_token_override=pair.access_token)
    assert caught.value.status_code == 401
    assert caught.value.error_code == "INVALID_TOKEN"
    assert str(caught.value) == "Token has been revoked"


# --------------------------------------------------------------------------------------------
# access_token_override and error mapping
# --------------------------------------------------------------------------------------------


def test_access_token_override_wins(server: MockServer, signed_in: SpapsClient) -> None:
    with SpapsClient(base_url=server.url, api_key=API_KEY) as other:
        theirs = other.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    session = signed_in.sessions.get_current_session(access_token_override=theirs.access_token)
    request = only(server, "GET", "/api/sessions/current")
    assert request.headers["authorization"] == f"Bearer {theirs.access_token}"
    assert session.session_id != signed_in.sessions.validate_session().session_id


def test_unknown_token_override_is_session_error_401(server: MockServer,
                                                     signed_in: SpapsClient) -> None:
    server.inject("GET", "/api/sessions/current",
                  {"passthrough": True, "headers": {"x-request-id": "req_sessions_401"}})
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.get_current_session(access_token_override="not-a-token")
    error = caught.value
    assert isinstance(error, SpapsError)
    assert error.status_code == 401
    assert error.error_code == "INVALID_TOKEN"
    assert error.request_id == "req_sessions_401"
    assert server.request_count("POST", "/api/auth/refresh") == 0


def test_rejected_token_without_auto_refresh_is_session_error_401(server: MockServer) -> None:
    with SpapsClient(base_url=server.url, api_key=API_KEY, auto_refresh=False) as spaps:
        spaps.set_tokens(access_token="stale-token", refresh_token="stale-refresh")
        with pytest.raises(SessionError) as caught:
            spaps.sessions.validate_session()
    assert caught.value.status_code == 401
    assert caught.value.error_code == "INVALID_TOKEN"
    assert server.request_count("POST", "/api/auth/refresh") == 0


def test_rejected_token_without_refresh_token_is_session_error_401(server: MockServer,
                                                                   client: SpapsClient) -> None:
    client.set_tokens(access_token="never-issued")
    with pytest.raises(SessionError) as caught:
        client.sessions.get_current_session()
    assert caught.value.status_code == 401
    assert caught.value.error_code == "INVALID_TOKEN"
    assert caught.value.request_id is not None


def test_revoked_session_with_failed_refresh_reports_the_refresh_failure(
    server: MockServer, signed_in: SpapsClient
) -> None:
    # The stored session is revoked elsewhere; the automatic refresh then fails as well.
    own_id = signed_in.sessions.get_current_session().session_id
    with SpapsClient(base_url=server.url, api_key=API_KEY) as other:
        other.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        other.sessions.revoke_session(own_id)
    with pytest.raises(SpapsError) as caught:
        signed_in.sessions.get_current_session()
    assert isinstance(caught.value, (SessionError, AuthError))
    assert caught.value.status_code == 401


def test_unknown_session_is_session_error_404(server: MockServer,
                                              signed_in: SpapsClient) -> None:
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.revoke_session("sess_does_not_exist")
    error = caught.value
    assert error.status_code == 404
    assert error.error_code == "NOT_FOUND"
    assert error.request_id and is_uuid(error.request_id)
    assert "sess_does_not_exist" in str(error)
    # A well-formed id of no session of this user is just as unknown.
    with pytest.raises(SessionError) as unknown:
        signed_in.sessions.revoke_session(str(uuid.uuid4()))
    assert (unknown.value.status_code, unknown.value.error_code) == (404, "NOT_FOUND")


def test_server_error_is_session_error(server: MockServer, signed_in: SpapsClient) -> None:
    server.inject("POST", "/api/sessions/touch", {"status": 500, "message": "touch failed"})
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.touch_session()
    assert caught.value.status_code == 500
    assert caught.value.error_code == "SERVER_ERROR"
    assert str(caught.value) == "touch failed"


# --------------------------------------------------------------------------------------------
# The aggregate property needs tokens
# --------------------------------------------------------------------------------------------


def test_sessions_property_requires_sign_in(server: MockServer, client: SpapsClient) -> None:
    with pytest.raises(ValueError, match=r"(?i)access token"):
        client.sessions  # noqa: B018
    assert server.requests == []
    client.set_tokens(access_token="set-by-hand")
    assert isinstance(client.sessions, SessionsClient)
    client.clear_tokens()
    with pytest.raises(ValueError):
        client.sessions  # noqa: B018


def test_standalone_sessions_client_without_token(server: MockServer) -> None:
    with SessionsClient(base_url=server.url, api_key=API_KEY, access_token=None) as sessions:
        with pytest.raises(ValueError):
            sessions.get_current_session()
        with pytest.raises(ValueError):
            sessions.list_sessions(access_token_override="")
    assert server.requests == []


def test_standalone_sessions_client(server: MockServer, signed_in: SpapsClient) -> None:
    tokens = signed_in.get_tokens()
    assert tokens is not None
    with SessionsClient(base_url=server.url + "//", api_key=API_KEY,
                        access_token=tokens.access_token) as sessions:
        assert sessions.base_url == server.url
        assert sessions.SESSIONS_PREFIX == "/api/sessions"
        assert sessions.validate_session().valid is True
        listing = sessions.list_sessions(limit=5)
        assert listing.total == 1
    assert only(server, "POST", "/api/sessions/validate").headers["authorization"] == (
        f"Bearer {tokens.access_token}"
    )


# --------------------------------------------------------------------------------------------
# Async
# --------------------------------------------------------------------------------------------


def test_async_sessions_end_to_end(server: MockServer) -> None:
    other_id = second_session(server)
    server.reset_stats()

    async def scenario() -> Dict[str, Any]:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            with pytest.raises(ValueError):
                spaps.sessions  # noqa: B018
            await spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
            out: Dict[str, Any] = {"token": spaps.get_tokens().access_token}  # type: ignore[union-attr]
            out["current"] = await spaps.sessions.get_current_session()
            out["valid"] = await spaps.sessions.validate_session()
            out["listing"] = await spaps.sessions.list_sessions(limit=1)
            out["full"] = await spaps.sessions.list_sessions()
            out["touched"] = await spaps.sessions.touch_session()
            out["revoked"] = await spaps.sessions.revoke_session(other_id)
            with pytest.raises(ValueError):
                await spaps.sessions.revoke_session("")
            try:
                await spaps.sessions.revoke_session("../payments/balance")
            except SessionError as exc:
                out["error"] = exc
            return out

    out = asyncio.run(scenario())
    auth = f"Bearer {out['token']}"
    assert isinstance(out["current"], SessionSummary)
    assert isinstance(out["valid"], SessionValidationResult) and out["valid"].valid is True
    assert out["valid"].session_id == out["current"].session_id
    assert isinstance(out["listing"], SessionListResult)
    assert len(out["listing"].sessions) == 1 and out["listing"].total == 2
    assert {s.session_id for s in out["full"].sessions} == {other_id,
                                                            out["current"].session_id}
    assert isinstance(out["touched"], SessionTouchResult)
    assert isinstance(out["revoked"], SessionRevokeResult)
    assert out["revoked"].session_id == other_id
    assert out["error"].status_code == 404

    requests: List[RecordedRequest] = [r for r in server.requests
                                       if r.path.startswith("/api/sessions")]
    assert [(r.method, r.path, r.raw_query) for r in requests] == [
        ("GET", "/api/sessions/current", ""),
        ("POST", "/api/sessions/validate", ""),
        ("GET", "/api/sessions/", "limit=1"),
        ("GET", "/api/sessions/", ""),
        ("POST", "/api/sessions/touch", ""),
        ("DELETE", f"/api/sessions/{other_id}", ""),
        ("DELETE", "/api/sessions/..%2Fpayments%2Fbalance", ""),
    ]
    for request in requests:
        assert_both_headers(request, auth)
    assert requests[1].json == {} and requests[4].json == {}


def test_async_session_errors(server: MockServer) -> None:
    async def scenario() -> SessionError:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            await spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
            try:
                await spaps.sessions.get_current_session(access_token_override="bogus")
            except SessionError as exc:
                return exc
        raise AssertionError("no SessionError")

    error = asyncio.run(scenario())
    assert error.status_code == 401
    assert error.error_code == "INVALID_TOKEN"
    assert error.request_id and is_uuid(error.request_id)


def test_standalone_async_sessions_client(server: MockServer, signed_in: SpapsClient) -> None:
    tokens = signed_in.get_tokens()
    assert tokens is not None

    async def scenario() -> SessionSummary:
        async with AsyncSessionsClient(base_url=server.url, api_key=API_KEY,
                                       access_token=tokens.access_token,
                                       retry_config=RetryConfig(max_attempts=1)) as sessions:
            assert sessions.access_token == tokens.access_token
            return await sessions.get_current_session()

    session = asyncio.run(scenario())
    assert is_uuid(session.session_id)
    assert only(server, "GET", "/api/sessions/current").headers["authorization"] == (
        f"Bearer {tokens.access_token}"
    )
