"""Credentials never reach hooks, logs or exception text; hooks fire in the order docs/api.md
("LoggingHooks and default_logging_hooks()") gives."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Dict, Iterable, List, Tuple

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD
from loopback import closed_port

from spaps_client import (
    AuthError,
    HttpRequest,
    HttpResponse,
    LoggingHooks,
    MetricsError,
    RetryConfig,
    SessionError,
    SpapsClient,
    SpapsTransportError,
    default_logging_hooks,
)
from spaps_mock import MockServer

WHITELIST_EMAIL = "private.person+vip@example.org"
ENCODED_WHITELIST_EMAIL = "private.person%2Bvip%40example.org"


def secrets_of(client: SpapsClient) -> List[str]:
    tokens = client.get_tokens()
    assert tokens is not None and tokens.refresh_token
    return [API_KEY, tokens.access_token, tokens.refresh_token, DEMO_PASSWORD]


def assert_free_of(texts: Iterable[str], secrets: Iterable[str]) -> None:
    texts = list(texts)
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"{secret!r} leaked into {text!r}"


class Recorder:
    """LoggingHooks that keep every call."""

    def __init__(self) -> None:
        self.events: List[Tuple[Any, ...]] = []

    def hooks(self) -> LoggingHooks:
        return LoggingHooks(
            on_request=lambda request: self.events.append(("request", request)),
            on_response=lambda request, response, elapsed, attempt: self.events.append(
                ("response", request, response, elapsed, attempt)),
            on_error=lambda request, exc, attempt: self.events.append(
                ("error", request, exc, attempt)),
            on_retry=lambda request, attempt: self.events.append(("retry", request, attempt)),
        )

    def texts(self) -> List[str]:
        out: List[str] = []
        for event in self.events:
            for item in event[1:]:
                out.append(repr(item))
                if isinstance(item, (HttpRequest, HttpResponse)):
                    out.append(item.url)
                    out.append(repr(item.headers))
        return out


# --------------------------------------------------------------------------------------------
# Hooks see redacted requests
# --------------------------------------------------------------------------------------------


def test_hooks_receive_redacted_headers(server: MockServer) -> None:
    recorder = Recorder()
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     logging_hooks=recorder.hooks()) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        spaps.sessions.get_current_session()
        spaps.whitelist.check(email=WHITELIST_EMAIL)
        secrets = secrets_of(spaps)

    requests = [event[1] for event in recorder.events if event[0] == "request"]
    assert len(requests) == 3
    for request in requests:
        assert isinstance(request, HttpRequest)
        assert request.headers["X-API-Key"] != API_KEY
        assert "redacted" in request.headers["X-API-Key"]
    session_request = requests[1]
    assert session_request.method == "GET"
    assert session_request.url == server.url + "/api/sessions/current"
    assert "redacted" in session_request.headers["Authorization"]
    assert "Authorization" not in requests[0].headers  # sign-in sends no bearer
    assert requests[2].url.startswith(server.url + "/api/v1/whitelist/check?email=")

    responses = [event[2] for event in recorder.events if event[0] == "response"]
    assert [response.status_code for response in responses] == [200, 200, 200]
    assert all(isinstance(response, HttpResponse) for response in responses)
    # SPAPS request ids are UUIDs, the same in the X-Request-ID header and the body.
    assert all(response.request_id and uuid.UUID(response.request_id)
               for response in responses)

    assert_free_of(recorder.texts(), [*secrets, WHITELIST_EMAIL, ENCODED_WHITELIST_EMAIL])
    # The server did get the real values.
    assert server.requests[1].headers["x-api-key"] == API_KEY
    assert server.requests[2].query == {"email": [WHITELIST_EMAIL]}


def test_default_logging_hooks_never_log_secrets(server: MockServer,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="spaps_client.http")
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     logging_hooks=default_logging_hooks()) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        pair_refresh = spaps.get_tokens().refresh_token  # type: ignore[union-attr]
        spaps.auth.refresh_tokens(refresh_token=pair_refresh)  # type: ignore[arg-type]
        spaps.sessions.get_current_session()
        spaps.sessions.list_sessions(limit=2)
        spaps.whitelist.check(email=WHITELIST_EMAIL)
        with pytest.raises(AuthError):
            spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password="wrong-password-xyz")
        secrets = [*secrets_of(spaps), pair_refresh or "", "wrong-password-xyz"]

    records = [r for r in caplog.records if r.name == "spaps_client.http"]
    assert {r.getMessage() for r in records} >= {"HTTP request", "HTTP response"}
    texts = [repr(vars(record)) for record in records] + [r.getMessage() for r in records]
    assert_free_of(texts, [*secrets, WHITELIST_EMAIL, ENCODED_WHITELIST_EMAIL])

    urls = [getattr(record, "url", "") for record in records]
    assert any("/api/v1/whitelist/check" in url for url in urls)
    assert any("limit=2" in url for url in urls)  # harmless query values stay readable
    statuses = [getattr(r, "status", None) for r in records if r.getMessage() == "HTTP response"]
    assert 401 in statuses and 200 in statuses
    assert all(getattr(r, "request_id", None) for r in records
               if r.getMessage() == "HTTP response")


def test_default_logging_hooks_on_transport_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="spaps_client.http")
    with SpapsClient(base_url=f"http://127.0.0.1:{closed_port()}", api_key=API_KEY,
                     retry_config=RetryConfig(max_attempts=1),
                     logging_hooks=default_logging_hooks()) as spaps:
        spaps.set_tokens(access_token="at_never_logged_123")
        with pytest.raises(SpapsTransportError):
            spaps.whitelist.check(email=WHITELIST_EMAIL)
        with pytest.raises(SpapsTransportError):
            spaps.sessions.get_current_session()
    records = [r for r in caplog.records if r.name == "spaps_client.http"]
    assert any(r.levelno >= logging.WARNING for r in records)
    texts = [repr(vars(record)) for record in records]
    assert_free_of(texts, [API_KEY, "at_never_logged_123", WHITELIST_EMAIL,
                           ENCODED_WHITELIST_EMAIL])


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


def exception_texts(error: BaseException) -> List[str]:
    texts = [str(error), repr(error)]
    response = getattr(error, "response", None)
    if response is not None:
        texts += [repr(response), response.url, repr(response.headers)]
    cause = error.__cause__
    if cause is not None:
        texts += [str(cause), repr(cause)]
    return texts


def test_auth_error_text_has_no_secrets(server: MockServer, signed_in: SpapsClient) -> None:
    secrets = secrets_of(signed_in)
    with pytest.raises(AuthError) as caught:
        signed_in.auth.sign_in_with_password(email=DEMO_EMAIL, password="wrong-password-xyz")
    assert_free_of(exception_texts(caught.value), [*secrets, "wrong-password-xyz"])


def test_session_error_text_has_no_secrets(server: MockServer, signed_in: SpapsClient) -> None:
    secrets = secrets_of(signed_in)
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.revoke_session("sess_missing")
    assert_free_of(exception_texts(caught.value), secrets)
    with pytest.raises(SessionError) as rejected:
        signed_in.sessions.get_current_session(access_token_override="at_override_secret")
    assert_free_of(exception_texts(rejected.value), [*secrets, "at_override_secret"])


def test_transport_error_text_has_no_secrets() -> None:
    with SpapsClient(base_url=f"http://127.0.0.1:{closed_port()}", api_key=API_KEY,
                     retry_config=RetryConfig(max_attempts=1)) as spaps:
        spaps.set_tokens(access_token="at_transport_secret", refresh_token="rt_transport")
        errors = []
        for call in (
            lambda: spaps.sessions.get_current_session(),
            lambda: spaps.whitelist.check(email=WHITELIST_EMAIL),
            lambda: spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD),
        ):
            with pytest.raises(SpapsTransportError) as caught:
                call()
            errors.append(caught.value)
    for error in errors:
        assert_free_of(exception_texts(error), [API_KEY, "at_transport_secret", "rt_transport",
                                                DEMO_PASSWORD, WHITELIST_EMAIL,
                                                ENCODED_WHITELIST_EMAIL])


# --------------------------------------------------------------------------------------------
# Order of hook calls
# --------------------------------------------------------------------------------------------


def test_hook_order_with_retries(server: MockServer) -> None:
    server.inject("GET", "/api/sessions/current", {"status": 503}, {"status": 500})
    recorder = Recorder()
    config = RetryConfig(max_attempts=3, backoff_factor=0, jitter=False)
    with SpapsClient(base_url=server.url, api_key=API_KEY, retry_config=config,
                     logging_hooks=recorder.hooks()) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        recorder.events.clear()
        session = spaps.sessions.get_current_session()
    assert uuid.UUID(session.session_id)

    summary: List[Tuple[Any, ...]] = []
    for event in recorder.events:
        if event[0] == "request":
            summary.append(("request",))
        elif event[0] == "response":
            summary.append(("response", event[2].status_code, event[4]))
            assert isinstance(event[3], float) and event[3] >= 0
        elif event[0] == "retry":
            summary.append(("retry", event[2]))
        else:
            summary.append(("error", event[3]))
    assert summary == [
        ("request",),
        ("response", 503, 1),
        ("retry", 2),
        ("response", 500, 2),
        ("retry", 3),
        ("response", 200, 3),
    ]
    # Every hook call is about the same logical request.
    assert len({id(event[1]) for event in recorder.events}) == 1
    assert server.request_count("GET", "/api/sessions/current") == 3


def test_hook_order_when_attempts_run_out(server: MockServer) -> None:
    server.inject("GET", "/health", {"status": 503}, {"status": 503}, {"status": 503})
    recorder = Recorder()
    config = RetryConfig(max_attempts=2, backoff_factor=0, jitter=False)
    spaps = SpapsClient(base_url=server.url, api_key=API_KEY, retry_config=config,
                        logging_hooks=recorder.hooks())
    with spaps, pytest.raises(MetricsError) as caught:
        spaps.metrics.health()
    assert caught.value.status_code == 503
    kinds = [(event[0], event[-1] if event[0] != "request" else None)
             for event in recorder.events]
    assert kinds == [("request", None), ("response", 1), ("retry", 2), ("response", 2)]
    assert server.request_count("GET", "/health") == 2


def test_hook_errors_on_transport_failure() -> None:
    recorder = Recorder()
    spaps = SpapsClient(base_url=f"http://127.0.0.1:{closed_port()}", api_key=API_KEY,
                        retry_config=RetryConfig(max_attempts=1), logging_hooks=recorder.hooks())
    with spaps, pytest.raises(SpapsTransportError) as caught:
        spaps.metrics.health()
    assert [event[0] for event in recorder.events] == ["request", "error"]
    assert recorder.events[1][2] is caught.value
    assert recorder.events[1][3] == 1


def test_a_failing_hook_does_not_break_the_call(server: MockServer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    def explode(*args: Any) -> None:
        raise RuntimeError("hook bug")

    hooks = LoggingHooks(on_request=explode, on_response=explode)
    with SpapsClient(base_url=server.url, api_key=API_KEY, logging_hooks=hooks) as spaps:
        health = spaps.metrics.health()
    # The raw body: SPAPS puts the verdict under "data".
    assert health["success"] is True and health["data"]["status"] == "ok"
    assert any("hook" in record.getMessage() for record in caplog.records)


def test_logging_hooks_accept_a_dict(server: MockServer) -> None:
    seen: List[str] = []
    with SpapsClient(base_url=server.url, api_key=API_KEY,
                     logging_hooks={"on_request": lambda request: seen.append(request.url)}
                     ) as spaps:
        spaps.metrics.health()
    assert seen == [server.url + "/health"]


# --------------------------------------------------------------------------------------------
# Server text that echoes a secret is scrubbed before it reaches the exception
# --------------------------------------------------------------------------------------------


def _echoing_error(status: int, code: str, *echoed: str) -> Dict[str, Any]:
    import json

    text = "rejected: " + " / ".join(echoed)
    return {"status": status, "content_type": "application/json", "raw_body": json.dumps({
        "success": False,
        "error": {"code": code, "message": text, "details": {"fields": {"input": text}}},
    })}


def test_password_echoed_by_the_server_is_scrubbed(server: MockServer,
                                                    client: SpapsClient) -> None:
    server.inject("POST", "/api/auth/login",
                  _echoing_error(400, "WEAK_PASSWORD", DEMO_PASSWORD, API_KEY))
    with pytest.raises(AuthError) as caught:
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    error = caught.value
    assert error.error_code == "WEAK_PASSWORD"
    assert "[redacted]" in str(error)
    assert_free_of([str(error), repr(error), repr(error.args), repr(error.details)],
                   [DEMO_PASSWORD, API_KEY])


def test_tokens_echoed_by_the_server_are_scrubbed(server: MockServer,
                                                  signed_in: SpapsClient) -> None:
    secrets = secrets_of(signed_in)
    access, refresh = secrets[1], secrets[2]
    server.inject("GET", "/api/sessions/current",
                  _echoing_error(403, "FORBIDDEN", access, refresh, API_KEY))
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.get_current_session()
    assert_free_of([str(caught.value), repr(caught.value), repr(caught.value.details)], secrets)
    # A refresh that fails with the server quoting the refresh token leaks nothing either.
    server.inject("POST", "/api/auth/refresh",
                  _echoing_error(401, "INVALID_REFRESH_TOKEN", refresh))
    with pytest.raises(AuthError) as refused:
        signed_in.auth.refresh_tokens(refresh_token=refresh)
    assert refused.value.error_code == "INVALID_REFRESH_TOKEN"
    assert_free_of([str(refused.value), repr(refused.value.details)], [refresh])


def test_percent_encoded_echo_is_scrubbed_too(server: MockServer, client: SpapsClient) -> None:
    from urllib.parse import quote

    password = "p@ss w/rd+secret"
    server.inject("POST", "/api/auth/login",
                  _echoing_error(400, "INVALID_CREDENTIALS", quote(password, safe="")))
    with pytest.raises(AuthError) as caught:
        client.auth.sign_in_with_password(email=DEMO_EMAIL, password=password)
    assert quote(password, safe="") not in str(caught.value)
