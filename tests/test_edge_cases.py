"""Edge cases of the transport, the retry loop, the token check and the async pool.

Each test states a behaviour users rely on (docs/reliability.md, docs/errors.md): budgets
that bound every step, errors that keep their cause and never quote secrets, a TLS fallback
that costs nothing when there is nothing to fall back to, services that cannot be replaced
by accident. They run over real loopback HTTP: ``spaps_mock`` or a raw socket server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD
from loopback import closed_port, self_signed_certificate
from rawserver import RawConnection, answer_once, raw_server

from spaps_client import (
    AsyncSpapsClient,
    InMemoryTokenStorage,
    LoggingHooks,
    RedisTokenStorage,
    RetryClient,
    RetryConfig,
    SpapsClient,
    SpapsConfigurationError,
    SpapsError,
    SpapsTimeoutError,
    SpapsTransportError,
)
from spaps_mock import MockServer

NO_RETRY = RetryConfig(max_attempts=1)
EMPTY_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


# --- token storage / aggregate clients ---------------------------------------------------------


def test_token_check_sees_a_sign_in_stored_by_another_client(server: MockServer) -> None:
    """Two clients (or processes, with FileTokenStorage) share one storage. The worker looked
    before anyone signed in; once the other one signs in, the worker must see the tokens (the
    old ``_require_tokens`` read the storage; ``peek()`` now answers from a cached ``None``)."""
    storage = InMemoryTokenStorage()
    with SpapsClient(base_url=server.url, api_key=API_KEY, token_storage=storage) as worker, \
            SpapsClient(base_url=server.url, api_key=API_KEY, token_storage=storage) as login:
        with pytest.raises(ValueError):
            worker.sessions  # noqa: B018 - not signed in yet
        login.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        assert worker.sessions.get_current_session().session_id


class FakeRedis:
    """Enough of redis-py for RedisTokenStorage; ``refuse_lock`` SET NX calls fail first, as
    when another host holds the refresh lease for a moment."""

    def __init__(self) -> None:
        self.data: Dict[str, Any] = {}
        self.refuse_lock = 0
        self.lock = threading.Lock()

    def get(self, name: str) -> Any:
        with self.lock:
            return self.data.get(name)

    def set(self, name: str, value: Any, nx: bool = False, px: Optional[int] = None) -> Any:
        with self.lock:
            if nx and (self.refuse_lock or name in self.data):
                self.refuse_lock = max(0, self.refuse_lock - 1)
                return None
            self.data[name] = value
            return True

    def delete(self, name: str) -> int:
        with self.lock:
            return 1 if self.data.pop(name, None) is not None else 0

    def eval(self, script: str, numkeys: int, *args: Any) -> int:
        key, owner = args[0], args[1]
        with self.lock:
            if self.data.get(key) == owner:
                del self.data[key]
                return 1
            return 0


def test_refresh_lease_wait_is_measured_on_one_clock(server: MockServer) -> None:
    """``_StorageLock(storage, deadline - time.monotonic())`` mixes the HTTP client's clock
    (``clock=``) with the real one: with a clock behind ``time.monotonic`` the lease may not
    be waited for at all, and a refresh fails although 10 s of budget are left."""
    redis = FakeRedis()
    http = RetryClient(base_url=server.url, clock=lambda: 0.0)
    storage = RedisTokenStorage(redis, lock_timeout=5)
    with SpapsClient(http_client=http, api_key=API_KEY, token_storage=storage) as spaps:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        tokens = spaps.get_tokens()
        assert tokens is not None and tokens.refresh_token
        spaps.set_tokens(access_token=tokens.access_token, refresh_token=tokens.refresh_token,
                         expires_at=datetime.now(timezone.utc) - timedelta(seconds=5))
        redis.refuse_lock = 1  # another host holds the lease for one poll (10 ms)
        assert spaps.sessions.get_current_session().session_id
    http.close()


def test_a_service_slot_cannot_be_overwritten(client: SpapsClient) -> None:
    """The old services were read-only properties; ``_ServiceSlot`` is a non-data descriptor,
    so an assignment silently shadows it (and skips the token check)."""
    with pytest.raises(AttributeError):
        client.sessions = object()  # type: ignore[assignment]


# --- async --------------------------------------------------------------------------------------


def test_a_call_after_aclose_starts_no_new_worker_threads(server: MockServer) -> None:
    """``aclose()`` shuts the pool down, but ``_Runner._pool()`` builds a new one on the next
    call: the call fails (the transport is closed) and leaves a live ``spaps_*`` thread
    behind that nothing will ever shut down."""

    async def scenario() -> List[threading.Thread]:
        spaps = AsyncSpapsClient(base_url=server.url, api_key=API_KEY)
        await spaps.metrics.health()
        await spaps.aclose()
        before = set(threading.enumerate())
        with pytest.raises(SpapsConfigurationError):
            await spaps.metrics.health()
        return [thread for thread in threading.enumerate()
                if thread.name.startswith("spaps_") and thread not in before]

    assert asyncio.run(scenario()) == []


# --- transport ----------------------------------------------------------------------------------


def test_a_connect_error_keeps_the_socket_error_as_its_cause() -> None:
    """The old client chained the OSError (``raise error`` with ``__cause__`` set);
    ``_connect`` now raises ``from None``, which throws the cause away."""
    with RetryClient(retry_config=NO_RETRY) as http, \
            pytest.raises(SpapsTransportError) as caught:
        http.request("GET", f"http://127.0.0.1:{closed_port()}/health")
    assert isinstance(caught.value.__cause__, OSError)


def test_absolute_form_through_a_proxy_carries_no_user_info(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``send`` uses ``request.url`` as the absolute-form target, user info included; the old
    client rebuilt it from the origin (RFC 9110 4.2.4: never send userinfo in a target)."""
    with raw_server(answer_once(EMPTY_200)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with RetryClient(retry_config=NO_RETRY) as http:
            http.request("GET", "http://alice:s3cret@spaps.example.invalid/health")
        head = proxy.heads()[0]
    assert b"s3cret" not in head
    assert head.startswith(b"GET http://spaps.example.invalid/health HTTP/1.1\r\n")


def test_sending_on_a_pooled_connection_is_bounded_by_the_calls_budget() -> None:
    """A reused connection keeps the socket timeout its previous exchange left (here an hour):
    ``sendall`` of a body the server does not read then outlives a 0.5 s budget. The old pool
    set the new budget on the socket when it handed the connection out."""

    def handler(conn: RawConnection, index: int) -> None:
        if conn.read_head() is not None:
            conn.send(EMPTY_200)
            conn.server.stopping.wait()  # read nothing more: the next body piles up

    outcome: List[BaseException] = []
    with raw_server(handler) as raw:
        http = RetryClient(base_url=raw.url, retry_config=NO_RETRY)
        http.request("GET", "/warm", timeout=3600)

        def post() -> None:
            try:
                http.request("POST", "/upload", body=b"x" * (64 << 20), timeout=0.5)
            except SpapsError as exc:
                outcome.append(exc)

        worker = threading.Thread(target=post, daemon=True)
        worker.start()
        worker.join(timeout=30)  # a liveness bound, 60x the budget; the bug blocks for an hour
        finished = not worker.is_alive()
        http.close()
    worker.join(timeout=10)  # the server closing its sockets ends a stuck send
    assert finished
    assert isinstance(outcome[0], SpapsTimeoutError)


def test_no_request_goes_out_on_a_pooled_connection_without_budget() -> None:
    """``HttpTransport.send(timeout<=0)`` still writes the request on an idle connection and
    only then times out, so a POST may be processed although the call reports a timeout; the
    old ``_exchange`` refused before sending (a new connection refuses too)."""
    from spaps_client import HttpRequest, HttpTransport

    second: List[Optional[bytes]] = []
    done = threading.Event()

    def handler(conn: RawConnection, index: int) -> None:
        if index == 0 and conn.read_head() is not None:
            conn.send(EMPTY_200)
            second.append(conn.read_head())  # the next request, or None at the client's close
            done.set()

    with raw_server(handler) as raw:
        transport = HttpTransport()
        transport.send(HttpRequest("GET", raw.url + "/one"), timeout=5)
        with pytest.raises(SpapsTimeoutError):
            transport.send(HttpRequest("POST", raw.url + "/two", body=b"{}"), timeout=0)
        transport.close()
        assert done.wait(10)
    assert second == [None]


def test_a_refused_header_line_is_not_quoted_with_its_value() -> None:
    """A refused header line is named in the error, never quoted: its value may be a cookie
    that is redacted everywhere else."""
    raw = (b"HTTP/1.1 200 OK\r\nSet-Cookie: session=COOKIE-SECRET-42\x01\r\n"
           b"Content-Length: 2\r\n\r\n{}")
    with raw_server(answer_once(raw)) as server, RetryClient(retry_config=NO_RETRY) as http, \
            pytest.raises(SpapsTransportError) as caught:
        http.request("GET", server.url + "/")
    assert "COOKIE-SECRET-42" not in str(caught.value)
    assert "Set-Cookie" in str(caught.value)


def test_a_malformed_head_says_the_server_answered() -> None:
    """Strict framing refuses a head that breaks the grammar, even in a header that does not
    frame the body (a peer that writes ``Name : value`` cannot be trusted to frame right).
    The error then carries the status the server answered with, so the caller knows a
    sign-in was processed, and a POST is not sent again."""
    body = json.dumps({"success": True, "data": {
        "access_token": "access-token-1234", "refresh_token": "refresh-token-1234",
        "expires_in": 3600, "user": {"id": "user-1"}}}).encode()
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Powered-By : legacy\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with raw_server(answer_once(raw)) as server, \
            SpapsClient(base_url=server.url, api_key=API_KEY) as spaps, \
            pytest.raises(SpapsTransportError) as caught:
        spaps.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
    assert caught.value.status_code == 200
    assert caught.value.retryable is False
    assert "X-Powered-By" in str(caught.value) and "legacy" not in str(caught.value)


def test_an_untrusted_certificate_costs_one_handshake_without_a_hashed_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With SSL_CERT_FILE set (or on Windows/macOS) the first context already is the whole
    store, yet a verification failure opens a second connection and handshake with an
    identical full-store context (also cached twice) before failing the same way."""
    cert, key = self_signed_certificate(tmp_path, "/CN=localhost",
                                        "subjectAltName=DNS:localhost,IP:127.0.0.1")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-bundle.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))

    def handler(conn: RawConnection, index: int) -> None:
        conn.sock.settimeout(5)
        with contextlib.suppress(OSError):
            context.wrap_socket(conn.sock, server_side=True).close()

    with raw_server(handler) as raw, RetryClient(retry_config=NO_RETRY) as http:
        with pytest.raises(SpapsTransportError, match="certificate"):
            http.request("GET", f"https://localhost:{raw.port}/health")
        assert raw.settle() == 1


# --- retries and hooks --------------------------------------------------------------------------


def test_on_error_sees_a_call_on_a_closed_client() -> None:
    """``on_error`` fires "for every attempt that raised"; the old loop caught any SpapsError
    (a closed client, a refused header), the new one lets those pass without the hook."""
    seen: List[Exception] = []
    http = RetryClient(retry_config=NO_RETRY, logging_hooks=LoggingHooks(
        on_error=lambda request, exc, attempt: seen.append(exc)))
    http.close()
    with pytest.raises(SpapsConfigurationError):
        http.request("GET", f"http://127.0.0.1:{closed_port()}/health")
    assert len(seen) == 1


# --- command line -------------------------------------------------------------------------------


def test_cli_does_not_call_an_answering_server_unreachable(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A body over 16 MiB is now a ``SpapsTransportError`` (it was ``INVALID_RESPONSE``), so
    ``main`` reports a server that answered as "SPAPS unreachable" with exit 3, not 1."""
    from spaps_client import EXIT_FAILED, main

    size = 16 * 1024 * 1024 + 1
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    with raw_server(answer_once(head % size + b" " * size)) as server:
        code = main(["--base-url", server.url, "health"])
    assert code == EXIT_FAILED, capsys.readouterr().err
